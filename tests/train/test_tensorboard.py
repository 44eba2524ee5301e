"""``--tensorboard``: the trainer's TensorBoard events, against a stand-in for torch's SummaryWriter
(what the trainer asks of it), and read back with TensorBoard's own loaders when it is installed."""

import os
import re
import shutil
import signal
import sys
import types

import numpy as np
import pytest

from train.trainer import HEALTH_METRICS, RunLog, Trainer, main

from trainer_fixtures import LOSS_IMPL, base_argv, faces, one_thread, read_jsonl  # noqa: F401


def argv(faces, output, **overrides):
    data, pairs = faces
    options = {"loss_impl": LOSS_IMPL, "max_steps": 4, "save_every": 2, "eval_every": 2, **overrides}
    return [arg for arg in base_argv(data, str(output), pairs, **options) if arg != "--no-tensorboard"]


class FakeWriter:
    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars, self.summaries, self.closed = [], [], False
        self.file_writer = types.SimpleNamespace(add_summary=self.summaries.append)
        FakeWriter.writers.append(self)

    def add_scalar(self, tag, value, step):
        assert not self.closed, "written after close"
        self.scalars.append((tag, step, value))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeWriter.writers = []
    hparams = []

    def record_hparams(values, metrics):
        hparams.append((values, metrics))
        return ["experiment", "session start", "session end"]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard.summary", types.SimpleNamespace(hparams=record_hparams))
    return hparams


def logged(output):
    """(tag, step, value) of each scalar that metrics.jsonl and verification.jsonl hold, in their order."""
    expected = [(f"train/{key}", r["step"], r[key]) for r in read_jsonl(output / "metrics.jsonl")
                for key in ("loss", "lr", *HEALTH_METRICS, "samples_per_sec") if r.get(key) is not None]
    for r in read_jsonl(output / "verification.jsonl"):
        expected += [(f"verification/{r['target']}", r["step"], r["accuracy"]),
                     (f"verification/{r['target']}_std", r["step"], r["accuracy_std"]),
                     (f"verification/{r['target']}_xnorm", r["step"], r["xnorm"])]
    return sorted(expected, key=lambda scalar: (scalar[0], scalar[1]))


def test_a_run_and_its_resume_log_the_scalars_and_options(faces, tmp_path, fake_tensorboard):
    output = tmp_path / "run"
    assert main(argv(faces, output, max_steps=2)) == 0
    assert main(argv(faces, output, resume="auto")) == 0
    first, resumed = FakeWriter.writers
    assert first.log_dir == resumed.log_dir == str(output / "tensorboard")
    # The events past the checkpoint's step are hidden (those a killed run wrote), not its own step's.
    assert (first.purge_step, resumed.purge_step) == (0, 3)
    scalars = sorted(first.scalars + resumed.scalars, key=lambda scalar: (scalar[0], scalar[1]))
    assert scalars == logged(output)
    assert {tag for tag, _, _ in scalars} >= {"train/loss", "train/lr", "train/samples_per_sec", "train/grad_norm",
                                              "verification/pairs", "verification/pairs_std"}
    assert first.closed and resumed.closed
    (options, metrics), (resumed_options, _) = fake_tensorboard
    assert list(metrics) == ["train/loss", "verification/pairs"]
    assert (options["max_steps"], resumed_options["max_steps"], resumed_options["resume"]) == (2, 4, "auto")
    assert "wandb" not in options and options["loss_impl"] == LOSS_IMPL
    assert first.summaries == ["experiment", "session start", "session end"]


def test_the_hparams_tab_has_the_distillation_term_and_rfws_mean(tmp_path, fake_tensorboard):
    # A run with a teacher logs train/distill, and one verifying on RFW verification/RFW_mean: the tab listed
    # neither, so it could not set them against the options.
    races = {f"RFW/{race}": types.SimpleNamespace(group="RFW") for race in ("African", "Asian")}
    RunLog(str(tmp_path), 0, tensorboard=True, options={"teacher": "t.pt"},
           targets={"lfw": types.SimpleNamespace(), **races}).close()
    RunLog(str(tmp_path / "b"), 0, tensorboard=True, options={"teacher": None}, targets=["lfw"]).close()
    (_, with_teacher), (_, without) = fake_tensorboard
    assert list(with_teacher) == ["train/loss", "train/distill", "verification/lfw", "verification/RFW/African",
                                  "verification/RFW/Asian", "verification/RFW_mean"]
    assert list(without) == ["train/loss", "verification/lfw"]


