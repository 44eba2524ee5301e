"""``python -m train.embed``: embeddings of aligned face images with a trained backbone, and the
comparison of two faces (cosine similarity and a same/different decision).

Embeddings are made the way verification makes them: embedding(image) + embedding(mirrored
image), L2-normalised, images scaled as (x - 127.5) / 127.5 at the model's input size.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

from . import checkpoint
from .data.transforms import IMAGE_EXTENSIONS, load_image_file
from .verification import compute_embeddings

# Cosine similarity above which two faces are called the same when the model carries no
# verification threshold of its own.
DEFAULT_COSINE_THRESHOLD = 0.3


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively), sorted."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def embed_files(model: torch.nn.Module, paths: list[str], image_size: int, *, device="cpu",
                batch_size: int = 64) -> np.ndarray:
    """(len(paths), D) float32 unit-length embeddings."""
    images = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        images[i] = torch.from_numpy(load_image_file(path, image_size).transpose(2, 0, 1).copy())
    model = model.to(device)
    return compute_embeddings(model, SimpleNamespace(images=images), device=device, batch_size=batch_size)


def cosine_threshold(settings: dict, requested: float | None) -> tuple[float, str]:
    """The same/different threshold on cosine similarity and where it came from. Verification
    picks a threshold t on the squared distance of unit vectors, which is 2 - 2·cos."""
    if requested is not None:
        return requested, "--threshold"
    if "threshold" in settings:
        return 1.0 - settings["threshold"] / 2.0, "the model's last verification"
    return DEFAULT_COSINE_THRESHOLD, "the default"


def write_table(path: str, names: list[str], embeddings: np.ndarray) -> list[str]:
    """``.npy`` (plus ``.txt`` listing the images in row order) or ``.csv`` (name, values); returns
    the files written (``np.save`` adds ``.npy`` to a path without it)."""
    if path.endswith(".csv"):
        with open(path, "w", encoding="utf-8") as f:
            f.write("image," + ",".join(f"e{j}" for j in range(embeddings.shape[1])) + "\n")
            for name, row in zip(names, embeddings):
                f.write(f"{name}," + ",".join(f"{v:.7g}" for v in row) + "\n")
        return [path]
    if not path.endswith(".npy"):
        path += ".npy"
    np.save(path, embeddings)
    index = os.path.splitext(path)[0] + ".txt"
    with open(index, "w", encoding="utf-8") as f:
        f.writelines(name + "\n" for name in names)
    return [path, index]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a training checkpoint, or backbone.pt from python -m train.export")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", metavar="DIR", help="embed every image under this folder")
    what.add_argument("--compare", nargs=2, metavar=("IMAGE1", "IMAGE2"), help="compare two face images")
    p.add_argument("--output", default="embeddings.npy",
                   help="with --images: .npy (+ .txt listing the images) or .csv")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine similarity at or above which two faces are the same person; default: from the "
                   f"model's last verification, else {DEFAULT_COSINE_THRESHOLD}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64)
    args = p.parse_args(argv)

    try:
        model, settings = checkpoint.load_backbone(args.model)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = settings["image_size"]
    if args.compare:
        for path in args.compare:
            if not os.path.isfile(path):
                print(f"error: no image at {path}", file=sys.stderr)
                return 2
        first, second = embed_files(model, list(args.compare), size, device=args.device)
        similarity = float(np.dot(first, second))
        threshold, source = cosine_threshold(settings, args.threshold)
        verdict = "same person" if similarity >= threshold else "different people"
        print(f"cosine similarity {similarity:.4f}: {verdict} (threshold {threshold:.4f}, from {source})")
        return 0

    paths = list_images(args.images)
    if not paths:
        print(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) under {args.images}", file=sys.stderr)
        return 2
    embeddings = embed_files(model, paths, size, device=args.device, batch_size=args.batch_size)
    names = [os.path.relpath(path, args.images) for path in paths]
    written = write_table(args.output, names, embeddings)
    print(f"embedded {len(paths)} images ({embeddings.shape[1]}-D, {size}px): {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
