"""``python -m train.embed``: embeddings of aligned face images with a trained backbone, and the
comparison of two faces (cosine similarity and a same/different decision).

Embeddings are made the way verification makes them: embedding(image) + embedding(mirrored
image), L2-normalised, images scaled as (x - 127.5) / 127.5 at the model's input size. Photos that
are not aligned are embedded with ``--landmarks`` (a file as ``python -m train.tools.align`` reads):
each listed face is aligned as that tool and ``train.ijb`` align it, then embedded (a file that
``python -m train.tools.detect`` writes with a face detector); or with ``--detector``, which finds
the faces as that tool does.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import re
import sys
import time
from typing import IO, Callable, NamedTuple

from .signals import run_tool, signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "embed: "):
    import numpy as np
    import torch

    from . import checkpoint
    from .data.transforms import IMAGE_EXTENSIONS, load_image_file_and_size, to_chw, to_model_input, unreadable_image
    from .tools import (ArgumentParser, check_images_folder, check_outputs, left_out_said, listable_name, path_arg,
                        torch_device, usable_cpus)

# Cosine similarity above which two faces are called the same when the model carries no
# verification threshold of its own.
DEFAULT_COSINE_THRESHOLD = 0.3


def load_model(path: str, device, amp: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(eval-mode backbone, settings) of ``--model``: an ONNX file (``onnx_backbone``, run by
    onnxruntime; told by its name or its first bytes), else what ``checkpoint.load_backbone`` reads.
    ``amp``: the tool's --amp, where it embeds with the model (:func:`set_amp` applies it after): one an ONNX
    model refuses is refused before the file is read, not after its loader's notes."""
    from .onnx_backbone import is_onnx_file, load_onnx_backbone

    refuse_amp_of_an_onnx_model(amp, path)
    if is_onnx_file(path):
        return load_onnx_backbone(path, device)
    return checkpoint.load_backbone(path)


AMP_HELP = ("autocast the network's trunk to this type (default: a training checkpoint's own --amp, as its run "
            "verified; none for other models)")
# (train.verify's is AMP_HELP: it keeps fp16 on a CPU)
EMBED_AMP_HELP = ("autocast the network's trunk to this type (default: a training checkpoint's own --amp, as its run "
                  "verified, a run's fp16 in fp32 on a CPU; none for other models); fp16 is refused on a CPU, where "
                  "bf16 autocasts")


def add_amp_option(p: argparse.ArgumentParser, help: str = EMBED_AMP_HELP) -> None:
    """The --amp of the tools that embed images (``set_amp`` applies it; train.verify passes ``AMP_HELP``)."""
    p.add_argument("--amp", choices=("none", "fp16", "bf16"), default=None, help=help)


def run_options(path: str) -> tuple[dict, str | None]:
    """The options of the run whose training checkpoint ``path`` is ({} for other models), and the folder it
    ran in, which its relative paths are relative to (None where the checkpoint does not record it)."""
    from .onnx_backbone import is_onnx_file

    if is_onnx_file(path):
        return {}, None
    try:  # mapped: a checkpoint's class centres and optimizer state are not read for its options
        state = checkpoint.load(path, mmap=True)
    except ValueError:  # a file of torch's legacy format, which cannot be mapped (none of this trainer's)
        state = checkpoint.load(path)
    if not isinstance(state, dict):
        return {}, None
    run, folder = state.get("args"), state.get("working_directory")
    return (run if isinstance(run, dict) else {}), (folder if isinstance(folder, str) else None)


def refuse_amp_of_an_onnx_model(amp: str | None, model_path: str) -> None:
    """:func:`set_amp`'s refusal of an ``amp`` given for an ONNX model, which runs as its graph is, said before the
    model is loaded (its loader's note on how the graph is fed, then the refusal, read as if the note were the
    answer). A name that is no file (a missing ``x.onnx``) is left to the loader, which says so."""
    from .onnx_backbone import is_onnx_file

    if amp not in (None, "none") and os.path.isfile(model_path) and is_onnx_file(model_path):
        raise ValueError(f"--amp {amp}: {model_path} is an ONNX model, run as its graph is")


