"""``--wandb``: the trainer's Weights & Biases logging, against a stand-in for the wandb package
(what the trainer asks of it), and against the real one in offline mode when it is installed."""

import glob
import io
import os
import re
import signal
import sys
import types

import numpy as np
import pytest
import torch

from train import checkpoint
from train import trainer as trainer_module
from train.trainer import Trainer, main

from trainer_fixtures import IMAGE_SIZE, LOSS_IMPL, base_argv, faces, one_thread, read_jsonl  # noqa: F401


def argv(faces, output, **overrides):
    data, pairs = faces
    return base_argv(data, str(output), pairs, **{"loss_impl": LOSS_IMPL, "wandb": True, **overrides})


class FakeArtifact:
    """wandb.Artifact as the trainer uses it (0.17.2's signatures): add_file copies the file at once, as the
    real one's default (mutable) policy copies it into W&B's staging folder."""

    def __init__(self, name, type, description=None, metadata=None, incremental=False, use_as=None):
        if not re.match(r"^[a-zA-Z0-9_\-.]+$", name):  # (the real one's check)
            raise ValueError(f"Artifact name may only contain alphanumeric characters, dashes, underscores, and "
                             f"dots. Invalid name: {name}")
        self.name, self.type, self.metadata, self.files = name, type, dict(metadata or {}), {}
        self.cached = {}  # each file's name: whether W&B copies it into its artifact cache after the upload

    def add_file(self, local_path, name=None, is_tmp=False, skip_cache=False, policy="mutable"):
        with open(local_path, "rb") as f:
            self.files[name or os.path.basename(local_path)] = f.read()
        self.cached[name or os.path.basename(local_path)] = not skip_cache
        FakeWandb.staged.append(local_path)


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.id = kwargs.get("id") or f"run{len(FakeWandb.runs)}"
        self.logged, self.metrics, self.finished, self.artifacts = [], [], None, []
        self.disabled = FakeWandb.disabled  # (WANDB_MODE=disabled: wandb.init's run logs nothing)

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, data):
        assert self.finished is None, "logged after finish"
        self.logged.append(dict(data))

    def log_artifact(self, artifact_or_path, name=None, type=None, aliases=None):
        assert self.finished is None, "logged after finish"
        if FakeWandb.artifact_failure:
            raise FakeWandb.artifact_failure
        self.artifacts.append((artifact_or_path, list(aliases or [])))

    def finish(self, exit_code=0):
        self.finished = exit_code


class FakeWandb(types.ModuleType):
    runs: list = []
    artifact_failure: Exception | None = None  # what each log_artifact raises
    disabled = False  # the runs' `disabled`
    staged: list = []  # the files add_file copied (the real one: into W&B's staging folder)
    Artifact = FakeArtifact

    def __init__(self, fail=None):
        super().__init__("wandb")
        self.fail = fail
        FakeWandb.runs, FakeWandb.artifact_failure, FakeWandb.disabled, FakeWandb.staged = [], None, False, []

    def init(self, **kwargs):
        if self.fail:
            raise RuntimeError(self.fail)
        FakeWandb.runs.append(FakeRun(**kwargs))
        return FakeWandb.runs[-1]


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_a_run_logs_its_metrics_and_verification(faces, tmp_path, fake_wandb):
    output = tmp_path / "r1"
    assert main(argv(faces, output, max_steps=4, eval_every=2, wandb_entity="team")) == 0
    [run] = FakeWandb.runs
    init = run.init
    assert (init["project"], init["entity"], init["name"], init["dir"]) == ("arcface-ext", "team", "r1", str(output))
    assert init["id"] is None and init["resume"] is None
    assert init["config"]["max_steps"] == 4 and not any(k.startswith("wandb") for k in init["config"])
    assert ("train/*", "step") in run.metrics and ("verification/*", "step") in run.metrics
    train = [r for r in run.logged if "train/loss" in r]
    assert [(r["step"], r["train/loss"], r["train/lr"]) for r in train] == [
        (r["step"], r["loss"], r["lr"]) for r in read_jsonl(output / "metrics.jsonl")]
    verification = [r for r in run.logged if "verification/pairs" in r]
    assert [(r["step"], r["verification/pairs"], r["verification/pairs_std"]) for r in verification] == [
        (r["step"], r["accuracy"], r["accuracy_std"]) for r in read_jsonl(output / "verification.jsonl")]
    assert [r["step"] for r in verification] == [0, 2, 4]
    assert run.finished == 0
    assert checkpoint.load(str(output / "checkpoint.pt"))["wandb_run_id"] == "run0"


