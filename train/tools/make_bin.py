"""Write a verification set in insightface's `.bin` format (a pickle of
`(bins, issame_list)`: two encoded images per pair, one bool per pair), from
the synthetic faces, from random pairs of an ImageFolder, or from a pairs list.

    python -m train.tools.make_bin OUT.bin --synthetic [--name lfw] [--pairs 600] [--image-size 112]
    python -m train.tools.make_bin OUT.bin --image-folder ROOT [--pairs 600]
    python -m train.tools.make_bin OUT.bin --pairs-list pairs.txt

An existing OUT.bin is kept (an error says so) unless --overwrite is given.
"""

from __future__ import annotations

import os
import pickle
import sys

from train.signals import run_tool, signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "make_bin: "):
    import numpy as np

    from train import checkpoint
    from train.data.imagefolder import scan_image_folder
    from train.data.synthetic import synthetic_pairs
    from train.data.transforms import decode_image, encode_image
    from train.tools import ArgumentParser, check_outputs, path_arg, plain_warnings
    from train.verification import NFOLDS, read_pairs_list

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
    """`num_pairs` random pairs of an ImageFolder, no two alike (either way round), alternating same /
    different identity (so every contiguous fold is balanced); same pairs come from identities with
    at least two images. Raises ValueError when the folder has fewer distinct pairs of a kind than
    asked for (a pair drawn twice would count twice in the accuracy)."""
    identities, samples = scan_image_folder(root)
    by_label: list[list[str]] = [[] for _ in identities]
    for path, label in samples:
        by_label[label].append(path)
    multi = [label for label, paths in enumerate(by_label) if len(paths) >= 2]
    if not multi or len(identities) < 2:
        raise ValueError(f"{root}: need an identity with 2+ images and 2+ identities to make pairs")
    sizes = np.array([len(paths) for paths in by_label], dtype=np.int64)
    issame = np.arange(num_pairs) % 2 == 0
    wanted = {"same": int(issame.sum()), "different": int((~issame).sum())}
    available = {"same": int((sizes * (sizes - 1) // 2).sum()),
                 "different": int((sizes.sum() ** 2 - (sizes ** 2).sum()) // 2)}
    for kind, count in wanted.items():
        if count > available[kind]:
            raise ValueError(f"{root} has {available[kind]} distinct pairs of {kind} identities: --pairs {num_pairs} "
                             f"needs {count} (half the pairs are of the same identity, half of different ones)")
    rng = np.random.default_rng(seed)
    # Same pairs: an identity drawn among those with pairs left (an identity of two images has one; without
    # this, a few large identities among many small ones would leave the draw repeating exhausted ones).
    live, used = list(multi), {label: 0 for label in multi}
    label_of = {path: label for label in multi for path in by_label[label]}

    def same_pair():
        paths = by_label[live[rng.integers(len(live))]]
        i, j = rng.choice(len(paths), 2, replace=False)
        return paths[i], paths[j]

    def took_same(pair):
        label = label_of[pair[0]]
        used[label] += 1
        if used[label] == sizes[label] * (sizes[label] - 1) // 2:
            live.remove(label)

    def different_pair():
        a, b = rng.choice(len(identities), 2, replace=False)
        return by_label[a][rng.integers(len(by_label[a]))], by_label[b][rng.integers(len(by_label[b]))]

    def every(kind):
        if kind == "same":
            return [(paths[i], paths[j]) for paths in by_label for i in range(len(paths))
                    for j in range(i + 1, len(paths))]
        return [(first, second) for a in range(len(by_label)) for b in range(a + 1, len(by_label))
                for first in by_label[a] for second in by_label[b]]

    draw = {"same": same_pair, "different": different_pair}
    took = {"same": took_same, "different": None}
    drawn = {kind: _distinct(draw[kind], count, available[kind], lambda kind=kind: every(kind), rng, took[kind])
             for kind, count in wanted.items()}
    order = {kind: iter(found) for kind, found in drawn.items()}
    pairs = [next(order["same" if same else "different"]) for same in issame]
    return pairs, issame


# Up to this many distinct pairs of a kind, a request for a large share of them takes them from the
# list of all; past it, pairs are drawn and repeats drawn again.
ENUMERATE_PAIRS = 500_000


def _distinct(draw, count: int, available: int, every, rng, took=None) -> list[tuple[str, str]]:
    """``count`` pairs (``available`` of them exist), none twice either way round: from ``draw()``, a
    repeat drawn again (``took(pair)`` told of each new one), or, for a large share of a few (or when
    repeats keep coming), a sample of ``every()``."""
    if count * 4 > available and available <= ENUMERATE_PAIRS:
        pairs = every()
        return [pairs[i] for i in sorted(rng.choice(len(pairs), count, replace=False))]
    seen, out = set(), []
    for _ in range(50 * count + 10_000):
        if len(out) == count:
            return out
        pair = draw()
        key = (min(pair), max(pair))
        if key not in seen:
            seen.add(key)
            out.append(pair)
            if took is not None:
                took(pair)
    if len(out) == count:
        return out
    if available > ENUMERATE_PAIRS:
        raise ValueError(f"could not draw {count} distinct pairs (of {available}): ask for fewer")
    pairs = every()
    return [pairs[i] for i in sorted(rng.choice(len(pairs), count, replace=False))]


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


def _main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.tools.make_bin", name="make_bin",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=path_arg,
                        help="the .bin to write (an existing file is kept unless --overwrite is given)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", action="store_true", help="pairs of synthetic verification identities")
    source.add_argument("--image-folder", type=path_arg, metavar="ROOT", help="random pairs from an ImageFolder")
    source.add_argument("--pairs-list", type=path_arg, metavar="FILE",
                        help="the pairs of a list: 'image1 image2 0|1' per line")
    parser.add_argument("--pairs", type=int, default=None,
                        help=f"number of pairs, at least {NFOLDS} (one a fold of the 10-fold accuracy), none twice "
                        "(synthetic, image folder; default 600)")
    parser.add_argument("--name", default=None, help="synthetic set name; different names, disjoint identities "
                                                      "(default: the output's file stem)")
    parser.add_argument("--image-size", type=int, default=None, help="synthetic image size (default 112)")
    parser.add_argument("--seed", type=int, default=None, help="the draw of the pairs (synthetic, image folder; "
                        "default 0)")
    parser.add_argument("--format", choices=("jpeg", "png"), default=None,
                        help="synthetic image encoding (default jpeg; the other sources keep their files' bytes)")
    parser.add_argument("--quality", type=int, default=None, help="JPEG quality for synthetic images (default 95)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    args = parser.parse_args(argv)
    # Options that shape what another source makes are refused, not ignored: a folder's and a list's
    # images are written as their files are, and a list gives its own pairs.
    only = {"--name": args.name, "--image-size": args.image_size, "--format": args.format, "--quality": args.quality}
    if not args.synthetic:
        given = [flag for flag, value in only.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)} shape{'s' if len(given) == 1 else ''} synthetic images: "
                         f"--{'image-folder' if args.image_folder else 'pairs-list'} writes its images' files as they "
                         "are (train.tools.align --image-size/--format makes crops of another size or encoding)")
    if args.pairs_list and (args.pairs is not None or args.seed is not None):
        parser.error("--pairs and --seed go with --synthetic or --image-folder: --pairs-list gives its own pairs")
    args.pairs = 600 if args.pairs is None else args.pairs
    args.seed = 0 if args.seed is None else args.seed
    args.image_size = 112 if args.image_size is None else args.image_size
    args.format = args.format or "jpeg"
    args.quality = 95 if args.quality is None else args.quality
    if args.image_size < 1:
        parser.error(f"--image-size must be at least 1, got {args.image_size}")
    # (each was taken: a quality out of JPEG's range or for a PNG; numpy's "expected non-negative integer")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be 1 to 100, got {args.quality}")
    if args.format == "png" and only["--quality"] is not None:
        parser.error("--quality is JPEG's: --format png is lossless")
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, got {args.seed}")
    if args.pairs_list and not os.path.isfile(args.pairs_list):  # (was "[Errno 2] No such file or directory: ...")
        parser.error(f"--pairs-list {args.pairs_list}: " + ("a folder, not a pairs list" if os.path.isdir(
            args.pairs_list) else f"no such file{checkpoint.dangling(args.pairs_list)}"))
    if not args.output.endswith(".bin"):
        parser.error(f"name the output NAME.bin, got {args.output}: train.verify and the trainer's --val-targets take "
                     "a path ending in .bin, and a name without it for a set in the data folder")
    if args.pairs < NFOLDS:
        parser.error(f"--pairs must be at least {NFOLDS}, one a fold of the 10-fold accuracy that train.verify and "
                     f"the trainer compute, got {args.pairs}")
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
                if len(issame) < NFOLDS:
                    raise ValueError(f"{args.pairs_list} lists {len(issame)} pairs: a set needs at least {NFOLDS}, "
                                     "one a fold of the 10-fold accuracy")
            encoded = _file_bytes(pairs)
        with signals_held():  # (a stop then waits for the file, and says it is whole)
            write_bin(args.output, encoded, issame)
    except (OSError, ValueError) as exc:
        print(f"make_bin: error: {exc}", file=sys.stderr)
        return 2
    print(f"make_bin: wrote {len(issame)} pairs ({int(np.sum(issame))} same) to {args.output}", file=sys.stderr)
    return 0



def main(argv: list[str] | None = None) -> int:
    # Ctrl-C and SIGTERM: one line, exit 130 / 143 (was a KeyboardInterrupt traceback, or a death by the signal
    # without a word); _main says its own errors.
    with plain_warnings():  # the image folder's warnings as one line each
        return run_tool(lambda: _main(argv), tool="make_bin", errors=(), blank_line=False)


if __name__ == "__main__":
    sys.exit(main())
