"""Draw training images as the trainer's loader hands them to the network (decoded, resized,
augmented, flipped) in a grid, each labelled with its identity and index, to check a training set and
its augmentations by eye: faces aligned and upright, colours right (a pack written in BGR order shows
blue faces), one identity's images alike.

    python -m train.tools.preview --data /data/faces_emore --output samples.png
    python -m train.tools.preview --data /data/faces_emore --first 0 --count 40 --output first.png
    python -m train.tools.preview --data /data/faces_emore --image 123 --count 24 --output one.png \\
        --crop-augmentation 0.2 --low-res-augmentation 0.2 --photometric-augmentation 0.2

By default --count images drawn at random from the whole set; --first I takes I, I+1, ... (a RecordIO
pack and an ImageFolder keep an identity's images together); --image I shows image I in --count
epochs, each epoch's augmentation and flip. Every option of ``python -m train`` is taken as the
trainer takes it (--config, --data, --num-classes, --image-size, --seed, the augmentations, ...), so a
preview with a run's options shows what that run trains on; the others are ignored (--output is the
image to write here, not a run's folder). An existing output is kept unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys

from train.signals import run_tool, signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "preview: "):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from train import checkpoint
    from train.tools import ArgumentParser, check_outputs, path_arg, plain_warnings

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
SAVE_OPTIONS = {"PNG": {}, "JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"lossless": True}}
LABEL_HEIGHT = 12  # pixels of text under each tile
GAP = 2


def grid(tiles: list[np.ndarray], captions: list[str], columns: int) -> Image.Image:
    """uint8 (H, W, 3) ``tiles`` in rows of ``columns`` on white, each with its caption under it; a
    cell is as wide as the widest caption (a caption cut short would show another number)."""
    height, width = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / columns)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max(width, *(math.ceil(measure.textlength(c, font=font)) for c in captions)) + GAP
    cell_h = height + LABEL_HEIGHT + GAP
    sheet = Image.new("RGB", (columns * cell_w + GAP, rows * cell_h + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (tile, caption) in enumerate(zip(tiles, captions)):
        x, y = GAP + (k % columns) * cell_w, GAP + (k // columns) * cell_h
        sheet.paste(Image.fromarray(tile), (x, y))
        draw.text((x, y + height), caption, fill="black", font=font)
    return sheet


def pick(args: argparse.Namespace, size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """The (index, epoch) of each tile."""
    if args.image is not None:
        if not 0 <= args.image < size:
            raise ValueError(f"--image {args.image}: the set has images 0 to {size - 1}")
        return [(args.image, args.epoch + k) for k in range(args.count)]
    if args.first is not None:
        if not 0 <= args.first < size:
            raise ValueError(f"--first {args.first}: the set has images 0 to {size - 1}")
        return [(index, args.epoch) for index in range(args.first, min(size, args.first + args.count))]
    chosen = rng.choice(size, size=min(args.count, size), replace=False)
    return [(int(index), args.epoch) for index in chosen]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m train.tools.preview", name="preview", description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Any option of python -m train is accepted as the trainer takes it (python -m train --help).")
    parser.add_argument("--output", type=path_arg, required=True, help="the image to write (.png, .jpg, .webp)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--first", type=int, default=None, metavar="I", help="images I, I+1, ... (default: at random)")
    which.add_argument("--image", type=int, default=None, metavar="I",
                       help="image I, once an epoch from --epoch on: its augmentations and flips")
    parser.add_argument("--count", type=int, default=64, help="how many tiles (default 64)")
    parser.add_argument("--columns", type=int, default=None, help="tiles a row (default: a square grid)")
    parser.add_argument("--epoch", type=int, default=0,
                        help="the epoch whose flips and augmentations to show (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    return parser


def _main(argv: list[str] | None = None) -> int:
    from train.config import parse_args
    from train.data import build_train_dataset, resized_note
    from train.trainer import augmentation

    parser = build_parser()
    args, trainer_argv = parser.parse_known_args(argv)
    for flag, value, least in (("--count", args.count, 1), ("--columns", args.columns, 1), ("--epoch", args.epoch, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    extension = os.path.splitext(args.output)[1].lower()
    if extension not in FORMATS:
        parser.error(f"{args.output}: name a .png, .jpg or .webp file")
    try:  # the trainer's own checks of its options
        options = parse_args(trainer_argv, prog=parser.prog, name=parser.name)
    except SystemExit as refused:  # a line naming the option, exit status 1 (argparse's: said, 2)
        if isinstance(refused.code, str):
            raise SystemExit(f"{parser.name}: error: {refused.code}") from None
        raise
    try:
        synthetic = ({"synthetic_identities": options.synthetic_identities,
                      "synthetic_images_per_identity": options.synthetic_images_per_identity}
                     if options.data == "synthetic" else {})
        dataset, classes = build_train_dataset(options.data, image_size=options.image_size, seed=options.seed,
                                               flip=True, augment=augmentation(options), **synthetic)
        if options.num_classes is not None and options.num_classes != classes:  # as the trainer refuses it
            raise ValueError(f"--num-classes is {options.num_classes}, but {options.data} holds {classes} identities")
        parts = getattr(dataset, "parts", [(options.data, dataset)])  # (--data a,b: each set's)
        for name, part in parts:
            resized = resized_note(name, part, options.image_size, "--image-size")
            if resized:
                print(resized, file=sys.stderr)
        # The grid is an image: not in an ImageFolder's identity folders (it would be a training image the
        # next time). A RecordIO folder, or an ImageFolder's root, holds no image that is read.
        identities = tuple(entry.path for name, _ in parts
                           if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "train.rec"))
                           for entry in os.scandir(name) if entry.is_dir())
        check_outputs([args.output], args.overwrite, image_folders=identities)
        keys = pick(args, len(dataset), np.random.default_rng(options.seed))
        tiles, captions = [], []
        for index, epoch in keys:
            image, label = dataset[(index, epoch)]
            tiles.append(image.numpy().transpose(1, 2, 0))
            captions.append(f"{label} e{epoch}" if args.image is not None else f"{label} #{index}")
    except (OSError, ValueError) as error:  # the data's own errors name the file and record
        print(f"preview: error: {error}", file=sys.stderr)
        return 2  # (a mistake: 2, as run_tool and argparse end; was 1)
    sheet = grid(tiles, captions, min(len(tiles), args.columns or math.ceil(math.sqrt(len(tiles)))))
    encoded = io.BytesIO()
    try:  # at the quality the details augmentations make are seen in (Pillow's defaults blur them)
        sheet.save(encoded, format=FORMATS[extension], **SAVE_OPTIONS[FORMATS[extension]])
        with signals_held():  # (a stop then waits for the file, and says it is whole)
            checkpoint.write_atomic(args.output, lambda f: f.write(encoded.getvalue()))
    except (OSError, ValueError) as error:  # a sheet past WebP's or JPEG's size limit, a full disk
        print(f"preview: error: cannot write the {sheet.width} x {sheet.height} sheet to {args.output}: "
              f"{getattr(error, 'strerror', None) or error}", file=sys.stderr)
        return 2
    described = dataset.augment.describe() if dataset.augment else "none"
    print(f"preview: wrote {len(tiles)} tiles of {options.data} ({len(dataset)} images, {classes} identities) to "
          f"{args.output}: identity and {'epoch' if args.image is not None else 'index'} under each; "
          f"augmentations: {described}", file=sys.stderr)
    return 0



def main(argv: list[str] | None = None) -> int:
    # Ctrl-C and SIGTERM: one line, exit 130 / 143 (was a KeyboardInterrupt traceback, or a death by the signal
    # without a word); _main says its own errors.
    with plain_warnings():  # the image folder's warnings as one line each
        return run_tool(lambda: _main(argv), tool="preview", errors=(), blank_line=False)


if __name__ == "__main__":
    sys.exit(main())
