"""The training loop on CPU: the loss goes down, a resumed run repeats an uninterrupted one bit
for bit, a NaN stops the run without touching the last good checkpoint, SIGTERM saves, and the
options come from flags, aliases and config files alike."""

import argparse
import gc
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import arcface_ext
from train import checkpoint
from train.config import parse_args, steps_from_epochs, unused_options
from train.data.transforms import to_model_input
from train.models import NETWORKS
from train.tools import count_of
from train.trainer import (SAME_STOP_SECONDS, LearningRateSchedule, RunLog, Trainer, TrainingDiverged,
                           _resolve_device, build_margin_loss, build_optimizer, main)

from trainer_fixtures import (LOSS_IMPL, REPO, base_argv, faces, make_face_folder, one_thread, read_jsonl,  # noqa: F401
                              run_killed_at, signal_once_training, signalled_while_importing_torch)


def argv(faces, output, pairs=False, **overrides):
    data, pairs_list = faces
    return base_argv(data, str(output), pairs_list if pairs else None, **{"loss_impl": LOSS_IMPL, **overrides})


def losses(output):
    return [r["loss"] for r in read_jsonl(os.path.join(output, "metrics.jsonl"))]


def test_a_few_steps_decrease_the_loss(faces, tmp_path):
    assert main(argv(faces, tmp_path, max_steps=16)) == 0
    curve = losses(tmp_path)
    assert len(curve) == 16 and all(math.isfinite(v) for v in curve)
    first, last = sum(curve[:4]) / 4, sum(curve[-4:]) / 4
    assert last < 0.85 * first, f"loss did not go down: first steps {curve[:4]}, last steps {curve[-4:]}"


def test_the_start_up_summary(faces, tmp_path):
    summary = Trainer(parse_args(argv(faces, tmp_path, max_steps=1))).describe()
    assert summary.startswith("network small: ") and "M multiply-adds an image, 32px input" in summary, summary


def test_outputs_and_verification(faces, tmp_path):
    assert main(argv(faces, tmp_path, pairs=True, max_steps=4, eval_every=2) + ["--plots"]) == 0
    names = set(os.listdir(tmp_path))
    assert {"checkpoint.pt", "metrics.jsonl", "verification.jsonl", "args.json",
            "loss.png", "verification.png", "target_angle.png"} <= names
    records = read_jsonl(tmp_path / "verification.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4]
    assert set(records[0]) == {"step", "target", "accuracy", "accuracy_std", "threshold", "xnorm", "best_accuracy",
                               "best_step"}
    assert records[0]["target"] == "pairs"
    metric = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert set(metric) == {"step", "loss", "lr", "grad_norm", "centres_grad_norm", "samples_per_sec", "time"}
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 4 and state["num_classes"] == 8
    assert set(state["target_angles"]["degrees"]) == {"start", "middle", "end"}
    start = state["target_angles"]["degrees"]["start"]
    assert start.numel() > 0 and 60 < float(start.mean()) < 120  # random embeddings: about 90 degrees


def test_plots_that_cannot_be_drawn_leave_the_run_a_success(faces, tmp_path, monkeypatch, capsys):
    # metrics.jsonl edited while the run trained (a line broken by hand): the figures are not drawn, said in a
    # note, and the run that trained and saved its checkpoint still ends with exit status 0 (read_jsonl's
    # SystemExit ended it with status 1 after its "done" line).
    import train.plots

    draw = train.plots.write_plots

    def edited_then_drawn(output, angles, **kwargs):
        path = os.path.join(output, "metrics.jsonl")
        with open(path) as f:
            lines = f.readlines()
        with open(path, "w") as f:
            f.writelines(['{"step": 1, "lo\n', *lines[1:]])
        return draw(output, angles, **kwargs)

    monkeypatch.setattr(train.plots, "write_plots", edited_then_drawn)
    assert main(argv(faces, tmp_path, max_steps=2, save_every=2) + ["--plots"]) == 0
    assert (f"note: the plots were not written: {tmp_path / 'metrics.jsonl'}: line 1 is not JSON"
            in capsys.readouterr().err)
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 2 and not (tmp_path / "loss.png").exists()


def test_eval_every_zero_verifies_at_the_end_only(faces, tmp_path):
    assert main(argv(faces, tmp_path, pairs=True, max_steps=3, eval_every=0)) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "verification.jsonl")] == [3]


def test_output_to_a_file_gets_a_line_per_logged_step_not_a_bar(faces, tmp_path, capsys):
    # (capsys's stderr is no terminal, as a file or a pipe is not)
    assert main(argv(faces, tmp_path, max_steps=6, log_every=2)) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "step/s" not in err, err  # no progress bar redrawn into the file
    lines = re.findall(r"^\[step (\d+)/6\] loss ([\d.]+), lr ([\d.e-]+), ([\d.]+) images/s, epoch ([\d.]+), "
                       r"ETA (\d+:\d\d:\d\d)$", err, re.M)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(int(s), float(loss), float(lr)) for s, loss, lr, *_ in lines] == [
        (r["step"], round(r["loss"], 4), float(f"{r['lr']:.6g}")) for r in records]
    assert [float(epoch) for *_, epoch, _ in lines] == [0.5, 1.0, 1.5]  # 64 images, 16 a step
    assert lines[-1][-1] == "0:00:00"


def test_training_log_keeps_what_the_run_said(faces, tmp_path, monkeypatch):
    # As arcface_torch's training.log: the settings, the set-up's notes, a line at each logged step (on a
    # terminal too, where the bar shows them), the verifications and the end, each line with its time; a
    # resume appends; a failure the trainer does not say itself leaves its traceback there.
    monkeypatch.setattr("train.trainer._is_terminal", lambda stream: True, raising=False)
    assert main(argv(faces, tmp_path, pairs=True, max_steps=4, log_every=2, eval_every=2)) == 0

    def said():
        text = (tmp_path / "training.log").read_text()
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in text.splitlines()), text
        return [line[20:] for line in text.splitlines()]

    lines = said()
    assert re.fullmatch(r"=== started at step 0: host .+, process \d+, torch .+, arcface_ext .+", lines[0]), lines[0]
    assert lines[1].startswith("network small: ") and lines[-1].startswith("done: 4 steps in ")
    logged = [(int(step), float(loss)) for step, loss in
              (re.fullmatch(r"\[step (\d+)/4\] loss ([\d.]+), .* ETA .*", line).groups()
               for line in lines if line.startswith("[step ") and "/4]" in line)]
    assert logged == [(r["step"], round(r["loss"], 4)) for r in read_jsonl(tmp_path / "metrics.jsonl")]
    verified = [line for line in lines if re.fullmatch(r"\[step \d\] pairs: accuracy .*", line)]
    assert [line[6] for line in verified] == ["0", "2", "4"]

    assert main(argv(faces, tmp_path, pairs=True, max_steps=6, log_every=2, eval_every=2, resume="auto")) == 0
    resumed = said()
    assert resumed[:len(lines)] == lines
    assert resumed[len(lines)].startswith("=== resumed at step 4: ")
    assert resumed[len(lines) + 1] == f"resumed from {tmp_path / 'checkpoint.pt'} at step 4"  # a set-up note

    def fail(self, *args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(Trainer, "train_step", fail)
    with pytest.raises(RuntimeError, match="injected"):
        main(argv(faces, tmp_path, pairs=True, max_steps=8, resume="auto"))
    failed = said()[len(resumed):]
    assert "train: error: the run failed at step 7:" in failed and failed[-1] == "RuntimeError: injected", failed


def test_a_failure_after_the_last_step_is_logged_as_such(faces, tmp_path, monkeypatch):
    # (Its final verification, checkpoint or plots.) training.log said "the run failed at step 3" of 2.
    def fail(self, *args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(Trainer, "save", fail)
    with pytest.raises(RuntimeError, match="injected"):
        main(argv(faces, tmp_path, max_steps=2, save_every=0))
    log = (tmp_path / "training.log").read_text()
    assert " train: error: the run failed after its last step (2):\n" in log and "failed at step" not in log, log


def test_the_set_ups_copy_of_stderr_leaves_what_was_installed_on_it(capsys):
    # W&B's console capture (its default, console="wrap") patches the write of the sys.stderr it finds when
    # the run starts, in the set-up: the copy training.log takes was swapped back for the stream after it,
    # and W&B's log of the run's stderr ended there. A write the stream refuses (bytes) made the set-up's
    # lines unjoinable: a TypeError at the end of the set-up.
    from train.trainer import _kept_stderr

    seen = []
    with _kept_stderr() as said:
        print("note: one", file=sys.stderr)
        with pytest.raises(TypeError):
            sys.stderr.write(b"raw")
        stream, write = sys.stderr, sys.stderr.write
        stream.write = lambda text: (seen.append(text), write(text))[1]  # as wandb's StreamWrapper does
    print("after the set-up", file=sys.stderr)
    assert "".join(said) == "note: one\n"
    assert "".join(seen) == "after the set-up\n"
    assert capsys.readouterr().err == "note: one\nafter the set-up\n"


def test_training_log_keeps_a_redrawn_lines_last_drawing(tmp_path):
    log = RunLog(str(tmp_path), 0, tensorboard=False)
    log.text("reading:  10%\rreading: 100%\r\nnote: two\nlines\n")
    assert [line[20:] for line in (tmp_path / "training.log").read_text().splitlines()] == [
        "reading: 100%", "note: two", "lines"]


def test_a_terminal_that_knows_its_width_gets_the_bar():
    # tqdm draws nothing in a terminal of 0 columns (a pseudo-terminal without a size): it gets the lines.
    fcntl, termios, struct = pytest.importorskip("fcntl"), pytest.importorskip("termios"), pytest.importorskip("struct")
    from train.trainer import _is_terminal

    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w") as stream:
            fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
            assert stream.isatty() and not _is_terminal(stream)
            fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            assert _is_terminal(stream)
        assert not _is_terminal(stream)  # closed
    finally:
        os.close(leader)


@pytest.mark.slow
def test_the_lines_eta_leaves_out_a_slow_start(faces, tmp_path, capsys, monkeypatch):
    # A first step that takes long (the loader's workers starting, --compile compiling) is not the pace of the
    # rest: from the second line on the ETA is that of the steps after the first line.
    step, slow = Trainer.train_step, []

    def train_step(self, *args, **kwargs):
        if not slow:
            slow.append(time.sleep(3.0))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert main(argv(faces, tmp_path, max_steps=6, log_every=2)) == 0
    etas = re.findall(r"^\[step \d+/6\] .* ETA (\d+):(\d\d):(\d\d)$", capsys.readouterr().err, re.M)
    seconds = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in etas]
    assert len(seconds) == 3 and seconds[0] >= 6 and seconds[1] <= 1, seconds  # (3 s a step, then fast)


def test_the_progress_bar_shows_the_logged_loss(faces, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("train.trainer._is_terminal", lambda stream: True, raising=False)
    assert main(argv(faces, tmp_path, max_steps=4, log_every=2)) == 0
    shown = re.findall(r"loss=([\d.]+)", capsys.readouterr().err)
    # The mean over the --log-every steps that metrics.jsonl holds, not the last step's loss alone.
    assert sorted(set(shown)) == sorted(f"{r['loss']:.3f}" for r in read_jsonl(tmp_path / "metrics.jsonl"))


def shown_on_the_bar(err: str, field: str) -> list[str]:
    """The values the progress bar's postfix gave ``field``, in the order drawn."""
    return re.findall(rf"\b{field}=([^,\]\s]+)", err)


def test_the_progress_bar_shows_the_centres_lr_when_scaled(faces, tmp_path, capsys, monkeypatch):
    # As the lines: the class centres' rate beside the backbone's, at another --centres-lr-scale only.
    monkeypatch.setattr("train.trainer._is_terminal", lambda stream: True, raising=False)
    assert main(argv(faces, tmp_path / "scaled", max_steps=4, log_every=2, centres_lr_scale=4)) == 0
    shown = shown_on_the_bar(capsys.readouterr().err, "centres_lr")
    records = read_jsonl(tmp_path / "scaled" / "metrics.jsonl")
    assert sorted(set(shown)) == sorted({f"{r['centres_lr']:.4g}" for r in records}), shown
    assert main(argv(faces, tmp_path / "plain", max_steps=2, log_every=2)) == 0
    err = capsys.readouterr().err
    assert "lr=" in err and not shown_on_the_bar(err, "centres_lr"), err


def test_a_fresh_run_sets_an_earlier_run_aside(faces, tmp_path, capsys):
    # Nothing a run wrote is overwritten by the next fresh run into its folder; other files stay.
    (tmp_path / "notes.txt").write_text("mine")
    assert main(argv(faces, tmp_path, max_steps=2)) == 0
    first_log = (tmp_path / "metrics.jsonl").read_text()
    assert main(argv(faces, tmp_path, max_steps=1)) == 0
    assert "earlier-1" in capsys.readouterr().err
    assert checkpoint.load(str(tmp_path / "earlier-1" / "checkpoint.pt"))["step"] == 2
    assert (tmp_path / "earlier-1" / "metrics.jsonl").read_text() == first_log
    assert (tmp_path / "earlier-1" / "args.json").is_file()
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 1
    # Fine-tuning from the run it sets aside: the checkpoint is read before it moves.
    assert main(argv(faces, tmp_path, max_steps=1, pretrained_model=str(tmp_path / "checkpoint.pt"))) == 0
    assert "initialised the backbone and class centres" in capsys.readouterr().err
    assert checkpoint.load(str(tmp_path / "earlier-2" / "checkpoint.pt"))["step"] == 1
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "earlier-2" / "earlier-1").exists()


def test_a_fresh_run_sets_an_arcface_torch_run_aside(faces, tmp_path, capsys):
    # An arcface_torch config names its own output folder (work_dirs/<config name>) for this trainer
    # too: arcface_torch's run there is set aside, its TensorBoard events not mixed with this run's.
    write_arcface_torch_run(str(tmp_path), {}, torch.randn(8, 64), world=2)
    for name in ("training.log", "model.pt", "tensorboard/events.out.tfevents.1.host"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("arcface_torch's")
    (tmp_path / "notes.txt").write_text("mine")
    assert main(argv(faces, tmp_path, max_steps=1)) == 0
    err = capsys.readouterr().err  # (not told to continue it with --resume, which cannot)
    assert f"its files are now in {tmp_path / 'earlier-1'}\n" in err and "--resume" not in err
    assert sorted(os.listdir(tmp_path / "earlier-1")) == ["checkpoint_gpu_0.pt", "checkpoint_gpu_1.pt", "model.pt",
                                                          "tensorboard", "training.log"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert "arcface_torch's" not in (tmp_path / "training.log").read_text()  # this run's own


def test_resuming_a_finished_run_trains_and_logs_nothing_more(faces, tmp_path, capsys):
    assert main(argv(faces, tmp_path, pairs=True, max_steps=2)) == 0
    logs = {name: (tmp_path / name).read_text() for name in ("metrics.jsonl", "verification.jsonl")}
    assert main(argv(faces, tmp_path, pairs=True, max_steps=2, resume="auto")) == 0
    assert "nothing to train (raise --max-steps to train on)" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_text() for name in logs} == logs
    # A run in epochs is told of them (--max-steps was named: raised, it would not count after --epochs).
    assert main(argv(faces, tmp_path / "epochs", epochs=0.5)) == 0
    assert main(argv(faces, tmp_path / "epochs", epochs=0.5, resume="auto")) == 0
    assert ("the checkpoint is at step 2 of --epochs 0.5 (2 steps): nothing to train (raise --epochs to train on)"
            in capsys.readouterr().err)


def test_a_finished_run_resumed_into_another_folder_leaves_it_as_it_was(faces, tmp_path, capsys):
    # It trained nothing, but set aside the run that folder held into earlier-1 and left there the finished
    # run's logs without its checkpoint (a folder that --resume auto then started afresh in), or made one so.
    finished, other = tmp_path / "finished", tmp_path / "other"
    assert main(argv(faces, finished, max_steps=2)) == 0
    assert main(argv(faces, other, max_steps=1, seed=1)) == 0
    held = {name: (other / name).read_bytes() for name in sorted(os.listdir(other))}
    capsys.readouterr()
    for output in (other, tmp_path / "new"):
        with pytest.raises(SystemExit) as refused:
            main(argv(faces, output, max_steps=2, resume=str(finished / "checkpoint.pt")))
        assert refused.value.code == (f"train: error: --resume {finished / 'checkpoint.pt'}: the checkpoint is at "
                                      "step 2 of --max-steps 2: nothing to train (raise --max-steps to train on); "
                                      f"--output {output} is left as it was")
    assert {name: (other / name).read_bytes() for name in sorted(os.listdir(other))} == held
    assert not (tmp_path / "new").exists()
    assert "its files are now in" not in capsys.readouterr().err


def test_a_signal_in_the_last_step_ends_the_run_and_leaves_the_verification_to_a_resume(faces, tmp_path, monkeypatch):
    # The run ends with the last step's checkpoint, exit 0, without its final verification (minutes at scale), which
    # the checkpoint is marked to lack: resuming it adds that verification (it made the whole verification first).
    original_step = Trainer.train_step

    def signalled_in_step_2(self, images, labels):
        if self.step == 1:
            self._on_signal(signal.SIGTERM, None)
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", signalled_in_step_2)
    assert main(argv(faces, tmp_path, pairs=True, max_steps=2)) == 0
    assert read_jsonl(tmp_path / "verification.jsonl") == []  # (left to the resume)
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and state["verification_cut_short"]
    monkeypatch.undo()
    assert main(argv(faces, tmp_path, pairs=True, max_steps=2, resume="auto")) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "verification.jsonl")] == [2]
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 2


@pytest.mark.parametrize("signalled", [True, False])
def test_a_signal_in_the_last_step_writes_its_checkpoint_before_the_final_verification(faces, tmp_path, monkeypatch,
                                                                                        signalled):
    # The final verification takes minutes at scale: a scheduler's SIGKILL after its SIGTERM's grace (Slurm's
    # KillWait, torchrun's 30 s) cut it, and with it the last checkpoint, written after it. A signal in the last step
    # writes the checkpoint instead of that verification (a resume makes it); a run without a signal writes it once,
    # after it.
    original_step, original_evaluate = Trainer.train_step, Trainer.evaluate
    at_the_final_verification = []

    def signalled_in_step_2(self, images, labels):
        if self.step == 1 and signalled:
            self._on_signal(signal.SIGTERM, None)
        return original_step(self, images, labels)

    def evaluate(self, final=False):
        if final:
            path = tmp_path / "checkpoint.pt"
            at_the_final_verification.append(checkpoint.load(str(path))["step"] if path.exists() else None)
        return original_evaluate(self, final)

    monkeypatch.setattr(Trainer, "train_step", signalled_in_step_2)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert main(argv(faces, tmp_path, pairs=True, max_steps=2, save_every=0)) == 0
    assert at_the_final_verification == ([] if signalled else [None])
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and bool(state.get("verification_cut_short")) == signalled
    if signalled:
        assert main(argv(faces, tmp_path, pairs=True, max_steps=2, save_every=0, resume="auto")) == 0
        assert at_the_final_verification == [2]  # (made by the resume, the checkpoint of step 2 there)
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and [r["step"] for r in read_jsonl(tmp_path / "verification.jsonl")] == [2]


def test_a_final_verification_a_kill_cut_is_made_on_resume(faces, tmp_path, monkeypatch, capsys):
    # The checkpoint a signal in the last step writes before the final verification is at the last step: a run
    # killed in that verification (the scheduler's SIGKILL after its grace), resumed, said "nothing to train" and
    # ended without the final verification. It is made on resume now, and the checkpoint then holds it. (Such a
    # signal now leaves that verification out: the run ends before a kill could come in it.)
    original_step, original_evaluate = Trainer.train_step, Trainer.evaluate

    class Killed(BaseException):
        pass

    def signalled_in_step_2(self, images, labels):
        if self.step == 1:
            self._on_signal(signal.SIGTERM, None)
        return original_step(self, images, labels)

    def killed_in_the_final_verification(self, final=False):
        if final:
            raise Killed
        return original_evaluate(self, final)

    monkeypatch.setattr(Trainer, "train_step", signalled_in_step_2)
    monkeypatch.setattr(Trainer, "evaluate", killed_in_the_final_verification)
    assert main(argv(faces, tmp_path, pairs=True, max_steps=2, save_every=0)) == 0  # (not killed: not verified)
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 2
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv(faces, tmp_path, pairs=True, max_steps=2, save_every=0, resume="auto")) == 0
    assert "nothing to train" not in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(tmp_path / "verification.jsonl")] == [2]
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and not state.get("verification_cut_short") and state["verification"]


def test_a_signal_during_the_final_verification_cuts_it_short_and_saves_the_last_step(faces, tmp_path, monkeypatch,
                                                                                      capsys):
    # The final verification ran to its end after a signal in it (minutes at scale: lfw, cfp_fp, agedb_30), and the
    # last step's checkpoint was written only then: a launcher's SIGKILL after its grace (torchrun's 30 s) cut both.
    # It is cut short at the batch the signal comes in, as the other verifications are; the last step's checkpoint
    # is written, marked so, the run ends as after a signal in the last step (exit 0), and a resume makes the sets
    # left, which are then the uninterrupted run's.
    original = Trainer._evaluate_sets
    batches_after_the_signal = []

    def signalled_in_the_final_verification(self, evaluate, on_batch):
        sets = []

        def evaluate_one(*args, **kwargs):  # the signal comes in the second set, after the first was logged
            sets.append(1)
            if self.step == 2 and len(sets) == 2:
                self._on_signal(signal.SIGINT, None)
            return evaluate(*args, **kwargs)

        def counted(count):
            if self._stop_signal:
                batches_after_the_signal.append(count)
            return on_batch(count)

        return original(self, evaluate_one, counted)

    pairs = faces[1]
    second = os.path.join(os.path.dirname(pairs), "second.txt")  # (its images are named from its folder)
    shutil.copy(pairs, second)
    options = dict(val_targets=f"{pairs},{second}", max_steps=2, save_every=0)
    monkeypatch.setattr(Trainer, "_evaluate_sets", signalled_in_the_final_verification)
    assert main(argv(faces, tmp_path, **options)) == 0
    err = capsys.readouterr().err
    line = ("\nSIGINT after the last step (2): the final verification is cut short; the run ends with its checkpoint, "
            "and --resume auto makes the verification\n")
    assert line in err and err.count("after the last step") == 1, err  # (one line: none "cut short by the stop")
    assert "as usual" not in err and "cut short by the stop" not in err, err
    assert "done: 2 steps in " in err.split(line)[1], err
    assert line.strip() in (tmp_path / "training.log").read_text()
    assert len(batches_after_the_signal) == 1, batches_after_the_signal  # (not run to its end)
    verified = [(r["step"], r["target"]) for r in read_jsonl(tmp_path / "verification.jsonl")]
    assert verified == [(2, "pairs")]
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and state["verification_cut_short"] and list(state["verification"]) == ["pairs"]
    monkeypatch.undo()
    assert main(argv(faces, tmp_path, resume="auto", **options)) == 0
    assert "nothing to train" not in capsys.readouterr().err
    assert main(argv(faces, tmp_path / "uninterrupted", **options)) == 0
    resumed, uninterrupted = (read_jsonl(path / "verification.jsonl")
                              for path in (tmp_path, tmp_path / "uninterrupted"))
    assert [(r["step"], r["target"]) for r in resumed] == [(2, "pairs"), (2, "second")]
    assert [r["accuracy"] for r in resumed] == [r["accuracy"] for r in uninterrupted]
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and not state.get("verification_cut_short") and set(state["verification"]) == {
        "pairs", "second"}


