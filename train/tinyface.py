"""``python -m train.tinyface``: TinyFace's 1:N identification (Cheng et al., ACCV 2018), the
low-resolution benchmark AdaFace reports beside IJB-B/C. Each image of ``Probe/`` is searched, by
cosine, among the images of ``Gallery_Match/`` and ``Gallery_Distractor/``; the result is the
fraction of probes whose identity is among the best 1, 5, 10 and 20 gallery images (closed set:
every probe's identity has images in Gallery_Match; the distractors belong to none of them). An
image's identity is its file name's number before the first ``_`` (``1234_2.jpg``).

    python -m train.tinyface --model runs/r100/export/backbone.pt --data-root /data/tinyface/Testing_Set

``--data-root`` is the folder that holds the three: the release's ``tinyface/Testing_Set`` (its faces
as cropped, a few dozen pixels, resized to the model's square input) or a copy of it with the faces
aligned, such as the ``aligned_pad_0.1_pad_high`` folder of 112 x 112 faces whose figures AdaFace
publishes. Embeddings are those of verification: image plus mirror (``--no-flip``: the image alone),
then L2-normalised (AdaFace's ``pre_norm_vector_add``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .signals import signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "tinyface: "):
    import numpy as np
    import torch

    from . import checkpoint
    from .embed import (ImageFiles, add_benchmark_options, benchmark_inputs, check_benchmark_options,
                        check_table_output, describe_about, list_images, load_model, read_about,
                        refuse_amp_of_an_onnx_model, run_stoppable, set_amp, table_files)
    from .ijb import embed_release, save_features, saved_features
    from .tools import ArgumentParser, check_outputs, path_arg, say, torch_device

FOLDERS = ("Probe", "Gallery_Match", "Gallery_Distractor")
RANKS = (1, 5, 10, 20)
# Probes a chunk of the search: 512 x 160k gallery images of float32 scores is 0.3 GB.
PROBE_CHUNK = 512


class TinyFaceProtocol:
    """The image files of the three folders (names relative to the root, sorted), and the identity of
    each probe and gallery image (-1 for the distractors)."""

    def __init__(self, root: str):
        self.root = root = find_testing_set(root)
        self.names: dict[str, list[str]] = {}
        for folder in FOLDERS:
            found = [os.path.relpath(p, root) for p in list_images(os.path.join(root, folder))]
            if not found and folder != "Gallery_Distractor":
                raise ValueError(f"--data-root {root}: {folder}/ holds no images")
            self.names[folder] = found
        self.probe_labels = identities(self.names["Probe"])
        self.match_labels = identities(self.names["Gallery_Match"])

    @property
    def image_names(self) -> list[str]:
        return [name for folder in FOLDERS for name in self.names[folder]]

    def split(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probe rows, gallery rows: match then distractors) of the features of ``image_names``."""
        probes = len(self.names["Probe"])
        return features[:probes], features[probes:]

    @property
    def gallery_labels(self) -> np.ndarray:
        return np.concatenate([self.match_labels, np.full(len(self.names["Gallery_Distractor"]), -1, dtype=np.int64)])


