"""Training data and verification sets for the trainer: what `--data` and
`--val-targets` name, turned into datasets, a resumable DataLoader and
`VerificationSet`s."""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import signal
import sys
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from .augment import Augmentation
from .combined import CombinedFaces, split_data_spec
from .imagefolder import ImageFolderDataset
from .imagelist import LIST_EXTENSIONS, ImageListDataset, is_image_list
from .random import RANDOM, RandomBatches, RandomFaces
from .recordio import RecordIODataset, RecordIOError
from .synthetic import SyntheticFaces, synthetic_pairs
from .transforms import FaceImageDataset

if TYPE_CHECKING:
    from train.verification import VerificationSet

__all__ = [
    "Augmentation",
    "CombinedFaces",
    "FaceImageDataset",
    "ImageFolderDataset",
    "ImageListDataset",
    "RandomBatches",
    "RandomFaces",
    "RecordIODataset",
    "RecordIOError",
    "ResumableBatchSampler",
    "SyntheticFaces",
    "build_train_dataset",
    "build_train_loader",
    "build_verification_sets",
    "data_folder",
    "leave_signals_to_the_main_process",
    "worker_start_method",
]

SYNTHETIC = "synthetic"
DEFAULT_SYNTHETIC_IDENTITIES = 100
DEFAULT_SYNTHETIC_IMAGES_PER_IDENTITY = 160
DEFAULT_SYNTHETIC_PAIRS = 600
# insightface's verification sets (the .bin files beside its training sets): one is not a misspelling of another.
_INSIGHTFACE_SETS = frozenset({"lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp"})


def build_train_dataset(spec: str, *, image_size: int = 112, seed: int = 0, flip: bool = True,
                        augment: Augmentation | None = None,
                        synthetic_identities: int = DEFAULT_SYNTHETIC_IDENTITIES,
                        synthetic_images_per_identity: int = DEFAULT_SYNTHETIC_IMAGES_PER_IDENTITY,
                        ) -> tuple[FaceImageDataset, int]:
    """(dataset, num_classes) for `--data`.

    spec: 'synthetic'; a folder holding `train.rec` + `train.idx` (insightface
    RecordIO); an ImageFolder root (one sub-folder per identity); or a list file
    (.lst, .txt: `train.data.imagelist.read_image_list`).
    `dataset[i]` and `dataset[(i, epoch)]` give (uint8 (3, image_size,
    image_size) image, int label); with flip=True the image is
    mirrored for a deterministic half of the (seed, epoch, i), after `augment`
    (`train.data.augment`: AdaFace's and torchvision's), whose draws are a function of (seed, epoch, i) too.
    Datasets pickle without open files, so DataLoader workers each open their own.
    Several sets separated by commas (`a,b`: `train.data.combined.split_data_spec`) are one
    `CombinedFaces`, each set's identities labelled after those of the sets before it.
    """
    names = split_data_spec(spec)
    if len(names) > 1:
        parts = []
        for name in names:
            part, _ = build_train_dataset(name, image_size=image_size, seed=seed, flip=False,
                                          synthetic_identities=synthetic_identities,
                                          synthetic_images_per_identity=synthetic_images_per_identity)
            parts.append((name, part))
        dataset = CombinedFaces(parts, image_size=image_size, seed=seed, flip=flip)
        dataset.augment = augment
        return dataset, dataset.num_classes
    if spec == RANDOM:
        # (the trainer builds it from --num-classes: RandomFaces; the tools that read faces get none)
        raise ValueError(f"--data {RANDOM} is noise drawn for timing a training step (the trainer's --data random), "
                         "not faces to read: name a set of faces")
    if spec == SYNTHETIC:
        dataset = SyntheticFaces(synthetic_identities, synthetic_images_per_identity,
                                 image_size=image_size, seed=seed, flip=flip)
    elif os.path.isfile(os.path.join(spec, "train.rec")):
        if not os.path.isfile(os.path.join(spec, "train.idx")):
            raise FileNotFoundError(f"--data {spec!r} holds train.rec but not its index train.idx: copy that too")
        dataset = RecordIODataset(spec, image_size=image_size, seed=seed, flip=flip)
    elif os.path.isdir(spec):
        dataset = ImageFolderDataset(spec, image_size=image_size, seed=seed, flip=flip)
    elif is_image_list(spec):
        dataset = ImageListDataset(spec, image_size=image_size, seed=seed, flip=flip)
    else:
        # A path that names nothing (a relative path from another directory, a typo) says so.
        missing = "" if os.path.lexists(spec) else (
            f"no such {'file' if spec.lower().endswith(LIST_EXTENSIONS) else 'folder'}"
            + ("" if os.path.isabs(spec) else f" under {os.getcwd()}") + "; ")
        raise FileNotFoundError(
            f"--data {spec!r}: {missing}expected 'synthetic', a folder with train.rec + train.idx, an image folder, "
            "or a list file (.lst, .txt)"
        )
    dataset.augment = augment
    return dataset, dataset.num_classes


