"""``python -m train.tools.quality``: face image quality as the feature norm (MagFace's quality score,
AdaFace's proxy of it), scored for a collection and acted on, and the field's evaluation of a quality
score, the error-versus-reject characteristic (ERC).

    python -m train.tools.quality --model runs/magface/checkpoint.pt --images aligned/ --output quality.csv \\
        --reject-fraction 0.05 --tree sorted/
    python -m train.tools.quality --model runs/magface/checkpoint.pt --pairs lfw.bin --output erc.csv

Scores: every face under ``--images`` (aligned crops, any nesting; photos with ``--landmarks``, or with
``--detector``, whose detection score is then a column too) is embedded as ``train.embed`` embeds it, and
its quality is its feature norm as ``train.embed --norms`` gives it (the mean over the image and its
mirror of the embedding's length before normalisation); or the norms of a table are read
(``--embeddings``: ``train.embed --norms``'s file, a table whose ``.json`` names it, or this tool's own
``--output``, to rule the faces again). ``--output`` (``quality.csv``): ``image,quality`` (and
``detector_score`` with ``--detector``, ``rejected`` with a rule), ``--sort``: lowest first; beside it a
``.json``: the model, the counts and the quantiles. ``--reject-below Q`` or ``--reject-fraction F``
marks the faces to drop; ``--tree DIR`` lays the images out as ``DIR/kept/<image>`` and
``DIR/rejected/<image>`` (hard links, or copies), each image at its path under ``--images``.

ERC: each pair of ``--pairs`` (what ``train.verify`` reads: a ``.bin``, a pairs list, LFW's ``pairs.txt``,
CALFW's or CPLFW's pair file) gets its comparison score, the cosine of the two faces' embeddings (image +
mirror, unit length, as verification makes them), and its quality, the lower of its two faces' (by the
feature norm, and by ``--quality-file``'s scores where one is given). The threshold is fixed once, on all
pairs, at each ``--fmr`` (the lowest threshold that at most that share of the impostor pairs pass); then
the lowest-quality pairs are rejected, a growing share of all pairs, and the ERC is the false non-match
rate (FNMR) of the genuine pairs left, at that same threshold. Its area over rejecting 0 to
``--max-reject`` of the pairs, and over 0 to 100%, is given with the expected area of rejecting pairs at
random and with the area of an oracle that rejects the genuine pairs that fail first. Outputs: ``--output``
(``erc.csv``), the summary beside it (``.json``) and, with matplotlib, the curves (``.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pickle
import shutil
import sys
import time

from train.signals import run_tool, signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "quality: "):
    import numpy as np
    import torch

    from train import checkpoint
    from train.embed import (IMAGES_AS_THEY_ARE, MODEL_HELP, embed_folder, embed_images, embed_listed_faces,
                             faces_are_files, faces_described, folder_images, load_model, model_digests,
                             open_detector, read_about, read_table, set_amp, table_files)
    from train.ijb import threshold_allowing
    from train.tools import (ArgumentParser, add_detector_option, add_embedding_options, check_embedding_options,
                             check_images_folder, check_outputs, check_photo_options, check_tree_folder, count_of,
                             hidden_beside, inside, left_out_said, link_or_copy, path_arg, plain_warnings,
                             remove_killed_runs_trees, replace_folder, summary_path, torch_device)

DEFAULT_FMRS = (0.001, 0.01)
DEFAULT_MAX_REJECT = 0.2
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
CURVE_POINTS = 101  # erc.csv's rows an ordering and FMR: rejecting 0%, 1%, ..., 100% of the pairs
TREE_PARTS = ("kept", "rejected")
NORM = "norm"  # the name of the feature norm as a quality score in the ERC's outputs
DETECTOR_SCORE = "detector_score"  # the column of a face's detection score (--detector) in the scores' table
RANDOM, ORACLE = "random", "oracle"


# ---------------------------------------------------------------------------------------------
# The error-versus-reject characteristic


def pair_quality(quality: np.ndarray) -> np.ndarray:
    """(P,) the quality of each pair of the (2P,) image qualities, pair k being images 2k and 2k + 1:
    the lower of the two (a comparison is as good as its worse face)."""
    return np.minimum(quality[0::2], quality[1::2])


def fmr_threshold(impostors: np.ndarray, fmr: float) -> tuple[float, float]:
    """(the highest score refused, the FMR used): a pair is accepted when its score is strictly above it,
    which at most floor(FMR x N) of the N sorted ``impostors`` are (``train.ijb.threshold_allowing``).
    An FMR below 1/N cannot be measured on N impostor pairs: 1/N, the lowest that can, is used instead."""
    refused = threshold_allowing(impostors, fmr)
    if refused is None:
        fmr = 1 / impostors.size
        refused = threshold_allowing(impostors, fmr)
    return refused, fmr


def error_versus_reject(scores: np.ndarray, genuine: np.ndarray, quality: np.ndarray, refused: float
                        ) -> np.ndarray:
    """(P + 1,) the ERC at every step: entry k is the FNMR of the genuine pairs left once the k pairs of
    lowest ``quality`` are rejected, at the threshold fixed beforehand on all pairs (a genuine pair fails
    when its score is not above ``refused``); 0 once no genuine pair is left. Pairs of equal quality are
    rejected together or not at all (no quality threshold parts them): within a run of ties the curve is
    the straight line between the steps on either side of it, whatever the pairs' order."""
    order = np.argsort(quality, kind="stable")
    genuine = genuine[order]
    fails = genuine & (scores[order] <= refused)
    left = genuine.sum() - np.concatenate([[0], np.cumsum(genuine)])
    failing = fails.sum() - np.concatenate([[0], np.cumsum(fails)])
    fnmr = np.divide(failing, left, out=np.zeros(left.size), where=left > 0)
    ranked = quality[order]
    steps = np.flatnonzero(np.concatenate([[True], ranked[1:] != ranked[:-1], [True]]))  # (k: no tie split)
    return np.interp(np.arange(fnmr.size), steps, fnmr[steps])


