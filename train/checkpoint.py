"""Training checkpoints: written atomically, read back with ``weights_only=True``, and the
RNG states that make a resumed run repeat an uninterrupted one."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import socket
import sys
import time
from typing import IO, Any, Callable, Iterable

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


class OnnxModelGiven(ValueError):
    """:func:`load`'s error for an ONNX model where a PyTorch checkpoint is read: a caller whose flag
    cannot take the weights it was exported from either (``--resume``) says what to give instead."""


def write_atomic(path: str, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Calls ``write(file)`` on a temporary file in ``path``'s folder, then renames it to ``path``:
    a crash or a kill mid-write leaves the previous file (or none) rather than a truncated one, and
    its temporary, which a later write of ``path`` removes. Of two writers of one path at once (the
    trainer's figures and a ``train.plots`` beside it), the last rename wins; each file is whole."""
    tmp = _write_temporary(path, write, binary)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _remove_stale_temporaries(*os.path.split(os.path.abspath(path)))


def _write_temporary(path: str, write: Callable[[IO], None], binary: bool) -> str:
    """``write(file)`` on a new temporary beside ``path``, flushed to the disk; its name (removed if the write
    fails)."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Named for its writer (host and process), so that the clean-up below can tell a killed writer's
    # temporary from one another process is writing now. Created as open() creates files (0666 less
    # the umask, as the logs beside it), not 0600 as by mkstemp; O_EXCL keeps the name unique.
    tmp = os.path.join(directory, f".{name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


class FilesTogether:
    """The files of :func:`written_together`'s block, each written to its temporary as it is given."""

    def __init__(self):
        self.written: list[tuple[str, str]] = []  # (temporary, path)

    def write(self, path: str, write: Callable[[IO], None], *, binary: bool = True) -> None:
        self.written.append((_write_temporary(path, write, binary), path))

    def write_json(self, path: str, content: Any) -> None:
        self.write(path, _json_writer(content), binary=False)

    def temporaries(self) -> list[str]:
        """The whole files written so far, under their temporary names, in the order written (to be read, as a
        digest of them reads them, before they take their places)."""
        return [tmp for tmp, _ in self.written]


@contextlib.contextmanager
def written_together():
    """The files written in the block (``files.write``, ``files.write_json``, as :func:`write_atomic` writes them),
    renamed into place together when it ends well: a table and its summary are both replaced or neither, where one
    :func:`write_atomic` after another left the table new and its summary of the run before when the second failed
    (a full disk). A block that raises leaves every path as it was. The renames cannot be stopped midway when run
    under ``signals_held``."""
    files = FilesTogether()
    try:
        yield files
        for tmp, path in files.written:
            os.replace(tmp, path)
    finally:
        for tmp, path in files.written:
            if os.path.exists(tmp):
                os.remove(tmp)
    # (as write_atomic: after a write that ended well, so that its clean-up cannot hide why one failed)
    for folder_and_name in {os.path.split(os.path.abspath(path)) for _, path in files.written}:
        _remove_stale_temporaries(*folder_and_name)