def resized_note(name: str, dataset: FaceImageDataset, image_size: int, size_from: str) -> str | None:
    """The note that ``dataset`` (one set of :func:`build_train_dataset`'s, given as ``name``) holds
    images of another size than ``image_size`` (``size_from`` says whose size: ``--image-size``), which
    are resized to it: photos, not aligned faces, show here. None where they are that size or it is not
    known. Said by the trainer of its --data, and by the tools that read a --data as it does."""
    stored = getattr(dataset, "stored_size", None)
    if stored in (None, (image_size, image_size)):
        return None
    return (f"note: {name} holds {stored[1]}x{stored[0]} (width x height) images ({dataset.stored_size_source}); "
            f"they are resized to {image_size}x{image_size} ({size_from})")


def check_every_rank_reads_the_same(dataset: FaceImageDataset, spec: str, fingerprint: str | None = None) -> None:
    """Raise SystemExit on every rank of the default process group unless all ranks built the same
    training set from `--data spec` (its fingerprint: size, classes and index, not the pixels).

    Each node reads its own copy of a dataset; a copy that differs (another packing, a partial
    copy, an ImageFolder that gained a folder) would train with labels that mean different
    identities on different ranks, silently. ``fingerprint``: the dataset's, when the caller has it."""
    import torch.distributed as dist

    mine = (len(dataset), dataset.num_classes, fingerprint or dataset.fingerprint())
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    if all(other == seen[0] for other in seen):
        return
    groups: dict[tuple, list[int]] = {}
    for rank, other in enumerate(seen):
        groups.setdefault(other, []).append(rank)
    kinds = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {size} images of "
                      f"{classes} identities (index {digest})" for (size, classes, digest), ranks in groups.items())
    raise SystemExit(f"--data {spec}: the processes read different training sets ({kinds}); every node needs "
                     "the same copy")


def is_target_path(target: str) -> bool:
    """Whether a `--val-targets` entry names a file rather than a set."""
    return target.endswith((".bin", ".txt")) or os.sep in target


def data_folder(spec: str) -> str | None:
    """The folder of `--data spec`, where its verification sets' `<name>.bin` are: a list file's folder,
    the data folder itself; None for synthetic and random data."""
    if spec in (SYNTHETIC, RANDOM):
        return None
    return (os.path.dirname(spec) or ".") if is_image_list(spec) else spec


def data_folders(spec: str) -> list[str]:
    """The folders of `--data spec`'s sets (`data_folder`), in order; none for synthetic data or no data
    (`train.verify` without `--data`: a path is looked for as written only)."""
    return [] if spec in (SYNTHETIC, RANDOM, "") else [data_folder(part) for part in split_data_spec(spec)]