@pytest.mark.slow
def test_a_failure_in_the_final_verification_writes_the_last_steps_checkpoint_first(faces, tmp_path, monkeypatch,
                                                                                    capsys):
    # An error in the final verification (out of memory on a GPU, a set's file gone unreadable) ended the run with it,
    # and the last step's checkpoint with it: only a --save-every one was kept. It is now written first, marked as
    # a stop's is (a resume makes the sets left); the error ends the run as before.
    original = Trainer._evaluate_sets

    def failing_in_the_second_set(self, evaluate, on_batch):
        sets = []

        def evaluate_one(*args, **kwargs):
            sets.append(1)
            if self.step == 2 and len(sets) == 2:
                raise OSError("injected: a set's file unreadable")
            return evaluate(*args, **kwargs)

        return original(self, evaluate_one, on_batch)

    pairs = faces[1]
    second = os.path.join(os.path.dirname(pairs), "second.txt")
    shutil.copy(pairs, second)
    options = dict(val_targets=f"{pairs},{second}", max_steps=2, save_every=1)
    monkeypatch.setattr(Trainer, "_evaluate_sets", failing_in_the_second_set)
    with pytest.raises(OSError, match="injected"):
        main(argv(faces, tmp_path, **options))
    err = capsys.readouterr().err
    line = (f"train: error: the final verification failed (step 2); the last step's checkpoint is written, marked "
            f"as cut short: {tmp_path / 'checkpoint.pt'} (--resume auto makes the verification)")
    assert line in err and line in (tmp_path / "training.log").read_text(), err
    assert " train: error: the run failed after its last step (2):\n" in (tmp_path / "training.log").read_text()
    assert [(r["step"], r["target"]) for r in read_jsonl(tmp_path / "verification.jsonl")] == [(2, "pairs")]
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and state["verification_cut_short"] and list(state["verification"]) == ["pairs"]
    monkeypatch.undo()
    assert main(argv(faces, tmp_path, resume="auto", **options)) == 0
    assert [(r["step"], r["target"]) for r in read_jsonl(tmp_path / "verification.jsonl")] == [
        (2, "pairs"), (2, "second")]  # (the set left only)
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and not state.get("verification_cut_short") and set(state["verification"]) == {
        "pairs", "second"}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["a log that cannot be written", "a save that fails otherwise"])
def test_a_failure_in_the_final_verification_is_said_as_before(faces, tmp_path, monkeypatch, capsys, case):
    # A log that cannot be written there (a full disk) is the trainer's one line, as at any other step: it was
    # preceded by 'the final verification failed ...; the last step's checkpoint is written' (two lines). A save
    # that fails there other than by a full disk (out of memory again, on a GPU) said nothing and its error replaced
    # the verification's: now said in the line, and the verification's error ends the run.
    import train.trainer as trainer_module

    failing = []

    def failing_evaluate_sets(self, evaluate, on_batch):
        if self.step == 2:
            failing.append(1)
            if case == "a log that cannot be written":
                raise trainer_module.LogNotWritten(f"writing {tmp_path / 'verification.jsonl'} failed: [Errno 28] "
                                                   "No space left on device")
            raise OSError("injected: a set's file unreadable")

    real_all_finite = checkpoint.all_finite

    def all_finite(module):
        if failing and case == "a save that fails otherwise":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB\nsecond line")
        return real_all_finite(module)

    pairs = faces[1]
    monkeypatch.setattr(Trainer, "_evaluate_sets", failing_evaluate_sets)
    monkeypatch.setattr(checkpoint, "all_finite", all_finite)
    options = dict(val_targets=pairs, max_steps=2, save_every=1)
    if case == "a log that cannot be written":
        assert main(argv(faces, tmp_path, **options)) == 1
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == (
            f"train: error: writing {tmp_path / 'verification.jsonl'} failed: [Errno 28] No space left on device. "
            f"The last checkpoint is kept: {tmp_path / 'checkpoint.pt'} (step 1)"), err
        assert "the final verification failed" not in err and "Traceback" not in err, err
    else:
        with pytest.raises(OSError, match="injected"):
            main(argv(faces, tmp_path, **options))
        err = capsys.readouterr().err
        assert ("train: error: the final verification failed (step 2), and the last step's checkpoint was not "
                "written: RuntimeError: CUDA out of memory. Tried to allocate 2.00 MiB\n") in err, err
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 1


@pytest.mark.parametrize("again", ["a second signal", "a signal in the resumed verification"])
def test_a_signal_during_the_final_verification_after_another(faces, tmp_path, monkeypatch, capsys, again):
    # A second signal in it keeps its meaning: at once, without a checkpoint of this step. A resumed run whose final
    # verification had been cut makes that verification before anything else: a signal in it cuts it short again
    # (it was the start's verification of a resumed run, run whole after it as the final one).
    original = Trainer._evaluate_sets

    def signalled(self, evaluate, on_batch):
        if self.step == 2:
            self._on_signal(signal.SIGINT, None)
            if again == "a second signal":
                self._stop_signal_at -= SAME_STOP_SECONDS  # the second Ctrl-C, a while after the first
                self._on_signal(signal.SIGINT, None)
        return original(self, evaluate, on_batch)

    options = dict(pairs=True, max_steps=2, save_every=0, eval_every=1)
    if again == "a second signal":
        monkeypatch.setattr(Trainer, "_evaluate_sets", signalled)
        with pytest.raises(SystemExit) as stopped:
            main(argv(faces, tmp_path, **options))
        assert stopped.value.code == 128 + signal.SIGINT
        err = capsys.readouterr().err
        assert err.endswith("\nstopped by a second SIGINT: at once, without a checkpoint of this step\n"), err
        assert not (tmp_path / "checkpoint.pt").exists()
        return
    original_step = Trainer.train_step

    class Killed(BaseException):
        pass

    def killed_in_the_final_verification(self, evaluate, on_batch):
        if self.step == 2:
            raise Killed  # (as the scheduler's SIGKILL after a signal in the last step: no checkpoint on the way out)
        return original(self, evaluate, on_batch)

    def signalled_in_step_2(self, images, labels):
        if self.step == 1:
            self._on_signal(signal.SIGTERM, None)
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", signalled_in_step_2)
    monkeypatch.setattr(Trainer, "_evaluate_sets", killed_in_the_final_verification)
    assert main(argv(faces, tmp_path, **options)) == 0  # (not killed: the final verification left to the resume)
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["verification_cut_short"]
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "_evaluate_sets", signalled)
    capsys.readouterr()
    assert main(argv(faces, tmp_path, resume="auto", **options)) == 0
    err = capsys.readouterr().err
    assert ("\nSIGINT after the last step (2): the final verification is cut short; the run ends with its checkpoint, "
            "and --resume auto makes the verification\n") in err, err
    assert "as usual" not in err and "[step 2] pairs" not in err, err
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["verification_cut_short"]


@pytest.mark.parametrize("when", ["during the last step", "after the last step", "after the final verification",
                                  "after it, under torchrun"])
def test_a_signal_in_the_last_step_or_after_it_is_said_and_ends_the_run(faces, tmp_path, monkeypatch, capsys, when):
    # A Ctrl-C after the last step's work (helper-185's trial: in the final verification, minutes at scale) was taken
    # without a word: the run ended as usual, exit 0, and nothing told the user that the key was read. (One during
    # the final verification cuts it short now: test_a_signal_during_the_final_verification_cuts_it_short_...) One
    # in the last step (the step done, as any step a signal comes in), or after it and before that verification,
    # made the whole verification (after an early checkpoint): a longer wait for a signal a moment earlier. It
    # leaves the verification out now, as one in it cuts it; one after the verification lets the run end as usual.
    original_step, original_sets, original_say = (Trainer.train_step, Trainer._evaluate_sets,
                                                   Trainer._say_a_signal_at_the_end)

    def signalled_in_step_2(self, images, labels):
        if self.step == 1:
            self._on_signal(signal.SIGINT, None)
        return original_step(self, images, labels)

    def signalled_after_step_2(self, images, labels):
        done = original_step(self, images, labels)
        if self.step == 2:  # (the step done: the verification not begun)
            self._on_signal(signal.SIGINT, None)
        return done

    def signalled_as_the_final_verification_ends(self, evaluate, on_batch):
        original_sets(self, evaluate, on_batch)
        if self.step == 2:  # (after its last batch: nothing left to cut)
            self._on_signal(signal.SIGINT, None)

    def said_by_rank_1(self):
        with monkeypatch.context() as torchrun:  # (the line said as a torchrun process of rank 1 says it)
            torchrun.setenv("WORLD_SIZE", "2")
            torchrun.setenv("RANK", "1")
            original_say(self)

    if when == "during the last step":
        monkeypatch.setattr(Trainer, "train_step", signalled_in_step_2)
    elif when == "after the last step":
        monkeypatch.setattr(Trainer, "train_step", signalled_after_step_2)
    else:
        monkeypatch.setattr(Trainer, "_evaluate_sets", signalled_as_the_final_verification_ends)
    if when.endswith("torchrun"):
        monkeypatch.setattr(Trainer, "_say_a_signal_at_the_end", said_by_rank_1)
    assert main(argv(faces, tmp_path, pairs=True, max_steps=2)) == 0
    err = capsys.readouterr().err
    said = ("SIGINT during the last step (2)" if when == "during the last step" else
            "train: rank 1: SIGINT after the last step (2)" if when.endswith("torchrun") else
            "SIGINT after the last step (2)")
    left_out = when in ("during the last step", "after the last step")  # (the final verification, to a resume)
    end = ("the final verification is cut short; the run ends with its checkpoint, and --resume auto makes the "
           "verification" if left_out else "the run ends as usual, with its final verification and checkpoint")
    line = f"\n{said}: {end}\n"
    assert line in err and err.count(" the last step (2): ") == 1, err
    assert "done: 2 steps in " in err.split(line)[1], err
    # After the verification: its line said after it. Before its end: no verification (left to the resume).
    if left_out:
        assert "[step 2] pairs: accuracy" not in err and read_jsonl(tmp_path / "verification.jsonl") == [], err
    else:
        assert "[step 2] pairs: accuracy" in err.split(line)[0], err
        assert [r["step"] for r in read_jsonl(tmp_path / "verification.jsonl")] == [2]
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and bool(state.get("verification_cut_short")) == left_out
    assert line.strip() in (tmp_path / "training.log").read_text()
    if left_out:  # the last step done, as an uninterrupted run's; the resume makes its verification
        assert main(argv(faces, tmp_path / "uninterrupted", pairs=True, max_steps=2)) == 0
        whole = checkpoint.load(str(tmp_path / "uninterrupted" / "checkpoint.pt"))
        assert all(torch.equal(state["model"][name], whole["model"][name]) for name in whole["model"])
        monkeypatch.undo()
        capsys.readouterr()
        assert main(argv(faces, tmp_path, pairs=True, max_steps=2, resume="auto")) == 0
        assert "nothing to train" not in capsys.readouterr().err
        assert [r["step"] for r in read_jsonl(tmp_path / "verification.jsonl")] == [2]
        assert not checkpoint.load(str(tmp_path / "checkpoint.pt")).get("verification_cut_short")



def test_a_signal_in_the_last_step_of_a_run_without_verification_sets_says_no_verification(faces, tmp_path,
                                                                                          monkeypatch, capsys):
    # A run without verification sets (--val-targets none, or the default lfw, cfp_fp, agedb_30 not found beside
    # the data) said "the run ends as usual, with its final verification and checkpoint": it has none.
    original_step = Trainer.train_step

    def signalled_in_step_2(self, images, labels):
        if self.step == 1:
            self._on_signal(signal.SIGINT, None)
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", signalled_in_step_2)
    assert main(argv(faces, tmp_path, max_steps=2)) == 0
    err = capsys.readouterr().err
    line = "\nSIGINT during the last step (2): the run ends as usual, with its checkpoint\n"
    assert line in err and "verification" not in err.split(line)[1] and "done: 2 steps in " in err, err
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 2 and not state.get("verification_cut_short")
    assert line.strip() in (tmp_path / "training.log").read_text()

def test_a_stop_after_the_first_verification_does_not_repeat_it_on_resume(faces, tmp_path, monkeypatch):
    # A stop that came during the step-0 verification, after its last set: the checkpoint is at step 0. A
    # run resumed at step 0 starts its logs afresh and verifies step 0 again: one record a set and step.
    original = Trainer._evaluate_sets

    def signalled_after_verification(self, evaluate, on_batch):
        original(self, evaluate, on_batch)
        self._on_signal(signal.SIGTERM, None)

    monkeypatch.setattr(Trainer, "_evaluate_sets", signalled_after_verification)
    options = dict(pairs=True, max_steps=4, eval_every=2, save_every=0)
    assert main(argv(faces, tmp_path, **options)) == 128 + signal.SIGTERM
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 0
    monkeypatch.setattr(Trainer, "_evaluate_sets", original)
    assert main(argv(faces, tmp_path, resume="auto", **options)) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "verification.jsonl")] == [0, 2, 4]


