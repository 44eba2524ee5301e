"""Command-line tools that make data for the trainer: `detect` (photos -> 5 landmarks a face, with
insightface's SCRFD detector), `align` (photos + 5 landmarks -> aligned crops), `pack_rec`
(ImageFolder -> RecordIO), `make_bin` (verification pairs -> insightface .bin), `clean` (a training
set less its label noise and duplicated identities, found with a trained model), `cluster` (the faces of
an unlabelled collection grouped by person, as a table and an ImageFolder), `search` (who a face is,
among a gallery of named people), `roc` (1:1 verification on a labelled folder of faces: TAR and
threshold at each false accept rate, the EER, and the pairs that fail), `quality` (each face's quality as
its feature norm, the faces to drop, and the error-versus-reject evaluation of a quality score on
verification pairs), `preview` (a grid of training images as the network sees them) and `mfr_check` (an ONNX
model against the rules of insightface's MFR challenge for a submission); and the checks
that `pack_rec`, `make_bin`, `train.embed` and `train.ijb` make of their arguments before any work,
so that a mistake costs no time, with the parser whose error line begins with the command's name; and the CPUs
this process may use, which the tools' default --workers count."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import secrets
import shutil
import sys
import time
import traceback
import warnings
from typing import TYPE_CHECKING, Callable

# (torch, and train.checkpoint that imports it, are imported where they are used: `python -m
# train.tools.<tool>` imports this package before the tool, which imports them inside
# train.signals.stop_while_importing, so that a Ctrl-C in those seconds is the tool's one line.)
if TYPE_CHECKING:
    import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser for a command-line tool whose error line begins with the tool's short name
    ``name``, ``roc: error: ...``, as the lines of its own checks do: one form of line for every user
    mistake, which tells the command at fault in a pipeline of several. The usage line above it keeps
    ``prog`` (``python -m train.tools.roc``), the command a user copies; without ``name``, argparse's
    ``<prog>: error: ...``. An option of ``type=path_arg`` given empty is such a line, ``--model is empty (an
    empty shell variable?): give a path``."""

    def __init__(self, *args, name: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name

    def parse_known_args(self, args=None, namespace=None):
        # (Here, not in path_arg: argparse words a type's refusal "argument --model: ...".)
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if action.type is path_arg and (value == "" or isinstance(value, list) and "" in value):
                self.error(f"{action.option_strings[0] if action.option_strings else action.metavar or action.dest} "
                           "is empty (an empty shell variable?): give a path")
        return namespace, extras

    def error(self, message: str):
        from train.signals import readers_may_leave

        # (Its reader gone, 2>&1 | head: argparse lets the failed write pass, and the bytes left in stderr's
        # buffer failed again at the interpreter's last flush, exit status 120, not 2.)
        with readers_may_leave():
            self.print_usage(sys.stderr)
            self.exit(2, f"{self.name or self.prog}: error: {message}\n")


def path_arg(text: str) -> str:
    """argparse's ``type`` of an option that names a file or folder: the text as it is, which
    :class:`ArgumentParser` refuses empty, in one line that says so. (``--model "$MODEL"`` with the variable empty
    said ``no checkpoint at `` and a blank name; an empty --output wrote into the current folder; an empty
    --images or --embeddings was a traceback.)"""
    return text


def check_outputs(paths: list[str], overwrite: bool, *, inputs: tuple[str, ...] = (),
                  image_folders: tuple[str, ...] = ()) -> None:
    """Before a tool starts: each of ``paths`` names a file that may be written. Makes the folders
    they go in (removed again, while empty, if the tool's run fails or is stopped: :func:`taking_back_folders`).
    Raises ValueError naming the file when it is a folder, or one of the tool's
    ``inputs`` (a model, its settings, a features table: --overwrite would replace it), or an image's
    name under one of the ``image_folders`` the tool reads (it would replace a photo, or be one the
    next time), or when it exists and ``overwrite`` (the tool's ``--overwrite``) is False, or when its
    folder is a file or cannot be written in (a read-only file system: found now, not after hours of
    work), or a folder that cannot be made."""
    from train import checkpoint
    from train.data.transforms import IMAGE_EXTENSIONS

    read = {os.path.realpath(path) for path in inputs if path}
    folders = [os.path.join(os.path.realpath(folder), "") for folder in image_folders if folder]
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder: name a file to write")
        # Where the file lands: a write in place follows a link to its target; a temporary file renamed
        # onto the path replaces the link itself, in the link's (real) folder. Both are checked.
        landing = {os.path.realpath(path),
                   os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))}
        if landing & read:
            raise ValueError(f"{path} is one of the files this run reads: name another file to write")
        if path.lower().endswith(IMAGE_EXTENSIONS):
            for folder in folders:
                if any(place.startswith(folder) for place in landing):
                    raise ValueError(f"{path} is an image's name in {folder[:-1]}, whose images this run reads: "
                                     "name another file to write")
        if os.path.lexists(path) and not overwrite:
            raise ValueError(f"{path} exists: pass --overwrite to replace it")
        folder = os.path.dirname(os.path.abspath(path))
        in_the_way = checkpoint.nearest_existing(folder)
        if in_the_way == folder and not os.path.isdir(folder):
            raise ValueError(f"{folder} is {checkpoint.what_stands_at(folder)}, not a folder to write "
                             f"{os.path.basename(path)} in")
        if not os.path.isdir(in_the_way):  # (was "...: Not a directory")
            raise ValueError(f"cannot make the folder {folder} to write {os.path.basename(path)} in: {in_the_way} "
                             f"is {checkpoint.what_stands_at(in_the_way)}")
        made = folders_missing(folder)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:  # (was "[Errno 13] Permission denied: '<folder>'", or Errno 20, naming no output)
            raise ValueError(f"cannot make the folder {folder} to write {os.path.basename(path)} in: "
                             f"{error.strerror or error}") from None
        made_for_outputs(made)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write {os.path.basename(path)} in {folder} (read-only, or not yours)")