def random_rejection(scores: np.ndarray, genuine: np.ndarray, refused: float) -> np.ndarray:
    """(P + 1,) the expected ERC of rejecting k of the P pairs at random: the FNMR before any rejection,
    F / G, times the chance that a genuine pair is left among the P - k kept (0 FNMR where none is, as in
    :func:`error_versus_reject`): 1 - C(P - G, P - k) / C(P, P - k)."""
    pairs, g = genuine.size, int(genuine.sum())
    f = int((genuine & (scores <= refused)).sum())
    i = np.arange(pairs)
    # C(P-G, K) / C(P, K) = prod over i < K of (P-G-i) / (P-i): no genuine pair among K kept
    none_kept = np.concatenate([[1.0], np.cumprod(np.clip((pairs - g - i) / (pairs - i), 0, None))])
    return (f / g if g else 0.0) * (1 - none_kept[pairs - np.arange(pairs + 1)])


def oracle_quality(scores: np.ndarray, genuine: np.ndarray, refused: float) -> np.ndarray:
    """A quality that orders the genuine pairs that fail first (the lowest score first), then the rest,
    every pair its own rank (no ties): the best ERC any ordering gives at that threshold."""
    quality = np.empty(scores.size)
    quality[np.lexsort((scores, ~(genuine & (scores <= refused))))] = np.arange(scores.size)
    return quality


def curve_at(fnmr: np.ndarray, fractions) -> np.ndarray:
    """The ERC of every step (:func:`error_versus_reject`), read at ``fractions`` of the pairs rejected,
    joining the steps by straight lines."""
    return np.interp(fractions, np.arange(fnmr.size) / (fnmr.size - 1), fnmr)


def erc_area(fnmr: np.ndarray, upto: float) -> float:
    """The area under the ERC (FNMR against the fraction of pairs rejected, its steps joined by straight
    lines) from rejecting none to rejecting ``upto`` of the pairs."""
    x = np.arange(fnmr.size) / (fnmr.size - 1)
    inside = x < upto
    xs = np.append(x[inside], upto)
    ys = np.append(fnmr[inside], curve_at(fnmr, upto))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))


def erc_summary(scores: np.ndarray, genuine: np.ndarray, qualities: dict[str, np.ndarray], fmrs, max_reject: float
                ) -> tuple[list[dict], dict[tuple[str, float], np.ndarray]]:
    """For each FMR (each threshold once: FMRs below what the impostor pairs measure share the lowest
    one), the threshold and, for each pair quality of ``qualities`` and the random and oracle orderings,
    the ERC's areas and FNMRs; and the curves, by (ordering, FMR used)."""
    impostors = np.sort(scores[~genuine])
    rows, curves, used = [], {}, {}
    for fmr in fmrs:
        refused, fmr_used = fmr_threshold(impostors, fmr)
        if fmr_used in used:
            used[fmr_used]["fmr_requested"].append(fmr)
            continue
        fnmrs = {name: error_versus_reject(scores, genuine, quality, refused) for name, quality in qualities.items()}
        fnmrs[RANDOM] = random_rejection(scores, genuine, refused)
        fnmrs[ORACLE] = error_versus_reject(scores, genuine, oracle_quality(scores, genuine, refused), refused)
        row = {"fmr_requested": [fmr], "fmr": fmr_used,
               "threshold": None if refused == -math.inf else refused,
               "false_matches": int((impostors > refused).sum()), "fnmr": float(fnmrs[RANDOM][0]),
               "failing_genuine_pairs": int((genuine & (scores <= refused)).sum()),
               "orderings": {name: {f"auc_0_{_percent(max_reject)}": erc_area(fnmr, max_reject),
                                    "auc_0_100": erc_area(fnmr, 1.0),
                                    **{f"fnmr_at_{_percent(r)}": float(curve_at(fnmr, r))
                                       for r in sorted({0.05, 0.1, max_reject})}}
                             for name, fnmr in fnmrs.items()}}
        used[fmr_used] = row
        rows.append(row)
        curves.update({(name, fmr_used): fnmr for name, fnmr in fnmrs.items()})
    return rows, curves


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}".replace(".", "_")


