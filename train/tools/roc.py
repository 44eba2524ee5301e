"""``python -m train.tools.roc``: 1:1 verification on your own labelled faces. Every pair of faces of one
person (genuine) and of two people (impostor) scored with a trained model: the threshold and true accept
rate at each false accept rate, the equal error rate, the ROC curve, and the pairs that fail.

    python -m train.tools.roc --model runs/r50/checkpoint.pt --images people/ --save-embeddings people.npy
    python -m train.tools.roc --embeddings people.npy --far 1e-4 --output roc.csv

The faces are an ImageFolder of aligned faces, ``people/<person>/<image>`` (a face's first folder is its
person; any nesting below it), embedded as ``train.embed`` embeds them (image + mirror, unit length); photos
with ``--landmarks`` or ``--detector`` as ``train.embed`` takes them (each photo's main face); or a table
``train.embed --images people/`` or ``--save-embeddings`` wrote (``--embeddings``: its rows are read, not
embedded). Every pair (i, j), i < j, is scored as the cosine of the two unit embeddings, in blocks, never as
the N x N matrix. A pair is accepted when its cosine is strictly above the threshold, as ``train.ijb``
accepts them: at FAR f of N impostor pairs the threshold is the (k+1)-th highest impostor cosine, k =
floor(f x N), the lowest that accepts at most k of them; a FAR below 1/N is not measurable (-, null).
Genuine pairs are kept exactly; impostor pairs are counted in a histogram of 65,536 bins (2^-15 wide, a
third of the 4-decimal step thresholds are given in) beside their exact ``TOP_IMPOSTORS`` highest cosines:
the thresholds of the small FARs (every FAR, when the impostor pairs are that few) are exact, those of
larger FARs on a collection with more impostor pairs are bin edges, and the TAR and false accepts there are
exact for that edge (a threshold at most one bin above the exact one).

Outputs: ``--output`` (``roc.csv``: the curve, far,threshold,tar,... at 200 log-spaced FARs and 1e-6 ...
1e-1), the summary beside it (``roc.json``: the counts, TAR and threshold at each FAR, the EER, the
operating point of ``--far``, what the model's recorded 1:1 threshold gives, the model's digests), and
the pairs that fail: ``roc-impostors.csv`` (the ``--pairs`` highest-scoring impostor pairs: the same
person filed under two names, or one photo under both, flagged ``duplicate`` at cosine 0.99 or more),
``roc-genuine.csv`` (the lowest-scoring genuine pairs: a wrong label, a bad crop) and ``roc-people.csv``
(per person, the genuine pairs rejected and the impostor pairs accepted at the operating threshold).
``--plot roc.png`` draws the curve against a log FAR axis (needs matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import numpy as np
import torch

from train import checkpoint
from train.embed import (MODEL_HELP, embed_folder, embed_listed_faces, faces_described, folder_images, load_model,
                         model_digests, model_threshold, open_detector, table_files, write_table)
from train.ijb import (FARS, allowed_passes, curve_rates, far_key, format_table, negatives_needed,
                       threshold_allowing)
from train.signals import run_tool, signals_held
from train.tools import (add_detector_option, add_embedding_options, check_embedding_options, check_outputs,
                         check_photo_options, count_of, plain_warnings, summary_path, torch_device)
from train.tools.cluster import DEFAULT_DUPLICATE_COSINE
from train.tools.search import Faces, _check_made_with, _read_faces, cosine_above, first_folder
from train.tools.similarity import cosine_blocks

DEFAULT_FAR = 1e-3
DEFAULT_PAIRS = 100
# The histogram of impostor cosines: bins 2^-15 wide over [-1, 1], bin b holding (edge(b) - 2^-15, edge(b)],
# edge(b) = (b + 1) / 2^15 - 1. A float32 cosine x falls in bin ceil(x * 2^15) + 2^15 - 1, computed exactly
# (a power of two scales a float32 without rounding), so the impostors strictly above an edge are exactly
# the counts of the bins above it. 2^-15 (3.1e-5) is a third of the 4-decimal step a threshold is given in.
SCALE = 1 << 15
BINS = 2 * SCALE
# The impostor cosines kept exactly, the highest (12 bytes each, with the pair): thresholds at FARs that allow
# fewer false accepts than this are exact; 2^20 covers FAR 1e-4 on 100,000 faces (5e9 pairs).
TOP_IMPOSTORS = 1 << 20


def bin_edge(b) -> np.ndarray:
    """The upper edge of histogram bin ``b`` (an int or array): the cosine whose impostors above it are
    those of the bins above ``b``."""
    return (np.asarray(b, dtype=np.float64) + 1) / SCALE - 1


class PairScores:
    """What the pass over every pair leaves: the genuine pairs' cosines (G,) and rows (G, 2), exactly;
    the number of impostor pairs, the (BINS,) histogram of their cosines, their ``top`` highest cosines
    (descending) with their rows, exactly; ``at_least``: for each cosine watched, the impostor pairs at or
    above it, counted exactly in the pass."""

    def __init__(self, genuine, genuine_pairs, impostors: int, counts, top, top_pairs, at_least: dict):
        self.genuine, self.genuine_pairs, self.impostors = genuine, genuine_pairs, impostors
        self.counts, self.top, self.top_pairs, self.at_least = counts, top, top_pairs, at_least
        self.genuine_sorted = np.sort(genuine.astype(np.float64))
        self.top_ascending = top[::-1].astype(np.float64)
        # Impostors strictly above each bin's upper edge.
        self.above_edge = np.concatenate([np.cumsum(counts[::-1])[::-1][1:], [0]])

    @property
    def exact(self) -> bool:
        """Whether every impostor cosine is kept (every threshold is then exact)."""
        return len(self.top) == self.impostors

    def false_accepts(self, threshold: float) -> int | None:
        """Impostor pairs strictly above ``threshold``; None where that is not known exactly (a cosine
        below the lowest one kept that is not a bin edge)."""
        count = int(self.false_accepts_of(np.array([threshold], dtype=np.float64))[0])
        return None if count < 0 else count

    def false_accepts_of(self, thresholds: np.ndarray) -> np.ndarray:
        """:meth:`false_accepts` of each of ``thresholds`` (float64), -1 where it is not known."""
        found = np.full(len(thresholds), -1, dtype=np.int64)
        kept = np.ones(len(thresholds), dtype=bool) if self.exact else \
            thresholds >= (self.top_ascending[0] if len(self.top) else math.inf)
        found[kept] = len(self.top) - np.searchsorted(self.top_ascending, thresholds[kept], side="right")
        found[thresholds == -math.inf] = self.impostors
        rest = np.flatnonzero(~kept & (thresholds > -math.inf))
        b = np.rint((thresholds[rest] + 1) * SCALE).astype(np.int64) - 1
        edge = (b >= 0) & (b < BINS)
        edge[edge] = bin_edge(b[edge]) == thresholds[rest][edge]
        found[rest[edge]] = self.above_edge[b[edge]]
        return found

    def true_accepts(self, threshold: float) -> int:
        """Genuine pairs strictly above ``threshold``."""
        return int(len(self.genuine_sorted) - np.searchsorted(self.genuine_sorted, threshold, side="right"))

    def threshold_at(self, far: float) -> tuple[float, bool] | None:
        """(the lowest threshold that accepts at most floor(far x N) of the N impostor pairs, whether it is
        that exact cosine rather than the upper edge of its histogram bin); None where floor(far x N) is 0.
        ``train.ijb.threshold_allowing`` where every impostor is kept, and its count otherwise."""
        if self.exact:
            threshold = threshold_allowing(self.top_ascending, far)
            return None if threshold is None else (threshold, True)
        allowed = allowed_passes(far, self.impostors)
        if allowed < 1:
            return None
        if allowed >= self.impostors:
            return -math.inf, True
        if allowed < len(self.top):
            return float(self.top[allowed]), True
        # The lowest edge with at most `allowed` impostors above it: the exact threshold lies in its bin.
        b = int(np.searchsorted(-self.above_edge, -allowed, side="left"))
        return float(bin_edge(b)), False

    def rates_at(self, fars) -> list[dict]:
        """For each FAR: {'far', 'tar', 'threshold', 'exact', 'false_accepts', 'true_accepts'}, as
        ``train.ijb.tar_at_far`` gives them (tar and threshold None where the FAR is not measurable)."""
        rows = []
        for far in fars:
            found = self.threshold_at(far)
            if found is None:
                rows.append({"far": far, "tar": None, "threshold": None, "exact": None, "false_accepts": None,
                             "true_accepts": None})
                continue
            threshold, exact = found
            accepted = self.true_accepts(threshold)
            rows.append({"far": far, "tar": accepted / len(self.genuine_sorted), "threshold": threshold,
                         "exact": exact, "false_accepts": self.false_accepts(threshold), "true_accepts": accepted})
        return rows

    def equal_error(self) -> dict:
        """The equal error rate: the lowest rate r at which one threshold keeps both the false accept rate
        (impostor pairs above it) and the false reject rate (genuine pairs at or below it) at or below r;
        the lowest such threshold among those whose false accepts are known exactly (-inf, every cosine
        kept, every genuine cosine among them, each bin edge), and the two rates there."""
        candidates = [[-math.inf], self.top_ascending, self.genuine_sorted]
        if not self.exact:
            candidates.append(bin_edge(np.arange(BINS)))
        t = np.unique(np.concatenate(candidates))
        false_accepts = self.false_accepts_of(t)
        known = false_accepts >= 0
        t, false_accepts = t[known], false_accepts[known]
        false_rejects = np.searchsorted(self.genuine_sorted, t, side="right")
        far, frr = false_accepts / self.impostors, false_rejects / len(self.genuine_sorted)
        at = int(np.argmin(np.maximum(far, frr)))  # (the first: the lowest threshold)
        return {"rate": float(max(far[at], frr[at])), "threshold": _cosine(t[at]), "far": float(far[at]),
                "frr": float(frr[at]), "false_accepts": int(false_accepts[at]),
                "false_rejects": int(false_rejects[at])}


def score_pairs(unit: torch.Tensor, person: np.ndarray, *, device="cpu", keep: int = TOP_IMPOSTORS,
                watch=(), rows: int = 2048, columns: int = 8192, log=None) -> PairScores:
    """Every pair (i, j), i < j, of the (N, D) unit embeddings, whose people ``person`` (N,) are sorted
    (non-decreasing), scored by its cosine in blocks of ``rows`` x ``columns`` made on ``device``: the
    genuine pairs (one person) kept, the impostor pairs counted (:class:`PairScores`), the ``keep``
    highest of them kept too, and those at or above each cosine of ``watch`` counted. ``log`` (a callable)
    is told the share of the pairs done every 30 s."""
    n = len(unit)
    person = np.asarray(person, dtype=np.int64)
    if n and np.any(np.diff(person) < 0):
        raise ValueError("score_pairs: the rows must be sorted by person")
    on_device = torch.from_numpy(person).to(device)
    counts = torch.zeros(BINS + 1, dtype=torch.int64, device=device)  # (the last: pairs left out of the block)
    at_least = {t: 0 for t in watch}
    genuine, genuine_i, genuine_j = [], [], []
    top_values = torch.empty(0, device=device)
    top_index = torch.empty(0, dtype=torch.int64, device=device)
    floor = -math.inf  # every impostor above it is among those kept
    pairs, done, reported = n * (n - 1) / 2, 0, time.monotonic()

    def prune(values, index, size):
        values, order = values.topk(min(size, len(values)))
        return values, index[order]

    for start, first, cosines in cosine_blocks(unit, device=device, rows=rows, columns=max(rows, columns)):
        r, c = cosines.shape
        done += r * c
        if log is not None and time.monotonic() - reported > 30:
            reported = time.monotonic()
            log(f"compared {min(1.0, done / max(1.0, pairs)):.0%} of the {int(pairs):,} pairs of faces")
        left_out = None
        if first == start:  # on the diagonal: only the pairs j > i
            left_out = torch.ones(r, c, dtype=torch.bool, device=cosines.device).tril()
        if person[first] <= person[start + r - 1]:  # some of the block's pairs may be of one person
            same = on_device[start:start + r, None] == on_device[None, first:first + c]
            if left_out is not None:
                same &= ~left_out
            i, j = torch.nonzero(same, as_tuple=True)
            genuine.append(cosines[i, j].cpu())
            genuine_i.append((i + start).cpu())
            genuine_j.append((j + first).cpu())
            left_out = same if left_out is None else left_out | same
        impostor = cosines if left_out is None else cosines.masked_fill(left_out, -math.inf)
        top = float(impostor.amax()) if impostor.numel() else -math.inf
        for t in at_least:
            if top >= t:
                at_least[t] += int((impostor >= t).sum())
        if keep and top > floor:
            above = impostor > floor
            if int(above.sum()) > keep:  # (the first blocks, before `keep` are kept)
                values, at = impostor.flatten().topk(keep)
                i, j = at // c, at % c
            else:
                i, j = torch.nonzero(above, as_tuple=True)
                values = impostor[i, j]
            index = (i + start) * n + (j + first)
            top_values, top_index = torch.cat([top_values, values]), torch.cat([top_index, index])
            if len(top_values) > 2 * keep:
                top_values, top_index = prune(top_values, top_index, keep)
                floor = float(top_values[-1])
        # The histogram, in place of the cosines (not needed after this).
        b = cosines.mul_(SCALE).ceil_().to(torch.int32).add_(SCALE - 1).clamp_(0, BINS - 1)
        if left_out is not None:
            b.masked_fill_(left_out, BINS)
        counts += torch.bincount(b.flatten(), minlength=BINS + 1)
    genuine_count = sum(len(g) for g in genuine)
    impostors = n * (n - 1) // 2 - genuine_count
    top_values, top_index = prune(top_values, top_index, len(top_values))  # (descending)
    if len(top_values) > keep:
        top_values, top_index = top_values[:keep], top_index[:keep]
    top_index = top_index.cpu().numpy()
    cat = (lambda parts, dtype: torch.cat(parts).numpy() if parts else np.empty(0, dtype=dtype))
    return PairScores(cat(genuine, np.float32), np.stack([cat(genuine_i, np.int64), cat(genuine_j, np.int64)], 1),
                      impostors, counts[:BINS].cpu().numpy(), top_values.cpu().numpy(),
                      np.stack([top_index // max(n, 1), top_index % max(n, 1)], 1), at_least)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.tools.roc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR",
                        help="an ImageFolder of aligned faces, DIR/<person>/<image> (a face's first folder is its "
                        "person); photos with --landmarks or --detector")
    source.add_argument("--embeddings", metavar="TABLE",
                        help="a table python -m train.embed --images DIR or --save-embeddings wrote (.npy with its "
                        ".txt, or .csv; a row's first folder is its person): scored without embedding")
    p.add_argument("--model", default=None,
                   help=MODEL_HELP + "; with --embeddings only for its recorded threshold (default: the model the "
                   "table's .json names, where it still is)")
    p.add_argument("--save-embeddings", metavar="TABLE", default=None,
                   help="with --images: also write the embeddings as a table (.npy with a .txt, or .csv; a .json "
                   "beside it names the model and its digests), for --embeddings TABLE next time")
    p.add_argument("--landmarks", metavar="FILE", default=None,
                   help="the images under --images are photos: score the faces this file lists, each aligned from "
                   "its 5 landmarks (as train.embed --landmarks; one face a photo)")
    p.add_argument("--extension", default=None, help="appended to every image path of --landmarks")
    add_detector_option(p, "the images under --images")
    p.add_argument("--far", type=float, default=DEFAULT_FAR, metavar="RATE",
                   help="the false accept rate of the operating threshold, at which the people's rejected genuine "
                   f"pairs are counted (default {DEFAULT_FAR:g})")
    p.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                   help=f"how many of the highest impostor and lowest genuine pairs to list (default {DEFAULT_PAIRS})")
    p.add_argument("--output", default="roc.csv",
                   help="the ROC curve (a .csv; default roc.csv), with the summary (.json) and the pairs that fail "
                   "(-impostors.csv, -genuine.csv, -people.csv) beside it")
    p.add_argument("--plot", metavar="FILE", default=None,
                   help="also draw the curve, TAR against a log FAR axis, to FILE (.png, .pdf or .svg; needs "
                   "matplotlib)")
    add_embedding_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output, the files beside it, --plot and --save-embeddings' files when they exist")
    args = p.parse_args(argv)
    check_embedding_options(p, args)
    if args.images and not args.model:
        p.error("--images needs --model, the model that embeds the faces")
    if not 0 < args.far < 1:
        p.error(f"--far is a false accept rate, above 0 and below 1: got {args.far:g}")
    if args.pairs < 0:
        p.error(f"--pairs must be at least 0, got {args.pairs}")
    if not args.output.endswith(".csv"):
        p.error(f"--output names a .csv file, got {args.output}")
    if args.save_embeddings and not args.images:
        p.error("--save-embeddings goes with --images (--embeddings is a table of faces embedded already)")
    check_photo_options(p, args, "--images", " (--embeddings is a table of faces embedded already)")
    if args.plot:
        from train.plots import _pyplot

        if os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg"):
            p.error(f"--plot {args.plot}: a .png, .pdf or .svg file")
        if _pyplot() is None:
            p.error("--plot needs matplotlib (pip install matplotlib, or the [train] extra)")
    args.written = []

    def said(stop) -> str | None:
        if args.written and args.output not in args.written:
            return f": the embeddings' table was written ({', '.join(args.written)}), no results"
        return None

    # Ctrl-C and SIGTERM unwind: the embeddings' table is written whole as soon as the faces are embedded, the
    # results all together.
    return run_tool(lambda: run(args), tool="roc", said=said)


def main(argv: list[str] | None = None) -> int:
    with plain_warnings():
        return _main(argv)


def failing_outputs(output: str) -> dict[str, str]:
    """The files beside ``--output`` that list the pairs that fail."""
    stem = output[:-len(".csv")]
    return {kind: f"{stem}-{kind}.csv" for kind in ("impostors", "genuine", "people")}


def run(args: argparse.Namespace) -> int:
    """``main`` after parsing; raises OSError or ValueError naming the argument or file at fault. The
    inputs, the model and the outputs are checked before any face is embedded."""
    device = torch_device(args.device)
    faces = None
    if args.embeddings:
        faces = _read_faces("--embeddings", args.embeddings)
    elif not os.path.isdir(args.images):
        raise ValueError(f"--images {args.images} is not a folder")
    model_path = args.model
    if model_path is None and faces is not None and faces.about.get("model"):
        if os.path.isfile(faces.about["model"]):
            model_path = faces.about["model"]
        else:
            print(f"roc: note: {faces.about['model']}, the model the table was made with, is not there any more: its "
                  "recorded threshold is not known", file=sys.stderr)
    model, settings = None, {}
    if model_path:
        model, settings = load_model(model_path, device if args.images else "cpu")
    if faces is not None and model_path:
        _check_made_with(faces, "--embeddings", args.embeddings, model_path, model, settings, {}, tool="roc")
    outputs = [args.output, summary_path(args.output), *failing_outputs(args.output).values()]
    outputs += [args.plot] if args.plot else []
    outputs += table_files(args.save_embeddings, about=True) if args.save_embeddings else []
    if len({os.path.realpath(path) for path in outputs}) < len(outputs):
        raise ValueError(f"--output {args.output}, --plot and --save-embeddings must name different files")
    inputs = (model_path, checkpoint.settings_path(model_path) if model_path else None, args.landmarks,
              args.detector, *(table_files(args.embeddings, about=True) if args.embeddings else ()))
    detector = open_detector(args.detector, device) if args.detector else None
    check_outputs(outputs, args.overwrite, inputs=inputs, image_folders=(args.images,) if args.images else ())

    failures = []
    if faces is None:
        faces = _embed(args, model, settings, device, detector, failures)
        if args.save_embeddings:
            about = {"made_by": "train.tools.roc", "model": os.path.abspath(model_path),
                     **model_digests(model_path, model), "image_size": settings["image_size"], "flip": True,
                     "normalised": True, "images": os.path.abspath(args.images),
                     "faces": faces_described(args.landmarks, args.detector)}
            with signals_held():
                args.written += write_table(args.save_embeddings, faces.names, faces.embeddings, about=about)
            print(f"roc: wrote {', '.join(args.written)}", file=sys.stderr)
            faces.about = about
        else:
            faces.about = {"model": os.path.abspath(model_path), **model_digests(model_path, model)}
    try:
        return _verify(args, faces, model_path, settings, device, failures)
    except (OSError, ValueError) as error:
        if not args.written:
            raise
        raise type(error)(f"{error} (the embeddings' table was written: {', '.join(args.written)}; --embeddings "
                          f"{args.save_embeddings} scores it without embedding the faces again)") from None


def _embed(args, model, settings: dict, device, detector, failures: list[str]) -> Faces:
    """The faces under ``--images`` (aligned crops, or photos with --landmarks or ``detector``, --detector
    opened), embedded as ``train.embed`` embeds them; a face that cannot be read is left out (``failures``)."""
    size = settings["image_size"]
    if args.landmarks:
        names, embeddings = embed_listed_faces(model, args.images, args.landmarks, size, extension=args.extension,
                                               device=device, batch_size=args.batch_size, workers=args.workers)
        return Faces(names, embeddings, None)
    paths, names = folder_images(args.images, failures)
    print(f"roc: embedding {count_of(len(paths), 'image')} under {args.images} with {args.model} ({size}px) on "
          f"{device}", file=sys.stderr, flush=True)
    names, embeddings = embed_folder(model, args.images, paths, names, size, failures=failures, detector=detector,
                                     device=device, batch_size=args.batch_size, workers=args.workers)
    return Faces(names, embeddings, None)


def people_of(faces: Faces, flag: str, source: str) -> tuple[list[str], np.ndarray]:
    """(the people, by name, sorted; (N,) each face's person), a face's person its first folder.
    ValueError naming the input when a face is in no folder, when one person only is there (no impostor
    pair), or when no person has two faces (no genuine pair)."""
    names = [first_folder(name) for name in faces.names]
    if None in names:
        row = names.index(None)
        raise ValueError(f"{flag} {source}: {faces.names[row]} is in no folder: a face's first folder is its person "
                         f"({flag} people/ holding people/<person>/<image>)")
    people, person = np.unique(names, return_inverse=True)
    if len(people) < 2:
        raise ValueError(f"{flag} {source}: every face is of one person, {people[0]}: no impostor pair (two people's "
                         "faces) to measure a false accept rate with")
    if np.bincount(person).max() < 2:
        raise ValueError(f"{flag} {source}: no person has two faces: no genuine pair (one person's faces) to "
                         "measure a true accept rate with")
    return people.tolist(), person


def _verify(args, faces: Faces, model_path: str | None, settings: dict, device, failures: list[str]) -> int:
    source = args.embeddings or args.images
    flag = "--embeddings" if args.embeddings else "--images"
    people, person = people_of(faces, flag, source)
    sizes = np.bincount(person, minlength=len(people))
    n = len(faces.names)
    # Known from the people's sizes: a --far they cannot measure is refused before the pairs are scored (minutes).
    impostors = n * (n - 1) // 2 - int((sizes * (sizes - 1) // 2).sum())
    if allowed_passes(args.far, impostors) < 1:
        raise ValueError(f"--far {args.far:g}: {impostors:,} impostor pairs measure a FAR of {1 / impostors:.3g} at "
                         f"best (1 of them); {args.far:g} needs {negatives_needed(args.far):,} or more")
    alone = [people[p] for p in np.flatnonzero(sizes == 1)]
    if alone:
        print(f"roc: note: {count_of(len(alone), 'person', 'people')} with one face ({', '.join(alone[:5])}"
              f"{f' and {len(alone) - 5} more' if len(alone) > 5 else ''}) "
              f"{'contributes' if len(alone) == 1 else 'contribute'} no genuine pair, only impostor pairs",
              file=sys.stderr)
    order = np.argsort(person, kind="stable")
    unit = torch.from_numpy(np.ascontiguousarray(faces.embeddings[order], dtype=np.float32))
    sorted_person = person[order]
    model_cosine = model_source = None
    if model_path and "threshold" in settings:
        model_cosine, model_source = model_threshold(model_path, settings, None, tool="roc")
    watch = sorted({DEFAULT_DUPLICATE_COSINE} | ({model_cosine} if model_cosine is not None else set()))
    print(f"roc: scoring the {n * (n - 1) // 2:,} pairs of {count_of(n, 'face')} of "
          f"{count_of(len(people), 'person', 'people')} on {device}", file=sys.stderr, flush=True)
    started = time.monotonic()
    scores = score_pairs(unit, sorted_person, device=device, watch=watch,
                         log=lambda message: print(f"roc: {message}", file=sys.stderr, flush=True))
    seconds = time.monotonic() - started
    rates = sorted(set(curve_rates(scores.impostors)) | set(FARS) | {args.far})
    curve = scores.rates_at(rates)
    at = {row["far"]: row for row in curve}
    operating = at[args.far]
    threshold = operating["threshold"]
    eer = scores.equal_error()
    names = [faces.names[i] for i in order]
    genuine_rows, impostor_rows, people_rows = _failing(scores, names, people, sorted_person, threshold, args.pairs)
    summary = {
        "made_by": "train.tools.roc",
        "images": os.path.abspath(args.images) if args.images else faces.about.get("images"),
        "embeddings": os.path.abspath(args.embeddings) if args.embeddings else None,
        "model": os.path.abspath(model_path) if model_path else faces.about.get("model"),
        **{key: faces.about[key] for key in ("model_sha256", "model_weights_sha256") if key in faces.about},
        "faces": n, "people": len(people), "people_with_one_face": len(alone), "left_out": len(failures),
        "genuine_pairs": len(scores.genuine), "impostor_pairs": scores.impostors,
        "accept": "cosine strictly above the threshold",
        "impostor_histogram": {"bins": BINS, "width": 1 / SCALE, "exact_highest": len(scores.top),
                               "every_impostor_exact": scores.exact},
        "tar_at_far": {far_key(far): at[far]["tar"] for far in FARS},
        "threshold_at_far": {far_key(far): _cosine(at[far]["threshold"]) for far in FARS},
        "threshold_exact_at_far": {far_key(far): at[far]["exact"] for far in FARS},
        "false_accepts_at_far": {far_key(far): at[far]["false_accepts"] for far in FARS},
        "eer": eer,
        "operating_point": {
            "far": args.far, "threshold": _cosine(threshold), "threshold_exact": operating["exact"],
            "compare_threshold": cosine_above(threshold), "tar": operating["tar"],
            "false_accepts": operating["false_accepts"],
            "genuine_rejected": len(scores.genuine) - operating["true_accepts"]},
        "duplicate_cosine": DEFAULT_DUPLICATE_COSINE,
        "impostor_pairs_at_duplicate_cosine": scores.at_least[DEFAULT_DUPLICATE_COSINE],
        "genuine_pairs_at_duplicate_cosine": int((scores.genuine >= DEFAULT_DUPLICATE_COSINE).sum()),
        "seconds": round(seconds, 3), "pairs_per_second": round(n * (n - 1) / 2 / max(seconds, 1e-9)),
    }
    if model_cosine is not None:
        # As train.embed --compare decides with it: the same person at or above it.
        impostors_in = scores.at_least[model_cosine]
        genuine_in = int((scores.genuine >= model_cosine).sum())
        summary["model_threshold"] = {
            "cosine": round(model_cosine, 6), "from": model_source,
            "accept": "cosine at or above it, as train.embed --compare decides", "far": impostors_in / scores.impostors,
            "false_accepts": impostors_in, "tar": genuine_in / len(scores.genuine)}
    summary["outputs"] = [os.path.abspath(path) for path in
                          [args.output, *failing_outputs(args.output).values()] + ([args.plot] if args.plot else [])]
    summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files = failing_outputs(args.output)
    with signals_held():  # the curve, its summary and the failing pairs: all of them or none
        _write_csv(args.output, ["far", "threshold", "tar", "false_accepts", "false_accept_rate", "true_accepts",
                                 "threshold_exact"],
                   [[f"{r['far']:.6g}", _cell(r["threshold"]), _cell(r["tar"]), _cell(r["false_accepts"]),
                     _cell(None if r["false_accepts"] is None else r["false_accepts"] / scores.impostors),
                     _cell(r["true_accepts"]), _cell(r["exact"])] for r in curve])
        _write_csv(files["impostors"], ["rank", "cosine", "accepted", "duplicate", "image_a", "person_a", "image_b",
                                        "person_b"], impostor_rows)
        _write_csv(files["genuine"], ["rank", "cosine", "rejected", "person", "image_a", "image_b"], genuine_rows)
        _write_csv(files["people"], ["person", "faces", "genuine_pairs", "rejected", "rejected_share",
                                     "false_accepts", "lowest_cosine", "lowest_pair_a", "lowest_pair_b"], people_rows)
        checkpoint.write_json_atomic(summary_path(args.output), summary)
        args.written += [args.output, summary_path(args.output)]
    drawn = False
    if args.plot:  # after the results, which a failure here must not cost
        from train.plots import plot_ijb

        points = [r for r in curve if r["tar"] is not None]
        try:
            plot_ijb(args.plot, os.path.basename(os.path.normpath(source)), roc=([r["far"] for r in points],
                                                                                [r["tar"] for r in points]))
            drawn = True
        except Exception as error:  # noqa: BLE001 (a full disk, a matplotlib backend's failure)
            print(f"roc: error: could not draw {args.plot}: {error}", file=sys.stderr)
    _report(args, summary, [at[far] for far in FARS], scores, failures, drawn)
    return 1 if failures or (args.plot and not drawn) else 0


def _cosine(value):
    return None if value is None or value == -math.inf else round(float(value), 6)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-inf" if value == -math.inf else f"{value:.6f}"
    return str(value)


def _write_csv(path: str, header: list[str], rows) -> None:
    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    checkpoint.write_atomic(path, write, binary=False)


def _failing(scores: PairScores, names: list[str], people: list[str], person: np.ndarray, threshold: float,
             count: int) -> tuple[list, list, list]:
    """The rows of the failing pairs' tables: the ``count`` lowest genuine pairs, the ``count`` highest
    impostor pairs, and each person's genuine pairs rejected (and impostor pairs accepted, where the
    threshold lies among the impostor cosines kept) at ``threshold``."""
    lowest = np.argsort(scores.genuine, kind="stable")[:count]
    genuine_rows = [[k + 1, f"{scores.genuine[g]:.6f}", _cell(bool(scores.genuine[g] <= threshold)),
                     people[person[scores.genuine_pairs[g, 0]]], names[scores.genuine_pairs[g, 0]],
                     names[scores.genuine_pairs[g, 1]]] for k, g in enumerate(lowest)]
    impostor_rows = []
    for k in range(min(count, len(scores.top))):
        a, b = scores.top_pairs[k]
        cosine = float(scores.top[k])
        impostor_rows.append([k + 1, f"{cosine:.6f}", _cell(cosine > threshold),
                              _cell(cosine >= DEFAULT_DUPLICATE_COSINE), names[a], people[person[a]], names[b],
                              people[person[b]]])
    faces = np.bincount(person, minlength=len(people))
    of = person[scores.genuine_pairs[:, 0]] if len(scores.genuine) else np.empty(0, dtype=np.int64)
    pairs = np.bincount(of, minlength=len(people))
    rejected = np.bincount(of[scores.genuine <= threshold], minlength=len(people))
    false_accepts = None
    if scores.exact or (len(scores.top) and threshold >= scores.top[-1]):
        accepted = scores.top_pairs[scores.top > threshold]
        false_accepts = np.bincount(person[accepted.ravel()], minlength=len(people))
    lowest_of = np.full(len(people), -1)
    by_person = np.lexsort((scores.genuine, of))  # each person's pairs, the lowest first
    found, first = np.unique(of[by_person], return_index=True)
    lowest_of[found] = by_person[first]
    people_rows = []
    ranked = np.lexsort((np.arange(len(people)), -(false_accepts if false_accepts is not None else pairs * 0),
                         -rejected))
    for p in ranked:
        g = lowest_of[p]
        people_rows.append([people[p], int(faces[p]), int(pairs[p]), int(rejected[p]),
                            f"{rejected[p] / pairs[p]:.4f}" if pairs[p] else "",
                            "" if false_accepts is None else int(false_accepts[p]),
                            f"{scores.genuine[g]:.6f}" if g >= 0 else "",
                            names[scores.genuine_pairs[g, 0]] if g >= 0 else "",
                            names[scores.genuine_pairs[g, 1]] if g >= 0 else ""])
    return genuine_rows, impostor_rows, people_rows


def _report(args, summary: dict, rows: list[dict], scores: PairScores, failures: list[str], drawn: bool) -> None:
    point, eer = summary["operating_point"], summary["eer"]
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    say(f"roc: {summary['faces']} faces of {summary['people']} people: {summary['genuine_pairs']:,} genuine pairs, "
        f"{summary['impostor_pairs']:,} impostor pairs ({summary['seconds']:.1f} s, "
        f"{summary['pairs_per_second']:,} pairs/s); accepted when the cosine is above the threshold:")
    say(format_table(rows))
    if any(r["tar"] is None for r in rows):
        say(f"  (-: FAR below 1/{scores.impostors:,}, less than one false accept among the impostor pairs: not "
            "measurable)")
    if any(r["exact"] is False for r in rows):
        say(f"  (thresholds at FARs above {len(scores.top) / scores.impostors:.2g} are histogram bin edges, at most "
            f"{1 / SCALE:.1e} above the exact ones; TAR and false accepts are exact at them)")
    say(f"roc: EER {eer['rate']:.2%} at cosine {eer['threshold']:.4f} (FAR {eer['far']:.2%}, FRR {eer['frr']:.2%})")
    model = summary.get("model_threshold")
    if model:
        say(f"roc: the model's recorded 1:1 threshold, cosine {model['cosine']:.4f} ({model['from']}), accepts "
            f"{model['false_accepts']:,} impostor pairs (FAR {model['far']:.3g}) and {model['tar']:.2%} of the "
            "genuine pairs on these faces")
    duplicates = summary["impostor_pairs_at_duplicate_cosine"]
    if duplicates:
        say(f"roc: note: {count_of(duplicates, 'impostor pair')} at cosine {DEFAULT_DUPLICATE_COSINE} or more: one "
            "photo, or one person, filed under two names? (the first in "
            f"{failing_outputs(args.output)['impostors']})")
    duplicates = summary["genuine_pairs_at_duplicate_cosine"]
    if duplicates:  # (accepted at every threshold: they raise the TAR the tool reports)
        say(f"roc: note: {count_of(duplicates, 'genuine pair')} at cosine {DEFAULT_DUPLICATE_COSINE} or more: one "
            "photo filed twice under one person (saved again, re-encoded)? Each is accepted at any threshold and "
            "raises the TAR above; train.tools.cluster finds such duplicates")
    files = failing_outputs(args.output)
    say(f"roc: at FAR {args.far:g}: threshold cosine {point['threshold']:.6f}"
        + ("" if point["threshold_exact"] else " (a bin edge)")
        + f", TAR {point['tar']:.2%} ({point['genuine_rejected']:,} genuine pairs rejected, "
        f"{point['false_accepts']:,} impostor{'' if point['false_accepts'] == 1 else 's'} accepted); train.embed "
        "--compare and search --threshold "
        f"{point['compare_threshold']:.4f} (they accept at or above it); wrote {args.output}, "
        f"{summary_path(args.output)}, {files['impostors']}, {files['genuine']}, {files['people']}"
        + (f", {args.plot}" if drawn else "")
        + (f"; left out: {count_of(len(failures), 'face')} (the warnings above)" if failures else ""))


if __name__ == "__main__":
    sys.exit(main())
