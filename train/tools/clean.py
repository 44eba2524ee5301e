"""``python -m train.tools.clean``: the label noise and the duplicated identities of a training set,
found with a trained model, and the set written again without them.

    python -m train.tools.clean --model runs/r50/checkpoint.pt --data /data/faces_emore --output /data/emore_clean

Every image of ``--data`` (a RecordIO folder, an ImageFolder or a list file, as the trainer reads them) is embedded
as verification embeds it (image + mirror, unit length) and compared with its class's centre:

- ``--centres trained``: the class centres the checkpoint trained with its margin loss (the default
  when the checkpoint records that it trained on this very data and its centres fit the labels;
  refused when most classes have most of their images nearer another class's centre than their own:
  centres of other data, or of other labels);
- ``--centres mean``: the mean embedding of the class's other images (the default otherwise: a model
  that did not train on this data, such as insightface's released models, for a new data set). A
  class of one image is not checked; in a class of two, a stray image takes its partner with it.

An image whose angle to its centre exceeds ``--drop-angle`` (75 degrees, the threshold of the drop step
of insightface's sub-center ArcFace, there taken to the dominant sub-centre) is dropped, as is an
image that does not decode. Two classes whose mean embeddings (of their kept images) have a cosine
of at least ``--duplicate-cosine`` are listed as one identity under two labels, and with
``--merge-duplicates`` become one class. Classes left with fewer than ``--min-images`` images are
dropped. ``--output`` receives:

- ``train.rec``, ``train.idx``, ``property``: the cleaned set (a RecordIO set's images as stored, a
  folder's as ``pack_rec`` stores them; labels renumbered 0..C'-1 in the old order), and the
  verification ``.bin`` files beside a RecordIO ``--data``, so that ``--data OUTPUT`` trains as
  ``--data DATA`` did; not with ``--report-only``;
- ``samples.csv``: each image's class, cosine and angle to its centre, nearest other class and its
  cosine, new label (-1: dropped), why it was dropped and, for an unreadable image, why it is;
- ``duplicates.csv``: the class pairs at or above ``--duplicate-cosine``, most alike first;
- ``overlaps.csv``: with ``--exclude-sets``, the classes found among a test set's people (a class's
  kept images' mean embedding at ``--overlap-cosine`` or more from one of the set's images), dropped;
- ``classes.csv``: each kept old class's new label (merged classes share one) and image count;
- ``summary.json``: the counts, the options and the angle distribution.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import sys
import time
import warnings

from train.signals import (Stopped, missing_device_op, readers_may_leave, signals_held,  # (the standard library only)
                           stop_on_signals, stop_while_importing)


def _whose() -> str:
    """What the message of a line each process says for itself (its errors, its stop) begins with: "rank R: " under
    torchrun (WORLD_SIZE > 1), rank 0's too, as the trainer's ``train: error: rank R: ...``; "" in one process."""
    return f"rank {int(os.environ.get('RANK', '0'))}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


with stop_while_importing(__name__, f"clean: {_whose()}"):
    import numpy as np
    import torch
    from PIL import Image

    from train import centre_shards, checkpoint
    from train.data import ImageFolderDataset, RecordIODataset, build_train_dataset, data_folder, is_target_path
    from train.data.combined import split_data_spec
    from train.data.imagelist import is_image_list
    from train.data.recordio import _class_index, unpack_payload
    from train.data.transforms import to_chw
    from train.embed import add_amp_option, backbone_weights_digest, embed_images, load_model, set_amp
    from train.tools import (ArgumentParser, RunLock, another_process_stopped, check_outputs, count_of, folders_missing,
                             lost_a_peer, path_arg, plain_warnings, remove_folders_made, say_unhandled_error,
                             start_process_group, taking_back_folders, torch_device, usable_cpus)
    from train.tools.pack_rec import OUTPUT_FILES, _image_bytes, write_pack
    from train.tools.similarity import connected_components, cosine_blocks
    from train.verification import compute_embeddings

DEFAULT_DROP_ANGLE = 75.0
DEFAULT_DUPLICATE_COSINE = 0.6
MAX_PAIRS = 10_000_000  # more pairs than this: --duplicate-cosine is too low to name duplicates
LARGE_GROUP = 5  # a merged group of more classes than this is worth a look
# Trained centres under which more than this share of the classes have most of their images nearer
# another class's centre do not fit the data: --centres auto then takes the classes' means.
UNFIT_SHARE = 0.05
REPORTS = ("samples.csv", "duplicates.csv", "overlaps.csv", "classes.csv", "summary.json")
DEFAULT_OVERLAP_COSINE = 0.5
STAGING = ".clean.partial"  # where a run writes before its files take their places


class _Images(torch.utils.data.Dataset):
    """Item i: (uint8 (3, S, S) image i of a training set, "" or why it could not be read, its label
    or -1 when that cannot be read either)."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        try:
            image, label = self.data.load(index)
        except (OSError, ValueError) as error:
            blank = torch.zeros((3, self.data.image_size, self.data.image_size), dtype=torch.uint8)
            return blank, str(error), _label(self.data, index)
        return to_chw(image), "", label


def _label(data, index: int) -> int:
    """The label of image ``index`` of a RecordIO or ImageFolder set; -1 when it does not read."""
    if isinstance(data, ImageFolderDataset):
        return int(data.labels[index])
    key = int(data.image_keys[index])
    try:
        header, _ = data.records.read_header(key)
        return _class_index(header.label, f"{data.records.rec_path}: record {key}", data.num_classes)
    except (OSError, ValueError):
        return -1


def dataset_labels(data) -> np.ndarray:
    """The label of every image of a RecordIO or ImageFolder set (a RecordIO set's records are read:
    the embedding pass reads the labels itself); -1 for a record whose label does not read."""
    if isinstance(data, ImageFolderDataset):
        return data.labels.copy()
    labels = np.asarray([_label(data, i) for i in range(len(data))], dtype=np.int64)
    data.records.close()
    return labels