def test_a_signal_during_verification_cuts_it_short_and_saves_that_step(faces, tmp_path, monkeypatch, capsys):
    # The stop waited for the whole verification (lfw, cfp_fp, agedb_30: past torchrun's 30 s grace at
    # scale) and one more step before the checkpoint, which a launcher's SIGKILL then cost.
    original = Trainer._evaluate_sets

    def signalled_in_verification(self, evaluate, on_batch):
        sets = []

        def evaluate_one(*args, **kwargs):  # the signal comes in the second set, after the first was logged
            sets.append(1)
            if self.step == 2 and len(sets) == 2:
                self._on_signal(signal.SIGTERM, None)
            return evaluate(*args, **kwargs)

        return original(self, evaluate_one, on_batch)

    pairs = faces[1]
    second = os.path.join(os.path.dirname(pairs), "second.txt")  # (its images are named from its folder)
    shutil.copy(pairs, second)
    options = dict(val_targets=f"{pairs},{second}", max_steps=8, eval_every=2, save_every=0)
    monkeypatch.setattr(Trainer, "_evaluate_sets", signalled_in_verification)
    assert main(argv(faces, tmp_path, **options)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "[step 2] verification cut short by the stop" in err and "stopped by SIGTERM at step 2" in err
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 2
    verified = [(r["step"], r["target"]) for r in read_jsonl(tmp_path / "verification.jsonl")]
    assert verified == [(0, "pairs"), (0, "second"), (2, "pairs")]  # step 2's second set was cut
    # The resumed run does step 2's sets left (not those done) before its first step: the logs have no hole
    # there (a run pre-empted 32 times lost 2 of its 31 verifications so), and they and the losses are the
    # uninterrupted run's.
    monkeypatch.undo()
    assert main(argv(faces, tmp_path, resume="auto", **options)) == 0
    assert main(argv(faces, tmp_path / "uninterrupted", **options)) == 0
    resumed, uninterrupted = (read_jsonl(path / "verification.jsonl")
                              for path in (tmp_path, tmp_path / "uninterrupted"))
    assert [(r["step"], r["target"]) for r in resumed] == [(step, target) for step in (0, 2, 4, 6, 8)
                                                           for target in ("pairs", "second")]
    assert [r["accuracy"] for r in resumed] == [r["accuracy"] for r in uninterrupted]
    assert losses(tmp_path) == losses(tmp_path / "uninterrupted")


def test_signals_at_start_up_and_a_second_ctrl_c_give_one_line(faces, tmp_path, monkeypatch, capsys):
    # Before the trainer's handlers, Ctrl-C printed a KeyboardInterrupt traceback from every process and
    # SIGTERM ended it silently with an empty --output left; a second Ctrl-C printed a traceback too.
    original_data = Trainer._lock_output

    def signalled_at_start(self):
        original_data(self)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_lock_output", signalled_at_start)
    assert main(argv(faces, tmp_path / "new", max_steps=2)) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.endswith("stopped by SIGTERM during the start-up, before the first step\n")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    original_step = Trainer.train_step

    def twice(self, images, labels):
        if self.step == 1:
            self._on_signal(signal.SIGINT, None)
            self._stop_signal_at -= SAME_STOP_SECONDS  # the second Ctrl-C, a while after the first
            self._on_signal(signal.SIGINT, None)
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", twice)
    with pytest.raises(SystemExit) as stopped:
        main(argv(faces, tmp_path / "run", max_steps=4))
    assert stopped.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err  # (one line, with no blank one before it outside a terminal)
    assert "\nstopped by a second SIGINT: at once, without a checkpoint of this step\n" in err, err
    assert "\n\n" not in err, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers of before are back


def test_a_signal_while_the_plots_are_drawn_leaves_them_out_with_a_note(faces, tmp_path, monkeypatch, capsys):
    # The figures are drawn once the run has said how it ended (its checkpoint written), with the handlers of
    # before back: a Ctrl-C then (a second one after the stop's line, the plots taking a while) was a
    # KeyboardInterrupt traceback, a SIGTERM an end by the signal without a word (helper-185's trial).
    pytest.importorskip("matplotlib")
    import train.plots

    def signalled_while_drawing(output, angles, into=None):
        handler = signal.getsignal(signal.SIGINT)  # what a Ctrl-C arriving now runs
        handler(signal.SIGINT, None)

    monkeypatch.setattr(train.plots, "write_plots", signalled_while_drawing)

    def run(output):
        try:
            return main(argv(faces, output, max_steps=2, save_every=0) + ["--plots"])
        except KeyboardInterrupt:
            return "KeyboardInterrupt"

    note = "note: stopped by SIGINT while drawing the plots: python -m train.plots {} draws them\n"
    assert run(tmp_path / "done") == 0  # the run's outcome, its exit status
    err = capsys.readouterr().err
    assert "done: 2 steps in " in err and err.endswith(note.format(tmp_path / "done")), err
    original_step = Trainer.train_step

    def stopped_in_step_1(self, images, labels):
        if self.step == 0:
            self._on_signal(signal.SIGTERM, None)
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", stopped_in_step_1)
    assert run(tmp_path / "stopped") == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 1; checkpoint: " in err and err.endswith(note.format(tmp_path / "stopped"))
    assert checkpoint.load(str(tmp_path / "stopped" / "checkpoint.pt"))["step"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers of before are back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_signal_quits_without_drawing_the_plots(faces, tmp_path, monkeypatch, capsys):
    # A second Ctrl-C is "at once": the run's finally still drew the figures after its line (seconds at scale, the
    # user's key pressed to skip them), and they could be what a second Ctrl-C or a launcher's SIGKILL then cut.
    pytest.importorskip("matplotlib")
    import train.plots

    assert main(argv(faces, tmp_path, max_steps=2, save_every=0) + ["--plots"]) == 0
    figures = {name: ((tmp_path / name).read_bytes(), (tmp_path / name).stat().st_mtime_ns)
               for name in os.listdir(tmp_path) if name.endswith(".png")}
    assert figures
    drawn, original_plots, original_step = [], train.plots.write_plots, Trainer.train_step

    def drawing(*args, **kwargs):
        drawn.append(args)
        return original_plots(*args, **kwargs)

    def twice(self, images, labels):
        if self.step == 3:
            self._on_signal(signal.SIGINT, None)
            self._stop_signal_at -= SAME_STOP_SECONDS  # the second Ctrl-C, a while after the first
            self._on_signal(signal.SIGINT, None)
        return original_step(self, images, labels)

    monkeypatch.setattr(train.plots, "write_plots", drawing)
    monkeypatch.setattr(Trainer, "train_step", twice)
    with pytest.raises(SystemExit) as stopped:
        main(argv(faces, tmp_path, max_steps=6, save_every=0, resume="auto") + ["--plots"])
    assert stopped.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert err.endswith("\nstopped by a second SIGINT: at once, without a checkpoint of this step\n"), err
    assert drawn == []
    # The resumed run's figures of before are as they were, and nothing half-written is left beside them.
    assert {name: ((tmp_path / name).read_bytes(), (tmp_path / name).stat().st_mtime_ns) for name in figures} == figures
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers of before are back


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_each_process_says_its_stop_at_start_up_and_a_second_signal_with_its_rank(
        rank, faces, tmp_path, monkeypatch, capsys):
    # Every process says these lines of its own stop: without the rank (and the trainer's name), those of a signal
    # to one process alone (a pre-empted node) did not tell which one it stopped. The error lines' form, as clean's.
    def signalled_at_start(self, args, read_notes=""):
        signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as torchrun:  # (no process group: the stop comes before the trainer starts one)
        torchrun.setenv("WORLD_SIZE", "2")
        torchrun.setenv("RANK", str(rank))
        torchrun.setattr(Trainer, "__init__", signalled_at_start)
        assert main(argv(faces, tmp_path / "new", max_steps=2)) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == (f"train: rank {rank}: stopped by SIGTERM during the start-up, before the "
                                       "first step\n")
    original_step = Trainer.train_step

    def twice(self, images, labels):
        if self.step == 1:
            self._on_signal(signal.SIGINT, None)
            self._stop_signal_at -= SAME_STOP_SECONDS
            with monkeypatch.context() as torchrun:  # (the second as a torchrun process of that rank gets it)
                torchrun.setenv("WORLD_SIZE", "2")
                torchrun.setenv("RANK", str(rank))
                self._on_signal(signal.SIGINT, None)
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", twice)
    with pytest.raises(SystemExit) as stopped:
        main(argv(faces, tmp_path / "run", max_steps=4))
    assert stopped.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert f"\ntrain: rank {rank}: stopped by a second SIGINT: at once, without a checkpoint of this step\n" in err, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_python_m_train_imports_the_trainer_is_one_line(tmp_path, signum):
    # `python -m train` spends seconds importing torch before main(): Ctrl-C there printed a
    # KeyboardInterrupt traceback, and SIGTERM ended the process silently, killed by the signal.
    done = signalled_while_importing_torch("train", ["--output", str(tmp_path / "run")], signum)
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    assert done.stderr == f"stopped by {signal.Signals(signum).name} during the start-up, before the first step\n"
    assert not (tmp_path / "run").exists()


def test_a_signal_while_python_m_train_imports_under_torchrun_names_the_rank(tmp_path, monkeypatch):
    # Every process of a torchrun run says its stop in the seconds of its imports too, with its rank.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    done = signalled_while_importing_torch("train", ["--output", str(tmp_path / "run")], signal.SIGTERM)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert done.stderr == "train: rank 1: stopped by SIGTERM during the start-up, before the first step\n"
    assert not (tmp_path / "run").exists()


def test_a_signal_while_python_m_train_imports_with_its_reader_gone_exits_as_a_stop(tmp_path):
    # python -m train 2>&1 | tee log, and Ctrl-C, which ends tee too, in the seconds of the import: the stop's line
    # raised a BrokenPipeError, and the exit status was 120, not 130.
    done = signalled_while_importing_torch("train", ["--output", str(tmp_path / "run")], signal.SIGINT,
                                           reader_gone=True)
    assert done.returncode == 128 + signal.SIGINT and not (tmp_path / "run").exists()


def test_another_signal_soon_after_the_first_is_a_second_one(faces, tmp_path, monkeypatch, capsys):
    # (helper-139's review) The window for torchrun's passed-on copy took any signal: a second Ctrl-C to
    # torchrun reaches its ranks as SIGTERM, within a second of the SIGINT, and did nothing.
    original_step = Trainer.train_step

    def signalled(self, images, labels):
        if self.step == 1:
            self._on_signal(signal.SIGINT, None)
            self._on_signal(signal.SIGTERM, None)
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    with pytest.raises(SystemExit) as stopped:
        main(argv(faces, tmp_path, max_steps=4, save_every=0))
    assert stopped.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err  # (one line, with no blank one before it outside a terminal)
    assert "\nstopped by SIGTERM after SIGINT: at once, without a checkpoint of this step\n" in err, err
    assert "\n\n" not in err, err


def test_a_signal_the_process_got_ignored_stays_ignored_while_it_trains(faces, tmp_path, monkeypatch):
    # A script's background job (`python -m train ... &` in a script without job control) starts with SIGINT
    # ignored, so that the Ctrl-C of the script leaves it running: the start-up kept it so, and Python does,
    # but the training steps took it over, and that Ctrl-C stopped the run.
    seen = []
    original_step = Trainer.train_step

    def looking(self, images, labels):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", looking)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the tests' fixture gives the next test a terminal's handlers)
    assert main(argv(faces, tmp_path, max_steps=2, save_every=0)) == 0
    assert seen and all(sigint is signal.SIG_IGN and getattr(sigterm, "__name__", "") == "_on_signal"
                        for sigint, sigterm in seen), seen
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_the_same_signal_passed_on_by_torchrun_is_not_a_second_one(faces, tmp_path, monkeypatch, capsys):
    # A scheduler's SIGTERM to every process of the job (Slurm's scancel, systemd's control-group kill, pkill)
    # reaches the ranks, and torchrun, which passes the one it got on to them: each rank gets it twice. When
    # the second came after the rank had handled the first (torchrun scheduled later, on a loaded machine;
    # r18 at 112 px, torchrun's 20 ms after the ranks': every time), it was 'a second SIGTERM': the ranks
    # quit at once, without the checkpoint. A repeat within SAME_STOP_SECONDS of the first is the same stop.
    original_step = Trainer.train_step

    def signalled_twice(self, images, labels):
        if self.step == 1:
            self._on_signal(signal.SIGTERM, None)  # the group's
            self._on_signal(signal.SIGTERM, None)  # torchrun's, passed on
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", signalled_twice)
    assert main(argv(faces, tmp_path, max_steps=4, save_every=0)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 2; checkpoint: " in err and "second" not in err, err
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 2


def test_a_rank_stopped_by_another_ranks_signal_says_so_after_torchruns_sigterm(faces, tmp_path, monkeypatch,
                                                                                 capsys):
    # A signal to rank 1 alone (a pre-empted node): every rank stops at the step and saves. Rank 1, its part
    # of the checkpoint done, ended first, and torchrun SIGTERMed rank 0 while it wrote the file: rank 0
    # then said 'stopped by SIGTERM', and test_ddp's test_a_signal_to_one_rank_stops_every_rank_with_the_
    # checkpoint failed whenever the writing outlasted rank 1's exit. Here the stop agreed at step 2
    # without a signal of this process's own, and torchrun's SIGTERM as the checkpoint is written.
    original_step, original_save = Trainer.train_step, Trainer.save

    def another_rank_signalled(self, images, labels):
        loss, stop = original_step(self, images, labels)
        return loss, stop or self.step == 2

    def save_then_torchruns_sigterm(self, **kwargs):  # (artifact=False at a stop: --wandb-artifacts logs none)
        original_save(self, **kwargs)
        self._on_signal(signal.SIGTERM, None)

    monkeypatch.setattr(Trainer, "train_step", another_rank_signalled)
    monkeypatch.setattr(Trainer, "save", save_then_torchruns_sigterm)
    assert main(argv(faces, tmp_path, max_steps=4, save_every=0)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by a signal to another process at step 2; checkpoint: " in err, err
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers of before are back


def test_resuming_on_another_number_of_processes_says_what_changes(faces, tmp_path, capsys):
    # Allowed (the README's list), but the step's batch and the data order change without a word.
    assert main(argv(faces, tmp_path, max_steps=2)) == 0
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    state["rng"] = state["rng"] * 2  # as a run of two processes saved it
    torch.save(state, tmp_path / "checkpoint.pt")
    capsys.readouterr()
    Trainer(parse_args(argv(faces, tmp_path, max_steps=4, resume="auto")))
    assert "note: that run had 2 process(es), a batch of 32 a step; this one has 1, 16 a step" in \
        capsys.readouterr().err


def test_a_file_system_without_locks_runs_with_a_note(tmp_path, monkeypatch, capsys):
    # flock failing with ENOSYS (Lustre without flock, NFS without lockd) said "another run holds it".
    import errno
    import fcntl

    from train.tools import RunLock

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    RunLock(str(tmp_path / ".run.lock"), "another run holds it").release()
    assert "this file system does not lock files (Function not implemented)" in capsys.readouterr().err


def test_a_second_run_into_the_same_output_is_refused(faces, tmp_path):
    # Started twice, the second run moved the first's files aside while it ran and interleaved its logs.
    assert main(argv(faces, tmp_path, max_steps=2)) == 0
    assert not (tmp_path / ".run.lock").exists()  # released at the end
    held = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                             f"f = open({str(tmp_path / '.run.lock')!r}, 'a')\n"
                             "fcntl.flock(f.fileno(), fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline() == "held\n"
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(SystemExit, match=r"another run is writing into this folder"):
            main(argv(faces, tmp_path, max_steps=4))
        assert sorted(os.listdir(tmp_path)) == before  # nothing moved aside
    finally:
        held.kill()
        held.wait()
    assert main(argv(faces, tmp_path, max_steps=4, resume="auto")) == 0  # a killed run's lock is taken


def test_resume_repeats_the_uninterrupted_run_exactly(faces, tmp_path, monkeypatch):
    # Dropout on, so that the restored RNG state matters as well as the weights and the data order.
    options = dict(max_steps=8, save_every=4, keep_prob=0.8)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(faces, full, **options)) == 0

    run_killed_at(5, argv(faces, killed, **options), monkeypatch)
    assert checkpoint.load(str(killed / "checkpoint.pt"))["step"] == 4
    assert len(losses(killed)) == 5  # the killed run logged step 5 past its checkpoint

    assert main(argv(faces, killed, resume="auto", **options)) == 0
    assert losses(killed) == losses(full)  # exact floats, and step 5 logged once
    a = checkpoint.load(str(full / "checkpoint.pt"))
    b = checkpoint.load(str(killed / "checkpoint.pt"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["margin_loss"]["weight"], b["margin_loss"]["weight"])


# The checkpoint of the trainer's first version (e186e8c): these keys alone, and none of the options
# added since in its "args" (each had its default's behaviour there).
FIRST_VERSION_KEYS = ("step", "args", "num_classes", "model", "margin_loss", "optimizer", "scheduler", "scaler", "rng",
                      "target_angles", "elapsed", "verification")
OPTIONS_SINCE_FIRST_VERSION = (
    "adaface_h", "adaface_m", "compile", "compile_backend", "compile_mode", "crop_augmentation", "elastic_std",
    "gradient_acc", "interclass_filter", "local_rank", "loss_amp", "low_res_augmentation", "magface_easy_margin",
    "margin_grad", "num_classes", "photometric_augmentation", "sample_rate", "sharded_classes", "subcenters", "wandb",
    "wandb_entity", "wandb_project", "wandb_run_name")


def as_first_version(path) -> None:
    """Rewrites the checkpoint at ``path`` in the first version's layout."""
    state = checkpoint.load(str(path))
    old = {key: state[key] for key in FIRST_VERSION_KEYS}
    old["args"] = {k: v for k, v in state["args"].items() if k not in OPTIONS_SINCE_FIRST_VERSION}
    torch.save(old, path)


def test_a_checkpoint_of_the_first_version_resumes_exactly(faces, tmp_path, monkeypatch, capsys):
    # A run folder an upgrade finds: the checkpoint in the first version's layout (no record of its
    # data, its options those of then), no training.log. It resumes as the run would have gone on.
    options = dict(max_steps=8, save_every=4, keep_prob=0.8)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(faces, full, **options)) == 0
    run_killed_at(5, argv(faces, killed, **options), monkeypatch)
    as_first_version(killed / "checkpoint.pt")
    os.remove(killed / "training.log")
    capsys.readouterr()

    assert main(argv(faces, killed, resume="auto", **options)) == 0
    assert losses(killed) == losses(full)
    assert "note:" not in capsys.readouterr().err  # nothing to say of that run's options or data


def test_a_checkpoint_that_did_not_record_its_data_is_noted_with_other_data(faces, tmp_path, capsys):
    # Before checkpoints recorded their data (7d668c4), --data of the same identities in another order
    # (refused with a checkpoint of today) resumed, and gave its centres to --pretrained_model, without
    # a word: each label then trains another person's class centre.
    run = tmp_path / "run"
    assert main(argv(faces, run, max_steps=2)) == 0
    as_first_version(run / "checkpoint.pt")
    swapped = tmp_path / "swapped"
    shutil.copytree(faces[0], swapped)
    os.rename(swapped / "id_000", swapped / "tmp")
    os.rename(swapped / "id_001", swapped / "id_000")
    os.rename(swapped / "tmp", swapped / "id_001")
    capsys.readouterr()

    assert main(argv((str(swapped), None), tmp_path / "tuned", max_steps=1,
                     pretrained_model=str(run / "checkpoint.pt"))) == 0
    assert "its class centres are taken on their count alone" in capsys.readouterr().err
    # The same --data as that run's: nothing to say.
    kept = tmp_path / "kept.pt"
    shutil.copy(run / "checkpoint.pt", kept)
    assert main(argv(faces, run, max_steps=3, resume="auto")) == 0
    assert "note:" not in capsys.readouterr().err

    shutil.copy(kept, run / "checkpoint.pt")
    assert main(argv((str(swapped), None), run, max_steps=3, resume="auto")) == 0
    err = capsys.readouterr().err
    assert f"is of an earlier version, which did not record its data: --data {swapped} cannot be checked" in err
    assert "--finetuning" in err

    # Versions from 7d668c4 to 070f41b recorded the data but not its identities' names: a note that
    # says so (not 'they are not named', which an image folder's are).
    state = checkpoint.load(str(run / "checkpoint.pt"))
    del state["data_classes"]
    state["data_fingerprint"] = "0" * 16
    torch.save(state, run / "checkpoint.pt")
    assert main(argv((str(swapped), None), run, max_steps=4, resume="auto")) == 0
    assert "that checkpoint, of an earlier version, does not name them" in capsys.readouterr().err


def test_resume_from_elsewhere_sets_aside_the_run_in_the_output_folder(faces, tmp_path, capsys):
    # --resume PATH into a folder that holds another run: that run's checkpoint and logs move to
    # earlier-1/ (they were overwritten, and the logs spliced, when the folder was taken as the
    # resumed run's own); resuming from the folder's own checkpoint moves nothing.
    first, other = tmp_path / "first", tmp_path / "other"
    assert main(argv(faces, first, max_steps=4, save_every=2)) == 0
    assert main(argv(faces, other, max_steps=3, seed=1)) == 0
    held = {name: (other / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "args.json")}
    capsys.readouterr()
    assert main(argv(faces, other, max_steps=6, resume=str(first / "checkpoint.pt"))) == 0
    assert f"held another run than the one in {first / 'checkpoint.pt'}" in capsys.readouterr().err
    assert {name: (other / "earlier-1" / name).read_bytes() for name in held} == held
    # The resumed run's logs: the checkpoint's folder's up to its step, then its own (the plots show the run).
    resumed = read_jsonl(other / "metrics.jsonl")
    assert resumed[:4] == read_jsonl(first / "metrics.jsonl") and [r["step"] for r in resumed[4:]] == [5, 6]
    assert checkpoint.load(str(other / "checkpoint.pt"))["step"] == 6
    assert main(argv(faces, other, max_steps=7, resume=str(other / "checkpoint.pt"))) == 0
    assert not (other / "earlier-2").exists()
    assert [r["step"] for r in read_jsonl(other / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 7]


def test_resume_drops_a_torn_last_log_line(faces, tmp_path):
    # A kill -9 or a full disk in the middle of an append leaves half a line at the end of a log.
    options = dict(max_steps=4, save_every=2, pairs=True, eval_every=2)
    assert main(argv(faces, tmp_path, **options)) == 0
    complete = {name: (tmp_path / name).read_text() for name in ("metrics.jsonl", "verification.jsonl")}
    for name, text in complete.items():
        (tmp_path / name).write_text(text + '{"step": 5, "loss": 3.')
    torn = "2026-12-05 01:17:39 [step 5/8] loss 31.2812, lr 0.08"
    with open(tmp_path / "training.log", "a") as f:
        f.write(torn)
    assert main(argv(faces, tmp_path, resume="auto", **options)) == 0
    for name, text in complete.items():
        assert (tmp_path / name).read_text() == text
    # training.log keeps the torn line (a record of what happened), ended: the resume's starts a line.
    log = (tmp_path / "training.log").read_text().splitlines()
    assert " === resumed at step 4: " in log[log.index(torn) + 1], log

    lines = complete["metrics.jsonl"].splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text("".join(lines[:1] + ['{"step": 2, "lo\n'] + lines[2:]))
    with pytest.raises(SystemExit, match=r"metrics\.jsonl: line 2 is not JSON"):
        main(argv(faces, tmp_path, resume="auto", **options))


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradient_accumulation_steps_on_the_mean_gradient_of_its_passes(faces, tmp_path):
    # --gradient-acc 2 --batch-size 8: each step reads 16 images and applies the mean of the
    # gradients of two passes of 8, as if each pass had been run alone and the results averaged.
    import copy

    trainer = Trainer(parse_args(argv(faces, tmp_path, batch_size=8, gradient_acc=2, grad_clip=0)))
    assert trainer.loader.batch_sampler.batch_size == 16
    assert "batch 8 x 1 process(es) x 2 passes" in trainer.describe()
    images, labels = next(iter(trainer.loader))
    backbone, margin_loss = copy.deepcopy(trainer.backbone), copy.deepcopy(trainer.margin_loss)
    for images_part, labels_part in zip(images.chunk(2), labels.chunk(2)):
        (margin_loss(backbone(to_model_input(images_part)), labels_part) / 2).backward()
    expected = [p.grad for p in [*backbone.parameters(), *margin_loss.parameters()] if p.requires_grad]

    applied = {}
    original_step = trainer.optimizer.step

    def step(*args, **kwargs):
        applied["grads"] = [p.grad.clone() for group in trainer.optimizer.param_groups for p in group["params"]]
        return original_step(*args, **kwargs)

    trainer.optimizer.step = step
    loss_value, stop = trainer.train_step(images, labels)
    assert trainer.step == 1 and not stop and math.isfinite(loss_value)
    assert len(applied["grads"]) == len(expected)
    for got, want in zip(applied["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_resumes_exactly(faces, tmp_path, monkeypatch):
    options = dict(max_steps=4, save_every=2, batch_size=8, gradient_acc=2, keep_prob=0.8)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(faces, full, **options)) == 0
    run_killed_at(3, argv(faces, killed, **options), monkeypatch)
    assert main(argv(faces, killed, resume="auto", **options)) == 0
    assert losses(killed) == losses(full) and len(losses(full)) == 4
    records = read_jsonl(full / "metrics.jsonl")
    assert all(r["samples_per_sec"] > 0 for r in records)


@pytest.mark.slow
def test_compiled_backbone_trains_like_the_eager_one(faces, tmp_path, capsys):
    # aot_eager traces forward and backward as inductor does, without the minutes of code generation
    # a CPU needs; the losses match the eager run's, and the checkpoint holds the plain module's names.
    options = dict(max_steps=3, save_every=0)
    assert main(argv(faces, tmp_path / "eager", **options)) == 0
    assert main(argv(faces, tmp_path / "compiled", compile=True, compile_backend="aot_eager", **options)) == 0
    assert "compiled (aot_eager)" in capsys.readouterr().err
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    state = checkpoint.load(str(tmp_path / "compiled" / "checkpoint.pt"))
    assert not any(key.startswith("_orig_mod") for key in state["model"])
    assert state["args"]["compile"] is True
    with pytest.raises(SystemExit, match="--compile-mode is an inductor option"):
        parse_args(["--compile", "--compile-backend", "aot_eager", "--compile-mode", "max-autotune"])


@pytest.mark.parametrize("value", ["0", "-2"])
def test_gradient_accumulation_is_checked(value):
    assert parse_args(["--gradient_acc", "4"]).gradient_acc == 4
    assert parse_args([]).gradient_acc == 1
    with pytest.raises(SystemExit, match="--gradient-acc must be at least 1"):
        parse_args(["--gradient-acc", value])


@pytest.mark.parametrize("flag, value, message", [
    ("--log-every", "0", "--log-every must be at least 1, got 0"),
    ("--eval-every", "-1", "--eval-every must be at least 0, got -1"),
    ("--save-every", "-5", "--save-every must be at least 0, got -5"),
    ("--num-workers", "-1", "--num-workers must be at least 0, got -1"),
    ("--image-size", "0", "--image-size must be at least 1, got 0"),
    ("--embedding-size", "0", "--embedding-size must be at least 1, got 0"),
    ("--seed", "-5", "--seed must be at least 0, got -5"),
    ("--lr", "-1", r"--lr must be a finite number > 0, got -1\.0"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--arcface-s", "0", r"--arcface-s must be a finite number > 0, got 0\.0"),
    ("--decay", "-1", r"--decay must be a finite number >= 0, got -1\.0"),
    ("--momentum", "inf", "--momentum must be a finite number >= 0, got inf"),
    ("--momentum", "1", r"--momentum must be below 1, got 1 \(SGD's is 0\.9\)"),  # (PyTorch's SGD takes it)
    # (were "--num-classes is 0, but synthetic holds 100 identities (no --data given?)" and "need at least one
    # identity and one image each, got 0 x 160", after the start-up)
    ("--num-classes", "0", "--num-classes must be at least 1, got 0"),
    ("--synthetic-identities", "0", "--synthetic-identities must be at least 1, got 0"),
    ("--synthetic-images-per-identity", "-1", "--synthetic-images-per-identity must be at least 1, got -1"),
    ("--device", "gpu", r"--device 'gpu' is not a torch device \(auto, cpu, cuda, cuda:1, \.\.\.\)"),
    # (were torch's errors after the data was read: mps where there is none, or a run whose set-up reads CUDA)
    # (said "it has not run on mps (arcface_ext's losses do ...)": as if the losses had run there; none has)
    ("--device", "mps", r"--device mps: the trainer runs on cpu or cuda only; it has not run on mps hardware "
                        r"\(arcface_ext's losses take mps tensors, in plain PyTorch, untried there too: "
                        r"docs/api\.md, On devices without a kernel\)"),
    ("--device", "xpu:0", r"--device xpu:0: the trainer runs on cpu or cuda only; it has not run on xpu .*"),
    ("--grad-clip", "-1", r"--grad-clip must be a finite number >= 0, got -1\.0"),
    ("--dist-timeout", "0", r"--dist-timeout must be a finite number > 0, got 0\.0"),
    ("--dist-timeout", "inf", "--dist-timeout must be a finite number > 0, got inf"),
    # (torch's clocks overflowed from 1.5e8 minutes, and a timeout under 1 ms was 0: the process group's store
    # timed out at once, with a traceback, at the start of a run under torchrun; 2e8 and 1e-6 were taken)
    ("--dist-timeout", "2e8", r"--dist-timeout is in minutes, from 0\.05 to 1e\+07; got 2e\+08"),
    ("--dist-timeout", "1e-6", r"--dist-timeout is in minutes, from 0\.05 to 1e\+07; got 1e-06"),
])
def test_numeric_options_are_checked_before_the_run(flag, value, message):
    # Each used to train and fail mid-run (--log-every 0 at the first log) or fail inside torch with
    # a traceback, after a fresh run had moved the folder's earlier run aside.
    with pytest.raises(SystemExit, match=f"^{message}$"):
        parse_args([flag, value])


@pytest.mark.parametrize("argv, message", [
    (["--arcface-m", "28.6"], r"--arcface-m \(an angular margin, in radians\) must lie in \[-pi/2, pi/2\], got 28.6"),
    (["--loss", "combined", "--m2", "nan"], r"--m2 \(an angular margin, in radians\) must lie in"),
    (["--loss", "cosface", "--m3", "35"], r"--m3 \(a cosine margin\) must lie in \[-1, 1\], got 35.0"),
    (["--loss", "elasticface-cos", "--m3", "-2"], r"--m3 \(a cosine margin\) must lie in"),
    (["--loss", "adaface", "--adaface-m", "2"], r"--adaface-m must lie in \[0, 1\]"),
    (["--loss", "elasticface-arc", "--elastic-std", "-1"], r"--elastic-std must be finite and >= 0"),
    (["--loss", "sphereface", "--m1", "0"], r"--m1 \(a multiplicative angular margin\) must be a finite number > 0, "
                                            r"got 0\.0"),
    (["--loss", "combined", "--m1", "-2"], r"--m1 \(a multiplicative angular margin\) must be a finite number > 0"),
])
def test_margins_are_checked_before_the_run(argv, message):
    # The loss modules refuse them too, but with a traceback, after the data was read.
    with pytest.raises(SystemExit, match=message):
        parse_args(argv)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_image_that_does_not_decode_mid_run_is_a_one_line_error(tmp_path, capsys, num_workers):
    # Found by a worker at step 3 (the folder is listed, not decoded, when it is opened): a message
    # naming the file and the kept checkpoint, exit status 1, not the worker's traceback.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    broken = os.path.join(data, "id_002", "01.png")
    assert main(base_argv(data, str(tmp_path / "run"), max_steps=2, batch_size=8, save_every=2)) == 0
    with open(broken, "wb") as f:
        f.write(b"not an image")
    capsys.readouterr()
    assert main(base_argv(data, str(tmp_path / "run"), max_steps=40, batch_size=8, save_every=2,
                          num_workers=num_workers, resume="auto")) == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("train: error: "))
    assert re.fullmatch(rf"train: error: step \d+'s batch: {re.escape(broken)}: cannot read the image: not an image "
                        r"format Pillow reads \(12 bytes\)\. The last checkpoint is kept: .*checkpoint\.pt "
                        r"\(step \d+\); .*--resume auto.*", line), line
    assert "Traceback" not in err
    # Without a checkpoint there is nothing to resume: the message says to run it again.
    assert main(base_argv(data, str(tmp_path / "fresh"), max_steps=40, batch_size=8, save_every=0,
                          num_workers=num_workers)) == 1
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("train: error: "))
    assert line.endswith("No checkpoint was written before it; with the image replaced or removed, run it again "
                         "(removed, it changes the data order)"), line


def test_a_pretrained_model_of_another_network_is_named(faces, tmp_path):
    # One line saying what the file holds, not load_state_dict's pages of missing and unexpected keys.
    assert main(argv(faces, tmp_path / "small", max_steps=1)) == 0
    with pytest.raises(SystemExit, match=r"^--pretrained_model .*checkpoint\.pt does not fit --network r18 "
                                         r"--embedding-size 64 --image-size 32: it holds --network small "
                                         r"--embedding-size 64 --image-size 32$"):
        Trainer(parse_args(argv(faces, tmp_path / "r18", network="r18",
                                pretrained_model=str(tmp_path / "small" / "checkpoint.pt"))))


def test_a_pretrained_model_of_the_same_network_that_does_not_load_names_its_keys(faces, tmp_path):
    # A file that records (or whose shapes read as) the very --network, --embedding-size and --image-size
    # given, whose weights still do not load (a key missing): "does not fit X: it holds X" says nothing;
    # load_state_dict's first lines say what is wrong.
    assert main(argv(faces, tmp_path / "small", max_steps=1)) == 0
    state = checkpoint.load(str(tmp_path / "small" / "checkpoint.pt"))
    missing = next(key for key in state["model"] if key.endswith("running_var"))
    del state["model"][missing]
    for name, saved in (("checkpoint", state), ("bare", state["model"])):
        torch.save(saved, tmp_path / f"{name}.pt")
        with pytest.raises(SystemExit) as raised:
            Trainer(parse_args(argv(faces, tmp_path / f"from-{name}", pretrained_model=str(tmp_path / f"{name}.pt"))))
        message = str(raised.value)
        assert "does not fit --network small --embedding-size 64 --image-size 32: " in message, message
        assert "it holds" not in message and "Missing key(s)" in message and missing in message, message
    with pytest.raises(ValueError) as raised:
        checkpoint.load_backbone(str(tmp_path / "bare.pt"), network="small", embedding_size=64, image_size=32)
    assert "it holds" not in str(raised.value) and missing in str(raised.value), raised.value


def test_a_pretrained_model_of_facex_zoo_or_of_another_librarys_network(faces, tmp_path, capsys):
    # FaceX-Zoo's train.py saves {"state_dict": FaceModel.state_dict(), "epoch", "batch_id"}: the backbone's
    # keys under "backbone.", its head's (feat_dim, num_class) weight as "head.weight". Of the very network
    # (--network package.module:factory, the one FaceX-Zoo trained), the backbone loads, as its own
    # test_protocol's model loader takes it; the head is not taken (fresh class centres).
    assert main(argv(faces, tmp_path / "small", max_steps=1)) == 0
    trained = checkpoint.load(str(tmp_path / "small" / "checkpoint.pt"))
    backbone_state = trained["model"]
    centres = trained["margin_loss"]["weight"]
    torch.save({"state_dict": {**{"backbone." + k: v for k, v in backbone_state.items()},
                               "head.weight": centres.t().contiguous()}, "epoch": 17, "batch_id": 6},
               tmp_path / "Epoch_17.pt")
    capsys.readouterr()
    run = Trainer(parse_args(argv(faces, tmp_path / "from-facex", pretrained_model=str(tmp_path / "Epoch_17.pt"))))
    assert all(torch.equal(v, backbone_state[k]) for k, v in run.backbone.state_dict().items())
    assert "initialised the backbone from" in capsys.readouterr().err
    # So does a PyTorch Lightning checkpoint's state_dict, the network under its module's attribute name.
    torch.save({"state_dict": {**{"net." + k: v for k, v in backbone_state.items()}, "loss.weight": centres},
                "epoch": 3, "global_step": 40, "pytorch-lightning_version": "2.6.6"}, tmp_path / "last.ckpt")
    run = Trainer(parse_args(argv(faces, tmp_path / "from-lightning", pretrained_model=str(tmp_path / "last.ckpt"))))
    assert all(torch.equal(v, backbone_state[k]) for k, v in run.backbone.state_dict().items())
    # Another library's network (face.evoLVe's IR_SE_50 as its train.py saves it; FaceX-Zoo's MobileFaceNet):
    # no key is one of the network's, which the error says in one line rather than load_state_dict's lists.
    for name, saved in (("evolve.pth", {"input_layer.0.weight": torch.zeros(64, 3, 3, 3),
                                        "body.0.res_layer.1.weight": torch.zeros(64, 64, 3, 3)}),
                        ("mbf.pt", {"state_dict": {"backbone.conv1.conv.weight": torch.zeros(64, 3, 3, 3),
                                                   "head.weight": torch.zeros(512, 8)}, "epoch": 0, "batch_id": 9})):
        torch.save(saved, tmp_path / name)
        with pytest.raises(SystemExit) as raised:
            Trainer(parse_args(argv(faces, tmp_path / "from-other", pretrained_model=str(tmp_path / name))))
        message = str(raised.value)
        assert "\n" not in message and "Missing key(s)" not in message, message
        first = next(iter(saved.get("state_dict", saved)))
        assert message.endswith(f"--image-size 32: none of its 2 weights' names is one of the network's (its first "
                                f"{first!r}, the network's 'conv1.weight'): the weights of another definition of a "
                                "network, which this trainer's networks do not load (a network of your own, --network "
                                "package.module:factory, can)"), message


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error(faces, tmp_path, monkeypatch, capsys):
    # A full disk at the step-4 checkpoint: the step-2 one stays, exit status 1, one line.
    real_save = checkpoint.save_atomic

    def save_atomic(state, path):
        if state["step"] == 4:
            raise OSError(28, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "save_atomic", save_atomic)
    assert main(argv(faces, tmp_path, max_steps=6, save_every=2)) == 1
    err = capsys.readouterr().err
    assert (f"train: error: writing {tmp_path / 'checkpoint.pt'} at step 4 failed: [Errno 28] No space left on device. "
            f"The last checkpoint is kept: {tmp_path / 'checkpoint.pt'} (step 2)") in err
    assert "Traceback" not in err and checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 2


def test_an_error_raised_after_the_said_one_keeps_its_traceback(faces, tmp_path, monkeypatch, capsys):
    # Under torchrun (here its error file named, one process), an error no handler says is said before the
    # process leaves its group, and the run ends with SystemExit(1), not printed a second time. An error
    # raised after it, further down _fit's finally (here by stop_loader_workers), was taken for that one:
    # SystemExit(1), its traceback in training.log alone.
    import train.data
    import train.trainer as trainer_module

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    step = trainer_module.Trainer.train_step

    def first(self, *args):
        if self.step == 1:
            raise RuntimeError("the first error")
        return step(self, *args)

    def second(loader):
        raise RuntimeError("the second error")

    monkeypatch.setattr(trainer_module.Trainer, "train_step", first)
    monkeypatch.setattr(train.data, "stop_loader_workers", second)
    with pytest.raises(RuntimeError, match="the second error") as raised:
        main(argv(faces, tmp_path / "run", max_steps=3))
    assert str(raised.value.__context__) == "the first error"  # (both in the traceback printed at exit)
    assert "RuntimeError: the first error" in capsys.readouterr().err  # said before the group was left
    assert "the first error" in (tmp_path / "error.json").read_text()


def test_a_log_that_cannot_be_written_is_a_one_line_error(faces, tmp_path, monkeypatch, capsys):
    # The disk fills (another job's files) between checkpoints: a log line meets it first, and so do the
    # error's own lines for training.log. One line, exit status 1, the last checkpoint kept and resumable
    # (it was three tracebacks chained, 50 lines).
    import train.trainer as trainer_module

    full = []

    def open_(path, mode="r", *args, **kwargs):
        if "a" in mode and os.path.basename(path) in ("metrics.jsonl", "training.log"):
            if full or (path.endswith("metrics.jsonl") and len(read_jsonl(path)) == 3):
                full.append(path)
                raise OSError(28, "No space left on device", path)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "open", open_, raising=False)
    assert main(argv(faces, tmp_path, max_steps=6, save_every=2)) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"train: error: writing {tmp_path / 'metrics.jsonl'} failed: [Errno 28] No space left on device. "
        f"The last checkpoint is kept: {tmp_path / 'checkpoint.pt'} (step 2)"), err
    assert "Traceback" not in err and not os.path.exists(tmp_path / ".run.lock")
    # At start-up, a one-line refusal too.
    # (It said "error: writing ...", the one refusal that began so.)
    with pytest.raises(SystemExit, match="^" + re.escape(f"train: error: writing {tmp_path / 'new' / 'training.log'} "
                                                         "failed: [Errno 28] No space left on device") + "$"):
        main(argv(faces, tmp_path / "new", max_steps=2))
    assert not (tmp_path / "new").exists()  # the folder it made, with the logs its set-up began, is gone
    monkeypatch.undo()
    assert main(argv(faces, tmp_path, max_steps=6, save_every=2, resume="auto")) == 0
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]


def test_an_output_folder_that_cannot_be_made_is_named(faces, tmp_path):
    # (Said as the face tools say it for theirs: it was "cannot create the folder: File exists", and "Not a
    # directory".)
    (tmp_path / "file").write_text("")
    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")
    for output, said in ((tmp_path / "file", f"{tmp_path / 'file'} exists and is not a folder: name a folder for the "
                                             "run"),
                         (tmp_path / "file" / "run", f"{tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not "
                                                     "a folder to make the run's folder in"),
                         (tmp_path / "file" / "a" / "run", f"{tmp_path / 'file' / 'a' / 'run'}: {tmp_path / 'file'} is "
                                                           "a file, not a folder to make the run's folder in"),
                         # a link to nothing, said to be one (it was called a file)
                         (tmp_path / "gone" / "run", f"{tmp_path / 'gone' / 'run'}: {tmp_path / 'gone'} is a broken "
                                                     f"symbolic link to {tmp_path / 'unmounted'}, not a folder to make "
                                                     "the run's folder in"),
                         (tmp_path / "gone", f"{tmp_path / 'gone'} exists and is not a folder (a broken symbolic link "
                                             f"to {tmp_path / 'unmounted'}): name a folder for the run")):
        with pytest.raises(SystemExit, match=f"^train: error: --output {re.escape(said)}$"):
            main(argv(faces, output))
    assert (tmp_path / "file").read_text() == "" and not os.path.lexists(tmp_path / "unmounted")


def test_a_run_that_stops_at_start_up_leaves_no_empty_output_folder(faces, tmp_path):
    # The data cannot feed --batch-size: the folder made for the run goes again; one that was there
    # before stays.
    for output in (tmp_path / "new", tmp_path / "existing"):
        if output.name == "existing":
            output.mkdir()
        with pytest.raises(SystemExit, match="is more than the 64 images"):
            main(argv(faces, output, batch_size=100))
        assert output.exists() == (output.name == "existing")


def test_a_run_that_stops_at_start_up_removes_the_folders_it_made_above_its_output(faces, tmp_path, monkeypatch):
    # It removed --output n1/n2/n3 and left n1/n2, empty, and the default runs/small's runs/ in a fresh clone
    # (helper-185's trial). Only those it made go: not one that was there, nor one written into meanwhile.
    (tmp_path / "there").mkdir()
    for output in ("n1/n2/n3", "there/n2/n3"):
        with pytest.raises(SystemExit, match="is more than the 64 images"):
            main(argv(faces, tmp_path / output, batch_size=100))
    assert sorted(os.listdir(tmp_path)) == ["there"] and os.listdir(tmp_path / "there") == []
    clone = tmp_path / "clone"
    clone.mkdir()
    monkeypatch.chdir(clone)
    default = argv(("nope", None), "unused")
    del default[default.index("--output"):default.index("--output") + 2]
    with pytest.raises(SystemExit, match="--data 'nope': no such folder"):
        main(default)
    assert os.listdir(clone) == []
    original_lock = Trainer._lock_output

    def written_into_meanwhile(self):
        original_lock(self)
        (tmp_path / "w1" / "other.txt").write_text("another run's")

    monkeypatch.setattr(Trainer, "_lock_output", written_into_meanwhile)
    with pytest.raises(SystemExit, match="is more than the 64 images"):
        main(argv(faces, tmp_path / "w1" / "w2" / "w3", batch_size=100))
    assert os.listdir(tmp_path / "w1") == ["other.txt"]


def test_a_run_that_stops_at_start_up_leaves_a_folder_that_was_there_as_it_was(faces, tmp_path, monkeypatch, capsys):
    # A full disk when the set-up begins training.log, after it set the folder's earlier run aside into earlier-1:
    # that run's files go back, and the set-up's go. They were left, the earlier run in earlier-1 and the failed
    # start's training.log and args.json where it had been, which the next start set aside as a run (earlier-2).
    import train.trainer as trainer_module

    def open_(path, mode="r", *args, **kwargs):
        if "a" in mode and os.path.basename(path) == "training.log":
            raise OSError(28, "No space left on device", path)
        return open(path, mode, *args, **kwargs)

    earlier, empty = tmp_path / "earlier", tmp_path / "empty"
    assert main(argv(faces, earlier, max_steps=2)) == 0
    empty.mkdir()
    (empty / "notes.txt").write_text("mine")

    def contents(folder):
        return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}

    kept = {folder: contents(folder) for folder in (earlier, empty)}
    assert {"checkpoint.pt", "training.log", "args.json", "metrics.jsonl"} <= {str(p) for p in kept[earlier]}
    monkeypatch.setattr(trainer_module, "open", open_, raising=False)
    for folder in (earlier, empty):
        with pytest.raises(SystemExit, match="No space left on device"):
            main(argv(faces, folder, max_steps=2))
        err = capsys.readouterr().err
        assert (f"note: the earlier run's files are back in {folder}\n" in err) == (folder == earlier), err
        assert contents(folder) == kept[folder] and sorted(os.listdir(folder)) == sorted(
            {str(path).split(os.sep)[0] for path in kept[folder]}), os.listdir(folder)