def check_images_folder(path: str) -> None:
    """ValueError naming --images where ``path``, the folder of images a tool reads, is not a folder (nothing is
    there, a file, or a broken symbolic link, said with where it points)."""
    if not os.path.isdir(path):
        from train import checkpoint

        raise ValueError(f"--images {path} is not a folder{checkpoint.dangling(path)}")


def say(*args, **kwargs) -> None:
    """``print``, carrying on when the stream's reader has gone (``| head``): a benchmark's results file
    is still written after hours of embedding. The stream then points at /dev/null, so that the
    interpreter's last flush of its buffer fails silently too."""
    stream = kwargs.get("file") or sys.stdout
    kwargs.setdefault("flush", True)  # a pipe's buffer would otherwise break only at the interpreter's exit
    try:
        print(*args, **kwargs)
    except BrokenPipeError:
        from train.signals import point_at_devnull

        point_at_devnull(stream)


def listable_name(name: str) -> bool:
    """Whether an image's name can be a line of a text file (a landmarks file, an embeddings table's
    index or row): UTF-8 without line breaks. A file system gives names of any bytes but ``/``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, as the file system gave them (surrogate escapes)
        return False
    return "\n" not in name and "\r" not in name


def usable_cpus(root: str = "/") -> int:
    """The CPUs this process may use, at least 1: its CPU affinity's (``taskset``, a scheduler's binding such as
    Slurm's) where the platform tells it, else ``os.cpu_count()``, and no more than its cgroup's CPU quota
    (``docker --cpus``, a Kubernetes limit) rounded up: a quota of 1.5 CPUs is 2. The cgroup files are read under
    ``root`` (a test's folder stands for ``/``); one that cannot be read or parsed sets no quota."""
    count = None
    with contextlib.suppress(OSError):  # (a sandbox may refuse sched_getaffinity, which both call)
        if hasattr(os, "process_cpu_count"):  # Python 3.13: the affinity's, or PYTHON_CPU_COUNT's
            count = os.process_cpu_count()
        elif hasattr(os, "sched_getaffinity"):
            count = len(os.sched_getaffinity(0))
    count = count or os.cpu_count() or 1
    quota = _cgroup_cpu_quota(root)
    return max(1, min(count, quota) if quota else count)


def _cgroup_cpu_quota(root: str) -> int | None:
    """The smallest CPU quota, in whole CPUs rounded up, of this process's cgroup and of its ancestors, in cgroup v2
    (``cpu.max``) and v1 (``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``); None where there is none."""
    def fields(folder: str, *names: str) -> list[str]:
        try:
            found = []
            for name in names:
                with open(os.path.join(folder, name), encoding="ascii") as f:
                    found += f.read().split()
            return found
        except (OSError, ValueError):  # (missing, unreadable, not text)
            return []

    # /proc/self/cgroup: "0::/path" in v2, "3:cpu,cpuacct:/path" in v1. The path is where the cgroup lies below
    # the hierarchy's mount; inside a container the mount is often the container's own cgroup and the path the
    # host's, which is not there: the walk up to the mount reads the container's quota then. In a cgroup namespace
    # (whose root the mount shows) a cgroup outside that root is given with "..": nothing under the mount holds it.
    paths = {"v2": "/", "v1": "/"}
    try:
        with open(os.path.join(root, "proc", "self", "cgroup"), "rb") as f:
            for line in f:
                # (a cgroup's name is any bytes: os.fsdecode gives the str that names its folder again)
                _, controllers, path = (os.fsdecode(line.rstrip(b"\n")).split(":", 2) + ["", ""])[:3]
                if not controllers:
                    paths["v2"] = path
                elif "cpu" in controllers.split(","):
                    paths["v1"] = path
    except (OSError, ValueError):  # (ValueError: bytes that a strict file system encoding refuses, as Windows')
        pass
    files = {"v2": ("cpu.max",), "v1": ("cpu.cfs_quota_us", "cpu.cfs_period_us")}
    quotas = []
    for mount, version in (("", "v2"), ("unified", "v2"), ("cpu", "v1"), ("cpu,cpuacct", "v1")):
        mount = os.path.join(root, "sys", "fs", "cgroup", mount)
        parts = [part for part in paths[version].split("/") if part not in ("", ".")]
        if ".." in parts:
            continue
        for depth in range(len(parts), -1, -1):  # the cgroup, then each parent up to the mount
            quota_and_period = fields(os.path.join(mount, *parts[:depth]), *files[version])
            try:
                quota, period = (int(text) for text in quota_and_period)  # ("max 100000" or a v1 quota of -1: none)
            except ValueError:
                continue
            if quota > 0 and period > 0:
                quotas.append(-(-quota // period))
    return min(quotas) if quotas else None


def add_embedding_options(p: argparse.ArgumentParser) -> None:
    """The options of a tool that embeds a folder of faces and compares them (``cluster``, ``search``):
    --device, --batch-size, --workers, --amp; :func:`check_embedding_options` checks them."""
    from train.embed import add_amp_option

    p.add_argument("--device", default="cpu",
                   help="where the model runs and the cosines are made: cpu, cuda, cuda:1, mps, xpu, ... "
                   "(default: cpu)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
                   help="images per forward pass (twice as many rows with the mirror; default: 64)")
    p.add_argument("--workers", type=int, default=min(8, usable_cpus()),
                   help="DataLoader processes decoding images (0: in this process; default: one a core this process "
                   "may use, up to 8)")
    add_amp_option(p)


def check_embedding_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # (--amp with a tool's --embeddings TABLE would be taken without a word: nothing is embedded)
    if args.amp is not None and getattr(args, "embeddings", None):
        p.error("--amp with --embeddings: the table's embeddings are as they were made")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.workers < 0:
        p.error("--workers must be at least 0")


def add_detector_option(p: argparse.ArgumentParser, photos: str, faces: str = "each one's main face") -> None:
    """--detector of a tool that embeds a folder of faces (``roc``, ``search``, ``cluster``, ``quality``): its
    ``photos`` ("the images under --images") are photos, whose ``faces`` are found as ``train.embed
    --detector`` finds them; :func:`check_photo_options` checks it."""
    p.add_argument("--detector", type=path_arg, metavar="FILE", default=None,
                   help=f"{photos} are photos: find {faces} with this SCRFD face detector (an ONNX file with "
                   "keypoints: insightface's det_10g.onnx; needs onnxruntime), as python -m train.tools.detect "
                   "finds them, and align it, as train.embed --detector does; a photo without a face is left out, "
                   "with a warning")


def check_photo_options(p: argparse.ArgumentParser, args: argparse.Namespace, source: str, why: str = "") -> None:
    """argparse errors for the options that find the faces in photos (--landmarks with its --extension, where
    the tool takes them, --detector, and --all-faces where the tool takes it): one given without ``source``
    (the option that names the photos: "--images"; ``why`` may follow), both ways at once, --extension
    without --landmarks, --all-faces without either way."""
    landmarks, detector = getattr(args, "landmarks", None), getattr(args, "detector", None)
    for flag, value in (("--landmarks", landmarks), ("--detector", detector)):
        if value and not getattr(args, source.lstrip("-").replace("-", "_")):
            p.error(f"{flag} goes with {source}{why}")
    if getattr(args, "extension", None) and not landmarks:
        p.error("--extension goes with --landmarks")
    if detector and landmarks:
        p.error("--detector and --landmarks are two ways to find the faces in the photos: give one")
    if getattr(args, "all_faces", False) and not (landmarks or detector):
        p.error("--all-faces goes with --landmarks or --detector")


def first_line(error: BaseException) -> str:
    """``error`` in one line, for a message: its text's first line, or its class's name where it has none
    (CPython's MemoryError)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def count_of(n: float, noun: str, nouns: str | None = None) -> str:
    """``n`` and the noun, plural unless it is 1: "1 face", "3 faces", "2 people", "2.5 epochs". A whole
    number is written whole, however large ("1000000 steps"; ``:g`` wrote "1e+06 steps")."""
    number = (str(int(n)) if n.is_integer() else f"{n:g}") if isinstance(n, float) else str(n)
    return f"{number} {noun if n == 1 else nouns or noun + 's'}"


# The distributions that install the module onnxruntime (pip's names).
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def installed_version(*distributions: str) -> tuple[str, str] | None:
    """(name, version) of the first of ``distributions`` (pip's names) that is installed; None where none is."""
    import importlib.metadata

    for name in distributions:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def not_importable(module: str, error: BaseException | None = None, distributions: tuple[str, ...] = ()) -> str:
    """What a message says to do about ``module``, which did not import (``error``, when in hand): "pip install
    <module>" where none of its ``distributions`` (default: the module's name) is installed; where one is (a build
    for numpy 1 under numpy 2, as onnxruntime 1.18 and older), that it does not import, and "pip install -U"."""
    installed = installed_version(*(distributions or (module,)))
    if installed is None:
        return f"pip install {module}"
    import numpy

    name, version = installed
    reason = f" ({type(error).__name__}: {' '.join(str(error).split())})" if error is not None and str(error) else ""
    return (f"{name} {version} is installed but does not import under numpy {numpy.__version__}{reason}: pip install "
            f"-U {name}")


def left_out_said(*counts: tuple) -> str:
    """What the warnings above left out, for a tool's last line, in the one wording every tool uses:
    "; 2 images left out (the warnings above say why)". Each of ``counts`` is ``count_of``'s (n, noun[,
    nouns]): "image", or "photo" where they are photos (under --detector); those of 0 are not said, and
    nothing is ('') when all are 0."""
    said = [count_of(*count) for count in counts if count[0]]
    return f"; {', '.join(said)} left out (the warnings above say why)" if said else ""


def summary_path(output: str) -> str:
    """Where the summary of a tool's table at ``output`` (a .csv) goes: the same name, .json."""
    return output[:-len(".csv")] + ".json"


def torch_device(text: str) -> torch.device:
    """``--device``'s value as a device this torch can run on; ValueError otherwise. cpu, cuda, and
    Apple's mps and Intel's xpu, each where torch says it is there: the tools' inference is plain
    PyTorch in float32 (what needs float64 is done on the CPU), which none of the others has run."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a torch device (cpu, cuda, cuda:1, mps, xpu, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {text}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            built = "" if torch.backends.mps.is_built() else ": this torch is built without it"
            raise ValueError(f"--device {text}, but torch sees no MPS device (Apple's GPUs){built}")
        if device.index not in (None, 0):  # (one a machine)
            raise ValueError(f"--device {text}, but torch sees 1 MPS device: mps or mps:0")
    if device.type == "xpu":
        xpu = getattr(torch, "xpu", None)  # (None in a torch without it)
        if xpu is None or not xpu.is_available():
            raise ValueError(f"--device {text}, but torch sees no XPU device (Intel's GPUs)")
        if device.index is not None and device.index >= xpu.device_count():
            raise ValueError(f"--device {text}, but torch sees {xpu.device_count()} XPU device(s)")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {text}: the tools run on cpu, cuda, mps or xpu")
    return device


def start_process_group(backend: str, **kwargs) -> None:
    """``torch.distributed.init_process_group(backend, **kwargs)``, torch.distributed.nn.functional imported first.
    That module's functions take ``group=group.WORLD`` as a default argument, evaluated as it is imported: imported
    once the group was started (torch 2.13's torch._dynamo imports it, and torch imports torch._dynamo as the first
    optimizer is built), ten of them held the group until the process ended, so that destroy_process_group closed
    none of gloo's connections. Another rank waiting in a collective for this one, which had left the group (its
    last checkpoint not written), learnt it only as this process ended, when torchrun stops that rank too."""
    import torch.distributed as dist

    with contextlib.suppress(ImportError):  # (a torch without it: nothing can import it later either)
        import torch.distributed.nn.functional  # noqa: F401
    dist.init_process_group(backend, **kwargs)


def lost_a_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process of the group went away (gloo's words;
    NCCL waits for its watchdog instead)."""
    return any(words in str(error) for words in ("Connection closed by peer", "Connection reset by peer"))


def another_process_stopped(when: str = "") -> str:
    """What a process says of another of its group that it found gone (``lost_a_peer``) ``when`` ("during step 3",
    "during start-up"; clean: when it may): that one's own output says why, an error or a stop (a signal to it
    alone, as on a pre-empted node, or a second one, which quits at once), which a closed connection does not
    tell apart."""
    return f"another process stopped{f' {when}' if when else ''} (see its own output)"


def timed_out(error: BaseException) -> bool:
    """Whether a collective failed because it waited for the other processes longer than the process group's
    timeout (gloo's words; NCCL's watchdog's, where it raises rather than ends the process)."""
    return any(words in str(error) for words in ("Timed out waiting", "Application timeout caused pair closure",
                                                 "Watchdog caught collective operation timeout"))


def say_unhandled_error(handled: tuple[type[Exception], ...] = ()) -> bool:
    """Under torchrun, the exception this process is unwinding with (``sys.exc_info()``) when no handler
    says it (an Exception: a bug, a CUDA error, running out of memory; not one of ``handled``, which a
    handler further out says, nor a SystemExit, a stop, a KeyboardInterrupt, or a collective that found
    another process gone), said now: its traceback on stderr, through ``sys.excepthook`` (torch's once the
    group is started: each line after "[rankN]: "), and in torchrun's error file
    (``TORCHELASTIC_ERROR_FILE``), which its failure summary shows as the root cause. Call it where the
    process leaves its process group, before it does: the others end on finding the group left, and
    torchrun stops the remaining processes as soon as one has ended, at times before this one's
    interpreter had printed the traceback at its exit. Returns whether it said one: the caller then ends
    with ``SystemExit(1)``, without the interpreter printing it a second time. Only an exception that
    unwinds through the caller's own frame counts: where a run is started while a function further out
    handles an error of its own (a script's retry, in its except clause), ``sys.exc_info()`` gives that
    error though nothing unwinds here."""
    error = sys.exc_info()[1]
    trace, caller = getattr(error, "__traceback__", None), sys._getframe(1)
    while trace is not None and trace.tb_frame is not caller:
        trace = trace.tb_next
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # ('' where torchrun keeps no logs)
    if not (trace is not None and isinstance(error, Exception) and not isinstance(error, handled)
            and not lost_a_peer(error) and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or error_file)):
        return False
    sys.excepthook(type(error), error, error.__traceback__)
    sys.stderr.flush()
    if error_file:
        # The format of torch.distributed.elastic's ErrorHandler.record_exception, the @record decorator's
        # writer (which runs once the exception has left the decorated function: the group long left),
        # written whole: torchrun stops this process as soon as another has ended, and its summary raises
        # on a file it cannot parse. (Not written, the traceback above is all the same said.)
        from train import checkpoint

        callstack = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        with contextlib.suppress(OSError):
            checkpoint.write_json_atomic(error_file, {"message": {
                "message": f"{type(error).__name__}: {error}",
                "extraInfo": {"py_callstack": callstack, "timestamp": str(int(time.time()))}}})
    return True


class RunLock:
    """``path``, held (an advisory lock, where the system has them) for the whole of a run, so that a
    second run on the same output is refused before it touches anything; removed at the end (a
    killed run leaves it, unlocked, for the next run to take). ``busy`` is the ValueError's message
    when another run holds it; ``flag`` names the option whose folder must be writable."""

    def __init__(self, path: str, busy: str, flag: str = "--output"):
        self.path = path
        try:
            import fcntl
        except ImportError:  # Windows: no second-run check
            fcntl = None
        while True:
            try:
                self.file = open(self.path, "a")
            except OSError as error:
                raise OSError(f"{flag}: cannot create the run's lock file {path}: {error.strerror or error}") from None
            if fcntl is None:
                return
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    self.file.close()
                    raise ValueError(busy) from None
                # A file system without flock (Lustre mounted without it, NFS without lockd, some FUSE
                # mounts): the run goes on unguarded rather than refused as if another held the lock.
                print(f"note: {path}: this file system does not lock files ({error.strerror or error}): a second "
                      "run on the same output would not be stopped", file=sys.stderr)
                return
            # Locked, but the file may have been removed by the run that held it just before (release):
            # then this lock guards nothing, and the path is taken again.
            try:
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    return
            except FileNotFoundError:
                pass
            self.file.close()

    def release(self) -> None:
        # Removed while still locked: a run waiting on this file then finds it gone and takes a new one.
        with contextlib.suppress(OSError):
            os.remove(self.path)
        self.file.close()


# The project's own code: its warnings speak to the tool's user, and say where in the data they are.
_OWN_CODE = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), name, "")
                  for name in ("train", "arcface_ext"))