def trained_centres(path: str, data, dim: int) -> tuple[torch.Tensor | None, str, bool]:
    """(the (C·K, D) class centres a training checkpoint holds (K sub-centres a class when it trained
    with ``--subcenters K``), or None; why there are none; whether
    the checkpoint says it trained on this very data). Centres are returned when their shape fits
    the data's classes and the model's embeddings (the checkpoint's record of its data, when it has
    one, is compared by ``--centres auto``)."""
    from train.onnx_backbone import is_onnx_file

    if is_onnx_file(path):
        return None, "an ONNX model holds no class centres", False
    try:
        state = checkpoint.load(path, mmap=True)
    except Exception:  # not a torch file: load_model has read it already, and says what it is
        return None, f"{path} is not a training checkpoint", False
    weight = state.get("margin_loss", {}).get("weight") if isinstance(state, dict) else None
    if isinstance(state, dict) and "centre_shards" in state:  # (--save-sharded's: in the files beside it)
        try:
            weight = centre_shards.whole_state(path, state)[0]["weight"]
        except (OSError, ValueError) as error:
            return None, f"{path}'s class centres cannot be read: {error}", False
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None, f"{path} is not a training checkpoint with class centres", False
    run = state.get("args") if isinstance(state.get("args"), dict) else {}
    k = run.get("subcenters", 1) if isinstance(run.get("subcenters", 1), int) else 1
    if tuple(weight.shape) != (data.num_classes * k, dim):
        per_class = f" ({k} sub-centres a class)" if k > 1 else ""
        return None, (f"{path}'s class centres are {weight.shape[0]} x {weight.shape[1]}{per_class}, the data has "
                      f"{data.num_classes} classes and the model {dim}-D embeddings: it trained on other data"), False
    recorded = state.get("data_fingerprint")
    if recorded is None:
        return weight.float(), "", False
    if recorded != data.fingerprint():
        return weight.float(), (f"{path} trained on other data (or on this data with other files or labels): "
                                "its record of its data differs; --centres trained takes its centres if its classes "
                                "are this data's"), False
    return weight.float(), "", True


def class_sums(embeddings: np.ndarray, labels: np.ndarray, keep: np.ndarray, num_classes: int, *,
               chunk: int = 65536) -> tuple[torch.Tensor, np.ndarray]:
    """((C, D) float64 sums of the kept embeddings of each class, each made unit length again (they are
    stored rounded), (C,) their counts)."""
    sums = torch.zeros(num_classes, embeddings.shape[1], dtype=torch.float64)
    for start in range(0, len(labels), chunk):
        rows = np.flatnonzero(keep[start:start + chunk]) + start
        unit = torch.nn.functional.normalize(torch.from_numpy(np.asarray(embeddings[rows])).double(), dim=1)
        sums.index_add_(0, torch.from_numpy(labels[rows]), unit)
    return sums, np.bincount(labels[keep], minlength=num_classes)


def nearest_centres(embeddings: np.ndarray, labels: np.ndarray, centres: torch.Tensor, *, device, k: int = 1,
                    own_rows: np.ndarray | None = None, rows: int = 4096, columns: int = 65536,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``embeddings`` (N, D) and unit ``centres`` (C·k, D; class c's sub-centres its rows c·k …):
    (cosine to the own class's centre: row ``own_rows[label]``, by default its first; the nearest
    other class by its best sub-centre (-1 when there is none); that cosine), each (N,). The N x C·k
    cosines are made in blocks of ``rows`` x ``columns`` classes on ``device``, never all at once."""
    n, num_classes = len(labels), centres.shape[0] // k
    centres = centres.to(device, torch.float32)
    own_rows = torch.from_numpy(np.arange(num_classes) * k if own_rows is None else own_rows).to(device)
    own = np.empty(n, dtype=np.float32)
    other = np.full(n, -1, dtype=np.int64)
    other_cosine = np.full(n, np.nan, dtype=np.float32)
    for start in range(0, n, rows):
        x = torch.from_numpy(np.asarray(embeddings[start:start + rows], dtype=np.float32)).to(device)
        x = torch.nn.functional.normalize(x, dim=1)  # unit again: they are stored rounded
        y = torch.from_numpy(labels[start:start + rows]).to(device)
        own[start:start + len(y)] = (x * centres[own_rows[y]]).sum(1).cpu().numpy()
        best = torch.full((len(y),), -math.inf, device=device)
        best_class = torch.full((len(y),), -1, dtype=torch.int64, device=device)
        for first in range(0, num_classes, columns):
            cosines = (x @ centres[first * k:(first + columns) * k].T).view(len(y), -1, k).amax(dim=2)
            mine = (y >= first) & (y < first + cosines.shape[1])
            cosines[mine, y[mine] - first] = -math.inf
            value, index = cosines.max(1)
            better = value > best
            best = torch.where(better, value, best)
            best_class = torch.where(better, index + first, best_class)
        found = best_class >= 0
        other[start:start + len(y)] = best_class.cpu().numpy()
        other_cosine[start:start + len(y)] = torch.where(found, best, torch.nan).cpu().numpy()
    return own, other, other_cosine


def unfit_classes(labels: np.ndarray, readable: np.ndarray, cosine: np.ndarray, other_cosine: np.ndarray,
                  num_classes: int) -> tuple[np.ndarray, int]:
    """(the classes most of whose readable images lie nearer another class's centre than their own,
    the number of classes with a readable image): trained centres that do not fit the data's labels
    (another set under these names, or classes renumbered) show as many such classes, where a model's
    own training data shows few (its noise is spread over the classes)."""
    astray = readable & (other_cosine > cosine)
    images = np.bincount(labels[readable], minlength=num_classes)
    strays = np.bincount(labels[astray], minlength=num_classes)
    return np.flatnonzero(2 * strays > images), int(np.count_nonzero(images))


def _class_label(data, classes: np.ndarray) -> str:
    if not len(classes):
        return "none"
    names = _class_names(data)
    return names[classes[0]] if names else f"label {classes[0]}"


def dominant_subcentres(embeddings: np.ndarray, labels: np.ndarray, readable: np.ndarray, centres: torch.Tensor,
                        k: int, *, chunk: int = 8192) -> tuple[np.ndarray, float]:
    """((C,) each class's dominant sub-centre, as a row of the unit ``centres`` (C·k, D): the one
    nearest to most of its readable images, ties to the first; the share of images whose nearest
    sub-centre of their class is its dominant one)."""
    num_classes = centres.shape[0] // k
    grouped = centres.float().view(num_classes, k, -1)
    votes = np.zeros((num_classes, k), dtype=np.int64)
    nearest = np.full(len(labels), -1, dtype=np.int64)
    for start in range(0, len(labels), chunk):
        rows = np.flatnonzero(readable[start:start + chunk]) + start
        x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(embeddings[rows], dtype=np.float32)), dim=1)
        y = torch.from_numpy(labels[rows])
        nearest[rows] = torch.bmm(grouped[y], x.unsqueeze(2)).squeeze(2).argmax(dim=1).numpy()
    np.add.at(votes, (labels[readable], nearest[readable]), 1)
    dominant = votes.argmax(axis=1)
    share = float(np.mean(nearest[readable] == dominant[labels[readable]])) if readable.any() else 1.0
    return np.arange(num_classes) * k + dominant, share


def leave_one_out_cosines(cosine_to_mean: np.ndarray, labels: np.ndarray, sums: torch.Tensor,
                          counts: np.ndarray) -> np.ndarray:
    """Each unit embedding x's cosine to the mean of its class's other images, from its cosine to
    the class's whole mean (``sums``, ``counts``: of the class's unit embeddings, x included): with
    s the sum, s.x = |s| cos and |s - x|^2 = |s|^2 - 2 s.x + 1, so the cosine is (s.x - 1) / |s - x|.
    NaN for an image alone in its class."""
    norm = sums.norm(dim=1).numpy()[labels]
    dot = cosine_to_mean.astype(np.float64) * norm
    rest = np.sqrt(np.maximum(norm * norm - 2 * dot + 1, 1e-24))
    out = ((dot - 1) / rest).astype(np.float32)
    out[counts[labels] < 2] = np.nan
    return out


def duplicate_pairs(means: torch.Tensor, present: np.ndarray, threshold: float, *, device,
                    rows: int = 2048, columns: int = 65536) -> list[tuple[int, int, float]]:
    """The pairs (a, b, cosine), a < b, of classes with ``present`` images whose unit mean embeddings
    ``means`` (C, D) have a cosine of at least ``threshold``, most alike first. Made in blocks of
    ``rows`` x ``columns`` on ``device`` (:func:`similarity.cosine_blocks`)."""
    classes = torch.from_numpy(np.flatnonzero(present))
    pairs = []
    for start, first, cosines in cosine_blocks(means[classes], device=device, rows=rows, columns=columns):
        i, j = torch.nonzero(cosines >= threshold, as_tuple=True)
        upper = j + first > i + start
        i, j = i[upper], j[upper]
        if len(pairs) + len(i) > MAX_PAIRS:
            raise ValueError(f"--duplicate-cosine {threshold:g} makes more than {MAX_PAIRS:,} class pairs: at that "
                             "cosine different people look alike; raise it")
        for a, b, c in zip((i + start).tolist(), (j + first).tolist(), cosines[i, j].tolist()):
            pairs.append((int(classes[a]), int(classes[b]), c))
    pairs.sort(key=lambda pair: (-pair[2], pair[0], pair[1]))
    return pairs


def test_overlaps(means: torch.Tensor, present: np.ndarray, test_sets: dict, threshold: float, *, device,
                  rows: int = 8192) -> list[tuple[int, str, int, float]]:
    """The classes with ``present`` images whose unit mean embedding (``means``, (C, D)) has a cosine
    of at least ``threshold`` with an image of a test set (``test_sets``: {name: (T, D) unit
    embeddings}): (class, set, image index in the set, cosine), each class once, at its nearest test
    image, most alike first."""
    best = {}
    classes = torch.from_numpy(np.flatnonzero(present))
    for name, images in test_sets.items():
        targets = torch.from_numpy(images).to(device, torch.float32)
        for start in range(0, len(classes), rows):
            block = classes[start:start + rows]
            value, index = (means[block].to(device, torch.float32) @ targets.T).max(dim=1)
            near = (value >= threshold).nonzero().squeeze(1)  # few, if any: the loop is over these alone
            for c, v, i in zip(block[near.cpu()].tolist(), value[near].tolist(), index[near].tolist()):
                if c not in best or v > best[c][2]:
                    best[c] = (name, i, v)
    return sorted(((c, name, i, v) for c, (name, i, v) in best.items()), key=lambda row: (-row[3], row[0]))


def merged_groups(num_classes: int, pairs: list[tuple[int, int, float]]) -> np.ndarray:
    """(C,) each class's group: the smallest class joined to it through ``pairs``."""
    a, b = (np.asarray([pair[k] for pair in pairs], dtype=np.int64) for k in (0, 1))
    return connected_components(num_classes, a, b)


def angles(cosines: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))


