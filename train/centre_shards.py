"""Checkpoints whose class centres each process writes itself (``--save-sharded``): a rank's rows of the centres and
of their optimizer state in a file of its own beside ``checkpoint.pt``, which names them in a manifest."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import torch
from torch import nn

from . import checkpoint

# The id is the save's (one random id for every rank's file and the manifest): the shards of another save, of
# this run or another, are never taken for these, and a save's new files replace none of the previous save's.
SHARD = re.compile(r"checkpoint-centres-(\d+)-of-(\d+)-([0-9a-f]{16})\.pt")
_TEMPORARY = re.compile(r"\.(checkpoint-centres-\d+-of-\d+-[0-9a-f]{16}\.pt)\..+\.tmp")


def shard_name(rank: int, world_size: int, save_id: str) -> str:
    return f"checkpoint-centres-{rank}-of-{world_size}-{save_id}.pt"


def shard_files(folder: str) -> list[str]:
    """The names of the centre shards in ``folder`` (of any save), sorted; none where it cannot be listed."""
    try:
        return sorted(name for name in os.listdir(folder) if SHARD.fullmatch(name))
    except OSError:
        return []


def centre_state_index(optimizer: torch.optim.Optimizer, weight: nn.Parameter) -> int | None:
    """The number ``optimizer.state_dict()`` gives ``weight`` (torch numbers the parameters of its groups in order)."""
    numbers: dict[int, int] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            numbers.setdefault(id(param), len(numbers))
    return numbers.get(id(weight))


def split_state(loss: nn.Module, optimizer: torch.optim.Optimizer, rank: int, world_size: int,
                save_id: str, step: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """This rank's shard file's contents (its rows of the centres and of their per-class optimizer state), and the
    loss's and the optimizer's state dicts without them (rank 0's, for checkpoint.pt: the rest is alike on every
    rank), and the manifest of the save. Not a collective: every rank's rows follow from ``class_shard``."""
    from arcface_ext.distributed import class_shard

    k = loss.k
    index = centre_state_index(optimizer, loss.weight)
    optimizer_state = optimizer.state_dict()
    per_class = {}
    if index is not None and index in optimizer_state["state"]:
        entry = dict(optimizer_state["state"][index])
        per_class = {key: value for key, value in entry.items() if torch.is_tensor(value) and value.dim() > 0}
        optimizer_state["state"] = {**optimizer_state["state"],
                                    index: {key: value for key, value in entry.items() if key not in per_class}}
    loss_state = loss.state_dict()
    loss_state.pop("weight")
    loss_state.pop("_extra_state", None)  # (which rows a shard holds: the manifest says)
    first, last = loss.class_start * k, loss.class_stop * k
    shard = {"save_id": save_id, "step": step, "rank": rank, "world_size": world_size, "rows": [first, last],
             "weight": loss.weight.detach().cpu(), "optimizer": {key: value.cpu() for key, value in per_class.items()}}
    bounds = [class_shard(loss.num_classes, r, world_size) for r in range(world_size)]
    manifest = {"save_id": save_id, "step": step, "world_size": world_size, "rows": loss.num_classes * k,
                "files": [[shard_name(r, world_size, save_id), start * k, stop * k] for r, (start, stop)
                          in enumerate(bounds)],
                "optimizer_index": index, "optimizer_keys": sorted(per_class)}
    return shard, loss_state, optimizer_state, manifest


