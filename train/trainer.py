"""The training loop: backbone + margin loss, SGD/AdamW with the paper's step or insightface's
poly schedule, DDP through torchrun, verification, logs, plots, and checkpoints that a killed
run resumes from exactly."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import math
import os
import pickle
import random
import re
import secrets
import shutil
import signal
import socket
import sys
import time
import traceback
import warnings
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from arcface_ext import full_state_dict, shard_optimizer_state
from arcface_ext.optim import SGD, AdamW  # noqa: F401 (train.trainer.SGD, AdamW: the trainer's)

from . import centre_shards, checkpoint, export, rfw
from .config import LR_SCHEDULES, margin_fraction, margins, steps_from_epochs, unused_options, warmed_up_margins
from .data.transforms import DataError, to_model_input
from .distill import distillation_loss
from .models import (VisionTransformer, check_embedding_shape, get_model, is_factory_spec, learn_embedding_scale,
                     model_multiply_adds, multiply_adds)
from .plots import ANGLE_PNG, LOSS_PNG, VERIFICATION_PNG
from .progress import is_terminal as _is_terminal
from .signals import (Stopped, readers_may_leave, stop_on_signals, trainer_start_up_stop_line,
                      trainer_stop_line)
from .tools import (another_process_stopped, count_of, first_line, folders_missing, installed_version, lost_a_peer,
                    remove_folders_made, say_unhandled_error, start_process_group, timed_out, usable_cpus)

ANGLE_PHASES = ("start", "middle", "end")
# Target angles kept per phase for the histogram: enough for a smooth curve, small to store,
# gathered over at most a twentieth of the run so that "start" is the start.
ANGLE_SAMPLES = 2048


# The options a resumed run may change: where it reads and writes, how often it logs, evaluates and
# saves, how long it runs (the schedule follows a new --max-steps), where it runs, and how the same
# gradients are computed. Any other change would make the rest of the run another run than the
# checkpoint's, while args.json claimed otherwise.
RESUME_MAY_CHANGE = frozenset({
    "config", "resume", "data", "num_classes", "val_targets", "output", "pretrained_model", "finetuning",
    "max_steps", "epochs", "log_every", "eval_every", "save_every", "tensorboard", "plots", "device", "num_workers",
    "dist_timeout",
    "compile", "compile_backend", "compile_mode", "channels_last", "gradient_checkpointing", "loss_impl",
    "sharded_classes", "save_sharded", "wandb", "wandb_project", "wandb_entity", "wandb_run_name",
    "wandb_artifacts",
    # (the teacher is compared by its weights, which the checkpoint records: _check_resumed_teacher)
    "teacher", "teacher_network",
})


# The first signal again this soon after it is the same stop, not a second Ctrl-C: torchrun passes the signal it
# gets on to its processes (each in a session of its own), which a scheduler that signals every process of the job
# (Slurm's scancel, systemd's control-group kill, pkill) reached already.
SAME_STOP_SECONDS = 1.0

# The images of --data on which the BatchNorms that an ONNX --pretrained_model folded away are calibrated: over
# an iResNet's last, 7x7 map, 12,544 values of each channel (its variance then known to about 1 %); over mbf's
# 1x1 map before its embedding, 256 (to about 9 %, no noisier than a training batch's own statistics).
CALIBRATION_IMAGES = 256

# How a run whose final verification a stop at its last step or after it left out or cut short ends.
FINAL_VERIFICATION_LEFT = ("the final verification is cut short; the run ends with its checkpoint, and --resume auto "
                           "makes the verification")

# The lock a run holds on its --output folder (Trainer._lock_output), by the folder's real path; and what the
# folder held when the run took it (the names in it, listed under the lock; None: the run made the folder), which
# a run stopped at start-up puts back (_undo_start); of a folder the run made, the folders above it it made with it.
OUTPUT_LOCK_NAME = ".run.lock"
_OUTPUT_LOCKS: dict = {}
_OUTPUT_FOUND: dict = {}
_OUTPUT_MADE_ABOVE: dict = {}


def _release_output_lock(output: str) -> bool:
    """The lock this process holds on ``output`` (the main process's), released; none held: nothing (False)."""
    _OUTPUT_FOUND.pop(os.path.realpath(output), None)
    lock = _OUTPUT_LOCKS.pop(os.path.realpath(output), None)
    if lock is not None:
        lock.release()
    return lock is not None


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of ``tensors`` taken as one vector, on their device (0 for none): torch's
    ``nn.utils.get_total_norm`` where it has one (2.6 on), else the same from each tensor's norm (torch 2.4-2.5,
    which the project supports)."""
    if hasattr(nn.utils, "get_total_norm"):
        return nn.utils.get_total_norm(tensors)
    if not tensors:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).to(tensors[0].device) for t in tensors]))


class _VerificationStopped(Exception):
    """Raised between the batches of a verification when a stop signal has come."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf, or the fp16 loss scale collapsed; the last good checkpoint is
    left in place. ``advice``: what to try, where the usual causes' list does not fit."""

    def __init__(self, message: str, advice: str | None = None):
        super().__init__(message)
        self.advice = advice


# A collapsed fp16 loss scale stops the run, as a NaN loss does (arcface_torch's runs went on with the scale at 0
# and the loss frozen, insightface #1437). Below 2**-16 a gradient overflows fp16 (65504) only where the true one
# is above 2**32: no run that still trains gets there (torch's docs already call a scale below 1 "likely wrong").
# 50 skipped steps in a row: a healthy run skips a handful in a row at its start (each halves torch's 65536, until
# the gradients fit) and one at a time later; 50 halvings take even a scale grown to 2**34 below the floor.
LOSS_SCALE_FLOOR = 2.0 ** -16
SKIPPED_IN_A_ROW = 50
# The numbers of a metrics.jsonl line on training's health: the gradients' norms (null for a step with inf/NaN
# gradients), and with an fp16 scaler its scale and the steps it skipped.
HEALTH_METRICS = ("grad_norm", "centres_grad_norm", "loss_scale", "skipped_steps")


class CheckpointNotWritten(RuntimeError):
    """Writing the checkpoint failed (a full disk, ...); the previous one is left in place."""


class LogNotWritten(RuntimeError):
    """Appending to a log of the run failed (a full disk, a quota: met by a log line more often than by a
    checkpoint); the last checkpoint is left in place."""


class LogUnreadable(ValueError):
    """A line of a run's log, before its last, is not JSON (an edited or damaged log): the message names
    the file and the line. A resume ends with it; the plots, drawn at a run's end, are left out with it."""


def _os_reason(error: OSError) -> str:
    """Why a write failed, as ``[Errno 28] No space left on device`` (without the file, named beside it)."""
    return f"[Errno {error.errno}] {error.strerror}" if error.strerror else str(error) or type(error).__name__


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LearningRateSchedule:
    """Multiplier of the base learning rate at a step, for ``torch.optim.lr_scheduler.LambdaLR``.

    ``step``: the paper's schedule, divided by 10 at each of ``lr_steps``; ``poly``: insightface's,
    ``(1 - t)^2`` over the steps after warm-up; ``cosine``: ``(1 + cos(pi t)) / 2`` over them (SGDR's
    annealing to 0, without restarts). All warm up linearly over ``warmup_steps``.
    A plain object (not a closure), so that the scheduler's state dict holds it.
    """

    def __init__(self, kind: str, max_steps: int, warmup_steps: int = 0, lr_steps: list[int] | None = None):
        if kind not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {kind!r}")
        self.kind = kind
        self.max_steps = int(max_steps)
        self.warmup_steps = int(warmup_steps)
        self.lr_steps = sorted(int(s) for s in (lr_steps or []))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "step":
            return 0.1 ** sum(step >= s for s in self.lr_steps)
        t = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return (1.0 - t) ** 2