def find_target(folder: str | list[str] | None, target: str, flag: str = "--val-targets") -> str | None:
    """The file of a `--val-targets` entry (or the folder of a path that is one: RFW's, `train.rfw`);
    None for a name that `folder` lacks (no folder: synthetic data; several: each in turn). A path is
    looked for as it is, then in `folder`, and is an error when missing."""
    if is_target_path(target) and os.path.isdir(target):
        return target
    candidates = [target] if is_target_path(target) else []
    for where in [folder] if isinstance(folder, str) else folder or []:
        candidates += [os.path.join(where, target), os.path.join(where, target + ".bin")]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None and is_target_path(target):
        # (where a relative path was looked for too: the data's folder, where `pairs.txt` beside a list was meant;
        # each once, as the lists of --data a.txt,b.txt share theirs)
        folders = [] if os.path.isabs(target) else [folder] if isinstance(folder, str) else list(
            dict.fromkeys(folder or []))
        raise FileNotFoundError(f"{flag}: no verification set at {target}" + (
            f", nor in {' or '.join(folders)} (the data's folder{'s' if len(folders) > 1 else ''})" if folders else ""))
    return found


def build_verification_sets(spec: str, targets: list[str], *, image_size: int = 112, seed: int = 0,
                            synthetic_pairs_per_target: int = DEFAULT_SYNTHETIC_PAIRS, flag: str = "--val-targets",
                            ) -> dict[str, VerificationSet]:
    """{name: VerificationSet} for `--val-targets`.

    A target is `<name>` or the path of a `.bin` (insightface's format) or of a pairs file
    `.txt` (a pairs list, `image1 image2 0|1` per line, or LFW's `pairs.txt`, CALFW's or CPLFW's pair
    file, told by its content: `train.verification.read_pairs_list`), or of RFW's folder, which gives
    its four races' sets (`RFW/African`, ...; `train.rfw`); anything ending in `.bin` / `.txt` or holding a
    path separator is a path, read from that file whatever the data. A path that is not found is
    an error, and so is a set of fewer pairs than the folds of its accuracy. A name is read from
    `<data folder>/<name>.bin` (`data_folder`: a list file's folder; of several sets, the first folder
    that has it; skipped with a warning when none does, as insightface does); with spec 'synthetic' it
    is one synthetic set, of identities disjoint from the training ones and from the other names'. A
    file named twice is one set. ``flag`` names the option in messages.
    """
    # train.verification reads images through this package: import it here, not at the top.
    from train.verification import NFOLDS, VerificationSet, load_bin, load_pairs_list

    sets: dict[str, VerificationSet] = {}
    files: set[str] = set()  # each file is read once, however often it is named (lfw, lfw.bin, <data>/lfw.bin)
    for target in targets:
        if target in sets:
            continue
        # A name stays a name where a folder here has it (RFW's folder, meant as a path): said.
        folder = f"; {target} is a folder here: write its path (./{target}) to read it" \
            if not is_target_path(target) and os.path.isdir(target) else ""
        if spec == RANDOM and not is_target_path(target):  # (skipped, as a name missing from a data folder is)
            warnings.warn(f"verification target {target!r}: --data random has no folder of sets; skipped (give the "
                          f"path of a .bin or pairs file)", stacklevel=2)
            continue
        if spec == SYNTHETIC and not is_target_path(target):
            if folder:
                warnings.warn(f"verification target {target!r} is a synthetic set{folder}", stacklevel=2)
            images, issame = synthetic_pairs(target, num_pairs=synthetic_pairs_per_target,
                                             num_identities=max(2, synthetic_pairs_per_target // 2),
                                             image_size=image_size, seed=seed)
            sets[target] = VerificationSet(target, images, issame)
            continue
        # (Several sets: the first folder that holds it.)
        folders = data_folders(spec)
        path = find_target(folders, target, flag)
        if path is None:
            inside = next((os.path.join(where, target) for where in folders
                           if os.path.isdir(os.path.join(where, target))), None)
            if not folder and inside:  # (RFW's folder beside the data's .bin files, say)
                folder = f"; {inside} is a folder: write its path to read it"
            where = " or ".join(repr(where) for where in folders)
            warnings.warn(f"verification target {target!r}: no {target}.bin in {where}; skipped{folder}"
                          f"{_near_set(folders, target)}", stacklevel=2)
            continue
        if os.path.isdir(path):
            _add_rfw(sets, files, path, image_size)
            continue
        if os.path.realpath(path) in files:
            continue
        files.add(os.path.realpath(path))
        vset = load_pairs_list(path, image_size) if path.endswith(".txt") else load_bin(path, image_size)
        if vset.num_pairs < NFOLDS:
            raise ValueError(f"{path}: {vset.num_pairs} pairs; verification needs at least {NFOLDS}, one for each "
                             f"fold of its {NFOLDS}-fold accuracy")
        name = target if not target.endswith((".bin", ".txt")) else vset.name
        if name in sets:  # another set's file of the same name (/a/lfw.bin, /b/lfw.bin): its folder tells them apart
            name = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{name}"
            if name in sets:
                name = target
        vset.name = name
        sets[name] = vset
    return sets


def _near_set(folders: list[str], target: str) -> str:
    """"; lfw.bin is there: ..." where a folder of ``folders`` holds a `.bin` whose name is near ``target``'s
    (a misspelling, `lwf`, or another case, `LFW`), else ""."""
    import difflib

    names = set()
    for where in folders:
        try:
            names.update(n[:-4] for n in os.listdir(where) if n.endswith(".bin"))
        except OSError:
            continue
    lower = {name.lower(): name for name in sorted(names)}
    if target.lower() in _INSIGHTFACE_SETS:  # (lfw is near cplfw as a string, cfp_fp near cfp_ff: other sets)
        lower = {key: name for key, name in lower.items() if key == target.lower() or key not in _INSIGHTFACE_SETS}
    near = difflib.get_close_matches(target.lower(), list(lower), n=1, cutoff=0.6)
    return f"; {lower[near[0]]}.bin is there: is it the set meant?" if near else ""


def _add_rfw(sets: dict[str, VerificationSet], files: set[str], folder: str, image_size: int) -> None:
    """RFW's four races under ``folder`` into ``sets``, as ``RFW/<Race>`` (``<folder's name>/RFW/<Race>``
    when another RFW folder took those names); a release read already is not read again."""
    from train.rfw import GROUP, RACES, find_release, load_race
    from train.verification import NFOLDS

    release = find_release(folder)
    if os.path.realpath(release.root) in files:
        return
    files.add(os.path.realpath(release.root))
    group = GROUP
    if any(f"{group}/{race}" in sets for race in RACES):
        group = f"{os.path.basename(os.path.normpath(os.path.abspath(folder)))}/{GROUP}"
    if any(f"{group}/{race}" in sets for race in RACES):
        group = os.path.normpath(folder)
    for race in RACES:
        vset = load_race(release, race, image_size, group=group)
        if vset.num_pairs < NFOLDS:
            raise ValueError(f"RFW {folder}: {race}: {vset.num_pairs} pairs; verification needs at least {NFOLDS}, "
                             f"one for each fold of its {NFOLDS}-fold accuracy")
        sets[vset.name] = vset


# ---------------------------------------------------------------------------------------------
# Loading


def _epoch_seed(seed: int, epoch: int) -> int:
    # (a Python int before the shift: numpy 1.x casts uint64 >> int to float64, which has no shift)
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1, np.uint64)[0]) >> 1