def set_amp(model: torch.nn.Module, amp: str | None, model_path: str, run: dict | None = None, *, device=None,
            done: str = "embedded", figures: str = "") -> None:
    """The trunk's autocast: ``amp`` (the tool's --amp), else the run's own (``run``, the checkpoint's options;
    read from ``model_path`` when None). A run trained with ``--amp`` verified under it (its backbone autocasts
    its trunk, as insightface's does), and fp32 gives other embeddings: a pair near a threshold can change sides.
    An ONNX model runs as its graph is: an ``amp`` given is refused. With ``device`` a CPU, fp16 is not taken
    (torch's CPU fp16 convolutions: r18, 8 images at 112 px, 19 s against 0.6 s in fp32 and 0.26 s in bf16):
    refused where given, fp32 with a note where it is the run's. ``done`` and ``figures``: the note's words."""
    given = amp
    if run is None:
        run = run_options(model_path)[0]
    amp = given if given is not None else run.get("amp", "none")
    if amp == "none" and not hasattr(model, "amp"):
        return
    if not hasattr(model, "amp"):
        from .onnx_backbone import OnnxBackbone

        if given is None and not isinstance(model, OnnxBackbone):
            # The run's own amp, not asked for here: a factory that took amp= used it as it built the network,
            # and load_backbone builds it without (was refused as if --amp had been given).
            print(f"the run trained under --amp {amp}; this network of its own (package.module:factory) has no amp "
                  f"attribute to autocast by: {done} in fp32 (--amp none: without this note)", file=sys.stderr)
            return
        if isinstance(model, OnnxBackbone):  # (load_model read it as one: the file is, by its name or bytes)
            refuse_amp_of_an_onnx_model(amp, model_path)
        raise ValueError(f"--amp {amp}: {model_path} is a network of its own (package.module:factory) that has no amp "
                         "attribute to autocast by")
    if amp == "fp16" and device is not None and torch.device(device).type == "cpu":
        if given is not None:
            raise ValueError("--amp fp16 on the CPU: torch's fp16 convolutions there run several times slower than "
                             "fp32 (r18: some 30x; --amp bf16 autocasts on the CPU)")
        print("the run trained under --amp fp16, several times slower than fp32 on the CPU (torch's fp16 "
              f"convolutions): {done} in fp32 (--amp bf16 to autocast)", file=sys.stderr)
        amp = "none"
    model.amp = amp
    if given is None and amp != "none":
        print(f"the trunk under --amp {amp}, as the run verified ({figures}--amp none for fp32)", file=sys.stderr)


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively, into linked folders too, each folder once), sorted."""
    found, seen = [], set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to one folder
            folders[:] = []
            continue
        seen.add(real)
        # Real folders first, then links, each by name: a folder is listed under its own path when the
        # tree holds it, and under the same path whatever order the file system lists them in.
        folders.sort(key=lambda name: (os.path.islink(os.path.join(root, name)), name))
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def images_under(folder: str, flag: str = "--images") -> list[str]:
    """:func:`list_images` of a folder a tool was given to read: FileNotFoundError naming ``flag`` where
    it holds none (the one wording of train.embed and the face tools)."""
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"{flag} {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) under it")
    return paths


@torch.no_grad()
def embed_images(backbone: torch.nn.Module, images: torch.utils.data.Dataset, *, device, batch_size: int = 128,
                 workers: int = 4, flip: bool = True, log=None, normalize: bool = False, dtype=np.float32,
                 unreadable: list | None = None, extras: list | None = None, norms: list | None = None,
                 workers_leave_signals: bool = False) -> np.ndarray:
    """(len(images), D) raw embeddings, embedding(x) + embedding(mirrored x) with ``flip``, of a
    dataset whose item i is (uint8 (3, S, S) image, "" or why image i could not be read); with
    ``normalize``, of unit length; held as ``dtype``.

    As ``verification.compute_embeddings`` (images fed as (x - 127.5) / 127.5, module modes restored
    afterwards), except that the features stay un-normalised by default (IJB weighs them by their
    norm in a template) and the images stream from a DataLoader, decoded by ``workers`` processes
    (with ``workers_leave_signals``, for a caller that stops on SIGTERM itself, they leave Ctrl-C and
    SIGTERM to this process), rather than sit in one tensor (IJB-C's 469k crops would take 17 GB, a
    million 112 px faces 37 GB). Raises ValueError naming the first unreadable
    image, unless ``unreadable`` is a list: each unreadable image's (index, why) is then appended
    to it and its row is NaN. Items may carry a third element, which ``extras`` (a list) then
    receives, batch by batch, as the DataLoader collates it. ``norms`` (a list) receives, batch by
    batch, each image's feature norm: the mean of ‖embedding(x)‖ and ‖embedding(mirrored x)‖ with
    ``flip`` (each image's share of insightface's XNorm), else ‖embedding(x)‖; MagFace's quality.
    """
    from .data import leave_signals_to_the_main_process, worker_start_method
    from .onnx_backbone import batch_size_for

    device = torch.device(device)
    batch_size = batch_size_for(backbone, batch_size, 2 if flip else 1)
    leave_signals = workers and workers_leave_signals
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         worker_init_fn=leave_signals_to_the_main_process() if leave_signals else None,
                                         multiprocessing_context=worker_start_method() if leave_signals else None)
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    features, done, started, reported = None, 0, time.monotonic(), time.monotonic()
    try:
        for batch, errors, *extra in loader:
            if extras is not None:
                extras.append(extra[0])
            failed = [(done + i, e) for i, e in enumerate(errors) if e]
            if failed and unreadable is None:
                raise ValueError(failed[0][1])
            # (non-blocking from pinned memory on CUDA alone: on mps such a copy can read the batch's memory
            # after it is freed, pytorch/pytorch#139550)
            x = to_model_input(batch.to(device, non_blocking=device.type == "cuda"))
            count = x.shape[0]
            if flip:
                raw = backbone(torch.cat([x, torch.flip(x, dims=[3])])).float()
                out = raw[:count] + raw[count:]
                if norms is not None:
                    norms.append(((raw[:count].norm(dim=1) + raw[count:].norm(dim=1)) / 2).cpu().numpy())
            else:
                out = backbone(x).float()
                if norms is not None:
                    norms.append(out.norm(dim=1).cpu().numpy())
            if normalize:
                out = torch.nn.functional.normalize(out, dim=1)
            if features is None:
                features = np.empty((len(images), out.shape[1]), dtype=dtype)
            features[done:done + count] = out.cpu().numpy()
            for index, why in failed:
                features[index] = np.nan
                unreadable.append((index, why))
            done += count
            if log is not None and time.monotonic() - reported > 30:
                reported = time.monotonic()
                log(f"embedded {done}/{len(images)} images ({done / (reported - started):.0f} images/s)")
    finally:
        for module, training in modes:
            module.training = training
    return features


class ImageFiles(torch.utils.data.Dataset):
    """Item i: (uint8 (3, S, S) image file i resized to S, "" or why it could not be read): a bad
    file is reported rather than raised, so that its message reaches the user without a worker's
    traceback around it. With ``sizes``, a third element: the file's (height, width) before the
    resize ((0, 0) for a bad file)."""

    def __init__(self, paths: list[str], image_size: int, *, sizes: bool = False):
        self.paths, self.image_size, self.sizes = paths, int(image_size), sizes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple:
        try:
            image, size = load_image_file_and_size(self.paths[index], self.image_size)
            why = ""
        except (OSError, ValueError) as error:  # (a ValueError names the file and says why already)
            why = unreadable_image(self.paths[index], error) if isinstance(error, OSError) else str(error)
            image, size = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8), (0, 0)
        return (to_chw(image), why) + ((torch.tensor(size, dtype=torch.int64),) if self.sizes else ())


def embed_files(model: torch.nn.Module, paths: list[str], image_size: int, *, device="cpu",
                batch_size: int = 64, workers: int = 0, norms: list | None = None,
                not_square: list | None = None, unreadable: list | None = None) -> np.ndarray:
    """(len(paths), D) float32 unit-length embeddings (verification's: image plus mirror); the
    feature norms as ``embed_images`` gives them appended to ``norms``; (index, (height, width)) of
    each image that is not square appended to ``not_square``. An image that cannot be read raises
    ValueError naming it, unless ``unreadable`` is a list: its (index, why) is then appended there
    and its row is NaN. The decoding workers leave Ctrl-C and SIGTERM to this process (a terminal's
    Ctrl-C reaches them all)."""
    sizes = [] if not_square is not None else None
    features = embed_images(model.to(device), ImageFiles(paths, image_size, sizes=sizes is not None),
                            device=device, batch_size=batch_size, workers=workers,
                            log=lambda message: print(message, file=sys.stderr, flush=True),
                            norms=norms, extras=sizes, unreadable=unreadable, workers_leave_signals=True)
    if sizes:
        sizes = torch.cat(sizes).tolist()
        not_square.extend((i, (h, w)) for i, (h, w) in enumerate(sizes) if h != w)
    return torch.nn.functional.normalize(torch.from_numpy(features), dim=1).numpy()


def folder_images(folder: str, failures: list[str]) -> tuple[list[str], list[str]]:
    """(paths, names relative to ``folder``) of the images under ``folder`` (any nesting) that a tool's
    ``--images`` embeds; one whose name cannot be a row of a table is left out, said in ``failures``.
    FileNotFoundError naming ``--images`` where there is no image, ValueError where none can be a row."""
    paths = images_under(folder)
    names = [os.path.relpath(path, folder) for path in paths]
    listable = [listable_name(name) for name in names]
    left = [f"{path!r}: its name is not UTF-8 text without line breaks, which a row of the table must be"
            for path, ok in zip(paths, listable) if not ok]
    failures += left
    if len(left) == len(paths):
        raise ValueError(left[0])
    return [x for x, ok in zip(paths, listable) if ok], [x for x, ok in zip(names, listable) if ok]


def embed_readable(model: torch.nn.Module, folder: str, paths: list[str], image_size: int, *, failures: list[str],
                   device="cpu", batch_size: int = 64, workers: int = 0, norms: list | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, (N,) bool: read) of the aligned faces at ``paths``, ``folder``'s images as
    :func:`folder_images` lists them, as :func:`embed_files` embeds them (an unread one's row NaN), with
    the warnings of faces that do not look aligned and of every one left out (``failures``, the images
    that cannot be read added). ValueError naming ``--images`` where none can be read."""
    _warn_if_not_aligned(paths[:1])
    not_square, unreadable = [], []
    embeddings = embed_files(model, paths, image_size, device=device, batch_size=batch_size, workers=workers,
                             norms=norms, not_square=not_square, unreadable=unreadable)
    _warn_others_not_square(paths, not_square)
    failures += [why for _, why in unreadable]
    _warn_left_out(failures)
    readable = np.ones(len(paths), dtype=bool)
    readable[[i for i, _ in unreadable]] = False
    if not readable.any():
        raise ValueError(f"--images {folder}: none of the {len(paths)} images can be read")
    return embeddings, readable


class ListedFaces(NamedTuple):
    """The faces a landmarks file lists, read and checked (:func:`listed_faces`): each one's image name
    (under its folder), (5, 2) landmarks and line of the file."""
    names: list[str]
    points: np.ndarray
    line_nos: np.ndarray


def listed_faces(folder: str, landmarks_file: str, *, extension: str | None = None,
                 several: bool = False) -> ListedFaces:
    """The faces of ``landmarks_file`` (see ``train.tools.align``) in the images under ``folder``, read
    and checked before any is embedded, with the file's notes said (``several``: an image may be listed
    again). Raises ValueError naming the line of landmarks that coincide, FileNotFoundError naming that
    of a missing image, and ``read_face_landmarks``'s errors (no such file, a malformed line)."""
    from .ijb import unusable_landmarks
    from .tools.align import landmark_notes, read_face_landmarks

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder} is not a folder{checkpoint.dangling(folder)}")
    read_notes = []
    names, points, line_nos, skipped = read_face_landmarks(landmarks_file, extension=extension, several=several,
                                                           notes=read_notes)
    for note in read_notes:
        print(f"note: {note}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} line(s) before the first face of {landmarks_file} (a count or a header): "
              f"{', '.join(repr(text[:40]) for _, text in skipped[:2])}{', ...' if len(skipped) > 2 else ''}",
              file=sys.stderr)
    for note in landmark_notes(points, line_nos):
        print(f"warning: {landmarks_file}: {note}", file=sys.stderr)
    unusable = np.flatnonzero(unusable_landmarks(points))
    if unusable.size:
        raise ValueError(f"{landmarks_file}: line {line_nos[unusable[0]]}: the 5 landmarks of {names[unusable[0]]} "
                         f"coincide" + (f" ({unusable.size} such lines)" if unusable.size > 1 else ""))
    missing = [i for i, name in enumerate(names) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        first = missing[0]
        raise FileNotFoundError(f"{landmarks_file}: line {line_nos[first]}: {os.path.join(folder, names[first])}: no "
                                "such file" + (f" ({len(missing)} such lines)" if len(missing) > 1 else ""))
    return ListedFaces(names, points, line_nos)


def embed_listed_faces(model: torch.nn.Module, folder: str, landmarks_file: str, image_size: int, *,
                       extension: str | None = None, several: bool = False, device="cpu", batch_size: int = 64,
                       workers: int = 0, norms: list | None = None, aligned_from: list | None = None,
                       listed: ListedFaces | None = None) -> tuple[list[str], np.ndarray]:
    """(names as listed, (N, D) float32 unit-length embeddings) of the faces of ``landmarks_file``
    (see ``train.tools.align``), each aligned from its landmarks in its image under ``folder``
    (``several``: an image may be listed again, and its k-th face listed is named ``<name>#<k>``).
    ``aligned_from`` (a list) gets each face's (image path, (5, 2) landmarks), to align it again.
    ``listed``: the file as :func:`listed_faces` read it already (a tool that checks it before other slow
    work), not read again. Raises :func:`listed_faces`' errors before any embedding; ValueError naming the
    line of the first face whose image cannot be read or whose landmarks lie off it, when it is reached."""
    from .tools.align import face_numbers

    names, points, line_nos = listed or listed_faces(folder, landmarks_file, extension=extension, several=several)
    embeddings = embed_faces(model, folder, names, points, image_size, device=device, batch_size=batch_size,
                             workers=workers, sources=[f"{landmarks_file}: line {n}" for n in line_nos], norms=norms)
    if aligned_from is not None:
        aligned_from.extend((os.path.join(folder, name), face) for name, face in zip(names, points))
    if several:
        names = [f"{name}#{number}" for name, number in zip(names, face_numbers(names))]
    return names, embeddings


def embed_faces(model: torch.nn.Module, folder: str, names: list[str], points: np.ndarray, image_size: int, *,
                device="cpu", batch_size: int = 64, workers: int = 0, sources: list[str] | None = None,
                norms: list | None = None) -> np.ndarray:
    """(N, D) float32 unit-length embeddings of face i of image ``names[i]`` under ``folder``, aligned
    from its (5, 2) landmarks ``points[i]`` as ``train.tools.align`` aligns it. ValueError naming the
    first face whose image cannot be read or whose landmarks lie off it (``sources[i]`` first)."""
    from .ijb import LooseCrops

    faces = LooseCrops(folder, names, points, image_size, check_bounds=True, sources=sources)
    features = embed_images(model.to(device), faces, device=device, batch_size=batch_size, workers=workers,
                            log=lambda message: print(message, file=sys.stderr, flush=True), norms=norms,
                            workers_leave_signals=True)
    return torch.nn.functional.normalize(torch.from_numpy(features), dim=1).numpy()


def open_detector(path: str, device="cpu"):
    """The SCRFD face detector at ``path`` (a tool's ``--detector``), as ``train.tools.detect`` runs it:
    opened before any photo is read, so that a wrong path is said first. FileNotFoundError or ValueError
    naming --detector where it is not there, or not a face detector with keypoints."""
    from .tools.detect import FaceDetector

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--detector {path}: " + ("a folder, not" if os.path.isdir(path) else
                                                          f"no such file{checkpoint.dangling(path)}: give") +
                                " an SCRFD face detector's ONNX file (insightface's det_10g.onnx)")
    try:
        return FaceDetector(path, device=str(device))
    except ValueError as error:  # (its messages, and onnxruntime's through it, begin with the file's path)
        raise ValueError(f"--detector {error}") from None