def read_rows(path: str, manifest: dict[str, Any], rows: tuple[int, int] | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rows [first, last) (``rows``; None: all) of the centres and of their optimizer state, put together from the
    shards that checkpoint ``path``'s ``manifest`` names, beside it; only the files that hold some of them are read
    (mapped), and the rows are copied; ``path`` a link (``--resume latest.pt``), beside the file it points to where
    they are not beside it. Raises ValueError naming the file that is missing or not of that save."""
    folder = os.path.dirname(os.path.abspath(path))
    linked = os.path.dirname(os.path.realpath(path))
    first, last = rows if rows is not None else (0, manifest["rows"])
    weights, states = [], {key: [] for key in manifest["optimizer_keys"]}
    for rank, (name, start, stop) in enumerate(manifest["files"]):
        a, b = max(first, start), min(last, stop)
        if a >= b:
            continue
        full = os.path.join(folder, name)
        if not os.path.isfile(full) and os.path.isfile(os.path.join(linked, name)):
            full = os.path.join(linked, name)
        if not os.path.isfile(full):
            raise ValueError(f"{full} is missing: a shard of the class centres that {path} names (at step "
                             f"{manifest['step']})")
        shard = checkpoint.load(full, mmap=True)
        expected = {"save_id": manifest["save_id"], "step": manifest["step"], "rank": rank,
                    "world_size": manifest["world_size"], "rows": [start, stop]}
        found = {key: shard.get(key) for key in expected} if isinstance(shard, dict) else None
        weight = shard.get("weight") if isinstance(shard, dict) else None
        if found != expected or not torch.is_tensor(weight) or weight.shape[0] != stop - start or \
                any(not torch.is_tensor(shard["optimizer"].get(key)) for key in states):
            raise ValueError(f"{full} is not the shard of the class centres that {path} names (rows [{start}, {stop}) "
                             f"of the save at step {manifest['step']}, id {manifest['save_id']}): another save's, "
                             "or not a shard")
        weights.append(weight[a - start:b - start])
        for key in states:
            states[key].append(shard["optimizer"][key][a - start:b - start])
    return torch.cat(weights), {key: torch.cat(parts) for key, parts in states.items()}


def whole_state(path: str, state: dict[str, Any], loss: nn.Module | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The loss's and the optimizer's state dicts of checkpoint ``path`` (``state``, which has a manifest), with the
    rows from the shards that ``loss`` takes: a sharded loss's own rows (with its record of them), else all of them,
    as an unsharded checkpoint holds them. Raises :func:`read_rows`'s ValueError."""
    manifest = state["centre_shards"]
    sharded = getattr(loss, "sharded", False)
    rows = (loss.class_start * loss.k, loss.class_stop * loss.k) if sharded else None
    weight, per_class = read_rows(path, manifest, rows)
    loss_state = {**state["margin_loss"], "weight": weight}
    if sharded:
        loss_state["_extra_state"] = loss.get_extra_state()
    optimizer_state = state.get("optimizer")
    index = manifest["optimizer_index"]
    if per_class and index in optimizer_state["state"]:
        optimizer_state = {**optimizer_state, "state": {**optimizer_state["state"],
                                                        index: {**optimizer_state["state"][index], **per_class}}}
    return loss_state, optimizer_state


def sync_folder(folder: str) -> None:
    """The folder's entries (the renames into it) made durable: a checkpoint.pt renamed over the previous one, which
    names other shards, is on the disk before those go, and this save's shards before a checkpoint.pt names them. A
    file system that does not sync folders (EINVAL) keeps its own order."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def saves_named(folder: str, leaving: tuple[str, ...] = ()) -> set[str]:
    """The ids of the saves whose shards a checkpoint in ``folder`` names: checkpoint.pt's, and those of copies of
    it kept beside it (``cp checkpoint.pt step-10000.pt``); not those of the files named in ``leaving``. A file that
    cannot be read names none."""
    named = set()
    for name in os.listdir(folder):
        if not name.endswith(".pt") or name.startswith(".") or SHARD.fullmatch(name) or name in leaving:
            continue
        try:
            state = checkpoint.load(os.path.join(folder, name), mmap=True)
        except Exception:
            continue
        manifest = state.get("centre_shards") if isinstance(state, dict) else None
        if isinstance(manifest, dict) and isinstance(manifest.get("save_id"), str):
            named.add(manifest["save_id"])
    return named


def remove_other_saves(folder: str, save_id: str | None, rank: int, world_size: int) -> None:
    """After a save (``save_id``; None: an unsharded one) is complete: the shards that no checkpoint in the folder
    names (the previous save's, and those of a save stopped before its checkpoint.pt; not those of a copy of an
    earlier checkpoint.pt kept beside it) that are this rank's to remove (its rank's, and on rank 0 those of ranks
    this run does not have), and the temporaries of killed writers."""
    kept = None
    for name in os.listdir(folder):
        found = SHARD.fullmatch(name)
        if found and found.group(3) != save_id and (int(found.group(1)) == rank or
                                                     (rank == 0 and int(found.group(1)) >= world_size)):
            kept = saves_named(folder) if kept is None else kept
            if found.group(3) in kept:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
        temporary = _TEMPORARY.fullmatch(name)
        if temporary:
            checkpoint._remove_stale_temporaries(folder, temporary.group(1))