class ResumableBatchSampler(torch.utils.data.Sampler):
    """An endless stream of batches whose content at global step k depends only on
    (seed, k), so that a run resumed at step k sees what an uninterrupted run sees.

    Epoch e visits the samples in the order `torch.randperm` draws from a generator
    seeded with (seed, e); with world_size > 1 that order is padded by wrap-around
    to a multiple of world_size and rank r takes every world_size-th sample from
    position r (as DistributedSampler does). Each epoch has `steps_per_epoch`
    batches (the last partial batch is dropped with drop_last). A batch is a list
    of (index, epoch) keys, which the datasets use for their flips. Iteration
    starts at global step `start_step` and never ends: draw as many batches as
    there are steps to train.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, start_step: int = 0):
        if batch_size < 1 or num_samples < 1:
            raise ValueError(f"need a positive batch size and dataset, got {batch_size} and {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last, self.start_step = drop_last, start_step
        self.samples_per_rank = math.ceil(num_samples / world_size)
        if drop_last:
            self.steps_per_epoch = self.samples_per_rank // batch_size
        else:
            self.steps_per_epoch = math.ceil(self.samples_per_rank / batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_samples} samples over {world_size} rank(s) do not fill one batch of {batch_size} (drop_last)"
            )

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`, in visiting order."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        padded = self.samples_per_rank * self.world_size
        if padded > self.num_samples:
            order = torch.cat([order, order[: padded - self.num_samples]])
        return order[self.rank::self.world_size]

    def __iter__(self):
        epoch, skip = divmod(self.start_step, self.steps_per_epoch)
        while True:
            indices = self.epoch_indices(epoch).tolist()
            for step in range(skip, self.steps_per_epoch):
                yield [(i, epoch) for i in indices[step * self.batch_size:(step + 1) * self.batch_size]]
            epoch, skip = epoch + 1, 0


class _LeaveSignalsToTheMainProcess:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM and SIGINT while its main
    process lives, and exits on them once that process is exiting.

    A scheduler's SIGTERM (torchrun's, Slurm's) or a Ctrl-C reaches the whole process group. torch's
    workers die of a SIGTERM that their parent did not send, and the main process, which finishes
    its step and writes the checkpoint before it exits, then fails on its next batch. So the workers
    leave the decision to it. But at interpreter exit, multiprocessing ends the daemonic children that
    are still running with SIGTERM and joins them: a script that never shut its loader's persistent
    workers down (or one leaving on an error, whose traceback holds the loader) would wait for them
    forever. `exiting` is set at the main process's exit, before multiprocessing's own exit handler
    runs (`atexit` calls handlers last-registered first), and a worker then exits quietly, as torch's
    workers do on their parent's SIGTERM. torch sets its worker signal handlers before it calls this,
    so these win. The workers also end when the DataLoader shuts them down or the main process dies.

    A worker hands each batch's tensors to the main process as file descriptors, which a thread of
    the worker serves (``multiprocessing.resource_sharer``) when the main process asks for them. A stop
    raised in the main process while it is asking hangs up mid-transfer, and that thread would print a
    traceback of the reset connection under the tool's one-line stop message. The main process is the
    only one that connects, and it hangs up only when it stops or dies (and then says so itself), so
    the worker does not report a connection that ends early.
    """

    def __init__(self, exiting):
        self.exiting = exiting

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        sys.excepthook = _QuietOnHangUp(sys.excepthook)

    def _on_signal(self, signum, frame) -> None:
        if self.exiting.is_set():
            os._exit(0)