def detect_faces(detector, paths: list[str], *, all_faces: bool = False, device="cpu", workers: int = 0,
                 show_progress: bool = True, scores: list | None = None
                 ) -> tuple[list[int], np.ndarray, list[int], list[str]]:
    """The faces ``train.tools.detect`` finds in ``paths`` with the SCRFD ``detector`` (one
    :func:`open_detector` opened, or its path): (each face's photo, as an index into ``paths``;
    (F, 5, 2) landmarks; each face's number among its photo's faces, from 1; why each photo without a
    face has none). ``scores`` (a list) gets each face's detection score."""
    from .tools.detect import detect_photos, progress

    if isinstance(detector, (str, os.PathLike)):
        detector = open_detector(os.fspath(detector), device)
    photos, points, numbers, failures = [], [], [], []
    bar = progress(len(paths), "detect") if show_progress else None
    for index, found, landmarks, why in detect_photos(detector, paths, all_faces=all_faces, workers=workers):
        if why:
            failures.append(f"{paths[index]}: {why}")
        else:
            photos += [index] * len(landmarks)
            points += list(landmarks)
            numbers += range(1, len(landmarks) + 1)
            if scores is not None:
                scores.extend(found.tolist())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return photos, np.array(points, dtype=np.float64).reshape(-1, 5, 2), numbers, failures


