"""Pack an ImageFolder (one sub-folder per identity) into insightface's RecordIO
layout, `train.rec` + `train.idx` + `property`, readable by this trainer and by
mxnet / insightface alike.

    python -m train.tools.pack_rec IMAGE_FOLDER OUTPUT_DIR [--quality 95] [--resize 112] [--overwrite]

Records: 0 holds the identity range `[N + 1, N + 1 + C]` (flag 2, no image);
1..N the images, label = identity index in sorted folder order; N + 1 .. N + C
one per identity with the range `[first, end)` of its image records.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

from train import checkpoint
from train.data.imagefolder import scan_image_folder
from train.data.recordio import RecordIOWriter, pack_payload
from train.data.transforms import decode_failure, encode_image, to_rgb
from train.tools import check_outputs

OUTPUT_FILES = ("train.rec", "train.idx", "property")


def _image_bytes(path: str, *, resize: int | None, quality: int) -> tuple[bytes, tuple[int, int]]:
    """The JPEG to store for `path` and its (width, height). A JPEG already of the
    wanted size is stored as it is; anything else is decoded and re-encoded."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format == "JPEG" and (resize is None or img.size == (resize, resize)):
                return data, img.size
            rgb = to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot decode image: {decode_failure(exc)}") from exc
    if resize is not None and rgb.size != (resize, resize):
        rgb = rgb.resize((resize, resize), Image.BILINEAR)
    return encode_image(np.asarray(rgb), quality=quality), rgb.size


def pack_image_folder(image_folder: str, output_dir: str, *, quality: int = 95, resize: int | None = None,
                      overwrite: bool = False, log=sys.stderr) -> dict:
    """Write `train.rec`, `train.idx` and `property` for `image_folder` into
    `output_dir`; returns {'images', 'identities', 'image_size'}. Files appear
    only once complete (written under temporary names, then renamed; the temporaries
    are removed on an error). Existing files are replaced only with `overwrite`
    (ValueError otherwise, before any image is read)."""
    identities, samples = scan_image_folder(image_folder)
    rec_path, idx_path, property_path = (os.path.join(output_dir, name) for name in OUTPUT_FILES)
    check_outputs([rec_path, idx_path, property_path], overwrite)
    num_images, num_ids = len(samples), len(identities)
    first_identity_record = num_images + 1
    image_range = [[0, 0] for _ in identities]
    image_size = None
    start = time.time()
    try:
        with RecordIOWriter(rec_path + ".tmp", idx_path + ".tmp") as writer:
            writer.write(0, pack_payload([first_identity_record, first_identity_record + num_ids], b""))
            for key, (path, label) in enumerate(samples, 1):
                data, size = _image_bytes(path, resize=resize, quality=quality)
                image_size = image_size or size
                writer.write(key, pack_payload(float(label), data, id=key))
                if image_range[label][0] == 0:
                    image_range[label][0] = key
                image_range[label][1] = key + 1
                if log is not None and key % 10000 == 0:
                    print(f"pack_rec: {key}/{num_images} images, {key / (time.time() - start):.0f}/s", file=log)
            for label, (first, end) in enumerate(image_range):
                writer.write(first_identity_record + label, pack_payload([first, end], b""))
        os.replace(rec_path + ".tmp", rec_path)
        os.replace(idx_path + ".tmp", idx_path)
    finally:  # an error or a Ctrl-C leaves no half-written pack behind
        for tmp in (rec_path + ".tmp", idx_path + ".tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
    width, height = image_size
    checkpoint.write_atomic(property_path, lambda f: f.write(f"{num_ids},{height},{width}\n"), binary=False)
    if log is not None:
        print(f"pack_rec: wrote {num_images} images of {num_ids} identities to {rec_path}", file=log)
    return {"images": num_images, "identities": num_ids, "image_size": (height, width)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.tools.pack_rec", description=__doc__.split("\n\n")[0])
    parser.add_argument("image_folder", help="root with one sub-folder of aligned face images per identity")
    parser.add_argument("output_dir", help="where train.rec, train.idx and property are written")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    parser.add_argument("--resize", type=int, default=None, metavar="N",
                        help="resize every image to N x N (default: keep sizes, store JPEGs as they are)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace train.rec, train.idx and property if OUTPUT_DIR holds them")
    args = parser.parse_args(argv)
    if args.resize is not None and args.resize < 1:
        parser.error(f"--resize must be at least 1, got {args.resize}")
    try:
        pack_image_folder(args.image_folder, args.output_dir, quality=args.quality, resize=args.resize,
                          overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        print(f"pack_rec: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