def test_a_tensorboard_whose_hparams_fail_still_gets_the_scalars(faces, tmp_path, fake_tensorboard, monkeypatch,
                                                                  capsys):
    # tensorboard 2.17.0 and earlier, under numpy 2: the HParams tab's code (tensorboard's, called by torch's
    # hparams) raises AttributeError, where SummaryWriter and its scalars work. It stopped the run at start-up
    # with that traceback, and the writer's thread then met the folder the failed start had removed.
    def old_tensorboard(values, metrics):
        raise AttributeError("`np.string_` was removed in the NumPy 2.0 release. Use `np.bytes_` instead.")

    monkeypatch.setattr(sys.modules["torch.utils.tensorboard.summary"], "hparams", old_tensorboard)
    output = tmp_path / "run"
    assert main(argv(faces, output, max_steps=2)) == 0
    said = capsys.readouterr().err
    # (The numpy hint only under numpy 2: an AttributeError under numpy 1 is not said to be numpy's.)
    hint = rf" \(under numpy {re.escape(np.__version__)} it needs 2\.17\.1 or later\)" if np.__version__ >= "2" else ""
    assert re.search(r"^note: TensorBoard's HParams tab is not written: the installed tensorboard \S+ failed "
                     r"\(AttributeError: `np\.string_` was removed in the NumPy 2\.0 release\. Use `np\.bytes_` "
                     rf"instead\.\); the scalars are written: pip install -U tensorboard{hint}$", said,
                     re.MULTILINE), said
    (writer,) = FakeWriter.writers
    assert writer.summaries == [] and writer.closed
    assert sorted(writer.scalars, key=lambda scalar: (scalar[0], scalar[1])) == logged(output)
    assert "note: TensorBoard's HParams tab is not written" in (output / "training.log").read_text()


def test_hparams_refusing_the_trainers_values_is_not_taken_for_an_old_tensorboard(faces, tmp_path, fake_tensorboard,
                                                                                  monkeypatch, capsys):
    # torch's hparams refuses a value of a type it does not take (ValueError) or arguments it does not know
    # (TypeError): a bug of the trainer's, which the note would have put on the installed tensorboard and numpy
    # ("it needs 2.17.1 or later", with the newest installed), the run going on without
    # the tab. (CI has no tensorboard: only this stand-in of hparams runs there.)
    def refusing(values, metrics):
        raise ValueError("value should be one of int, float, str, bool, or torch.Tensor")

    monkeypatch.setattr(sys.modules["torch.utils.tensorboard.summary"], "hparams", refusing)
    with pytest.raises(ValueError, match="value should be one of"):
        main(argv(faces, tmp_path / "run", max_steps=2))
    assert "HParams tab is not written" not in capsys.readouterr().err


def stopped_in_step_0s_verification(faces, output, monkeypatch):
    """The options of a run with two verification sets, run until a SIGTERM comes in step 0's second
    set (the first logged; the checkpoint at step 0), then resumed to its end."""
    pairs = faces[1]
    second = os.path.join(os.path.dirname(pairs), "second.txt")
    shutil.copy(pairs, second)
    options = argv(faces, output, val_targets=f"{pairs},{second}", save_every=0)
    original = Trainer._evaluate_sets

    def signalled_in_verification(self, evaluate, on_batch):
        sets = []

        def evaluate_one(*args, **kwargs):
            sets.append(1)
            if self.step == 0 and len(sets) == 2:
                self._on_signal(signal.SIGTERM, None)
            return evaluate(*args, **kwargs)

        return original(self, evaluate_one, on_batch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_evaluate_sets", signalled_in_verification)
        assert main(options) == 128 + signal.SIGTERM
    assert main(options + ["--resume", "auto"]) == 0
    assert [(r["step"], r["target"]) for r in read_jsonl(output / "verification.jsonl")][:2] == [(0, "pairs"),
                                                                                               (0, "second")]


def test_a_run_resumed_from_step_0_hides_all_the_stopped_runs_events(faces, tmp_path, fake_tensorboard,
                                                                      monkeypatch):
    # A stop in step 0's verification leaves a checkpoint at step 0; the resumed run verifies step 0 again
    # and its logs start afresh. Its mark at step 1 had left the stopped run's step-0 accuracy of the
    # first set beside the new one: twice at step 0, where verification.jsonl has it once.
    stopped_in_step_0s_verification(faces, tmp_path / "run", monkeypatch)
    assert [writer.purge_step for writer in FakeWriter.writers] == [0, 0]


def test_a_full_disk_under_tensorboard_is_a_one_line_error(faces, tmp_path, fake_tensorboard, monkeypatch, capsys):
    # torch's writer meets a full disk in its thread and raises it at its next call, and again at close:
    # it was a traceback, raised again by the close in fit's finally (the lock left, W&B not finished).
    # Now as a log that cannot be written: one line, exit status 1, the last checkpoint kept.
    class FullDiskWriter(FakeWriter):
        full_from_step = 3

        def add_scalar(self, tag, value, step):
            if step >= self.full_from_step:
                raise OSError(28, "No space left on device")
            super().add_scalar(tag, value, step)

        def close(self):
            super().close()
            raise OSError(28, "No space left on device")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FullDiskWriter))
    output = tmp_path / "run"
    assert main(argv(faces, output)) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"train: error: writing {output / 'tensorboard'} failed: [Errno 28] No space left on device. "
        f"The last checkpoint is kept: {output / 'checkpoint.pt'} (step 2)"), err
    assert "Traceback" not in err and not (output / ".run.lock").exists()
    # Met only by the close's last write: the run ends as it would, and says what TensorBoard lacks.
    FullDiskWriter.full_from_step = 5
    assert main(argv(faces, output, resume="auto")) == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"warning: writing {output / 'tensorboard'} failed: [Errno 28] No space "
                                            "left on device; TensorBoard lacks the last events"), err
    assert "Traceback" not in err and not (output / ".run.lock").exists()