# A host name as it can stand in a file name (the temporaries' writers, above).
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
# Another host's temporary untouched this long is taken for a killed writer's (a writer still
# writing changes its modification time).
_STALE_SECONDS = 3600


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """The temporaries of earlier writes of ``name`` that were killed: this host's whose process is
    gone, any untouched for an hour, and those of earlier versions (8 random characters, or mkstemp's),
    which did not name their writer."""
    unnamed = re.compile(re.escape(f".{name}.") + r"[a-z0-9_]{8}\.tmp")
    named = re.compile(re.escape(f".{name}.") + r"(\w+)-(\d+)-[0-9a-f]{8}\.tmp")
    for entry in os.listdir(directory):
        found = named.fullmatch(entry)
        if not (unnamed.fullmatch(entry) or found):
            continue
        full = os.path.join(directory, entry)
        with contextlib.suppress(FileNotFoundError):
            if found and (found.group(1) != _HOST or _process_alive(int(found.group(2)))) \
                    and time.time() - os.stat(full).st_mtime < _STALE_SECONDS:
                continue  # another process's write in progress
            os.remove(full)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`write_atomic`). A write that fails (a full
    disk, a quota) raises the OSError that says why."""
    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as error:
            # torch's zip writer reports a failed write of the file as "[enforce fail at
            # inline_container.cc] unexpected pos ..." (a full disk read as such); the OSError
            # (No space left on device, File too large) is the exception it was raised during.
            cause = error.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None
    write_atomic(path, write)


def nearest_existing(path: str) -> str:
    """``path`` made absolute, or the nearest folder above it that exists: where a folder for ``path``
    would be made. A file there (not a folder) is what stops that (Errno 17 or 20 from os.makedirs)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def what_stands_at(path: str) -> str:
    """What is at ``path`` where a folder was wanted (:func:`nearest_existing`'s answer, when it is no folder), in
    a message's words: "a file", or "a broken symbolic link to <its target>" (a link to nothing was called a
    file, and the user looked for one)."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link to {os.readlink(path)}"
    return "a file"


def dangling(path: str) -> str:
    """" (a broken symbolic link to <its target>)" where ``path``, an input said not to be there (or not to be a
    folder), is a link to nothing, else "": the user then looks for what it points to (an unmounted disk, a moved
    folder), not for the link, which is there."""
    return f" ({what_stands_at(path)})" if os.path.islink(path) and not os.path.exists(path) else ""


def check_output_folder(folder: str, named: str) -> None:
    """Refuses, before any work, an output folder that cannot be made or written in: ValueError naming
    ``named`` (the option and its value) and the file in the way, or the folder that is read-only. A file
    at ``folder`` itself is the caller's to word (what the folder was for)."""
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):  # (was "...: Not a directory", or Errno 20 naming no option)
        raise ValueError(f"{named}: cannot make the folder: {existing} is {what_stands_at(existing)}")
    if not os.access(existing, os.W_OK | os.X_OK):  # (was "[Errno 13] Permission denied: '<folder>'")
        raise ValueError(f"{named}: cannot write in {existing} (read-only, or not yours)")