# ---------------------------------------------------------------------------------------------
# The command line


def _fmrs(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected false match rates separated by commas, got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"false match rates lie above 0 and below 1, got {text!r}")
    return sorted(set(values))


def _main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.tools.quality", name="quality", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=path_arg, default=None, help=MODEL_HELP + "; its feature norm is the quality")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=path_arg, metavar="DIR",
                        help="score the aligned faces under this folder (any nesting), as train.embed embeds them")
    source.add_argument("--embeddings", type=path_arg, metavar="TABLE",
                        help="score the faces of train.embed's --norms file (image,norm), or of a table train.embed "
                        "wrote with --norms (its .json names that file), or this tool's own --output, without "
                        "embedding")
    source.add_argument("--pairs", type=path_arg, metavar="FILE",
                        help="evaluate the quality by its error-versus-reject characteristic on this verification "
                        "set: a .bin, a pairs list (image1 image2 0|1), LFW's pairs.txt, CALFW's or CPLFW's pair "
                        "file, as python -m train.verify reads them")
    p.add_argument("--landmarks", type=path_arg, metavar="FILE", default=None,
                   help="with --images: score the faces this file lists in the photos under it, each aligned from "
                   "its 5 landmarks (as train.embed --landmarks)")
    p.add_argument("--extension", default=None, help="appended to every image path of --landmarks")
    add_detector_option(p, "the images under --images", "each one's main face (--all-faces: every face)")
    p.add_argument("--all-faces", action="store_true",
                   help="with --landmarks: an image listed on several lines is several faces; with --detector: every "
                   "face found; named <image>#<k>")
    p.add_argument("--output", type=path_arg, default=None,
                   help="a .csv: with --images or --embeddings the table image,quality (default quality.csv); with "
                   "--pairs the curves (default erc.csv); the summary beside it (.json)")
    p.add_argument("--sort", action="store_true", help="list the faces lowest quality first (default: as embedded)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--reject-below", type=float, default=None, metavar="Q",
                      help="mark the faces of quality below Q to be dropped (column rejected)")
    rule.add_argument("--reject-fraction", type=float, default=None, metavar="F",
                      help="mark the floor(F x N) faces of lowest quality to be dropped (ties: in the table's order)")
    p.add_argument("--tree", type=path_arg, metavar="DIR", default=None,
                   help="with a rule: lay the images out as DIR/kept/<image> and DIR/rejected/<image>, each at its "
                   "path under the images' folder (hard links, or copies where a link cannot be made)")
    p.add_argument("--copy", action="store_true", help="with --tree: copy the images rather than link them")
    p.add_argument("--quality-file", type=path_arg, metavar="CSV", default=None,
                   help="with --pairs: also evaluate this quality score (a CSV image,quality, higher is better: this "
                   "tool's, or another method's), its images named as the pairs file's folder names them (or as "
                   "its .json's images folder does; of a .bin, by their index in it, 0 to 2P-1)")
    p.add_argument("--fmr", type=_fmrs, default=list(DEFAULT_FMRS),
                   help="with --pairs: the false match rates at which the threshold is fixed, separated by commas "
                   f"(default {','.join(f'{f:g}' for f in DEFAULT_FMRS)}); below 1/impostor pairs, that is used")
    p.add_argument("--max-reject", type=float, default=DEFAULT_MAX_REJECT,
                   help="with --pairs: the ERC's area is given from rejecting none to this share of the pairs "
                   f"(default {DEFAULT_MAX_REJECT:g}), and over the whole curve")
    p.add_argument("--no-plot", dest="plot", action="store_false",
                   help="with --pairs: draw no erc.png (drawn where matplotlib is installed)")
    add_embedding_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output, its .json (and .png) and a --tree this tool wrote, when they exist")
    args = p.parse_args(argv)
    check_embedding_options(p, args)
    if (args.images or args.pairs) and not args.model:
        p.error(f"{'--images' if args.images else '--pairs'} needs --model, the model that embeds the faces")
    if args.embeddings and args.model:
        p.error("--model goes with --images or --pairs: --embeddings' norms are read as they are")
    check_photo_options(p, args, "--images")
    scoring = args.pairs is None
    for flag, value in (("--sort", args.sort), ("--reject-below", args.reject_below is not None),
                        ("--reject-fraction", args.reject_fraction is not None), ("--tree", args.tree)):
        if value and not scoring:
            p.error(f"{flag} goes with --images or --embeddings (--pairs evaluates the quality on a set of pairs)")
    for flag, value in (("--quality-file", args.quality_file), ("--fmr", args.fmr != list(DEFAULT_FMRS)),
                        ("--max-reject", args.max_reject != DEFAULT_MAX_REJECT), ("--no-plot", not args.plot)):
        if value and scoring:
            p.error(f"{flag} goes with --pairs")
    if args.reject_fraction is not None and not 0 <= args.reject_fraction < 1:
        p.error(f"--reject-fraction is a share of the faces, from 0 to below 1: got {args.reject_fraction:g}")
    if args.reject_below is not None and not math.isfinite(args.reject_below):
        p.error(f"--reject-below is a quality, a finite number: got {args.reject_below}")
    if args.tree and args.reject_below is None and args.reject_fraction is None:
        p.error("--tree needs a rule, --reject-below or --reject-fraction: it lays out the kept and the rejected")
    if args.copy and not args.tree:
        p.error("--copy goes with --tree")
    if not 0 < args.max_reject <= 1:
        p.error(f"--max-reject is a share of the pairs, above 0 and at most 1: got {args.max_reject:g}")
    args.output = args.output or ("quality.csv" if scoring else "erc.csv")
    if not args.output.endswith(".csv"):
        p.error(f"--output names a .csv file, got {args.output}")
    # Ctrl-C and SIGTERM unwind (the decoding workers leave them to this process): the outputs are written
    # whole, all of them, or none.
    return run_tool(lambda: score(args) if scoring else evaluate(args), tool="quality",
                    errors=(OSError, ValueError, pickle.UnpicklingError))  # (a .bin that is not one, as train.verify)