def embed_detected(model: torch.nn.Module, detector, paths: list[str], names: list[str], image_size: int, *,
                   failures: list[str], where: str, all_faces: bool = False, device="cpu", batch_size: int = 64,
                   workers: int = 0, norms: list | None = None, scores: list | None = None,
                   aligned_from: list | None = None) -> tuple[list[str], np.ndarray]:
    """(the faces' names, (F, D) float32 unit-length embeddings) of the photos at ``paths`` (``names``: their
    names in a table): the faces :func:`detect_faces` finds with ``detector`` (:func:`open_detector`'s), each
    aligned and embedded as :func:`embed_faces` does; each photo's main face, named as its photo, or with
    ``all_faces`` every face, ``<name>#<k>`` (k from 1, best detection first). A photo without a face, or
    that cannot be read, is left out, said in ``failures``, whose every entry is then warned of. ``norms``
    and ``scores`` (lists) get each face's feature norm (arrays, a batch each) and detection score;
    ``aligned_from`` (a list) each face's (photo path, (5, 2) landmarks), to align it again.
    ValueError naming --detector where no photo has a face (``where`` says which photos: "under
    photos/")."""
    photos, points, numbers, found = detect_faces(detector, paths, all_faces=all_faces, device=device,
                                                  workers=workers, scores=scores)
    failures += found
    _warn_left_out(failures)
    if not photos:
        raise ValueError(f"--detector {detector.path} found no face in the {len(paths)} photo(s) {where}")
    embeddings = embed_faces(model, "", [paths[i] for i in photos], points, image_size, device=device,
                             batch_size=batch_size, workers=workers, norms=norms)
    if aligned_from is not None:
        aligned_from.extend((paths[i], face) for i, face in zip(photos, points))
    return [names[i] + (f"#{number}" if all_faces else "") for i, number in zip(photos, numbers)], embeddings


def embed_folder(model: torch.nn.Module, folder: str, paths: list[str], names: list[str], image_size: int, *,
                 failures: list[str], detector=None, all_faces: bool = False, device="cpu",
                 batch_size: int = 64, workers: int = 0, norms: list | None = None, scores: list | None = None,
                 aligned_from: list | None = None) -> tuple[list[str], np.ndarray]:
    """(names, (F, D) float32 unit-length embeddings) of the faces of ``folder``'s images at ``paths``, named
    ``names`` (:func:`folder_images`' lists): each image an aligned face, as :func:`embed_readable` embeds
    it, or with ``detector`` (:func:`open_detector`'s) a photo, whose faces :func:`embed_detected` finds
    (``all_faces``: every face).
    An image left out (unreadable, without a face) has no row, and is said in ``failures`` and warned of.
    ``norms`` (a list) gets the rows' feature norms, ``scores`` and ``aligned_from`` (with ``detector``) their
    detection scores and (photo path, landmarks).
    ValueError naming --images where no image can be read, --detector where no photo has a face."""
    if detector:
        return embed_detected(model, detector, paths, names, image_size, failures=failures, where=f"under {folder}",
                              all_faces=all_faces, device=device, batch_size=batch_size, workers=workers,
                              norms=norms, scores=scores, aligned_from=aligned_from)
    every = [] if norms is not None else None
    embeddings, readable = embed_readable(model, folder, paths, image_size, failures=failures, device=device,
                                          batch_size=batch_size, workers=workers, norms=every)
    if norms is not None:
        norms.append(np.concatenate(every)[readable])
    return [name for name, ok in zip(names, readable) if ok], embeddings[readable]


IMAGES_AS_THEY_ARE = "the images as they are"


def faces_described(landmarks: str | None = None, detector: str | None = None, all_faces: bool = False) -> str:
    """What a table's rows are faces of (its provenance's ``faces``): the images as they are, faces aligned
    from a landmarks file's, or faces a detector found (``all_faces``: every face of a photo, rows ``<photo>#<k>``,
    which cluster keeps apart and quality's --tree refuses; with ``landmarks`` too, where a photo's faces are its
    lines)."""
    every = ", every face" if all_faces else ""
    if landmarks:
        return f"aligned from the landmarks in {os.path.abspath(landmarks)}{every}"
    if detector:
        return f"found and aligned by {os.path.abspath(detector)}{every}"
    return IMAGES_AS_THEY_ARE


def faces_are_files(faces: str | None) -> bool:
    """Whether the rows a provenance's ``faces`` (:func:`faces_described`) describes each name an image file
    to lay out in a tree: the images as they are, or photos whose main face a detector found. (The faces a
    landmarks file lists may be several of a photo, or lie anywhere in it.)"""
    return faces == IMAGES_AS_THEY_ARE or (isinstance(faces, str) and faces.startswith("found and aligned by ")
                                           and not faces.endswith(", every face"))


def faces_of_photos(faces: str | None, names: list[str]) -> bool:
    """Whether a table's rows, named ``names``, are every face of photos (``<photo>#<k>``), as its provenance's
    ``faces`` (:func:`faces_described`) says; or, of a table of faces aligned from a landmarks file written
    before that said ", every face", as its names say: a landmarks file names image files, so rows that all
    end in ``#<k>`` are the faces of several lines of one image, which only --all-faces takes."""
    if not isinstance(faces, str):
        return False
    if faces.endswith(", every face"):
        return True
    return faces.startswith("aligned from the landmarks in ") and bool(names) and all(
        re.search(r"#[1-9][0-9]*$", name) for name in names)


def cosine_threshold(settings: dict, requested: float | None) -> tuple[float, str]:
    """The same/different threshold on cosine similarity and where it came from. Verification
    picks a threshold t on the squared distance of unit vectors, which is 2 - 2·cos."""
    if requested is not None:
        return requested, "--threshold"
    if "threshold" in settings:
        return 1.0 - settings["threshold"] / 2.0, "the model's last verification"
    return DEFAULT_COSINE_THRESHOLD, "the default"


def model_threshold(model_path: str | None, settings: dict, requested: float | None, *, tool: str,
                    decides: bool = True) -> tuple[float, str, str | None]:
    """:func:`cosine_threshold` for a tool that decides with it (``cluster``, ``search``), where it came
    from said with the file that recorded it, and the note for stderr (``tool: note: ...``,
    :func:`default_threshold_note`) when no model gives one and the default is taken, or
    :func:`checkpoint.cut_short_note` when the model's is of a final verification cut short, else None: the tool
    says it once its own refusals are past (said here, it came before them). ValueError when the model's
    own decides nothing (:func:`meaningless_threshold`); not for a tool that only reports what it gives
    (``decides=False``: roc, which measures its own)."""
    threshold, source = cosine_threshold(settings, requested)
    note = None
    if source == "the model's last verification":
        # (An export's, an int8 graph's too: the verification of the run's model, in backbone.json beside it.)
        sidecar = checkpoint.settings_path(model_path)
        source = f"{model_path}'s last verification" + (f" (recorded in {sidecar})" if os.path.isfile(sidecar) else "")
        why = meaningless_threshold(model_path, threshold)
        if why and decides:
            raise ValueError(f"{why}: give --threshold")
        note = checkpoint.cut_short_note(model_path, settings, tool)
    elif source == "the default":
        note = default_threshold_note(model_path, threshold, tool)
    return threshold, source, note