def write_json_atomic(path: str, content: Any) -> None:
    """``content`` as indented JSON to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, _json_writer(content), binary=False)


def _json_writer(content: Any) -> Callable[[IO], None]:
    def write(f):
        json.dump(content, f, indent=2)
        f.write("\n")
    return write


def load(path: str, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> Any:
    """Read a checkpoint or state dict written by this trainer (or insightface's ``.pth``)
    without executing code from the file. ``mmap=True`` maps the tensors from the file instead of
    reading them (this trainer's checkpoints): a rank resuming with sharded class centres then
    reads only its own rows of them, and the ranks share the page cache, rather than each holding
    the whole C x D matrices (8 GB of centres and momentum for WebFace42M) in its memory.
    Raises FileNotFoundError, or ValueError naming the file when it cannot be read."""
    if os.path.isdir(path):
        # This trainer's files first, then arcface_torch's (its output folder: model.pt a epoch, the
        # checkpoint_gpu_<rank>.pt of save_all_states; backbone.pth as its models are released).
        inside = [name for name in (CHECKPOINT_NAME, "backbone.pt", "model.pt", "backbone.pth", "checkpoint_gpu_0.pt")
                  if os.path.isfile(os.path.join(path, name))]
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint file" + (
            f": {' or '.join(os.path.join(path, name) for name in inside)}?" if inside else ""))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}{dangling(path)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except PermissionError as error:  # (was "not a readable checkpoint (truncated, or not saved by torch.save ...?)")
        raise ValueError(f"{path}: cannot read it: {error.strerror or error}") from None
    except Exception as error:  # a truncated or foreign file fails in many ways, all of them this
        reason = str(error).split(". ")[0].strip() or type(error).__name__
        with open(path, "rb") as f:
            head = f.read(8)
        torch_file = head.startswith(b"PK") or head.startswith(b"\x80")
        from .onnx_backbone import is_onnx_file

        if not torch_file and is_onnx_file(path):  # (w600k_r50.onnx, say: was "not a readable checkpoint")
            raise OnnxModelGiven(f"{path} is an ONNX model, not a PyTorch checkpoint: give the checkpoint or state "
                                 "dict it was exported from (train.export's backbone.pt, insightface's backbone.pth)"
                                 ) from None
        # torch.save writes a zip archive (before torch 1.6, a pickle): of another file the unpickler's
        # error is a stray byte's code ("KeyError: 104" for a text file), its start says more.
        if not torch_file:
            reason = f"it starts with {head!r}, where torch.save's files start with b'PK' (a zip archive)"
        raise ValueError(f"{path}: not a readable checkpoint (truncated, or not saved by torch.save with "
                         f"tensors only?): {reason}") from error


# What wrappers put before a module's own keys: DDP's ``module.``, and ``torch.compile``'s ``_orig_mod.``
# (a compiled DDP model's state dict has both: ``_orig_mod.module.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrapped_key(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def backbone_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone weights held by ``obj``: a training checkpoint (its ``model``), arcface_torch's
    ``checkpoint_gpu_<rank>.pt`` (its ``state_dict_backbone``), a ``{"state_dict": ...}`` wrapper or a
    bare state dict; the prefixes of DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) removed."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict_backbone"), dict):  # arcface_torch's
        obj = obj["state_dict_backbone"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source}: not a backbone state dict or a training checkpoint")
    return {_unwrapped_key(k): v for k, v in obj.items()}


def submodule_weights(weights: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """``weights``, or, when they are a whole model's state dict that holds the network as one submodule, that
    submodule's: the keys under one name (``backbone.`` in FaceX-Zoo's checkpoints, whose FaceModel holds the
    backbone and its head; the attribute's name in a PyTorch Lightning checkpoint's ``state_dict``, or its
    path, ``model.backbone.``, where the LightningModule holds a model that holds it), that name cut, exactly
    ``expected`` (the network's). Tried only where ``weights`` are not the network's keys as they are, and
    taken only where one name fits."""
    expected = set(expected)
    if set(weights) == expected:
        return weights
    fitting = [inner for inner in _by_prefix(weights).values() if set(inner) == expected]
    return fitting[0] if len(fitting) == 1 else weights


# How deep a whole model's state dict may hold its backbone: model.backbone. is 2.
_SUBMODULE_DEPTH = 3


def _by_prefix(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``weights`` grouped by their keys' first names, one to :data:`_SUBMODULE_DEPTH` of them
    (``model.backbone.conv1.weight``: under ``model`` and under ``model.backbone``), those names cut."""
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        parts = key.split(".")
        for depth in range(1, min(_SUBMODULE_DEPTH, len(parts) - 1) + 1):
            by_prefix.setdefault(".".join(parts[:depth]), {})[".".join(parts[depth:])] = value
    return by_prefix


def foreign_weights(weights: dict[str, torch.Tensor], expected: Iterable[str]) -> str | None:
    """Where no name of ``weights``, nor any ending of one after a dot (under a prefix: ``encoder.conv1.weight``),
    is one of ``expected``, the network's: what to say in place of ``load_state_dict``'s lists of every key
    missing and unexpected (where some are the network's, those lists say what differs). Else None."""
    expected = list(expected)
    names = {k.split(".", i)[-1] for k in weights for i in range(k.count(".") + 1)}
    if not weights or not expected or names & set(expected):
        return None
    return (f"none of its {len(weights)} weights' names is one of the network's (its first {next(iter(weights))!r}, "
            f"the network's {expected[0]!r}): the weights of another definition of a network, which this trainer's "
            "networks do not load (a network of your own, --network package.module:factory, can)")


INSIGHTFACE_SHARD = re.compile(r"checkpoint_gpu_(\d+)\.pt")


def insightface_shards(folder: str) -> list[str]:
    """The names of the arcface_torch checkpoints (``checkpoint_gpu_<rank>.pt``) in ``folder``, sorted (raises
    ``os.listdir``'s OSError)."""
    return sorted(name for name in os.listdir(folder) if INSIGHTFACE_SHARD.fullmatch(name))


def insightface_run(path: str, state: dict[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]] | None, str]:
    """Every GPU's ``checkpoint_gpu_<rank>.pt`` of the arcface_torch run whose file ``path`` is (``state`` its
    contents; the others are read from beside it, their tensors mapped), in rank order, when they are one run's
    (the same epoch and step). -> ([(file name, contents), ...], "") or (None, why not)."""
    if not INSIGHTFACE_SHARD.fullmatch(os.path.basename(path)):
        return None, ("it is not named checkpoint_gpu_<rank>.pt, as arcface_torch names them: which GPU's classes it "
                      "holds, and where the other GPUs' files are, is unknown")
    folder = os.path.dirname(os.path.abspath(path))
    ranks = {}
    for name in os.listdir(folder):
        match = INSIGHTFACE_SHARD.fullmatch(name)
        if match:
            ranks[int(match.group(1))] = os.path.join(folder, name)
    world = len(ranks)
    if sorted(ranks) != list(range(world)):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        return None, f"no {', '.join(f'checkpoint_gpu_{r}.pt' for r in missing[:3])} beside it"
    files, steps = [], set()
    for rank in range(world):
        try:
            other = state if os.path.samefile(ranks[rank], path) else load(ranks[rank], mmap=True)
        except (OSError, ValueError) as error:
            return None, str(error)
        if not isinstance(other, dict):
            return None, f"{os.path.basename(ranks[rank])} is not a checkpoint of arcface_torch's"
        steps.add((other.get("epoch"), other.get("global_step")))
        files.append((os.path.basename(ranks[rank]), other))
    if len(steps) > 1:
        return None, (f"the files are of different (epoch, step)s {sorted(steps, key=str)}: not one run's "
                      "checkpoint")
    return files, ""


def insightface_rows(parts: list[torch.Tensor], rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows [first, last) (``rows``; None: all) of arcface_torch's per-rank ``parts`` joined in rank order, in
    float32 and copied: of the (mapped) files only those rows are read, so that a --sharded-classes process holds
    its own rows, not the whole matrix (WebFace42M's 2M x 512 centres are 4.2 GB, and as much again for each
    optimizer state, in each of a node's processes)."""
    first, last = rows if rows is not None else (0, sum(part.shape[0] for part in parts))
    pieces, start = [], 0
    for part in parts:
        a, b = max(first, start), min(last, start + part.shape[0])
        if a < b:
            pieces.append(part[a - start:b - start].float())
        start += part.shape[0]
    return torch.cat(pieces) if pieces else torch.zeros((0, *parts[0].shape[1:]))


def insightface_class_centres(path: str, state: dict[str, Any], files: list[tuple[str, dict[str, Any]]] | None = None,
                              rows: tuple[int, int] | None = None) -> tuple[torch.Tensor | None, str]:
    """The whole (C, D) class-centre matrix of an arcface_torch run, whose partial FC keeps each GPU's
    classes in that GPU's ``checkpoint_gpu_<rank>.pt`` (``state_dict_softmax_fc``; rank r holds C // W
    classes, one more when r < C % W, after those of the ranks before it), or its ``rows`` [first, last)
    alone (:func:`insightface_rows`). ``path`` is one of the files (``state`` its contents; ``files``
    :func:`insightface_run`'s, where read already). -> (matrix, "") or (None, why not)."""
    if files is None:
        files, why = insightface_run(path, state)
        if files is None:
            return None, why
    shards = []
    for name, other in files:
        fc = other.get("state_dict_softmax_fc")
        weight = fc.get("weight") if isinstance(fc, dict) else None
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            return None, f"{name} holds no partial FC weight (state_dict_softmax_fc)"
        if not weight.is_floating_point() or not finite(weight):
            return None, f"{name}'s partial FC weight is not finite floating point ({weight.dtype})"
        shards.append(weight)
    world, classes = len(shards), sum(w.shape[0] for w in shards)
    expected = [classes // world + int(rank < classes % world) for rank in range(world)]
    if [w.shape[0] for w in shards] != expected or len({w.shape[1] for w in shards}) > 1:
        return None, (f"the {world} files' shards ({', '.join(str(tuple(w.shape)) for w in shards)}) are not one "
                      f"run's split of {classes} classes")
    return insightface_rows(shards, rows), ""


def insightface_optimizer_state(files: list[tuple[str, dict[str, Any]]], backbone: torch.nn.Module, optimizer: str,
                                rows: tuple[int, int] | None = None
                                ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The per-parameter state of an arcface_torch run's optimizer (its ``state_optimizer``: torch's SGD or
    AdamW over two groups, the backbone's parameters and then its partial FC's weight), for ``backbone``, whose
    parameters are insightface's, in its order (checked against the names of ``state_dict_backbone``, shape by
    shape), and for the whole class centres: each rank's rows of the partial FC's state put together in class
    order, as :func:`insightface_class_centres` puts the weight (its ``rows`` alone, where given). ``files``:
    :func:`insightface_run`'s.
    -> ({backbone parameter name: state}, the centres' state); raises ValueError saying what does not fit."""
    shapes = {name: p.shape for name, p in backbone.named_parameters()}
    names = list(shapes)
    backbone_state, centre_states = {}, []
    for rank, (file, contents) in enumerate(files):
        saved = contents.get("state_optimizer")
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or len(groups) != 2 or not isinstance(saved.get("state"), dict):
            raise ValueError(f"{file}'s state_optimizer is not arcface_torch's (torch's state dict of two parameter "
                             "groups, the backbone's and the partial FC's)")
        kind = "adamw" if "betas" in groups[0] else "sgd"
        if kind != optimizer:
            raise ValueError(f"that run stepped with {'AdamW' if kind == 'adamw' else 'SGD'}, this one with "
                             f"--optimizer {optimizer}: give --optimizer {kind}")
        if len(groups[0]["params"]) != len(names):
            raise ValueError(f"{file}'s optimizer holds {len(groups[0]['params'])} backbone parameters, the network "
                             f"{len(names)}")
        # Its state is by position in backbone.parameters(): the weights' names, in that order, say whose.
        order = [key for key in backbone_state_dict(contents, file) if key in shapes]
        if order != names:
            theirs, ours = next(((a, b) for a, b in zip(order, names) if a != b), (len(order), len(names)))
            raise ValueError(f"{file}'s backbone parameters are not the network's in its order (the first apart: "
                             f"{theirs}, the network's {ours})")
        if len(groups[1]["params"]) != 1:
            raise ValueError(f"{file}'s optimizer holds {len(groups[1]['params'])} partial FC parameters, not its "
                             "weight alone")
        for name, index in zip(names, groups[0]["params"]):
            state = saved["state"].get(index)
            if state is None:
                continue
            bad = [key for key, value in state.items()
                   if isinstance(value, torch.Tensor) and value.ndim and value.shape != shapes[name]]
            if bad:
                raise ValueError(f"{file}'s optimizer state of {name} has {bad[0]} of shape "
                                 f"{tuple(state[bad[0]].shape)}, the parameter {tuple(shapes[name])}")
            if rank == 0:  # (the backbone's state is the same on every rank: DDP averaged its gradients)
                backbone_state[name] = state
        centre_states.append(saved["state"].get(groups[1]["params"][0]))
    if all(state is None for state in centre_states):
        return backbone_state, {}
    if any(state is None for state in centre_states) or len({frozenset(s) for s in centre_states}) > 1:
        raise ValueError("the files' optimizer states of the partial FC weight are not alike: not one run's")
    weights = [contents["state_dict_softmax_fc"]["weight"].shape for _, contents in files]
    centres = {}
    for key, first in centre_states[0].items():
        parts = [state[key] for state in centre_states]
        if isinstance(first, torch.Tensor) and first.ndim:  # a rank's rows (momentum_buffer, exp_avg, exp_avg_sq)
            bad = [(file, tuple(part.shape)) for (file, _), part, shape in zip(files, parts, weights)
                   if part.shape != shape]
            if bad:
                raise ValueError(f"{bad[0][0]}'s optimizer state {key} of the partial FC weight has shape {bad[0][1]}, "
                                 "not its weight's")
            centres[key] = insightface_rows(parts, rows)
        else:  # (AdamW's step: one count, every rank's)
            centres[key] = first
    return backbone_state, centres


def rng_state() -> dict[str, Any]:
    """This process's generator states: torch (CPU and every CUDA device), numpy, python."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's key is a uint32 array; stored as int64 so weights_only loading accepts it.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is finite (checked before a save, so
    that a diverged state never replaces the last good checkpoint)."""
    return all(finite(t) for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point())


def finite(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is finite, a slice at a time: torch.isfinite of a whole fp32
    tensor makes temporaries of 1.75 times its size (an |x| copy and bool masks), 3.4 GB for a million
    512-D class centres, the trainer's peak."""
    return all(bool(torch.isfinite(part).all()) for part in tensor.detach().reshape(-1).split(_CHECK_SLICE))


_CHECK_SLICE = 1 << 22  # elements: 16 MB of fp32 a slice


def describe_backbone(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Guess ``network``, ``embedding_size`` and ``image_size`` from a backbone's state dict (for
    bare ``.pth`` files such as insightface's ``backbone.pth``, which carry no settings): iResNets
    and the demo network, MobileFaceNet (``mbf``, ``mbf_large``) and the Vision Transformers. A
    ViT's variants that differ only in training (drop path, masking) have the same weights and are
    named by the first of them. The shapes of an iResNet's or a ViT's weights fit a range of image sizes
    (:func:`fitting_image_sizes`): 112 px, the size faces are aligned to, where it is one of them."""
    return _describe(state_dict)[0]


def fitting_image_sizes(state_dict: dict[str, torch.Tensor]) -> range:
    """The image sizes whose network (as :func:`describe_backbone` names it) has the shapes of
    ``state_dict``: 97 to 128 px all give the demo network a 4x4 last map, 108 to 116 px a ViT
    its 12x12 patches."""
    return _describe(state_dict)[1]


def _describe(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, Any], range]:
    """(:func:`describe_backbone`'s settings, :func:`fitting_image_sizes`)."""
    if "pos_embed" in state_dict and "feature.2.weight" in state_dict:
        return _describe_vit(state_dict)
    if "features.layers.0.layers.0.weight" in state_dict and "features.layers.2.weight" in state_dict:
        gdconv_side = state_dict["features.layers.0.layers.0.weight"].shape[-1]  # the last map's side
        image_size = int(gdconv_side) * 16  # (it takes multiples of 16 only)
        stem = state_dict.get("layers.0.layers.0.weight")  # 256 channels in mbf_large, 128 in mbf
        network = "mbf_large" if stem is not None and stem.shape[0] == 256 else "mbf"
        return ({"network": network, "embedding_size": int(state_dict["features.layers.2.weight"].shape[0]),
                 "image_size": image_size}, range(image_size, image_size + 1))
    from .models import IRESNET_LAYERS

    blocks = [1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{i}.")), default=-1)
              for i in range(1, 5)]
    widths = [state_dict[f"layer{i}.0.conv1.weight"].shape[0] for i in range(1, 5)] if all(blocks) else []
    if tuple(widths) == (64, 128, 256, 512) and tuple(blocks) in IRESNET_LAYERS.values():
        network, halvings = next(n for n, b in IRESNET_LAYERS.items() if b == tuple(blocks)), 4
    elif tuple(widths) == (16, 32, 64, 128) and tuple(blocks) == (1, 1, 1, 1):
        network, halvings = "small", 5
    else:
        raise ValueError(f"not a backbone this trainer builds: iResNet blocks {blocks}, widths {widths}; "
                         "pass --network, --embedding-size and --image-size")
    embedding_size, fc_in = state_dict["fc.weight"].shape
    side = round((fc_in / widths[-1]) ** 0.5)
    # Each stride-2 stage rounds up (ceil(size / 2)): the last map's side is ceil(size / 2^halvings).
    sizes = range((side - 1) * 2 ** halvings + 1, side * 2 ** halvings + 1)
    return ({"network": network, "embedding_size": int(embedding_size),
             "image_size": 112 if 112 in sizes else sizes[-1]}, sizes)


def _describe_vit(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, Any], range]:
    from .models.vit import PATCH_SIZE, VIT_CONFIGS

    _, tokens, dim = state_dict["pos_embed"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    names = [name for name, config in VIT_CONFIGS.items() if (config.embed_dim, config.depth) == (dim, depth)]
    grid = round(tokens ** 0.5)
    if not names or grid * grid != tokens:
        raise ValueError(f"not a ViT this trainer builds: {depth} blocks of width {dim}, {tokens} tokens; "
                         "pass --network, --embedding-size and --image-size")
    sizes = range(grid * PATCH_SIZE, (grid + 1) * PATCH_SIZE)  # (the patches leave the last rows unseen)
    return ({"network": names[0], "embedding_size": int(state_dict["feature.2.weight"].shape[0]),
             "image_size": 112 if 112 in sizes else sizes[0]}, sizes)


def _described_weights(weights: dict[str, torch.Tensor], path: str, options: bool
                        ) -> tuple[dict[str, torch.Tensor], tuple[dict[str, Any], range]]:
    """(the backbone's weights, :func:`_describe` of them) of a state dict that records no settings: the
    weights as they are, or, in a whole model's state dict (a PyTorch Lightning checkpoint's, FaceX-Zoo's),
    those under the one name (or path of names, ``model.backbone``) whose keys, that name cut, are a backbone
    this trainer builds.
    ValueError naming ``path`` when neither is; it asks for the three options where the caller was given some
    (``train.export``'s), else names the command that records them (``train.embed`` has none)."""
    try:
        return weights, _describe(weights)
    except (ValueError, KeyError, IndexError) as error:
        why = str(error) if isinstance(error, ValueError) else f"no weight {error}"
    described = {}
    for name, inner in _by_prefix(weights).items():
        try:
            described[name] = (inner, _describe(inner))
        except (ValueError, KeyError, IndexError):
            pass
    if len(described) == 1:
        return next(iter(described.values()))
    if described:  # (a model and its EMA copy, say)
        names = list(described)
        raise ValueError(f"{path} holds {len(names)} backbones, under " + " and ".join(f"'{n}.'" for n in names)
                         + ": save the one to use as a state dict of its own (its keys without that name)")
    if options:
        raise ValueError(f"{path}: {why.split('; pass --network')[0]}; pass --network, --embedding-size and "
                         "--image-size")
    raise ValueError(f"{path}: {why.split('; pass --network')[0]}; give python -m train.export --checkpoint {path} "
                     "its --network (a network of your own: package.module:factory), --embedding-size and "
                     "--image-size: its backbone.pt records them")


def settings_path(model_path: str) -> str:
    """Where ``python -m train.export``'s settings of the model at ``model_path`` are: ``<stem>.json``
    beside it (``backbone.json`` beside ``backbone.pt`` and ``backbone.onnx``), and ``backbone.json``
    beside the other graphs of an export too (``backbone_normalized.onnx``, ``backbone_int8.onnx``, ...)."""
    from .export import GRAPH_NAMES, SETTINGS_NAME

    if os.path.basename(model_path) in GRAPH_NAMES:
        return os.path.join(os.path.dirname(model_path), SETTINGS_NAME)
    return os.path.splitext(model_path)[0] + ".json"


def read_settings(path: str) -> dict[str, Any]:
    """The settings ``python -m train.export`` writes beside a backbone (``backbone.json``: network,
    embedding_size, image_size, threshold); ValueError naming the file when it is not such JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not the settings JSON train.export writes: {error}") from None
    types = {"network": str, "embedding_size": int, "image_size": int, "threshold": (int, float)}
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: not the settings JSON train.export writes (an object of {', '.join(types)})")
    for key, kind in types.items():
        if key in settings and (not isinstance(settings[key], kind) or isinstance(settings[key], bool)):
            wanted = "number" if key == "threshold" else kind.__name__
            raise ValueError(f"{path}: {key} is {settings[key]!r}, not a {wanted}")
    return settings


def mean_threshold(results: dict[str, dict[str, Any]]) -> float:
    """The mean of the verification sets' thresholds, a benchmark of several sets (RFW's four races, a
    record's ``group``) counted as one set, its sets' mean: RFW given beside LFW outweighed it 4 to 1."""
    groups: dict[str, list[float]] = {}
    for name, record in results.items():
        groups.setdefault(record.get("group") or name, []).append(float(record["threshold"]))
    return sum(sum(values) / len(values) for values in groups.values()) / len(groups)


def recorded_settings(state: Any, path: str) -> dict[str, Any]:
    """What the file at ``path`` (read as ``state``) records of its backbone: a training checkpoint's
    options (network, embedding_size, image_size, and threshold, the mean of its last verification's
    (:func:`mean_threshold`), when it verified), or the settings ``python -m train.export`` wrote beside
    a state dict; ``{}`` for a bare state dict."""
    if isinstance(state, dict) and isinstance(state.get("args"), dict):
        args = state["args"]
        settings = {k: args[k] for k in ("network", "embedding_size", "image_size")}
        results = state.get("verification", {})
        if results:
            settings["threshold"] = mean_threshold(results)
        if state.get("verification_cut_short"):  # (train.export writes it into backbone.json with the threshold)
            settings["verification_cut_short"] = {
                "step": int(state["step"]), "threshold_steps": sorted({int(r["step"]) for r in results.values()})}
        return settings
    sidecar = settings_path(path)
    return read_settings(sidecar) if os.path.exists(sidecar) else {}


def cut_short_note(path: str, settings: dict[str, Any], tool: str) -> str | None:
    """The note (``tool: note: ...``, for stderr) for a model whose run's final verification a stop or a failure
    cut short (its checkpoint marked; ``python -m train --resume auto`` makes it), as :func:`recorded_settings`
    reads it of the checkpoint or of an export's backbone.json: the threshold it records is then an earlier
    step's, or of some of the sets only. None for any other model."""
    cut = settings.get("verification_cut_short")
    if not isinstance(cut, dict) or "step" not in cut:
        return None
    step, steps = cut["step"], [str(s) for s in cut.get("threshold_steps") or []]
    if not steps:
        its = "it records no threshold"
    elif steps == [str(step)]:
        its = f"its threshold is of step {step}'s sets verified before the cut only"
    else:
        its = f"its threshold is step{'s' if len(steps) > 1 else ''} {' and '.join(steps)}'s"
    # An export keeps the threshold it was written with: once the resumed run has verified, export again.
    exported = tool == "export" or os.path.isfile(settings_path(path))
    return (f"{tool}: note: {path} is of a run whose final verification (step {step}) was cut short (python -m train "
            f"--resume auto on its checkpoint makes it{', then export again' if exported else ''}): {its}")


def held_backbone(weights: dict[str, torch.Tensor], recorded: dict[str, Any],
                  built: dict[str, Any]) -> dict[str, Any] | None:
    """The network, embedding_size and image_size of ``weights``, which did not load into a model of
    ``built``'s, as the file records them (:func:`recorded_settings`) where it does, else as read from
    their shapes (:func:`describe_backbone`; shapes fit a range of image sizes: 36 to 44 px all give a
    ViT 4x4 patches, read as 36). None when neither tells, or when they tell ``built``'s own: then the
    mismatch is in the keys (one missing, a foreign one), which only ``load_state_dict``'s error names."""
    keys = ("network", "embedding_size", "image_size")
    known = {k: recorded[k] for k in keys if k in recorded}
    if len(known) == len(keys):
        found = known
    else:
        try:
            found = {**describe_backbone(weights), **known}
        except (ValueError, KeyError, IndexError):
            return None
    return None if all(found[k] == built[k] for k in keys) else found


def summarize_load_error(error: RuntimeError, lines: int = 3, width: int = 300) -> str:
    """``load_state_dict``'s error cut to its first ``lines`` lines of at most ``width`` characters:
    its lists of missing and unexpected keys run to pages, on one line each."""
    text = str(error).splitlines()
    kept = [line if len(line) <= width else line[:width] + " ..." for line in text[:lines]]
    return "\n".join(kept + ([f"... ({len(text) - lines} more lines)"] if len(text) > lines else []))


def load_backbone(path: str, *, likely_image_size: int | None = None,
                  **overrides: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An eval-mode backbone from a training checkpoint, a state dict written by
    ``python -m train.export`` (settings beside it in ``<name>.json``) or a bare state dict of a
    backbone it builds (:func:`describe_backbone`); ``overrides`` (network, embedding_size, image_size)
    win over what is guessed of a bare state dict (ValueError when they contradict what the file records).
    ``likely_image_size``: the size a bare state dict's weights are taken at where they fit it and not 112 px
    (a teacher's: the run's images' size). Returns ``(model, settings)``; settings also hold ``threshold`` (squared
    distance, from the last verification) when known."""
    from .models import get_model

    state = load(path)
    settings = recorded_settings(state, path)
    weights = backbone_state_dict(state, path)
    # What the file records (a checkpoint's options, an export's settings) is what the weights are:
    # another value given for it would build a model they do not fit.
    for key, value in overrides.items():
        if value is not None and key in settings and settings[key] != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{path} records {flag} {settings[key]}, {flag} {value} given: that option is for a bare "
                             "state dict whose layout cannot be guessed; leave it out")
    # (guessed only where neither the file nor the options say: a package.module:factory network's bare state
    # dict has no shapes to guess from, and was refused with all three options given)
    if not all(k in settings or overrides.get(k) is not None for k in ("network", "embedding_size", "image_size")):
        weights, (guessed, sizes) = _described_weights(weights, path, any(v is not None for v in overrides.values()))
        if likely_image_size in sizes and 112 not in sizes:  # (112 px wins where it fits, as below)
            guessed["image_size"] = likely_image_size
        elif "image_size" not in settings and overrides.get("image_size") is None and len(sizes) > 1 \
                and 112 not in sizes:
            # The images are resized to it: a wrong guess gives other embeddings, without an error. (112
            # px, where the weights fit it, is the size faces are aligned to: insightface's .pth files.)
            print(f"note: {path} records no image size, and its weights fit any from {sizes[0]} to {sizes[-1]} px: "
                  f"taken as {guessed['image_size']} px (python -m train.export --image-size N records the size in "
                  "backbone.json beside the weights)", file=sys.stderr)
        settings = {**guessed, **settings}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    try:
        model = get_model(settings["network"], embedding_size=settings["embedding_size"],
                          image_size=settings["image_size"])
    except ValueError as error:  # a package.module:factory that does not import here, say
        raise ValueError(f"{path} holds a backbone of network {settings['network']}: {error}") from None
    weights = submodule_weights(weights, model.state_dict().keys())  # (a whole model's: the backbone's)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        # What the file holds, in the options' words (load_state_dict's own list runs to pages).
        found = held_backbone(weights, {}, settings)  # (what it records is what was built)
        holds = (f"it holds network {found['network']} with embedding size {found['embedding_size']} at "
                 f"{found['image_size']}px" if found else summarize_load_error(error))
        raise ValueError(f"{path} does not fit network {settings['network']} with embedding size "
                         f"{settings['embedding_size']} at {settings['image_size']}px: {holds}") from None
    return model.eval(), settings
