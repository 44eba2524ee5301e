"""Write a verification set in insightface's `.bin` format (a pickle of
`(bins, issame_list)`: two encoded images per pair, one bool per pair), from
the synthetic faces, from random pairs of an ImageFolder, or from a pairs list.

    python -m train.tools.make_bin OUT.bin --synthetic [--name lfw] [--pairs 600] [--image-size 112]
    python -m train.tools.make_bin OUT.bin --image-folder ROOT [--pairs 600]
    python -m train.tools.make_bin OUT.bin --pairs-list pairs.txt

An existing OUT.bin is kept (an error says so) unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

import numpy as np

from train import checkpoint
from train.data.imagefolder import scan_image_folder
from train.data.synthetic import synthetic_pairs
from train.data.transforms import decode_image, encode_image
from train.tools import check_outputs
from train.verification import read_pairs_list

# The side of insightface's aligned faces: the images of a .bin usually have it already, so that
# checking that they decode resizes none of them.
ALIGNED_SIZE = 112


def write_bin(path: str, encoded_images: list[bytes], issame) -> None:
    """Pickle (bins, issame_list) to `path` (via a temporary file, then rename).
    Protocol 4: plain bytes/list/bool opcodes, no globals, readable by any Python 3."""
    issame = [bool(x) for x in np.asarray(issame, dtype=bool).reshape(-1)]
    if len(encoded_images) != 2 * len(issame):
        raise ValueError(f"{len(issame)} pairs need {2 * len(issame)} images, got {len(encoded_images)}")
    content = ([bytes(b) for b in encoded_images], issame)
    checkpoint.write_atomic(path, lambda f: pickle.dump(content, f, protocol=4))


def encode_pairs(images, *, fmt: str = "jpeg", quality: int = 95) -> list[bytes]:
    """Encode uint8 (2P, 3, H, W) images (tensor or array) as JPEG/PNG bytes."""
    array = np.asarray(images)
    return [encode_image(np.ascontiguousarray(img.transpose(1, 2, 0)), fmt=fmt, quality=quality) for img in array]


def image_folder_pairs(root: str, num_pairs: int, *, seed: int = 0) -> tuple[list[tuple[str, str]], np.ndarray]:
    """`num_pairs` random pairs of an ImageFolder, alternating same / different
    identity (so every contiguous fold is balanced); same pairs come from
    identities with at least two images."""
    identities, samples = scan_image_folder(root)
    by_label: list[list[str]] = [[] for _ in identities]
    for path, label in samples:
        by_label[label].append(path)
    multi = [label for label, paths in enumerate(by_label) if len(paths) >= 2]
    if not multi or len(identities) < 2:
        raise ValueError(f"{root}: need an identity with 2+ images and 2+ identities to make pairs")
    rng = np.random.default_rng(seed)
    pairs, issame = [], np.arange(num_pairs) % 2 == 0
    for same in issame:
        if same:
            paths = by_label[multi[rng.integers(len(multi))]]
            i, j = rng.choice(len(paths), 2, replace=False)
            pairs.append((paths[i], paths[j]))
        else:
            a, b = rng.choice(len(identities), 2, replace=False)
            pairs.append((by_label[a][rng.integers(len(by_label[a]))], by_label[b][rng.integers(len(by_label[b]))]))
    return pairs, issame


def _file_bytes(pairs: list[tuple[str, str]]) -> list[bytes]:
    """The files of ``pairs`` as they are, each checked to decode as ``load_bin`` will decode it
    (ValueError naming the file otherwise): a .bin holding an undecodable image fails only when
    training reads it."""
    out = []
    for pair in pairs:
        for path in pair:
            with open(path, "rb") as f:
                data = f.read()
            decode_image(data, ALIGNED_SIZE, source=path)
            out.append(data)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.tools.make_bin", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the .bin to write (an existing file is kept unless --overwrite is given)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", action="store_true", help="pairs of synthetic verification identities")
    source.add_argument("--image-folder", metavar="ROOT", help="random pairs from an ImageFolder")
    source.add_argument("--pairs-list", metavar="FILE", help="the pairs of a list: 'image1 image2 0|1' per line")
    parser.add_argument("--pairs", type=int, default=600, help="number of pairs (synthetic, image folder)")
    parser.add_argument("--name", default=None, help="synthetic set name; different names, disjoint identities "
                                                      "(default: the output's file stem)")
    parser.add_argument("--image-size", type=int, default=112, help="synthetic image size (default 112)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg", help="synthetic image encoding")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for synthetic images")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    args = parser.parse_args(argv)
    if args.image_size < 1:
        parser.error(f"--image-size must be at least 1, got {args.image_size}")
    try:
        # Not the list, nor an image it names, nor an image's name among the photos a pair is drawn from.
        listed = [path for pair in read_pairs_list(args.pairs_list)[0] for path in pair] if args.pairs_list else []
        check_outputs([args.output], args.overwrite, inputs=(args.pairs_list, *listed),
                      image_folders=(args.image_folder,) if args.image_folder else
                      (os.path.dirname(os.path.abspath(args.pairs_list)),) if args.pairs_list else ())
        if args.synthetic:
            name = args.name or os.path.splitext(os.path.basename(args.output))[0]
            images, issame = synthetic_pairs(name, num_pairs=args.pairs, num_identities=max(2, args.pairs // 2),
                                             image_size=args.image_size, seed=args.seed)
            encoded = encode_pairs(images, fmt=args.format, quality=args.quality)
        else:
            if args.image_folder:
                pairs, issame = image_folder_pairs(args.image_folder, args.pairs, seed=args.seed)
            else:
                pairs, issame = read_pairs_list(args.pairs_list)
            encoded = _file_bytes(pairs)
        write_bin(args.output, encoded, issame)
    except (OSError, ValueError) as exc:
        print(f"make_bin: error: {exc}", file=sys.stderr)
        return 1
    print(f"make_bin: wrote {len(issame)} pairs ({int(np.sum(issame))} same) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