@contextlib.contextmanager
def plain_warnings():
    """While the block runs, a warning of this project's code (an image folder's left-out images, a
    verification set not found) shows as one line, ``warning: <message>``, rather than as Python
    shows it (the file and line of the code that warned, and that line's source); others (torch's)
    as before."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(_OWN_CODE):
            say(f"warning: {message}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


# A folder of links to images (cluster --tree, quality --tree), made beside its place and moved there whole.

def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies in it (links followed)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(os.path.join(folder, ""))


def folders_missing(path: str) -> list[str]:
    """``path`` and the folders above it that do not exist yet, deepest first: those that making it makes (n1/n2/n3,
    n1/n2 and n1 of a new n1/n2/n3; the default runs/<network>'s runs/ in a fresh clone), which a tool that fails
    or stops before it has written anything there takes back with ``remove_folders_made``."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def remove_folders_made(folders: list[str]) -> None:
    """Removes ``folders`` (``folders_missing``'s, deepest first) while each is empty: one that another run or the
    user wrote into meanwhile stays, with those above it, and a folder that was there is never among them."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


# The folders made for the outputs of the tool that runs (in :func:`taking_back_folders`), each a list of
# folders_missing's, deepest first; None outside a tool's run.
_folders_made: list[list[str]] | None = None


def made_for_outputs(folders: list[str]) -> None:
    """Notes ``folders`` (``folders_missing``'s, made now by ``check_outputs``, ``check_tree_folder`` or a tool for
    its outputs) for :func:`taking_back_folders` to remove if the run fails or is stopped."""
    if _folders_made is not None and folders:
        _folders_made.append(folders)


def taking_back_folders(work: Callable[[], int]) -> int:
    """``work()``, a tool's run (its exit status). When it fails or is stopped (an exception, a Ctrl-C, an exit
    status of 2 or more), the folders made for its outputs (``made_for_outputs``) are removed, while empty, the
    last made first: a new ``--output n1/n2/out.csv`` refused after ``check_outputs`` made n1/n2 (a model that
    does not load, a folder of one person) leaves no n1/n2. A folder that was there is never among them, and one
    that holds anything stays. Within another's run (nested), a run that ends well hands its folders to it."""
    global _folders_made
    outer, made = _folders_made, []
    _folders_made = made
    failed = True
    try:
        status = work()
        failed = status >= 2
        return status
    finally:
        _folders_made = outer
        if failed:
            for folders in reversed(made):
                remove_folders_made(folders)
        elif outer is not None:
            outer.extend(made)