def test_a_resumed_run_continues_its_wandb_run(faces, tmp_path, fake_wandb):
    output = tmp_path / "run"
    assert main(argv(faces, output, max_steps=4, save_every=2, wandb_run_name="mine")) == 0
    # Resumed without --wandb, the run keeps its W&B id for a later resume that logs again.
    assert main(argv(faces, output, max_steps=6, resume="auto", wandb=False)) == 0
    assert len(FakeWandb.runs) == 1
    assert checkpoint.load(str(output / "checkpoint.pt"))["wandb_run_id"] == "run0"
    assert main(argv(faces, output, max_steps=8, resume="auto")) == 0
    first, resumed = FakeWandb.runs[:2]
    assert (resumed.init["id"], resumed.init["resume"], resumed.init["name"]) == ("run0", "allow", "run")
    assert main(argv(faces, output, max_steps=9, resume="auto", wandb_run_name="{output}-b")) == 0
    assert FakeWandb.runs[-1].init["name"] == "run-b"
    assert first.init["name"] == "mine"  # the run name may change on resume; the run stays the same
    assert [r["step"] for r in resumed.logged if "train/loss" in r] == [7, 8]
    # A fresh run in the folder is a new W&B run; wandb/ stays, where W&B keeps each run in its own folder.
    (output / "wandb" / "run-0").mkdir(parents=True)
    assert main(argv(faces, output, max_steps=2)) == 0
    assert FakeWandb.runs[-1].init["id"] is None and (output / "earlier-1" / "checkpoint.pt").is_file()
    assert (output / "wandb" / "run-0").is_dir() and not (output / "earlier-1" / "wandb").exists()


def test_wandb_that_cannot_start_leaves_the_folder_as_it_was(faces, tmp_path, monkeypatch):
    output = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    assert main(argv(faces, output, max_steps=2)) == 0
    before = sorted(os.listdir(output))
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail="project name a/b is invalid"))
    for extra in ({}, {"resume": "auto", "max_steps": 4}):
        with pytest.raises(SystemExit, match="project name a/b is invalid"):
            main(argv(faces, output, **extra))
        assert sorted(os.listdir(output)) == before  # no earlier-1/: the run is where --resume auto finds it


def test_the_exit_code_reaches_wandb(faces, tmp_path, fake_wandb, monkeypatch):
    from train.config import parse_args

    trainer = Trainer(parse_args(argv(faces, tmp_path, max_steps=2)))
    monkeypatch.setattr(trainer, "_fit", lambda: 143)  # stopped by SIGTERM
    assert trainer.fit() == 143 and FakeWandb.runs[-1].finished == 143
    trainer = Trainer(parse_args(argv(faces, tmp_path / "b", max_steps=2)))

    def fail():
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_fit", fail)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert FakeWandb.runs[-1].finished == 1


@pytest.mark.parametrize("module, message", [
    (None, "--wandb: the wandb package is not installed (pip install wandb)"),
    (FakeWandb(fail="api_key not configured (no-tty)\ncall wandb.login"),
     "--wandb: Weights & Biases did not start: api_key not configured (no-tty) (online it needs `wandb login`"),
])
def test_wandb_that_cannot_start_is_one_line(faces, tmp_path, monkeypatch, module, message):
    monkeypatch.setitem(sys.modules, "wandb", module)
    if module is None:  # (not installed: where it is, its metadata is not to say otherwise)
        monkeypatch.setattr(trainer_module, "installed_version", lambda *names: None)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        main(argv(faces, tmp_path / "out", max_steps=2))


@pytest.mark.parametrize("error", ["AttributeError: `np.float_` was removed in the NumPy 2.0 release. Use `np.float64` "
                                   "instead.", "ImportError: numpy.core.multiarray failed to import"])