def find_testing_set(root: str) -> str:
    """``root``, or the ``Testing_Set`` under it (``tinyface/Testing_Set``, the release's layout), that
    holds the three folders; FileNotFoundError saying what is missing otherwise."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data-root {root}: no such folder")
    candidates = (root, os.path.join(root, "Testing_Set"), os.path.join(root, "tinyface", "Testing_Set"))
    for candidate in candidates:
        if all(os.path.isdir(os.path.join(candidate, folder)) for folder in FOLDERS):
            return candidate
    # (The first that holds some of them, as a Testing_Set under root without its distractors, is said.)
    partial = next((c for c in candidates if any(os.path.isdir(os.path.join(c, f)) for f in FOLDERS)), root)
    missing = [folder for folder in FOLDERS if not os.path.isdir(os.path.join(partial, folder))]
    where = "" if partial == root else f" {partial} has"
    raise FileNotFoundError(f"--data-root {root}:{where} no {', '.join(f + '/' for f in missing)} folder (expected "
                            f"TinyFace's Testing_Set, which holds {', '.join(FOLDERS)}, or a folder above it)")


def identities(names: list[str]) -> np.ndarray:
    """The identity of each image, the number its file name starts with before ``_`` (ASCII digits,
    at most 18, as in ``int()`` of AdaFace's reader: 0012 is 12); ValueError naming the first file
    whose name does not."""
    labels = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        head = os.path.splitext(os.path.basename(name))[0].split("_", 1)[0]
        if not (head.isascii() and head.isdigit() and len(head.lstrip("0")) <= 18):
            raise ValueError(f"{name}: expected TinyFace's <identity>_<n> file name, whose identity is a number "
                             "(of at most 18 digits)")
        labels[i] = int(head)
    return labels


def mate_ranks(probes: np.ndarray, probe_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, *,
               chunk: int = PROBE_CHUNK) -> np.ndarray:
    """(P,) the rank of each unit-length probe's best-scoring mate among the gallery images: 1 + the
    non-mates scoring at least as high, so that a tie counts against the mate; 0 where the gallery
    holds no image of the probe's identity."""
    if gallery.shape[0] == 0:
        raise ValueError("the gallery is empty")
    gallery = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    labels = torch.from_numpy(np.asarray(gallery_labels, dtype=np.int64))
    ranks = np.zeros(len(probes), dtype=np.int64)
    for start in range(0, len(probes), chunk):
        block = torch.from_numpy(np.ascontiguousarray(probes[start:start + chunk], dtype=np.float32))
        scores = block @ gallery.T
        mates = labels[None, :] == torch.from_numpy(
            np.asarray(probe_labels[start:start + chunk], dtype=np.int64))[:, None]
        best = scores.masked_fill(~mates, -torch.inf).amax(dim=1)
        above = (scores >= best[:, None]) & ~mates
        found = mates.any(dim=1)
        ranks[start:start + len(block)] = torch.where(found, 1 + above.sum(dim=1), 0).numpy()
    return ranks


def identification(protocol: TinyFaceProtocol, features: np.ndarray, ranks=RANKS) -> dict:
    """Rank-k identification rates of the features of ``protocol.image_names`` (normalised here)."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if bad.size:
        raise ValueError(f"{protocol.image_names[bad[0]]}: its feature is zero or not finite"
                         + (f" ({bad.size} such images)" if bad.size > 1 else ""))
    probes, gallery = protocol.split((features / norms).astype(np.float32))
    rank = mate_ranks(probes, protocol.probe_labels, gallery, protocol.gallery_labels)
    mated = rank > 0
    if not mated.any():
        raise ValueError("no probe's identity has an image in Gallery_Match: nothing to rank (are the file names "
                         "TinyFace's <identity>_<n>?)")
    return {"probes": int(len(probes)), "probes_without_mate": int((~mated).sum()),
            "gallery_match": len(protocol.names["Gallery_Match"]),
            "gallery_distractors": len(protocol.names["Gallery_Distractor"]),
            "identities": int(len(np.unique(protocol.match_labels))),
            "rank": {k: float(np.mean(rank[mated] <= k)) if mated.any() else None for k in ranks}}


def main(argv: list[str] | None = None) -> int:
    return run_stoppable(_main, argv, "tinyface")


def _main(argv: list[str] | None) -> int:
    p = ArgumentParser(prog="python -m train.tinyface", name="tinyface", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_options(
        p, features_help="instead of a model, the image features an earlier run saved with --save-features",
        workers_help="DataLoader processes decoding images",
        flip_help="add the embedding of the mirrored image (the default)")
    p.add_argument("--data-root", "--data_root", type=path_arg, dest="data_root", required=True,
                   help="the folder holding Probe/, Gallery_Match/ and Gallery_Distractor/ (TinyFace's Testing_Set, "
                   "or an aligned copy of it), or a folder above it")
    p.add_argument("--output", type=path_arg, default="tinyface.json", help="results JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --output and --save-features files that exist")
    args = p.parse_args(argv)
    written = [args.output, *(table_files(args.save_features, about=True) if args.save_features else [])]
    unused = check_benchmark_options(p, args, written, "--output and --save-features")
    started = time.monotonic()
    try:
        device = torch_device(args.device)
        if not args.features:  # (before the release is listed, as train.embed and train.verify refuse it)
            refuse_amp_of_an_onnx_model(args.amp, args.model)
        protocol = TinyFaceProtocol(args.data_root)
        if args.features:
            model, size = None, None
            features = saved_features(args.features, protocol.image_names, "features of another release?")
            about = read_about(args.features, features)
        else:
            model, settings = load_model(args.model, device, args.amp)
            set_amp(model, args.amp, args.model, device=device)
            size = settings["image_size"]
        # Before the embedding, not after it; not an image's name among the release's.
        if args.save_features:
            check_table_output("--save-features", args.save_features)
        check_outputs(written, args.overwrite, inputs=benchmark_inputs(args), image_folders=(protocol.root,))
    except (OSError, ValueError) as error:
        say(f"tinyface: error: {error}", file=sys.stderr)
        return 2
    if unused:  # (said once nothing above refuses the run)
        say(unused, file=sys.stderr)
    names = protocol.image_names
    say(f"TinyFace: {len(protocol.names['Probe'])} probes searched among {len(protocol.names['Gallery_Match'])} "
          f"gallery images and {len(protocol.names['Gallery_Distractor'])} distractors; "
          + (f"features from {args.features}{describe_about(about)}" if args.features
             else f"embedding at {size}px on {device}"), flush=True)
    embedding_started = time.monotonic()
    if model is not None:
        features = embed_release(model, ImageFiles([os.path.join(protocol.root, n) for n in names], size),
                                 protocol.root, args, device, tool="tinyface")
        if features is None:
            return 2
    embedding_seconds = time.monotonic() - embedding_started
    features_saved = True
    if args.save_features:
        features_saved = save_features(
            args, names, features, model, settings, made_by="train.tinyface", tool="tinyface",
            images=f"TinyFace's Probe, Gallery_Match and Gallery_Distractor under {os.path.abspath(protocol.root)}")
    try:
        scores = identification(protocol, features)
    except ValueError as error:
        say(f"tinyface: error: {error}", file=sys.stderr)
        return 2
    if scores["probes_without_mate"]:
        alone = scores["probes_without_mate"]
        say("note: 1 probe has no image of its identity in Gallery_Match; it is left out of the rates" if alone == 1
            else f"note: {alone} probes have no image of their identity in Gallery_Match; they are left out of the "
                 "rates")
    say("  ".join(f"rank-{k} {100 * v:.2f}%" for k, v in scores["rank"].items() if v is not None))
    result = {"benchmark": "TinyFace", "model": os.path.abspath(args.model) if args.model else None,
              **({"features": os.path.abspath(args.features), "features_about": about} if args.features else {}),
              "data_root": os.path.abspath(protocol.root),
              "options": {"flip": None if args.features else args.flip, "image_size": size,
                          "batch_size": None if args.features else args.batch_size,
                          "device": None if args.features else str(device),
                          "amp": None if args.features else getattr(model, "amp", "none")},
              **scores,
              "seconds": {"embedding": round(embedding_seconds, 1), "total": round(time.monotonic() - started, 1)}}
    try:
        with signals_held():
            checkpoint.write_json_atomic(args.output, result)
    except OSError as error:
        say(f"tinyface: error: could not write {args.output}: {error}", file=sys.stderr)
        return 2
    say(f"wrote {args.output}")
    return 0 if features_saved else 2


if __name__ == "__main__":
    sys.exit(main())