def link_or_copy(source: str, target: str, copy: bool) -> bool:
    """``target`` made a hard link to ``source`` (True), or a copy of it (False) with ``copy`` or where the
    file system refuses the link (another device, no hard links, too many links)."""
    if not copy:
        try:
            os.link(source, target)
            return True
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
    shutil.copy2(source, target)
    return False


def hidden_beside(tree: str, kind: str) -> str:
    """A hidden folder's path beside ``tree``, named for its writer as checkpoint.write_atomic names its
    temporaries, so that the next run can tell a killed run's: ``kind`` is ``partial`` (a tree being
    laid out) or ``old`` (the tree it replaces, being removed)."""
    from train import checkpoint

    parent, base = os.path.split(os.path.abspath(tree))  # (abspath: a tree/ given has the name tree)
    return os.path.join(parent, f".{base}.{checkpoint._HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def remove_killed_runs_trees(tree: str) -> None:
    """The hidden folders beside ``tree`` that runs on this host left when they were killed (their
    process gone): a run that stops otherwise removes its own."""
    from train import checkpoint

    parent, base = os.path.split(os.path.abspath(tree))
    pattern = re.compile(re.escape(f".{base}.") + r"(\w+)-(\d+)-[0-9a-f]{8}\.(partial|old)")
    for entry in os.listdir(parent):
        found = pattern.fullmatch(entry)
        if found and found.group(1) == checkpoint._HOST and not checkpoint._process_alive(int(found.group(2))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def replace_folder(new: str, path: str) -> str | None:
    """``new`` renamed to ``path``; a folder there is first moved into a hidden folder beside it,
    which is returned for the caller to remove (None when there was none)."""
    old = None
    if os.path.lexists(path):
        old = hidden_beside(path, "old")
        os.replace(path, old)
    os.replace(new, path)
    return old


def check_tree_folder(tree: str, overwrite: bool, ours, kind: str) -> None:
    """Before a tool lays out ``--tree``: ValueError naming it when it exists and is not a folder, holds
    something without ``overwrite``, or holds an entry that ``ours`` (its path -> bool) does not take for the
    tool's own (``kind`` says what the tool writes there: "a tree of clusters"); or when the folder it goes
    in cannot be made or written in."""
    from train import checkpoint

    if os.path.lexists(tree):
        if not os.path.isdir(tree) or os.path.islink(tree):
            raise ValueError(f"--tree {tree} exists and is not a folder{checkpoint.dangling(tree)}")
        entries = os.listdir(tree)
        if entries and not overwrite:
            raise ValueError(f"--tree {tree} exists: pass --overwrite to replace it")
        foreign = [name for name in entries if not ours(os.path.join(tree, name))]
        if foreign:
            raise ValueError(f"--tree {tree} holds {os.path.join(tree, foreign[0])}, which this tool does not "
                             f"write: --overwrite replaces only {kind}; name another folder")
    parent = os.path.dirname(os.path.abspath(tree))
    in_the_way = checkpoint.nearest_existing(parent)
    if in_the_way == parent and not os.path.isdir(parent):  # (was "cannot make the folder <it>: File exists")
        raise ValueError(f"--tree: {parent} is {checkpoint.what_stands_at(parent)}, not a folder to make "
                         f"{os.path.basename(tree)} in")
    if not os.path.isdir(in_the_way):  # (was "...: Not a directory")
        raise ValueError(f"--tree: cannot make the folder {parent}: {in_the_way} is "
                         f"{checkpoint.what_stands_at(in_the_way)}")
    made = folders_missing(parent)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--tree: cannot make the folder {parent}: {error.strerror or error}") from None
    made_for_outputs(made)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--tree: cannot write in {parent} (read-only, or not yours)")