def meaningless_threshold(model_path: str, threshold: float) -> str | None:
    """Why the cosine ``threshold`` that ``model_path``'s last verification recorded decides nothing, or None.
    At 1 (squared distance 0, verification's first threshold) it is what verification keeps where no
    threshold did better than calling every pair different: a model at chance, whose embeddings may all
    coincide (then two faces' cosine rounds to 1 and they are called one person). At 0 or below it takes
    faces that are not alike at all for one person."""
    if threshold >= 1:
        return (f"{model_path}'s last verification threshold is cosine {threshold:.4f}: verification found no "
                "threshold better than calling every pair different (a model at chance?)")
    if threshold <= 0:
        return (f"{model_path}'s last verification threshold is cosine {threshold:.4f}, which takes faces that "
                "are not alike at all for one person (a model barely trained?)")
    return None


def default_threshold_note(model_path: str | None, threshold: float, tool: str) -> str:
    """The note (``tool: note: ...``, for stderr) that ``threshold``, the default, was measured on no faces:
    no model at ``model_path``, or none that records a verification."""
    return (f"{tool}: note: {'no model' if not model_path else model_path + ' records no verification that'} gives "
            f"the threshold: cosine {threshold} is taken, a starting point, not a measured threshold (give "
            "--threshold: python -m train.tools.roc measures the one of a false accept rate on your own labelled "
            "faces; a trained model's checkpoint, or train.export's backbone.json, records one)")


def model_digest(path: str) -> str:
    """The SHA-256 of the model file at ``path``, which a table's provenance records: what tells the
    model that made a table from another one at the same path (a run that trained on). About a second
    a gigabyte."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_weights_digest(model: torch.nn.Module) -> str | None:
    """The SHA-256 of a loaded PyTorch backbone's weights (``distill.weights_digest``: each entry's name,
    dtype, shape and bytes, in order), which a run's checkpoint.pt and its ``train.export`` backbone.pt
    share; None for an ONNX model, whose identity is its file. 0.11 s for an r50, 0.16 s for an r100 (on 2
    CPU cores)."""
    from .distill import weights_digest
    from .onnx_backbone import OnnxBackbone

    return None if isinstance(model, OnnxBackbone) else weights_digest(model)


def model_digests(path: str, model: torch.nn.Module) -> dict:
    """What a table's provenance records of the model at ``path``, loaded as ``model``, that made it: the
    SHA-256 of its file (``model_sha256``) and, for a PyTorch backbone, of its weights
    (``model_weights_sha256``: :func:`backbone_weights_digest`)."""
    weights = backbone_weights_digest(model)
    return {"model_sha256": model_digest(path), **({"model_weights_sha256": weights} if weights else {})}


def made_with(about: dict, path: str, model: torch.nn.Module, known: dict) -> tuple[bool, str] | None:
    """Whether the table whose provenance is ``about`` was made with the model at ``path`` (loaded as
    ``model``), and what told: ``"weights"`` where ``about`` records their digest and the model has
    weights (a checkpoint and its export are one model), else ``"file"``; None where ``about`` records
    no digest (a table of older versions). ``known`` keeps the digests computed, for the next table."""
    recorded = about.get("model_weights_sha256")
    if recorded:
        if "weights" not in known:
            known["weights"] = backbone_weights_digest(model)
        if known["weights"]:
            return known["weights"] == recorded, "weights"
    recorded = about.get("model_sha256")
    if not recorded:
        return None
    if "file" not in known:
        known["file"] = model_digest(path)
    return known["file"] == recorded, "file"


def made_with_one_model(first: dict, second: dict) -> bool | None:
    """Whether two tables' provenances (``about``) record one model: the digests of its weights where
    both record them, else of its file; None where they do not both record one."""
    for key in ("model_weights_sha256", "model_sha256"):
        if first.get(key) and second.get(key):
            return first[key] == second[key]
    return None


MODEL_HELP = ("a training checkpoint, backbone.pt from python -m train.export, insightface's backbone.pth or "
              "arcface_torch's checkpoint_gpu_<rank>.pt, or an ONNX model (.onnx: insightface's released ones, or "
              "train.export's; needs onnxruntime)")


def add_benchmark_options(p: argparse.ArgumentParser, *, features_help: str, workers_help: str,
                          flip_help: str) -> None:
    """The options of the benchmarks that embed a release's images (``train.ijb``, ``train.tinyface``):
    --model or --features, --batch-size, --workers, --device, --flip, --amp, --save-features, --overwrite."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=path_arg, help=MODEL_HELP)
    source.add_argument("--features", type=path_arg, metavar="PATH", help=features_help)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="images per forward pass (twice as many rows with the mirror; default: 128)")
    p.add_argument("--workers", type=int, default=None,
                   help=workers_help + " (0: in this process; default: one a core this process may use, up to 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs: cpu, cuda, cuda:1, mps, xpu, ... (default: cuda when torch sees a "
                   "CUDA GPU, else cpu)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help=flip_help)
    add_amp_option(p)
    p.add_argument("--save-features", type=path_arg, metavar="PATH", default=None,
                   help="also save the image features: .npy (+ .txt listing the images in row order) or .csv")


def run_stoppable(main, argv: list[str] | None, tool: str) -> int:
    """A benchmark's ``main(argv)`` under :func:`stop_on_signals`: Ctrl-C and SIGTERM give one line and
    exit 130 / 143 (its decoding workers leave them to this process); an operator torch lacks on mps or
    xpu one line and exit 2. ``tool``: the benchmark's short name, which its lines begin with."""
    from .tools import say

    # (no errors of its own: a benchmark says its own, and carries on past some)
    return run_tool(lambda: main(argv), tool=tool, errors=(), whole=": the files written before it are whole",
                    out=say)


def report_unreadable(unreadable: list[tuple[int, str]], folder: str, tool: str, shown: int = 10) -> None:
    """The images of a benchmark's release that did not decode (``embed_images``' ``unreadable``), all
    counted and the first ``shown`` named, after the embedding: one round of fixes, not one a file; the
    lines begin with ``tool``, the benchmark's short name."""
    from .tools import say

    for _, why in unreadable[:shown]:
        say(f"{tool}: error: {why}", file=sys.stderr)
    say(f"{tool}: error: {len(unreadable)} image(s) of {folder} cannot be read"
        + (f" (the first {shown} above)" if len(unreadable) > shown else "") + ": nothing scored", file=sys.stderr)


def check_benchmark_options(p: argparse.ArgumentParser, args: argparse.Namespace, written: list[str],
                            flags: str) -> str | None:
    """argparse errors for what ``add_benchmark_options``' options cannot mean together, and for
    output files (``written``, given by ``flags``) that coincide; the defaults of --flip (on), --batch-size
    and --workers set. Returns the note on options that --features leaves unused (or None), for the
    benchmark to say once nothing refuses the run: a refused call says its error alone."""
    # (taken without a word; a note, not an error: one command line may run with --model, then with --features)
    unused = [flag for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers))
              if value is not None and args.features]
    note = (f"note: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used with --features, which "
            "are scored as they are, without embedding") if unused else None
    args.batch_size = 128 if args.batch_size is None else args.batch_size
    args.workers = min(8, usable_cpus()) if args.workers is None else args.workers
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be at least 1 and --workers at least 0")
    if args.features and args.save_features:
        p.error("--save-features with --features: the features are already saved")
    if args.features and args.flip is not None:
        p.error("--flip/--no-flip with --features: the features are as they were embedded")
    if args.features and args.amp is not None:
        p.error("--amp with --features: the features are as they were embedded")
    args.flip = True if args.flip is None else args.flip
    if len({os.path.realpath(path) for path in written}) < len(written):
        p.error(f"{flags} must be different files, got {', '.join(written)}")
    return note