def test_a_wandb_that_does_not_import_is_one_line(faces, tmp_path, monkeypatch, error):
    # wandb 0.17.1 and earlier, under numpy 2: `import wandb` raises AttributeError (np.float_), which the
    # trainer took for no error of its own: a traceback at start-up. An ImportError of an installed wandb (one
    # of its own imports: a build for numpy 1) was "the wandb package is not installed (pip install wandb)".
    package = tmp_path / "site" / "wandb"
    package.mkdir(parents=True)
    kind, text = error.split(": ", 1)
    (package / "__init__.py").write_text(f"raise {kind}({text!r})\n")
    (tmp_path / "site" / "wandb-0.17.1.dist-info").mkdir()
    (tmp_path / "site" / "wandb-0.17.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: wandb\n"
                                                                          "Version: 0.17.1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    # (The numpy hint only under numpy 2: an error of another cause, under numpy 1, is not said to be numpy's.)
    hint = rf" \(under numpy {re.escape(np.__version__)} it needs 0\.17\.2 or later\)" if np.__version__ >= "2" else ""
    with pytest.raises(SystemExit, match=rf"^train: error: --wandb: the installed wandb 0\.17\.1 does not import "
                                         rf"\({re.escape(error)}\): pip install -U wandb{hint}$"):
        main(argv(faces, tmp_path / "out", max_steps=2))
    assert not (tmp_path / "out").exists()  # (said before the data is read)


@pytest.mark.parametrize("error, advice", [
    # wandb 0.17.2 under protobuf 7 (and 6): its generated _pb2 modules do not load. Not numpy's doing.
    ("AttributeError: module 'wandb.proto.wandb_internal_pb2' has no attribute 'Result'",
     "pip install -U wandb (under protobuf 7.36.2 it needs 0.26.0 or later)"),
    ("ImportError: cannot import name 'Deprecated' from 'wandb.proto.wandb_telemetry_pb2'",
     "pip install -U wandb (under protobuf 7.36.2 it needs 0.26.0 or later)"),
    # A package it needs, removed after it was installed: `pip install wandb` installs it again.
    ("ModuleNotFoundError: No module named 'click'", "a package it needs is missing (click): pip install wandb"),
    ("RuntimeError: something else", "pip install -U wandb"),
])
def test_the_advice_for_a_wandb_that_does_not_import_fits_the_cause(faces, tmp_path, monkeypatch, error, advice):
    package = tmp_path / "site" / "wandb"
    package.mkdir(parents=True)
    kind, text = error.split(": ", 1)
    name = ", name='click'" if kind == "ModuleNotFoundError" else ""
    (package / "__init__.py").write_text(f"raise {kind}({text!r}{name})\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    versions = {"wandb": "0.17.2", "protobuf": "7.36.2"}
    monkeypatch.setattr(trainer_module, "installed_version",
                        lambda *names: (names[0], versions[names[0]]) if names[0] in versions else None)
    with pytest.raises(SystemExit, match=rf"^train: error: --wandb: the installed wandb 0\.17\.2 does not import "
                                         rf"\({re.escape(error)}\): {re.escape(advice)}$"):
        main(argv(faces, tmp_path / "out", max_steps=2))
    assert not (tmp_path / "out").exists()


def _advice_for(faces, tmp_path, monkeypatch, error, versions, **attributes):
    """--wandb's line where `import wandb` raises ``error`` ("Kind: message", with ``attributes`` such as name= and
    path=) and ``versions`` are the installed distributions'."""
    package = tmp_path / "site" / "wandb"
    package.mkdir(parents=True)
    kind, text = error.split(": ", 1)
    given = "".join(f", {key}={value!r}" for key, value in attributes.items())
    (package / "__init__.py").write_text(f"raise {kind}({text!r}{given})\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(trainer_module, "installed_version",
                        lambda *names: (names[0], versions[names[0]]) if names[0] in versions else None)
    with pytest.raises(SystemExit) as refused:
        main(argv(faces, tmp_path / "out", max_steps=2))
    assert not (tmp_path / "out").exists()
    prefix = f"train: error: --wandb: the installed wandb {versions['wandb']} does not import ({error}): "
    assert str(refused.value.code).startswith(prefix), refused.value.code
    return str(refused.value.code)[len(prefix):]


def test_the_advice_names_no_release_that_the_installed_wandb_is_already(faces, tmp_path, monkeypatch):
    # An error naming a _pb2 module of a wandb that reads this protobuf (0.26.0 under 7) is not that protobuf's
    # doing: "it needs 0.26.0 or later" said to a 0.26.0 contradicted the line's own version. Numpy's hint likewise.
    versions = {"wandb": "0.26.0", "protobuf": "7.36.2"}
    error = "ImportError: cannot import name 'Imports' from 'wandb.proto.wandb_telemetry_pb2'"
    assert _advice_for(faces, tmp_path, monkeypatch, error, versions) == "pip install -U wandb"
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    error = "AttributeError: `np.float_` was removed in the NumPy 2.0 release."
    assert _advice_for(faces, tmp_path / "numpy", monkeypatch, error, versions) == "pip install -U wandb"
    # (A release older than the first that reads it keeps the hint: 0.19.10 under protobuf 7.)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    versions["wandb"] = "0.19.10"
    assert (_advice_for(faces, tmp_path / "older", monkeypatch, "ImportError: cannot import name 'Imports' from "
                        "'wandb.proto.wandb_telemetry_pb2'", versions)
            == "pip install -U wandb (under protobuf 7.36.2 it needs 0.26.0 or later)")


@pytest.mark.parametrize("module, folder, advice", [
    ("wandb.proto.wandb_telemetry_pb2", "/opt/numpy2-env",
     "pip install -U wandb (under protobuf 7.36.2 it needs 0.26.0 or later)"),
    ("wandb.sdk.lib.runid", "/home/me/protobuf-work/venv", "pip install -U wandb"),
])
def test_the_advice_reads_the_cause_from_the_error_not_the_files_path(faces, tmp_path, monkeypatch, module, folder,
                                                                      advice):
    # An ImportError's message ends with the path of the module that lacks the name: a folder named for numpy or
    # protobuf made an error of the other cause (or of neither) read as numpy's or protobuf's.
    path = f"{folder}/lib/python3.11/site-packages/{module.replace('.', '/')}.py"
    error = f"ImportError: cannot import name 'Imports' from '{module}' ({path})"
    assert _advice_for(faces, tmp_path, monkeypatch, error, {"wandb": "0.19.10", "protobuf": "7.36.2"}, name=module,
                       path=path) == advice


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="Python 3.10 and later list their modules")
def test_a_module_of_pythons_own_that_is_missing_is_not_a_package_to_install(faces, tmp_path, monkeypatch):
    # wandb 0.26.0 imports ctypes: a Python built without libffi (pyenv's, say) lacks _ctypes, which no pip install
    # brings. The advice was "a package it needs is missing (_ctypes): pip install wandb".
    error = "ModuleNotFoundError: No module named '_ctypes'"
    assert (_advice_for(faces, tmp_path, monkeypatch, error, {"wandb": "0.26.0", "protobuf": "7.36.2"}, name="_ctypes")
            == "this Python was built without _ctypes, a module of its standard library that pip does not install")


def test_a_ctrl_c_while_wandb_finishes_ends_the_run_without_a_traceback(faces, tmp_path, fake_wandb, monkeypatch,
                                                                        capsys):
    # The upload's wait, after the done line, with Python's own Ctrl-C back. wandb 0.26.0 and later (the [wandb]
    # extra's floor) say "Control-C detected -- Run data was not synced" and raise the KeyboardInterrupt again, where
    # 0.17.2 ended the process (os._exit(-1), exit status 255): a KeyboardInterrupt's traceback came under that line,
    # and the --output folder's lock was not let go of.
    def interrupted(self, exit_code=0):
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeRun, "finish", interrupted)
    try:
        main(argv(faces, tmp_path / "out", max_steps=2))
        ended = None
    except BaseException as error:  # (a KeyboardInterrupt let through would stop pytest itself)
        ended = error
    assert isinstance(ended, SystemExit) and ended.code == 128 + signal.SIGINT, repr(ended)
    # This run's lock, not every lock: other tests of the same process may hold theirs.
    assert os.path.realpath(tmp_path / "out") not in trainer_module._OUTPUT_LOCKS
    assert (tmp_path / "out" / "checkpoint.pt").exists() and "done: 2 steps" in capsys.readouterr().err