def test_a_run_refused_a_folder_another_run_holds_leaves_what_that_run_writes(faces, tmp_path, monkeypatch):
    # The other run's files that came after this one looked into the folder (its first metrics, say) are not this
    # set-up's to remove: it never held the folder.
    import train.tools

    def held_by_another_run(path, message):
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # (the other run's, written meanwhile)
        raise ValueError(message)

    monkeypatch.setattr(train.tools, "RunLock", held_by_another_run)
    with pytest.raises(SystemExit, match="another run is writing into this folder"):
        main(argv(faces, tmp_path, max_steps=2))
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_a_run_that_stops_at_start_up_holds_the_folder_while_it_puts_it_back(faces, tmp_path, monkeypatch):
    # The lock was released first: a run started meanwhile took the folder, and the undo then moved the earlier
    # run's files back over what that run had begun there, or removed them.
    import train.tools
    import train.trainer as trainer_module

    def open_(path, mode="r", *args, **kwargs):
        if "a" in mode and os.path.basename(path) == "training.log":
            raise OSError(28, "No space left on device", path)
        return open(path, mode, *args, **kwargs)

    refused, replace = [], os.replace

    def replace_(source, target):
        if os.path.basename(os.path.dirname(source)) == "earlier-1":  # (the undo, moving the earlier run back)
            try:
                train.tools.RunLock(str(tmp_path / trainer_module.OUTPUT_LOCK_NAME), "held").release()
            except ValueError:
                refused.append(os.path.basename(source))
        return replace(source, target)

    assert main(argv(faces, tmp_path, max_steps=2)) == 0
    monkeypatch.setattr(trainer_module, "open", open_, raising=False)
    monkeypatch.setattr(os, "replace", replace_)
    with pytest.raises(SystemExit, match="No space left on device"):
        main(argv(faces, tmp_path, max_steps=2))
    assert "checkpoint.pt" in refused and not (tmp_path / "earlier-1").exists(), refused
    assert not (tmp_path / trainer_module.OUTPUT_LOCK_NAME).exists()  # (released once it was done)


def test_a_run_that_stops_at_start_up_puts_back_the_folder_it_took_not_the_one_it_first_saw(faces, tmp_path,
                                                                                            monkeypatch, capsys):
    # After this run first looked into the folder and before it took its lock, another whole run took the folder,
    # set the run there aside into earlier-1, trained and let go. This run then set that one aside into earlier-2 and
    # stopped at start-up (a full disk). Its undo, from the first look, took earlier-1 for its own too: it moved both
    # back, earlier-2's files over earlier-1's, and the first run was lost. The folder is left as this run took it.
    import train.tools
    import train.trainer as trainer_module

    def open_(path, mode="r", *args, **kwargs):
        if "a" in mode and os.path.basename(path) == "training.log":
            raise OSError(28, "No space left on device", path)
        return open(path, mode, *args, **kwargs)

    def contents(folder):
        return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
                if path.is_file()}

    other_run, taken, lock = [], {}, train.tools.RunLock

    def another_run_first(path, busy):
        if not other_run:  # (this run's lock, not the other run's own, taken inside)
            other_run.append(tmp_path)
            assert main(argv(faces, tmp_path, max_steps=3)) == 0
            taken.update(contents(tmp_path))
            monkeypatch.setattr(trainer_module, "open", open_, raising=False)
        return lock(path, busy)

    assert main(argv(faces, tmp_path, max_steps=2)) == 0
    first = contents(tmp_path)
    monkeypatch.setattr(train.tools, "RunLock", another_run_first)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="No space left on device"):
        main(argv(faces, tmp_path, max_steps=2))
    assert other_run and "earlier-1/checkpoint.pt" in taken
    assert {name[len("earlier-1/"):]: data for name, data in taken.items() if name.startswith("earlier-1/")} == first
    assert contents(tmp_path) == taken and sorted(os.listdir(tmp_path)) == sorted(
        {name.split(os.sep)[0] for name in taken}), os.listdir(tmp_path)
    assert capsys.readouterr().err.count(f"note: the earlier run's files are back in {tmp_path}\n") == 1


def test_a_run_that_cannot_take_its_folder_leaves_it_as_it_was(faces, tmp_path, monkeypatch):
    # The folder it made goes again when its lock file cannot be made; one it may write into but not list (its
    # names, listed under the lock, are what a stop at start-up puts back) is refused in a line (was a traceback),
    # its lock let go.
    import train.tools

    lock, listdir = train.tools.RunLock, os.listdir

    def no_lock_file(path, busy):
        raise OSError(f"--output: cannot create the run's lock file {path}: No space left on device")

    monkeypatch.setattr(train.tools, "RunLock", no_lock_file)
    with pytest.raises(SystemExit, match="cannot create the run's lock file"):
        main(argv(faces, tmp_path / "new", max_steps=2))
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(train.tools, "RunLock", lock)
    (tmp_path / "notes.txt").write_text("mine")

    def unlistable(path="."):
        if os.path.realpath(path) == os.path.realpath(tmp_path):
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", unlistable)
    with pytest.raises(SystemExit, match=f"^train: error: --output {re.escape(str(tmp_path))}: cannot read the "
                                         "folder: Permission denied$"):
        main(argv(faces, tmp_path, max_steps=2))
    monkeypatch.setattr(os, "listdir", listdir)
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("options, message", [
    ("--loss arcface --m2 0.4", "--m2 does not apply to --loss arcface, whose margin is --arcface-m"),
    ("--loss cosface --m1 2", "--m1 does not apply to --loss cosface, whose margin is --m3"),
    ("--loss sphereface --m2 0.1 --m3 0.1", "--m2 and --m3 do not apply to --loss sphereface, whose margin is --m1"),
    # The losses' own parameters too (--loss cosface --arcface-m 0.2 trained at --m3 0.35, without a word).
    ("--loss cosface --arcface-m 0.2", "--arcface-m 0.2 does not apply to --loss cosface, whose margin is --m3"),
    ("--loss adaface --arcface-m 0.3", "--arcface-m 0.3 does not apply to --loss adaface, whose margin is "
                                       "--adaface-m and --adaface-h"),
    ("--loss combined --m2 0.3 --arcface-m 0.4", "--arcface-m 0.4 does not apply to --loss combined, whose margin is "
                                                 "--m1 --m2 --m3"),
    ("--loss arcface --adaface-m 0.2 --adaface-h 0.5", "--adaface-m 0.2 and --adaface-h 0.5 do not apply to --loss "
                                                       "arcface, whose margin is --arcface-m"),
    ("--loss magface --elastic-std 0.1", "--elastic-std 0.1 does not apply to --loss magface, whose margin is its "
                                         "fixed MS1MV2 settings (and --magface-easy-margin)"),
    ("--loss arcface --magface-easy-margin", "--magface-easy-margin does not apply to --loss arcface, whose margin is "
                                             "--arcface-m"),
    ("--loss elasticface-cos --arcface-m 0.3", "--arcface-m 0.3 does not apply to --loss elasticface-cos, whose "
                                               "margin is --m3 and --elastic-std"),
    ("--optimizer adamw --momentum 0.5", "--momentum 0.5 does not apply to --optimizer adamw (its betas are "
                                         "PyTorch's 0.9 and 0.999): it is --optimizer sgd's"),
    # (a step at 0 or before divided the base rate from the start; one named twice divided by 100 there)
    ("--lr-steps 0,100", "--lr-steps 0,100: the steps must be distinct and at least 1"),
    ("--lr-steps=-5", "--lr-steps -5: the steps must be distinct and at least 1"),
    ("--lr-steps 10,10", "--lr-steps 10,10: the steps must be distinct and at least 1"),
    ("--lr-schedule poly --lr-steps 10", "--lr-steps goes with --lr-schedule step, but the schedule is poly: add "
                                         "--lr-schedule step"),
    # Lengths in epochs, by name (also when a step schedule has neither spelling).
    ("--epochs 0", "--epochs must be finite and > 0, got 0"),
    ("--epochs nan", "--epochs must be finite and > 0, got nan"),
    ("--warmup-epochs -1", "--warmup-epochs must be finite and >= 0, got -1"),
    ("--lr-epochs 2,0", "--lr-epochs must be finite and > 0, got 0"),
    ("--lr-epochs 2,2", "--lr-epochs 2,2: the epochs must be distinct"),
    ("--lr-schedule poly --lr-epochs 2", "--lr-epochs goes with --lr-schedule step, but the schedule is poly: add "
                                         "--lr-schedule step"),
    ("--lr-schedule step", "--lr-schedule step needs --lr-steps (e.g. --lr-steps 100000,160000) or --lr-epochs "
                           "(e.g. --lr-epochs 12,20,24)"),
    # (was a run from random weights, without a word)
    ("--finetuning", "--finetuning takes the backbone of --pretrained_model (with fresh class centres): give "
                     "--pretrained_model too"),
])
def test_options_the_run_would_ignore_are_refused(options, message):
    with pytest.raises(SystemExit, match=f"^{re.escape(message)}$"):
        parse_args(options.split())
    assert parse_args("--loss combined --m1 1 --m2 0.3 --m3 0.2".split()).m3 == 0.2
    # Their defaults pass, as args.json (a config) lists every option, and the losses that read them take them.
    assert parse_args("--loss cosface --arcface-m 0.5 --adaface-m 0.4 --elastic-std 0.05".split()).loss == "cosface"
    assert parse_args("--loss combined --arcface-m 0.3".split()).arcface_m == 0.3
    assert parse_args("--loss elasticface-cos --elastic-std 0.1".split()).elastic_std == 0.1
    assert parse_args("--loss curricularface --arcface-m 0.3".split()).arcface_m == 0.3
    assert parse_args("--optimizer adamw --momentum 0.9".split()).optimizer == "adamw"
    assert parse_args("--loss cosface --no-magface-easy-margin".split()).loss == "cosface"
    args = parse_args("--loss magface --magface-easy-margin --num-classes 10 --embedding-size 8".split())
    assert build_margin_loss(args, 10).easy_margin and not build_margin_loss(
        parse_args("--loss magface --num-classes 10 --embedding-size 8".split()), 10).easy_margin


@pytest.mark.parametrize("options, note", [
    ("--compile-mode max-autotune --compile-backend inductor", "--compile-mode max-autotune is not used without "
                                                               "--compile"),
    ("--wandb-project faces --wandb-entity me", "--wandb-project faces and --wandb-entity me are not used without "
                                                "--wandb"),
    ("--wandb-artifacts", "--wandb-artifacts is not used without --wandb"),  # (a switch: its flag alone)
    ("--data /data/faces_emore --synthetic-identities 20", "--synthetic-identities 20 is not used: the data is "
                                                           "/data/faces_emore, not synthetic"),
    ("--max-steps 10 --warmup-steps 40", "--warmup-steps 40 is more than --max-steps 10: the learning rate rises to "
                                         "25% of --lr 0.1, no further"),
    ("--max-steps 100 --lr-steps 50,100,150", "--lr-steps 100,150 are not before --max-steps 100: the learning rate "
                                              "is not divided there"),
    ("--dist-timeout 60", "--dist-timeout 60 is not used: one process"),
])
def test_options_the_run_would_not_use_are_said(options, note, tmp_path):
    # Each was taken without a word. Notes, not errors: a run's args.json (a config) lists every option, and a
    # resume may turn --compile or --wandb off.
    assert unused_options(parse_args(options.split())) == [note]
    if options.startswith("--dist-timeout"):  # (used by a run of two processes)
        assert unused_options(parse_args(options.split()), world_size=2) == []
    (tmp_path / "args.json").write_text(json.dumps(vars(parse_args([]))))  # every option, at its default
    assert unused_options(parse_args(["--config", str(tmp_path / "args.json")])) == []


def test_options_the_run_would_not_use_are_in_training_log(faces, tmp_path, capsys, monkeypatch):
    # They were said by the option parser, before the trainer's set-up began keeping what it says for
    # training.log: on the screen, missing from the run's own record. (Under torchrun the first process
    # says them, as it writes training.log.)
    assert main(argv(faces, tmp_path, max_steps=2, warmup_steps=4)) == 0
    note = "note: --warmup-steps 4 is more than --max-steps 2: the learning rate rises to 50% of --lr 0.1, no further"
    assert capsys.readouterr().err.count(note) == 1
    assert [line[20:] for line in (tmp_path / "training.log").read_text().splitlines()].count(note) == 1
    # Under torchrun only the first process says them (the parser's check of RANK moved with them).
    monkeypatch.setenv("RANK", "1")
    Trainer(parse_args(argv(faces, tmp_path / "rank1", max_steps=2, warmup_steps=4)))
    assert note not in capsys.readouterr().err