def benchmark_inputs(args: argparse.Namespace) -> tuple[str, ...]:
    """The files a benchmark run reads (its model and the settings beside it, or its features table), which
    no output may replace."""
    return ((args.model, checkpoint.settings_path(args.model)) if args.model
            else tuple(table_files(args.features, about=True)))


def table_files(path: str, *, about: bool = False) -> list[str]:
    """The files :func:`write_table` writes for ``path``: the ``.csv``; or the ``.npy`` (added to a
    path without it, as ``np.save`` adds it) and the ``.txt`` beside it listing the images; with
    ``about``, then the table's provenance (:func:`about_path`)."""
    if path.endswith(".csv"):
        files = [path]
    else:
        if not path.endswith(".npy"):
            path += ".npy"
        files = [path, os.path.splitext(path)[0] + ".txt"]
    return files + [about_path(files[0])] if about else files


def check_table_output(flag: str, path: str) -> None:
    """ValueError when ``path``, a table to write (``flag``'s), is a folder: :func:`table_files` takes
    ``<folder>.npy`` beside it for it, or a hidden ``.npy`` in it for ``<folder>/``, written without a word."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: name a .npy or .csv file")


def about_path(path: str) -> str:
    """Where the provenance of the table at ``path`` (its ``.npy`` or ``.csv``) is: that file's name
    with ``.json`` appended (``e.npy.json``), a name no other output of the tools takes."""
    return path + ".json"


def write_table(path: str, names: list[str], embeddings: np.ndarray, about: dict | None = None) -> list[str]:
    """``.npy`` (plus ``.txt`` listing the images in row order) or ``.csv`` (name, values), each
    written atomically, and what ``about`` says of them (the model, the mirror, ...; the rows' and
    values' counts and the time are added) as JSON at :func:`about_path`; returns the files written
    (:func:`table_files`). Without ``about``, an earlier table's provenance there is removed: it
    would describe other features."""
    # (renamed into place together: a full disk as the names or the provenance are written leaves the table of
    # before whole, where it left new values beside the names, or the provenance, of another table)
    with checkpoint.written_together() as together:
        written = _table_into(together, path, names, embeddings, about)
    if about is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(about_path(written[0]))
    return written


def _table_into(together: checkpoint.FilesTogether, path: str, names: list[str], embeddings: np.ndarray,
                about: dict | None) -> list[str]:
    """:func:`write_table`'s files written into ``together`` (the provenance's digest of their temporaries)."""
    files = table_files(path)
    if path.endswith(".csv"):
        together.write(path, _csv_writer([f"e{j}" for j in range(embeddings.shape[1])], names, embeddings),
                       binary=False)
    else:
        array_path, index_path = files
        together.write(array_path, lambda f: np.save(f, embeddings))
        together.write(index_path, lambda f: f.writelines(name + "\n" for name in names), binary=False)
    if about is None:
        return files
    provenance = about_path(files[0])
    together.write_json(provenance, {**about, "rows": int(embeddings.shape[0]), "values": int(embeddings.shape[1]),
                                     "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "sha256": _digest(together.temporaries())})
    return files + [provenance]


def _digest(files: list[str]) -> str:
    """The SHA-256 of the table's files (the values, then the names), in :func:`table_files`' order: what
    tells a table's own provenance from one left beside a table that other code rewrote with the same
    counts. A pass over the files, about a second a gigabyte."""
    digest = hashlib.sha256()
    for file in files:
        one = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                one.update(block)
        digest.update(one.digest())
    return digest.hexdigest()


def read_about(path: str, embeddings: np.ndarray) -> dict | None:
    """The provenance :func:`write_table` wrote beside the table at ``path`` whose values are
    ``embeddings``; None when there is none (a table of older versions, or made by other code), or
    when it does not describe this table (other counts of rows or values, or other contents than the
    digest it records: the table was replaced or edited by other code), which a note on stderr then
    says."""
    from .tools import say

    provenance = about_path(table_files(path)[0])
    try:
        with open(provenance, encoding="utf-8") as f:
            about = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        say(f"note: {provenance} is not readable as this table's provenance ({error}); left aside", file=sys.stderr)
        return None
    if not isinstance(about, dict) or (about.get("rows"), about.get("values")) != tuple(embeddings.shape):
        say(f"note: {provenance} describes another table than {path} (other counts of rows or values); left aside",
            file=sys.stderr)
        return None
    # Provenance of versions before the digest has only the counts to go by.
    if "sha256" in about and about["sha256"] != _digest(table_files(path)):
        say(f"note: {provenance} describes another table than {path} (its files changed since it was written); "
            "left aside", file=sys.stderr)
        return None
    return about


def describe_about(about: dict | None) -> str:
    """A few words on where a table's features came from, for a run's first line: '' without provenance."""
    if not about:
        return ""
    said = [f"model {about['model']}"] if about.get("model") else []
    if about.get("flip") is not None:
        said.append("with the mirror" if about["flip"] else "without the mirror")
    if about.get("image_size"):
        said.append(f"{about['image_size']}px")
    return f" ({', '.join(said)})" if said else ""


def _csv_writer(columns: list[str], names: list[str], rows: np.ndarray) -> Callable[[IO], None]:
    """The writer of ``image,<columns>`` then a row an image (its name, quoted where it needs it, and 7 significant
    digits a value): a table's .csv, or --norms' ``image,norm``."""
    def write_csv(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", *columns])
        writer.writerows([name, *(f"{v:.7g}" for v in row)] for name, row in zip(names, rows))
    return write_csv


def read_table(path: str) -> tuple[list[str], np.ndarray]:
    """What :func:`write_table` wrote at ``path``: (image names, (N, D) float32 embeddings). Raises
    FileNotFoundError or ValueError naming the file (and the line or row) at fault: a table that is
    not one, values that are not finite, or an image named twice."""
    tables = "a .npy (with the .txt beside it) or a .csv, as --save-features and train.embed write them"
    if os.path.isdir(path):  # (it said "no file at <path>.npy", or "<path>/.npy", a file nobody named)
        raise ValueError(f"{path} is a folder, not a table: {tables}")
    if os.path.isfile(path) and not path.endswith((".csv", ".npy")):
        # (a table path without .npy is the name np.save was given: its .npy is looked for, below)
        raise ValueError(f"{path}: not a feature table: {tables}")
    files = table_files(path)
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no file at {file}")
    try:
        names, embeddings = _read_csv_table(path) if path.endswith(".csv") else _read_npy_table(*files)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text: {error.reason}") from None
    if embeddings.shape[1] == 0:
        raise ValueError(f"{path}: the table holds no values")
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad.size:
        raise ValueError(f"{path}: the embedding of {names[bad[0]]} (row {bad[0] + 1}) is not finite "
                         f"({bad.size} rows are not)")
    seen = {}
    for row, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{path}: {name} is listed twice (rows {seen[name] + 1} and {row + 1})")
        seen[name] = row
    return names, embeddings


def _read_csv_table(path: str) -> tuple[list[str], np.ndarray]:
    names, rows = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header or header[0] != "image" or len(header) < 2:
                raise ValueError(f"{path}: line 1: expected the header 'image,e0,e1,...' of train.embed's tables")
            for row in reader:
                if not row:
                    continue
                try:
                    values = [float(v) for v in row[1:]]
                except ValueError:
                    values = []
                if len(values) != len(header) - 1:
                    raise ValueError(f"{path}: line {reader.line_num}: expected an image name and "
                                     f"{len(header) - 1} numbers")
                names.append(row[0])
                rows.append(values)
        except csv.Error as error:  # a field past csv's size limit, ...
            raise ValueError(f"{path}: line {reader.line_num}: not readable as CSV: {error}") from None
    with np.errstate(over="ignore"):  # a value past float32's range: reported as not finite
        return names, np.asarray(rows, dtype=np.float32).reshape(len(rows), len(header) - 1)


def _read_npy_table(array_path: str, index_path: str) -> tuple[list[str], np.ndarray]:
    try:
        embeddings = np.load(array_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = "it holds Python objects" if "allow_pickle" in str(error) else str(error) or type(error).__name__
        raise ValueError(f"{array_path}: not a .npy array of numbers ({reason})") from None
    if not isinstance(embeddings, np.ndarray):  # an .npz archive
        raise ValueError(f"{array_path}: not a .npy array (an .npz archive?)")
    if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"{array_path}: expected a 2-D float array, got {embeddings.dtype} {embeddings.shape}")
    with open(index_path, encoding="utf-8-sig") as f:
        # (a line a name, as write_table wrote them: not str.splitlines, which also breaks a name at the form
        # feeds, U+0085 and U+2028 that listable_name lets into a table)
        names = f.read().split("\n")
    while names and not names[-1]:  # a blank last line (an editor's)
        names.pop()
    if len(names) != embeddings.shape[0]:
        raise ValueError(f"{index_path} lists {len(names)} images, {array_path} holds {embeddings.shape[0]} rows")
    return names, embeddings


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.embed", name="embed", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=path_arg, required=True,
                   help="a training checkpoint, backbone.pt from python -m train.export, insightface's backbone.pth "
                   "or arcface_torch's checkpoint_gpu_<rank>.pt, or an ONNX model (.onnx: insightface's released "
                   "ones, or train.export's; needs onnxruntime)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", type=path_arg, metavar="DIR", help="embed every image under this folder")
    what.add_argument("--compare", type=path_arg, nargs=2, metavar=("IMAGE1", "IMAGE2"), help="compare two face images")
    p.add_argument("--landmarks", type=path_arg, metavar="FILE", default=None,
                   help="with --images: embed the faces this file lists (image path relative to --images, then "
                   "x1 y1 ... x5 y5), each aligned from its 5 landmarks, instead of every image as it is")
    p.add_argument("--extension", default=None, help="appended to every image path of --landmarks")
    p.add_argument("--detector", type=path_arg, metavar="FILE", default=None,
                   help="find the faces in the photos with this SCRFD face detector (an ONNX file with keypoints: "
                   "insightface's det_10g.onnx; needs onnxruntime), as python -m train.tools.detect finds them, and "
                   "embed each photo's main face aligned (with --all-faces, every face); with --compare, each "
                   "photo's main face")
    p.add_argument("--all-faces", action="store_true",
                   help="with --landmarks: an image listed on several lines is several faces (a group photo's, as "
                   "python -m train.tools.detect --all-faces lists them); with --detector: every face found. Rows "
                   "named <image>#<k>, k from 1 (as listed; best detection first)")
    p.add_argument("--output", type=path_arg, default=None,
                   help="with --images: .npy (+ .txt listing the images) or .csv (default: embeddings.npy); an "
                   "existing file is kept unless --overwrite is given")
    p.add_argument("--norms", type=path_arg, metavar="FILE", default=None,
                   help="with --images: also write each face's feature norm (the mean over the image and its mirror "
                   "of the embedding's length before normalisation; MagFace's quality score, and AdaFace's proxy of "
                   "it) to this CSV file (.csv), image,norm in the rows' order; kept unless --overwrite is given")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine similarity at or above which two faces are the same person; default: from the "
                   f"model's last verification, else {DEFAULT_COSINE_THRESHOLD} (python -m train.tools.roc measures "
                   "the threshold of a false accept rate on your own labelled faces)")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu, cuda, cuda:1, mps, xpu, ... (default: cpu)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
                   help="images per forward pass (twice as many rows with the mirror; default: 64)")
    p.add_argument("--workers", type=int, default=min(8, usable_cpus()),
                   help="DataLoader processes decoding images (0: in this process; default: one a core this process "
                   "may use, up to 8)")
    add_amp_option(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output (and the .txt beside a .npy) when they exist; without it they are kept")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.workers < 0:
        p.error("--workers must be at least 0")
    if args.norms and not args.images:
        p.error("--norms goes with --images (--compare prints the two norms)")
    # (each was taken without a word: --compare wrote no --output, --images made no decision at --threshold)
    if args.output is not None and not args.images:
        p.error("--output goes with --images (--compare prints its result)")
    if args.threshold is not None and not args.compare:
        p.error("--threshold goes with --compare (--images writes the embeddings, and decides nothing)")
    if args.threshold is not None and not -1 <= args.threshold <= 1:
        p.error(f"--threshold is a cosine similarity, from -1 to 1: got {args.threshold}")
    args.output = args.output or "embeddings.npy"
    try:  # (a folder was written as <folder>.npy beside it)
        check_table_output("--output", args.output)
    except ValueError as error:
        p.error(str(error))
    table = table_files(args.output, about=True)
    if args.norms and os.path.realpath(args.norms) in {os.path.realpath(f) for f in table}:
        p.error(f"--norms and --output must be different files, got {args.norms}")
    if args.landmarks and not args.images:
        p.error("--landmarks goes with --images (the faces it lists are found under that folder)")
    if args.extension and not args.landmarks:
        p.error("--extension goes with --landmarks")
    if args.detector and args.landmarks:
        p.error("--detector and --landmarks are two ways to find the faces in the photos: give one")
    if args.all_faces and not (args.landmarks or (args.detector and args.images)):
        p.error("--all-faces goes with --images and --landmarks or --detector")
    # Ctrl-C and SIGTERM unwind (the detector's loader workers leave them to this process, and end when it
    # shuts them down); the outputs are written whole or not at all.
    return run_tool(lambda: run(args), tool="embed")


def run(args: argparse.Namespace) -> int:
    """``main`` after parsing; raises OSError or ValueError naming the argument or file at fault.
    What can be checked without embedding (the device, the output files) is checked first."""
    device = torch_device(args.device)
    model, settings = load_model(args.model, device, args.amp)
    set_amp(model, args.amp, args.model, device=device)
    if args.norms and settings.get("unit_length"):
        raise ValueError(f"--norms: {args.model} gives embeddings of unit length (its graph normalises them), so every "
                         "norm would be 1; the backbone's own output has them (train.export's backbone.onnx or "
                         "backbone.pt)")
    if args.images:  # (was "no images (.jpg, ...) under <it>")
        check_images_folder(args.images)
    detector = open_detector(args.detector, device) if args.detector else None
    if args.images:
        check_outputs(table_files(args.output, about=True) + ([args.norms] if args.norms else []), args.overwrite,
                      inputs=(args.model, checkpoint.settings_path(args.model), args.landmarks, args.detector),
                      image_folders=(args.images,))
    if args.norms and not args.norms.endswith(".csv"):
        # (after check_outputs, whose words are the more telling for the model or an image named here)
        raise ValueError(f"--norms {args.norms}: the norms are a CSV table, image,norm: name a .csv file (as "
                         "train.tools.quality --embeddings reads them)")
    size = settings["image_size"]
    digests = model_digests(args.model, model) if args.images else {}  # (what the table's .json records)
    norms = []
    if args.compare:
        for path in args.compare:
            if os.path.isdir(path):  # (was "no image at <it>", the folder in plain sight)
                raise ValueError(f"--compare {path} is a folder, not an image: name two image files")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no image at {path}{checkpoint.dangling(path)}")
        if args.detector:
            photos, points, _, failures = detect_faces(detector, list(args.compare), device=device,
                                                       show_progress=False)
            if failures:
                raise ValueError(f"{failures[0]} (--detector {args.detector})")
            first, second = embed_faces(model, "", list(args.compare), points, size, device=device, norms=norms)
        else:
            _warn_if_not_aligned(list(args.compare))
            first, second = embed_files(model, list(args.compare), size, device=device, norms=norms)
        similarity = float(np.dot(first, second))
        threshold, source = cosine_threshold(settings, args.threshold)
        if source == "the default":  # (a note on stderr, as cluster and search give: no verification chose it)
            print(default_threshold_note(args.model, threshold, "embed"), file=sys.stderr)
        cut_short = checkpoint.cut_short_note(args.model, settings, "embed") if source == "the model's last " \
            "verification" else None
        if cut_short:  # (its threshold of an earlier step's verification, or of some sets: as cluster and search say)
            print(cut_short, file=sys.stderr)
        why = meaningless_threshold(args.model, threshold) if source == "the model's last verification" else None
        if why:  # (cluster and search refuse it; here the cosine is still worth printing, the verdict is not)
            print(f"embed: note: {why}: a verdict at it means nothing (give --threshold: python -m "
                  "train.tools.roc measures the one of a false accept rate on your own labelled faces)",
                  file=sys.stderr)
        verdict = "same person" if similarity >= threshold else "different people"
        first_norm, second_norm = np.concatenate(norms)
        print(f"cosine similarity {similarity:.4f}: {verdict} (threshold {threshold:.4f}, from {source})"
              + ("" if settings.get("unit_length") else f"; feature norms {first_norm:.2f} and {second_norm:.2f}"))
        return 0

    failures = []
    if args.landmarks:
        names, embeddings = embed_listed_faces(model, args.images, args.landmarks, size, extension=args.extension,
                                               several=args.all_faces, device=device, batch_size=args.batch_size,
                                               workers=args.workers, norms=norms)
    else:
        paths = images_under(args.images)  # (was "no images (...) under <it>", naming no option)
        # A name that cannot be a row of the table (or a line of the .npy's index) is left out, as a photo
        # without a face is, rather than failing the run after the embedding.
        listable = [listable_name(os.path.relpath(path, args.images)) for path in paths]
        failures = [f"{path!r}: its name is not UTF-8 text without line breaks, which a row of the table must be"
                    for path, ok in zip(paths, listable) if not ok]
        paths = [path for path, ok in zip(paths, listable) if ok]
        if failures and not paths:
            raise ValueError(failures[0])
        names = [os.path.relpath(path, args.images) for path in paths]
        if args.detector:
            names, embeddings = embed_detected(model, detector, paths, names, size, failures=failures,
                                               where=f"under {args.images}", all_faces=args.all_faces, device=device,
                                               batch_size=args.batch_size, workers=args.workers, norms=norms)
        else:
            _warn_if_not_aligned(paths[:1])
            _warn_left_out(failures)
            not_square = []
            embeddings = embed_files(model, paths, size, device=device, batch_size=args.batch_size,
                                     workers=args.workers, norms=norms, not_square=not_square)
            _warn_others_not_square(paths, not_square)
    about = {"made_by": "train.embed", "model": os.path.abspath(args.model), **digests, "image_size": size,
             "flip": True, "amp": getattr(model, "amp", "none"), "normalised": True,
             "images": os.path.abspath(args.images), "faces": faces_described(args.landmarks, args.detector,
                                                                               args.all_faces)}
    if args.norms:  # (where train.tools.quality finds the rows' norms: the table's rows are of unit length)
        about["norms"] = os.path.abspath(args.norms)
    # The table and the norms its .json names, renamed together: a full disk as the norms were written, last, left
    # a new table beside the norms of the one before, which quality then read as this model's.
    with signals_held(), checkpoint.written_together() as together:  # (a stop does not come between them either)
        written = _table_into(together, args.output, names, embeddings, about)
        if args.norms:
            together.write(args.norms, _csv_writer(["norm"], names, np.concatenate(norms)[:, None]), binary=False)
            written.append(args.norms)
    faces = args.landmarks or args.detector
    print(f"embedded {len(names)} {'faces' if faces else 'images'} ({embeddings.shape[1]}-D, {size}px): "
          f"{', '.join(written)}{left_out_said((len(failures), 'photo' if faces else 'image'))}")
    return 1 if failures else 0


def _warn_if_not_aligned(paths: list[str]) -> None:
    """A warning for each of ``paths`` (a folder's first image, or the two compared) that is not square:
    not an aligned face crop, which ``--images``/``--compare`` take, but a photo, which would be
    squeezed into one (the faces in photos: --detector or --landmarks)."""
    from .data.imagefolder import header_size

    for path in paths:
        size = header_size(path)
        if size is not None and size[0] != size[1]:
            print(f"warning: {path} is {size[1]}x{size[0]} (width x height), not square: the images are taken as "
                  "aligned face crops, as they are; for photos, find the faces with --detector or --landmarks",
                  file=sys.stderr)


def _warn_others_not_square(paths: list[str], not_square: list) -> None:
    """After the embedding, one warning for the images past the first (which ``_warn_if_not_aligned``
    looked at before it) that were not square: photos among the crops."""
    others = [(i, size) for i, size in not_square if i > 0]
    if others:
        index, (height, width) = others[0]
        many = len(others) > 1
        count = (f"{len(others)} more image{'s are' if many else ' is'}" if not_square[0][0] == 0
                 else f"{len(others)} of the {len(paths)} images {'are' if many else 'is'}")
        print(f"warning: {count} not square (the first: {paths[index]}, {width}x{height}): they were "
              "taken as aligned face crops, as they are; for photos, find the faces with --detector or --landmarks",
              file=sys.stderr)


def _warn_left_out(failures: list[str], shown: int = 20) -> None:
    for failure in failures[:shown]:
        print(f"warning: {failure}", file=sys.stderr)
    if len(failures) > shown:
        print(f"warning: ... and {len(failures) - shown} more photos left out", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