def _embeddings(args, model, data, dim: int, device, rank: int = 0, world: int = 1):
    """((N, D) float16 unit embeddings of ``data`` (NaN rows: unreadable), (N,) labels (-1: unreadable
    too), {index: why unreadable}); read from ``--embeddings`` when it holds this model's embeddings
    of this data, else made (and written there when it is given). Under torchrun (``world`` > 1)
    each process embeds its contiguous share of the images into the ``--embeddings`` file, and only
    rank 0 gets the result (the others get None)."""
    if args.embeddings:  # what the file's embeddings are of
        stat = os.stat(args.model)
        identity = {"data": data.fingerprint(), "files": _content_stamp(data), "model": os.path.abspath(args.model),
                    "model_bytes": stat.st_size, "model_mtime_ns": stat.st_mtime_ns, "image_size": data.image_size}
        weights = backbone_weights_digest(model)  # (None for an ONNX model: its file tells it)
        if weights:
            identity["model_weights_sha256"] = weights
        identity["amp"] = getattr(model, "amp", "none")  # (--amp: the embeddings differ by bf16's rounding)
        sidecar = args.embeddings + ".json"
    cached = _cached(args.embeddings, sidecar, identity, (len(data), dim), args.overwrite) if args.embeddings else None
    if cached is not None:
        if rank != 0:
            return None
        print(f"clean: embeddings of {len(data)} images read from {args.embeddings}", file=sys.stderr, flush=True)
        return cached[0], dataset_labels(data), cached[1]

    first, end = len(data) * rank // world, len(data) * (rank + 1) // world
    shard_unreadable, shard_labels, started = [], [], time.monotonic()
    images = _Images(data) if world == 1 else torch.utils.data.Subset(_Images(data), range(first, end))
    embeddings = embed_images(model, images, device=device, batch_size=args.batch_size, workers=args.workers,
                              normalize=True, dtype=np.float16, unreadable=shard_unreadable, extras=shard_labels,
                              workers_leave_signals=True,
                              log=(lambda message: print(f"clean: {message}", file=sys.stderr, flush=True))
                              if rank == 0 else None)
    labels = torch.cat(shard_labels).numpy().astype(np.int64) if shard_labels else np.empty(0, np.int64)
    unreadable = {first + i: why for i, why in shard_unreadable}
    if args.embeddings and rank == 0 and os.path.exists(sidecar):
        os.remove(sidecar)  # it describes the file about to be replaced; written again once that is whole
    if world == 1:
        if args.embeddings:
            checkpoint.write_atomic(args.embeddings, lambda f: np.save(f, embeddings))
    else:  # into one file, each process its rows; rank 0 gathers the labels and the unreadable images
        import torch.distributed as dist

        partial = args.embeddings + ".partial.npy"
        try:
            if rank == 0:
                np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(data), dim)).flush()
            dist.barrier()
            rows = np.lib.format.open_memmap(partial, mode="r+")
            rows[first:end] = embeddings
            rows.flush()
            del rows, embeddings
            gathered = [None] * world
            dist.all_gather_object(gathered, (labels, unreadable))
            if rank != 0:
                return None
            labels = np.concatenate([shard for shard, _ in gathered])
            unreadable = {i: why for _, shard in gathered for i, why in shard.items()}
            os.replace(partial, args.embeddings)
        finally:
            if rank == 0 and os.path.exists(partial):  # a stop or an error: no half-filled file is left
                os.remove(partial)
        embeddings = np.load(args.embeddings, mmap_mode="r")
    print(f"clean: embedded {len(data)} images in {time.monotonic() - started:.1f} s"
          + (f" on {world} processes" if world > 1 else ""), file=sys.stderr, flush=True)
    if args.embeddings:
        checkpoint.write_json_atomic(sidecar, {**identity, "unreadable": {str(i): w for i, w in unreadable.items()}})
    return embeddings, labels, unreadable