def test_torch_distributed_launchs_local_rank_is_accepted(monkeypatch):
    # arcface_torch's older launch lines (python -m torch.distributed.launch) pass --local-rank=N besides
    # LOCAL_RANK in the environment: was "unrecognized arguments"; not an option of the run (args.json).
    monkeypatch.setenv("LOCAL_RANK", "0")
    args = parse_args(["--local-rank=0", "--max-steps", "3"])
    assert "local_rank" not in vars(args) and args.max_steps == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit, match="^--local-rank 0, but LOCAL_RANK is 1 in the environment"):
        parse_args(["--local_rank", "0"])


def test_config_file_mistakes_name_the_file(tmp_path):
    for name, text, message in [("bad.json", '{"max-steps": 3,,}', "not valid JSON: Expecting property name"),
                                ("bad.yaml", "a: [1,\n", "not valid YAML: while parsing"),
                                ("typed.yaml", "max-steps: five\n", "max-steps 'five': invalid literal for int")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match=f"^{tmp_path / name}: {message}"):
            parse_args(["--config", str(tmp_path / name)])
    # Each of these was a traceback (UnicodeDecodeError, PermissionError), "no such file" for a folder, or
    # the later of two spellings of one option taken without a word.
    (tmp_path / "latin1.yaml").write_bytes(b"output: caf\xe9\n")
    with pytest.raises(SystemExit, match=f"^{tmp_path / 'latin1.yaml'}: not UTF-8 text"):
        parse_args(["--config", str(tmp_path / "latin1.yaml")])
    for name, text in (("again.yaml", "max-steps: 5\nlr: 0.1\nmax-steps: 6\n"), ("again.json", '{"lr": 0.1, "lr": 1}')):
        (tmp_path / name).write_text(text)  # (the parsers keep the later value without a word)
        key = "lr" if name.endswith("json") else "max-steps"
        with pytest.raises(SystemExit, match=f"^{tmp_path / name}: {key} is given 2 times: keep one$"):
            parse_args(["--config", str(tmp_path / name)])
    (tmp_path / "twice.yaml").write_text("max-steps: 5\nmax_step: 6\n")
    with pytest.raises(SystemExit, match=f"^{tmp_path / 'twice.yaml'}: max-steps and max_step are one option, given "
                                         "2 times: keep one$"):
        parse_args(["--config", str(tmp_path / "twice.yaml")])
    # A length in steps and in epochs: the file's later line counted (epochs: 20 after max-steps: 1000 ran 20 epochs).
    (tmp_path / "twice.yaml").write_text("max-steps: 1000\nepochs: 20\n")
    with pytest.raises(SystemExit, match=f"^{tmp_path / 'twice.yaml'}: max-steps and epochs are one option \\(in steps "
                                         "and in epochs\\), given 2 times: keep one$"):
        parse_args(["--config", str(tmp_path / "twice.yaml")])
    with pytest.raises(SystemExit, match=f"^--config {tmp_path} is a folder"):
        parse_args(["--config", str(tmp_path)])