class TargetAngles:
    """The angle θ between each embedding and its class centre, in degrees, gathered over a few
    steps at the start, the middle and the end of training (the ArcFace paper's figure)."""

    def __init__(self, max_steps: int, batch_size: int):
        width = max(1, min(math.ceil(ANGLE_SAMPLES / batch_size), max_steps // 20))
        middle = max(0, max_steps // 2 - width // 2)
        self.windows = {"start": (0, width), "middle": (middle, middle + width),
                        "end": (max(0, max_steps - width), max_steps)}
        self.angles: dict[str, list[torch.Tensor]] = {phase: [] for phase in ANGLE_PHASES}

    def wants(self, step: int) -> bool:
        return any(lo <= step < hi for lo, hi in self.windows.values())

    def record(self, step: int, target_cosine: torch.Tensor) -> None:
        cosine = target_cosine.detach().float().cpu()
        theta = torch.rad2deg(torch.acos(cosine[torch.isfinite(cosine)].clamp(-1.0, 1.0)))
        for phase, (lo, hi) in self.windows.items():
            if lo <= step < hi:
                self.angles[phase].append(theta)

    def degrees(self, phase: str) -> torch.Tensor:
        parts = self.angles[phase]
        return torch.cat(parts)[:ANGLE_SAMPLES] if parts else torch.empty(0)

    def state_dict(self) -> dict[str, Any]:
        return {"windows": {k: list(v) for k, v in self.windows.items()},
                "degrees": {phase: self.degrees(phase) for phase in ANGLE_PHASES}}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """The angles a run gathered up to ``step``, resumed with this run's windows: a window of the
        run's --max-steps (raised on resume) that lies ahead of ``step`` replaces the saved one (the
        "end" of 200 steps is not that of 260), unless they are the same window; one that has
        passed cannot be gathered any more, and the saved window and angles stand for it."""
        for phase in ANGLE_PHASES:
            saved = tuple(state["windows"][phase])
            if saved == self.windows[phase] or self.windows[phase][1] <= step:
                self.windows[phase] = saved
                self.angles[phase] = [state["degrees"][phase]]
            else:
                self.angles[phase] = []


# What a run (and train.export, by default) writes into its --output folder.
# (Not wandb/: W&B keeps each run in a folder of its own under it, so a fresh run overwrites nothing there.)
RUN_FILES = (checkpoint.CHECKPOINT_NAME, "args.json", "metrics.jsonl", "verification.jsonl", "training.log",
             "tensorboard", LOSS_PNG, VERIFICATION_PNG, ANGLE_PNG, export.STATE_NAME, export.SETTINGS_NAME,
             *export.GRAPH_NAMES, *export.DATA_NAMES)


def _copied_tensors(value: Any) -> Any:
    """``value`` (dicts, lists and tuples of tensors and other things) with each tensor copied: what a run
    keeps of a checkpoint read through a file mapping must not be a view of it."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {key: _copied_tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied_tensors(item) for item in value)
    return value


def set_aside_earlier_run(output: str, keep: bool = False) -> str | None:
    """Before a fresh run writes into ``output``: when the folder holds another run (a checkpoint,
    or logged steps; or arcface_torch's ``training.log`` or ``checkpoint_gpu_<rank>.pt``), move that
    run's files into a new subfolder ``earlier-<n>`` and return it, so that nothing the earlier run
    wrote is overwritten or mixed with this one's. Only the files a run writes move; anything else in
    the folder stays. ``keep``: arcface_torch's ``checkpoint_gpu_<rank>.pt`` stay (the run they are goes
    on here: until this run's first checkpoint, they are what ``--resume auto`` continues)."""
    def non_empty(name):
        path = os.path.join(output, name)
        return os.path.isfile(path) and os.path.getsize(path) > 0
    # A run of arcface_torch's train_v2.py: an arcface_torch config names the same folder for this
    # trainer (work_dirs/<config name>), where this run's TensorBoard events went into its tensorboard/.
    insightface = [] if keep else checkpoint.insightface_shards(output)
    if insightface or non_empty("training.log"):
        insightface += ["training.log", "model.pt"]
    if not (os.path.exists(os.path.join(output, checkpoint.CHECKPOINT_NAME)) or non_empty("metrics.jsonl")
            or non_empty("verification.jsonl") or insightface):
        return None
    n = 1
    while True:
        aside = os.path.join(output, f"earlier-{n}")
        try:
            os.mkdir(aside)
            break
        except FileExistsError:
            n += 1
    shards = centre_shards.shard_files(output)
    # A copy of a --save-sharded checkpoint.pt kept in the folder (step-10000.pt) stays, and so do the shards it
    # names: linked into earlier-<n>, so that both checkpoints keep their centres (moved where the file system has
    # no hard links, as before: the copy then finds them there no more).
    copies = centre_shards.saves_named(output, leaving=(*RUN_FILES, *insightface)) if shards else set()
    for name in (*RUN_FILES, *insightface, *shards):
        path, to = os.path.join(output, name), os.path.join(aside, name)
        if not os.path.lexists(path):
            continue
        if name in shards and centre_shards.SHARD.fullmatch(name).group(3) in copies:
            try:
                os.link(path, to)
                continue
            except OSError:
                pass
        os.replace(path, to)
    return aside


# The first wandb that imports under each protobuf major (its generated _pb2 modules; each release's own protobuf
# bounds say the same): benchmarks/results/wandb_protobuf_versions_*.
WANDB_FOR_PROTOBUF = {"6": "0.19.10", "7": "0.26.0"}


def wandb_module():
    try:
        import wandb
    except Exception as error:  # its own code: 0.17.1 and earlier use np.float_, which numpy 2 removed
        # (An ImportError of an installed wandb is not a missing package: one of its own imports failed.)
        if isinstance(error, ImportError) and installed_version("wandb") is None:
            raise SystemExit("--wandb: the wandb package is not installed (pip install wandb)") from None
        installed = installed_version("wandb") or ("wandb", "?")
        reason = " ".join(str(error).split())
        raise SystemExit(f"--wandb: the installed wandb {installed[1]} does not import ({type(error).__name__}: "
                         f"{reason}): {_wandb_advice(error, reason, installed[1])}") from None
    return wandb


def _wandb_advice(error: Exception, reason: str, installed: str) -> str:
    """What to do about wandb ``installed`` (its version), which failed to import with ``error``, by its cause:
    numpy 2 (0.17.1 and earlier), a protobuf newer than the release reads (wandb asks for it, but a later install can
    replace it), a package it needs that is missing (pip installs a satisfied requirement's missing dependencies).
    The release that numpy or protobuf needs is named only to an older wandb: at that release or later, the error is
    not that one."""
    def older(first: str) -> bool:
        release = re.match(r"\d+(?:\.\d+)*", installed)  # (0.26.0rc1: 0.26.0; "?", unknown: older)
        return release is None or tuple(map(int, release.group().split("."))) < tuple(map(int, first.split(".")))

    path = getattr(error, "path", None) if isinstance(error, ImportError) else None
    if path:  # (the file of the module that lacks a name, which ends the message: a folder's name is no cause)
        reason = reason.replace(" ".join(path.split()), "")
    if "numpy" in reason.lower() or "np." in reason:
        return f"pip install -U wandb{_under_numpy_2('0.17.2') if older('0.17.2') else ''}"
    if "_pb2" in reason or "protobuf" in reason.lower():
        protobuf = installed_version("protobuf")
        first = WANDB_FOR_PROTOBUF.get(protobuf[1].split(".")[0]) if protobuf else None
        hint = f" (under protobuf {protobuf[1]} it needs {first} or later)" if first and older(first) else ""
        return f"pip install -U wandb{hint}"
    missing = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
    if missing and missing.split(".")[0] in getattr(sys, "stdlib_module_names", ()):  # (Python 3.10 and later)
        # (_ctypes, which wandb imports, where Python was built without libffi: pip brings no such module.)
        return f"this Python was built without {missing}, a module of its standard library that pip does not install"
    if missing and missing.split(".")[0] != "wandb":
        return f"a package it needs is missing ({missing}): pip install wandb"
    return "pip install -U wandb"


def _under_numpy_2(first: str) -> str:
    """Under numpy 2, " (under numpy 2.4.6 it needs <first> or later)": the release of an optional package
    (wandb, tensorboard) whose code first runs there, for the line of an older one that failed; else ""."""
    numpy_2 = int(np.__version__.split(".")[0]) >= 2
    return f" (under numpy {np.__version__} it needs {first} or later)" if numpy_2 else ""


def wandb_run_name(args: argparse.Namespace, output: str) -> str:
    """``--wandb-run-name`` with ``{output}`` replaced by the --output folder's name (the default)."""
    return (args.wandb_run_name or "{output}").replace("{output}", os.path.basename(os.path.abspath(output)))


def logged_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options a run records with its scalars (W&B's config, TensorBoard's hparams): all but
    --wandb's own."""
    return {key: value for key, value in vars(args).items() if not key.startswith("wandb")}


# A W&B alias has 1 to 128 characters, any but / and : (W&B's docs, "Alias limits"). wandb's client checks the two
# characters alone: a longer alias would be left to the server, after log_artifact has returned.
WANDB_ALIAS_MOST = 128


def best_alias(target: str) -> str:
    """``best-<target>``, the --wandb-artifacts alias of a verification set's best step: RFW/African as
    best-RFW-African; a name too long for an alias (a set named by its path) cut, with a digest of the whole that
    keeps two such names apart."""
    alias = "best-" + re.sub(r"[^A-Za-z0-9_.-]", "-", target)
    if len(alias) > WANDB_ALIAS_MOST:
        digest = hashlib.sha1(target.encode()).hexdigest()[:8]
        alias = f"{alias[:WANDB_ALIAS_MOST - len(digest) - 1]}-{digest}"
    return alias


def start_wandb(args: argparse.Namespace, output: str, run_id: str | None):
    """The Weights & Biases run of ``--wandb``, its files under ``<output>/wandb``: a new one, or the
    run ``run_id`` continued (a resumed run's, kept in its checkpoint). Its x-axis is the training
    step, logged as ``step``: a resumed run logs steps again from its checkpoint's."""
    wandb = wandb_module()
    name = wandb_run_name(args, output)
    try:
        run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=name, dir=output,
                         config=logged_options(args), id=run_id, resume="allow" if run_id else None)
        run.define_metric("step")
        for prefix in ("train", "verification"):
            run.define_metric(f"{prefix}/*", step_metric="step")
    except Exception as error:  # no account, no network, a bad entity: wandb's own exception types
        message = first_line(error)
        raise SystemExit(f"--wandb: Weights & Biases did not start: {message} (online it needs `wandb login` or "
                         "WANDB_API_KEY, and a project and entity it can write to; WANDB_MODE=offline logs without "
                         "an account, for `wandb sync` later)") from None
    return run


class RunLog:
    """``metrics.jsonl`` and ``verification.jsonl`` (one JSON object a line) plus TensorBoard
    when installed, and a Weights & Biases run when given, both with the same scalars (TensorBoard's
    HParams tab with the run's ``options`` against the loss and the accuracies of ``targets``; W&B's
    config is set by :func:`start_wandb`); ``training.log``, what the run said (its
    settings, notes, a line at each logged step, verifications, how it ended), each line with the
    time, appended to by each resume in the folder. A resumed run's logs start with those of
    its checkpoint's folder, ``history`` (``output`` unless it resumes from elsewhere), up to the
    checkpoint's step: the lines past it, which the killed run may have written, are dropped (what it
    sent to W&B stays there)."""

    FILES = ("metrics.jsonl", "verification.jsonl")

    def __init__(self, output: str, start_step: int, tensorboard: bool, wandb_run=None, history: str | None = None,
                 options: dict[str, Any] | None = None, targets: Iterable[str] | Mapping[str, Any] = ()):
        self.output, self.wandb = output, wandb_run
        self.kept: dict[str, list[dict[str, Any]]] = {}  # each file's records the run begins with (a resume's)
        for name in self.FILES:
            path = os.path.join(output, name)
            earlier = os.path.join(history or output, name)
            kept = [r for r in read_jsonl(earlier) if r.get("step", 0) <= start_step] if start_step else []
            self.kept[name] = kept
            # Atomically: a kill here leaves the old log, which the next resume trims again.
            checkpoint.write_atomic(path, lambda f, kept=kept: f.writelines(json.dumps(r) + "\n" for r in kept),
                                    binary=False)
        # training.log is kept whole; a last line torn by a kill -9 or a full disk mid-append is ended, so
        # that this run's first line starts a line of its own.
        with contextlib.suppress(OSError), open(os.path.join(output, "training.log"), "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                # TensorBoard hides what a killed run logged past the checkpoint this run starts from: the
                # events from purge_step on, so the step after it (the checkpoint's own step stays, as in
                # metrics.jsonl), or all of them from a checkpoint at step 0 (a stop in step 0's verification:
                # this run verifies step 0 again, and its logs start afresh). A fresh run writes one too:
                # TensorBoard's Python loader takes a run's first such mark for its start, and only a later
                # one for a restart.
                self.writer = SummaryWriter(os.path.join(output, "tensorboard"),
                                            purge_step=start_step + 1 if start_step else 0)
                if options is not None:
                    self._hparams(options, targets)

    def _hparams(self, options: dict[str, Any], targets: Iterable[str] | Mapping[str, Any]) -> None:
        """``options`` in TensorBoard's HParams tab, against the loss (and the distillation term of a run
        with a teacher), each target's accuracy and each benchmark's mean over its sets (RFW's races)."""
        from torch.utils.tensorboard.summary import hparams

        # (Booleans as "True" / "False": torch's hparams would make them 1.0 / 0.0.)
        values = {key: value if type(value) in (int, float, str) else str(value)
                  for key, value in options.items() if value is not None}
        groups = dict.fromkeys(group for vset in (targets.values() if isinstance(targets, Mapping) else ())
                               if (group := getattr(vset, "group", None)))
        metrics = {tag: 0.0 for tag in ("train/loss", *(["train/distill"] if options.get("teacher") else []),
                                        *(f"verification/{target}" for target in targets),
                                        *(f"verification/{group}_mean" for group in groups))}
        try:
            summaries = hparams(values, metrics)  # (the tab reads the metrics' values from their scalars)
        except AttributeError as error:  # tensorboard's code: 2.17.0 and earlier use np.string_, which numpy 2 removed
            # (Not ValueError or TypeError: torch's refusal of a value or an argument of ours, a bug to see.)
            reason, installed = " ".join(str(error).split()), installed_version("tensorboard") or ("", "?")
            print(f"note: TensorBoard's HParams tab is not written: the installed tensorboard {installed[1]} failed "
                  f"({type(error).__name__}: {reason}); the scalars are written: pip install -U tensorboard"
                  f"{_under_numpy_2('2.17.1')}", file=sys.stderr)
            return
        for summary in summaries:
            self.writer.file_writer.add_summary(summary)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        self._append_text(name, json.dumps(record) + "\n")

    def _append_text(self, name: str, text: str) -> None:
        path = os.path.join(self.output, name)
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as error:
            raise LogNotWritten(f"writing {path} failed: {_os_reason(error)}") from None

    def text(self, message: str) -> None:
        """``message``'s lines into ``training.log``. Of a line a progress bar redrew, the last drawing."""
        # (Split at "\n" alone: splitlines splits at "\r" too.)
        lines = [next((part for part in reversed(line.split("\r")) if part.strip()), "").rstrip()
                 for line in message.split("\n")]
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self._append_text("training.log", "".join(f"{stamp} {line}\n" for line in lines if line))

    def metrics(self, record: dict[str, Any]) -> None:
        self._append("metrics.jsonl", record)
        self._scalars(record["step"], {f"train/{key}": record[key]
                                       for key in ("loss", "distill", "lr", "centres_lr", "margin", "m1", "m2", "m3",
                                                   *HEALTH_METRICS, "samples_per_sec")
                                                   if record.get(key) is not None})

    def verification(self, record: dict[str, Any]) -> None:
        self._append("verification.jsonl", record)
        target = record["target"]
        self._scalars(record["step"], {f"verification/{target}": record["accuracy"],
                                       f"verification/{target}_std": record["accuracy_std"],
                                       f"verification/{target}_xnorm": record["xnorm"]})

    def verification_summary(self, step: int, group: str, summary: dict[str, Any]) -> None:
        """A benchmark's summary of its subsets (RFW's, ``train.rfw.summary``), as scalars: its subsets'
        records are in ``verification.jsonl``."""
        scalars = {f"verification/{group}_mean": summary["mean"], f"verification/{group}_std": summary["std"]}
        if summary["ser"] is not None:
            scalars[f"verification/{group}_ser"] = summary["ser"]
        self._scalars(step, scalars)

    def _scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            try:
                for tag, value in scalars.items():
                    self.writer.add_scalar(tag, value, step)
            except OSError as error:  # a full disk, a quota: met by the writer's thread, raised at its next call
                self.writer = None  # (whose close would raise it again)
                raise LogNotWritten(f"writing {os.path.join(self.output, 'tensorboard')} failed: "
                                    f"{_os_reason(error)}") from None
        if self.wandb is not None:
            self.wandb.log({"step": step, **scalars})

    def close(self, exit_code: int = 0) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as error:  # its last events, written at the close: said, the run's end left as it is
                print(f"warning: writing {os.path.join(self.output, 'tensorboard')} failed: {_os_reason(error)}; "
                      "TensorBoard lacks the last events", file=sys.stderr)
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=exit_code)
            except KeyboardInterrupt:  # a Ctrl-C in its wait for the upload, Python's own handler back
                # wandb 0.26.0 and later said "Control-C detected -- Run data was not synced" and raise it again,
                # where 0.17.2 ended the process (os._exit(-1)): its traceback under that line.
                raise SystemExit(128 + signal.SIGINT) from None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a log written by :class:`RunLog`. A torn last line, which a kill -9 or a full
    disk leaves mid-append, is dropped; a broken line before it is :class:`LogUnreadable`."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:  # (bytes: a line that is not UTF-8 is a broken line, named as one)
        lines = f.readlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            # (Without its line break: a line cut short in a string read as 'Invalid control character'.)
            records.append(json.loads(line.decode("utf-8").rstrip("\r\n")))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if number == len(lines):
                break
            if isinstance(error, json.JSONDecodeError):  # (its msg waits for the position: "Extra data", "... at")
                reason = f"{error.msg}{'' if error.msg.endswith(' at') else ' at'} column {error.colno}"
            else:
                reason = f"not UTF-8 text: {error.reason}"
            raise LogUnreadable(f"{path}: line {number} is not JSON ({reason}); delete or repair that line") from None
    return records


def options_changed_on_resume(saved: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The options of ``args`` that differ from ``saved`` (a checkpoint's) and may not change on
    resume, each as ``--flag X in the checkpoint, Y requested``."""
    from .config import build_parser, default_warmup_steps, option_text

    actions = [action for action in build_parser()._actions if action.option_strings]
    flags = {action.dest: action.option_strings[0] for action in actions}
    # An option newer than the checkpoint is not in it: that run had the option's default.
    defaults = {action.dest: action.default for action in actions if action.default is not None}

    # A length given in epochs in both runs is compared in epochs (converted at the epoch the schedule began
    # with, kept in the checkpoint: the same steps). Otherwise in steps, however each run gave it.
    in_epochs = {"warmup_steps": "warmup_epochs", "lr_steps": "lr_epochs",
                 "margin_warmup_steps": "margin_warmup_epochs"}
    skip = {steps if saved.get(epochs) is not None and getattr(args, epochs, None) is not None else epochs
            for steps, epochs in in_epochs.items()}
    changed = []
    for key, value in vars(args).items():
        if key in skip:
            continue
        if key not in saved and key in defaults:
            if key not in RESUME_MAY_CHANGE and value != defaults[key]:
                changed.append(f"{flags.get(key, key)} {option_text(key, defaults[key])} (the default: the "
                               f"checkpoint is older than the option), {option_text(key, value)} requested")
            continue
        if key in RESUME_MAY_CHANGE or key not in saved or saved[key] == value:
            continue
        if key == "warmup_steps" and (saved[key], value) == (
                default_warmup_steps(saved["max_steps"], saved["lr_schedule"]),
                default_warmup_steps(args.max_steps, args.lr_schedule)):
            continue  # the default, a share of --max-steps, which may change
        changed.append(f"{flags.get(key, key)} {option_text(key, saved[key])} in the checkpoint, "
                       f"{option_text(key, value)} requested")
    return changed


# Which of m1, m2 and m3 is the margin of a loss that has one (the others: m2); combined has three.
ONE_MARGIN = {"cosface": "m3", "elasticface-cos": "m3", "elasticface-cos+": "m3", "sphereface": "m1"}


def logged_margins(args: argparse.Namespace, step: int) -> dict[str, float]:
    """The margins of the optimiser step after ``step`` steps under ``--margin-warmup-steps``, as
    metrics.jsonl and the log lines give them: ``margin`` (the one the loss's flag sets: --arcface-m,
    cosface's --m3, sphereface's --m1; ElasticFace's mean) or, for --loss combined, ``m1``, ``m2``, ``m3``."""
    values = dict(zip(("m1", "m2", "m3"), warmed_up_margins(args, step)))
    return values if args.loss == "combined" else {"margin": values[ONE_MARGIN.get(args.loss, "m2")]}


def augmentation(args: argparse.Namespace):
    """The augmentations as the options ask for them (a `train.data.Augmentation`, false when all are
    off); options older than one (an earlier run's) are its default."""
    from .config import AUGMENTATION_FLAGS, BLUR_KERNEL, BLUR_SIGMA, HUE_SHIFT
    from .data import Augmentation

    # (--low-res-augmentation: args.low_res_augmentation, Augmentation's low_res)
    dests = [flag[2:].replace("-", "_") for flag in AUGMENTATION_FLAGS]
    probabilities = {dest.removesuffix("_augmentation"): getattr(args, dest, 0.0) for dest in dests}
    return Augmentation(**probabilities, blur_kernel=getattr(args, "blur_kernel", BLUR_KERNEL),
                        blur_sigma=tuple(getattr(args, "blur_sigma", BLUR_SIGMA)),
                        hue_shift=getattr(args, "hue_shift", HUE_SHIFT))


def chunked_loss(args: argparse.Namespace) -> bool:
    """Whether the loss runs on arcface_ext's chunked PyTorch path rather than the fused op; with
    --loss-impl reference, on the path's whole-matrix reference."""
    return (getattr(args, "subcenters", 1) > 1 or getattr(args, "interclass_filter", 0.0) > 0
            or args.loss == "curricularface")


def loss_implementation(args: argparse.Namespace) -> str:
    """What the run's log says computes the loss."""
    amp = args.loss_amp != "none"
    if args.loss_impl == "reference":  # (train_step leaves --loss-amp out)
        return ("reference: PyTorch on the whole matrix, fp32" if chunked_loss(args) else "reference, fp32") \
            + (f" (--loss-amp {args.loss_amp} is the fused op's, not applied)" if amp else "")
    if not chunked_loss(args):
        # (--loss-amp is named: the network's line gives --amp, the trunk's, and the module's repr neither)
        return "fused" + (f", under --loss-amp {args.loss_amp} autocast" if amp else "")
    if amp:
        return f"chunked PyTorch path, fp32, its matrix products on {args.loss_amp} operands (--loss-amp)"
    return "chunked PyTorch path, fp32"


def build_margin_loss(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The loss as a module that owns its class centres and is called as
    ``loss(embeddings, labels, return_target_cosine=True)``.

    With ``--sharded-classes`` it holds only this rank's centres and gathers the embeddings itself;
    its ``sharded = True`` tells the trainer neither to wrap it in DDP nor to treat its state as
    replicated (checkpoints gather it).
    """
    import arcface_ext

    # (The chunked PyTorch path's options: config.resolve refuses what it lacks.)
    interclass_filter = getattr(args, "interclass_filter", 0.0)
    subcenters = getattr(args, "subcenters", 1)
    if subcenters > 1 and not args.sharded_classes:
        m1, m2, m3 = margins(args)
        return arcface_ext.SubCenterMarginLoss(num_classes, args.embedding_size, k=subcenters, s=args.arcface_s,
                                               m1=m1, m2=m2, m3=m3, margin_grad=args.margin_grad, check_labels=False,
                                               interclass_filtering_threshold=interclass_filter,
                                               sample_rate=args.sample_rate,
                                               use_reference=args.loss_impl == "reference")
    # (CurricularFace and the filtering on replicated centres are pure PyTorch: no compiled op needed.)
    needs_extension = args.sharded_classes or not chunked_loss(args)
    if args.loss_impl == "fused" and needs_extension and not arcface_ext.extension_available():
        raise SystemExit("arcface_ext's compiled op is not built: run `pip install --no-build-isolation -e .` "
                         "from the repository root, or train with --loss-impl reference (pure PyTorch, slower)")
    m1, m2, m3 = margins(args)
    # Every label was checked when its image was read (the datasets check them against their number of
    # classes, the loss's): no label check in the loss, a device sync in the middle of every step on a
    # GPU. (A bad label would still stop the run, as a NaN loss.)
    common = dict(sample_rate=args.sample_rate, check_labels=False)
    if args.margin_grad != "exact":  # (MagFace refuses it in config.resolve)
        common["margin_grad"] = args.margin_grad
    if subcenters > 1:  # (sharded: the replicated form is above)
        return arcface_ext.ShardedSubCenterMarginLoss(num_classes, args.embedding_size, k=subcenters, s=args.arcface_s,
                                                      m1=m1, m2=m2, m3=m3,
                                                      interclass_filtering_threshold=interclass_filter, **common)
    if args.sharded_classes:
        adaface, elasticface, combined = (arcface_ext.ShardedAdaFaceLoss, arcface_ext.ShardedElasticFaceLoss,
                                          arcface_ext.ShardedCombinedMarginLoss)
    else:
        adaface, elasticface, combined = (arcface_ext.AdaFaceLoss, arcface_ext.ElasticFaceLoss,
                                          arcface_ext.CombinedMarginLoss)
        common["use_reference"] = args.loss_impl == "reference"
    if args.loss == "adaface":
        return adaface(num_classes, args.embedding_size, s=args.arcface_s, m=args.adaface_m, h=args.adaface_h,
                       **common)
    if args.loss == "magface":
        return arcface_ext.MagFaceLoss(num_classes, args.embedding_size, s=args.arcface_s,
                                       easy_margin=args.magface_easy_margin, **common)
    if args.loss == "curricularface":
        curricular = arcface_ext.ShardedCurricularFaceLoss if args.sharded_classes else arcface_ext.CurricularFaceLoss
        return curricular(num_classes, args.embedding_size, s=args.arcface_s, m=m2, **common)
    if interclass_filter > 0:  # (sharded too)
        common["interclass_filtering_threshold"] = interclass_filter
    if args.loss.startswith("elasticface"):
        kind, plus = args.loss.split("-")[1].rstrip("+"), args.loss.endswith("+")
        return elasticface(num_classes, args.embedding_size, s=args.arcface_s, m=m2 if kind == "arc" else m3,
                           std=args.elastic_std, kind=kind, plus=plus, **common)
    return combined(num_classes, args.embedding_size, s=args.arcface_s, m1=m1, m2=m2, m3=m3, **common)


def build_optimizer(args: argparse.Namespace, backbone: nn.Module, margin_loss: nn.Module) -> torch.optim.Optimizer:
    # One group per module, as insightface does, so that a sharded loss can bring its own; the centres' at
    # --lr x --centres-lr-scale (LambdaLR scales each group's own base rate). (getattr: a caller's args of before.)
    centres_lr = args.lr * getattr(args, "centres_lr_scale", 1.0)
    groups = [
        {"params": [p for p in backbone.parameters() if p.requires_grad], "name": "backbone"},
        {"params": [p for p in margin_loss.parameters() if p.requires_grad], "name": "class_centers", "lr": centres_lr},
    ]
    if args.optimizer == "sgd":
        return SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.decay)
    return AdamW(groups, lr=args.lr, weight_decay=args.decay)


def _error_line(message: str, rank: int | None = None) -> str:
    """The trainer's error line, ``train: error: <message>``: it begins with the command's name, as every
    command's does (``roc: error: ...``); ``train: error: rank R: <message>`` where each process of a torchrun
    run says its own (``rank``)."""
    return f"train: error: {'' if rank is None else f'rank {rank}: '}{message}"


def _waited_too_long(args: argparse.Namespace, when: str, rank: int, why: str | None = None) -> str:
    """Process ``rank``'s error line for a collective that waited past the process group's timeout (``when``:
    "during step 3"): rank 0 alone reads the verification sets at start-up, and verifies and writes the
    checkpoints later, while the others wait for it. Rank 0 itself waited for another process: one that fell
    behind (its shard of the data on a slower disk, say) or hung. ``why``: the collective's own reason (its
    error's ``rank_0_alone``), where rank 0 did something else alone."""
    if rank == 0:
        why = "another process fell behind (its data on a slower disk, say) or hung"
    elif why is None:
        alone = ("reads the verification sets" if when == "during start-up" else
                 "verifies and writes the checkpoints")
        why = f"rank 0 {alone} while the others wait: a slow disk or a long verification needs a longer --dist-timeout"
    return _error_line(f"waited more than --dist-timeout {args.dist_timeout:g} minutes for the other processes {when} "
                       f"({why})", rank)


def _sentence(text: str) -> str:
    """``text`` as the start of a sentence (its first letter upper-case)."""
    return text[:1].upper() + text[1:]


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(spec)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index >= count:
            raise SystemExit(f"--device {spec}: this process (LOCAL_RANK {local_rank}) would use {device}, but "
                             f"{count} CUDA device(s) are visible; start one process per GPU "
                             "(torchrun --nproc_per_node) or pass --device cpu")
    return device


@contextlib.contextmanager
def _kept_stderr() -> Iterator[list[str]]:
    """sys.stderr passed on as it is, and what is written to it kept in the list yielded. What was
    installed on it meanwhile stays: W&B's console capture, started in the set-up, patches the write
    of the sys.stderr it finds (this one), and a stream may wrap it; the copy then stays in place,
    passing everything on without keeping it."""
    class Tee:
        def __init__(self, stream):
            self.stream = stream
            self.keeping = True

        def write(self, text):
            written = self.stream.write(text)  # (first: what the stream refuses, bytes, is not kept)
            if self.keeping and isinstance(text, str):
                kept.append(text)
            return written

        def __getattr__(self, name):  # isatty, fileno, flush, encoding: the stream's
            return getattr(self.stream, name)

    kept: list[str] = []
    stream = sys.stderr
    tee = sys.stderr = Tee(stream)
    try:
        yield kept
    finally:
        tee.keeping = False
        if sys.stderr is tee and "write" not in vars(tee):
            sys.stderr = stream


class Trainer:
    """One training run, set up from parsed options (see :mod:`train.config`)."""

    def __init__(self, args: argparse.Namespace, read_notes: str = ""):
        # What the set-up says (notes, warnings) goes to training.log too, written once the folder's
        # earlier run, with its log, has been set aside; so does ``read_notes``, what reading the options
        # said before it (main's: how an arcface_torch config was read, which set the --lr, say).
        with _kept_stderr() as said:
            self._set_up(args)
        if self.is_main:
            import arcface_ext

            try:
                self.log.text(f"=== {'resumed' if self.resumed_from else 'started'} at step {self.step}: host "
                              f"{socket.gethostname()}, process {os.getpid()}, torch {torch.__version__}, "
                              f"arcface_ext {arcface_ext.__version__}")
                self.log.text(read_notes + "".join(said))
            except LogNotWritten as error:  # a full disk, a quota
                raise SystemExit(str(error)) from None  # (main's "train: error: " goes before it)

    def _set_up(self, args: argparse.Namespace) -> None:
        from .data import (RANDOM, CombinedFaces, RandomFaces, build_train_dataset, build_train_loader,
                           build_verification_sets, check_every_rank_reads_the_same, resized_note)

        self.args = args
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if args.wandb and self.rank == 0:
            wandb_module()  # a missing package is said before the data is read
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _resolve_device(args.device, local_rank)
        if self.device.type == "cuda":
            # Every step has the same shapes: cuDNN times its convolution algorithms once per shape
            # and keeps the fastest (arcface_torch's train_v2.py does the same).
            torch.backends.cudnn.benchmark = True
        self.distributed = self.world_size > 1
        if self.distributed:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            start_process_group("nccl" if self.device.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(minutes=args.dist_timeout))
        self.is_main = self.rank == 0
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Leave a core to each DataLoader worker: oversubscribed OpenMP threads spin and stall (on a
            # container's CPU quota too, which the affinity does not show).
            cores = usable_cpus()
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            workers = 0 if args.data == RANDOM else args.num_workers  # (random data has no loader workers)
            torch.set_num_threads(max(1, cores // local_world_size - workers))
        self.output = args.output
        self.working_directory = os.getcwd()  # what the run's relative paths (--data, ...) are relative to
        self.checkpoint_path = os.path.join(self.output, checkpoint.CHECKPOINT_NAME)
        self._lock_output()

        seed_everything(args.seed)  # the same initial weights on every rank
        synthetic_size = {}
        if args.data == "synthetic":
            synthetic_size = {"synthetic_identities": args.synthetic_identities,
                              "synthetic_images_per_identity": args.synthetic_images_per_identity}
        try:
            if args.data == RANDOM:  # (its classes are --num-classes, which config.resolve has required)
                self.dataset = RandomFaces(args.num_classes, image_size=args.image_size, seed=args.seed)
                self.num_classes = self.dataset.num_classes
            else:
                self.dataset, self.num_classes = build_train_dataset(
                    args.data, image_size=args.image_size, seed=args.seed, flip=True, augment=augmentation(args),
                    **synthetic_size)
        except (OSError, ValueError) as error:  # the messages name the file and what is wrong
            raise SystemExit(str(error)) from None
        if self.is_main and isinstance(self.dataset, CombinedFaces):  # (where each set's identities went)
            print(f"note: --data is {len(self.dataset.parts)} sets, {len(self.dataset)} images of {self.num_classes} "
                  "identities, an identity of one set never taken for one of another: "
                  + "; ".join(self.dataset.describe()), file=sys.stderr)
        for name, dataset in getattr(self.dataset, "parts", [(args.data, self.dataset)]) if self.is_main else []:
            resized = resized_note(name, dataset, args.image_size, "--image-size")
            if resized:
                print(resized, file=sys.stderr)
            if getattr(dataset, "labels_note", None):  # a list file's labels, not 0..C-1
                print(f"note: {name}: {dataset.labels_note}", file=sys.stderr)
            if getattr(dataset, "repeats_note", None):  # a list naming an image twice
                print(f"warning: {name}: {dataset.repeats_note}", file=sys.stderr)
        if args.num_classes is not None and args.num_classes != self.num_classes:
            held = f"{self.num_classes} identit{'y' if self.num_classes == 1 else 'ies'}"
            then = (" (no --data given?)" if args.data == "synthetic"
                    else f": give --num-classes {self.num_classes} for it")
            raise SystemExit(f"--num-classes is {args.num_classes}, but {args.data} holds {held}{then}")
        self.data_fingerprint = self.dataset.fingerprint()  # (an ImageFolder's joins every file name: once)
        self.data_classes = self.dataset.classes_digest()
        if self.distributed:
            check_every_rank_reads_the_same(self.dataset, args.data, self.data_fingerprint)
        step_batch = args.batch_size * args.gradient_acc
        images_per_process = math.ceil(len(self.dataset) / self.world_size)
        resuming = args.resume and (args.resume != "auto" or os.path.isfile(self.checkpoint_path))
        if step_batch > images_per_process and args.data != RANDOM:  # (random's one batch is any size)
            raise SystemExit(f"--batch-size {args.batch_size}"
                             + (f" x --gradient-acc {args.gradient_acc}" if args.gradient_acc > 1 else "")
                             + f" is more than the {images_per_process} images"
                             + (f" each of the {self.world_size} processes reads" if self.distributed else "")
                             + f" of {args.data}: "
                             + ("run fewer processes (a resumed run keeps its --batch-size)" if resuming and
                                self.distributed else "lower it"))
        # The epoch the sampler walks: the images a process reads, in whole steps (drop_last).
        self.steps_per_epoch = max(1, images_per_process // step_batch)  # (random data: at least one)
        # The lengths in epochs become steps of that epoch; a resumed run takes the epoch its schedule began
        # with (kept in the checkpoint), whose steps the step it resumes at counts: on another number of
        # processes this run's moved the schedule under it (1 of 2 epochs done on 8 GPUs was epoch 0.5 of 2
        # on 4, which then trained 2.5), and so did its checkpoint's for the next resume.
        resumed_epoch = self._resumed_steps_per_epoch(step_batch) if resuming and any(
            getattr(args, key) is not None for key in ("epochs", "warmup_epochs", "lr_epochs", "margin_warmup_epochs")
        ) else None
        self.schedule_steps_per_epoch = resumed_epoch or self.steps_per_epoch
        steps_from_epochs(args, self.schedule_steps_per_epoch)
        if self.rank == 0:
            for note in unused_options(args, self.world_size):
                print(f"note: {note}", file=sys.stderr)
        self.verification_sets = {}
        if self.is_main:
            try:
                self.verification_sets = build_verification_sets(args.data, args.val_targets,
                                                                 image_size=args.image_size, seed=args.seed)
            except (OSError, ValueError, pickle.UnpicklingError) as error:
                raise SystemExit(str(error)) from None
        try:
            self.backbone = get_model(args.network, embedding_size=args.embedding_size, dropout=1.0 - args.keep_prob,
                                      image_size=args.image_size, gradient_checkpointing=args.gradient_checkpointing,
                                      amp=args.amp).to(self.device)
            if is_factory_spec(args.network):  # (the networks here are known to give N x --embedding-size)
                check_embedding_shape(self.backbone, args.embedding_size, args.image_size)
        except ValueError as error:  # a size the network cannot take; a factory not there, or of another shape
            raise SystemExit(f"--network {args.network} --image-size {args.image_size}: {error}") from None
        # MagFace's network learns its embedding BatchNorm's scale, which insightface's iResNet fixes at 1: with it
        # fixed, the norms MagFace reads as quality cannot spread (learn_embedding_scale). A run resumed from a
        # checkpoint of before keeps it fixed, as it began (_load_training_state).
        self.embedding_scale_learned = args.loss == "magface" and learn_embedding_scale(self.backbone)
        if args.network.startswith("__main__:") and self.rank == 0:
            print(f"note: --network {args.network} is found in this program only: train.export, train.embed, "
                  "train.verify and python -m train --resume import __main__ as their own and will not find it; "
                  f"put it in a module and name it module:{args.network.partition(':')[2]}", file=sys.stderr)
        if args.batch_size < 2 and any(isinstance(m, nn.BatchNorm1d) for m in self.backbone.modules()):
            raise SystemExit(f"--batch-size {args.batch_size}: the BatchNorm of {args.network}'s embedding head needs "
                             "at least 2 images a pass to normalise over")
        if args.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.input_memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.teacher = self._load_teacher() if args.teacher else None
        self.distill_value = 0.0  # the last step's distillation term (mean over passes and processes)
        if args.sharded_classes and self.num_classes < self.world_size:
            raise SystemExit(f"--sharded-classes gives each of the {self.world_size} processes at least one class, but "
                             f"the data has {self.num_classes} identities: run fewer processes, or replicated centres")
        if args.save_sharded and not (args.sharded_classes and self.distributed) and self.is_main:
            print(f"note: --save-sharded takes --sharded-classes under torchrun: on "
                  f"{'one process' if not self.distributed else 'replicated centres'} the checkpoint is one file, "
                  f"{checkpoint.CHECKPOINT_NAME}, as without it", file=sys.stderr)
        self.margin_loss = build_margin_loss(args, self.num_classes).to(self.device)
        self.optimizer = build_optimizer(args, self.backbone, self.margin_loss)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LearningRateSchedule(args.lr_schedule, args.max_steps, args.warmup_steps, args.lr_steps))
        # After an overflow the scale grows back after 100 clean steps, as in arcface_torch (torch's
        # default, 2,000, leaves more small fp16 gradients at zero for longer).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled="fp16" in (args.amp, args.loss_amp),
                                           growth_interval=100)
        # The scaler skips the steps whose fp16 gradients overflow (a few at the start, by design);
        # the schedule still advances, which torch warns about.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        # The fp16 scaler's skipped steps, counted on the device (a read is a sync: the logged steps' only): since
        # the last line, and in a row (the checkpoint keeps it, as it keeps the scale).
        self.skipped_steps = torch.zeros((), dtype=torch.int32, device=self.device)
        self.skipped_in_a_row = torch.zeros((), dtype=torch.int32, device=self.device)
        self._one = torch.ones((), device=self.device)
        self.health: dict[str, float | None] = {}  # HEALTH_METRICS of the last logged step (train_step)
        self.angles = TargetAngles(args.max_steps, args.batch_size)
        self.step = 0
        self.elapsed = 0.0  # training seconds before this process, carried over by resume
        # The step self.elapsed counts from: an arcface_torch run's (its files hold no time), carried over by resume.
        self.timed_from = 0
        self.last_verification: dict[str, dict[str, float]] = {}
        # The step whose verification a stop cut short: its checkpoint says so, and the resumed run does
        # the sets left before its first step (a pre-emption during every such verification left holes).
        self.verification_cut_short_at: int | None = None
        self.wandb_run_id: str | None = None  # the --wandb run this one logs to (a resumed run's, kept on)
        resumed_rng = None

        wandb_run = None
        resume = self._resume_path()
        self.resumed_from = resume
        if resume:
            resumed_rng = self._load_training_state(resume)
            # A checkpoint from another folder: whatever run this folder holds is not the one
            # continued, and its checkpoint and logs must not be overwritten or spliced into.
            own = self.checkpoint_path
            moves = not (os.path.exists(own) and os.path.samefile(own, resume))
            if moves and self.step >= args.max_steps:  # (it would set that run aside and leave no checkpoint)
                raise SystemExit(f"--resume {resume}: {self._nothing_to_train()}; --output {self.output} is left as "
                                 "it was")
            # Before the folder changes: a W&B run that cannot start leaves it as it was.
            wandb_run = self._start_wandb()
            if self.distributed and moves:  # every rank has read the checkpoint before its folder changes
                dist.barrier()
            # arcface_torch's run in --output, continued there: its checkpoint_gpu_<rank>.pt stay, for --resume auto
            # to find again should this run stop before its first checkpoint (in earlier-<n>/ it started afresh).
            in_place = (bool(checkpoint.INSIGHTFACE_SHARD.fullmatch(os.path.basename(resume)))
                        and os.path.samefile(os.path.dirname(os.path.abspath(resume)), self.output))
            if self.is_main and moves:
                aside = set_aside_earlier_run(self.output, keep=in_place)
                if aside and in_place:
                    print(f"note: the other files in {self.output} (arcface_torch's log, an earlier start's) are now "
                          f"in {aside}; its checkpoint_gpu_<rank>.pt stay, which --resume auto continues until this "
                          f"run writes its {checkpoint.CHECKPOINT_NAME}", file=sys.stderr)
                elif aside:
                    print(f"note: {self.output} held another run than the one in {resume}; its files are now "
                          f"in {aside}", file=sys.stderr)
                    self._follow_teacher_set_aside(aside)
        else:
            if args.pretrained_model:
                self._load_pretrained(args.pretrained_model)
            wandb_run = self._start_wandb()
            # After every process has read --pretrained_model, which may be the earlier run's checkpoint
            # (or train.export's backbone.pt beside it); only the main process writes into the folder.
            if self.distributed:
                dist.barrier()
            aside = set_aside_earlier_run(self.output) if self.is_main else None
            if aside:
                # (an arcface_torch run set aside has no checkpoint that --resume takes)
                resumable = os.path.exists(os.path.join(aside, checkpoint.CHECKPOINT_NAME))
                print(f"note: {self.output} held an earlier run; its files are now in {aside}" + (
                      "" if args.resume or not resumable else " (to continue a run, pass --resume auto, or --resume "
                      "with its checkpoint)"), file=sys.stderr)
                self._follow_teacher_set_aside(aside)

        self.backbone_ddp, self.loss_ddp = self.backbone, self.margin_loss
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.backbone_ddp = nn.parallel.DistributedDataParallel(self.backbone, device_ids=ids)
            if not getattr(self.margin_loss, "sharded", False):
                # Replicated class centres: DDP averages their gradients like the backbone's.
                self.loss_ddp = nn.parallel.DistributedDataParallel(self.margin_loss, device_ids=ids)

        if args.compile:
            # The DDP wrapper is compiled, not the module under it: its optimiser then splits the graph
            # at the gradient buckets, so that all-reduces still overlap the backward.
            self.backbone_ddp = torch.compile(self.backbone_ddp, backend=args.compile_backend, mode=args.compile_mode)

        # A step's --gradient-acc passes come as one batch, split in train_step.
        self.loader = build_train_loader(self.dataset, batch_size=step_batch, num_workers=args.num_workers,
                                         seed=args.seed, distributed=self.distributed, drop_last=True,
                                         start_step=self.step, device=self.device)
        # Restored last, after everything that draws from the generators at start-up.
        if resumed_rng is not None:
            if self.rank < len(resumed_rng):
                checkpoint.set_rng_state(resumed_rng[self.rank])
            else:  # a process the saved run did not have: a stream of its own, not another rank's
                seed_everything(args.seed + self.rank + self.world_size * self.step)
        else:
            seed_everything(args.seed + self.rank)  # independent dropout masks per rank
        # (A run resumed from another folder's checkpoint: that folder's logs up to its step begin this one's.)
        history = os.path.dirname(os.path.abspath(resume)) if resume else None
        try:
            self.log = RunLog(self.output, self.step, args.tensorboard, wandb_run, history, logged_options(args),
                              self.verification_sets) if self.is_main else None
            if self.is_main:
                checkpoint.write_json_atomic(os.path.join(self.output, "args.json"), vars(args))
        except OSError as error:  # a full disk, a quota
            raise SystemExit(f"--output {self.output}: cannot write into the folder: {_os_reason(error)}") from None
        except LogUnreadable as error:  # (the logs a resume continues)
            raise SystemExit(str(error)) from None
        if self.is_main:
            self._best_of_an_older_checkpoint(self.log.kept["verification.jsonl"])

        self._stop_signal = 0
        self._stop_signal_at = 0.0  # (time.monotonic()'s)
        self._stop_signal_step = 0  # self.step when it came (in the last step or after it: the run ends, exit 0)
        self._late_signal_said = False
        self._final_verification_cut = False  # (left to a resume by a stop at the last step or after it)
        self._verifies_at_the_end = True  # whether the run has verification sets (rank 0's), agreed after its last step
        self._ended_as_usual = False  # (its done: line said)
        self._quit_at_once = False  # a second signal: nothing more is written, the figures left out
        self._previous_handlers: dict[int, Any] = {}
        self._error_said = None  # the error said before the process group was left (_fit), if one was
        self._started = time.perf_counter()

    def _make_output(self) -> str:
        """The --output folder, made where it is missing; what stops the run there ("": nothing)."""
        try:
            os.makedirs(self.output, exist_ok=True)
        except OSError as error:  # a file in the way, a read-only file system, no permission
            in_the_way = checkpoint.nearest_existing(self.output)
            if in_the_way == os.path.abspath(self.output):  # (was "cannot create the folder: File exists")
                return (f"--output {self.output} exists and is not a folder{checkpoint.dangling(self.output)}: name "
                        "a folder for the run")
            if not os.path.isdir(in_the_way):  # (was "cannot create the folder: Not a directory")
                return (f"--output {self.output}: {in_the_way} is {checkpoint.what_stands_at(in_the_way)}, not a "
                        "folder to make the run's folder in")
            return f"--output {self.output}: cannot create the folder: {error.strerror or error}"
        if not os.access(self.output, os.W_OK | os.X_OK):
            return f"--output {self.output}: cannot write into the folder"
        return ""

    def _lock_output(self) -> None:
        """One run at a time in --output: a second (the same command started twice) would move the first's
        files aside while it runs and interleave its logs with them. The main process makes the folder and
        holds the lock file for the run (released when it ends or fails; a killed run's lock the next run
        takes); every process stops, with one message, when the folder cannot be made or another run holds
        it. A second Trainer of this process on the same folder (as tests make them) shares the lock.
        The other processes write nothing there, nor make it: one that made it had to undo it when the
        run stopped at start-up (_undo_start), removing the files the main process was still writing."""
        made = self.is_main and not os.path.isdir(self.output)
        # (The folders above it that it makes with it: n1/ and n1/n2/ of a new --output n1/n2/n3, the default's
        # runs/ in a fresh clone. Deepest first.)
        above = folders_missing(self.output)[1:] if made else []
        refused = self._make_output() if self.is_main else ""
        key = os.path.realpath(self.output)
        if self.is_main and not refused and key not in _OUTPUT_LOCKS:
            from .tools import RunLock

            # What the folder held, for an undo at start-up to put back (_undo_start): listed once the lock is
            # held, not before, when another whole run could still come and go there (its earlier run set aside
            # into earlier-<n>, which the undo then took for this run's and moved back over the folder).
            _OUTPUT_FOUND.pop(key, None)
            _OUTPUT_MADE_ABOVE.pop(key, None)
            if made:  # (already: a run refused the lock, or stopped before it, removes the empty folder it made)
                _OUTPUT_FOUND[key] = None
                _OUTPUT_MADE_ABOVE[key] = above
            try:
                lock = RunLock(os.path.join(self.output, OUTPUT_LOCK_NAME),
                               f"--output {self.output}: another run is writing into this folder (it holds its lock "
                               "file): wait for it to end, stop it, or name another --output")
            except (OSError, ValueError) as error:
                refused = str(error)
            else:
                try:
                    if not made:
                        _OUTPUT_FOUND[key] = set(os.listdir(self.output))
                    _OUTPUT_LOCKS[key] = lock
                except OSError as error:  # (a folder it may write into but not list)
                    lock.release()
                    refused = f"--output {self.output}: cannot read the folder: {error.strerror or error}"
        if self.distributed:
            said = [None] * self.world_size
            dist.all_gather_object(said, refused)
            refused = said[0]
        if refused:
            raise SystemExit(refused)

    def release_output(self) -> None:
        """Lets another run write into --output (the end of ``fit``)."""
        _release_output_lock(self.output)

    # ----------------------------------------------------------------- state

    def _start_wandb(self):
        """The --wandb run (main process; a resumed run's own, whose id its checkpoint keeps), or None."""
        if not (self.args.wandb and self.is_main):
            return None
        run = start_wandb(self.args, self.output, self.wandb_run_id)
        self.wandb_run_id = run.id
        return run

    def _resume_path(self) -> str | None:
        resume = self.args.resume
        if not resume:
            return None
        path = self.checkpoint_path if resume == "auto" else resume
        found = os.path.isfile(path)
        # arcface_torch's own checkpoints (config.resume = True into the folder of a run it trained):
        # that run was to be continued, not replaced by one from scratch.
        foreign = [] if found or resume != "auto" or not os.path.isdir(self.output) else \
            checkpoint.insightface_shards(self.output)
        if self.distributed:
            # Every rank must take the same decision: a node-local --output that holds the checkpoint
            # on some nodes only had one rank resume and another start afresh, waiting on each other.
            seen = [None] * self.world_size
            dist.all_gather_object(seen, (found, bool(foreign)))
            if len({f for f, _ in seen}) > 1:
                raise SystemExit(f"--resume {resume}: rank(s) {[r for r, (f, _) in enumerate(seen) if not f]} find "
                                 f"no checkpoint at {path}, the others do: every process must see the same checkpoint "
                                 "(an --output folder shared by the nodes)")
            if len({bool(f) for _, f in seen}) > 1:
                raise SystemExit(f"--resume auto: rank(s) {[r for r, (_, f) in enumerate(seen) if not f]} find no "
                                 f"checkpoint_gpu_<rank>.pt of arcface_torch's in {self.output}, the others do: every "
                                 "process must see the same checkpoint (an --output folder shared by the nodes)")
        if found:
            return path
        if resume != "auto" and os.path.isdir(resume):
            # (a run's folder given for its checkpoint, as `python -m train --resume runs/r50` reads)
            inside = os.path.join(resume, checkpoint.CHECKPOINT_NAME)
            try:
                shards = checkpoint.insightface_shards(resume)
            except OSError:  # (a folder it may not list)
                shards = []
            if os.path.isfile(inside):
                then = f": --resume {inside}, or --resume auto with --output {resume}"
            elif shards:  # (arcface_torch's run folder: the run its files are, continued from any one of them)
                return os.path.join(resume, shards[0])
            else:
                then = (f", and holds no {checkpoint.CHECKPOINT_NAME}: name the checkpoint file of the run to "
                        "continue")
            raise SystemExit(f"--resume {resume} is a folder, not a checkpoint file{then}")
        if resume != "auto":
            raise SystemExit(f"--resume: no checkpoint at {resume}")
        if foreign:  # (config.resume = True into the folder of a run arcface_torch trained: that run continues)
            return os.path.join(self.output, foreign[0])
        if self.is_main:
            print(f"note: --resume auto: no checkpoint in {self.output}, starting from scratch", file=sys.stderr)
        return None

    def _resumed_steps_per_epoch(self, step_batch: int) -> int | None:
        """The steps an epoch of the schedule that --resume will continue, when there is a checkpoint to read
        (what is wrong with one is said by _load_training_state): as it records them, or, in a checkpoint
        older than the record, those of its number of processes (its generator states, one a process)."""
        path = self.checkpoint_path if self.args.resume == "auto" else self.args.resume
        try:
            state = checkpoint.load(path, mmap=True)
            if "steps_per_epoch" in state:
                return int(state["steps_per_epoch"])
            return max(1, math.ceil(len(self.dataset) / len(state["rng"])) // step_batch)
        except Exception:
            return None

    def _load_training_state(self, path: str) -> list[dict[str, Any]]:
        try:
            state = checkpoint.load(path, mmap=True)
        except checkpoint.OnnxModelGiven:
            # (load's line points at backbone.pt, which --resume refuses in turn: name the flag that takes it)
            beside = os.path.join(os.path.dirname(path), "backbone.pt")
            weights = beside if os.path.isfile(beside) else "train.export's backbone.pt or insightface's backbone.pth"
            raise SystemExit(f"--resume {path} is an ONNX model, not a training checkpoint (--resume continues a run "
                             f"of this trainer from its {checkpoint.CHECKPOINT_NAME}): start a new run from the "
                             f"weights it was exported from with --pretrained_model {weights}") from None
        except ValueError as error:
            raise SystemExit(f"--resume: {error}") from None
        if isinstance(state, dict) and "state_dict_softmax_fc" in state:
            return self._load_arcface_torch_state(path, state)
        if not (isinstance(state, dict) and {"args", "step", "optimizer"} <= state.keys()):
            raise SystemExit(f"--resume {path}: not a training checkpoint of this trainer (to start from a "
                             "backbone's weights, use --pretrained_model)")
        # (before the options: a resume without the run's --teacher also lacks its --distill-weight, and the
        # teacher is what to name)
        self._check_resumed_teacher(state, path)
        changed = options_changed_on_resume(state["args"], self.args)
        if changed:
            run_args = os.path.join(os.path.dirname(path), "args.json")
            own = (f"--config {run_args}, which lists them all, with --resume" if os.path.isfile(run_args) else
                   "its --config, or the values above")
            raise SystemExit(f"--resume {path}: {'; '.join(changed)}. Continue that run with its own options ({own}), "
                             f"or start a new one (another --output) from its weights with --pretrained_model {path}")
        if state.get("num_classes") != self.num_classes:
            raise SystemExit(f"{path}: checkpoint has {state.get('num_classes')} classes, the data has "
                             f"{self.num_classes}; resume needs the same data (use --pretrained_model to fine-tune)")
        self._check_resumed_data(state, path)
        # (was not loaded without a word; the run's own, given again with its command line, went in at its start)
        given = self.args.pretrained_model
        if self.is_main and given and given != state["args"].get("pretrained_model"):
            print(f"note: --pretrained_model {given} is not loaded: a resumed run continues from the weights of "
                  f"{path}", file=sys.stderr)
        if self.embedding_scale_learned and not state.get("embedding_scale_learned", False):
            # A MagFace run of an earlier version, whose scale was fixed: it goes on so (its optimizer state has no
            # entry for the scale), the optimizer and its schedule made again without it.
            self.backbone.features.weight.requires_grad_(False)
            self.embedding_scale_learned = False
            self.optimizer = build_optimizer(self.args, self.backbone, self.margin_loss)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.scheduler.lr_lambdas[0])
            if self.is_main:
                print(f"note: {path} began with the embedding BatchNorm's scale fixed at 1, as versions before MagFace "
                      "learnt it did: it stays fixed in this run", file=sys.stderr)
        if "centre_shards" in state:  # (--save-sharded's: the centres from the files it names)
            state = self._with_centre_shards(path, state)
        self.backbone.load_state_dict(state["model"])
        self.margin_loss.load_state_dict(state["margin_loss"])  # a sharded loss keeps its rows
        # Copies: load_state_dict keeps a state tensor of the right dtype and device as it is, and a view of
        # the file mapping (mmap=True) kept the whole checkpoint mapped for the run (its pages resident, and
        # its disk space taken after the next save replaced it: 4.1 GB at a million classes).
        self.optimizer.load_state_dict(_copied_tensors(shard_optimizer_state(self.margin_loss, self.optimizer,
                                                                             state["optimizer"])))
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows the current options (e.g. a larger --max-steps), not the file's: in
        # every parameter group, from the next step on (the loaded learning rates are the file's).
        schedule = LearningRateSchedule(self.args.lr_schedule, self.args.max_steps, self.args.warmup_steps,
                                        self.args.lr_steps)
        self.scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * schedule(self.scheduler.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_in_a_row.fill_(int(state.get("skipped_in_a_row", 0)))  # (a checkpoint of before: none)
        self.step = int(state["step"])
        if self.distributed:  # node-local copies of the checkpoint must be the same one
            steps = [None] * self.world_size
            dist.all_gather_object(steps, self.step)
            if len(set(steps)) > 1:
                raise SystemExit(f"--resume {path}: the ranks' checkpoints are at different steps {steps}: every "
                                 "process must resume from the same checkpoint")
        self.angles.load_state_dict(_copied_tensors(state["target_angles"]), self.step)
        self.elapsed = float(state.get("elapsed", 0.0))
        self.timed_from = int(state.get("timed_from", 0))
        self.last_verification = state.get("verification", {})
        if state.get("verification_cut_short"):
            self.verification_cut_short_at = self.step
        self.wandb_run_id = state.get("wandb_run_id")  # kept also while --wandb is off, for a later resume
        if self.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)
            saved_world = len(state["rng"])  # one generator state a process
            if saved_world != self.world_size:
                step_batch = self.args.batch_size * self.args.gradient_acc
                print(f"note: that run had {saved_world} process(es), a batch of {step_batch * saved_world} a step; "
                      f"this one has {self.world_size}, {step_batch * self.world_size} a step (--batch-size is a "
                      "process's): the learning rate is as it was, and the data order from here on is not the "
                      "uninterrupted run's", file=sys.stderr)
            a = self.args
            given = [flag for flag, value in (("--epochs", a.epochs), ("--warmup-epochs", a.warmup_epochs),
                                              ("--lr-epochs", a.lr_epochs),
                                              ("--margin-warmup-epochs", a.margin_warmup_epochs)) if value is not None]
            if given and self.schedule_steps_per_epoch != self.steps_per_epoch:
                print(f"note: {', '.join(given)} {'is' if len(given) == 1 else 'are'} counted in the epochs of "
                      f"{count_of(self.schedule_steps_per_epoch, 'step')} the run began with, as the steps it took "
                      f"were, and so are the progress lines' epochs (this run reads the data in "
                      f"{count_of(self.steps_per_epoch, 'step')})", file=sys.stderr)
        return state["rng"]

    def _with_centre_shards(self, path: str, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with the centres and their optimizer state that this process takes from the shards its
        manifest names: a sharded loss's own rows (each rank reads the files that hold them: on the world size
        that saved them, its own), else all of them. A shard missing or of another save is refused on every rank."""
        unexpected = None
        try:
            centres, optimizer_state = centre_shards.whole_state(path, state, self.margin_loss)
            refused = ""
        except Exception as error:  # (not only a missing or mismatched shard: said below, so the others do not wait)
            centres = optimizer_state = None
            unexpected = None if isinstance(error, (OSError, ValueError)) else error
            reason = str(error)
            if unexpected is not None:  # (in one line, as a save's is: its first; CPython's MemoryError has none)
                words = reason.strip().splitlines()[0] if reason.strip() else ""
                reason = f"{type(error).__name__}: {words}" if words else type(error).__name__
            refused = f"--resume {path}: {reason}"
        if self.distributed:
            said = [None] * self.world_size
            dist.all_gather_object(said, refused)
            refused = next((line for line in said if line), "")
        if unexpected is not None:
            raise unexpected  # (its traceback, on the process it happened on; the others say its line)
        if refused:
            raise SystemExit(refused)
        return {**state, "margin_loss": centres, "optimizer": optimizer_state}

    def _load_arcface_torch_state(self, path: str, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Continues the run that arcface_torch's train_v2.py saved with save_all_states, as its own resume
        (config.resume) would: the backbone, the class centres and the optimizer's state (momentum, AdamW's
        moments) put together from every GPU's checkpoint_gpu_<rank>.pt beside ``path``, and the step and the
        schedule's place from its global_step, which counts passes (a step here is --gradient-acc of them, as
        insightface_config counts --max-steps). The files hold no fp16 scaler, no generator states and no
        place in the data: the loss scale starts afresh, and the images come in this trainer's order from the
        step on. -> the generator states to restore: none, each process seeded from the step."""
        a = self.args
        files, why = checkpoint.insightface_run(path, state)
        loss = self.margin_loss
        # A --sharded-classes process takes its own rows of the centres and their state, not the whole matrices.
        rows = ((loss.class_start * loss.k, loss.class_stop * loss.k)
                if getattr(loss, "sharded", False) and self.world_size > 1 else None)
        centres = None
        if files is not None:
            centres, why = checkpoint.insightface_class_centres(path, state, files, rows)
        if centres is None:
            raise SystemExit(f"--resume {path}: arcface_torch's run cannot be put together from its files: {why}")
        # Rank 0's backbone, as its model.pt: its DDP does not broadcast buffers, so that each GPU's BatchNorm
        # statistics are its own (the weights are every rank's).
        weights = checkpoint.submodule_weights(checkpoint.backbone_state_dict(files[0][1], files[0][0]),
                                               self.backbone.state_dict().keys())
        self._load_backbone_weights(weights, f"--resume {path}", {})
        own = self.margin_loss.state_dict()
        whole = self.num_classes * getattr(a, "subcenters", 1)
        held = sum(contents["state_dict_softmax_fc"]["weight"].shape[0] for _, contents in files)
        if "weight" not in own or (held, centres.shape[1]) != (whole, a.embedding_size):
            raise SystemExit(f"--resume {path}: arcface_torch's {len(files)} files hold {held} x "
                             f"{centres.shape[1]} class centres, this run {whole} x {a.embedding_size} "
                             f"({self.num_classes} classes"
                             + (f" x {a.subcenters} sub-centres" if whole != self.num_classes else "")
                             + "); resume needs the same data (use --pretrained_model to fine-tune)")
        own["weight"] = centres
        self.margin_loss.load_state_dict(own)  # (the whole matrix, or a sharded loss's own rows)
        try:
            backbone_state, centre_state = checkpoint.insightface_optimizer_state(files, self.backbone, a.optimizer,
                                                                                  rows)
        except ValueError as error:
            raise SystemExit(f"--resume {path}: {error}") from None
        # In this run's own state dict (its groups' settings, this run's options): each state at its parameter.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        named = dict(self.backbone.named_parameters())
        saved = self.optimizer.state_dict()
        saved["state"] = {index[id(named[name])]: value for name, value in backbone_state.items()
                          if id(named[name]) in index}  # (a parameter this run freezes has none)
        if centre_state:
            saved["state"][index[id(self.margin_loss.weight)]] = centre_state
        self.optimizer.load_state_dict(_copied_tensors(shard_optimizer_state(self.margin_loss, self.optimizer,
                                                                             saved)))
        passes = int(state.get("global_step") or 0)
        self.step = passes // a.gradient_acc
        # (Its PolyScheduler steps each pass too, from last_epoch -1: global_step - 1 in the files. The learning
        # rate here is this run's schedule's at the step, which may differ from its by a pass in the warm-up.)
        self.scheduler.last_epoch = self.step
        self.timed_from = self.step
        schedule = self.scheduler.lr_lambdas[0]
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * schedule(self.step)
        if self.is_main:
            left = passes - self.step * a.gradient_acc
            print(f"resumed arcface_torch's run from {path} and the {len(files) - 1} other checkpoint_gpu_<rank>.pt "
                  f"beside it at step {self.step} (after its {state.get('epoch')} epoch(s), global_step {passes}"
                  + (f", {left} pass(es) into a step of --gradient-acc {a.gradient_acc}, whose gradients it did not "
                     "keep" if left else "")
                  + "); its fp16 loss scale and place in the data are not in its files: the scale starts afresh, "
                  "and the images come in this trainer's order", file=sys.stderr)
            if len(files) != self.world_size:
                print(f"note: that run had {len(files)} GPUs, this one {self.world_size} process(es): a step's batch "
                      f"is {self.world_size} x --batch-size {a.batch_size}"
                      + (f" x --gradient-acc {a.gradient_acc}" if a.gradient_acc > 1 else "")
                      + f" (its was {len(files)} x its batch_size), the learning rate as it was", file=sys.stderr)
            apart = self._settings_apart_from_arcface_torch(state)
            if apart:
                print(f"note: that run's files record other settings than this run's: {apart}; it goes on with this "
                      "run's (give that run's config as --config to go on as it went)", file=sys.stderr)
        return []

    def _settings_apart_from_arcface_torch(self, state: dict[str, Any]) -> str:
        """The settings that an arcface_torch checkpoint_gpu_<rank>.pt records and this run does not share, in the
        flags' words ("" where none): its optimizer's first group (learning rate, weight decay, SGD's momentum),
        its second's (the partial FC's) learning rate over the first's (as --centres-lr-scale), and its
        PolyScheduler's max_steps and warmup_steps, which count passes (a step here is --gradient-acc of
        them), and a --margin-warmup-steps not over at the step (its margin has none). A negative warm-up, which
        insightface_config turns into none at a lower --lr, is not compared."""
        a = self.args
        group = state["state_optimizer"]["param_groups"][0]
        schedule = state.get("state_lr_scheduler")
        schedule = schedule if isinstance(schedule, dict) else {}
        warmup = schedule.get("warmup_steps")
        warmup = warmup if isinstance(warmup, (int, float)) and not isinstance(warmup, bool) else None
        theirs: dict[str, tuple[Any, Any]] = {}
        if warmup is None or warmup >= 0:
            theirs["--lr"] = (group.get("initial_lr", group.get("lr")), self.scheduler.base_lrs[0])
            if warmup is not None:
                theirs["--warmup-steps"] = (int(warmup) // a.gradient_acc, self.scheduler.lr_lambdas[0].warmup_steps)
        if isinstance(schedule.get("max_steps"), int):
            theirs["--max-steps"] = (schedule["max_steps"] // a.gradient_acc, a.max_steps)
        centres_group = state["state_optimizer"]["param_groups"][1]  # (two groups: insightface_optimizer_state's)
        lrs = [g.get("initial_lr", g.get("lr")) for g in (group, centres_group)]
        if all(isinstance(lr, (int, float)) for lr in lrs) and lrs[0] > 0:
            theirs["--centres-lr-scale"] = (lrs[1] / lrs[0], a.centres_lr_scale)
        theirs["--decay"] = (group.get("weight_decay"), self.optimizer.param_groups[0].get("weight_decay"))
        if a.optimizer == "sgd":
            theirs["--momentum"] = (group.get("momentum"), self.optimizer.param_groups[0].get("momentum"))
        apart = [f"its {flag[2:]} {value:g}, this run's {flag} {ours:g}" for flag, (value, ours) in theirs.items()
                 if isinstance(value, (int, float)) and isinstance(ours, (int, float))
                 and not math.isclose(value, ours, rel_tol=1e-6)]
        # Its margin is the whole from its first step: a warm-up here that has not ended by the step lowers it.
        if a.margin_warmup_steps and margin_fraction(self.step, a.margin_warmup_steps) < 1:
            margin = ", ".join(f"{k} {v:g}" for k, v in logged_margins(a, self.step).items())
            apart.append(f"its margin the whole from its first step (arcface_torch warms up none), this run's "
                         f"--margin-warmup-steps {a.margin_warmup_steps} ({margin} at step {self.step}, the whole "
                         f"at step {a.margin_warmup_steps})")
        return ", ".join(apart)

    def _check_resumed_data(self, state: dict[str, Any], path: str) -> None:
        """A resumed run reads the data its checkpoint trained on: the same files (moved, or mounted
        elsewhere, they keep their record), or other images of the same identities in the same order
        (a note: the data order from here on is not the uninterrupted run's). An image folder of other
        identities, or of the same ones in another order, which would give each label another person's
        class centre, is refused; where the identities cannot be compared (a RecordIO set names none,
        as after repacking it without a broken image; a checkpoint older than the record), a note."""
        recorded = state.get("data_fingerprint")
        if recorded is None:
            if self._data_unrecorded(state) and self.is_main:
                print(f"note: {path} is of an earlier version, which did not record its data: --data "
                      f"{self.args.data} cannot be checked against that run's ({state['args'].get('data')}). The run "
                      "goes on, each label taken for the person it was there: other identities, or the same ones in "
                      "another order, would give each label another person's class centre (then resume with that "
                      f"run's data, or start a new run from its weights with --pretrained_model {path} "
                      "--finetuning)", file=sys.stderr)
            return
        if recorded == self.data_fingerprint:
            return
        order = self._sets_reordered(recorded)
        if order:
            raise SystemExit(f"--resume {path}: --data {self.args.data} is not the data that run trained on: the same "
                             f"sets in another order, which would give each label another person's class centre. "
                             f"Resume with that run's order, --data {','.join(order)}")
        saved_classes = state.get("data_classes")
        if self.data_classes is None or saved_classes is None:
            if self.is_main:
                print(f"note: --data {self.args.data} is not the data {path} trained on (its record of its data "
                      f"differs), and its identities cannot be compared with that data's ({self._unnamed(state)}): "
                      "the run goes on, each label taken for the person it was", file=sys.stderr)
            return
        if saved_classes == self.data_classes:
            if self.is_main:
                print(f"note: --data {self.args.data} holds other images than the data {path} trained on, of the "
                      "same identities: the run goes on with them (the data order is not the uninterrupted run's)",
                      file=sys.stderr)
            return
        raise SystemExit(f"--resume {path}: --data {self.args.data} is not the data that run trained on (its "
                         "record of its data differs: other identities, or the same ones in another order, would "
                         "give each label another person's class centre). Resume with that run's data, or start a "
                         f"new run (another --output) from its weights with --pretrained_model {path} (with "
                         "--finetuning for other identities)")

    def _load_teacher(self):
        """--teacher on this process's device (each process its own copy: frozen, it has no gradients for DDP
        to average)."""
        from .distill import load_teacher

        a = self.args
        # Building it draws its initial weights from the generator: the run's own draws (the class centres',
        # the data order's) stay as a run without it makes them.
        with torch.random.fork_rng(devices=[]):
            try:
                teacher = load_teacher(a.teacher, a.teacher_network, embedding_size=a.embedding_size,
                                       image_size=a.image_size, amp=a.amp, device=self.device,
                                       channels_last=a.channels_last, quiet=not self.is_main)
            except (FileNotFoundError, ValueError) as error:
                given = f" with --teacher-network {a.teacher_network}" if a.teacher_network else ""
                raise SystemExit(f"--teacher{given}: {error}") from None
        if self.distributed:  # node-local copies must be the same weights
            digests = [None] * self.world_size
            dist.all_gather_object(digests, teacher.digest)
            if len(set(digests)) > 1:
                raise SystemExit(f"--teacher {a.teacher}: the processes read different weights (sha256 "
                                 f"{', '.join(d[:16] for d in digests)} on ranks 0-{self.world_size - 1}): every "
                                 "process must read the same teacher")
        if self.is_main and teacher.resized:
            print(f"note: --teacher {a.teacher} takes {teacher.input_size}px images: the run's {a.image_size}px "
                  "images (--image-size) are resized to that size for it", file=sys.stderr)
        return teacher

    def _follow_teacher_set_aside(self, aside: str) -> None:
        """--teacher was one of the earlier run's files that ``aside`` now holds (the checkpoint of a run in
        --output, distilled into the same folder): the checkpoint records the teacher where it now is, what a
        resume is given, not where it was, which is this run's own checkpoint now."""
        if self.teacher is None or os.path.exists(self.teacher.path):
            return
        moved = os.path.join(aside, os.path.basename(self.teacher.path))
        if os.path.realpath(os.path.dirname(self.teacher.path)) == os.path.realpath(self.output) \
                and os.path.isfile(moved):
            print(f"note: --teacher {self.args.teacher} was set aside with that run: resume this one with --teacher "
                  f"{moved}", file=sys.stderr)
            self.teacher.path = os.path.abspath(moved)
            self.args.teacher = moved  # (args.json, a config that resumes the run, names it there too)

    def _check_resumed_teacher(self, state: dict[str, Any], path: str) -> None:
        """A resumed run distils from the teacher its checkpoint did (its weights, wherever the file now is),
        or from none when it did not; the teacher's weights are compared, as the options are."""
        saved = state.get("teacher")
        own = self.teacher.record() if self.teacher is not None else None
        new_run = f"start a new one (another --output) from its weights with --pretrained_model {path}"
        way_on = f"Continue that run with its own teacher, or {new_run}"
        if saved is None and own is None:
            return
        if saved is None:
            raise SystemExit(f"--resume {path}: that run trained without a teacher; --teacher {self.args.teacher} "
                             f"requested. Continue that run without --teacher, or {new_run} and --teacher")
        theirs = f"{saved['path']} (weights sha256 {saved['digest'][:16]})"
        if own is None:  # (the run's distillation options with it: they too are the run's)
            run = state["args"]
            options = [f"--teacher {saved['path']}", *(f"--{flag} {run[dest]}" for flag, dest in (
                ("teacher-network", "teacher_network"), ("distill-weight", "distill_weight"),
                ("distill-loss", "distill_loss")) if run.get(dest) is not None)]
            raise SystemExit(f"--resume {path}: that run distilled from {theirs}; no --teacher requested. Continue "
                             f"that run with {' '.join(options)}, or {new_run}")
        if own["digest"] != saved["digest"] and (own["network"] == "onnx") != (saved.get("network") == "onnx"):
            # (weights and a graph are digested differently: the same weights exported are not told; they would
            # not go on bit for bit anyway, onnxruntime rounding otherwise)
            kinds = ("an ONNX graph", "a PyTorch network") if own["network"] == "onnx" else \
                ("a PyTorch network", "an ONNX graph")
            raise SystemExit(f"--resume {path}: that run distilled from {theirs}, {kinds[1]}; --teacher "
                             f"{self.args.teacher} is {kinds[0]}, which computes the embeddings otherwise (its export "
                             f"of the same weights too). Continue that run with --teacher {saved['path']}, or "
                             f"{new_run}")
        if own["digest"] != saved["digest"]:
            raise SystemExit(f"--resume {path}: that run distilled from {theirs}; --teacher {self.args.teacher} holds "
                             f"other weights (sha256 {own['digest'][:16]}). {way_on}")
        if own["path"] != saved["path"] and self.is_main:
            print(f"note: --teacher {self.args.teacher} holds the weights of the teacher that run distilled from, "
                  f"{saved['path']}: the run goes on with them", file=sys.stderr)

    def _load_pretrained(self, path: str) -> None:
        from .onnx_backbone import is_onnx_file

        if os.path.isfile(path) and is_onnx_file(path):
            return self._load_pretrained_onnx(path)
        try:
            state = checkpoint.load(path)
            weights = checkpoint.backbone_state_dict(state, path)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"--pretrained_model: {error}") from None
        a = self.args
        try:
            recorded = checkpoint.recorded_settings(state, path)
        except ValueError as error:  # a backbone.json beside it that is not train.export's
            raise SystemExit(f"--pretrained_model: {error}") from None
        expected = self.backbone.state_dict().keys()
        weights = checkpoint.submodule_weights(weights, expected)
        self._load_backbone_weights(weights, f"--pretrained_model {path}", recorded)
        if recorded.get("image_size", a.image_size) != a.image_size and self.is_main:
            # The weights fit (a ViT's patches, or an iResNet's last feature map, are as many), but the
            # faces are drawn at another scale than they learnt.
            print(f"note: --pretrained_model {path} was trained at {recorded['image_size']}px; this run trains at "
                  f"--image-size {a.image_size}", file=sys.stderr)
        loaded = "backbone"
        centres = state.get("margin_loss") if isinstance(state, dict) else None
        if isinstance(state, dict) and "centre_shards" in state and not self.args.finetuning:
            # --save-sharded's: the whole centres from the files beside it (as an unsharded checkpoint holds them)
            try:
                centres, _ = centre_shards.whole_state(path, state)
            except (OSError, ValueError) as error:
                centres = None
                if self.is_main:
                    print(f"note: {path}'s class centres not taken ({error}): starting fresh ones", file=sys.stderr)
        assembled = False
        arcface_torch = isinstance(state, dict) and "state_dict_softmax_fc" in state
        if centres is None and arcface_torch and not self.args.finetuning:
            weight, why = checkpoint.insightface_class_centres(path, state)  # arcface_torch's, a file a GPU
            if weight is None and self.is_main:
                print(f"note: {path}: arcface_torch's class centres not taken ({why}): starting fresh ones",
                      file=sys.stderr)
            centres = None if weight is None else {"weight": weight}
            assembled = centres is not None
        if not self.args.finetuning and centres is not None:
            k = getattr(self.args, "subcenters", 1)
            if centres["weight"].shape != (self.num_classes * k, self.args.embedding_size):
                if self.is_main:
                    rows, dim = centres["weight"].shape
                    # A run of --subcenters K holds K rows a class: said so, with the option that takes them.
                    saved_args = state.get("args") if isinstance(state.get("args"), dict) else {}
                    theirs = saved_args.get("subcenters") or 1
                    fits = theirs != k and rows == self.num_classes * theirs and dim == self.args.embedding_size
                    print(f"note: {path} has {rows} x {dim} class centres"
                          + (f" ({rows // theirs} classes x {theirs} sub-centres)" if theirs > 1 else "")
                          + f", this run {self.num_classes * k} x {self.args.embedding_size} ({self.num_classes} "
                          "classes" + (f" x {k} sub-centres" if k > 1 else "") + "): starting fresh ones"
                          + (f" (--subcenters {theirs} takes them)" if fits else "")
                          + (" (put together from the checkpoint_gpu_<rank>.pt files beside it: is the last rank's "
                             "missing?)" if assembled else ""), file=sys.stderr)
            elif self._centres_are_of_these_identities(state, path):
                # The centres, and the running statistics both losses keep (AdaFace's norm statistics,
                # CurricularFace's t); those of another loss are left out, these start fresh.
                own = self.margin_loss.state_dict()
                own.update({key: value for key, value in centres.items() if key in own})
                self.margin_loss.load_state_dict(own)
                loaded += " and class centres"
        if self.is_main:
            print(f"initialised the {loaded} from {path}", file=sys.stderr)

    def _load_backbone_weights(self, weights: dict[str, torch.Tensor], given: str, recorded: dict[str, Any]) -> None:
        """The backbone's ``weights`` (of ``given``: '--resume X', '--pretrained_model X'; ``recorded``, the settings
        the file records) loaded, or the run refused in one line saying what they are the weights of."""
        try:
            self.backbone.load_state_dict(weights)
        except RuntimeError as error:
            raise SystemExit(f"{self._does_not_fit(given)}: {self._weights_held(weights, recorded, error)}") from None

    def _does_not_fit(self, given: str) -> str:
        a = self.args
        return f"{given} does not fit --network {a.network} --embedding-size {a.embedding_size} --image-size " \
               f"{a.image_size}"

    def _weights_held(self, weights: dict[str, torch.Tensor], recorded: dict[str, Any], error: RuntimeError) -> str:
        """What backbone weights that --network does not load hold, in the flags' words (load_state_dict's own
        list runs to pages): the network the file records or the trainer's networks recognise, else "another
        definition", else load_state_dict's first lines."""
        found = checkpoint.held_backbone(weights, recorded, vars(self.args))
        if found:
            return (f"it holds --network {found['network']} --embedding-size {found['embedding_size']} "
                    f"--image-size {found['image_size']}")
        return (checkpoint.foreign_weights(weights, self.backbone.state_dict().keys())
                or checkpoint.summarize_load_error(error))

    def _load_pretrained_onnx(self, path: str) -> None:
        """The backbone's weights read from an ONNX model (insightface's w600k_r50.onnx, train.export's
        backbone.onnx) whose layers are --network's (train.onnx_weights); it holds no class centres. The main
        process reads it (tracing the network to match it takes seconds) and calibrates the BatchNorms the file
        folded away on images of --data; the other processes take its weights and its refusal, if any."""
        from .onnx_weights import OnnxGraphMismatch, calibrate_batchnorms, read_onnx_weights

        a = self.args
        refused, done = None, None
        if self.is_main:
            try:
                weights, done = read_onnx_weights(path, self.backbone, a.image_size)
            except OnnxGraphMismatch as error:
                refused = f"{self._does_not_fit(f'--pretrained_model {path}')}: {error}"
            except ValueError as error:
                refused = f"--pretrained_model: {error}"
            else:
                self.backbone.load_state_dict(weights)
                try:
                    if done["folded"]:
                        # Said before the forward pass, which takes minutes on a CPU (r50: 110 s on two cores).
                        print(f"note: {path}: {done['folded']} BatchNorms were folded into the layers before them "
                              f"when it was exported: calibrated on {self._calibration_count()} images of --data, "
                              "one forward pass now (each one's running mean and variance those of its input, its "
                              "weight and bias set to match), they give the file's embeddings in eval mode and "
                              "nearly so in training mode, which normalises with each batch's statistics",
                              file=sys.stderr)
                        calibrate_batchnorms(self.backbone, done["folded_batchnorms"], self._calibration_batches())
                except DataError as error:  # (it names the image)
                    refused = (f"--pretrained_model {path}: its {done['folded']} folded BatchNorms are calibrated "
                               f"on images of --data, and one cannot be read: {error}")
        if self.distributed:
            said = [refused, done]
            try:
                dist.broadcast_object_list(said, src=0)
            except RuntimeError as error:  # (said where it outlasts --dist-timeout: _run)
                error.rank_0_alone = (f"rank 0 reads --pretrained_model {path}, traces the network and calibrates "
                                      "the BatchNorms the file folded away while the others wait: on a CPU that "
                                      "takes minutes, which needs a longer --dist-timeout")
                raise
            refused, done = said
        if refused:
            raise SystemExit(refused)
        if self.distributed:
            for tensor in self.backbone.state_dict().values():
                sent = tensor.contiguous()  # (channels_last weights are not, in the default layout)
                dist.broadcast(sent, src=0)
                if sent is not tensor:
                    tensor.copy_(sent)
        if not self.is_main:
            return
        if done["image_size"] not in (None, a.image_size):
            print(f"note: --pretrained_model {path} takes {done['image_size']}px images; this run trains at "
                  f"--image-size {a.image_size}", file=sys.stderr)
        if done["input_scale"] != 1.0:
            print(f"note: {path} scales pixels 0-255 in its graph: its first convolution's weights are multiplied by "
                  f"{done['input_scale']:.6g} to take (x - 127.5) / 127.5, as the networks here do", file=sys.stderr)
        print(f"initialised the backbone from {path} (an ONNX model)", file=sys.stderr)

    def _calibration_count(self) -> int:
        """How many images _calibration_batches gives: CALIBRATION_IMAGES, or all of a smaller --data."""
        from .data import RandomFaces

        if isinstance(self.dataset, RandomFaces):  # (its noise, any number of images)
            return CALIBRATION_IMAGES
        return min(CALIBRATION_IMAGES, len(self.dataset))

    def _calibration_batches(self) -> Iterator[torch.Tensor]:
        """_calibration_count() images of --data drawn with --seed (--data random's noise), as model inputs in
        batches of at most --batch-size (train.onnx_weights.calibrate_batchnorms measures the BatchNorms' inputs
        on them)."""
        from .data import RandomFaces

        batch = max(1, min(self.args.batch_size, CALIBRATION_IMAGES))
        count = self._calibration_count()
        if isinstance(self.dataset, RandomFaces):  # (no images to index: its noise, what it trains on)
            for images in self.dataset.images(count, self.device).split(batch):
                yield to_model_input(images, memory_format=self.input_memory_format)
            return
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.args.seed))[:count]
        for indices in order.split(batch):
            images = torch.stack([self.dataset[int(i)][0] for i in indices])
            yield to_model_input(images.to(self.device), memory_format=self.input_memory_format)

    def _centres_are_of_these_identities(self, state: dict[str, Any], path: str) -> bool:
        """Whether --pretrained_model's class centres, as many as the data's classes, are taken: centre k
        for label k's person. A checkpoint of this trainer records its data: when both sets name their
        identities (image folders) and these differ, or come in another order, centre k is another
        person's (a note; fresh centres, as with --finetuning). When the data differs and its identities
        cannot be compared (synthetic faces, RecordIO sets), they are taken with a note. Files without
        the record (an export's, arcface_torch's, an earlier version's checkpoint: the last with a note when
        it trained on other --data) are taken on their count alone."""
        recorded = state.get("data_fingerprint")
        if recorded is None:
            if self._data_unrecorded(state) and self.is_main:
                print(f"note: {path} is of an earlier version, which did not record its data: its class centres are "
                      f"taken on their count alone, each label for the person it was in that run's data "
                      f"({state['args'].get('data')}); for other identities than those, or the same ones in another "
                      "order, pass --finetuning", file=sys.stderr)
            return True
        if recorded == self.data_fingerprint:
            return True
        order = self._sets_reordered(recorded)
        if order:
            if self.is_main:
                print(f"note: {path}'s class centres are of the sets of --data {self.args.data} in another order "
                      f"(--data {','.join(order)}): starting fresh ones, as --finetuning does", file=sys.stderr)
            return False
        saved_classes = state.get("data_classes")
        if saved_classes is not None and self.data_classes is not None:
            if saved_classes == self.data_classes:  # other images of the same identities
                return True
            if self.is_main:
                print(f"note: {path}'s class centres are of other identities than --data {self.args.data}'s "
                      "(or of the same ones in another order: the identities its record names differ): starting "
                      "fresh ones, as --finetuning does", file=sys.stderr)
            return False
        if self.is_main:
            print(f"note: --data {self.args.data} is not the data {path} trained on (its record of its data "
                  f"differs), and their identities cannot be compared ({self._unnamed(state)}): its class centres are "
                  "taken, each label for the person it was there; for other identities, pass --finetuning",
                  file=sys.stderr)
        return True

    def _sets_reordered(self, recorded: str) -> list[str] | None:
        """The names of --data's sets in the order that gave a checkpoint's record of its data
        ``recorded``, where that was another order of these same sets (each label another person's, which
        RecordIO sets, naming no identities, do not show otherwise); else None."""
        from .data import CombinedFaces

        return self.dataset.order_of(recorded) if isinstance(self.dataset, CombinedFaces) else None

    def _unnamed(self, state: dict[str, Any]) -> str:
        """Why a checkpoint's identities cannot be compared with this run's data's."""
        if self.data_classes is not None and "data_classes" not in state:
            return "that checkpoint, of an earlier version, does not name them (070f41b on does)"
        return "they are not named"

    def _data_unrecorded(self, state: Any) -> bool:
        """Whether ``state`` is a checkpoint of this trainer from before checkpoints recorded their data
        (7d668c4) whose --data names other data than this run's (another path: moved, or other images).
        Exports and arcface_torch's files, which never record it, are not."""
        args = state.get("args") if isinstance(state, dict) else None
        if not isinstance(args, dict) or "data" not in args:
            return False
        saved, given = str(args["data"]), str(self.args.data)
        if saved == given:
            return False
        return "synthetic" in (saved, given) or os.path.abspath(saved) != os.path.abspath(given)

    # A sharded loss's checkpoint holds the whole class-centre matrix and its optimizer state, as a
    # replicated one's does: a run can resume on another number of processes, or unsharded
    # (arcface_ext.full_state_dict, shard_optimizer_state).

    def _sharded(self) -> bool:
        return getattr(self.margin_loss, "sharded", False)

    def save(self, artifact: bool = True) -> None:
        """Write the checkpoint (collective: every rank must call it); ``artifact=False``: not logged to W&B
        (--wandb-artifacts) even so, for a stop by a signal."""
        finite = checkpoint.all_finite(self.backbone) and checkpoint.all_finite(self.margin_loss)
        # A collapsed fp16 loss scale, which train_step sees at the next step (the last one's has none), is not kept.
        scale_kept = not (self.scaler.is_enabled() and self._loss_scale_collapsed().item())
        if self.distributed and self._sharded():
            # Each rank checks its own centres (and its own scaler): agree, so that all raise or none does.
            flag = torch.tensor([float(finite), float(scale_kept)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite, scale_kept = (value > 0 for value in flag.tolist())
        if not scale_kept:
            raise self._loss_scale_collapse()
        if not finite:
            raise TrainingDiverged(f"the weights are not finite at step {self.step}")
        rng = checkpoint.rng_state()
        rng_states = [rng]
        if self.distributed:
            rng_states = [None] * self.world_size
            dist.all_gather_object(rng_states, rng)
        if self.args.save_sharded and self.distributed and self._sharded():
            shard, centres, optimizer_state, manifest = self._write_centre_shards()
        else:
            # The whole centres and their optimizer state (the loss's buffers, AdaFace's, are alike on every rank).
            centres, optimizer_state = full_state_dict(self.margin_loss, self.optimizer)
            shard = manifest = None
        if not self.is_main:
            if shard is not None:
                self._complete_centre_shards(shard, None)
            return
        state = {
            "step": self.step,
            "args": vars(self.args),
            "working_directory": self.working_directory,  # (train.export --int8 reads the run's --data from elsewhere)
            "num_classes": self.num_classes,
            "data_fingerprint": self.data_fingerprint,  # which data the class centres are of (train.tools.clean)
            "data_classes": self.data_classes,  # which identities they are (None: a set that does not name them)
            "model": self.backbone.state_dict(),
            "embedding_scale_learned": self.embedding_scale_learned,  # (MagFace's; a resume keeps the run's)
            "margin_loss": centres,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "skipped_in_a_row": int(self.skipped_in_a_row),
            "rng": rng_states,
            "target_angles": self.angles.state_dict(),
            "elapsed": self.elapsed + (time.perf_counter() - self._started),
            "verification": self.last_verification,
            "steps_per_epoch": self.schedule_steps_per_epoch,  # the epoch of --epochs's steps, for a resume
        }
        if self.wandb_run_id:
            state["wandb_run_id"] = self.wandb_run_id
        if self.timed_from:
            state["timed_from"] = self.timed_from
        if self.teacher is not None:  # (which teacher: its path and its weights' digest, not the weights)
            state["teacher"] = self.teacher.record()
        if self.verification_cut_short_at == self.step:
            state["verification_cut_short"] = True
        if manifest is not None:
            state["centre_shards"] = manifest
        try:
            checkpoint.save_atomic(state, self.checkpoint_path)
        except Exception as error:  # (a full disk or a quota: save_atomic's OSError)
            expected = isinstance(error, (OSError, RuntimeError))
            if not expected and shard is None:
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if not expected:
                reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
            failed = f"writing {self.checkpoint_path} at step {self.step} failed: {reason or type(error).__name__}"
            if shard is not None:  # (the others wait for this outcome: told whatever the error, as for the shards)
                self._complete_centre_shards(shard, failed)
            if not expected:
                raise
            raise CheckpointNotWritten(failed) from None
        if shard is not None:
            centre_shards.sync_folder(self.output)
            self._complete_centre_shards(shard, "")
        elif centre_shards.shard_files(self.output):  # (an earlier save's, --save-sharded: this one holds them all)
            centre_shards.sync_folder(self.output)
            centre_shards.remove_other_saves(self.output, None, 0, 0)
        # (Not under WANDB_MODE=disabled, where W&B logs nothing: wandb's staging copy of each checkpoint.pt was made
        # all the same, and stayed there, never uploaded.)
        if self.args.wandb_artifacts and self.log.wandb is not None and not getattr(self.log.wandb, "disabled", False):
            if artifact:
                self._log_model_artifact(sharded=shard is not None)
            else:  # (W&B's staging copy, a read of the whole file, and the upload wait would take the stop's grace)
                self._write(f"note: --wandb-artifacts: the checkpoint of a stop by a signal (step {self.step}) is not "
                            "logged to W&B; the next save of --resume auto's run is")

    def _log_model_artifact(self, sharded: bool) -> None:
        """--wandb-artifacts (the main process, once a save is whole): the checkpoint.pt just written as the next
        version of the W&B run's artifact ``model-<run id>``, of type "model" (a resumed run's versions follow its
        earlier ones), aliased "latest", "step-<S>", "best-<target>" for each set whose best so far is this step's
        verification, and "best" where every set's is. --save-sharded's shards are left out (rank 0's files
        alone, and the size that made the run shard them): the artifact then holds the backbone, which
        train.export and the other tools read from checkpoint.pt alone, but no resumable centres. A failure is a
        warning line: the checkpoint is written, and the run goes on."""
        verified = {name: record for name, record in self.last_verification.items() if record.get("step") == self.step}
        best = [name for name, record in verified.items() if record.get("best_step") == self.step]
        aliases = ["latest", f"step-{self.step}", *(best_alias(name) for name in best)]
        # (The sets this run verifies: a resume may drop one of --val-targets, whose last record the checkpoint keeps.)
        if self.verification_sets and all(self.last_verification.get(name, {}).get("best_step") == self.step
                                          for name in self.verification_sets):
            aliases.append("best")
        metadata = {"step": self.step, "network": self.args.network, "embedding_size": self.args.embedding_size,
                    "image_size": self.args.image_size,
                    "centres": "not in this artifact: the run folder's checkpoint-centres-*.pt (--save-sharded)"
                    if sharded else "in checkpoint.pt",
                    "verification": {name: {"accuracy": record["accuracy"], "best_accuracy": record["best_accuracy"],
                                            "best_step": record["best_step"]} for name, record in verified.items()}}
        try:
            artifact = wandb_module().Artifact(f"model-{self.log.wandb.id}", type="model", metadata=metadata)
            # (Copied into W&B's staging folder now: the next save replaces checkpoint.pt before the upload ends. Not
            # into W&B's artifact cache after the upload, its default, which kept a copy of every version in
            # ~/.cache/wandb, unbounded, for downloads alone: the run's folder holds the checkpoint.)
            artifact.add_file(self.checkpoint_path, name=checkpoint.CHECKPOINT_NAME, skip_cache=True)
            self.log.wandb.log_artifact(artifact, aliases=aliases)
        except Exception as error:  # wandb's own exception types; a full disk in the staging copy
            reason = first_line(error)
            self._write(f"warning: --wandb-artifacts: {self.checkpoint_path} (step {self.step}) was not logged to "
                        f"W&B: {reason}; the checkpoint is kept, and the run goes on")

    def _write_centre_shards(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
        """--save-sharded (collective): every rank writes its shard of the centres under a name of this save's,
        which no earlier checkpoint.pt names, and the ranks agree that all are written before rank 0 writes the
        checkpoint.pt that names them (the save's last step: a stop before it leaves the previous checkpoint and
        its shards as they were). -> (this rank's shard, the loss's and the optimizer's state without it, the
        manifest); raises CheckpointNotWritten on every rank where a rank's write failed."""
        save_id = [secrets.token_hex(8) if self.is_main else None]
        dist.broadcast_object_list(save_id, src=0)
        path = os.path.join(self.output, centre_shards.shard_name(self.rank, self.world_size, save_id[0]))
        unexpected = None
        try:
            shard, centres, optimizer_state, manifest = centre_shards.split_state(
                self.margin_loss, self.optimizer, self.rank, self.world_size, save_id[0], self.step)
            checkpoint.save_atomic(shard, path)
            centre_shards.sync_folder(self.output)
            failed = ""
        except Exception as error:  # (a full disk: save_atomic's OSError; the host out of memory in split_state's copy)
            # Said in the agreement below whatever it is, so that the others do not wait there for this process
            # until torchrun ends them; this process then raises its own error (its traceback), they the line.
            unexpected = None if isinstance(error, (OSError, RuntimeError)) else error
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if unexpected is not None:
                reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
            failed = f"writing {path} at step {self.step} failed: {reason or type(error).__name__}"
        said = [None] * self.world_size
        dist.all_gather_object(said, failed)
        failed = next((line for line in said if line), "")
        if failed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            if unexpected is not None:
                raise unexpected
            raise CheckpointNotWritten(failed)
        shard["path"] = path
        return shard, centres, optimizer_state, manifest

    def _complete_centre_shards(self, shard: dict[str, Any], failed: str | None) -> None:
        """After rank 0 wrote checkpoint.pt (``failed``: "", or why it could not; None on the other ranks, which
        learn it here): the shards of other saves go, or, where checkpoint.pt was not written, this save's. A write
        that failed after its rename (a rename over NFS whose reply was lost, the clean-up of temporaries after it)
        left a checkpoint.pt that names this save's shards, and no longer the previous save's: they stay."""
        said = [failed, bool(failed) and self.is_main and not self._checkpoint_names(shard["save_id"])]
        dist.broadcast_object_list(said, src=0)
        if said[0]:
            if said[1]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(shard["path"])
            if not self.is_main:
                raise CheckpointNotWritten(said[0])
            return
        centre_shards.remove_other_saves(self.output, shard["save_id"], self.rank, self.world_size)

    def _checkpoint_names(self, save_id: str) -> bool:
        """Whether checkpoint.pt names the shards of save ``save_id``, or may (it cannot be read)."""
        try:
            state = checkpoint.load(self.checkpoint_path, mmap=True)
        except FileNotFoundError:
            return False
        except Exception:
            return True
        manifest = state.get("centre_shards") if isinstance(state, dict) else None
        return isinstance(manifest, dict) and manifest.get("save_id") == save_id

    # ------------------------------------------------------------- the loop

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.loader

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
        """One optimiser step on this process's `images` (--gradient-acc passes of --batch-size
        each, their gradients averaged); returns (mean loss over passes and ranks, whether any rank
        was signalled)."""
        args = self.args
        passes = args.gradient_acc
        # The reference stays the fp32 ground truth (under autocast its product, and with it the whole
        # loss, would be 16-bit: at s = 64 a 0.1-0.25 logit error), as the chunked path's reference does.
        loss_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.loss_amp) \
            if args.loss_impl == "fused" else None
        if args.margin_warmup_steps:
            # From the step alone, as the learning rate's: a resumed run takes the margins the unbroken one did.
            # (The module's own attributes, which its forward reads at each call; state_dict holds none of them.)
            self.margin_loss.m1, self.margin_loss.m2, self.margin_loss.m3 = warmed_up_margins(args, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        distill_sum = torch.zeros((), device=self.device)
        for index, (images_part, labels_part) in enumerate(zip(images.chunk(passes), labels.chunk(passes))):
            # uint8 from the loader: scaled here, on the device (a quarter of the bytes to copy).
            images_part = to_model_input(images_part.to(self.device, non_blocking=True),
                                         memory_format=self.input_memory_format)
            labels_part = labels_part.to(self.device, non_blocking=True)
            # DDP all-reduces the gradients in the last pass only: the earlier ones accumulate locally.
            with contextlib.ExitStack() as stack:
                if index < passes - 1:
                    for module in (self.backbone_ddp, self.loss_ddp):
                        # (--compile wraps the DDP module: its no_sync is the wrapped one's.)
                        module = getattr(module, "_orig_mod", module)
                        if isinstance(module, nn.parallel.DistributedDataParallel):
                            stack.enter_context(module.no_sync())
                embeddings = self.backbone_ddp(images_part)
                with torch.autocast(self.device.type, dtype=loss_dtype, enabled=loss_dtype is not None):
                    loss, target_cosine = self.loss_ddp(embeddings, labels_part, return_target_cosine=True)
                objective = loss
                if self.teacher is not None:
                    # (At weight 0 the term is measured only: the gradients are a run's without a teacher.)
                    trained = args.distill_weight > 0
                    distill = distillation_loss(embeddings if trained else embeddings.detach(),
                                                self.teacher(images_part), args.distill_loss)
                    if trained:
                        objective = loss + args.distill_weight * distill
                    distill_sum += distill.detach()
                # A non-finite loss is caught below, before the optimiser applies anything.
                self.scaler.scale(objective / passes).backward()
            loss_sum += loss.detach().float()
            if index == 0 and self.is_main and self.angles.wants(self.step):
                self.angles.record(self.step, target_cosine)

        # One small collective a step: the mean loss for the log and the NaN check, whether any rank
        # was signalled, so that all ranks stop (or diverge) at the same step, and whether the fp16 loss
        # scale collapsed at the last step (read here, a step late, rather than with a sync of its own).
        status = torch.stack([loss_sum / passes, torch.tensor(float(self._stop_signal > 0), device=self.device),
                              distill_sum / passes, self._loss_scale_collapsed()])
        if self.distributed:
            dist.all_reduce(status)
        loss_value, stop, distill_value, collapsed = status.tolist()
        if collapsed:
            raise self._loss_scale_collapse()
        loss_value /= self.world_size
        self.distill_value = distill_value / self.world_size
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"the loss is {loss_value} at step {self.step + 1}")
        if not math.isfinite(self.distill_value):
            raise TrainingDiverged(f"the distillation term is {self.distill_value} at step {self.step + 1}")

        logged = self._logs(self.step + 1, stop > 0)
        if args.grad_clip > 0 or logged:
            # (Once a step, as torch allows: scaler.step then takes the gradients as they are.)
            self.scaler.unscale_(self.optimizer)
        backbone_norm = None
        if args.grad_clip > 0:
            # The backbone only, as insightface does: the class centres' norm grows with the classes.
            backbone_norm = nn.utils.clip_grad_norm_(self.backbone.parameters(), args.grad_clip)  # (before clipping)
        norms = self._grad_norms(backbone_norm) if logged else None
        scaling = self.scaler.is_enabled()
        scale_before = self._loss_scale() if scaling else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scaling:
            # A step the scaler skipped (inf/NaN gradients) is one whose update() lowered the scale (times the
            # backoff factor, 0.5); a step it takes never does (it doubles it after 100 clean ones).
            skipped = (self._loss_scale() < scale_before).int()
            self.skipped_steps += skipped
            self.skipped_in_a_row = (self.skipped_in_a_row + 1) * skipped
        if logged:
            self.health = self._health(norms)
        self.scheduler.step()
        self.step += 1
        return loss_value, stop > 0

    def _logs(self, step: int, stop: bool) -> bool:
        """Whether ``step`` gets a line in metrics.jsonl (the last one, and a stopped run's, too)."""
        return step % self.args.log_every == 0 or step == self.args.max_steps or stop

    def _grad_norms(self, backbone_norm: torch.Tensor | None) -> torch.Tensor:
        """The norms of this step's unscaled gradients, before clipping, on the device: the backbone's
        (clip_grad_norm_'s, or one pass over them) and the class centres' (with --sharded-classes, of all the
        shards: a collective, on the logged steps, which every rank agrees on)."""
        if backbone_norm is None:
            backbone_norm = total_norm([p.grad for p in self.backbone.parameters() if p.grad is not None])
        centres_norm = total_norm([p.grad for p in self.margin_loss.parameters() if p.grad is not None])
        if self.distributed and self._sharded():  # (each rank's is its shard's; the backbone's are all-reduced)
            squared = centres_norm.float().square()
            dist.all_reduce(squared)
            centres_norm = squared.sqrt()
        return torch.stack([backbone_norm.float(), centres_norm.float().to(backbone_norm.device)])

    def _health(self, norms: torch.Tensor) -> dict[str, float | None]:
        """A logged step's HEALTH_METRICS, read in one sync: the gradients' ``norms`` (None, JSON's null, for a
        step with inf/NaN gradients, which the fp16 scaler skips) and with a scaler its scale after this step and
        the steps it skipped since the last logged one."""
        scaling = self.scaler.is_enabled()
        values = torch.cat([norms, torch.stack([self._loss_scale(), self.skipped_steps.float()])]) if scaling \
            else norms
        values = values.tolist()
        health = {key: value if math.isfinite(value) else None
                  for key, value in zip(("grad_norm", "centres_grad_norm"), values)}
        if scaling:
            health.update(loss_scale=values[2], skipped_steps=int(values[3]))
            self.skipped_steps.zero_()
        return health

    def _loss_scale(self) -> torch.Tensor:
        """The fp16 scaler's scale, a tensor on the device: its public scale() of a 1, which, unlike get_scale(),
        does not wait for the device."""
        return self.scaler.scale(self._one)

    def _loss_scale_collapsed(self) -> torch.Tensor:
        """1.0 on the device where the fp16 scaler's scale collapsed (LOSS_SCALE_FLOOR, SKIPPED_IN_A_ROW): the run
        stops, as a NaN loss stops it (arcface_torch's runs went on with the scale at 0, insightface #1437)."""
        if not self.scaler.is_enabled():
            return torch.zeros((), device=self.device)
        return ((self._loss_scale() < LOSS_SCALE_FLOOR) | (self.skipped_in_a_row >= SKIPPED_IN_A_ROW)).float()

    def _loss_scale_collapse(self) -> TrainingDiverged:
        """The stop for a collapsed fp16 loss scale, seen at the step after the one that lowered it (or at the
        checkpoint's save), before that step changes anything."""
        args = self.args
        in_a_row = int(self.skipped_in_a_row)
        # Each autocast in fp16: --amp bf16 alone would leave --loss-amp fp16's scaler, and its collapse.
        precision = " ".join(f"{flag} bf16" for flag, value in (("--amp", args.amp), ("--loss-amp", args.loss_amp))
                             if value == "fp16")
        return TrainingDiverged(
            f"the fp16 loss scale fell to {self.scaler.get_scale():g} at step {self.step} "
            f"({count_of(in_a_row, 'step')} in a row skipped for inf/NaN gradients; the floor is "
            f"2^-16, the limit {SKIPPED_IN_A_ROW} in a row)",
            advice=f"Try {precision}, a lower --lr" + (" or --grad-clip 5" if args.grad_clip <= 0 else "") + ".")

    def evaluate(self, final: bool = False) -> bool:
        """Verification on every target (rank 0; the others wait); returns whether a process was
        signalled to stop by its end, or of the run's ``final`` verification whether a signal cut it short.
        A signal cuts the verification short (at the batch it comes in: a launcher's grace after its SIGTERM,
        torchrun's 30 s, goes to the checkpoint, not to lfw, cfp_fp and agedb_30); the sets done by then are
        logged, and every process marks the step's verification as cut short (``verification_cut_short_at``).
        The final one is cut by a signal to rank 0 (one that came before it, to any process, leaves it out:
        ``_fit``). An error in it (rank 0's) ends the run; under torchrun the others learn of it in the collective
        below, rather than wait for rank 0 until --dist-timeout, and end too (``_end_with_rank_0s_failure``)."""
        cut = False
        failure = None  # rank 0's error in the sets, under torchrun: raised once the others know of it
        if self.is_main and self.verification_sets:
            from .verification import evaluate

            def stop_here(count):
                if self._stop_signal:
                    raise _VerificationStopped

            self.backbone.eval()
            try:
                self._evaluate_sets(evaluate, stop_here)
            except _VerificationStopped:
                cut = True
                if not final:  # (the final one's: said with the run's end, _say_a_signal_at_the_end)
                    self._write(f"[step {self.step}] verification cut short by the stop")
            except LogNotWritten:  # (verification.jsonl, training.log: a full disk) fit's one line, as at any step
                raise
            except Exception as error:  # (out of memory, a set's file gone unreadable): its traceback ends the run
                if self.distributed:  # (once the others know of it: below)
                    failure = error
                else:
                    if final:
                        self._save_before_the_error()
                    raise
            self.backbone.train()
        # (Also the others' wait for rank 0's verification.)
        signalled, cut, failed = self._on_any_process(self._stop_signal > 0, cut, failure is not None)
        if failed:
            self._end_with_rank_0s_failure(failure, final)
        if cut:
            self.verification_cut_short_at = self.step
        return cut if final else signalled

    def _save_before_the_error(self) -> bool:
        """A failure in the final verification (rank 0's) ends the run with its error, as before; the last step's
        checkpoint is written first, marked as cut short (a resume makes the verification), as a stop there writes
        it. Under torchrun every process comes here (a checkpoint takes them all: the random states gathered,
        sharded centres), and rank 0 says the line. Returns whether this process's part of the checkpoint was done;
        where it was not, this process says why."""
        self.verification_cut_short_at = self.step
        rank = self.rank if self.distributed else None  # (rank 0's lines: "train: error: rank 0: ..." under torchrun)
        try:
            self.save()
        except Exception as error:  # (a full disk, weights not finite, out of memory again): the verification's error
            # is the one that ends the run, not this one
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if not isinstance(error, (CheckpointNotWritten, TrainingDiverged)):
                reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
            if self.distributed and lost_a_peer(error):  # (one whose part failed before the collectives, gloo's words)
                reason = another_process_stopped()
            if self.is_main:
                self._error(_error_line(f"the final verification failed (step {self.step}), and the last step's "
                                        f"checkpoint was not written: {reason}", rank))
            else:
                self._error(trainer_stop_line(f"rank 0's final verification failed (step {self.step}; see its own "
                                              f"output), and the last step's checkpoint was not written: {reason}"))
            return False
        if self.is_main:
            self._error(_error_line(f"the final verification failed (step {self.step}); the last step's checkpoint is "
                                    f"written, marked as cut short: {self.checkpoint_path} (--resume auto makes the "
                                    "verification)", rank))
        return True

    def _end_with_rank_0s_failure(self, failure: Exception | None, final: bool) -> None:
        """Under torchrun, rank 0's verification failed (``failure`` on rank 0, None on the others), and every
        process has learnt it in the verification's collective: in the final one, all write the last step's
        checkpoint (``_save_before_the_error``); then rank 0 raises its error, which ends the run as in one process
        (its traceback, exit status 1), and the others end at once, with one line and exit status 0, leaving no
        collective behind: the failure is rank 0's, and torchrun's summary names it alone."""
        saved = final and self._save_before_the_error()
        if failure is not None:
            raise failure
        if not final:
            self._error(trainer_stop_line(f"rank 0's verification failed (step {self.step}; see its own output): "
                                          "this process ends"))
        elif saved:  # (not: its line said why)
            self._error(trainer_stop_line(f"rank 0's final verification failed (step {self.step}; see its own "
                                          "output): this process ends, its part of the last step's checkpoint done"))
        raise SystemExit(0)

    def _on_any_process(self, *flags: bool) -> list[bool]:
        """Whether each of ``flags`` is true on any process (collective under torchrun: every rank must call it)."""
        if not self.distributed:
            return list(flags)
        values = torch.tensor([float(flag) for flag in flags], device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [value > 0 for value in values.tolist()]

    def _best_of_an_older_checkpoint(self, logged: list[dict[str, Any]]) -> None:
        """The best so far of each set whose last record, in a checkpoint of a version before verification's best
        was kept, has none: the highest accuracy of the resumed log's records of the set (``logged``, up to the
        checkpoint's step) and its own, the earlier step on a tie; its own without the log. (Its own alone would
        have been taken for the run's best, below an accuracy the same verification.jsonl holds.)"""
        for name, last in self.last_verification.items():
            if "best_accuracy" in last:
                continue
            records = [r for r in logged if r.get("target") == name and isinstance(r.get("accuracy"), (int, float))
                       and isinstance(r.get("step"), int) and math.isfinite(r["accuracy"])]
            best = max(records + [last], key=lambda r: (r["accuracy"], -r["step"]))
            last["best_accuracy"], last["best_step"] = best["accuracy"], best["step"]

    def _evaluate_sets(self, evaluate, on_batch) -> None:
        for name, vset in self.verification_sets.items():
            # (Not at step 0: a run resumed there starts its logs afresh, and verifies step 0 again.)
            if self.step and self.verification_cut_short_at == self.step and \
                    self.last_verification.get(name, {}).get("step") == self.step:
                continue  # done before the stop that cut this step's verification short (and logged)
            result = evaluate(self.backbone, vset, device=self.device, batch_size=self.args.batch_size,
                              on_batch=on_batch)
            record = {"step": self.step, "target": name, **{k: float(v) for k, v in result.items()}}
            if getattr(vset, "group", None):  # (a benchmark's subset, RFW's races: one set to the saved threshold)
                record["group"] = vset.group
            # The best so far (arcface_torch's "Accuracy-Highest"), carried in the last record, which the checkpoint
            # keeps (one of a version before it: _best_of_an_older_checkpoint). The earlier step keeps a tie.
            last = self.last_verification.get(name)
            best = (last.get("best_accuracy", last["accuracy"]), last.get("best_step", last["step"])) if last else None
            if best is None or record["accuracy"] > best[0]:
                best = (record["accuracy"], self.step)
            record["best_accuracy"], record["best_step"] = best
            self.last_verification[name] = record
            self.log.verification(record)
            self._write(f"[step {self.step}] {name}: accuracy {record['accuracy']:.4f} "
                        f"± {record['accuracy_std']:.4f} (threshold {record['threshold']:.3f}, "
                        f"xnorm {record['xnorm']:.2f}) (best {best[0]:.4f} at step {best[1]})")
        # RFW's summary, of its four races' records of this step (some may come from before a stop that cut
        # this step's verification short).
        done = {name: record for name, record in self.last_verification.items() if record.get("step") == self.step}
        for group, summary in rfw.summaries(rfw.grouped_accuracies(self.verification_sets, done)).items():
            self.log.verification_summary(self.step, group, summary)
            self._write(f"[step {self.step}] {rfw.summary_line(group, summary)}")

    def _write(self, message: str, *, screen: bool = True) -> None:
        """``message`` on the main process's stderr (unless not ``screen``) and in its training.log."""
        if self.is_main:
            from tqdm import tqdm

            if screen:
                tqdm.write(message, file=sys.stderr)
            self.log.text(message)

    def _error(self, message: str) -> None:
        """An error line of this process (each says its own), in training.log when it is the main one's."""
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
        if self.is_main:
            with contextlib.suppress(LogNotWritten):  # (the error may be that training.log cannot be written)
                self.log.text(message)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal == signum and time.monotonic() - self._stop_signal_at < SAME_STOP_SECONDS:
            return  # the first again, passed on by torchrun (or a script that starts the run): the stop is under way
        if self._stop_signal:  # a second Ctrl-C: stop now, without the checkpoint
            signal.signal(signum, signal.SIG_DFL)
            # (A SystemExit unwinds as KeyboardInterrupt did, temporary files removed, without its traceback.)
            # (No line break first: on a terminal, tqdm.write clears the bar's line, "^C" with it; in a log or a pipe
            # it made a blank line.)
            name, first = signal.Signals(signum).name, signal.Signals(self._stop_signal).name
            again = f"a second {name}" if name == first else f"{name} after {first}"  # (torchrun: Ctrl-C, then TERM)
            self._quit_at_once = True
            self._error(trainer_stop_line(f"stopped by {again}: at once, without a checkpoint of this step"))
            raise SystemExit(128 + signum)
        # Only a flag: printing from a handler can re-enter a half-written stream. The DataLoader
        # workers, signalled with the process group, ignore it (train.data) and keep serving batches.
        self._stop_signal, self._stop_signal_at, self._stop_signal_step = signum, time.monotonic(), self.step

    def _say_a_signal_at_the_end(self) -> None:
        """A signal of this process's own that came in the last step or after it ends the run, exit status 0 (it did
        all the training it was asked); a line says it was taken, once the checkpoint is written, each process its
        own (``train: rank R: `` under torchrun, as its other stop lines). One that came before the end of the final
        verification left it out or cut it short (``_fit``): a resume makes it (the checkpoint is marked). One after
        it (the checkpoint, the end's lines) lets the run end as usual."""
        if not self._stop_signal or self._late_signal_said:
            return
        self._late_signal_said = True
        name = signal.Signals(self._stop_signal).name
        when = "during" if self._stop_signal_step < self.args.max_steps else "after"
        end = (FINAL_VERIFICATION_LEFT if self._final_verification_cut else
               "the run ends as usual, with its final verification and checkpoint" if self._verifies_at_the_end else
               "the run ends as usual, with its checkpoint")  # (no verification sets: --val-targets none, or not found)
        self._error(trainer_stop_line(f"{name} {when} the last step ({self.args.max_steps}): {end}"))

    def _when_in_the_run(self) -> str:
        """When the run is, for a line that another process's end or wait interrupted it: "during step S", or,
        its steps done (its final verification, its checkpoint), "after the last step (S)"."""
        if self.step < self.args.max_steps:
            return f"during step {self.step + 1}"
        return f"after the last step ({self.step})"

    def _nothing_to_train(self) -> str:
        """What a resume of a finished run says."""
        args = self.args
        flag = "--max-steps" if args.epochs is None else "--epochs"
        length = (f"--max-steps {args.max_steps}" if args.epochs is None else
                  f"--epochs {args.epochs:g} ({count_of(args.max_steps, 'step')})")
        return f"the checkpoint is at step {self.step} of {length}: nothing to train (raise {flag} to train on)"

    def fit(self) -> int:
        """Train to ``--max-steps``; returns the process exit code."""
        exit_code = 1  # unless _fit returns
        try:
            exit_code = self._fit()
            return exit_code
        except SystemExit as exit_info:  # a second Ctrl-C's status, for the logs' record of the end
            exit_code = exit_info.code if isinstance(exit_info.code, int) else 1
            raise
        except LogNotWritten as error:  # one line, as a checkpoint that cannot be written
            if error is not self._error_said:  # (under torchrun, said in _fit before the group was left)
                self._say_log_not_written(error)
            if self.distributed:  # the others fail in their next collective, or torchrun ends them
                raise SystemExit(1) from None
            return 1
        except Exception as error:  # a failure the trainer does not say itself: its traceback, kept with the run
            if self.is_main:
                with contextlib.suppress(LogNotWritten):
                    where = (f"at step {self.step + 1}" if self.step < self.args.max_steps else
                             f"after its last step ({self.step})")  # (its last verification, checkpoint, plots)
                    self.log.text(_error_line(f"the run failed {where}:\n{traceback.format_exc()}"))
            # (On the screen too, before the group was left: not a second time at exit. Not so an error raised
            # after that one was said, further down _fit's finally: its traceback is printed at exit.)
            if error is self._error_said:
                raise SystemExit(1) from None
            raise
        finally:
            try:
                if self.is_main:
                    self.log.close(exit_code)
            finally:  # (a Ctrl-C in W&B's upload wait too)
                self.release_output()

    def _fit(self) -> int:
        from .data import stop_loader_workers
        from .progress import whole_fields_bar

        args = self.args
        global_batch = args.batch_size * args.gradient_acc * self.world_size
        for signum in (signal.SIGINT, signal.SIGTERM):
            # A signal the process got ignored stays ignored, as in the start-up (stop_on_signals) and in
            # Python itself: a script's background job (`python -m train ... &`) outlives the Ctrl-C of the
            # script that started it.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._started = time.perf_counter()
        self._write(self.describe())
        if self.device.type == "cpu" and args.amp == "fp16":
            # An arcface_torch config's fp16 = True tried on a CPU, where torch's fp16 convolutions are
            # slow (r18, 8 images at 112 px: 24 s a step against 2.8 s in fp32 on this project's machine). A ViT
            # has one convolution, its patch embedding: that one's backward and the attention's slow it, its
            # matrix products about as fast (vit_t, 4 images at 112 px, one thread: 2.2 s a step against 1.0 s).
            if isinstance(self.backbone, VisionTransformer):
                self._write("note: --amp fp16 on the CPU runs slower than fp32 (torch's CPU fp16 attention and "
                            "patch-embedding convolution); --amp none for a CPU trial")
            else:
                self._write("note: --amp fp16 on the CPU runs several times slower than fp32 (torch's CPU fp16 "
                            "convolutions); --amp none for a CPU trial")
        # A terminal gets a progress bar. A file or a pipe (a cluster job's log, `> log.txt`) gets a line
        # every --log-every steps instead: there the bar's redraws, ten a second, would bury the log.
        interactive = _is_terminal(sys.stderr)
        bar = whole_fields_bar(total=args.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                               disable=not (self.is_main and interactive), file=sys.stderr, first=("loss", "lr"))
        resumed_at = self.step
        try:
            # A finished run resumed: its verification and checkpoint are written, unless a stop at its last step or
            # after it left out or cut that final verification (its checkpoint marked; made now, as the final one).
            if self.step >= args.max_steps and self.verification_cut_short_at != self.step:
                self._write(self._nothing_to_train())
                return 0
            stop = False  # agreed by every rank at each step: a signal may reach some of them only
            # At the start of a fresh run, and of one resumed where a stop had cut a verification short (0:
            # verification at the end only).
            if args.eval_every > 0 and (self.step == 0 or self.verification_cut_short_at == self.step) and \
                    self.step < args.max_steps:
                stop = self.evaluate()
            batches = self._batches()
            window_start, window_steps, window_loss, window_distill = time.perf_counter(), 0, 0.0, 0.0
            # The lines' ETA: the pace from the first logged line on, verifications and saves included; the
            # first window (the loader's workers starting, --compile compiling) alone only for the first line.
            pace_from = (window_start, self.step)
            first_line = True
            while self.step < args.max_steps and not stop:
                images, labels = next(batches)
                lr = self.optimizer.param_groups[0]["lr"]  # (the backbone's; the centres' beside it when apart)
                centres_lr = ({"centres_lr": self.optimizer.param_groups[1]["lr"]} if args.centres_lr_scale != 1
                              else {})
                margin = logged_margins(args, self.step) if args.margin_warmup_steps else {}  # (the step's, as lr)
                ramping = margin_fraction(self.step, args.margin_warmup_steps) < 1.0
                loss_value, stop = self.train_step(images, labels)
                window_steps += 1
                window_loss += loss_value
                window_distill += self.distill_value
                bar.update(1)
                if self._logs(self.step, stop):
                    now = time.perf_counter()
                    rate = window_steps * global_batch / max(now - window_start, 1e-9)
                    loss_mean = window_loss / window_steps  # the number metrics.jsonl gets, not the last step's
                    # (the margin loss alone; the distillation term, before its weight, beside it)
                    distilled = {"distill": window_distill / window_steps} if self.teacher is not None else {}
                    # The line's fields that tell something (the margin while it rises, the centres' own rate, the
                    # fp16 scale): host values all, the scale read in _health's one sync of a logged step.
                    scale = ({"loss_scale": f"{self.health['loss_scale']:g}",
                              "skipped": f"{self.health['skipped_steps']}"} if "loss_scale" in self.health else {})
                    # In this order (tqdm sorts keyword arguments): the fields it always had keep their place, in
                    # tqdm's order, and an option's come after them. Those the terminal's width does not take whole
                    # are left out, the last first, the loss and lr last of all (progress.fitted_postfix).
                    bar.set_fields({**{k: f"{v:.4f}" for k, v in distilled.items()}, "img_s": f"{rate:.0f}",
                                    "loss": f"{loss_mean:.3f}", "lr": f"{lr:.4g}",
                                    **{k: f"{v:.4g}" for k, v in centres_lr.items()}, **scale,
                                    **{k: f"{v:.4g}" for k, v in margin.items() if ramping}})
                    if self.is_main:
                        self.log.metrics({"step": self.step, "loss": loss_mean, **distilled, "lr": lr, **centres_lr,
                                          **margin, **self.health, "samples_per_sec": rate,
                                          "time": round(self.elapsed + now - self._started, 3)})
                        # (On a terminal the bar shows them; training.log gets the lines all the same.)
                        left = (args.max_steps - self.step) * (now - pace_from[0]) / max(1, self.step - pace_from[1])
                        if first_line:
                            pace_from, first_line = (now, self.step), False
                        epoch = self.step / self.schedule_steps_per_epoch  # (--epochs's, as the header's)
                        self._write(f"[step {self.step}/{args.max_steps}] loss {loss_mean:.4f}, "
                                    + "".join(f"distill {v:.4f}, " for v in distilled.values()) + f"lr {lr:.6g}, "
                                    + "".join(f"centres lr {v:.6g}, " for v in centres_lr.values())
                                    + (f"loss scale {self.health['loss_scale']:g} "
                                       f"({self.health['skipped_steps']} skipped), " if "loss_scale" in self.health
                                       else "")
                                    + "".join(f"{k} {v:.4g}, " for k, v in margin.items() if ramping)
                                    + f"{rate:.1f} images/s, epoch {epoch:.2f}, "
                                    f"ETA {datetime.timedelta(seconds=round(left))}", screen=not interactive)
                    window_start, window_steps, window_loss, window_distill = now, 0, 0.0, 0.0
                if args.eval_every and self.step % args.eval_every == 0 and self.step != args.max_steps:
                    stop = self.evaluate() or stop
                    window_start = time.perf_counter()
                if stop:
                    break
                if args.save_every and self.step % args.save_every == 0 and self.step != args.max_steps:
                    self.save()
                    window_start = time.perf_counter()
            if stop and self.step < args.max_steps:  # (at the last step: below, exit 0)
                # Whose signal it was, read before the checkpoint: a rank that was not signalled itself (as on
                # the nodes a pre-emption spared) stops as if terminated, and may get torchrun's SIGTERM while
                # it writes the file, once the signalled ranks have done their part of it and ended.
                signalled = self._stop_signal
                saving = time.perf_counter()
                self.save(artifact=False)
                saved_in = time.perf_counter() - saving  # against the launcher's grace (torchrun: 30 s)
                cause = signal.Signals(signalled).name if signalled else "a signal to another process"
                self._write(f"stopped by {cause} at step {self.step}; checkpoint: {self.checkpoint_path} (written in "
                            f"{saved_in:.1f} s; continue with --resume auto)")
                return 128 + (signalled or signal.SIGTERM)
            # Its last drawing now, its elapsed time and pace those of the steps, not of the final verification's
            # minutes as well.
            bar.close()
            # A stop at the last step or after it writes the last step's checkpoint at once and leaves the final
            # verification to a resume (marked: --resume auto makes it): that verification takes minutes at scale,
            # and the SIGKILL that follows a scheduler's SIGTERM after its grace (Slurm's KillWait, torchrun's 30 s)
            # would cut the checkpoint with it. In the last step, the stop was agreed at its end (the step done, as
            # any step a signal comes in); since then, it is agreed now; during the verification, rank 0 cuts it.
            # (Rank 0 alone has the sets: a run without them ends as usual.)
            stop, self._verifies_at_the_end = self._on_any_process(stop or self._stop_signal > 0,
                                                                   bool(self.verification_sets))
            if stop and self._verifies_at_the_end:
                self._final_verification_cut = True
                self.verification_cut_short_at = self.step
            else:
                self._final_verification_cut = self.evaluate(final=True)
                if not self._final_verification_cut:
                    self.verification_cut_short_at = None  # (made whole: the checkpoint below holds it)
            self.save(artifact=not self._final_verification_cut)  # (cut: by a signal)
            if self._final_verification_cut and not self._stop_signal:
                # Another process's signal, which this one did not get: rank 0 says why training.log has no final
                # verification, as it says a stop at an earlier step ("stopped by a signal to another process").
                self._write(f"a signal to another process in the last step ({args.max_steps}) or after it: "
                            f"{FINAL_VERIFICATION_LEFT}")
            self._say_a_signal_at_the_end()
            this_process = time.perf_counter() - self._started
            # A resumed run's time is its earlier processes' too; none of the steps an arcface_torch run made, which
            # its files do not give, before this process or before an earlier one that resumed it.
            took = f" in {self.elapsed + this_process:.0f} s" if not self.timed_from else ""
            resumed = f" (resumed at step {resumed_at}: {this_process:.0f} s in this process)" if resumed_at else ""
            self._write(f"done: {count_of(self.step, 'step')}{took}{resumed}; outputs in {self.output}")
            self._ended_as_usual = True
            return 0
        except (DataError, CheckpointNotWritten) as error:
            # One rank's alone. A worker's exception arrives with the worker's traceback in its
            # message; the error is the last line, after the exception's class name.
            message = str(error).strip()
            if "Original Traceback" in message:
                message = message.splitlines()[-1].split(": ", 1)[-1]
            kept = _sentence(self._kept_checkpoint())
            if isinstance(error, DataError):
                again = ("continue with --resume auto" if os.path.exists(self.checkpoint_path) else
                         "run it again")
                message = (f"step {self.step + 1}'s batch: {message}. {kept}; with the image replaced or removed, "
                           f"{again} (removed, it changes the data order)")
            else:
                message = f"{message}. {kept}"
            self._error(_error_line(message, self.rank if self.distributed else None))
            if self.distributed:  # the others fail in their next collective, or torchrun ends them
                raise SystemExit(1) from None
            return 1
        except TrainingDiverged as error:
            last = _sentence(self._kept_checkpoint("last good"))
            advice = error.advice or ("Usual causes: a learning rate too high for the batch size (lower --lr or add "
                                      "--warmup-steps), fp16 overflow (--amp bf16 or none), or a too large "
                                      "margin/scale for the data (--arcface_m, --arcface_s).")
            self._write(_error_line(f"training diverged: {error}; stopping. {last}. {advice}"))
            return 1
        except RuntimeError as error:  # (after TrainingDiverged, one)
            if self.distributed and timed_out(error):  # (rank 0 alone verifying or writing a checkpoint, say)
                # (Rank 0 names the checkpoint: another rank cannot tell one it may be writing still.)
                kept = f"; {self._kept_checkpoint()}" if self.is_main else ""
                self._error(_waited_too_long(args, self._when_in_the_run(), self.rank) + kept)
                raise SystemExit(1) from None
            # Another rank failed (its error is in its own output), or quit at once on a second signal, and this one
            # found its connection closed in the next collective, or torchrun's SIGTERM made it stop there: one
            # line, not a gloo traceback that reads like a second error.
            if not (self.distributed and lost_a_peer(error)):
                raise
            self._error(_error_line(f"{another_process_stopped(self._when_in_the_run())}; "
                                    f"{self._kept_checkpoint()}", self.rank))
            raise SystemExit(1) from None
        finally:
            bar.close()
            # Under torchrun, this process's error is said now, before the group is left below: the others
            # then find it left, end, and torchrun stops this process, at times before it had printed
            # anything. A log that cannot be written: fit's one line; an error no handler above says (a bug,
            # a CUDA error, running out of memory): its traceback.
            unwinding = sys.exc_info()[1]
            if self.distributed and isinstance(unwinding, LogNotWritten):  # (fit's one line, said here for that)
                self._say_log_not_written(unwinding)
                self._error_said = unwinding
            elif say_unhandled_error(handled=(LogNotWritten,)):  # (that one: fit says it)
                self._error_said = unwinding
            stop_loader_workers(self.loader)
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            if self._ended_as_usual:  # (a signal after its done: line, as the loader's workers were ended)
                self._say_a_signal_at_the_end()
            # Not after a second signal, which asks to quit at once: the figures take seconds, its line is out (after
            # the stop's, with its checkpoint, where the first signal got that far), and python -m train.plots draws
            # them. Those of before (a resumed run's) stay as they were: each is written whole or not at all.
            if self.is_main and not self._quit_at_once:
                if args.plots:
                    from .plots import write_plots

                    try:
                        # (A Ctrl-C now, the run's end said: a second one after a stop's line, say. With the handlers
                        # of before back, it was a KeyboardInterrupt's traceback, and a SIGTERM an end without a word.)
                        with stop_on_signals():
                            write_plots(self.output, self.angles)
                    # A full disk, an edited log (LogUnreadable, a ValueError), a stop: the run's outcome is said
                    # above, and stays its exit status.
                    except (OSError, ValueError) as error:
                        self._error(f"note: the plots were not written: {error}")
                    except Stopped as stop:
                        self._error(f"note: stopped by {stop.name} while drawing the plots: python -m train.plots "
                                    f"{self.output} draws them")
            if self.distributed:
                # All ranks reach here at the same step (stops and divergence are agreed on every
                # step); leaving together keeps one rank from tearing its gloo/NCCL group down while
                # another still writes its outputs (seen once: gloo aborting the early rank at exit).
                # An exception still propagating (one rank's alone) skips this: the others would
                # wait forever. (A divergence was handled above, on every rank.)
                peer_lost = False
                if sys.exc_info()[0] is None:
                    try:
                        dist.barrier()
                    except RuntimeError as error:
                        # Another rank failed alone after this one's last collective (its final checkpoint
                        # not written: a full disk), or took longer than --dist-timeout over its last
                        # verification and checkpoint: one line, not gloo's traceback, and not a success.
                        if timed_out(error):
                            kept = f"; {self._kept_checkpoint()}" if self.is_main else ""
                            self._error(_waited_too_long(args, "at the end of the run", self.rank) + kept)
                        elif not lost_a_peer(error):
                            raise
                        else:
                            self._error(_error_line(f"{another_process_stopped('at the end of the run')}; "
                                                    f"{self._kept_checkpoint()}", self.rank))
                        peer_lost = True
                # DDP's reducers hold the process group: let them go first, so that none of gloo's
                # threads is left for the interpreter's teardown (a suspect for the rare abort above).
                self.backbone_ddp, self.loss_ddp = self.backbone, self.margin_loss
                gc.collect()
                # Before torch 2.8 the group's destructor joined gloo's threads holding the GIL, which a
                # thread still releasing a finished collective's tensors needs (pytorch#154976; a test
                # hung so on 2.4.1): a pause that lets go of the GIL lets them finish first.
                time.sleep(0.1)
                dist.destroy_process_group()
                if peer_lost:
                    raise SystemExit(1) from None

    def _say_log_not_written(self, error: LogNotWritten) -> None:
        """The one line of a run stopped by a log it cannot write (a full disk): the file, the reason, the
        checkpoint kept."""
        self._error(_error_line(f"{error}. {_sentence(self._kept_checkpoint())}"))

    def _kept_checkpoint(self, which: str = "last") -> str:
        if not os.path.exists(self.checkpoint_path):
            return "no checkpoint was written before it"
        return f"the {which} checkpoint is kept: {self.checkpoint_path} (step {self._saved_step()})"

    def _saved_step(self) -> int | str:
        try:
            return int(checkpoint.load(self.checkpoint_path)["step"])
        except Exception:  # only for the message
            return "?"

    def describe(self) -> str:
        a = self.args
        params = sum(p.numel() for p in self.backbone.parameters())
        try:
            # A network of one's own is counted as built (its factory, which may do anything, is called once).
            work = (model_multiply_adds(self.backbone, a.image_size) if is_factory_spec(a.network) else
                    multiply_adds(a.network, a.image_size, embedding_size=a.embedding_size))
            work = (f", {work / 1e9:.2f}G" if work >= 1e8 else f", {work / 1e6:.1f}M") + " multiply-adds an image"
        except Exception:  # only for the message (a torch whose meta kernels lack an operator, say)
            work = ""
        return "\n".join([
            f"network {a.network}: {params / 1e6:.2f}M parameters{work}, {a.image_size}px input, "
            f"{a.embedding_size}-D embedding, amp {a.amp}"
            + (f", compiled ({a.compile_backend}{', ' + a.compile_mode if a.compile_mode else ''})"
               if a.compile else ""),
            (f"data {self.dataset.describe()}" if a.data == "random" else
             f"data {a.data}: {len(self.dataset)} images of {self.num_classes} identities, flipped"
             + (f", augmented ({self.dataset.augment.describe()})" if self.dataset.augment else ""))
            + f"; verification: {', '.join(self.verification_sets) or 'none'}",
            f"loss {self.margin_loss!r} ({loss_implementation(a)})" + (
                f", margin warm-up: linear from none over {count_of(a.margin_warmup_steps, 'step')}"
                f" ({', '.join(f'{k} {v:g}' for k, v in logged_margins(a, self.step).items())} at step {self.step})"
                if a.margin_warmup_steps else ""),
            *([f"distillation: {self.teacher.describe()}; {a.distill_loss} term, weight {a.distill_weight:g}"
               + (" (measured, not trained on)" if a.distill_weight == 0 else "")] if self.teacher is not None else []),
            f"{a.optimizer} lr {a.lr}"
            + (f", the class centres' {a.lr * a.centres_lr_scale:g}" if a.centres_lr_scale != 1 else "")
            + f" ({a.lr_schedule}, warm-up {a.warmup_steps}), batch {a.batch_size} x "
            f"{self.world_size} process(es)" + (f" x {a.gradient_acc} passes" if a.gradient_acc > 1 else "")
            + f" on {self.device}, {count_of(a.max_steps, 'step')} from step {self.step}"
            + (f" ({count_of(a.epochs, 'epoch')} of {count_of(self.schedule_steps_per_epoch, 'step')})"
               if a.epochs is not None else ""),
            f"output: {self.output}",
        ])


def _leave_group() -> None:
    """The process group of a run that stops at start-up, gone before the interpreter's teardown, where
    gloo's threads aborted the process (SIGABRT, after the message) in 2 of 4 runs of a helper's trial.
    (As at the end of fit.)"""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        time.sleep(0.1)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _undo_start(output: str) -> None:
    """What a run that stops at start-up made: its lock, and the --output folder it created (and the folders above
    it that it created with it, while empty), with the logs, TensorBoard events and args.json the set-up began there
    (a run stopped by a full disk at its last step). Of a folder that was there (the names it held when the run
    took its lock: Trainer._lock_output), the run's files the set-up began, and the earlier run it set aside into
    ``earlier-<n>`` moved back: the folder is as it was, and the next start finds no failed start-up's log to set
    aside as a run of its own. (A resumed run's logs, which it continued, stay.) Under torchrun, rank 0's alone: it
    alone makes and writes the folder, and another process stopping before it (its own data missing, or waiting
    past --dist-timeout while rank 0 reads the verification sets) removed the files rank 0 was still writing."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    key = os.path.realpath(output)
    if key not in _OUTPUT_FOUND:  # it never came to own the folder, nor made it: nothing there is its
        return
    before = _OUTPUT_FOUND[key]
    existed, before = before is not None, before or set()
    if key not in _OUTPUT_LOCKS:  # it made the folder and stopped before it held it: the folder, if that is all
        del _OUTPUT_FOUND[key]
        _remove_folders_made(output, key)
        return
    try:
        with contextlib.suppress(OSError):
            aside = [name for name in os.listdir(output)  # (one at most: the set-up sets aside once)
                     if name not in before and name.startswith("earlier-") and name[len("earlier-"):].isdigit()]
            moved = {name for folder in aside for name in os.listdir(os.path.join(output, folder))}
            for name in RUN_FILES:  # the set-up's: not there before, or there before and set aside since
                path = os.path.join(output, name)
                if name in before and name not in moved or not os.path.lexists(path):
                    continue
                if os.path.isdir(path) and not os.path.islink(path):  # tensorboard/, with what its writer began
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            for folder in aside:
                for name in os.listdir(os.path.join(output, folder)):
                    path, back = os.path.join(output, folder, name), os.path.join(output, name)
                    if _same_file(path, back):  # (a shard of a copy kept in the folder: linked, not moved)
                        os.remove(path)
                    else:
                        os.replace(path, back)
                os.rmdir(os.path.join(output, folder))
                print(f"note: the earlier run's files are back in {output}", file=sys.stderr)
    finally:  # (not before: a run started meanwhile took the folder, and the undo then moved files over its own)
        _release_output_lock(output)
    if not existed:
        _remove_folders_made(output, key)


def _same_file(path: str, other: str) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:  # (either missing, or a dangling link)
        return False


def _remove_folders_made(output: str, key: str) -> None:
    """The --output folder a run made, and those above it that it made with it (_OUTPUT_MADE_ABOVE), each while
    it is empty: a folder that was there before is not among them, and one that another run or a user wrote into
    meanwhile stays, with the folders above it."""
    remove_folders_made([output, *_OUTPUT_MADE_ABOVE.pop(key, ())])


def main(argv: list[str] | None = None) -> int:
    """``python -m train`` (and a script's ``train.trainer.main([...])``): the run ``argv`` asks for; returns its
    exit status. A refusal (of an option, the data, the folder: a ``SystemExit`` with its message, raised
    anywhere) leaves as ``SystemExit("train: error: <message>")``, which Python prints, exit status 1. (Under
    torchrun, a refusal after the options were read is said by each process with its rank, in _run.)"""
    try:
        return _run(argv)
    except SystemExit as refused:
        if isinstance(refused.code, str):
            raise SystemExit(_error_line(refused.code)) from None
        raise


def _run(argv: list[str] | None) -> int:
    from .config import parse_args
    from .tools import plain_warnings

    with readers_may_leave(), _kept_stderr() as read_notes:  # (an arcface_torch config's notes, a reader gone)
        args = parse_args(argv)
    with plain_warnings(), readers_may_leave():
        try:
            # Ctrl-C and SIGTERM during the start-up (reading the data, the checkpoint) unwind as below
            # and say so; from the first step on, the trainer's own handling saves a checkpoint.
            with stop_on_signals():
                trainer = Trainer(args, "".join(read_notes))
        except Stopped as stop:
            _undo_start(args.output)
            print(trainer_start_up_stop_line(stop.name), file=sys.stderr)
            _leave_group()
            return stop.exit_status
        except BaseException:
            # A run that stops at start-up (a bad option, data that does not fit) leaves no --output it made
            # behind it, nor its lock. (Rank 0's undo alone under torchrun: the others made nothing there.)
            _undo_start(args.output)
            error, rank = sys.exc_info()[1], int(os.environ.get("RANK", "0"))
            if dist.is_available() and dist.is_initialized() and timed_out(error):
                print(_waited_too_long(args, "during start-up", rank, getattr(error, "rank_0_alone", None)),
                      file=sys.stderr)
                _leave_group()
                raise SystemExit(1) from None
            if dist.is_available() and dist.is_initialized() and lost_a_peer(error):
                # Another process stopped at start-up (its error or its stop in its own output) and this one found
                # its connection closed in a start-up collective: one line, not a gloo traceback.
                print(_error_line(another_process_stopped("during start-up"), rank), file=sys.stderr)
                _leave_group()
                raise SystemExit(1) from None
            if isinstance(error, SystemExit) and isinstance(error.code, str) \
                    and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Every process says its own refusal: the rank tells whose a line is (one process's own
                # --device or data, or the same refusal from each). Said before the group is left: the
                # others find it gone, end, and torchrun then stops this process, at times before the
                # interpreter had printed a SystemExit's message (theirs said "see its own output", of none).
                print(_error_line(error.code, rank), file=sys.stderr, flush=True)
                _leave_group()
                raise SystemExit(1) from None
            if say_unhandled_error():  # (a bug, say: its traceback, before the group is left, as in fit)
                _leave_group()
                raise SystemExit(1) from None
            _leave_group()
            raise
        return trainer.fit()