class _QuietOnHangUp:
    """A ``sys.excepthook`` that drops the errors of a connection the other end closed early
    (in a loader's worker, only the handle-sharing thread reports through it) and passes on the rest."""

    HANG_UPS = (ConnectionError, EOFError)
    # From Python 3.14 the sender of a descriptor waits for the receiver's acknowledgement (before, on
    # Linux, it did not): a receiver that hung up without it makes the sender raise this RuntimeError.
    UNACKNOWLEDGED = "did not receive acknowledgement of fd"

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, kind, value, trace) -> None:
        unacknowledged = issubclass(kind, RuntimeError) and str(value) == self.UNACKNOWLEDGED
        if not (issubclass(kind, self.HANG_UPS) or unacknowledged):
            self.previous(kind, value, trace)


def leave_signals_to_the_main_process() -> _LeaveSignalsToTheMainProcess:
    """The ``worker_init_fn`` of a loader whose main process stops cleanly on SIGTERM and Ctrl-C (the
    trainer's, ``train.tools.detect``'s): see ``_LeaveSignalsToTheMainProcess``. Its loader starts its
    workers by ``worker_start_method()``."""
    return _LeaveSignalsToTheMainProcess(_main_process_exiting())


def worker_start_method() -> str | None:
    """The ``multiprocessing_context`` of a loader (or a pool: pack_rec's) whose workers leave signals to
    the main process: "fork" where the start method is forkserver (Python 3.14's default on Linux), else
    None (the default: fork on Linux before 3.14, spawn on macOS).

    Those workers must be the main process's own children. A forkserver is a process of its own in
    the process group, which a scheduler's SIGTERM ends at once; torch's workers, its children, then
    take their parent for dead and leave their loop without cancelling their data queue's join, and
    one whose queue's pipe is full waits at exit forever, an orphan holding the run's stderr (seen with
    ``train.tools.detect --workers 2`` on Python 3.14.10: 5 of 40 runs). Forked workers also share the
    dataset's arrays of paths and offsets rather than each unpickling a copy."""
    # (Not get_start_method(), which fixes the default for the process: a later set_start_method raised.)
    methods = multiprocessing.get_all_start_methods()  # the default first
    if (multiprocessing.get_start_method(allow_none=True) or methods[0]) == "forkserver" and "fork" in methods:
        return "fork"
    return None