def test_config_without_its_file_is_the_trainers_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:  # (was "__main__.py: error: ...", or pytest's name here)
        parse_args(["--config"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "train: error: argument --config: expected one argument"


@pytest.mark.parametrize("name", ["run.yaml", "run.json", "r50.py"])
def test_an_unreadable_config_file_is_a_one_line_error(tmp_path, monkeypatch, name):
    import train.config
    import train.insightface_config

    (tmp_path / name).write_text("config.network = 'r18'\n" if name.endswith(".py") else "{}")

    def refused(path, *args, **kwargs):  # (chmod 000 does not stop root, who runs the tests here)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(train.config, "open", refused, raising=False)
    monkeypatch.setattr(train.insightface_config, "open", refused, raising=False)
    with pytest.raises(SystemExit, match=f"^--config {tmp_path / name}: cannot read {tmp_path / name}: Permission "
                                         "denied$"):
        parse_args(["--config", str(tmp_path / name)])


def test_resume_with_more_steps_follows_the_new_schedule_in_every_group(faces, tmp_path):
    # The learning rate of the first resumed step, of the backbone and of the class centres alike,
    # is the longer schedule's, not the value the shorter run's schedule left in the optimizer.
    assert main(argv(faces, tmp_path, max_steps=4, save_every=0)) == 0
    trainer = Trainer(parse_args(argv(faces, tmp_path, max_steps=12, save_every=0, resume="auto")))
    expected = trainer.args.lr * LearningRateSchedule("poly", 12, trainer.args.warmup_steps)(4)
    assert expected > 0
    assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([expected, expected])
    trainer.scheduler.step()
    later = trainer.args.lr * LearningRateSchedule("poly", 12, trainer.args.warmup_steps)(5)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([later, later])


@pytest.mark.parametrize("optimizer, sharded", [("sgd", False), ("adamw", False), ("sgd", True)],
                         ids=["sgd", "adamw", "sgd-sharded"])
def test_centres_lr_scale_gives_the_class_centres_group_its_own_lr_under_the_schedule(faces, tmp_path, optimizer,
                                                                                         sharded):
    # The centres' group at --lr x --centres-lr-scale, the backbone's at --lr, both scaled by the schedule (LambdaLR
    # multiplies each group's base rate), both at --decay; metrics.jsonl's lr is the backbone's, centres_lr beside it.
    if sharded and not arcface_ext.extension_available():
        pytest.skip("the sharded loss needs the compiled op")
    options = dict(max_steps=6, warmup_steps=2, save_every=0, optimizer=optimizer, lr=0.05, decay=1e-3,
                   sharded_classes=sharded)
    trainer = Trainer(parse_args(argv(faces, tmp_path / "groups", centres_lr_scale=4, **options)))
    trainer.release_output()
    backbone, centres = trainer.optimizer.param_groups
    assert centres["params"] == [trainer.margin_loss.weight]
    assert (backbone["weight_decay"], centres["weight_decay"]) == (1e-3, 1e-3)
    assert main(argv(faces, tmp_path / "run", centres_lr_scale=4, **options)) == 0
    schedule = LearningRateSchedule("poly", 6, 2)
    records = read_jsonl(os.path.join(tmp_path / "run", "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:  # (the line of step k gives the rate step k ran at, the schedule's at k - 1)
        expected = 0.05 * schedule(record["step"] - 1)
        assert (record["lr"], record["centres_lr"]) == pytest.approx((expected, 4 * expected))
    assert "lr 0.05, the class centres' 0.2 (poly" in (tmp_path / "run" / "training.log").read_text()
    # At the default scale the two are one rate, and the lines have no centres_lr.
    assert main(argv(faces, tmp_path / "plain", **options)) == 0
    records = read_jsonl(os.path.join(tmp_path / "plain", "metrics.jsonl"))
    assert all("centres_lr" not in r for r in records)
    assert [r["lr"] for r in records] == pytest.approx([0.05 * schedule(k) for k in range(6)])


def test_centres_lr_scale_resumes_at_its_rate_and_is_not_changed_on_resume(faces, tmp_path):
    # The checkpoint's optimizer and schedule keep each group's base rate; the scale, as --lr, may not change.
    assert main(argv(faces, tmp_path, max_steps=4, save_every=0, centres_lr_scale=0.5)) == 0
    trainer = Trainer(parse_args(argv(faces, tmp_path, max_steps=12, save_every=0, resume="auto",
                                      centres_lr_scale=0.5)))
    trainer.release_output()
    schedule = LearningRateSchedule("poly", 12, trainer.args.warmup_steps)
    for step in (4, 5, 6):
        expected = trainer.args.lr * schedule(step)
        assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([expected, expected / 2])
        trainer.scheduler.step()
    assert trainer.scheduler.base_lrs == pytest.approx([trainer.args.lr, trainer.args.lr / 2])
    for scale, message in ((1, r"--centres-lr-scale 0\.5 in the checkpoint, 1\.0 requested"),
                           (2, r"--centres-lr-scale 0\.5 in the checkpoint, 2\.0 requested")):
        with pytest.raises(SystemExit, match=message):
            Trainer(parse_args(argv(faces, tmp_path, max_steps=12, resume="auto", centres_lr_scale=scale)))
    # A checkpoint older than the option trained its centres at --lr: it resumes at 1, and refuses another scale.
    path = str(tmp_path / "checkpoint.pt")
    state = checkpoint.load(path)
    state["args"].pop("centres_lr_scale")
    torch.save(state, path)
    with pytest.raises(SystemExit, match=r"--centres-lr-scale 1\.0 \(the default: the checkpoint is older than the "
                                         r"option\), 0\.5 requested"):
        Trainer(parse_args(argv(faces, tmp_path, max_steps=12, resume="auto", centres_lr_scale=0.5)))


@pytest.mark.parametrize("scale", ["0", "-1", "inf", "nan"])
def test_centres_lr_scale_is_checked(scale):
    assert parse_args(["--centres_lr_scale", "10"]).centres_lr_scale == 10
    with pytest.raises(SystemExit, match="^--centres-lr-scale must be a finite number > 0, got"):
        parse_args(["--centres-lr-scale", scale])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings (Linux)")
def test_a_resumed_run_keeps_no_part_of_its_checkpoint_file_mapped(faces, tmp_path):
    # The checkpoint is read through a file mapping (mmap=True), and the optimizer's load_state_dict
    # keeps a tensor of the right dtype and device as it is: SGD's momentum (and the target angles)
    # were views of that mapping, which so stayed for the whole run. The checkpoint's pages counted in
    # the resident set, and once the next save replaced the file, its disk space stayed taken until the
    # run ended (4.1 GB at a million classes).
    assert main(argv(faces, tmp_path, max_steps=2, save_every=0)) == 0
    trainer = Trainer(parse_args(argv(faces, tmp_path, max_steps=4, save_every=0, resume="auto")))
    assert any("momentum_buffer" in entry for entry in trainer.optimizer.state.values())
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = [line.strip() for line in maps if "checkpoint.pt" in line]
    assert not mapped, f"the resumed run still maps its checkpoint: {mapped}"


def test_resume_with_more_steps_gathers_the_angles_of_the_new_end(faces, tmp_path):
    # 8 steps, then resumed to 12: the "end" angles are those of steps 11-12, not of the first run's
    # last step; the new middle (step 6) had passed, so the first run's middle stands.
    assert main(argv(faces, tmp_path, max_steps=8)) == 0
    assert main(argv(faces, tmp_path, max_steps=12, resume="auto")) == 0
    angles = checkpoint.load(str(tmp_path / "checkpoint.pt"))["target_angles"]
    assert angles["windows"] == {"start": [0, 1], "middle": [4, 5], "end": [11, 12]}
    assert all(len(angles["degrees"][phase]) == 16 for phase in ("start", "middle", "end"))


def test_a_resume_says_it_does_not_load_another_pretrained_model(faces, tmp_path, capsys):
    # The resumed checkpoint's weights are the run's: another --pretrained_model was not loaded, without a word.
    # The run's own, given again with its command line, was loaded at its start: nothing to say.
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    assert main(argv(faces, first, max_steps=2)) == 0
    start = str(first / "checkpoint.pt")
    assert main(argv(faces, tuned, max_steps=2, pretrained_model=start)) == 0
    capsys.readouterr()
    assert main(argv(faces, tuned, max_steps=3, pretrained_model=start, resume="auto")) == 0
    assert "--pretrained_model" not in capsys.readouterr().err
    other = str(tmp_path / "other.pt")
    shutil.copy(start, other)
    assert main(argv(faces, tuned, max_steps=4, pretrained_model=other, resume="auto")) == 0
    assert (f"note: --pretrained_model {other} is not loaded: a resumed run continues from the weights of "
            f"{tuned / 'checkpoint.pt'}") in capsys.readouterr().err.splitlines()


@pytest.mark.slow
def test_resume_refuses_options_that_change_the_run(faces, tmp_path):
    # The optimizer's state and the schedule's base learning rates come from the checkpoint: a
    # different --lr (or momentum, weight decay, network, ...) would be silently ignored, or fail
    # inside torch. It is refused, each option named with both values.
    assert main(argv(faces, tmp_path, max_steps=2)) == 0
    for extra, message in [
        (dict(lr=0.01, momentum=0), r"--lr 0\.1 in the checkpoint, 0\.01 requested; --momentum 0\.9 in the "
                                    r"checkpoint, 0\.0 requested\. Continue that run with its own options.*"
                                    r"--pretrained_model"),
        (dict(optimizer="adamw"), r"--optimizer sgd in the checkpoint, adamw requested"),
        (dict(network="r18"), r"--network small in the checkpoint, r18 requested"),
        (dict(embedding_size=32), r"--embedding-size 64 in the checkpoint, 32 requested"),
        (dict(image_size=48), r"--image-size 32 in the checkpoint, 48 requested"),
        (dict(lr_steps="1"), r"--lr-schedule poly in the checkpoint, step requested; --lr-steps unset in the "
                             r"checkpoint, 1 requested\."),
        (dict(warmup_steps=3), r"--warmup-steps 1 in the checkpoint, 3 requested"),
    ]:
        with pytest.raises(SystemExit, match=message):
            Trainer(parse_args(argv(faces, tmp_path, max_steps=4, resume="auto", **extra)))
    # A checkpoint older than an option (its options lack the key) trained with the option's default.
    path = str(tmp_path / "checkpoint.pt")
    state = checkpoint.load(path)
    del state["args"]["interclass_filter"]
    torch.save(state, path)
    with pytest.raises(SystemExit, match=r"--interclass-filter 0\.0 \(the default: the checkpoint is older than the "
                                         r"option\), 0\.3 requested"):
        Trainer(parse_args(argv(faces, tmp_path, max_steps=4, resume="auto", interclass_filter=0.3)))
    # Where and how long it runs, what it logs and how it computes the same gradients may change;
    # so does the default warm-up, a share of --max-steps.
    trainer = Trainer(parse_args(argv(faces, tmp_path, max_steps=100, resume="auto", log_every=5, eval_every=7,
                                      save_every=0, num_workers=1, pairs=True, channels_last=True)))
    assert trainer.step == 2 and trainer.args.warmup_steps == 5
    # The message's way on: the run's own args.json as the config (it names the --config it came from).
    with pytest.raises(SystemExit, match=rf"--lr 0\.1 in the checkpoint, 0\.01 requested.*\. Continue that run with "
                                         rf"its own options \(--config {re.escape(str(tmp_path / 'args.json'))}, which "
                                         r"lists them all, with --resume\)"):
        Trainer(parse_args(["--resume", "auto", "--output", str(tmp_path), "--lr", "0.01"]))
    args_json = json.loads((tmp_path / "args.json").read_text())
    assert "config" in args_json
    trainer = Trainer(parse_args(["--config", str(tmp_path / "args.json"), "--resume", "auto", "--max-steps", "3"]))
    assert trainer.step == 2 and trainer.args.max_steps == 3 and trainer.args.network == "small"


def test_epochs_become_steps_of_the_runs_own_epoch(faces, tmp_path):
    # 64 images in steps of 16: 4 steps an epoch (2 in steps of 8 x --gradient-acc 4).
    # Each length in epochs is rounded to the nearest step; the default warm-up is a share of the steps.
    trainer = Trainer(parse_args(argv(faces, tmp_path, epochs=2.5, warmup_epochs=0.5, lr_epochs="1,2")))
    args = trainer.args
    assert (args.max_steps, args.warmup_steps, args.lr_steps, args.lr_schedule) == (10, 2, [4, 8], "step")
    assert trainer.describe().splitlines()[3].endswith("10 steps from step 0 (2.5 epochs of 4 steps)")
    args = Trainer(parse_args(argv(faces, tmp_path / "acc", epochs=5, batch_size=8, gradient_acc=4))).args
    assert (args.max_steps, args.warmup_steps, args.lr_steps, args.lr_schedule) == (10, 1, None, "poly")
    # AdaFace's spellings (--epochs 26 --lr_milestones 12,20,24) and arcface_torch's (num_epoch, warmup_epoch).
    args = parse_args(["--num_epoch", "26", "--lr_milestones", "12,20,24", "--warmup_epoch", "1"])
    assert (args.epochs, args.lr_epochs, args.warmup_epochs) == (26, [12, 20, 24], 1)


def test_a_count_is_said_whole_however_large(faces, tmp_path):
    # 4 steps an epoch: --epochs 250000 is a million steps, which the start-up line (and 'done: ...') said as
    # '1e+06 steps' (the trainer's own count, with :g); the one count_of of the tools and the trainer says it whole.
    trainer = Trainer(parse_args(argv(faces, tmp_path, epochs=250000)))
    assert trainer.describe().splitlines()[3].endswith("1000000 steps from step 0 (250000 epochs of 4 steps)")
    assert [count_of(n, "epoch") for n in (1, 1.0, 2.0, 2.5, 10 ** 7)] == [
        "1 epoch", "1 epoch", "2 epochs", "2.5 epochs", "10000000 epochs"]
    assert count_of(2, "test identity", "test identities") == "2 test identities"


def test_a_count_of_one_step_is_said_in_the_singular(faces, tmp_path, capsys):
    # 64 images in steps of 16 x --gradient-acc 4: an epoch of 1 step. The start-up line said '1 steps from
    # step 0', the last 'done: 1 steps', and a resume on other images of the same identities (128: 2 steps an
    # epoch) 'the epochs of 1 steps the run began with'; a resume of the finished run '--epochs 1 (1 steps)'.
    run = tmp_path / "run"
    assert main(argv(faces, run, epochs=1, gradient_acc=4, save_every=0)) == 0
    err = capsys.readouterr().err
    assert "on cpu, 1 step from step 0 (1 epoch of 1 step)\n" in err and "\ndone: 1 step in " in err
    assert main(argv(faces, run, epochs=1, gradient_acc=4, save_every=0, resume="auto")) == 0
    assert "of --epochs 1 (1 step): nothing to train" in capsys.readouterr().err
    more = make_face_folder(str(tmp_path / "more"), images=16)
    assert main(argv((more, None), run, epochs=2, gradient_acc=4, save_every=0, resume="auto")) == 0
    assert ("note: --epochs is counted in the epochs of 1 step the run began with, as the steps it took were, and so "
            "are the progress lines' epochs (this run reads the data in 2 steps)\n") in capsys.readouterr().err


def test_a_run_in_epochs_is_the_run_in_their_steps(faces, tmp_path):
    in_steps, in_epochs = tmp_path / "steps", tmp_path / "epochs"
    assert main(argv(faces, in_steps, max_steps=8, lr_steps="4", warmup_steps=1)) == 0
    assert main(argv(faces, in_epochs, epochs=2, lr_epochs="1", warmup_epochs=0.25)) == 0
    assert losses(in_epochs) == losses(in_steps) and len(losses(in_steps)) == 8
    assert [r["lr"] for r in read_jsonl(in_epochs / "metrics.jsonl")] == [
        r["lr"] for r in read_jsonl(in_steps / "metrics.jsonl")]


def test_the_later_of_a_length_in_steps_and_in_epochs_counts(faces, tmp_path):
    # One setting, two spellings: a config's epochs and a --max-steps on the command line for a short try (and
    # the other way round), as any option given twice; a run's args.json, which holds both, reruns in epochs.
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 20\nlr-epochs: [10, 16]\nwarmup-epochs: 1\n")
    args = parse_args(["--config", str(config), "--max-steps", "5", "--lr-steps", "2", "--warmup-steps", "0"])
    assert (args.epochs, args.max_steps, args.lr_epochs, args.lr_steps, args.warmup_epochs, args.warmup_steps) == (
        None, 5, None, [2], None, 0)
    config.write_text("max-steps: 5\nlr-steps: [2]\nwarmup-steps: 0\n")
    args = parse_args(["--config", str(config), "--epochs", "3", "--lr-epochs", "1.5"])
    assert (args.epochs, args.lr_epochs, args.lr_steps, args.warmup_steps) == (3, [1.5], None, 0)
    args = parse_args("--epochs 3 --max-steps 7".split())
    assert (args.epochs, args.max_steps) == (None, 7)
    assert main(argv(faces, tmp_path / "run", epochs=1.5, lr_epochs="0.5,1", save_every=0)) == 0
    trainer = Trainer(parse_args(["--config", str(tmp_path / "run" / "args.json"), "--output",
                                  str(tmp_path / "again")]))
    assert (trainer.args.epochs, trainer.args.max_steps, trainer.args.lr_steps) == (1.5, 6, [2, 4])


@pytest.mark.parametrize("options, message", [
    (dict(epochs=0.1), "--epochs 0.1 is no step, at 4 steps an epoch: train longer"),
    (dict(epochs=2, lr_epochs="0.1,1"), "--lr-epochs 0.1,1 are steps 0,4 at 4 steps an epoch: the steps must be "
                                        "distinct and at least 1"),
    (dict(epochs=2, lr_epochs="1,1.1"), "--lr-epochs 1,1.1 are steps 4,4 at 4 steps an epoch: the steps must be "
                                        "distinct and at least 1"),
])
def test_lengths_in_epochs_that_come_to_no_step_are_refused(faces, tmp_path, options, message):
    with pytest.raises(SystemExit, match=f"^{re.escape(message)}$"):
        Trainer(parse_args(argv(faces, tmp_path, **options)))


def test_lengths_in_epochs_the_run_would_not_reach_are_said_in_epochs(faces, tmp_path, capsys):
    Trainer(parse_args(argv(faces, tmp_path, epochs=1, lr_epochs="0.5,1,2", warmup_epochs=1.5)))
    err = capsys.readouterr().err
    assert ("note: --warmup-epochs 1.5 (6 steps) is more than --epochs 1 (4 steps): the learning rate rises to 67% "
            "of --lr 0.1, no further") in err.splitlines()
    assert ("note: --lr-epochs 1,2 (steps 4,8) are not before --epochs 1 (4 steps): the learning rate is not divided "
            "there") in err.splitlines()
    # One step: the singular (with 4 images in steps of 4, one step an epoch).
    notes = unused_options(argparse.Namespace(**{**vars(parse_args([])), "epochs": 1.0, "max_steps": 1,
                                                 "lr_schedule": "step", "lr_epochs": [2.0], "lr_steps": [2],
                                                 "warmup_epochs": 3.0, "warmup_steps": 3}))
    assert notes == ["--warmup-epochs 3 (3 steps) is more than --epochs 1 (1 step): the learning rate rises to 33% of "
                     "--lr 0.1, no further",
                     "--lr-epochs 2 (step 2) is not before --epochs 1 (1 step): the learning rate is not divided there"]


def test_a_run_in_epochs_resumes_and_compares_its_schedule_in_epochs(faces, tmp_path):
    from train.trainer import options_changed_on_resume

    assert main(argv(faces, tmp_path, epochs=1, lr_epochs="1.5", save_every=0)) == 0
    with pytest.raises(SystemExit, match=r"--lr-epochs 1\.5 in the checkpoint, 1\.25 requested"):
        Trainer(parse_args(argv(faces, tmp_path, epochs=2, lr_epochs="1.25", resume="auto")))
    trainer = Trainer(parse_args(argv(faces, tmp_path, epochs=2, lr_epochs="1.5", resume="auto")))
    assert (trainer.step, trainer.args.max_steps, trainer.args.lr_steps) == (4, 8, [6])
    # Given in steps now, the same steps: the same run (and the other way round).
    trainer = Trainer(parse_args(argv(faces, tmp_path, max_steps=8, lr_steps="6", resume="auto")))
    assert trainer.args.lr_steps == [6]
    with pytest.raises(SystemExit, match=r"--lr-steps 6 in the checkpoint, 5 requested"):
        Trainer(parse_args(argv(faces, tmp_path, max_steps=8, lr_steps="5", resume="auto")))
    # Where the epochs' steps moved (other images of the same identities: another epoch), the same epochs are
    # the same run.
    saved = checkpoint.load(str(tmp_path / "checkpoint.pt"))["args"]
    resumed = argparse.Namespace(**{**saved, "lr_steps": [3], "warmup_steps": 0, "max_steps": 4})
    assert options_changed_on_resume(saved, resumed) == []
    resumed.lr_epochs = [1.0]
    assert options_changed_on_resume(saved, resumed) == ["--lr-epochs 1.5 in the checkpoint, 1.0 requested"]


def test_a_folder_of_another_image_size_gets_a_note(faces, tmp_path, capsys):
    # A RecordIO set's property file gave the note; an image folder of 32px crops trained at 48 gave none.
    Trainer(parse_args(argv(faces, tmp_path, max_steps=1, image_size=48)))
    assert f"note: {faces[0]} holds 32x32 (width x height) images (its first image); they are resized to 48x48 " \
           "(--image-size)" in capsys.readouterr().err


def test_resume_refuses_data_whose_labels_are_other_identities(faces, tmp_path, capsys):
    # The checkpoint's class centre k is identity k of its data. A copy elsewhere resumes silently; other
    # images of the same identities with a note; the identities renamed into another order (each label then
    # another person's centre: a trial's loss went from 0.2 to 86 at the resumed step) or others are refused.
    data, _ = faces
    run = tmp_path / "run"
    assert main(argv(faces, run, max_steps=2)) == 0
    moved, fewer, reordered = tmp_path / "moved", tmp_path / "fewer", tmp_path / "reordered"
    shutil.copytree(data, moved)
    shutil.copytree(data, fewer)
    os.remove(sorted((fewer / sorted(os.listdir(fewer))[0]).iterdir())[0])
    shutil.copytree(data, reordered)
    first = sorted(os.listdir(reordered))[0]
    os.rename(reordered / first, reordered / f"zz_{first}")  # now the last identity, label 7, not 0
    capsys.readouterr()
    trainer = Trainer(parse_args(base_argv(str(moved), str(run), loss_impl=LOSS_IMPL, max_steps=4, resume="auto")))
    assert trainer.step == 2 and "note:" not in capsys.readouterr().err
    trainer = Trainer(parse_args(base_argv(str(fewer), str(run), loss_impl=LOSS_IMPL, max_steps=4, resume="auto")))
    assert trainer.step == 2
    assert f"note: --data {fewer} holds other images than the data" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--data .*reordered is not the data that run trained on .*another "
                                         r"person's class centre.*--pretrained_model"):
        Trainer(parse_args(base_argv(str(reordered), str(run), loss_impl=LOSS_IMPL, max_steps=4, resume="auto")))


def write_list_of(folder, list_path, labels) -> None:
    """A list file naming ``folder``'s images in its ImageFolder order (relative to the list), identity k
    labelled ``labels[k]``."""
    lines = []
    for k, identity in enumerate(sorted(os.listdir(folder))):
        for name in sorted(os.listdir(os.path.join(folder, identity))):
            path = os.path.relpath(os.path.join(folder, identity, name), os.path.dirname(list_path))
            lines.append(f"{path} {labels[k]}\n")
    with open(list_path, "w") as f:
        f.writelines(lines)


def test_a_list_file_trains_bit_for_bit_as_the_image_folder_of_its_images(faces, tmp_path, capsys):
    # Its images in the folder's order, the labels (not 0..C-1) in the order of its identities: the same
    # samples, batches, losses and weights.
    data, _ = faces
    write_list_of(data, str(tmp_path / "train.lst"), labels=[100 + 7 * k for k in range(8)])
    assert main(argv(faces, tmp_path / "folder", max_steps=4, keep_prob=0.8)) == 0
    assert main(base_argv(str(tmp_path / "train.lst"), str(tmp_path / "list"), loss_impl=LOSS_IMPL, max_steps=4,
                          keep_prob=0.8)) == 0
    err = capsys.readouterr().err
    assert f"note: {tmp_path / 'train.lst'}: the list's 8 labels (100 to 149) are classes 0 to 7 in ascending " \
           "order: class k is the list's k-th smallest label" in err and "listed" not in err
    assert losses(tmp_path / "list") == losses(tmp_path / "folder")
    # An image listed again under another label: said at the start (it trained one face as two people, silently).
    lines = open(tmp_path / "train.lst").read().splitlines()
    with open(tmp_path / "twice.lst", "w") as f:
        f.write("\n".join(lines + [lines[0].rsplit(" ", 1)[0] + " 107"]) + "\n")
    Trainer(parse_args(base_argv(str(tmp_path / "twice.lst"), str(tmp_path / "twice"), loss_impl=LOSS_IMPL)))
    twice = os.path.normpath(tmp_path / lines[0].rsplit(" ", 1)[0])  # (the list names it ../faces/...)
    assert f"warning: {tmp_path / 'twice.lst'}: {twice} is listed 2 times, so drawn " \
           "as often, under labels 100 and 107: one face taught as different people" in capsys.readouterr().err
    a = checkpoint.load(str(tmp_path / "folder" / "checkpoint.pt"))
    b = checkpoint.load(str(tmp_path / "list" / "checkpoint.pt"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["margin_loss"]["weight"], b["margin_loss"]["weight"])


def test_a_run_on_a_list_file_resumes_exactly_and_checks_its_labels(faces, tmp_path, monkeypatch, capsys):
    data, _ = faces
    listed = str(tmp_path / "train.txt")
    write_list_of(data, listed, labels=list(range(8)))
    options = dict(loss_impl=LOSS_IMPL, max_steps=6, save_every=2, keep_prob=0.8)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert main(base_argv(listed, full, **options)) == 0
    run_killed_at(3, base_argv(listed, killed, **options), monkeypatch)
    assert main(base_argv(listed, killed, resume="auto", **options)) == 0
    assert losses(killed) == losses(full)
    assert torch.equal(checkpoint.load(os.path.join(full, "checkpoint.pt"))["margin_loss"]["weight"],
                       checkpoint.load(os.path.join(killed, "checkpoint.pt"))["margin_loss"]["weight"])
    # The checkpoint's class centre k is the list's k-th smallest label: the same lines in another order are
    # other images of the same identities (a note); other labels are other identities (refused).
    with open(listed) as f:
        lines = f.readlines()
    shuffled, relabelled = str(tmp_path / "shuffled.txt"), str(tmp_path / "relabelled.txt")
    with open(shuffled, "w") as f:
        f.writelines(lines[1:] + lines[:1])
    write_list_of(data, relabelled, labels=[1 + k for k in range(8)])
    capsys.readouterr()
    trainer = Trainer(parse_args(base_argv(shuffled, killed, **{**options, "max_steps": 8, "resume": "auto"})))
    assert trainer.step == 6
    assert f"note: --data {shuffled} holds other images than the data" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--data .*relabelled\.txt is not the data that run trained on"):
        Trainer(parse_args(base_argv(relabelled, killed, **{**options, "max_steps": 8, "resume": "auto"})))


def test_a_list_file_that_does_not_read_is_a_one_line_error(faces, tmp_path):
    data, _ = faces
    (tmp_path / "train.lst").write_text(f"{data}/id_000/00.png 0\n{data}/id_000/01.png zero\n")
    with pytest.raises(SystemExit) as stop:
        main(base_argv(str(tmp_path / "train.lst"), str(tmp_path / "run"), loss_impl=LOSS_IMPL))
    assert str(stop.value.code) == (f"train: error: {tmp_path / 'train.lst'}: line 2: label 'zero' is not an "
                                    "identity: expected an integer >= 0")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(faces, tmp_path, monkeypatch, capsys):
    original_forward = arcface_ext.CombinedMarginLoss.forward
    calls = {"n": 0}

    def nan_on_call_7(self, embeddings, labels, return_target_cosine=False):
        calls["n"] += 1
        loss, cosine = original_forward(self, embeddings, labels, return_target_cosine=True)
        if calls["n"] == 7:
            loss = loss * float("nan")
        return (loss, cosine) if return_target_cosine else loss

    monkeypatch.setattr(arcface_ext.CombinedMarginLoss, "forward", nan_on_call_7)
    assert main(argv(faces, tmp_path, max_steps=12, save_every=4)) == 1
    err = capsys.readouterr().err
    assert "\ntrain: error: training diverged: the loss is nan at step 7" in err
    assert "last good checkpoint is kept" in err and "(step 4)" in err
    line = err[err.index("train: error: training diverged"):]  # (one line, the causes on it: a log's grep finds them)
    assert line.endswith(" Usual causes: a learning rate too high for the batch size (lower --lr or add "
                         "--warmup-steps), fp16 overflow (--amp bf16 or none), or a too large margin/scale for the "
                         "data (--arcface_m, --arcface_s).\n") and line.count("\n") == 1, line
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")) == 6


def test_non_finite_weights_are_never_saved(faces, tmp_path):
    trainer = Trainer(parse_args(argv(faces, tmp_path)))
    trainer._started = time.perf_counter()
    trainer.save()
    with torch.no_grad():
        trainer.backbone.fc.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="weights are not finite"):
        trainer.save()
    assert checkpoint.all_finite(Trainer(parse_args(argv(faces, tmp_path, resume="auto"))).backbone)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads the kernel's peak-RSS counter (Linux)")
@pytest.mark.slow
def test_the_finite_check_before_a_save_makes_no_copy_of_the_centres():
    # torch.isfinite of a whole fp32 tensor made temporaries of 1.75 times its size: at a million 512-D
    # class centres, 3.4 GB, the trainer's peak. In a child with glibc's mmap threshold low, so that the
    # resident set follows what is allocated (see benchmarks/bench_loss.py).
    code = (
        "import torch\n"
        "from train import checkpoint\n"
        "def mb(key): return int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]) // 1024\n"
        "module = torch.nn.Linear(512, 125_000, bias=False)  # 256 MB of fp32\n"
        "before = mb('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "assert checkpoint.all_finite(module)\n"
        "print(mb('VmHWM') - before)\n")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024), OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    extra = int(child.stdout.split()[-1])
    assert extra < 64, f"all_finite of 256 MB of weights took {extra} MB more"
    with torch.no_grad():
        module = torch.nn.Linear(4, 3 * (1 << 22) // 4 + 5)  # the last slice short, the bias a slice of its own
        assert checkpoint.all_finite(module)
        module.weight[-1, -1] = float("nan")
        assert not checkpoint.all_finite(module)
        module.weight[-1, -1] = 0.0
        module.bias[0] = -float("inf")
        assert not checkpoint.all_finite(module)


def test_the_trainer_steps_with_arcface_ext_optim():
    # SGD and AdamW without torch's parameter-sized temporaries (tests/test_optim.py checks them).
    for optimizer, cls in (("sgd", arcface_ext.optim.SGD), ("adamw", arcface_ext.optim.AdamW)):
        args = argparse.Namespace(optimizer=optimizer, lr=0.1, momentum=0.9, decay=5e-4)
        assert type(build_optimizer(args, torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))) is cls


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(faces, tmp_path):
    # As a cluster scheduler does: SIGTERM to the whole process group, DataLoader worker included.
    command = [sys.executable, "-m", "train", *argv(faces, tmp_path, max_steps=100000, save_every=0, num_workers=1)]
    returncode, err = signal_once_training(command, tmp_path, signal.SIGTERM, cwd=REPO, timeout=60)
    assert returncode == 128 + signal.SIGTERM, err[-2000:]
    assert re.search(r"stopped by SIGTERM at step \d+; checkpoint: .*checkpoint\.pt \(written in \d+\.\d s; continue "
                     r"with --resume auto\)", err), err[-2000:]  # the time, to set a launcher's grace by
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["step"] >= 1
    assert state["step"] == max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl"))


@pytest.mark.slow
def test_an_error_in_training_exits_with_loader_workers(faces, tmp_path):
    # The workers ignore SIGTERM; multiprocessing's exit handler SIGTERMs and joins them, so a
    # process leaving on an error (its traceback holding the loader) hung there until they were
    # stopped explicitly.
    script = ("import sys; from train.trainer import Trainer, main\n"
              "def fail(self, images, labels): raise RuntimeError('injected')\n"
              "Trainer.train_step = fail\n"
              "main(sys.argv[1:])\n")
    command = [sys.executable, "-c", script, *argv(faces, tmp_path, num_workers=2)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "injected" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_a_run_whose_reader_goes_away_trains_on(faces, tmp_path):
    # python -m train ... 2>&1 | head: the first line said after head had its fill ended the run in a BrokenPipeError
    # (its last steps without a checkpoint, and "the run failed at step 9" of 8 in training.log).
    command = [sys.executable, "-m", "train", *argv(faces, tmp_path, num_workers=2)]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as run:
        assert run.stdout.readline().startswith(b"network small: ")
        run.stdout.close()  # (as head does, after its lines)
        assert run.wait(timeout=120) == 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 8
    log = (tmp_path / "training.log").read_text()
    assert "Error" not in log and re.search(r" done: 8 steps in \d+ s; outputs in ", log.splitlines()[-1]), log


@pytest.mark.slow
def test_a_refusal_whose_reader_went_away_exits_1(tmp_path):
    # python -m train --data nope 2>&1 | head -0: the refusal's line, which the interpreter said on its way out,
    # failed there, and the exit status was 120 ("Exception ignored ... BrokenPipeError"), not a refusal's 1.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)  # (the reader gone before the first line)
    try:
        run = subprocess.run([sys.executable, "-m", "train", "--data", str(tmp_path / "nope"), "--output",
                              str(tmp_path / "out")], cwd=REPO, env=env, stdout=write, stderr=write, timeout=120)
    finally:
        os.close(write)
    assert run.returncode == 1 and not (tmp_path / "out").exists()


def test_atomic_writes_get_the_usual_mode_and_clear_killed_temporaries(tmp_path):
    target = tmp_path / "checkpoint.pt"
    killed = [tmp_path / ".checkpoint.pt.k_9xq2ab.tmp", tmp_path / ".checkpoint.pt.0123abcd.tmp"]
    others = [tmp_path / ".checkpoint.pt.bak.0123abcd.tmp", tmp_path / ".args.json.0123abcd.tmp"]
    for path in killed + others:
        path.write_bytes(b"half a checkpoint")
    previous = os.umask(0o027)
    try:
        checkpoint.save_atomic({"step": 1}, str(target))
        with open(tmp_path / "metrics.jsonl", "w"):
            pass
    finally:
        os.umask(previous)
    assert oct(target.stat().st_mode & 0o777) == oct((tmp_path / "metrics.jsonl").stat().st_mode & 0o777) == "0o640"
    assert not any(path.exists() for path in killed) and all(path.exists() for path in others)

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_atomic(str(target), fail)
    assert checkpoint.load(str(target)) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", "metrics.jsonl"] + [p.name for p in others])


def test_files_written_together_are_renamed_together_or_not_at_all(tmp_path):
    # A table and its summary: a failure at the second (a full disk) leaves both as they were and no temporary; a
    # block that ends well renames both, and clears a killed writer's temporary of either, as write_atomic does.
    table, summary = tmp_path / "t.csv", tmp_path / "t.json"
    table.write_text("old table\n")
    summary.write_text("old summary\n")
    killed = tmp_path / ".t.json.0123abcd.tmp"
    killed.write_text("half a summary")

    def fail(f):
        f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        with checkpoint.written_together() as files:
            files.write(str(table), lambda f: f.write("new table\n"), binary=False)
            files.write(str(summary), fail, binary=False)
    assert (table.read_text(), summary.read_text()) == ("old table\n", "old summary\n")
    assert sorted(os.listdir(tmp_path)) == [killed.name, "t.csv", "t.json"]
    with checkpoint.written_together() as files:
        files.write(str(table), lambda f: f.write("new table\n"), binary=False)
        files.write_json(str(summary), {"rows": 1})
        assert (table.read_text(), summary.read_text()) == ("old table\n", "old summary\n")  # (not yet)
    assert (table.read_text(), json.loads(summary.read_text())) == ("new table\n", {"rows": 1})
    assert sorted(os.listdir(tmp_path)) == ["t.csv", "t.json"]


def test_atomic_writes_leave_another_writers_temporary_alone(tmp_path):
    # The trainer's end-of-run figures and a train.plots writing the same figure at once: neither may
    # remove the other's temporary mid-write. A killed writer's (its process gone, or another
    # host's untouched for an hour) is removed.
    target = tmp_path / "loss.png"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = checkpoint._HOST
        writing = [tmp_path / f".loss.png.{host}-{alive.pid}-0123abcd.tmp",
                   tmp_path / ".loss.png.otherhost-12-0123abcd.tmp"]
        killed = [tmp_path / f".loss.png.{host}-{gone.pid}-0123abcd.tmp",
                  tmp_path / ".loss.png.otherhost-13-0123abcd.tmp"]
        for path in writing + killed:
            path.write_bytes(b"half a figure")
        an_hour_ago = time.time() - 3700
        os.utime(killed[1], (an_hour_ago, an_hour_ago))
        checkpoint.write_atomic(str(target), lambda f: f.write(b"figure"))
        assert target.read_bytes() == b"figure"
        assert all(path.exists() for path in writing) and not any(path.exists() for path in killed)
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_says_why(tmp_path):
    # A quota (here the file-size limit, as `ulimit -f` sets it) or a full disk met mid-write: torch.save
    # reports it as "[enforce fail at inline_container.cc:...] unexpected pos 704 vs 598"; the error is the
    # system's own (the trainer's one line quotes it), and the previous checkpoint stays, alone.
    target = tmp_path / "checkpoint.pt"
    script = ("import resource, sys, torch\n"
              "from train import checkpoint\n"
              "checkpoint.save_atomic({'step': 1}, sys.argv[1])\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))\n"
              "try:\n"
              "    checkpoint.save_atomic({'step': 2, 'weight': torch.zeros(1_000_000)}, sys.argv[1])\n"
              "except BaseException as error:\n"
              "    print(type(error).__name__, error)\n")
    result = subprocess.run([sys.executable, "-c", script, str(target)], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "OSError [Errno 27] File too large", result.stdout + result.stderr[-2000:]
    assert checkpoint.load(str(target)) == {"step": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_pretrained_backbone_and_finetuning(faces, tmp_path):
    assert main(argv(faces, tmp_path / "first", max_steps=2)) == 0
    source = checkpoint.load(str(tmp_path / "first" / "checkpoint.pt"))
    pretrained = str(tmp_path / "first" / "checkpoint.pt")

    kept = Trainer(parse_args(argv(faces, tmp_path / "second", pretrained_model=pretrained)))
    fresh = Trainer(parse_args(argv(faces, tmp_path / "third", pretrained_model=pretrained, finetuning=True)))
    for trainer in (kept, fresh):
        assert trainer.step == 0
        for key, value in trainer.backbone.state_dict().items():
            assert torch.equal(value, source["model"][key]), key
    assert torch.equal(kept.margin_loss.weight, source["margin_loss"]["weight"])
    assert not torch.equal(fresh.margin_loss.weight, source["margin_loss"]["weight"])


def test_learning_rate_schedules():
    poly = LearningRateSchedule("poly", max_steps=100, warmup_steps=10)
    assert poly(0) == pytest.approx(0.1) and poly(9) == pytest.approx(1.0)
    assert poly(10) == pytest.approx(1.0) and poly(55) == pytest.approx(0.25) and poly(100) == 0.0
    step = LearningRateSchedule("step", max_steps=100, lr_steps=[30, 60])
    assert [step(s) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = LearningRateSchedule("cosine", max_steps=110, warmup_steps=10)
    assert cosine(0) == pytest.approx(0.1) and cosine(10) == pytest.approx(1.0)
    assert [cosine(s) for s in (35, 60, 85, 110, 120)] == pytest.approx([(2 + 2 ** 0.5) / 4, 0.5, (2 - 2 ** 0.5) / 4,
                                                                          0, 0])
    # Its default warm-up is poly's, 5% of the steps; --lr-steps is step's alone.
    args = parse_args(["--lr-schedule", "cosine", "--max-steps", "200"])
    assert (args.lr_schedule, args.warmup_steps) == ("cosine", 10)
    with pytest.raises(SystemExit, match="--lr-steps goes with --lr-schedule step, but the schedule is cosine"):
        parse_args(["--lr-schedule", "cosine", "--lr-steps", "100"])


def test_flags_aliases_and_config_files(tmp_path):
    seed_names = parse_args(["--max_step", "7", "--batch_size", "9", "--embedding_size", "128", "--keep_prob", "0.6",
                             "--arcface_s", "32", "--arcface_m", "0.4", "--models_base_dir", "out",
                             "--data_set", "synthetic", "--decay", "1e-4"])
    assert (seed_names.max_steps, seed_names.batch_size, seed_names.embedding_size) == (7, 9, 128)
    assert (seed_names.keep_prob, seed_names.arcface_s, seed_names.arcface_m) == (0.6, 32.0, 0.4)
    assert (seed_names.output, seed_names.data, seed_names.decay) == ("out", "synthetic", 1e-4)

    defaults = parse_args([])
    assert (defaults.lr, defaults.momentum, defaults.decay, defaults.arcface_s, defaults.arcface_m) == \
        (0.1, 0.9, 5e-4, 64.0, 0.5)
    assert defaults.network == "small" and defaults.data == "synthetic" and defaults.lr_schedule == "poly"
    assert parse_args(["--lr-steps", "10,20"]).lr_schedule == "step"
    assert parse_args(["--optimizer", "adamw"]).lr == 1e-3

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("network: r50\nmax_step: 1000\nlr-steps: [400, 800]\nchannels-last: true\n"
                         "loss: cosface\nval_targets: [lfw, agedb_30]\n")
    args = parse_args(["--config", str(yaml_file), "--max-steps", "2000"])
    assert (args.network, args.max_steps, args.lr_steps, args.channels_last) == ("r50", 2000, [400, 800], True)
    assert args.loss == "cosface" and args.val_targets == ["lfw", "agedb_30"]

    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"batch-size": 64, "amp": "bf16", "lr": 0.05}))
    args = parse_args(["--config", str(json_file)])
    assert (args.batch_size, args.amp, args.lr) == (64, "bf16", 0.05)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"max_stpe": 3}))
    with pytest.raises(SystemExit, match="unknown key"):
        parse_args(["--config", str(bad)])


@pytest.mark.parametrize("extra, message", [(["--loss-impl", "reference"], "needs --loss-impl fused"),
                                            (["--loss-amp", "fp16"], "use --loss-amp bf16")])
def test_sharded_classes_options_that_do_not_go_together(extra, message):
    assert parse_args(["--sharded-classes"]).sharded_classes
    assert parse_args(["--model-parallel", "--loss-amp", "bf16"]).sharded_classes
    with pytest.raises(SystemExit, match=message):
        parse_args(["--sharded-classes", *extra])


@pytest.mark.skipif(not arcface_ext.extension_available(), reason="--sharded-classes needs the compiled op")
def test_single_process_sharded_classes_trains(faces, tmp_path):
    # One process holds the one shard: the same run as the replicated loss's, from a checkpoint
    # that either can resume.
    assert main(argv(faces, tmp_path / "sharded", max_steps=3, sharded_classes=True)) == 0
    state = checkpoint.load(str(tmp_path / "sharded" / "checkpoint.pt"))
    assert state["margin_loss"]["weight"].shape == (state["num_classes"], 64)
    assert main(argv(faces, tmp_path / "sharded", max_steps=4, resume="auto")) == 0  # resumed unsharded
    assert len(losses(tmp_path / "sharded")) == 4


@pytest.fixture(scope="module")
def many_faces(tmp_path_factory):
    """40 identities of 2 images: a batch of 16 holds at most 16 of them, so a sample rate of 0.25
    (10 classes, raised to 16) leaves classes out of every step's softmax."""
    return make_face_folder(str(tmp_path_factory.mktemp("many_faces") / "train"), identities=40, images=2), None


@pytest.mark.skipif(not arcface_ext.extension_available(), reason="the sampled sharded loss needs the compiled op")
@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_sampled_classes_train_and_resume_exactly(many_faces, tmp_path, monkeypatch, sharded):
    options = dict(max_steps=6, save_every=3, sample_rate=0.25, sharded_classes=sharded)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(many_faces, full, **options)) == 0
    assert json.loads((full / "args.json").read_text())["sample_rate"] == 0.25
    curve = losses(full)
    assert len(curve) == 6 and all(math.isfinite(v) for v in curve)

    def sampled_16_of_40(trainer):  # a sample of the 40 classes at every step
        assert len(trainer.margin_loss.last_sampled_classes) == 16

    run_killed_at(4, argv(many_faces, killed, **options), monkeypatch, check=sampled_16_of_40)
    # The sample is drawn from the generator the checkpoint restores: the same classes again.
    assert main(argv(many_faces, killed, resume="auto", **options)) == 0
    assert losses(killed) == curve
    a = checkpoint.load(str(full / "checkpoint.pt"))["margin_loss"]["weight"]
    assert torch.equal(a, checkpoint.load(str(killed / "checkpoint.pt"))["margin_loss"]["weight"])