def test_real_wandb_offline(faces, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    output = tmp_path / "offline"
    assert main(argv(faces, output, max_steps=4, save_every=2, eval_every=2)) == 0
    run_id = checkpoint.load(str(output / "checkpoint.pt"))["wandb_run_id"]
    assert glob.glob(str(output / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert main(argv(faces, output, max_steps=6, resume="auto")) == 0
    assert checkpoint.load(str(output / "checkpoint.pt"))["wandb_run_id"] == run_id
    assert len(glob.glob(str(output / "wandb" / f"offline-run-*-{run_id}"))) >= 1
    assert os.path.isdir(output / "wandb")


def scripted_accuracies(monkeypatch, accuracies):
    """train.verification.evaluate's results with ``accuracies`` in turn: which step's is the best is known."""
    from train import verification

    real, left = verification.evaluate, list(accuracies)

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "accuracy": left.pop(0)}

    monkeypatch.setattr(verification, "evaluate", evaluate)


@pytest.mark.slow
def test_wandb_artifacts_log_each_checkpoint_as_a_version_of_the_runs_model(faces, tmp_path, fake_wandb,
                                                                            monkeypatch):
    output = tmp_path / "run"
    scripted_accuracies(monkeypatch, [0.6, 0.8, 0.7, 0.9, 0.5])  # (steps 0, 2, 4, then 6 in the resume; plain)
    assert main(argv(faces, output, max_steps=4, save_every=2, eval_every=2, wandb_artifacts=True)) == 0
    assert main(argv(faces, output, max_steps=6, save_every=2, eval_every=2, wandb_artifacts=True,
                     resume="auto")) == 0
    first, resumed = FakeWandb.runs
    verification = {r["step"]: r for r in read_jsonl(output / "verification.jsonl")}
    logged = [*first.artifacts, *resumed.artifacts]
    assert (len(first.artifacts), len(resumed.artifacts)) == (2, 1)  # each save's (2, the end's 4; 6)
    for (artifact, aliases), step, best in zip(logged, (2, 4, 6), (True, False, True)):
        # One artifact of the W&B run, whose versions the saves are (a resumed run's too: the same run id).
        assert (artifact.name, artifact.type, list(artifact.files)) == ("model-run0", "model", ["checkpoint.pt"])
        # Not into W&B's artifact cache (~/.cache/wandb) too, its default: a copy of every version, unbounded.
        assert artifact.cached == {"checkpoint.pt": False}
        assert torch.load(io.BytesIO(artifact.files["checkpoint.pt"]), weights_only=False)["step"] == step
        assert sorted(aliases) == sorted(["latest", f"step-{step}", *(["best-pairs", "best"] if best else [])])
        record = verification[step]
        assert artifact.metadata == {
            "step": step, "network": "small", "embedding_size": 64, "image_size": IMAGE_SIZE,
            "centres": "in checkpoint.pt",
            "verification": {"pairs": {"accuracy": record["accuracy"], "best_accuracy": record["best_accuracy"],
                                       "best_step": record["best_step"]}}}
    assert [verification[step]["best_step"] for step in (2, 4, 6)] == [2, 2, 6]
    assert logged[-1][0].files["checkpoint.pt"] == (output / "checkpoint.pt").read_bytes()
    # Without the option, no artifact.
    assert main(argv(faces, tmp_path / "plain", max_steps=2)) == 0
    assert FakeWandb.runs[-1].artifacts == []


def test_a_wandb_artifact_that_fails_is_a_warning_and_the_run_goes_on(faces, tmp_path, fake_wandb, capsys):
    output = tmp_path / "run"
    FakeWandb.artifact_failure = OSError("[Errno 28] No space left on device: staging\nmore")
    assert main(argv(faces, output, max_steps=4, save_every=2, wandb_artifacts=True)) == 0
    lines = [f"warning: --wandb-artifacts: {output / 'checkpoint.pt'} (step {step}) was not logged to W&B: [Errno 28] "
             "No space left on device: staging; the checkpoint is kept, and the run goes on" for step in (2, 4)]
    err, log = capsys.readouterr().err, (output / "training.log").read_text()
    assert all(line in err and line in log for line in lines)
    assert checkpoint.load(str(output / "checkpoint.pt"))["step"] == 4 and FakeWandb.runs[-1].finished == 0
    assert [r["step"] for r in FakeWandb.runs[-1].logged if "train/loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("at_step", [1, 2])  # (a stop in step 2 of 4; in the last step, before the final verification)
def test_the_checkpoint_of_a_stop_by_a_signal_is_not_logged_as_an_artifact(faces, tmp_path, fake_wandb, monkeypatch,
                                                                           capsys, at_step):
    # A scheduler's SIGTERM leaves a grace (Slurm's KillWait, torchrun's 30 s) for the checkpoint: W&B's staging copy
    # of it (a read of the whole file) and wandb.finish's wait for its upload came after, and took that grace.
    original_step = Trainer.train_step

    def signalled(self, images, labels):
        if self.step == at_step:
            self._on_signal(signal.SIGTERM, None)
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    output = tmp_path / "run"
    max_steps = 4 if at_step == 1 else 3  # (step 3 of 3: its checkpoint, then the stop's exit 0)
    status = main(argv(faces, output, max_steps=max_steps, save_every=0, wandb_artifacts=True))
    assert status == (128 + signal.SIGTERM if at_step == 1 else 0)
    step = at_step + 1
    assert checkpoint.load(str(output / "checkpoint.pt"))["step"] == step
    assert FakeWandb.runs[-1].artifacts == []
    note = (f"note: --wandb-artifacts: the checkpoint of a stop by a signal (step {step}) is not logged to W&B; "
            "the next save of --resume auto's run is")
    assert note in capsys.readouterr().err and note in (output / "training.log").read_text()
    monkeypatch.setattr(Trainer, "train_step", original_step)  # (not undo(): the fake wandb is monkeypatch's too)
    assert main(argv(faces, output, max_steps=max_steps, save_every=0, wandb_artifacts=True, resume="auto")) == 0
    (artifact, aliases), = FakeWandb.runs[-1].artifacts
    assert f"step-{max_steps}" in aliases


def test_a_save_sharded_artifact_says_its_centres_are_not_in_it(faces, tmp_path, fake_wandb):
    # (--save-sharded writes shards under torchrun alone: the artifact of such a save, rank 0's checkpoint.pt.)
    from train.config import parse_args

    trainer = Trainer(parse_args(argv(faces, tmp_path / "run", max_steps=2, wandb_artifacts=True)))
    trainer.save()
    trainer._log_model_artifact(sharded=True)
    (plain, _), (sharded, aliases) = FakeWandb.runs[-1].artifacts
    assert list(sharded.files) == ["checkpoint.pt"] and sorted(aliases) == ["latest", "step-0"]
    assert (plain.metadata["centres"], sharded.metadata["centres"]) == (
        "in checkpoint.pt", "not in this artifact: the run folder's checkpoint-centres-*.pt (--save-sharded)")
    trainer.log.close()
    trainer.release_output()


def test_wandb_artifacts_without_wandb_is_a_note_as_the_other_wandb_options(faces, tmp_path, fake_wandb, capsys):
    # It was refused ("--wandb-artifacts logs to the --wandb run: give --wandb too, or --no-wandb-artifacts"), where
    # --wandb-project is a note: a resume from the run's args.json with --no-wandb stopped until
    # --no-wandb-artifacts was added too. (arcface_torch's save_artifacts without using_wandb logs nothing, silently.)
    note = "note: --wandb-artifacts is not used without --wandb"
    assert main(argv(faces, tmp_path / "out", max_steps=2, wandb=False, wandb_artifacts=True)) == 0
    assert note in capsys.readouterr().err and note in (tmp_path / "out" / "training.log").read_text()
    assert FakeWandb.runs == []
    output = tmp_path / "run"
    assert main(argv(faces, output, max_steps=2, save_every=2, wandb_artifacts=True)) == 0
    assert len(FakeWandb.runs[0].artifacts) == 1
    capsys.readouterr()
    assert main(["--config", str(output / "args.json"), "--no-wandb", "--resume", "auto", "--max-steps", "4"]) == 0
    assert note in capsys.readouterr().err
    assert checkpoint.load(str(output / "checkpoint.pt"))["step"] == 4 and len(FakeWandb.runs) == 1


def test_best_alias_follows_the_sets_the_run_verifies(faces, tmp_path, fake_wandb):
    # A resume may leave out one of the checkpoint's --val-targets (val_targets may change), whose last record the
    # checkpoint keeps: "best" was then never given again, its best_step behind, though every set verified was best.
    from train.config import parse_args

    trainer = Trainer(parse_args(argv(faces, tmp_path / "run", max_steps=6, wandb_artifacts=True)))
    trainer.step = 4
    trainer.last_verification = {
        "pairs": {"step": 4, "target": "pairs", "accuracy": 0.9, "best_accuracy": 0.9, "best_step": 4},
        "agedb_30": {"step": 2, "target": "agedb_30", "accuracy": 0.7, "best_accuracy": 0.7, "best_step": 2}}
    trainer.save()
    [(artifact, aliases)] = FakeWandb.runs[-1].artifacts
    assert sorted(aliases) == ["best", "best-pairs", "latest", "step-4"]
    assert list(artifact.metadata["verification"]) == ["pairs"]
    trainer.log.close()
    trainer.release_output()


def test_best_aliases_keep_to_wandbs_alias_limits(faces, tmp_path, fake_wandb):
    # An alias has 1 to 128 characters, any but / and : (W&B's docs; wandb's client checks the two characters alone,
    # a longer one went to the server, after log_artifact had returned): best-<target> of a set named by its path is
    # cut to it, two such names kept apart.
    from train.config import parse_args

    trainer = Trainer(parse_args(argv(faces, tmp_path / "run", max_steps=6, wandb_artifacts=True)))
    trainer.step = 4
    folder = "/data/" + "evaluation/" * 14
    trainer.last_verification = {name: {"step": 4, "target": name, "accuracy": 0.9, "best_accuracy": 0.9,
                                        "best_step": 4} for name in ("RFW/African", folder + "a", folder + "b")}
    trainer.save()
    [(_, aliases)] = FakeWandb.runs[-1].artifacts
    assert all(1 <= len(alias) <= 128 and "/" not in alias and ":" not in alias for alias in aliases)
    cut = [alias for alias in aliases if alias.startswith("best--data-evaluation-")]
    assert "best-RFW-African" in aliases and len(set(cut)) == 2 and all(len(alias) == 128 for alias in cut)
    trainer.log.close()
    trainer.release_output()


def test_wandb_disabled_stages_no_artifact(faces, tmp_path, fake_wandb):
    # WANDB_MODE=disabled: W&B logs nothing, but wandb's add_file copied each checkpoint.pt into its staging folder
    # all the same, where it stayed, never uploaded (test_real_wandb_disabled_leaves_no_staging_copy).
    FakeWandb.disabled = True
    assert main(argv(faces, tmp_path / "run", max_steps=4, save_every=2, wandb_artifacts=True)) == 0
    assert FakeWandb.staged == [] and FakeWandb.runs[-1].artifacts == []


@pytest.mark.slow
def test_real_wandb_disabled_leaves_no_staging_copy(faces, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    # (wandb keeps the settings of its first run in a process, WANDB_MODE among them, until its teardown: public
    # in later versions, wandb._teardown in 0.17.2.)
    teardown = getattr(wandb, "teardown", None) or wandb._teardown
    teardown()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    try:
        assert main(argv(faces, tmp_path / "run", max_steps=4, save_every=2, wandb_artifacts=True)) == 0
    finally:
        teardown()
    assert [f for f in glob.glob(str(tmp_path / "wandb-data" / "**"), recursive=True) if os.path.isfile(f)] == []


@pytest.mark.slow
def test_real_wandb_offline_logs_the_artifacts(faces, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # (its staging copies, not in ~)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    output = tmp_path / "offline"
    assert main(argv(faces, output, max_steps=4, save_every=2, eval_every=2, wandb_artifacts=True)) == 0
    assert "warning" not in capsys.readouterr().err
    run_id = checkpoint.load(str(output / "checkpoint.pt"))["wandb_run_id"]
    [records] = glob.glob(str(output / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    written = open(records, "rb").read()
    assert written.count(f"model-{run_id}".encode()) >= 2 and b"step-4" in written