_exiting = None


def _main_process_exiting():
    """An event set when this process exits (registered once, on the first loader)."""
    global _exiting
    if _exiting is None:
        _exiting = multiprocessing.Event()
        atexit.register(_exiting.set)
    return _exiting


def stop_loader_workers(loader: torch.utils.data.DataLoader) -> None:
    """Ends the worker processes of a loader with persistent workers now.

    Without this they would end only at the main process's exit
    (:class:`_LeaveSignalsToTheMainProcess`). The loader starts new workers if it is iterated again."""
    iterator = getattr(loader, "_iterator", None)  # where torch keeps persistent workers
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


def build_train_loader(dataset: torch.utils.data.Dataset | RandomFaces, *, batch_size: int, num_workers: int,
                       seed: int, distributed: bool = False, drop_last: bool = True, start_step: int = 0,
                       device: torch.device | str = "cpu") -> torch.utils.data.DataLoader | RandomBatches:
    """An endless DataLoader over `dataset` whose batch at global step k is the same
    whether or not the run was resumed: pass the step to resume at as `start_step`.

    Batches come from a `ResumableBatchSampler` (the sampler's docstring says how
    the order is drawn); with distributed=True each rank of the initialised
    process group reads its own shard. Flips depend on (seed, epoch, index) only,
    not on worker processes or global RNG state. Memory is pinned when CUDA is
    available; workers persist across epochs and leave SIGTERM and SIGINT to the main process
    (`_LeaveSignalsToTheMainProcess`); `stop_loader_workers` ends them. The loader has no length: iterate
    it for the number of steps to train (`loader.batch_sampler.steps_per_epoch`
    tells the epoch length).

    A `RandomFaces` (`--data random`) gives its `RandomBatches` instead: no DataLoader, no workers
    (num_workers is not used), its fixed images on ``device`` and each step's labels moved there.
    """
    rank, world_size = 0, 1
    if distributed:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise RuntimeError(
                "build_train_loader(distributed=True) needs an initialised torch.distributed process group"
            )
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if isinstance(dataset, RandomFaces):
        return RandomBatches(dataset, batch_size=batch_size, device=device, rank=rank, world_size=world_size,
                             start_step=start_step)
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                                    drop_last=drop_last, start_step=start_step)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=leave_signals_to_the_main_process() if num_workers > 0 else None,
        multiprocessing_context=worker_start_method() if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