@pytest.mark.parametrize("rate", ["0", "1.5", "-0.1"])
def test_sample_rate_is_checked(rate):
    assert parse_args(["--sample_rate", "0.3"]).sample_rate == 0.3
    with pytest.raises(SystemExit, match="--sample-rate must be in"):
        parse_args(["--sample-rate", rate])


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
@pytest.mark.parametrize("loss", ["adaface", "elasticface-arc", "elasticface-cos", "elasticface-cos+", "magface"])
@pytest.mark.slow
def test_per_row_margin_losses_train_and_resume_exactly(faces, tmp_path, monkeypatch, loss, sharded):
    # AdaFace's norm statistics are buffers of the loss (in the checkpoint); ElasticFace draws its
    # margins from the generator the checkpoint restores: a resumed run repeats the whole run.
    if sharded and not arcface_ext.extension_available():
        pytest.skip("--sharded-classes needs the compiled op")
    if sharded and loss == "magface":
        with pytest.raises(SystemExit, match="differentiable margins, which --sharded-classes does not carry"):
            parse_args(["--loss", loss, "--sharded-classes"])
        return
    options = dict(max_steps=4, save_every=2, loss=loss, sharded_classes=sharded)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(faces, full, **options)) == 0
    curve = losses(full)
    assert len(curve) == 4 and all(math.isfinite(v) for v in curve)
    run_killed_at(3, argv(faces, killed, **options), monkeypatch)
    assert main(argv(faces, killed, resume="auto", **options)) == 0
    assert losses(killed) == curve
    state = checkpoint.load(str(full / "checkpoint.pt"))["margin_loss"]
    if loss == "adaface" and not sharded:
        assert set(state) == {"weight", "batch_mean", "batch_std"} and float(state["batch_mean"]) != 20.0


def test_magface_learns_the_embedding_scale_and_resumes_a_run_that_did_not(faces, tmp_path, monkeypatch, capsys):
    # MagFace's network learns its embedding BatchNorm's scale (insightface's iResNet fixes it at 1): its norms,
    # its quality score, spread with it. Other losses keep it fixed.
    assert main(argv(faces, tmp_path / "arc", max_steps=2)) == 0
    state = checkpoint.load(str(tmp_path / "arc" / "checkpoint.pt"))
    assert torch.equal(state["model"]["features.weight"], torch.ones_like(state["model"]["features.weight"]))
    assert state["embedding_scale_learned"] is False
    options = dict(max_steps=4, save_every=2, loss="magface")
    full = tmp_path / "full"
    assert main(argv(faces, full, **options)) == 0
    state = checkpoint.load(str(full / "checkpoint.pt"))
    assert state["embedding_scale_learned"] is True
    assert not torch.equal(state["model"]["features.weight"], torch.ones_like(state["model"]["features.weight"]))
    # A checkpoint of a MagFace run made before: no record, and no optimizer entry for the scale. It resumes with
    # the scale fixed, as it began, and says so.
    monkeypatch.setattr("train.trainer.learn_embedding_scale", lambda model: False)
    assert main(argv(faces, tmp_path / "fixed", max_steps=2, save_every=2, loss="magface")) == 0
    fixed = checkpoint.load(str(tmp_path / "fixed" / "checkpoint.pt"))
    del fixed["embedding_scale_learned"]
    checkpoint.save_atomic(fixed, str(tmp_path / "fixed" / "checkpoint.pt"))
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv(faces, tmp_path / "fixed", resume="auto", **options)) == 0
    assert "began with the embedding BatchNorm's scale fixed at 1" in capsys.readouterr().err
    resumed = checkpoint.load(str(tmp_path / "fixed" / "checkpoint.pt"))
    assert resumed["step"] == 4 and resumed["embedding_scale_learned"] is False
    weight = resumed["model"]["features.weight"]
    assert torch.equal(weight, torch.ones_like(weight))


@pytest.mark.parametrize("options", [dict(loss="curricularface"), dict(interclass_filter=0.2, sample_rate=0.25),
                                     dict(loss="cosface", interclass_filter=0.3),
                                     dict(interclass_filter=0.2, sample_rate=0.25, sharded_classes=True),
                                     dict(loss="curricularface", sample_rate=0.25, sharded_classes=True),
                                     dict(loss="curricularface", loss_amp="bf16"),
                                     dict(subcenters=3, interclass_filter=0.3, loss_amp="fp16"),
                                     dict(interclass_filter=0.2, sharded_classes=True, loss_amp="bf16"),
                                     dict(subcenters=3, sample_rate=0.25),
                                     dict(subcenters=2, sharded_classes=True, sample_rate=0.25, interclass_filter=0.3)],
                         ids=["curricularface", "filter-sampled", "filter-cosface", "filter-sampled-sharded",
                              "curricularface-sampled-sharded", "curricularface-bf16", "subcenters-filter-fp16",
                              "filter-sharded-bf16", "subcenters-sampled", "subcenters-sampled-sharded-filter"])
@pytest.mark.slow
def test_chunked_path_losses_train_and_resume_exactly(many_faces, tmp_path, monkeypatch, capsys, options):
    # CurricularFace's t is a buffer of the loss (in the checkpoint); the filtering needs none.
    options = dict(max_steps=4, save_every=2, **options)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(many_faces, full, **options)) == 0
    err = capsys.readouterr().err
    if LOSS_IMPL == "reference":
        assert "(reference: PyTorch on the whole matrix, fp32)" in err
    elif "loss_amp" in options:  # (the products' operands rounded to 16 bits, the rest fp32)
        assert f"(chunked PyTorch path, fp32, its matrix products on {options['loss_amp']} operands" in err
    else:
        assert "(chunked PyTorch path, fp32)" in err
    curve = losses(full)
    assert len(curve) == 4 and all(math.isfinite(v) for v in curve)
    run_killed_at(3, argv(many_faces, killed, **options), monkeypatch)
    assert main(argv(many_faces, killed, resume="auto", **options)) == 0
    assert losses(killed) == curve
    state = checkpoint.load(str(full / "checkpoint.pt"))["margin_loss"]
    if options.get("loss") == "curricularface" and options.get("sharded_classes"):
        assert 0 < abs(float(state["t"])) < 0.05
    elif options.get("loss") == "curricularface":
        assert set(state) == {"weight", "t"} and 0 < abs(float(state["t"])) < 0.05
        # A pretrained checkpoint of another loss: its centres load, t starts at 0 (and the reverse).
        other = tmp_path / "other"
        assert main(argv(many_faces, other, max_steps=1, pretrained_model=str(full / "checkpoint.pt"))) == 0
        assert "backbone and class centres" in capsys.readouterr().err
        assert main(argv(many_faces, tmp_path / "back", max_steps=1, loss="curricularface",
                         pretrained_model=str(other / "checkpoint.pt"))) == 0
    else:
        assert set(state) == {"weight"}
    k = options.get("subcenters", 1)
    # The whole matrix in insightface's layout (class c's sub-centres rows c·k … c·k + k − 1), also
    # from sharded centres, which resume on replicated ones.
    assert state["weight"].shape[0] == checkpoint.load(str(full / "checkpoint.pt"))["num_classes"] * k
    if k > 1 and options.get("sharded_classes"):
        assert main(argv(many_faces, killed, resume="auto", **dict(options, sharded_classes=False, max_steps=5))) == 0
        assert len(losses(killed)) == 5


@pytest.mark.parametrize("extra, message", [
    (["--interclass-filter", "0.4", "--loss", "adaface"], "--interclass-filter 0.4 does not go with --loss adaface"),
    (["--loss", "curricularface", "--subcenters", "3"], "--subcenters 3 does not go with --loss curricularface"),
    (["--interclass-filter", "1.5"], r"--interclass-filter must be in \[0, 1\]"),
    (["--loss", "curricularface", "--m2", "0.3"], "--m2 does not apply to --loss curricularface, whose margin is "
                                                   "--arcface-m"),
    (["--subcenters", "2", "--loss", "magface"], r"--subcenters 2 does not go with --loss magface: it runs on the "
                                                 r"chunked PyTorch path, with arcface, cosface, sphereface or "
                                                 r"combined$"),
])
def test_chunked_path_options_that_do_not_go_together(extra, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(extra)


@pytest.mark.parametrize("options, said", [
    ("", "fused"), ("--loss-impl reference", "reference, fp32"),
    ("--loss-amp bf16", "fused, under --loss-amp bf16 autocast"),
    ("--loss adaface --loss-impl reference --loss-amp fp16", "reference, fp32 (--loss-amp fp16 is the fused op's, "
                                                             "not applied)"),
    ("--loss curricularface --loss-impl reference --loss-amp bf16", "reference: PyTorch on the whole matrix, fp32 "
                                                                    "(--loss-amp bf16 is the fused op's, not applied)"),
    ("--loss curricularface --loss-amp bf16", "chunked PyTorch path, fp32, its matrix products on bf16 operands "
                                              "(--loss-amp)"),
])
def test_the_log_names_what_computes_the_loss(options, said):
    # A run with --loss-amp logged "(fused)" as one without did (the network's line gives --amp alone).
    from train.trainer import loss_implementation

    assert loss_implementation(parse_args(options.split())) == said


def test_the_reference_stays_fp32_under_loss_amp(faces, tmp_path):
    # Under --loss-amp's autocast the plain reference computed its product, and so the whole loss, in
    # bf16 (47.25 where fp32 gives 47.2286): the README promises an fp32 loss, and the reference is the
    # ground truth the fused op is held to.
    assert main(argv(faces, tmp_path / "a", max_steps=3, loss_impl="reference")) == 0
    assert main(argv(faces, tmp_path / "b", max_steps=3, loss_impl="reference", loss_amp="bf16")) == 0
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_margins_per_loss():
    from train.config import margins

    assert margins(parse_args([])) == (1.0, 0.5, 0.0)
    assert margins(parse_args(["--loss", "cosface"])) == (1.0, 0.0, 0.35)
    assert margins(parse_args(["--loss", "sphereface"])) == (4.0, 0.0, 0.0)
    assert margins(parse_args(["--loss", "combined", "--m1", "1.0", "--m2", "0.3", "--m3", "0.2"])) == (1.0, 0.3, 0.2)
    assert margins(parse_args(["--loss", "elasticface-arc"])) == (1.0, 0.5, 0.0)
    assert margins(parse_args(["--loss", "elasticface-cos"])) == (1.0, 0.0, 0.35)
    assert margins(parse_args(["--loss", "elasticface-arc+", "--arcface-m", "0.45"])) == (1.0, 0.45, 0.0)
    assert margins(parse_args(["--loss", "elasticface-cos+"])) == (1.0, 0.0, 0.35)
    for loss, kind in (("elasticface-arc+", "arc"), ("elasticface-cos+", "cos"), ("elasticface-arc", "arc")):
        module = build_margin_loss(parse_args(["--loss", loss, "--elastic-std", "0.1"]), 10)
        assert (type(module), module.kind, module.plus, module.std) == (
            arcface_ext.ElasticFaceLoss, kind, loss.endswith("+"), 0.1)
    assert margins(parse_args(["--loss", "curricularface", "--arcface-m", "0.4"])) == (1.0, 0.4, 0.0)


@pytest.mark.parametrize("loss, other, std", [("arcface", "elasticface-arc+", 0.0175),
                                               ("elasticface-arc+", "arcface", 0.05),
                                               ("elasticface-cos+", "elasticface-cos", 0.05),
                                               ("elasticface-cos+", "elasticface-cos+", 0.02)])
def test_a_runs_args_json_leaves_elastic_std_to_another_loss(tmp_path, loss, other, std):
    # args.json records the std its loss took by default (0.05 for every loss but the two +): given as a
    # --config with another --loss, that one's default applies, not the run's (nor a refusal of it).
    path = tmp_path / "args.json"
    path.write_text(json.dumps(vars(parse_args(["--loss", loss]))))
    assert parse_args(["--config", str(path), "--loss", other]).elastic_std == std
    path.write_text(json.dumps(vars(parse_args(["--loss", "elasticface-arc", "--elastic-std", "0.1"]))))
    assert parse_args(["--config", str(path), "--loss", "elasticface-arc+"]).elastic_std == 0.1


@pytest.mark.parametrize("loss", ["arcface", "combined", "adaface", "elasticface-arc"])
def test_margin_grad_reaches_the_loss(loss):
    # arcface_torch's gradient (straight through the angular margin) against the exact one: the same
    # loss, other embedding gradients.
    torch.manual_seed(0)
    x, y = torch.randn(6, 16), torch.randint(0, 10, (6,))
    grads, values = {}, {}
    for grad in ("exact", "straight_through"):
        args = parse_args(["--loss", loss, "--margin-grad", grad, "--embedding-size", "16"])
        module = build_margin_loss(args, 10)
        assert module.margin_grad == grad
        torch.manual_seed(1)
        module.reset_parameters()
        x_ = x.clone().requires_grad_()
        values[grad] = module(x_, y)
        values[grad].backward()
        grads[grad] = x_.grad
    torch.testing.assert_close(values["exact"], values["straight_through"])
    assert not torch.allclose(grads["exact"], grads["straight_through"], rtol=1e-3)
    with pytest.raises(SystemExit, match="does not go with --loss magface"):
        parse_args(["--loss", "magface", "--margin-grad", "straight_through"])


@pytest.mark.parametrize("options", [
    {"amp": "bf16", "gradient_checkpointing": True, "loss_impl": "reference"},
    {"amp": "fp16", "channels_last": True, "optimizer": "adamw", "lr_steps": "1", "loss": "cosface"},
    {"amp": "none", "loss_amp": "bf16"},
])
def test_memory_and_precision_options_train(faces, tmp_path, options):
    assert main(argv(faces, tmp_path, max_steps=2, **options)) == 0
    assert all(math.isfinite(v) for v in losses(tmp_path))
    state = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert state["args"]["amp"] == options["amp"]
    assert state["args"]["loss_amp"] == options.get("loss_amp", "none")
    assert state["scaler"]["scale"] > 0 if options["amp"] == "fp16" else state["scaler"] == {}
    if options["amp"] == "fp16":
        assert state["scaler"]["growth_interval"] == 100  # arcface_torch's


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "train", "configs"))))
def test_shipped_configs_parse(name):
    args = parse_args(["--config", os.path.join(REPO, "train", "configs", name), "--data", "/data/faces_emore"])
    assert args.network in NETWORKS and args.image_size == 112 and args.epochs >= 20
    # In epochs; on 8 GPUs, the steps arcface_torch counts (num_image // global batch * num_epoch), which the
    # files gave before (MS1MV2 5,822,653 images, Glint360K 17,091,657, WebFace42M 42,474,557).
    images = {85742: 5822653, 360232: 17091657, 2059906: 42474557}[args.num_classes]
    per_epoch = images // (args.batch_size * 8 * args.gradient_acc)
    assert per_epoch == math.ceil(images / 8) // (args.batch_size * args.gradient_acc)  # the trainer's sampler's
    steps_from_epochs(args, per_epoch)
    assert args.max_steps == per_epoch * args.epochs
    assert (args.max_steps, args.warmup_steps, args.lr_steps) == {
        "glint360k_r100.yaml": (333820, 0, None), "ms1mv2_r100.yaml": (113720, 0, None),
        "ms1mv2_r100_adaface.yaml": (295672, 0, [136464, 227440, 272928]), "ms1mv2_r50.yaml": (113720, 0, None),
        "wf42m_pfc02_r100.yaml": (829580, 0, None), "wf42m_pfc03_vit_t.yaml": (414760, 41476, None)}[name]
    if args.sharded_classes or args.sample_rate < 1:
        assert args.loss_impl == "fused" and args.loss_amp != "fp16"
    assert args.num_classes in (85742, 360232, 2059906)


def test_a_shipped_config_without_data_is_an_error(tmp_path):
    # Not r50 training on 100 synthetic identities: the config's class count is checked.
    with pytest.raises(SystemExit, match=r"^--num-classes is 85742, but synthetic holds 100 identities \(no --data "
                                         r"given\?\)$"):
        Trainer(parse_args(["--config", os.path.join(REPO, "train", "configs", "ms1mv2_r50.yaml"), "--device", "cpu",
                            "--output", str(tmp_path)]))


def test_a_class_count_that_the_data_does_not_hold_says_the_one_it_holds(tmp_path):
    # A config's num-classes on a cleaned set (train.tools.clean keeps fewer classes) says what to give.
    from PIL import Image
    for k in range(3):
        os.makedirs(tmp_path / "faces" / f"id{k}")
        Image.new("RGB", (8, 8)).save(tmp_path / "faces" / f"id{k}" / "0.png")
    with pytest.raises(SystemExit, match=r"^--num-classes is 85742, but .*faces holds 3 identities: give "
                                         r"--num-classes 3 for it$"):
        Trainer(parse_args(["--config", os.path.join(REPO, "train", "configs", "ms1mv2_r50.yaml"), "--device", "cpu",
                            "--data", str(tmp_path / "faces"), "--output", str(tmp_path / "run")]))
    for k in (1, 2):  # (one identity left: "holds 1 identity")
        shutil.rmtree(tmp_path / "faces" / f"id{k}")
    with pytest.raises(SystemExit, match=r"^--num-classes is 85742, but .*faces holds 1 identity: give "
                                         r"--num-classes 1 for it$"):
        Trainer(parse_args(["--config", os.path.join(REPO, "train", "configs", "ms1mv2_r50.yaml"), "--device", "cpu",
                            "--data", str(tmp_path / "faces"), "--output", str(tmp_path / "run")]))


@pytest.mark.parametrize("case", ["no --config", "batch over the data", "batch of 1", "mbf at 72 px",
                                  "missing --val-targets path", "too few pairs", "corrupt --resume",
                                  "backbone as --resume", "corrupt --pretrained_model"])
def test_bad_inputs_are_one_line_errors(faces, tmp_path, case):
    data, pairs = faces
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 cut short")
    few_pairs, folder = tmp_path / "pairs.txt", os.path.dirname(pairs)
    with open(pairs) as f:  # the first 5 pairs, the images named by their absolute paths
        few_pairs.write_text("".join(f"{folder}/{a} {folder}/{b} {same}\n"
                                     for a, b, same in (line.split() for line in f.readlines()[:5])))
    backbone = tmp_path / "backbone.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, backbone)
    options, message = {
        "no --config": ({"config": str(tmp_path / "run.yaml")}, r"--config \S+run\.yaml: no such file"),
        "batch over the data": ({"batch_size": 65}, r"--batch-size 65 is more than the 64 images of .*: lower it"),
        "batch of 1": ({"batch_size": 1}, r"--batch-size 1: the BatchNorm of small's embedding head needs at least 2"),
        "mbf at 72 px": ({"network": "mbf", "image_size": 72}, r"--network mbf --image-size 72: .*multiple of 16"),
        "missing --val-targets path": ({"val_targets": "/nonexistent/lfw.bin"},
                                       r"--val-targets: no verification set at /nonexistent/lfw\.bin$"),
        "too few pairs": ({"val_targets": str(few_pairs)}, r"pairs\.txt: 5 pairs; verification needs at least 10"),
        "corrupt --resume": ({"resume": str(corrupt)}, r"--resume: \S+corrupt\.pt: not a readable checkpoint"),
        "backbone as --resume": ({"resume": str(backbone)},
                                 r"backbone\.pt: not a training checkpoint of this trainer.*--pretrained_model"),
        "corrupt --pretrained_model": ({"pretrained_model": str(corrupt)},
                                       r"--pretrained_model: \S+corrupt\.pt: not a readable checkpoint"),
    }[case]
    with pytest.raises(SystemExit, match=message) as error:
        main(argv(faces, tmp_path / "run", **options))
    assert "\n" not in str(error.value)


def test_config_keys_take_the_no_spelling_of_a_switch(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("no-plots: true\nno-tensorboard: false\nchannels-last: true\nno-compile: true\n")
    args = parse_args(["--config", str(config)])
    assert (args.plots, args.tensorboard, args.channels_last, args.compile) == (False, True, True, False)
    assert parse_args(["--config", str(config), "--plots"]).plots  # the command line still wins


def test_resume_without_a_checkpoint_or_on_data_of_other_identities(faces, tmp_path, capsys):
    # --resume auto in a folder without a checkpoint is a run from scratch, said; a --resume path that is not
    # there, and a checkpoint resumed on data of another number of identities, are one-line refusals.
    run = tmp_path / "run"
    assert main(argv(faces, run, max_steps=2, save_every=2, resume="auto")) == 0
    assert capsys.readouterr().err.startswith(f"note: --resume auto: no checkpoint in {run}, starting from scratch\n")
    assert checkpoint.load(str(run / "checkpoint.pt"))["step"] == 2
    with pytest.raises(SystemExit) as stop:
        main(argv(faces, tmp_path / "other", resume=str(tmp_path / "nowhere.pt")))
    assert stop.value.code == f"train: error: --resume: no checkpoint at {tmp_path / 'nowhere.pt'}"
    fewer = make_face_folder(str(tmp_path / "fewer"), identities=5, images=4)
    with pytest.raises(SystemExit) as stop:
        main(argv((fewer, faces[1]), run, max_steps=4, resume="auto"))
    assert stop.value.code == (f"train: error: {run / 'checkpoint.pt'}: checkpoint has 8 classes, the data has 5; "
                               "resume needs the same data (use --pretrained_model to fine-tune)")
    assert checkpoint.load(str(run / "checkpoint.pt"))["step"] == 2


def test_resume_given_a_run_folder_names_its_checkpoint(faces, tmp_path):
    # `--resume runs/r50`, the run's folder for its checkpoint file: said so, with the two ways to name it
    # (was "no checkpoint at runs/r50", with the checkpoint in it).
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SystemExit) as stop:
        main(argv(faces, tmp_path / "other", resume=str(run)))
    assert stop.value.code == (f"train: error: --resume {run} is a folder, not a checkpoint file, and holds no "
                               "checkpoint.pt: name the checkpoint file of the run to continue")
    (run / "checkpoint_gpu_0.pt").write_bytes(b"")  # (arcface_torch's: its run is continued, from that file)
    with pytest.raises(SystemExit) as stop:
        main(argv(faces, tmp_path / "other", resume=str(run)))
    assert stop.value.code.startswith(f"train: error: --resume: {run / 'checkpoint_gpu_0.pt'}: not a readable "
                                      "checkpoint")
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        main(argv(faces, tmp_path / "other", resume=str(run)))
    assert stop.value.code == (f"train: error: --resume {run} is a folder, not a checkpoint file: --resume "
                               f"{run / 'checkpoint.pt'}, or --resume auto with --output {run}")


def test_a_config_files_unknown_keys_name_the_flag_they_are_a_letter_from(tmp_path):
    # face.evoLVe's NUM_EPOCH, a num_epochs for num_epoch: said with the flag meant (was the list alone); a key
    # that is a number (YAML's `3: 4`) is named too (was a TypeError traceback from sorting it with the others).
    (tmp_path / "run.yaml").write_text("num_epochs: 2\nlr_milestone: 1\nNUM_EPOCH: 3\nfoo: 1\n3: 4\n")
    with pytest.raises(SystemExit) as stop:
        parse_args(["--config", str(tmp_path / "run.yaml")])
    assert stop.value.code == (f"{tmp_path / 'run.yaml'}: unknown key(s) 3, NUM_EPOCH (num_epoch?), foo, lr_milestone "
                               "(lr_milestones?), num_epochs (num_epoch?); keys are the flag names of `python -m train "
                               "--help` (e.g. max-steps or max_step)")