def _process_group(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device): under torchrun (WORLD_SIZE > 1) with the process
    group started (NCCL on GPUs, each process on its LOCAL_RANK's; gloo on CPUs); else (0, 1, device).
    ValueError for another device type (mps, xpu) under torchrun, before the group is started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type not in ("cpu", "cuda"):  # (every process would take the one mps or xpu device: untried)
        raise ValueError(f"--device {device} under torchrun: clean's processes share out CUDA devices, or run on the "
                         f"CPU; on {device.type} run one process (python -m train.tools.clean)")
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    start_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), world, device


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        time.sleep(0.1)  # gloo's threads release their last tensors first (see the trainer's exit)
        dist.destroy_process_group()


_IDENTITY_NAMES = {"data": "the data's images or labels", "files": "the data's files (sizes or times)",
                   "model": "the model file", "model_bytes": "the model file", "model_mtime_ns": "the model file",
                   "model_weights_sha256": "the model's weights", "image_size": "the image size",
                   "amp": "--amp"}
_MODEL_FILE_KEYS = ("model", "model_bytes", "model_mtime_ns")
_IDENTITY_DEFAULTS = {"amp": "none"}  # (a file made before --amp: in fp32)


def _cached(path: str, sidecar: str, identity: dict, shape: tuple[int, int], overwrite: bool):
    """(embeddings, {index: why unreadable}) that ``path`` holds for ``identity``; None when there is
    no such file, or when it is damaged or holds others and ``overwrite`` lets it be made again.
    ValueError naming ``--embeddings`` otherwise."""
    if not os.path.exists(path):
        return None
    again = "pass --overwrite to make it again, or name another file"
    try:
        with open(sidecar, encoding="utf-8") as f:
            saved = json.load(f)
        unreadable = {int(k): str(v) for k, v in saved["unreadable"].items()}
        if any(not 0 <= i < shape[0] for i in unreadable):
            raise ValueError("an image index out of range")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        if overwrite:
            return None
        raise ValueError(f"--embeddings {path} exists, but {sidecar}, which says whose embeddings they are, is "
                         f"missing or damaged: {again}") from None
    # The model is told by its weights where both the file's maker and this run have their digest (a
    # checkpoint copied, moved or exported is the same model), else by its file's path, size and time.
    by_weights = bool(saved.get("model_weights_sha256")) and "model_weights_sha256" in identity
    compared = [k for k in identity if k not in (_MODEL_FILE_KEYS if by_weights else ("model_weights_sha256",))]
    differ = sorted({_IDENTITY_NAMES[k] for k in compared if saved.get(k, _IDENTITY_DEFAULTS.get(k)) != identity[k]})
    try:
        if differ:
            raise ValueError(f"--embeddings {path} was made with another model or data (changed: {', '.join(differ)})")
        try:
            embeddings = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"--embeddings {path}: not a readable .npy file (truncated?): {error}") from None
        if embeddings.shape != shape or embeddings.dtype != np.float16:
            raise ValueError(f"--embeddings {path} holds {embeddings.dtype} {embeddings.shape}, not float16 {shape}: "
                             f"the data's {shape[0]} images, the model's {shape[1]}-D")
    except ValueError as error:
        if overwrite:
            _say_once(f"{error}: made again")
            return None
        raise ValueError(f"{error}: {again}") from None
    return embeddings, unreadable


def _content_stamp(data) -> str:
    """A digest of the data's files' sizes and modification times: images replaced under the same
    names change it (the fingerprint holds only names, labels and record offsets)."""
    digest = hashlib.blake2b(digest_size=8)
    if isinstance(data, ImageFolderDataset):
        for path in data.paths:
            stat = os.stat(path)
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}\n".encode())
    else:
        for path in (data.records.rec_path, data.records.idx_path):
            stat = os.stat(path)
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _source_names(data) -> list[str]:
    if isinstance(data, ImageFolderDataset):  # (a list file's too: its names may be absolute)
        return [data.paths.name(i) for i in range(len(data.paths))]
    return [f"record {key}" for key in data.image_keys]


def _class_names(data) -> list[str] | None:
    return list(data.identities) if isinstance(data, ImageFolderDataset) else None


def _packed_images(data, order: np.ndarray, new_labels: np.ndarray):
    """(new label, stored bytes, (width, height) of the first) of the images ``order`` lists."""
    first = True
    for index in order:
        if isinstance(data, RecordIODataset):
            key = int(data.image_keys[index])
            _, image = unpack_payload(data.records.read(key), where=f"{data.records.rec_path}: record {key}")
            size = None
            if first:
                with Image.open(io.BytesIO(image)) as img:
                    size = img.size
        else:
            image, size = _image_bytes(data.paths[index], resize=None, quality=95)
        first = False
        yield int(new_labels[index]), image, size