def test_a_run_that_stops_at_start_up_leaves_no_output_folder(faces, tmp_path, fake_tensorboard, monkeypatch):
    # As without TensorBoard: the folder the run made goes, with the events file its writer began there
    # (torch's makes the folder and the file when it is made). It was left holding tensorboard/.
    import train.trainer as trainer_module

    class FileMakingWriter(FakeWriter):
        def __init__(self, log_dir, purge_step=None):
            super().__init__(log_dir, purge_step)
            os.makedirs(log_dir, exist_ok=True)
            open(os.path.join(log_dir, "events.out.tfevents.0.host.1.0"), "wb").close()

    def open_(path, mode="r", *args, **kwargs):
        if "a" in mode and os.path.basename(path) == "training.log":
            raise OSError(28, "No space left on device", path)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FileMakingWriter))
    monkeypatch.setattr(trainer_module, "open", open_, raising=False)
    with pytest.raises(SystemExit, match="No space left on device"):
        main(argv(faces, tmp_path / "new"))
    assert FakeWriter.writers and not (tmp_path / "new").exists()


def test_without_tensorboard_the_default_is_quiet(faces, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as without the package
    output = tmp_path / "run"
    assert main(argv(faces, output, max_steps=2)) == 0
    assert not (output / "tensorboard").exists()
    assert "tensorboard" not in capsys.readouterr().err.replace(str(tmp_path), "").lower()


def test_real_tensorboard_resumed_after_a_kill(faces, tmp_path):
    """A run killed after step 4 whose checkpoint is at step 2, resumed: TensorBoard's loaders (the
    one scripts use, and the one behind its Python server) show each step once, the resumed run's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
    from tensorboard.util import tensor_util

    output = tmp_path / "run"
    assert main(argv(faces, output, max_steps=2)) == 0
    shutil.copy(output / "checkpoint.pt", tmp_path / "step2.pt")
    assert main(argv(faces, output, resume="auto")) == 0
    shutil.copy(tmp_path / "step2.pt", output / "checkpoint.pt")  # as if killed after step 4's events
    assert main(argv(faces, output, resume="auto", log_every=2)) == 0  # its step 3 is logged no more

    expected = logged(output)
    assert [step for tag, step, _ in expected if tag == "train/loss"] == [1, 2, 4]
    scripts = event_accumulator.EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    scripts.Reload()
    read = sorted((tag, event.step, event.value) for tag in scripts.Tags()["scalars"]
                  for event in scripts.Scalars(tag))
    server = plugin_event_accumulator.EventAccumulator(str(output / "tensorboard"), size_guidance={"tensors": 0})
    server.Reload()
    served = sorted((tag, event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
                    for tag in server.PluginTagToContent("scalars") for event in server.Tensors(tag))
    for scalars in (read, served):
        assert [(tag, step) for tag, step, _ in scalars] == [(tag, step) for tag, step, _ in expected]
        assert [value for _, _, value in scalars] == pytest.approx([value for _, _, value in expected], rel=1e-6)
    assert "hparams" in server.ActivePlugins()


def test_real_tensorboard_resumed_from_step_0(faces, tmp_path, monkeypatch):
    """As above, after a stop in step 0's verification: step 0's accuracies once each, the resumed run's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

    output = tmp_path / "run"
    stopped_in_step_0s_verification(faces, output, monkeypatch)
    expected = [(tag, step) for tag, step, _ in logged(output)]
    scripts = event_accumulator.EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    scripts.Reload()
    server = plugin_event_accumulator.EventAccumulator(str(output / "tensorboard"), size_guidance={"tensors": 0})
    server.Reload()
    assert sorted((tag, event.step) for tag in scripts.Tags()["scalars"] for event in scripts.Scalars(tag)) == expected
    assert sorted((tag, event.step) for tag in server.PluginTagToContent("scalars")
                  for event in server.Tensors(tag)) == expected