def test_config_files_and_values_that_cannot_be_taken_are_one_line_errors(tmp_path):
    # Each names the file or the flag as --help spells it (--keep-prob was said as --keep_prob); an empty
    # config file is a run of the defaults.
    for name, content, message in [("list.yaml", "- max-steps\n- 10\n", "expected a mapping of flag names to values, "
                                                                       "got list"),
                                   ("switch.yaml", "no-plots: maybe\n", "no-plots must be true or false, got 'maybe'")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(SystemExit) as stop:
            parse_args(["--config", str(tmp_path / name)])
        assert stop.value.code == f"{tmp_path / name}: {message}"
    (tmp_path / "empty.yaml").write_text("")
    assert vars(parse_args(["--config", str(tmp_path / "empty.yaml")])) == {**vars(parse_args([])),
                                                                            "config": str(tmp_path / "empty.yaml")}
    for argv, message in [(["--keep-prob", "0"], "--keep-prob must be in (0, 1], got 0.0"),
                          (["--keep_prob", "1.5"], "--keep-prob must be in (0, 1], got 1.5"),
                          (["--subcenters", "0"], "--subcenters must be at least 1, got 0")]:
        with pytest.raises(SystemExit) as stop:
            parse_args(argv)
        assert stop.value.code == message


def test_unbuilt_extension_is_named(faces, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(arcface_ext, "extension_available", lambda: False)
    with pytest.raises(SystemExit, match="compiled op is not built.*--loss-impl reference"):
        main(argv(faces, tmp_path, loss_impl="fused"))
    # The chunked PyTorch path's losses do not need it (on replicated centres).
    assert main(argv(faces, tmp_path / "curricular", loss_impl="fused", loss="curricularface", max_steps=2)) == 0
    assert "(chunked PyTorch path, fp32)" in capsys.readouterr().err


def test_a_process_without_its_gpu_is_told_so(monkeypatch):
    # Two processes on a one-GPU machine: rank 1's cuda:1 failed inside torch.cuda.set_device
    # with "invalid device ordinal" (seen on the H200). Now it is a message that says what to do.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _resolve_device("auto", 0) == torch.device("cuda", 0)
    assert _resolve_device("cuda", 0) == torch.device("cuda", 0)
    assert _resolve_device("cpu", 1) == torch.device("cpu")
    for spec, rank in (("auto", 1), ("cuda", 1), ("cuda:3", 0)):
        with pytest.raises(SystemExit, match=r"would use cuda:\d, but 1 CUDA device\(s\) are visible"):
            _resolve_device(spec, rank)


def write_arcface_torch_run(folder, backbone_state, centres, world):
    """What arcface_torch's train_v2.py saves with save_all_states: a checkpoint_gpu_<rank>.pt a GPU,
    each with the backbone and that rank's rows of the partial FC (C // W, one more for r < C % W)."""
    os.makedirs(folder, exist_ok=True)
    classes = centres.shape[0]
    start = 0
    for rank in range(world):
        rows = classes // world + int(rank < classes % world)
        torch.save({"epoch": 3, "global_step": 1000, "state_dict_backbone": backbone_state,
                    "state_dict_softmax_fc": {"weight": centres[start:start + rows].clone()},
                    "state_optimizer": {"state": {}, "param_groups": []}, "state_lr_scheduler": {"last_epoch": 1000}},
                   os.path.join(folder, f"checkpoint_gpu_{rank}.pt"))
        start += rows


def test_resume_auto_into_an_arcface_torch_run_takes_its_files(faces, tmp_path):
    """config.resume = True (--resume auto) into the folder of a run arcface_torch trained continues that run
    from its checkpoint_gpu_<rank>.pt (test_arcface_torch_resume.py), not a run from scratch: files that do not
    fit the network are refused, and the folder is left as it was."""
    write_arcface_torch_run(str(tmp_path / "it"), {}, torch.randn(8, 64), world=2)
    before = sorted(os.listdir(tmp_path / "it"))
    with pytest.raises(SystemExit, match=r"^train: error: --resume .*it/checkpoint_gpu_0.pt does not fit --network "
                                         r"small "):
        main(argv(faces, tmp_path / "it", max_steps=1, resume="auto"))
    assert sorted(os.listdir(tmp_path / "it")) == before


def test_pretrained_from_arcface_torchs_checkpoints(faces, tmp_path, capsys):
    """--pretrained_model checkpoint_gpu_0.pt: the backbone, and the class centres put together from
    every rank's file beside it; without all of them, or of another split, the backbone alone."""
    assert main(argv(faces, tmp_path / "a", max_steps=2)) == 0
    trained = checkpoint.load(str(tmp_path / "a" / "checkpoint.pt"))
    backbone_state = trained["model"]
    centres = torch.randn(trained["margin_loss"]["weight"].shape)
    write_arcface_torch_run(str(tmp_path / "it"), backbone_state, centres, world=3)
    capsys.readouterr()
    from train.config import parse_args

    run = Trainer(parse_args(argv(faces, tmp_path / "b", max_steps=1,
                                  pretrained_model=str(tmp_path / "it" / "checkpoint_gpu_1.pt"))))
    assert "initialised the backbone and class centres from" in capsys.readouterr().err
    assert torch.equal(run.margin_loss.weight.detach(), centres)
    assert all(torch.equal(v, backbone_state[k]) for k, v in run.backbone.state_dict().items())

    os.rename(tmp_path / "it" / "checkpoint_gpu_2.pt", tmp_path / "gpu_2.pt")
    run = Trainer(parse_args(argv(faces, tmp_path / "c", max_steps=1,
                                  pretrained_model=str(tmp_path / "it" / "checkpoint_gpu_0.pt"))))
    err = capsys.readouterr().err  # the last rank's file missing: fewer centres than the data's classes
    assert ("checkpoint_gpu_0.pt has 6 x 64 class centres, this run 8 x 64 (8 classes): starting fresh ones (put "
            "together from the checkpoint_gpu_<rank>.pt files beside it: is the last rank's missing?)") in err
    assert "initialised the backbone from" in err and not torch.equal(run.margin_loss.weight.detach(), centres)
    os.rename(tmp_path / "gpu_2.pt", tmp_path / "it" / "checkpoint_gpu_2.pt")
    os.remove(tmp_path / "it" / "checkpoint_gpu_1.pt")
    Trainer(parse_args(argv(faces, tmp_path / "d", max_steps=1,
                            pretrained_model=str(tmp_path / "it" / "checkpoint_gpu_0.pt"))))
    assert "arcface_torch's class centres not taken (no checkpoint_gpu_1.pt beside it)" in capsys.readouterr().err
    # Another run's file among them, a file named otherwise, a shard that is not finite: the backbone alone.
    write_arcface_torch_run(str(tmp_path / "it"), backbone_state, centres, world=3)
    other = torch.load(tmp_path / "it" / "checkpoint_gpu_1.pt")
    torch.save({**other, "global_step": 2000}, tmp_path / "it" / "checkpoint_gpu_1.pt")
    os.makedirs(tmp_path / "one")
    shutil.copy(tmp_path / "it" / "checkpoint_gpu_0.pt", tmp_path / "one" / "model.pt")
    for pretrained, why in ((tmp_path / "it" / "checkpoint_gpu_0.pt", "the files are of different (epoch, step)s"),
                            (tmp_path / "one" / "model.pt", "it is not named checkpoint_gpu_<rank>.pt")):
        Trainer(parse_args(argv(faces, tmp_path / "e", max_steps=1, pretrained_model=str(pretrained))))
        err = capsys.readouterr().err
        assert f"arcface_torch's class centres not taken ({why}" in err and "initialised the backbone from" in err
    torch.save({**other, "state_dict_softmax_fc": {"weight": other["state_dict_softmax_fc"]["weight"] * float("nan")}},
               tmp_path / "it" / "checkpoint_gpu_1.pt")
    Trainer(parse_args(argv(faces, tmp_path / "f", max_steps=1,
                            pretrained_model=str(tmp_path / "it" / "checkpoint_gpu_0.pt"))))
    assert "checkpoint_gpu_1.pt's partial FC weight is not finite floating point" in capsys.readouterr().err
    # And the tools that take a --model take it too.
    from train.checkpoint import load_backbone

    model, settings = load_backbone(str(tmp_path / "it" / "checkpoint_gpu_0.pt"))
    assert settings["network"] == "small" and all(
        torch.equal(v, backbone_state[k]) for k, v in model.state_dict().items())


# ------------------------------------------------- training's health: gradient norms, the fp16 loss scale


def test_metrics_have_the_gradient_norms_and_with_an_fp16_scaler_its_scale(faces, tmp_path):
    # insightface #1437, #1715: arcface_torch's fp16 loss scale fell to 0 unseen. --loss-amp fp16: a scaler on
    # the CPU without fp16 convolutions' slowness.
    assert main(argv(faces, tmp_path / "fp16", max_steps=4, log_every=2, loss_amp="fp16")) == 0
    records = read_jsonl(tmp_path / "fp16" / "metrics.jsonl")
    assert all({"loss_scale", "skipped_steps", "grad_norm", "centres_grad_norm"} <= set(r) for r in records)
    # torch's scale starts at 65536 and halves at each skipped step: the lines' counts add up to its fall.
    assert records[-1]["loss_scale"] == 65536 / 2 ** sum(r["skipped_steps"] for r in records)
    assert all(r["grad_norm"] is None or r["grad_norm"] > 0 for r in records)
    assert main(argv(faces, tmp_path / "fp32", max_steps=2, log_every=2, grad_clip=0)) == 0
    record, = read_jsonl(tmp_path / "fp32" / "metrics.jsonl")
    assert "loss_scale" not in record and "skipped_steps" not in record
    assert record["grad_norm"] > 0 and record["centres_grad_norm"] > 0  # (computed without --grad-clip too)


def test_the_gradient_norm_is_clip_grad_norms_before_clipping(faces, tmp_path, monkeypatch):
    returned = []

    def clip(parameters, max_norm, **kwargs):
        returned.append(float(original(parameters, max_norm, **kwargs)))
        return torch.tensor(returned[-1])

    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert main(argv(faces, tmp_path, max_steps=2, log_every=1, grad_clip=0.01)) == 0
    assert [r["grad_norm"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == pytest.approx(returned)
    assert min(returned) > 0.01  # (clipped to 0.01 after)


def with_a_small_loss_scale(monkeypatch, scale):
    """The trainer's scaler starting at ``scale``: no overflow of its own on these small gradients."""
    class GradScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, init_scale=scale, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", GradScaler)


def inf_gradients_from_step(monkeypatch, first, last=None):
    """An overflow in steps ``first`` to ``last``: an inf in a backbone gradient before the scaler checks them."""
    original = torch.amp.GradScaler.unscale_
    calls = {"n": 0}

    def unscale_(self, optimizer):
        calls["n"] += 1
        if first <= calls["n"] <= (last or math.inf):
            optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = float("inf")
        return original(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", unscale_)


def test_a_step_the_fp16_scaler_skips_is_counted(faces, tmp_path, monkeypatch, capsys):
    with_a_small_loss_scale(monkeypatch, 1.0)
    inf_gradients_from_step(monkeypatch, 3, 3)
    assert main(argv(faces, tmp_path, max_steps=4, log_every=2, loss_amp="fp16")) == 0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["skipped_steps"], r["loss_scale"]) for r in records] == [(2, 0, 1.0), (4, 1, 0.5)]
    assert "] loss " in capsys.readouterr().err
    lines = (tmp_path / "training.log").read_text()
    assert re.search(r"\[step 2/4\] loss [\d.]+, lr [\d.e-]+, loss scale 1 \(0 skipped\), ", lines), lines
    assert re.search(r"\[step 4/4\] loss [\d.]+, lr [\d.e-]+, loss scale 0.5 \(1 skipped\), ", lines), lines


def test_the_progress_bar_shows_the_fp16_loss_scale(faces, tmp_path, monkeypatch, capsys):
    # As the lines: the scale after the line's last step and the steps skipped since the last, under fp16 only.
    monkeypatch.setattr("train.trainer._is_terminal", lambda stream: True, raising=False)
    with_a_small_loss_scale(monkeypatch, 1.0)
    inf_gradients_from_step(monkeypatch, 3, 3)
    assert main(argv(faces, tmp_path / "fp16", max_steps=4, log_every=2, loss_amp="fp16")) == 0
    err = capsys.readouterr().err
    assert sorted(set(zip(shown_on_the_bar(err, "loss_scale"), shown_on_the_bar(err, "skipped")))) == [
        ("0.5", "1"), ("1", "0")], err
    assert main(argv(faces, tmp_path / "fp32", max_steps=2, log_every=2)) == 0
    err = capsys.readouterr().err
    assert "lr=" in err and not shown_on_the_bar(err, "loss_scale") and not shown_on_the_bar(err, "skipped"), err


def test_the_progress_bar_keeps_its_fields_first_and_adds_the_options_after(faces, tmp_path, monkeypatch, capsys):
    # A terminal's width cuts the bar's end: the fields it always had keep their place (tqdm's sorted order), and
    # those an option adds (the centres' rate, the fp16 scale) come after them, in the lines' order. They came sorted
    # in among them: on an 80-column terminal the scale's name took lr's place.
    monkeypatch.setattr("train.trainer._is_terminal", lambda stream: True, raising=False)
    with_a_small_loss_scale(monkeypatch, 1.0)
    args = dict(max_steps=2, log_every=2, loss_amp="fp16", centres_lr_scale=4)
    assert main(argv(faces, tmp_path / "wide", **args)) == 0
    last = capsys.readouterr().err.rsplit("\r", 1)[-1].splitlines()[0]
    assert re.findall(r"\b(\w+)=", last) == ["img_s", "loss", "lr", "centres_lr", "loss_scale", "skipped"], last
    monkeypatch.setattr("tqdm.std._screen_shape_wrapper", lambda: lambda fp: (79, 23))  # (tqdm's, at 80 columns)
    assert main(argv(faces, tmp_path / "narrow", **args)) == 0
    last = capsys.readouterr().err.rsplit("\r", 1)[-1].splitlines()[0]
    assert len(last) <= 79 and re.search(r" img_s=\d+, loss=[\d.]+, lr=", last), last


@pytest.mark.parametrize("columns", [60, 80, 100])
def test_the_progress_bar_leaves_out_the_fields_that_do_not_fit_whole(faces, tmp_path, monkeypatch, capsys, columns):
    # tqdm cut the line at the terminal's width, mid-number: `centres_lr=0.00` of 0.000692 at 100 columns, read as
    # another value. Now a field that does not fit is left out whole, the last first, the loss and lr last of all.
    monkeypatch.setattr("train.trainer._is_terminal", lambda stream: True, raising=False)
    monkeypatch.setattr("tqdm.std._screen_shape_wrapper", lambda: lambda fp: (columns, 23))
    with_a_small_loss_scale(monkeypatch, 1.0)
    assert main(argv(faces, tmp_path, max_steps=2, log_every=1, loss_amp="fp16", centres_lr_scale=4)) == 0
    drawings = [drawing.split("\x1b")[0].rstrip() for drawing in re.split(r"[\r\n]", capsys.readouterr().err)
                if drawing.startswith("train: ")]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    values = {"img_s": {f"{r['samples_per_sec']:.0f}" for r in records}, "loss": {f"{r['loss']:.3f}" for r in records},
              "lr": {f"{r['lr']:.4g}" for r in records}, "centres_lr": {f"{r['centres_lr']:.4g}" for r in records},
              "loss_scale": {f"{r['loss_scale']:g}" for r in records},
              "skipped": {f"{r['skipped_steps']}" for r in records}}
    assert drawings and all(len(drawing) <= columns and drawing.endswith("]") for drawing in drawings), drawings
    for drawing in drawings:
        shown = re.findall(r"\b(\w+)=([^,\]\s]*)", drawing)
        assert all(value in values[name] for name, value in shown), drawing
        names = [name for name, _ in shown]
        ranked = ["loss", "lr", "img_s", "centres_lr", "loss_scale", "skipped"]
        assert sorted(names) == sorted(ranked[:len(names)]), drawing
    assert any("loss=" in drawing for drawing in drawings) or columns < 80, drawings


@pytest.mark.slow
def test_the_progress_bar_is_drawn_for_the_last_time_before_the_final_verification(faces, tmp_path, monkeypatch,
                                                                                   capsys):
    # Its last drawing's elapsed time and pace (tqdm's, over the bar's time) were those of the steps and the final
    # verification's minutes: 5.30 s/step of steps at 1.7 s.
    monkeypatch.setattr("train.trainer._is_terminal", lambda stream: True, raising=False)
    assert main(argv(faces, tmp_path, pairs=True, max_steps=2, log_every=2, eval_every=0)) == 0
    err = capsys.readouterr().err
    last_drawing, final_verification = err.rindex("train: 100%"), err.index("[step 2] pairs: accuracy")
    assert last_drawing < final_verification, err


@pytest.mark.slow
def test_a_resumed_runs_done_line_says_its_time_in_this_process(faces, tmp_path, capsys):
    # Its time is the earlier processes' too (the checkpoint's), which it did not say: 116 s of which this one's 32.
    assert main(argv(faces, tmp_path, max_steps=2)) == 0
    first = re.search(r"\ndone: 2 steps in (\d+) s; outputs in ", capsys.readouterr().err)
    assert first, "a fresh run's line as it was"
    assert main(argv(faces, tmp_path, max_steps=4, resume="auto")) == 0
    err = capsys.readouterr().err
    said = re.search(r"\ndone: 4 steps in (\d+) s \(resumed at step 2: (\d+) s in this process\); outputs in ", err)
    assert said and int(said[1]) >= int(said[2]), err
    assert abs(int(said[1]) - checkpoint.load(str(tmp_path / "checkpoint.pt"))["elapsed"]) <= 1, err  # (saved before)


def test_a_collapsed_fp16_loss_scale_stops_the_run(faces, tmp_path, monkeypatch, capsys):
    # From step 6 on every step overflows: 2^-12 halves to 2^-17, below the floor, at step 10, which step 11's
    # collective carries (no sync of its own). The checkpoint of step 8 (skipped steps leave the weights as they
    # were) is kept.
    with_a_small_loss_scale(monkeypatch, 2.0 ** -12)
    inf_gradients_from_step(monkeypatch, 6)
    assert main(argv(faces, tmp_path, max_steps=12, save_every=4, loss_amp="fp16", grad_clip=0)) == 1
    err = capsys.readouterr().err
    line = err[err.index("train: error: training diverged"):]
    assert line == ("train: error: training diverged: the fp16 loss scale fell to 7.62939e-06 at step 10 (5 steps in "
                    "a row skipped for inf/NaN gradients; the floor is 2^-16, the limit 50 in a row); stopping. The "
                    f"last good checkpoint is kept: {tmp_path / 'checkpoint.pt'} (step 8). Try --loss-amp bf16, a "
                    "lower --lr or --grad-clip 5.\n"), line
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 8
    assert [r["skipped_steps"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0] * 5 + [1] * 5


def test_fp16_steps_skipped_in_a_row_stop_the_run(faces, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("train.trainer.SKIPPED_IN_A_ROW", 3)
    inf_gradients_from_step(monkeypatch, 2, 3)  # (two in a row: the run goes on)
    inf_gradients_from_step(monkeypatch, 5)
    with_a_small_loss_scale(monkeypatch, 1.0)  # (halved at steps 2, 3, 5, 6 and 7)
    assert main(argv(faces, tmp_path, max_steps=12, amp="none", loss_amp="fp16")) == 1
    err = capsys.readouterr().err
    assert ("training diverged: the fp16 loss scale fell to 0.03125 at step 7 (3 steps in a row skipped for inf/NaN "
            "gradients; the floor is 2^-16, the limit 3 in a row); stopping.") in err
    assert err.rstrip().endswith("Try --loss-amp bf16, a lower --lr.")


def test_the_health_metrics_go_to_tensorboard_and_wandb_unless_null(tmp_path):
    logged = []
    run = type("Run", (), {"log": lambda self, scalars: logged.append(scalars)})()
    RunLog(str(tmp_path), 0, tensorboard=False, wandb_run=run).metrics(
        {"step": 3, "loss": 1.0, "lr": 0.1, "grad_norm": None, "centres_grad_norm": 2.0, "loss_scale": 512.0,
         "skipped_steps": 1, "samples_per_sec": 9.0, "time": 1.0})
    assert logged == [{"step": 3, "train/loss": 1.0, "train/lr": 0.1, "train/centres_grad_norm": 2.0,
                       "train/loss_scale": 512.0, "train/skipped_steps": 1, "train/samples_per_sec": 9.0}]


def test_the_fp16_scaler_is_read_on_the_logged_steps_only(faces, tmp_path, monkeypatch):
    # get_scale() waits for the GPU (a sync): once a step it idled the GPU at the next step's start. The skipped
    # steps are counted on the device; the scale is read for the log lines only.
    calls = []
    original = torch.amp.GradScaler.get_scale
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", lambda self: calls.append(1) or original(self))
    assert main(argv(faces, tmp_path, max_steps=6, log_every=3, loss_amp="fp16")) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [3, 6]
    assert len(calls) <= 2 + 1, calls  # (the lines', and the checkpoint's scaler state)


def test_a_collapse_at_the_last_step_stops_the_run_before_its_checkpoint(faces, tmp_path, monkeypatch, capsys):
    # The stop rides on the next step's collective; the last step has none: the checkpoint's save checks it.
    with_a_small_loss_scale(monkeypatch, 2.0 ** -16)
    inf_gradients_from_step(monkeypatch, 4)
    assert main(argv(faces, tmp_path, max_steps=4, save_every=2, loss_amp="fp16", grad_clip=0)) == 1
    err = capsys.readouterr().err
    assert "training diverged: the fp16 loss scale fell to 7.62939e-06 at step 4 (1 step in a row skipped" in err, err
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["step"] == 2


def test_fp16_steps_skipped_in_a_row_are_counted_across_a_resume(faces, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("train.trainer.SKIPPED_IN_A_ROW", 3)
    with_a_small_loss_scale(monkeypatch, 1.0)
    inf_gradients_from_step(monkeypatch, 3, 4)
    assert main(argv(faces, tmp_path, max_steps=4, loss_amp="fp16")) == 0
    assert checkpoint.load(str(tmp_path / "checkpoint.pt"))["skipped_in_a_row"] == 2
    inf_gradients_from_step(monkeypatch, 1, 1)  # (the resumed run's first step: the third in a row)
    assert main(argv(faces, tmp_path, max_steps=8, loss_amp="fp16", resume="auto")) == 1
    assert ("training diverged: the fp16 loss scale fell to 0.125 at step 5 (3 steps in a row skipped for inf/NaN "
            "gradients; the floor is 2^-16, the limit 3 in a row); stopping.") in capsys.readouterr().err


def test_a_collapse_under_both_fp16_autocasts_suggests_bf16_for_both(faces, tmp_path, monkeypatch, capsys):
    # --amp bf16 alone would leave --loss-amp fp16's scaler, and its collapse.
    with_a_small_loss_scale(monkeypatch, 2.0 ** -16)
    inf_gradients_from_step(monkeypatch, 1)
    assert main(argv(faces, tmp_path, max_steps=3, amp="fp16", loss_amp="fp16", grad_clip=0)) == 1
    assert capsys.readouterr().err.rstrip().endswith("Try --amp bf16 --loss-amp bf16, a lower --lr or --grad-clip 5.")


def test_the_gradient_norm_without_torchs_get_total_norm_is_its_value(monkeypatch):
    # torch 2.4-2.5 (the oldest the project supports) have no nn.utils.get_total_norm: the logged grad_norm
    # is then taken from each gradient's norm, the same value (CI O's torch 2.4.1 stage failed every run on it).
    from torch import nn

    from train import trainer as trainer_module
    grads = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 2)]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert torch.allclose(trainer_module.total_norm(grads), expected)
    if hasattr(nn.utils, "get_total_norm"):
        monkeypatch.delattr(nn.utils, "get_total_norm")
    assert torch.allclose(trainer_module.total_norm(grads), expected)
    assert float(trainer_module.total_norm([])) == 0.0
