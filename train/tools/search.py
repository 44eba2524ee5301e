"""``python -m train.tools.search``: who is this? Probe faces searched among a gallery of named people
with a trained model (1:N open-set identification).

    python -m train.tools.search --model runs/r50/checkpoint.pt --gallery gallery/ --save-gallery gallery.npy
    python -m train.tools.search --model runs/r50/checkpoint.pt --gallery gallery.npy --probes probes/

The gallery is an ImageFolder of aligned faces, ``gallery/<person>/<image>``, embedded as
``train.embed`` embeds them (image + mirror, unit length; photos with ``--detector``, each one's main
face found and aligned), or a table that ``train.embed --images gallery/`` or ``--save-gallery`` wrote
(a row's first folder is its person; the model that made it must be ``--model``). Each person is one
template, the mean of their embeddings re-normalised (``--per-image``: each person scores their best
image). Each probe (a folder of aligned faces, any nesting; one image; a table; photos with
``--landmarks`` or ``--detector``, as ``train.embed`` takes them) gets its ``--top-k`` people by
cosine, searched in blocks, and a decision: the best person when at or above ``--threshold`` (default:
the one the gallery's table records, else the model's 1:1 verification threshold), else ``unknown``.
Outputs: ``--output`` (``results.csv``: ``probe,rank,person,cosine,decision``) and a summary beside it
(``.json``). With ``--probe-labels`` the search is scored: rank-1 and rank-5 identification rates of
the probes whose person is enrolled, the detection and identification rate (DIR) at the threshold, and
the false positive identification rate (FPIR) of those whose person is not; and, where some are not,
the operating points: the threshold and DIR at FPIR 1%, 5%, 10% and 20% of them. ``--fpir`` decides at
the threshold of an FPIR on these probes, and with ``--save-gallery`` records it in the gallery's table
for the searches that come later.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time

from train.signals import Stopped, run_tool, signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "search: "):
    import numpy as np
    import torch

    from train import checkpoint
    from train.data.imagefolder import scan_image_folder
    from train.data.transforms import IMAGE_EXTENSIONS
    from train.embed import (DEFAULT_COSINE_THRESHOLD, MODEL_HELP, _warn_if_not_aligned, _warn_left_out,
                             _warn_others_not_square, about_path, check_table_output, embed_detected, embed_files,
                             embed_listed_faces, faces_described, images_under, listed_faces, load_model, made_with,
                             made_with_one_model, model_digests, model_threshold, open_detector, read_about,
                             read_table, refuse_amp_of_an_onnx_model, set_amp, table_files, write_table)
    from train.ijb import allowed_passes, negatives_needed, template_features, threshold_allowing
    from train.tools import (ArgumentParser, add_detector_option, add_embedding_options, check_embedding_options,
                             check_outputs, check_photo_options, count_of, left_out_said, listable_name, path_arg,
                             plain_warnings, summary_path, torch_device)
    from train.tools.similarity import best_people

DEFAULT_TOP_K = 5
RANKS = (1, 5)  # the identification rates reported with --probe-labels
OPERATING_FPIRS = (0.01, 0.05, 0.1, 0.2)  # the operating points reported with --probe-labels (and 1/non-mated)
UNKNOWN = "unknown"  # the decision for a probe no person reaches the threshold for


class Faces:
    """Embedded faces: their names (a path under their folder, or a table's row), (N, D) float32 unit
    embeddings, and what made them (a table's provenance, or what this run records); for a gallery folder,
    what of it was left out (``left_out``: the images, and the people, by name)."""

    def __init__(self, names: list[str], embeddings: np.ndarray, about: dict | None, left_out: dict | None = None):
        self.names, self.embeddings, self.about = names, embeddings, about or {}
        self.left_out = left_out or {"images": 0, "people": []}


def first_folder(name: str) -> str | None:
    """The first folder of a face's name (``alice/01.jpg`` -> ``alice``); None for a name without one."""
    parts = name.replace(os.sep, "/").split("/")
    return parts[0] if len(parts) > 1 and parts[0] else None


def _main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.tools.search", name="search", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=path_arg, default=None,
                   help=MODEL_HELP + "; with tables alone only for its threshold (default: the model the gallery "
                   "table's .json names, where it still is)")
    p.add_argument("--gallery", type=path_arg, required=True, metavar="DIR|TABLE",
                   help="the people to search among: an ImageFolder of aligned faces (photos with --detector), "
                   "DIR/<person>/<image>, or a table (.npy with its .txt, or .csv) that --save-gallery or "
                   "train.embed --images DIR wrote")
    p.add_argument("--save-gallery", type=path_arg, metavar="TABLE", default=None,
                   help="also write the gallery's embeddings as a table (.npy with a .txt, or .csv; a .json beside "
                   "it names the model), for --gallery TABLE next time: the gallery is embedded once")
    p.add_argument("--per-image", action="store_true",
                   help="score each person by their best image rather than by their template (the mean of their "
                   "embeddings, re-normalised)")
    p.add_argument("--probes", type=path_arg, metavar="DIR|IMAGE|TABLE", default=None,
                   help="the faces to search for: a folder of aligned faces (any nesting), one image, or a table "
                   "train.embed wrote")
    p.add_argument("--probe-labels", type=path_arg, metavar="folder|FILE", default=None,
                   help="who each probe is, to score the search: 'folder' (a probe's first folder under --probes, or "
                   "in its table row's name, is its person), or a CSV file of lines probe,person")
    p.add_argument("--landmarks", type=path_arg, metavar="FILE", default=None,
                   help="the probes are photos under --probes DIR: search the faces this file lists, each aligned "
                   "from its 5 landmarks (as train.embed --landmarks); the probes' only: a --gallery folder is "
                   "read as aligned faces (photos there: --detector)")
    p.add_argument("--extension", default=None, help="appended to every image path of --landmarks")
    add_detector_option(p, "the probes, and the images of a --gallery folder,",
                        "each one's main face (--all-faces: every face of a probe; a gallery photo gives its main "
                        "face)")
    p.add_argument("--all-faces", action="store_true",
                   help="with --landmarks or --detector: every face of a probe photo, named <image>#<k> (a --gallery "
                   "folder's photo gives its main face)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"how many people to list for each probe, most alike first (default {DEFAULT_TOP_K})")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine similarity at or above which a probe is its best person, else unknown (default: "
                   "the search threshold the gallery's table records (--fpir with --save-gallery); else the "
                   "model's 1:1 threshold from its last verification, as train.embed --compare takes it, which "
                   f"lets in most strangers among many people; else {DEFAULT_COSINE_THRESHOLD}; -1: always the best "
                   "person, closed-set)")
    p.add_argument("--fpir", type=float, default=None, metavar="RATE",
                   help="choose the threshold by its false positive identification rate instead (e.g. 0.01): the "
                   "lowest cosine (4 decimals) that at most this share of the non-mated probes (--probe-labels: "
                   "people not enrolled) reach; with --save-gallery the gallery's table records it, and later "
                   "searches of that table take it")
    p.add_argument("--output", type=path_arg, default="results.csv",
                   help="the table probe,rank,person,cosine,decision (a .csv; default results.csv), with the "
                   "summary beside it (.json)")
    add_embedding_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output, its .json and --save-gallery's files when they exist")
    args = p.parse_args(argv)
    if not args.probes and not args.save_gallery:
        p.error("--probes is needed (or --save-gallery alone, to enrol the gallery)")
    if args.top_k < 1:
        p.error(f"--top-k must be at least 1, got {args.top_k}")
    check_embedding_options(p, args)
    if args.threshold is not None and not -1 <= args.threshold <= 1:
        p.error(f"--threshold is a cosine similarity, from -1 to 1: got {args.threshold:g}")
    if args.fpir is not None:
        if args.threshold is not None:
            p.error("--fpir and --threshold both set the threshold: give one")
        if not 0 < args.fpir < 1:
            p.error(f"--fpir is a share of the non-mated searches, above 0 and below 1: got {args.fpir:g}")
        if not args.probe_labels:
            p.error("--fpir needs --probe-labels: the rate is measured on probes of people not enrolled")
    if not args.output.endswith(".csv"):
        p.error(f"--output names a .csv file, got {args.output}")
    for flag, value in (("--probe-labels", args.probe_labels), ("--all-faces", args.all_faces)):
        if value and not args.probes:
            p.error(f"{flag} goes with --probes")
    if args.landmarks and not args.probes:
        p.error("--landmarks goes with --probes (a landmarks file of the probe photos)")
    # (--detector with --save-gallery alone enrols a gallery folder of photos)
    check_photo_options(p, args, "--probes" if args.probes else "--save-gallery")
    args.written = []  # the outputs in place, for what a stop says

    def said(stop: Stopped) -> str | None:
        if args.written and args.output not in args.written:
            return f": the gallery's table was written ({', '.join(args.written)}), no results"
        return None

    # Ctrl-C and SIGTERM unwind (the decoding workers leave them to this process): the gallery's table is
    # written whole as soon as it is embedded, the results and their summary whole, both or neither.
    return run_tool(lambda: run(args), tool="search", said=said)


def main(argv: list[str] | None = None) -> int:
    with plain_warnings():
        return _main(argv)


def _read_faces(flag: str, path: str, takes: str = "table") -> Faces:
    """A table given to ``flag``: its rows of unit length, and its provenance. ``takes``: what ``flag`` takes,
    which a path with nothing there is said to be none of."""
    if not os.path.isfile(table_files(path)[0]) and not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such {takes}{checkpoint.dangling(path)}")
    names, embeddings = read_table(path)
    if not names:
        raise ValueError(f"{flag} {path}: the table holds no faces")
    about = read_about(path, embeddings)
    # Rows of unit length already (train.embed's, --save-gallery's) are taken as they are: normalised again,
    # their last bits can change (torch 2.4's normalize), and a saved gallery would not give the scores that
    # the folder it was saved from gave.
    # (In float64 a few thousand rows at a time, and the rows that are not normalised in their place: the
    # table is held once, where a whole float64 copy and its squares would be four times its size.)
    unit = np.ascontiguousarray(embeddings, np.float32)
    norms = np.concatenate([np.linalg.norm(unit[start:start + 4096].astype(np.float64), axis=1)
                            for start in range(0, len(unit), 4096)])
    off = np.abs(norms - 1) > 1e-6
    if off.any():
        if not unit.flags.writeable:
            unit = unit.copy()
        unit[off] = torch.nn.functional.normalize(torch.from_numpy(unit[off]), dim=1).numpy()
    return Faces(names, unit, about)


def _check_made_with(faces: Faces, flag: str, path: str, model_path: str | None, model: torch.nn.Module | None,
                     settings: dict, digests: dict, tool: str = "search") -> None:
    """ValueError when the table at ``path`` (``flag``'s) was not made with the model at ``model_path``
    (loaded as ``model``): its provenance records the digest of other weights (or, where it records none
    of the weights, of another model file: ``made_with``), or its embeddings are of another size than the
    model's."""
    width = settings.get("embedding_size")
    if width is not None and width != faces.embeddings.shape[1]:
        raise ValueError(f"{flag} {path} holds {faces.embeddings.shape[1]}-D embeddings, --model {model_path} gives "
                         f"{width}-D ones: the table was made with another model")
    told = made_with(faces.about, model_path, model, digests) if model_path else None
    recorded = faces.about.get("model")
    if model_path and told is None and recorded and os.path.realpath(recorded) != os.path.realpath(model_path):
        print(f"{tool}: note: {flag} {path} was made with {recorded} (its .json records no digest to check): "
              f"its embeddings are taken for {model_path}'s", file=sys.stderr)
    if told is not None and not told[0]:
        # (A table of versions before the weights' digest knows its model by the file alone: the same weights in
        # another file, a checkpoint's train.export backbone.pt say, are another model to it.)
        older = told[1] == "file" and "model_weights_sha256" not in faces.about \
            and not str(recorded).lower().endswith(".onnx")
        raise ValueError(f"{flag} {path} was made with another model than {model_path} ({recorded} as it was then; "
                         f"its .json records the SHA-256 of that model's {told[1]}"
                         + (", as tables of older versions do, not of its weights" if older else "")
                         + "): embeddings of two models cannot be compared; embed it again with this model")


def scoring(args: argparse.Namespace) -> str:
    """How a person scores a probe: ``template`` or ``per-image`` (a threshold is chosen for one)."""
    return "per-image" if args.per_image else "template"


def recorded_threshold(args: argparse.Namespace, gallery: Faces | None) -> tuple[float, str] | None:
    """(cosine, where it came from): the search threshold the gallery's table records (``--fpir`` with
    ``--save-gallery`` wrote it), when it is the one to take (no ``--threshold`` or ``--fpir``), and it was
    chosen for this run's scores; else None, with a note when one is left aside."""
    record = gallery.about.get("search_threshold") if gallery is not None else None
    if record is None or args.threshold is not None or args.fpir is not None or not args.probes:
        return None
    provenance = about_path(table_files(args.gallery)[0])
    cosine = record.get("cosine") if isinstance(record, dict) else None
    if not isinstance(cosine, (int, float)) or isinstance(cosine, bool) or not -1 <= cosine <= 1:
        print(f"search: note: {provenance} records no cosine as its search threshold ({record!r}): left aside",
              file=sys.stderr)
        return None
    if record.get("scoring") != scoring(args):
        print(f"search: note: the search threshold {provenance} records ({cosine:.4f}) was chosen for "
              f"{record.get('scoring')} scores, this search makes {scoring(args)} ones: left aside", file=sys.stderr)
        return None
    return float(cosine), f"recorded in {provenance}: {record.get('from', 'no origin recorded')}"


def run(args: argparse.Namespace) -> int:
    """``main`` after parsing; raises OSError or ValueError naming the argument or file at fault. The
    inputs, the model and the outputs are checked before any face is embedded."""
    device = torch_device(args.device)
    if args.model:  # (before the gallery table, the probes folder and --landmarks are read, as train.embed refuses it)
        refuse_amp_of_an_onnx_model(args.amp, args.model)
    gallery_folder = args.gallery if os.path.isdir(args.gallery) else None
    gallery = None if gallery_folder else _read_faces("--gallery", args.gallery, "folder or table")
    if gallery is not None and args.save_gallery and args.fpir is None:
        raise ValueError(f"--save-gallery with --gallery {args.gallery}: the gallery is a table already (with "
                         "--fpir, --save-gallery writes a copy that records the threshold)")
    probe_folder = probe_image = probes = probe_paths = listed = None
    if args.probes:
        if os.path.isdir(args.probes):
            probe_folder = args.probes
            # Listed once, here (it was walked again to count them for --fpir, and again to embed them): a folder
            # without images is said before the gallery folder is embedded (minutes on; it came after).
            probe_paths = images_under(probe_folder, "--probes")
        elif args.probes.lower().endswith(IMAGE_EXTENSIONS):
            if not os.path.isfile(args.probes):
                raise FileNotFoundError(f"--probes {args.probes}: no such image{checkpoint.dangling(args.probes)}")
            probe_image = args.probes
        else:
            probes = _read_faces("--probes", args.probes, "folder, image or table")
        if args.landmarks and not probe_folder:
            raise ValueError(f"--landmarks: --probes {args.probes} is not a folder (the photos the file lists are "
                             "found under it)")
        if (args.landmarks or args.detector) and probes is not None:
            raise ValueError(f"--probes {args.probes} is a table: its faces are embedded already "
                             f"({'--landmarks' if args.landmarks else '--detector'} finds faces in photos)")
        if args.probe_labels == "folder" and probe_image:
            raise ValueError(f"--probe-labels folder: --probes {args.probes} is one image, not a folder of people's "
                             "folders")
        if args.landmarks:
            # Read, and its photos found, now: a file not there, a malformed line or a photo not under --probes was
            # said once the gallery folder had been embedded (minutes on).
            listed = listed_faces(probe_folder, args.landmarks, extension=args.extension, several=args.all_faces)

    # Without --model, the model the gallery's table was made with (its digest checked below) embeds the
    # probes and gives the threshold.
    embeds = bool(gallery_folder or (args.probes and probes is None))
    if args.amp is not None and not embeds:  # (was taken without a word, as cluster's with --embeddings was)
        tables = [f"{flag} {value}" for flag, value in (("--gallery", args.gallery), ("--probes", args.probes))
                  if value]
        are = "are tables" if len(tables) > 1 else "is a table"
        raise ValueError(f"--amp {args.amp}: {' and '.join(tables)} {are}, whose embeddings are as they were made")
    recorded = recorded_threshold(args, gallery)
    model_path = args.model
    needs_threshold = args.threshold is None and args.fpir is None and recorded is None
    # On the threshold, for a run that goes ahead: said once the refusals below are past (they came before them).
    notes = []
    if model_path is None and (embeds or needs_threshold) and gallery is not None \
            and gallery.about.get("model"):
        if os.path.isfile(gallery.about["model"]):
            model_path = args.model = gallery.about["model"]
        elif embeds:  # (why the refusal below asks for --model)
            print(f"search: note: {gallery.about['model']}, the model the gallery was made with, is not there any "
                  "more", file=sys.stderr)
        else:
            notes.append(f"search: note: {gallery.about['model']}, the model the gallery was made with, is not "
                         "there any more: its threshold is not known")
    if embeds and not model_path:
        raise ValueError("--model is needed: it embeds the faces of " + " and ".join(
            f"{flag} {value}" for flag, value, table in (("--gallery", args.gallery, gallery),
                                                          ("--probes", args.probes, probes))
            if value and table is None))
    model, settings = (None, {})
    if model_path:
        model, settings = load_model(model_path, device if embeds else "cpu", args.amp)
        if embeds:
            set_amp(model, args.amp, model_path, device=device)
    digests = {}
    for faces, flag, path in ((gallery, "--gallery", args.gallery), (probes, "--probes", args.probes)):
        if faces is not None:
            _check_made_with(faces, flag, path, model_path, model, settings, digests)
    if gallery is not None and probes is not None:
        if gallery.embeddings.shape[1] != probes.embeddings.shape[1]:
            raise ValueError(f"--gallery {args.gallery} holds {gallery.embeddings.shape[1]}-D embeddings, --probes "
                             f"{args.probes} {probes.embeddings.shape[1]}-D ones: made with two models")
        if made_with_one_model(gallery.about, probes.about) is False:
            raise ValueError(f"--gallery {args.gallery} and --probes {args.probes} were made with two models (their "
                             ".json files record other SHA-256s): embeddings of two models cannot be compared")
    if args.fpir is not None:
        threshold, threshold_source = None, "--fpir"  # chosen by the search
    elif recorded is not None:
        threshold, threshold_source = recorded
    else:
        threshold, threshold_source, note = model_threshold(model_path, settings, args.threshold, tool="search")
        notes += [note] if note else []
    one_to_one = args.fpir is None and recorded is None and args.threshold is None  # (the model's own threshold)
    labels_file = args.probe_labels if args.probe_labels not in (None, "folder") else None
    if labels_file and not os.path.isfile(labels_file):
        what = "a folder, not a file" if os.path.isdir(labels_file) else \
            f"no such file{checkpoint.dangling(labels_file)}"
        raise FileNotFoundError(f"--probe-labels {labels_file}: {what} (or 'folder': each probe's first folder is "
                                "its person)")
    labels = read_probe_labels(labels_file) if labels_file else None
    # A line that is not probe,person, a probe the file does not list or one in no folder: said now, where it was
    # said once the gallery folder and the probes had been embedded. (A probe left out later, an image that does not
    # decode, must be listed too.)
    known = _probe_names(args, probe_paths, probes, listed)
    truth = people_of_probes(args, known, labels) if known is not None else None
    # Listed now: a gallery folder without people is said before anything is embedded, and its people tell which
    # probes are of someone not enrolled.
    scanned = _scan_gallery(args) if gallery_folder else None

    if args.fpir is not None:
        _check_fpir_measurable(args, probes, probe_paths, listed)
        if truth is not None:
            enrolled = set(scanned[0]) if scanned else {first_folder(name) for name in gallery.names}
            _check_fpir_strangers(args, truth, enrolled)

    outputs = [args.output, summary_path(args.output)] if args.probes else []
    if args.save_gallery:
        check_table_output("--save-gallery", args.save_gallery)
        outputs += table_files(args.save_gallery, about=True)
    if len({os.path.realpath(path) for path in outputs}) < len(outputs):
        raise ValueError(f"--output {args.output} and --save-gallery {args.save_gallery} must be different files")
    inputs = (model_path, checkpoint.settings_path(model_path) if model_path else None, args.landmarks, args.detector,
              labels_file, probe_image, *(table_files(args.gallery, about=True) if gallery is not None else ()),
              *(table_files(args.probes, about=True) if probes is not None else ()))
    detector = open_detector(args.detector, device) if args.detector else None
    check_outputs(outputs, args.overwrite, inputs=inputs, image_folders=(gallery_folder, probe_folder))
    for note in notes:
        print(note, file=sys.stderr)

    failures = []  # (the gallery's, then the probes')
    if gallery_folder:
        gallery = _embed_gallery(args, model, settings, device, detector, failures, scanned)
    gallery_failures = len(failures)
    if args.save_gallery and gallery_folder:  # (a table's copy, with --fpir, is written with the results)
        about = {"made_by": "train.tools.search", "model": os.path.abspath(args.model),
                 **model_digests(args.model, model), "image_size": settings["image_size"], "flip": True,
                 "amp": getattr(model, "amp", "none"), "normalised": True, "images": os.path.abspath(gallery_folder),
                 "faces": faces_described(detector=args.detector)}
        with signals_held():
            written = write_table(args.save_gallery, gallery.names, gallery.embeddings, about=about)
        args.written += written
        print(f"search: enrolled {count_of(len(set(map(first_folder, gallery.names))), 'person', 'people')} "
              f"({count_of(len(gallery.names), 'image')}): wrote {', '.join(written)}", file=sys.stderr)
        if not args.probes:
            return 1 if failures else 0
    try:
        if probes is None:
            probes = _embed_probes(args, model, settings, device, detector, failures, probe_paths, listed)
        if one_to_one:  # (said here, after what can go wrong with the faces: an error is then the first thing seen)
            print(f"search: note: cosine {threshold:.4f} is a 1:1 threshold, for telling whether two faces are one "
                  "person (python -m train.tools.roc measures what it gives on labelled faces); a search compares a "
                  "face with every person, and among many people most strangers reach it. Calibrate on probes of "
                  "people enrolled and not (--probe-labels): take --threshold from the operating points it prints, "
                  "or --fpir 0.01 (with --save-gallery, recorded for later searches)",
                  file=sys.stderr)
        return _search(args, gallery, probes, threshold, threshold_source, model_path, failures[gallery_failures:],
                       failures[:gallery_failures], labels)
    except (OSError, ValueError) as error:
        if not args.written:
            raise
        # (--save-gallery's table is whole, and kept: the gallery need not be embedded again)
        raise type(error)(f"{error} (the gallery's table was written: {', '.join(args.written)}; "
                          f"--gallery {args.save_gallery} searches it without embedding it again)") from None


def _check_fpir_measurable(args, probes: Faces | None, probe_paths: list[str] | None, listed) -> None:
    """ValueError naming --fpir, before any face is embedded (and --save-gallery's table written), when the
    probes are too few for it even were each of them a non-mated search: a table's rows, one image, a
    folder's images (each photo's main face under --detector), --landmarks' lines. (--all-faces: a photo's
    faces are not known before they are found.)"""
    if args.all_faces:
        return
    if probes is not None:
        searches = len(probes.names)
    elif listed is not None:
        searches = len(listed.names)
    elif probe_paths is not None:
        searches = len(probe_paths)
    else:
        searches = 1
    needed = negatives_needed(args.fpir)
    if searches < needed:
        raise ValueError(f"--fpir {args.fpir:g} is measured on {needed} non-mated searches or more (probes of people "
                         f"not enrolled), and --probes {args.probes} holds {count_of(searches, 'probe')} in all")


def _scan_gallery(args) -> tuple[list[str], list[tuple[str, int]]]:
    """The people and images of the ImageFolder ``--gallery`` (:func:`scan_image_folder`); ValueError naming
    it when no person's folder holds an image, or a person is named as the decision for no one."""
    try:
        people, samples = scan_image_folder(args.gallery)
    except (OSError, ValueError) as error:  # (no person's folder holds images)
        raise ValueError(f"--gallery: {error}: a gallery is a folder a person, <gallery>/<person>/<image>") from None
    if UNKNOWN in people:
        raise ValueError(f"--gallery {args.gallery}: a person is named {UNKNOWN!r}, the decision for a probe that "
                         "is no one enrolled: rename that folder")
    return people, samples


def _check_fpir_strangers(args, truth: list[str], enrolled: set[str]) -> None:
    """ValueError naming --fpir, before any face is embedded, when too few of the probes (``truth``: their
    people by --probe-labels) are of people not ``enrolled`` (the gallery's, by its folders or its table's
    rows) to measure it: as :func:`_fpir_threshold` says once the faces are searched. (A person of a gallery
    folder whose images all fail to read, left out later, counts as enrolled: their probes are not the
    strangers the rate is meant for.)"""
    _say_too_few_strangers(args, sum(person not in enrolled for person in truth), len(truth))


def _say_too_few_strangers(args, non_mated: int, searches: int) -> None:
    """ValueError naming --fpir when ``non_mated`` of the ``searches`` cannot measure it."""
    if not non_mated:
        raise ValueError(f"--fpir {args.fpir:g}: none of the {searches} probes is of a person not enrolled "
                         f"(--probe-labels {args.probe_labels}), and the FPIR is measured on those")
    if allowed_passes(args.fpir, non_mated) < 1:  # (as operating_points finds no threshold)
        raise ValueError(f"--fpir {args.fpir:g}: {non_mated} non-mated searches measure an FPIR of {1 / non_mated:.3g} "
                         f"at best (1 of them); {args.fpir:g} needs {negatives_needed(args.fpir)} or more")


def _embed_gallery(args, model, settings: dict, device, detector, failures: list[str],
                   scanned: tuple[list[str], list[tuple[str, int]]]) -> Faces:
    """The faces of the ImageFolder ``--gallery`` (``scanned``: :func:`_scan_gallery`'s), embedded (with
    ``detector``, opened: photos, each one's main face found and aligned, as the probes' are); a person none
    of whose images can be read (or has a face found), or whose folder holds none, is left out, with a warning
    (added to ``failures``)."""
    people, samples = scanned
    # A person's folder without an image (empty, or photos in another format) is someone the user meant to
    # enrol: said, and the exit status 1, as for a person whose images do not decode.
    empty = sorted(name for name in os.listdir(args.gallery) if not name.startswith(".") and name not in people
                   and os.path.isdir(os.path.join(args.gallery, name)))
    if empty:
        failures.append(f"--gallery: not enrolled, no {'/'.join(IMAGE_EXTENSIONS)} image directly in the folder: "
                        f"{', '.join(empty[:5])}{f' and {len(empty) - 5} more' if len(empty) > 5 else ''}")
    paths = [path for path, _ in samples]
    names = [os.path.relpath(path, args.gallery) for path in paths]
    readable = np.array([listable_name(name) for name in names], dtype=bool)
    failures += [f"{path!r}: its name is not UTF-8 text without line breaks, which a row of the table must be"
                 for path, ok in zip(paths, readable) if not ok]
    if not readable.any():
        raise ValueError(failures[0])
    if not detector:
        _warn_if_not_aligned(paths[:1])
    print(f"search: embedding {count_of(len(paths), 'photo' if detector else 'image')} of "
          f"{count_of(len(people), 'person', 'people')} under {args.gallery} with {args.model} "
          f"({settings['image_size']}px) on {device}", file=sys.stderr, flush=True)
    kept = np.flatnonzero(readable)
    warned = 0  # (the failures warned of already)
    if detector:  # each photo's main face, named as its photo; a photo without one is left out, and warned of
        found_names, found = embed_detected(model, detector, [paths[i] for i in kept], [names[i] for i in kept],
                                            settings["image_size"], failures=failures,
                                            where=f"under --gallery {args.gallery} (with --detector, a gallery "
                                            "folder is of photos; a gallery of aligned faces: enrol it without "
                                            "--detector, with --save-gallery, and search that table)", device=device,
                                            batch_size=args.batch_size, workers=args.workers)
        warned = len(failures)
        row_of = {name: row for row, name in enumerate(found_names)}
        embeddings = np.full((len(paths), found.shape[1]), np.nan, dtype=np.float32)
        for i in kept:
            if names[i] in row_of:
                embeddings[i] = found[row_of[names[i]]]
            else:
                readable[i] = False
    else:
        not_square, unreadable = [], []
        found = embed_files(model, [paths[i] for i in kept], settings["image_size"], device=device,
                            batch_size=args.batch_size, workers=args.workers, not_square=not_square,
                            unreadable=unreadable)
        _warn_others_not_square([paths[i] for i in kept], not_square)
        embeddings = np.full((len(paths), found.shape[1]), np.nan, dtype=np.float32)
        embeddings[kept] = found
        failures += [why for _, why in unreadable]
        readable[kept[[i for i, _ in unreadable]]] = False
    labels = np.array([label for _, label in samples])
    lost = [people[label] for label in np.unique(labels) if not readable[labels == label].any()]
    failures += [f"--gallery: {'no face is found in the photos' if detector else 'none of the images'} of {person}"
                 f"{'' if detector else ' can be read'}: {person} is left out" for person in lost]
    _warn_left_out(failures[warned:])
    if not readable.any():
        raise ValueError(f"--gallery {args.gallery}: none of the {len(paths)} images can be read")
    return Faces([name for name, ok in zip(names, readable) if ok], embeddings[readable],
                 {"model": os.path.abspath(args.model)}, {"images": int((~readable).sum()), "people": empty + lost})


def _embed_probes(args, model, settings: dict, device, detector, failures: list[str],
                  folder_paths: list[str] | None, listed) -> Faces:
    """The probe faces of ``--probes`` (a folder, whose images are ``folder_paths``, or one image; photos with
    --landmarks, whose faces are ``listed``, or ``detector``, opened), embedded as ``train.embed`` embeds them; a
    face that cannot be read is left out (``failures``)."""
    size = settings["image_size"]
    if args.landmarks:
        names, embeddings = embed_listed_faces(model, args.probes, args.landmarks, size, extension=args.extension,
                                               several=args.all_faces, device=device, batch_size=args.batch_size,
                                               workers=args.workers, listed=listed)
        return Faces(names, embeddings, None)
    folder = args.probes if folder_paths is not None else None
    paths = folder_paths if folder else [args.probes]
    names = [os.path.relpath(path, folder) if folder else path for path in paths]
    listable = [listable_name(name) for name in names]
    left = [f"{path!r}: its name is not UTF-8 text without line breaks, which a row of the table must be"
            for path, ok in zip(paths, listable) if not ok]
    paths, names = [p for p, ok in zip(paths, listable) if ok], [n for n, ok in zip(names, listable) if ok]
    print(f"search: embedding {count_of(len(paths), 'probe image')} with {args.model} on {device}", file=sys.stderr,
          flush=True)
    if detector and paths:
        names, embeddings = embed_detected(model, detector, paths, names, size, failures=left,
                                           where=f"of --probes {args.probes}", all_faces=args.all_faces,
                                           device=device, batch_size=args.batch_size, workers=args.workers)
        failures += left
        return Faces(names, embeddings, None)
    unreadable, not_square = [], []
    if paths:
        _warn_if_not_aligned(paths[:1])
        embeddings = embed_files(model, paths, size, device=device, batch_size=args.batch_size, workers=args.workers,
                                 not_square=not_square, unreadable=unreadable)
        _warn_others_not_square(paths, not_square)
    left += [why for _, why in unreadable]
    _warn_left_out(left)
    failures += left
    readable = np.ones(len(paths), dtype=bool)
    readable[[i for i, _ in unreadable]] = False
    if not readable.any():
        raise ValueError(f"--probes {args.probes}: none of the {len(paths) + len(left) - len(unreadable)} images "
                         "can be read")
    return Faces([n for n, ok in zip(names, readable) if ok], embeddings[readable], None)


def read_probe_labels(path: str) -> dict[str, str]:
    """{probe: person} of the CSV file at ``path``: lines ``probe,person`` (a first line ``probe,person``
    is a header). ValueError naming the line of a probe listed twice or of a line that is not two fields."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:  # (was the codec's words alone, naming neither the option nor the file)
        line = error.object[:error.start].count(b"\n") + 1
        raise ValueError(f"--probe-labels {path}: line {line}: not UTF-8 text ({error.reason}); save the list as "
                         "UTF-8") from None
    person = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    for row in reader:
        if not row or (reader.line_num == 1 and row == ["probe", "person"]):
            continue
        if len(row) != 2 or not row[0] or not row[1]:
            raise ValueError(f"--probe-labels {path}: line {reader.line_num}: expected probe,person")
        if row[0] in person:
            raise ValueError(f"--probe-labels {path}: line {reader.line_num}: {row[0]} is listed again")
        person[row[0]] = row[1]
    return person


def people_of_probes(args, names: list[str], labels: dict[str, str] | None) -> list[str] | None:
    """The person of each probe named in ``names`` by ``--probe-labels`` (its file read as ``labels``), or
    None without it. ValueError naming the first probe the file does not list, or (``folder``) that is in
    no folder."""
    if args.probe_labels is None:
        return None
    if args.probe_labels != "folder":
        missing = [name for name in names if name not in labels]
        if missing:
            raise ValueError(f"--probe-labels {args.probe_labels} does not list the probe {missing[0]}"
                             + (f" ({len(missing)} probes are not listed)" if len(missing) > 1 else ""))
        return [labels[name] for name in names]
    people = [first_folder(name) for name in names]
    if None in people:
        raise ValueError(f"--probe-labels folder: the probe {names[people.index(None)]} is in no folder (its "
                         "first folder is its person)")
    return people


def probe_people(args, probes: Faces, gallery_people: list[str], labels: dict[str, str] | None) -> list[str] | None:
    """Each probe's person by ``--probe-labels`` (:func:`people_of_probes`), or None without it (a note when
    the probes' first folders look like the gallery's people, which ``--probe-labels folder`` would score)."""
    if args.probe_labels is None:
        folders = {first_folder(name) for name in probes.names}
        named = folders & set(gallery_people)
        if named:
            print(f"search: note: the probes' first folders name {count_of(len(named), 'person', 'people')} of the "
                  "gallery: --probe-labels folder would score the search", file=sys.stderr)
        return None
    return people_of_probes(args, probes.names, labels)


def _probe_names(args, probe_paths: list[str] | None, probes: Faces | None, listed) -> list[str] | None:
    """The probes' names as the search names them, known before any is embedded: a table's rows, a folder's
    images (those whose name can be a row), one image, the faces --landmarks lists; None under --detector
    --all-faces, whose names (<photo>#<k>) are known once the faces are found."""
    if probes is not None:
        return probes.names
    if listed is not None:
        from train.tools.align import face_numbers
        return [f"{name}#{k}" for name, k in zip(listed.names, face_numbers(listed.names))] if args.all_faces \
            else list(listed.names)
    if args.detector and args.all_faces:
        return None
    if probe_paths is not None:
        return [name for name in (os.path.relpath(path, args.probes) for path in probe_paths) if listable_name(name)]
    return [args.probes]


def identification_rates(ranks: np.ndarray, best: np.ndarray, mated: np.ndarray, threshold: float) -> dict:
    """Open-set identification at ``threshold`` from each probe's mate rank (0: no mate), best cosine and
    whether its person is enrolled (a mated search): rank-k rates and DIR over the mated searches (DIR:
    the mate ranks first and reaches the threshold), FPIR over the non-mated (the best person reaches
    it), and the mated searches taken for another person (the best, not the mate, reaches it). A rate
    over no search is None."""
    accepted = best >= threshold

    def rate(hit, over):
        return float(np.mean(hit[over])) if over.any() else None
    return {"mated_searches": int(mated.sum()), "non_mated_searches": int((~mated).sum()),
            **{f"rank_{k}": rate((ranks >= 1) & (ranks <= k), mated) for k in RANKS},
            "dir": rate((ranks == 1) & accepted, mated), "fpir": rate(accepted, ~mated),
            "misidentified": rate((ranks != 1) & accepted, mated)}


def cosine_above(score: float) -> float:
    """The lowest cosine of 4 decimals (as ``--threshold`` takes it, and the operating points print it)
    that a float32 cosine ``score`` does not reach: ``score`` and those below it are refused there, and so
    are the scores above it by less than the rounding up (under 1e-4). -1 for -inf (every score is above)."""
    if score == -math.inf:
        return -1.0
    cosine = math.ceil(score * 1e4) / 1e4
    while np.float32(cosine) <= np.float32(score):  # the decisions compare in float32
        cosine = round(cosine + 1e-4, 4)
    return cosine


def operating_fpirs(non_mated: int) -> list[float]:
    """The FPIRs of the operating points: ``OPERATING_FPIRS`` and the lowest ``non_mated`` searches
    resolve, one of them (not for one search: FPIR 1, every stranger let in, at threshold -1, is no point)."""
    return sorted(set(OPERATING_FPIRS) | ({1 / non_mated} if non_mated > 1 else set()))


def operating_points(ranks: np.ndarray, best: np.ndarray, mated: np.ndarray, fpirs) -> list[dict]:
    """For each FPIR: the lowest threshold at which at most floor(FPIR x N) of the N non-mated searches'
    best people reach it (fewer where their cosines tie there), chosen as ``train.ijb`` chooses it
    (``threshold_allowing``) and given as a cosine of 4 decimals (:func:`cosine_above`), and the rates at
    that threshold (:func:`identification_rates`): ``dir``, ``fpir_reached``, ``false_alarms``,
    ``misidentified``. All None where floor(FPIR x N) is 0: N searches cannot measure that FPIR."""
    non_mated = np.sort(best[~mated])
    points = []
    for fpir in fpirs:
        point = {"fpir": fpir, "threshold": None, "dir": None, "fpir_reached": None, "false_alarms": None,
                 "misidentified": None}
        highest_refused = threshold_allowing(non_mated, fpir)
        if highest_refused is not None:
            threshold = cosine_above(highest_refused)
            rates = identification_rates(ranks, best, mated, threshold)
            point.update(threshold=threshold, dir=rates["dir"], fpir_reached=rates["fpir"],
                         false_alarms=int((non_mated >= threshold).sum()), misidentified=rates["misidentified"])
        points.append(point)
    return points


def _points_said(points: list[dict], non_mated: int, mated: int, scores: str) -> str:
    """The operating points as a short table (lines of stderr)."""
    def share(value):
        return "-" if value is None else f"{value:.2%}"
    lines = [f"search: operating points on {non_mated} non-mated and {mated} mated searches ({scores} scores): the "
             "lowest threshold that at most FPIR of the non-mated reach",
             f"  {'FPIR':>6}  {'threshold':>9}  {'DIR':>7}  {'strangers in':>12}  {'another person':>14}"]
    for point in points:
        fpir = f"{point['fpir']:.2%}".replace(".00%", "%")
        if point["threshold"] is None:
            needed = negatives_needed(point["fpir"])
            lines.append(f"  {fpir:>6}  {'-':>9}  needs {needed} non-mated searches or more")
        else:
            strangers = f"{point['false_alarms']} of {non_mated}"
            lines.append(f"  {fpir:>6}  {point['threshold']:>9.4f}  {share(point['dir']):>7}  {strangers:>12}  "
                         f"{share(point['misidentified']):>14}")
    return "\n".join(lines)


def _fpir_threshold(args, ranks: np.ndarray, best: np.ndarray, mated: np.ndarray) -> dict:
    """The operating point of ``--fpir`` on these probes; ValueError naming it when they have no
    non-mated search, or too few to measure it."""
    _say_too_few_strangers(args, int((~mated).sum()), len(mated))
    point = operating_points(ranks, best, mated, [args.fpir])[0]
    assert point["threshold"] is not None
    return point


def _record_threshold(args, gallery: Faces, point: dict, non_mated: int) -> list[str]:
    """``--save-gallery``'s table records the threshold ``--fpir`` chose (its ``.json``'s
    ``search_threshold``): the table enrolled from a folder has its ``.json`` written again; a gallery
    that was a table is copied with it. Returns the files written."""
    record = {"cosine": point["threshold"], "scoring": scoring(args), "fpir": args.fpir,
              "false_alarms": point["false_alarms"], "non_mated_searches": non_mated, "dir": point["dir"],
              "probes": os.path.abspath(args.probes),
              "from": f"--fpir {args.fpir:g}, {point['false_alarms']} of {non_mated} non-mated searches of "
                      f"{os.path.abspath(args.probes)} at or above it"}
    if os.path.isdir(args.gallery):
        provenance = about_path(table_files(args.save_gallery)[0])
        with open(provenance, encoding="utf-8") as f:
            about = json.load(f)
        checkpoint.write_json_atomic(provenance, {**about, "search_threshold": record})
        return [provenance]
    about = {key: value for key, value in gallery.about.items() if key not in ("rows", "values", "written", "sha256")}
    return write_table(args.save_gallery, gallery.names, gallery.embeddings,
                       about={**about, "normalised": True, "copied_from": os.path.abspath(args.gallery),
                              "search_threshold": record})


def _search(args, gallery: Faces, probes: Faces, threshold: float | None, threshold_source: str,
            model_path: str | None, failures: list[str], gallery_failures: list[str],
            labels: dict[str, str] | None) -> int:
    people_of = [first_folder(name) for name in gallery.names]
    if None in people_of:
        row = people_of.index(None)
        raise ValueError(f"--gallery {args.gallery}: row {row + 1}, {gallery.names[row]}, is in no folder: a gallery "
                         "table's row names its person as its first folder (<person>/<image>)")
    people, person = np.unique(people_of, return_inverse=True)
    people = people.tolist()
    if UNKNOWN in people:
        raise ValueError(f"--gallery {args.gallery}: a person is named {UNKNOWN!r}, the decision for a probe that is "
                         "no one enrolled: rename them")
    if gallery.embeddings.shape[1] != probes.embeddings.shape[1]:
        raise ValueError(f"--gallery {args.gallery} holds {gallery.embeddings.shape[1]}-D embeddings, --probes "
                         f"{args.probes} {probes.embeddings.shape[1]}-D ones: made with two models")
    truth = probe_people(args, probes, people, labels)
    mates = None
    if truth is not None:
        row_of = {name: row for row, name in enumerate(people)}
        mates = torch.tensor([row_of.get(name, -1) for name in truth], dtype=torch.int64)
        if not (mates >= 0).any():  # (probes/<session>/<person>/..., say: a layout mistake more often than not)
            print(f"search: note: --probe-labels {args.probe_labels} names none of the gallery's people (as "
                  f"{truth[0]!r} for {probes.names[0]}): every search is scored as of someone not enrolled"
                  + (" (a probe's first folder under --probes is its person)" if args.probe_labels == "folder"
                     else ""), file=sys.stderr)
    started = time.monotonic()
    if args.per_image:
        rows, row_person = torch.from_numpy(gallery.embeddings), torch.from_numpy(person)
    else:
        _, templates = template_features(gallery.embeddings, person, np.arange(len(person)))
        rows, row_person = torch.from_numpy(templates.astype(np.float32)), torch.arange(len(people))
    found, cosines, ranks = best_people(torch.from_numpy(probes.embeddings), rows, row_person, len(people),
                                        args.top_k, device=torch.device(args.device), mates=mates)
    seconds = time.monotonic() - started
    points = chosen = None
    if truth is not None:
        mated, best = mates.numpy() >= 0, cosines[:, 0]
        non_mated = int((~mated).sum())
        if non_mated:
            points = operating_points(ranks, best, mated, operating_fpirs(non_mated))
        if args.fpir is not None:
            chosen = _fpir_threshold(args, ranks, best, mated)
            threshold = chosen["threshold"]
            threshold_source = (f"--fpir {args.fpir:g}: {chosen['false_alarms']} of {non_mated} non-mated searches "
                                "at or above it")
    decision = [people[f] if c >= threshold else UNKNOWN for f, c in zip(found[:, 0], cosines[:, 0])]
    matched = sum(d != UNKNOWN for d in decision)
    summary = {
        "made_by": "train.tools.search", "model": os.path.abspath(model_path) if model_path else None,
        "gallery": os.path.abspath(args.gallery), "gallery_model": gallery.about.get("model"),
        "people": len(people), "gallery_images": len(gallery.names), "gallery_left_out": gallery.left_out,
        "scoring": scoring(args),
        "probes": os.path.abspath(args.probes), "searches": len(probes.names), "left_out": len(failures),
        "top_k": int(found.shape[1]), "threshold": round(threshold, 6), "threshold_from": threshold_source,
        "matched": matched, "unknown": len(decision) - matched, "seconds": round(seconds, 3),
        "labels": args.probe_labels, "fpir": args.fpir,
    }
    scored = ""
    if truth is not None:
        rates = identification_rates(ranks, best, mated, threshold)
        summary["identification"] = rates
        summary["operating_points"] = points
        scored = "; " + _rates_said(rates)
    summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["probe", "rank", "person", "cosine", "decision"] + (["probe_person"] if truth else []))
        for p, name in enumerate(probes.names):
            extra = [truth[p]] if truth else []
            writer.writerows([name, r + 1, people[f], f"{c:.6f}", decision[p], *extra]
                             for r, (f, c) in enumerate(zip(found[p].tolist(), cosines[p].tolist())))

    with signals_held():  # the table and its summary: both or neither
        with checkpoint.written_together() as files:
            files.write(args.output, write, binary=False)
            files.write_json(summary_path(args.output), summary)
        args.written += [args.output, summary_path(args.output)]
        if chosen is not None and args.save_gallery:
            recorded = _record_threshold(args, gallery, chosen, non_mated)
            args.written += recorded
    if points:
        print(_points_said(points, non_mated, int(mated.sum()), summary["scoring"]), file=sys.stderr)
    print(f"search: {count_of(len(probes.names), 'probe')} among {count_of(len(people), 'person', 'people')} "
          f"({count_of(len(gallery.names), 'image')}; {summary['scoring']} scores): {matched} matched, "
          f"{summary['unknown']} unknown at threshold {threshold:.4f} ({threshold_source}), {seconds:.1f} s"
          f"{scored}{_left_out_said(gallery.left_out, len(failures))}; wrote {args.output}, {summary_path(args.output)}"
          + (f"; the threshold is recorded in {recorded[-1]}" if chosen is not None and args.save_gallery else ""),
          file=sys.stderr)
    return 1 if failures or gallery_failures else 0


def _left_out_said(gallery_left_out: dict, probes: int) -> str:
    """What the warnings above left out, counted for the run's last line ('' for nothing)."""
    return left_out_said((len(gallery_left_out["people"]), "person", "people"),
                         (gallery_left_out["images"], "gallery image"), (probes, "probe"))


def _rates_said(rates: dict) -> str:
    def share(value):
        return "-" if value is None else f"{value:.2%}"
    return (f"of {rates['mated_searches']} mated searches rank-1 {share(rates['rank_1'])}, rank-5 "
            f"{share(rates['rank_5'])}, DIR {share(rates['dir'])} (another person: {share(rates['misidentified'])}); "
            f"FPIR {share(rates['fpir'])} of {rates['non_mated_searches']} non-mated")


if __name__ == "__main__":
    sys.exit(main())