def _main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.tools.clean", name="clean", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=path_arg, required=True,
                   help="a training checkpoint (its class centres too), backbone.pt from python -m train.export, "
                   "insightface's backbone.pth, or an ONNX model")
    p.add_argument("--data", type=path_arg, required=True,
                   help="the training set: a folder with train.rec + train.idx, an ImageFolder (one sub-folder per "
                   "identity), or a list file (.lst, .txt) as the trainer reads it")
    p.add_argument("--output", type=path_arg, required=True,
                   help="the folder the cleaned set and the reports are written to (not --data's)")
    p.add_argument("--centres", "--centers", dest="centres", choices=("auto", "trained", "mean"), default="auto",
                   help="each class's centre: the checkpoint's trained class centres, or the mean embedding of the "
                   "class's other images (auto: trained when the checkpoint records that it trained on this data and "
                   "its centres fit the labels, else mean)")
    p.add_argument("--drop-angle", type=float, default=DEFAULT_DROP_ANGLE,
                   help=f"drop images further than this many degrees from their class's centre "
                   f"(default {DEFAULT_DROP_ANGLE:g}; 180 drops none)")
    p.add_argument("--duplicate-cosine", type=float, default=DEFAULT_DUPLICATE_COSINE,
                   help="list class pairs whose mean embeddings have at least this cosine as one identity under two "
                   f"labels (default {DEFAULT_DUPLICATE_COSINE:g})")
    p.add_argument("--merge-duplicates", action="store_true",
                   help="make each group of listed classes one class (otherwise they are only listed)")
    p.add_argument("--exclude-sets", metavar="SETS", default=None,
                   help="drop the identities of these test sets: names of <data>/<name>.bin or paths of .bin files "
                   "and pairs lists (as the trainer's --val-targets), comma-separated; a class is one of them when "
                   "its kept images' mean embedding reaches --overlap-cosine with one of the set's images")
    p.add_argument("--overlap-cosine", type=float, default=None,
                   help=f"see --exclude-sets (default {DEFAULT_OVERLAP_COSINE:g})")
    p.add_argument("--min-images", type=int, default=1,
                   help="drop classes left with fewer images than this (default 1)")
    p.add_argument("--report-only", action="store_true", help="write the reports, not the cleaned set")
    p.add_argument("--embeddings", type=path_arg, metavar="FILE.npy", default=None,
                   help="keep the embeddings (float16, 2 bytes x D an image) in this file and read them from it when "
                   "it holds this model's embeddings of this data: another --drop-angle then costs no embedding")
    p.add_argument("--device", default="cpu", help="where the model runs and the cosines are made: cpu, cuda, "
                   "cuda:1, mps, xpu, ... (default: cpu; under torchrun, cuda is each process's own GPU, and mps "
                   "and xpu are refused)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=128,
                   help="images a forward pass (each also mirrored; default 128)")
    p.add_argument("--workers", type=int, default=min(8, usable_cpus()),
                   help="DataLoader processes decoding images (0: in this process; default: one a core this process "
                   "may use, up to 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs --output holds (with --report-only, a cleaned set there is removed), "
                   "and --embeddings made with another model or data")
    add_amp_option(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.workers < 0:
        p.error("--workers must be at least 0")
    if args.min_images < 1:
        p.error("--min-images must be at least 1")
    if not 0 <= args.drop_angle <= 180:
        p.error(f"--drop-angle is in degrees, from 0 to 180: got {args.drop_angle:g}")
    if args.overlap_cosine is not None and not args.exclude_sets:
        p.error("--overlap-cosine goes with --exclude-sets")
    if args.exclude_sets is not None and not args.exclude_sets.replace(",", " ").split():
        p.error("--exclude-sets names no set")
    args.overlap_cosine = DEFAULT_OVERLAP_COSINE if args.overlap_cosine is None else args.overlap_cosine
    if not -1 <= args.overlap_cosine <= 1:
        p.error(f"--overlap-cosine is a cosine, from -1 to 1: got {args.overlap_cosine:g}")
    if not -1 <= args.duplicate_cosine <= 1:
        p.error(f"--duplicate-cosine is a cosine, from -1 to 1: got {args.duplicate_cosine:g}")
    if args.embeddings and not args.embeddings.endswith(".npy"):
        p.error("--embeddings names a .npy file")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.embeddings:
        # (Every process says it, as with any error: torchrun stops the others once one has ended, which
        # can be before rank 0 has printed.)
        _say_error("under torchrun, --embeddings FILE.npy is where the processes put their embeddings: name one "
                   "on a file system all of them see")
        return 2
    made = folders_missing(args.output)  # (with those above it: a new --output n1/n2/n3's n1 and n2)
    status = 2
    try:
        # Ctrl-C and SIGTERM unwind, so that no temporary file is left behind.
        with stop_on_signals():
            # (The folders check_outputs made for --embeddings too, taken back as --output's below: rank 0 alone.)
            status = taking_back_folders(lambda: run(args)) if int(os.environ.get("RANK", "0")) == 0 else run(args)
        return status
    except (OSError, ValueError, pickle.UnpicklingError, NotImplementedError) as error:
        text = missing_device_op(error) if isinstance(error, NotImplementedError) else str(error)
        if text is None:
            raise
        _say_error(text)
        return 2
    except RuntimeError as error:
        # Another process failed alone, or a signal stopped it alone (each said in its own output), and this one
        # found its connection closed in a collective: one line, not gloo's traceback that reads like a second error.
        if not (int(os.environ.get("WORLD_SIZE", "1")) > 1 and lost_a_peer(error)):
            raise
        _say_error(another_process_stopped())
        return 2
    except Stopped as stop:
        # Every process says its stop, as its errors: a signal to one alone (a pre-empted node's) ends it, and
        # another, waiting for it in a collective, then says only "another process stopped (see its own output)".
        if stop.after_writing:
            status = 0  # the folder it made holds the run's files
            _say(f"stopped by {stop.name} as this run's files were moved into --output: they are all there")
        else:
            _say(f"stopped by {stop.name}: --output holds what it held before (this run's files are moved into it "
                 "only at the end)")
        return stop.exit_status
    finally:
        # Under torchrun, an error none of the above says (a bug, a CUDA error) is said before the group is
        # left: the others then find it left, end, and torchrun stops this process, at times before its
        # interpreter printed anything.
        said = say_unhandled_error()
        _leave_process_group()
        if status not in (0, 1) and int(os.environ.get("RANK", "0")) == 0:
            remove_folders_made(made)  # the folders this run made, left empty by its failure
        if said:
            raise SystemExit(1) from None  # (not printed a second time at exit)


def _say(message: str) -> None:
    """A line of this process's, as each of a torchrun run's says its stop: ``clean: rank R: <message>`` under
    torchrun (the rank tells which process a signal stopped), ``clean: <message>`` in one process."""
    print(f"clean: {_whose()}{message}", file=sys.stderr)


def _say_error(message: str) -> None:
    """An error line of this process's, as each of a torchrun run's says its own: ``clean: error: rank R: <message>``
    under torchrun (the trainer's form), ``clean: error: <message>`` in one process."""
    print(f"clean: error: {_whose()}{message}", file=sys.stderr)


def _say_once(message: str) -> None:
    """A message the processes of a torchrun run would all print: rank 0 prints it."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"clean: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """``main`` after parsing; raises OSError or ValueError naming the argument or file at fault.
    The device, the data, the model and the outputs are checked before any image is embedded."""
    rank, world, device = _process_group(torch_device(args.device))
    if args.data == "synthetic":
        raise ValueError("--data synthetic is drawn, not stored: there is nothing to clean")
    if args.data == "random":
        raise ValueError("--data random is noise drawn for timing a training step, not stored: there is nothing to "
                         "clean")
    if not (os.path.isdir(args.data) or is_image_list(args.data)):
        several = "; clean takes one set: clean each of the sets a training run combines (--data a,b) on its own" \
            if len(split_data_spec(args.data)) > 1 else ""
        raise FileNotFoundError(f"--data {args.data}: no such folder or list file (.lst, .txt)"
                                f"{checkpoint.dangling(args.data)}{several}")
    if os.path.realpath(args.output) == os.path.realpath(args.data):
        raise ValueError("--output is --data's folder: the cleaned set goes to another folder")
    model, settings = load_model(args.model, device, args.amp)
    # (its note on the run's --amp is rank 0's, as _say_once's: each process printed it; a refusal is raised)
    with contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext():
        set_amp(model, args.amp, args.model, device=device)
    data, num_classes = build_train_dataset(args.data, image_size=settings["image_size"], flip=False)
    bins = sorted(glob.glob(os.path.join(glob.escape(args.data), "*.bin"))) if isinstance(data, RecordIODataset) else []
    outputs = [os.path.join(args.output, name) for name in REPORTS]
    if not args.report_only:
        outputs += [os.path.join(args.output, name) for name in OUTPUT_FILES]
        outputs += [os.path.join(args.output, os.path.basename(path)) for path in bins]
    elif not args.overwrite:
        # A cleaned set there would stand beside reports that do not describe it: --overwrite removes it.
        found = [name for name in OUTPUT_FILES if os.path.lexists(os.path.join(args.output, name))]
        if found:
            raise ValueError(f"{os.path.join(args.output, found[0])} exists, a cleaned set that the new reports "
                             "would not describe: pass --overwrite to remove it (and the reports beside it)")
    check_outputs(outputs, args.overwrite)
    staging = os.path.join(args.output, STAGING)
    if os.path.lexists(staging) and (os.path.islink(staging) or not os.path.isdir(staging)):
        raise ValueError(f"{staging}, where clean writes before it moves its files into --output, is in the way "
                         "(a file or a link): remove it")
    if args.embeddings:
        check_outputs([args.embeddings, args.embeddings + ".json"], overwrite=True,
                      inputs=(args.model, checkpoint.settings_path(args.model)))
    test_sets, lock, refused = {}, None, None
    if rank == 0:
        try:
            test_sets = _test_sets(args, settings["image_size"]) if args.exclude_sets else {}
            lock = RunLock(os.path.join(args.output, ".clean.lock"), f"another clean run is writing {args.output}: "
                           "wait for it to end, or stop it")
        except Exception as error:  # (any: the others wait for its word in the broadcast below)
            refused = error
    try:
        if world > 1:
            # Rank 0's refusal is every process's: the others went on to embed their shares, then met a gloo
            # traceback at the barrier, or were stopped by torchrun, saying nothing.
            import torch.distributed as dist

            said = [None if refused is None else str(refused)]
            dist.broadcast_object_list(said, src=0)
            if said[0] is not None and refused is None:
                raise ValueError(said[0])
        if refused is not None:
            raise refused
        return _clean(args, data, model, settings, bins, device, rank, world, test_sets)
    finally:
        if lock is not None:
            lock.release()


def _test_sets(args, image_size: int) -> dict:
    """{name: VerificationSet} of ``--exclude-sets``: names of ``<data>/<name>.bin``, or paths of .bin
    files and pairs lists, read before any work; a name the data folder lacks is an error here."""
    from train.data import build_verification_sets

    names = [t for t in args.exclude_sets.replace(",", " ").split() if t]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sets = build_verification_sets(args.data, names, image_size=image_size, flag="--exclude-sets")
    missing = [t for t in names if not is_target_path(t) and t not in sets]
    if missing:
        raise FileNotFoundError(f"--exclude-sets {missing[0]}: no {missing[0]}.bin in {data_folder(args.data)}")
    return sets


def _clean(args, data, model, settings, bins, device, rank: int, world: int, test_sets: dict) -> int:
    num_classes = data.num_classes

    centres, why_not, same_data = trained_centres(args.model, data, settings["embedding_size"])
    if args.centres == "trained" and centres is None:
        raise ValueError(f"--centres trained: {why_not}")
    if args.centres == "auto" and centres is not None and not same_data and not why_not:
        why_not = (f"{args.model} holds no record of the data it trained on (a checkpoint of an earlier version): "
                   "--centres trained takes its centres")
    source = args.centres if args.centres != "auto" else ("trained" if same_data else "mean")
    if rank == 0:
        others = f" and {count_of(world - 1, 'more process', 'more processes')}" if world > 1 else ""
        centred = ("the checkpoint's trained class centres" if source == "trained"
                   else "each class's mean embedding" + (f" ({why_not})" if args.centres == "auto" else ""))
        print(f"clean: {len(data)} images of {num_classes} classes in {args.data}; {settings['network']} at "
              f"{settings['image_size']}px on {device}{others}; centres: {centred}", file=sys.stderr, flush=True)
        if getattr(data, "repeats_note", None):  # (as the trainer and pack_rec say: each line is judged alone)
            print(f"clean: warning: {args.data}: {data.repeats_note}; each line is kept or dropped on its own",
                  file=sys.stderr, flush=True)
    model = model.to(device)
    made = _embeddings(args, model, data, settings["embedding_size"], device, rank, world)
    _leave_process_group()
    if made is None:  # another process's share, embedded: rank 0 does the rest
        return 0
    embeddings, read_labels, unreadable = made
    readable = np.ones(len(data), dtype=bool)
    readable[list(unreadable)] = False  # their rows are NaN, and so is all that is made of them
    labels = np.maximum(read_labels, 0)  # a label that did not read (-1) stands as 0 in the sums, not kept
    broken = _not_finite(embeddings, readable)
    if broken.size:
        raise ValueError(f"the model's embedding of {broken.size} of {int(readable.sum())} readable images is not "
                         f"finite (the first: {_source_names(data)[broken[0]]}): has --model {args.model} diverged?")

    # Each image against its class's centre, and the nearest other class.
    k, at_dominant = 1, None
    if source == "trained":
        unit_centres = torch.nn.functional.normalize(centres, dim=1)
        k = unit_centres.shape[0] // num_classes
        own_rows = None
        if k > 1:  # sub-center ArcFace: each image against its class's dominant sub-centre
            own_rows, at_dominant = dominant_subcentres(embeddings, labels, readable, unit_centres, k)
        cosine, other, other_cosine = nearest_centres(embeddings, labels, unit_centres, device=device, k=k,
                                                      own_rows=own_rows)
        unfit, measured = unfit_classes(labels, readable, cosine, other_cosine, num_classes)
        share = len(unfit) / max(1, measured)
        said = (f"{len(unfit)} of {measured} classes ({share:.0%}; the first: {_class_label(data, unfit)}) have most "
                f"of their images nearer another class's trained centre than their own")
        if args.centres == "auto" and share > UNFIT_SHARE:
            print(f"clean: {said}: {args.model}'s class centres do not fit this data (other images under these "
                  "names?); each class's mean embedding is the centre instead", file=sys.stderr, flush=True)
            source, k, at_dominant = "mean", 1, None
        elif share > 0.5:
            raise ValueError(f"{said}: {args.model}'s class centres do not fit this data's labels (did it train on "
                             "other data, or on this data with its classes in another order?); --centres mean does "
                             "not need them")
        elif share > UNFIT_SHARE:
            print(f"clean: warning: {said}", file=sys.stderr, flush=True)
        if k > 1:
            print(f"clean: {k} sub-centres a class; {at_dominant:.1%} of the images lie nearest their class's "
                  "dominant one", file=sys.stderr, flush=True)
    if source == "mean":
        sums, counts = class_sums(embeddings, labels, readable, num_classes)
        unit_centres = torch.nn.functional.normalize(sums, dim=1).float()
        to_mean, other, other_cosine = nearest_centres(embeddings, labels, unit_centres, device=device)
        cosine = leave_one_out_cosines(to_mean, labels, sums, counts)
    cosine[~readable] = np.nan
    other[~readable], other_cosine[~readable] = -1, np.nan
    angle = angles(cosine)
    why = np.full(len(data), "", dtype=object)
    why[angle > args.drop_angle] = "angle"
    why[~readable] = "unreadable"
    keep = why == ""

    # Identities of the test sets: classes whose kept images' mean embedding is near a test image.
    overlaps = []
    if args.exclude_sets:
        # (Embedded here, after what the data's embedding refuses (--centres trained of a checkpoint without
        # centres for this data, --embeddings of another model): those were said once the test sets had been
        # embedded, minutes for LFW's 12,000 images on a CPU.)
        test_sets = {name: compute_embeddings(model, vset, device=device, batch_size=args.batch_size)
                     for name, vset in test_sets.items()}
        sums, counts = class_sums(embeddings, labels, keep, num_classes)
        overlaps = test_overlaps(torch.nn.functional.normalize(sums, dim=1), counts > 0, test_sets,
                                 args.overlap_cosine, device=device)
        in_test = np.zeros(num_classes, dtype=bool)
        in_test[[label for label, *_ in overlaps]] = True
        why[keep & in_test[labels]] = "test identity"
        keep = why == ""
        if len(overlaps) > max(1, UNFIT_SHARE * np.count_nonzero(counts)):
            print(f"clean: warning: {len(overlaps)} of {np.count_nonzero(counts)} classes match a test image at "
                  f"cosine >= {args.overlap_cosine:g}: more than test sets usually share with a training set; at "
                  "that cosine this model may take different people for one (look at overlaps.csv, or raise "
                  "--overlap-cosine)", file=sys.stderr, flush=True)

    # Duplicated identities: classes whose kept images' mean embeddings are alike.
    sums, counts = class_sums(embeddings, labels, keep, num_classes)
    means = torch.nn.functional.normalize(sums, dim=1)
    pairs = duplicate_pairs(means, counts > 0, args.duplicate_cosine, device=device)
    group = merged_groups(num_classes, pairs) if args.merge_duplicates else np.arange(num_classes)
    largest = int(np.bincount(group).max())
    if largest > LARGE_GROUP:
        print(f"clean: warning: --merge-duplicates joins {largest} classes into one (chains of pairs at cosine >= "
              f"{args.duplicate_cosine:g}): look at duplicates.csv, or raise --duplicate-cosine", file=sys.stderr)
    group_counts = np.bincount(group, weights=counts, minlength=num_classes).astype(np.int64)
    too_small = keep & (group_counts[group[labels]] < args.min_images)
    why[too_small], keep[too_small] = "class too small", False
    kept_groups = np.unique(group[labels[keep]])
    new_label_of_group = np.full(num_classes, -1, dtype=np.int64)
    new_label_of_group[kept_groups] = np.arange(len(kept_groups))
    new_labels = np.where(keep, new_label_of_group[group[labels]], -1)

    result = dict(data=data, names=_source_names(data), class_names=_class_names(data), labels=read_labels,
                  cosine=cosine, angle=angle, other=other, other_cosine=other_cosine, new_labels=new_labels,
                  why=why, unreadable=unreadable, pairs=pairs, group=group, keep=keep, kept_groups=kept_groups,
                  source=source, subcentres=k, at_dominant=at_dominant, overlaps=overlaps)
    write_set = not args.report_only and len(kept_groups) > 0
    # Everything goes to a hidden folder first and takes its place at the end, at once: a stop leaves
    # the outputs of before (or none), never a cleaned set beside the reports of another run.
    staging = os.path.join(args.output, STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's (checked to be a folder of ours at the start)
    os.makedirs(staging)
    try:
        summary = _write_reports(args, staging, **result)
        if write_set:
            order = np.flatnonzero(keep)
            order = order[np.argsort(new_labels[order], kind="stable")]
            write_pack(staging, _packed_images(data, order, new_labels), num_images=len(order),
                       num_identities=len(kept_groups), log=sys.stderr, tool="clean", shown_dir=args.output)
            for path in bins:
                with open(path, "rb") as source_file, open(os.path.join(staging, os.path.basename(path)), "wb") as f:
                    shutil.copyfileobj(source_file, f)
        # Into place, with Ctrl-C and SIGTERM held back until every file has moved (they then stop the
        # run as usual, its files all in place).
        stale = [] if write_set else [*OUTPUT_FILES, *(os.path.basename(path) for path in bins)]
        with signals_held():
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(args.output, name))
            for name in stale:  # a cleaned set there now would not be the one these reports describe
                if os.path.lexists(os.path.join(args.output, name)):
                    os.remove(os.path.join(args.output, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    dropped = summary["dropped"]
    reasons = (f"{dropped['angle']} further than {args.drop_angle:g} degrees from their centre, "
               f"{dropped['unreadable']} unreadable, "
               + (f"{count_of(dropped['test identity'], 'image')} of "
                  f"{count_of(summary['test_identities'], 'test identity', 'test identities')}, "
                  if args.exclude_sets else "")
               + f"{dropped['class too small']} in classes under --min-images {args.min_images}")
    pairs_said = (f"{count_of(len(pairs), 'class pair')} at cosine >= {args.duplicate_cosine:g}"
                  + (" merged" if args.merge_duplicates else " listed in duplicates.csv"))
    if not args.report_only and not write_set:
        print(f"clean: error: no image is left to write ({reasons}); the reports are in {args.output}",
              file=sys.stderr)
        return 1
    merged_away = summary["kept_classes_before_merging"] - summary["kept_classes"]
    # (Merged, "in 100 of 110 classes" read as if 10 had been dropped.)
    classes_said = (f"{summary['kept_classes']} classes ({summary['kept_classes_before_merging']} of the "
                    f"{data.num_classes} kept, {merged_away} of them merged into others)" if merged_away else
                    f"{summary['kept_classes']} of {count_of(data.num_classes, 'class', 'classes')}")
    print(f"clean: kept {summary['kept_images']} of {count_of(len(labels), 'image')} ({reasons}) in "
          f"{classes_said}; {pairs_said}"
          + (f"; wrote {args.output}" if write_set else f"; reports in {args.output}"), file=sys.stderr)
    return 0


def _not_finite(embeddings: np.ndarray, readable: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """The readable images whose embedding is not finite (a diverged model's)."""
    found = [np.flatnonzero(~np.isfinite(np.asarray(embeddings[i:i + chunk])).all(1) & readable[i:i + chunk]) + i
             for i in range(0, len(readable), chunk)]
    return np.concatenate(found) if found else np.empty(0, np.int64)


def _label_name(label: int, class_names: list[str] | None) -> str:
    return class_names[label] if class_names is not None and label >= 0 else ""


def _csv(path: str, header: list[str], rows) -> None:
    # Names that are not UTF-8 (surrogate-escaped by Python) are written as the bytes they were.
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_reports(args, folder, *, data, names, class_names, labels, cosine, angle, other, other_cosine, new_labels,
                   why, unreadable, pairs, group, keep, kept_groups, source, subcentres, at_dominant,
                   overlaps) -> dict:
    """samples.csv, duplicates.csv, overlaps.csv, classes.csv and summary.json into ``folder``; returns
    the summary."""
    def number(x: float) -> str:
        return "" if math.isnan(x) else f"{x:.4f}"

    _csv(os.path.join(folder, "samples.csv"),
         ["index", "image", "label", "class", "cosine", "angle", "nearest_other", "nearest_other_class",
          "nearest_other_cosine", "new_label", "dropped", "detail"],
         ([i, names[i], labels[i], _label_name(labels[i], class_names), number(cosine[i]), number(angle[i]),
           other[i], _label_name(other[i], class_names), number(other_cosine[i]), new_labels[i], why[i],
           unreadable.get(i, "")] for i in range(len(labels))))
    _csv(os.path.join(folder, "overlaps.csv"), ["label", "class", "set", "image", "pair", "cosine"],
         ([label, _label_name(label, class_names), name, image, image // 2, f"{c:.4f}"]
          for label, name, image, c in overlaps))
    _csv(os.path.join(folder, "duplicates.csv"), ["label_a", "class_a", "label_b", "class_b", "cosine", "merged"],
         ([a, _label_name(a, class_names), b, _label_name(b, class_names), f"{c:.4f}", int(bool(args.merge_duplicates))]
          for a, b, c in pairs))
    # One row for each old class kept, by new label: a merged class's old classes share it.
    kept_labels = np.unique(labels[keep])
    images = np.bincount(labels[keep], minlength=data.num_classes)
    new_of = {int(old): int(new) for new, old in enumerate(kept_groups)}
    rows = sorted((new_of[int(group[old])], int(old), _label_name(int(old), class_names), int(images[old]))
                  for old in kept_labels)
    _csv(os.path.join(folder, "classes.csv"), ["new_label", "label", "class", "images"], rows)
    measured = angle[~np.isnan(angle)]
    summary = {
        "data": args.data, "model": args.model, "centres": source, "subcentres": subcentres,
        "at_dominant_subcentre": at_dominant, "images": int(len(labels)),
        "classes": int(data.num_classes), "kept_images": int(keep.sum()), "kept_classes": int(len(kept_groups)),
        "kept_classes_before_merging": int(len(kept_labels)),
        "dropped": {reason: int((why == reason).sum())
                    for reason in ("angle", "unreadable", "test identity", "class too small")},
        "test_identities": len(overlaps),
        "duplicate_pairs": len(pairs), "merged": bool(args.merge_duplicates),
        "largest_merged_group": int(np.bincount(group).max()),
        "nearer_to_another_class": int(np.sum(other_cosine > cosine)),
        "angle_percentiles": {str(q): round(float(np.percentile(measured, q)), 2) for q in (1, 10, 50, 90, 99)}
        if measured.size else {},
        "options": {"drop_angle": args.drop_angle, "duplicate_cosine": args.duplicate_cosine,
                    "min_images": args.min_images, "report_only": args.report_only,
                    "exclude_sets": args.exclude_sets, "overlap_cosine": args.overlap_cosine},
    }
    with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary



def main(argv: list[str] | None = None) -> int:
    # (readers_may_leave: its reader gone, 2>&1 | head, its first line raised, exit status 120)
    with plain_warnings(), readers_may_leave():  # the image folder's warnings as one line each
        return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