def main(argv: list[str] | None = None) -> int:
    with plain_warnings():
        return _main(argv)


# ---------------------------------------------------------------------------------------------
# Scores


def _table_norms(path: str) -> tuple[list[str], np.ndarray, np.ndarray | None, dict]:
    """(names, (N,) norms, (N,) detection scores or None, the provenance of the table that recorded them, or
    {}) of ``--embeddings``: ``train.embed --norms``'s file (image,norm), this tool's ``--output``
    (image,quality, and detector_score and rejected: its ``.json`` gives the model and the images' folder),
    or a table whose ``.json`` names that file."""
    if os.path.isdir(path):  # (it said "no file at <path>/.npy")
        raise ValueError(f"--embeddings {path} is a folder, not a table: --model M --images {path} scores its faces")
    names, values = read_table(path)
    if not names:
        raise ValueError(f"--embeddings {path}: the table holds no faces")
    header = _csv_header(path) if path.endswith(".csv") else []
    if header[:2] == ["image", "quality"]:
        try:
            with open(summary_path(path), encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = None
        ours = isinstance(recorded, dict) and recorded.get("made_by") == "train.tools.quality"
        about = {key: recorded[key] for key in ("model", "model_sha256", "model_weights_sha256", "image_size",
                                                "images", "faces") if key in recorded} if ours else {}
        scores = values[:, header.index(DETECTOR_SCORE) - 1] if DETECTOR_SCORE in header else None
        return names, values[:, 0].astype(np.float64), scores, about
    if path.endswith(".csv") and values.shape[1] == 1:  # (image,norm: train.embed --norms's file)
        return names, values[:, 0].astype(np.float64), None, {}
    about = read_about(path, values) or {}
    norms_file = about.get("norms")
    faces = about.get("faces")
    # The table's faces as they were found: the same --landmarks or --detector scores the same faces.
    rescore = "score the faces with the model, --model M --images DIR" + (
        f" with the --landmarks or --detector it was made with (its faces: {faces})"
        if isinstance(faces, str) and faces != IMAGES_AS_THEY_ARE else "")
    if not norms_file:
        raise ValueError(f"--embeddings {path}: its rows are embeddings of unit length, whose norm says nothing, and "
                         f"it records no norms file (train.embed --norms): {rescore}")
    if not os.path.isfile(norms_file):
        raise FileNotFoundError(f"--embeddings {path}: {norms_file}, the norms its .json names, is not there any "
                                f"more: {rescore}")
    norm_names, norms = read_table(norms_file)
    if norm_names != names or norms.shape[1] != 1:
        raise ValueError(f"--embeddings {path}: {norms_file}, the norms its .json names, lists other faces than the "
                         "table (a later train.embed --norms wrote it?): score the faces with the model")
    return names, norms[:, 0].astype(np.float64), None, about


def _csv_header(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


def _embed(args, model, settings: dict, device, detector, failures: list[str]
           ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(names, (N,) feature norms, (N,) detection scores with ``detector`` (--detector, opened), else None)
    of the faces of ``--images`` (photos with ``--landmarks`` or ``detector``); an image that cannot be
    read, without a face, or whose name cannot be a row, is left out (``failures``)."""
    size, norms = settings["image_size"], []
    if args.landmarks:
        print(f"quality: embedding the faces {args.landmarks} lists in the photos under {args.images} with "
              f"{args.model} ({size}px) on {device}", file=sys.stderr, flush=True)
        names, _ = embed_listed_faces(model, args.images, args.landmarks, size, extension=args.extension,
                                      several=args.all_faces, device=device, batch_size=args.batch_size,
                                      workers=args.workers, norms=norms)
        return names, np.concatenate(norms).astype(np.float64), None
    paths, names = folder_images(args.images, failures)
    print(f"quality: embedding {count_of(len(paths), 'photo' if args.detector else 'face')} under {args.images} with "
          f"{args.model} ({size}px) on {device}", file=sys.stderr, flush=True)
    scores = [] if detector else None
    names, _ = embed_folder(model, args.images, paths, names, size, failures=failures, detector=detector,
                            all_faces=args.all_faces, device=device, batch_size=args.batch_size, workers=args.workers,
                            norms=norms, scores=scores)
    return names, np.concatenate(norms).astype(np.float64), None if scores is None else np.array(scores)


def rejected_faces(quality: np.ndarray, below: float | None = None, fraction: float | None = None) -> np.ndarray:
    """(N,) bool: the faces to drop, those of quality below ``below``, or the floor(``fraction`` x N) of
    lowest quality (ties: the first in the table's order)."""
    if below is not None:
        return quality < below
    rejected = np.zeros(quality.size, dtype=bool)
    if fraction:
        rejected[np.argsort(quality, kind="stable")[:math.floor(fraction * quality.size * (1 + 1e-12))]] = True
    return rejected


def score(args: argparse.Namespace) -> int:
    """The scores of ``--images`` or ``--embeddings``; raises OSError or ValueError naming the argument or
    file at fault. The inputs, the model and the outputs are checked before any face is embedded."""
    device = torch_device(args.device)
    about, model = {}, None
    if args.images:
        check_images_folder(args.images)
        model, settings = load_model(args.model, device, args.amp)
        set_amp(model, args.amp, args.model, device=device)
        _check_has_norm(args.model, settings)
        folder, faces = args.images, faces_described(args.landmarks, args.detector, args.all_faces)
        inputs = (args.model, checkpoint.settings_path(args.model), args.landmarks, args.detector)
    else:
        names, quality, scores, about = _table_norms(args.embeddings)
        folder, faces = about.get("images"), about.get("faces")
        inputs = (*table_files(args.embeddings, about=True), about.get("norms"))
    outputs = [args.output, summary_path(args.output)]
    detector = open_detector(args.detector, device) if args.detector else None
    check_outputs(outputs, args.overwrite, inputs=inputs, image_folders=(args.images,) if args.images else ())
    if args.tree:
        _check_tree(args, folder, faces)

    failures = []
    if args.images:
        names, quality, scores = _embed(args, model, settings, device, detector, failures)
        about = {"model": os.path.abspath(args.model), **model_digests(args.model, model),
                 "image_size": settings["image_size"], "images": os.path.abspath(args.images), "faces": faces}
    rejected = None
    if args.reject_below is not None or args.reject_fraction is not None:
        rejected = rejected_faces(quality, args.reject_below, args.reject_fraction)
    order = np.argsort(quality, kind="stable") if args.sort else np.arange(len(names))
    summary = {
        "made_by": "train.tools.quality", "quality": "feature norm, the mean over the image and its mirror",
        **{key: about.get(key) for key in ("model", "model_sha256", "model_weights_sha256", "image_size", "images",
                                           "faces") if about.get(key) is not None},
        "embeddings": os.path.abspath(args.embeddings) if args.embeddings else None,
        "faces_scored": len(names), "left_out": len(failures),
        "mean": float(quality.mean()), "std": float(quality.std()),
        "quantiles": {f"{q:g}": float(np.quantile(quality, q)) for q in QUANTILES},
        "reject_below": args.reject_below, "reject_fraction": args.reject_fraction,
        "rejected": None if rejected is None else int(rejected.sum()),
        "highest_rejected": float(quality[rejected].max()) if rejected is not None and rejected.any() else None,
        "tree": os.path.abspath(args.tree) if args.tree else None,
    }
    staging = replaced = None
    tree_said = ""
    try:
        if args.tree:
            staging, links, copies = _build_tree(args.tree, folder, names, rejected, args.copy)
            summary["tree_files"] = {"hard links": links, "copies": copies}
            tree_said = f", {args.tree} ({count_of(links, 'hard link')}, {count_of(copies, 'copy', 'copies')})"
        summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        def write(f):
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image", "quality"] + ([DETECTOR_SCORE] if scores is not None else [])
                            + (["rejected"] if rejected is not None else []))
            writer.writerows([names[i], f"{quality[i]:.7g}"] + ([f"{scores[i]:.4f}"] if scores is not None else [])
                             + ([int(rejected[i])] if rejected is not None else []) for i in order.tolist())

        with signals_held():  # the table, its summary and the tree: all of them or none
            with checkpoint.written_together() as files:
                files.write(args.output, write, binary=False)
                files.write_json(summary_path(args.output), summary)
                if staging is not None:  # (once the files are whole, which are renamed after it)
                    replaced = replace_folder(staging, args.tree)
                    staging = None
    finally:
        with signals_held(final=False):
            for path in (staging, replaced):
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
    quantiles = summary["quantiles"]
    rule = ""
    if rejected is not None:
        how = (f"below {args.reject_below:g}" if args.reject_below is not None
               else f"the lowest {args.reject_fraction:g} of them")
        rule = f"; {int(rejected.sum())} rejected ({how})"
    print(f"quality: {count_of(len(names), 'face')}: quality (feature norm) median {quantiles['0.5']:.4g}, 5% "
          f"{quantiles['0.05']:.4g}, 95% {quantiles['0.95']:.4g} (from {quantiles['0']:.4g} to {quantiles['1']:.4g})"
          f"{rule}{left_out_said((len(failures), 'photo' if args.landmarks or args.detector else 'image'))}"
          + f"; wrote {args.output}, {summary_path(args.output)}{tree_said}", file=sys.stderr)
    return 1 if failures else 0


def _check_has_norm(model_path: str, settings: dict) -> None:
    if settings.get("unit_length"):
        raise ValueError(f"--model {model_path} gives embeddings of unit length (its graph normalises them), so every "
                         "face's norm is 1: the backbone's own output has them (train.export's backbone.onnx or "
                         "backbone.pt)")


def _check_tree(args, folder: str | None, faces: str | None) -> None:
    """ValueError naming --tree when the images cannot be laid out there: faces that are not image files,
    or whose folder is not known or not there; a tree that is (or holds, or lies in) the images; one that
    exists, without --overwrite, or that holds what this tool does not write."""
    if not folder:
        raise ValueError(f"--tree: {args.embeddings} does not say where its images are (the .json train.embed writes "
                         "beside a table does): score the folder of images with --images instead")
    if faces is None:  # (train.ijb's and train.tinyface's --save-features tables, or one made by hand)
        raise ValueError(f"--tree: {args.embeddings}'s .json does not say what its rows are (its \"faces\", which "
                         "train.embed writes and train.ijb's and train.tinyface's tables lack): score the folder of "
                         "images with --images instead")
    if not faces_are_files(faces):
        if isinstance(faces, str) and faces.startswith("found and aligned by ") and faces.endswith(", every face"):
            raise ValueError("--tree lays out photos, a row each, and --all-faces makes a row of each face of a photo: "
                             "without --all-faces each photo's main face is scored; or align every face with "
                             "train.tools.align, then score the crops")
        raise ValueError(f"--tree: the faces are {faces}, not image files to lay out: align them with "
                         "train.tools.align, then score the crops")
    if not os.path.isdir(folder):
        raise ValueError(f"--tree: {folder}, the folder of the images, is not there any more")
    if inside(args.output, args.tree):
        raise ValueError(f"--output {args.output} lies in --tree {args.tree}: write the table elsewhere")
    if inside(args.tree, folder) or inside(folder, args.tree):
        raise ValueError(f"--tree {args.tree} and the images' folder {folder} overlap: name a folder outside it")
    check_tree_folder(args.tree, args.overwrite, lambda path: os.path.basename(path) in TREE_PARTS
                      and os.path.isdir(path), "a tree of kept/ and rejected/")


def _build_tree(tree: str, folder: str, names: list[str], rejected: np.ndarray, copy: bool) -> tuple[str, int, int]:
    """A hidden folder beside ``tree`` holding kept/<name> and rejected/<name> for each face, a hard link
    to its image (a copy with ``copy``, or where the file system refuses the link); (that folder, links
    made, copies made)."""
    remove_killed_runs_trees(tree)
    staging = hidden_beside(tree, "partial")
    os.mkdir(staging)
    links = copies = 0
    try:
        for part in TREE_PARTS:
            os.mkdir(os.path.join(staging, part))
        for name, out in zip(names, rejected.tolist()):
            target = os.path.join(staging, TREE_PARTS[out], name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            linked = link_or_copy(os.path.join(folder, name), target, copy)
            links += linked
            copies += not linked
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, links, copies


# ---------------------------------------------------------------------------------------------
# The evaluation


class _SetImages(torch.utils.data.Dataset):
    """A verification set's decoded images as ``train.embed.embed_images`` takes them: (image, "")."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple:
        return self.images[index], ""


def _load_pairs(path: str, image_size: int):
    """(the verification set of ``--pairs``, its 2P images' names: a pairs file's image paths, a .bin's
    indices)."""
    from train.verification import load_bin, load_pairs_list, read_pairs_list

    if os.path.isdir(path):
        raise ValueError(f"--pairs {path} is a folder: give one set's file (a .bin or a pairs file; of RFW, one "
                         "race's <Race>_test.bin)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pairs {path}: no such file{checkpoint.dangling(path)}")
    if path.endswith(".bin"):
        vset = load_bin(path, image_size)
        return vset, [str(i) for i in range(vset.images.shape[0])]
    vset = load_pairs_list(path, image_size)
    return vset, [image for pair in read_pairs_list(path)[0] for image in pair]


def read_quality_file(path: str, images: list[str], pairs_path: str) -> np.ndarray:
    """(2P,) the quality ``path`` (a CSV image,quality) gives each of the verification set's ``images``: a
    row's name relative to the folder its ``.json`` names (``images``: this tool's summary), else to the
    pairs file's folder, or absolute; of a ``.bin``, an image's index in it. ValueError naming the first
    image it lacks."""
    names, values = read_table(path)
    if not names:
        raise ValueError(f"--quality-file {path}: no rows")
    quality = dict(zip(names, values[:, 0].astype(np.float64)))
    if pairs_path.endswith(".bin"):
        keys = images
    else:
        base = os.path.dirname(os.path.abspath(pairs_path))
        try:
            with open(summary_path(path), encoding="utf-8") as f:
                recorded = json.load(f).get("images")
            base = recorded if isinstance(recorded, str) else base
        except (OSError, ValueError, AttributeError):
            pass
        quality = {os.path.realpath(os.path.join(base, name)): value for name, value in quality.items()}
        keys = [os.path.realpath(image) for image in images]
    missing = [i for i, key in enumerate(keys) if key not in quality]
    if missing:
        where = "by their index in it, 0 to 2P-1" if pairs_path.endswith(".bin") else \
            "relative to the pairs file's folder, or to the folder its .json names"
        raise ValueError(f"--quality-file {path} gives no quality for {images[missing[0]]} (pair "
                         f"{missing[0] // 2 + 1} of {pairs_path}; {count_of(len(missing), 'image')} lack one): the "
                         f"images of the pairs are named {where}")
    return np.array([quality[key] for key in keys])


def evaluate(args: argparse.Namespace) -> int:
    """The ERC of ``--pairs``; raises OSError or ValueError naming the argument or file at fault. The inputs,
    the model and the outputs are checked before the pairs are embedded."""
    from train.plots import _pyplot
    from train.verification import read_pairs_list

    device = torch_device(args.device)
    if not os.path.exists(args.pairs):
        raise FileNotFoundError(f"--pairs {args.pairs}: no such file{checkpoint.dangling(args.pairs)}")
    model, settings = load_model(args.model, device, args.amp)
    set_amp(model, args.amp, args.model, device=device)
    has_norm = not settings.get("unit_length")
    if not has_norm and not args.quality_file:
        _check_has_norm(args.model, settings)
    if args.quality_file and not os.path.isfile(args.quality_file):
        raise FileNotFoundError(f"--quality-file {args.quality_file}: no such file"
                                f"{checkpoint.dangling(args.quality_file)}")
    plot = args.plot and _pyplot() is not None
    figure = args.output[:-len(".csv")] + ".png"
    outputs = [args.output, summary_path(args.output)] + ([figure] if plot else [])
    # A pairs file's images are the ones it names, not its folder's: erc.png beside pairs.txt is no face of it.
    named = () if args.pairs.endswith(".bin") or not os.path.isfile(args.pairs) else \
        [image for pair in read_pairs_list(args.pairs)[0] for image in pair]
    check_outputs(outputs, args.overwrite, inputs=(args.model, checkpoint.settings_path(args.model), args.pairs,
                                                   args.quality_file, *named))
    # A pairs list's images are known from its lines: a --quality-file that misses one is said before they are
    # decoded (a minute for LFW's 12,000; it came after). Of a .bin, their number is known once it is read.
    external = read_quality_file(args.quality_file, named, args.pairs) if args.quality_file and named else None
    vset, images = _load_pairs(args.pairs, settings["image_size"])
    qualities = {}
    label = None
    if args.quality_file:
        label = os.path.basename(args.quality_file)
        label = label if label not in (NORM, RANDOM, ORACLE) else f"file {label}"
        if external is None:
            external = read_quality_file(args.quality_file, images, args.pairs)
    genuine = vset.issame
    if not genuine.any() or (~genuine).sum() < 2:
        raise ValueError(f"--pairs {args.pairs}: {int(genuine.sum())} genuine and {int((~genuine).sum())} impostor "
                         "pairs: the ERC needs genuine pairs and 2 impostor pairs or more")
    print(f"quality: embedding the {count_of(vset.images.shape[0], 'image')} of {vset.num_pairs} pairs of "
          f"{args.pairs} with {args.model} on {device}", file=sys.stderr, flush=True)
    norms = []
    features = embed_images(model.to(device), _SetImages(vset.images), device=device, batch_size=args.batch_size,
                            workers=0, norms=norms)
    unit = torch.nn.functional.normalize(torch.from_numpy(features).double(), dim=1).numpy()
    scores = np.einsum("ij,ij->i", unit[0::2], unit[1::2])
    if has_norm:
        qualities[NORM] = pair_quality(np.concatenate(norms).astype(np.float64))
    if label:
        qualities[label] = pair_quality(external)
    impostors = int((~genuine).sum())
    rows, curves = erc_summary(scores, genuine, qualities, args.fmr, args.max_reject)
    for row in rows:
        below = [f for f in row["fmr_requested"] if f < row["fmr"]]
        if below:
            print(f"quality: note: FMR {', '.join(f'{f:g}' for f in below)} cannot be measured on "
                  f"{impostors} impostor pairs (1 of them is {1 / impostors:.3g}): the threshold is fixed at FMR "
                  f"{row['fmr']:.3g}, the lowest they measure", file=sys.stderr)
    summary = {
        "made_by": "train.tools.quality", "model": os.path.abspath(args.model), **model_digests(args.model, model),
        "pairs": os.path.abspath(args.pairs), "pairs_count": vset.num_pairs, "genuine": int(genuine.sum()),
        "impostors": impostors, "quality_file": os.path.abspath(args.quality_file) if args.quality_file else None,
        "qualities": list(qualities), "pair_quality": "the lower of the two faces' qualities",
        "score": "cosine of the two faces' embeddings (image + mirror, unit length); a pair matches above the "
                 "threshold",
        "reject": "the lowest-quality pairs first (pairs of equal quality together: the curve straight across "
                  "them), a share of all pairs; FNMR of the genuine pairs left at the threshold fixed on all pairs; "
                  "0 where none is left",
        "auc": "trapezoids between the curve's steps (one a pair rejected), fraction of pairs x FNMR",
        "max_reject": args.max_reject, "random": "expected over random rejections", "oracle":
            "the genuine pairs that fail rejected first", "thresholds": rows,
    }
    fractions = np.linspace(0, 1, CURVE_POINTS)

    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["ordering", "fmr", "reject", "fnmr"])
        for (name, fmr), fnmr in curves.items():
            writer.writerows([name, f"{fmr:.6g}", f"{r:.2f}", f"{v:.6f}"]
                             for r, v in zip(fractions, curve_at(fnmr, fractions)))

    summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with signals_held():  # the curves, their summary and the figure: all of them or none
        with checkpoint.written_together() as files:
            files.write(args.output, write, binary=False)
            files.write_json(summary_path(args.output), summary)
            if plot:
                from train.plots import plot_erc

                plot_erc(figure, curves, args.max_reject, title=os.path.basename(args.pairs), together=files)
    print(_table(rows, args.max_reject, vset.num_pairs, int(genuine.sum()), impostors), file=sys.stderr)
    print(f"quality: wrote {args.output}, {summary_path(args.output)}" + (f", {figure}" if plot else ""),
          file=sys.stderr)
    return 0


def _table(rows: list[dict], max_reject: float, pairs: int, genuine: int, impostors: int) -> str:
    """The ERC's areas as a short table (lines of stderr)."""
    key = f"auc_0_{_percent(max_reject)}"
    lines = [f"quality: ERC on {pairs} pairs ({genuine} genuine, {impostors} impostor): the area under FNMR against "
             f"the share of pairs rejected, lowest quality first, over rejecting 0-{100 * max_reject:g}% (and 0-100%)"]
    for row in rows:
        threshold = "-" if row["threshold"] is None else f"{row['threshold']:.4f}"
        false_matches = count_of(row["false_matches"], "false match", "false matches")
        lines.append(f"  FMR {row['fmr']:.3g} (threshold {threshold}, {false_matches}): FNMR {row['fnmr']:.4f} before "
                     "rejecting")
        for name, at in row["orderings"].items():
            lines.append(f"    {name:>12}  {at[key]:.5f}  ({at['auc_0_100']:.5f})  FNMR at "
                         f"{100 * max_reject:g}% rejected {at[f'fnmr_at_{_percent(max_reject)}']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
