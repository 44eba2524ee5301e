"""How an encoded face becomes a training sample: decoding, normalisation and a
horizontal flip that is a pure function of (seed, epoch, index), shared by every
training dataset so that a resumed run sees exactly the samples an uninterrupted
one would."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether sample `index` is mirrored in `epoch`: a hash, not a draw from a
    global generator, so it does not depend on worker count or on resuming."""
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    return bool(h >> 63)


class DataError(ValueError):
    """A stored image or label that cannot be used; the message names its file (and record)."""


def decode_failure(exc: Exception) -> str:
    """Why Pillow could not decode an image, in words for an error message (its own words for bytes
    of no known format name the in-memory buffer's address)."""
    return "not an image format Pillow reads" if isinstance(exc, UnidentifiedImageError) else str(exc)


def unreadable_image(source: str, why: Exception | str) -> str:
    """How every tool says that it cannot read an image: "<source>: cannot read the image: <why>", ``why``
    in words, or the exception that reading or decoding it raised (a file system error by its reason
    alone, "No such file or directory", its path being ``source``)."""
    if isinstance(why, OSError) and why.strerror:
        why = why.strerror
    return f"{source}: cannot read the image: {decode_failure(why) if isinstance(why, BaseException) else why}"


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. Pillow's ``convert("RGB")`` clips 16-bit greyscale (a 16-bit PNG opens
    as mode I;16) at 255, which would turn a face white; such images are scaled to 8 bits
    (x / 257, rounded) first."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey)
    return image.convert("RGB")


def decode_image(data: bytes, image_size: int, *, source: str) -> np.ndarray:
    """Decode JPEG/PNG/BMP bytes into a uint8 (image_size, image_size, 3) RGB array.

    Aligned faces are square; anything else is resized to the square (bilinear).
    Raises DataError (a ValueError) naming `source` when the bytes are not a decodable image.
    """
    return decode_image_and_size(data, image_size, source=source)[0]


def decode_image_and_size(data: bytes, image_size: int, *, source: str) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_image`'s array and the (height, width) the image had before the resize (upright)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            # Upright as its EXIF orientation says (a phone photo stored on its side), as OpenCV's
            # imread (insightface's IJB reader) and its imdecode since 4.x turn it. Aligned face sets
            # carry no orientation: for them nothing changes.
            rgb = to_rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(unreadable_image(source, f"{decode_failure(exc)} ({len(data)} bytes)")) from exc
    width, height = rgb.size
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), (height, width)


def load_image_file(path: str, image_size: int) -> np.ndarray:
    """Read and decode one image file (see `decode_image`)."""
    return load_image_file_and_size(path, image_size)[0]


def load_image_file_and_size(path: str, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Read and decode one image file (see `decode_image_and_size`)."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_image_and_size(data, image_size, source=path)


def encode_image(image: np.ndarray, *, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode a uint8 (H, W, 3) RGB array as JPEG or PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    out = io.BytesIO()
    if fmt.lower() in ("jpeg", "jpg"):
        Image.fromarray(image).save(out, format="JPEG", quality=quality)
    elif fmt.lower() == "png":
        Image.fromarray(image).save(out, format="PNG")
    else:
        raise ValueError(f"unsupported image format {fmt!r}: expected 'jpeg' or 'png'")
    return out.getvalue()


def to_chw(image: np.ndarray, *, flip: bool = False) -> torch.Tensor:
    """uint8 (H, W, 3) array -> uint8 (3, H, W) tensor, mirrored left to right when `flip`."""
    if flip:
        image = image[:, ::-1]
    # A copy, always: numpy calls a mirrored 1 x 1 view contiguous (its stride stays negative), and
    # an array Pillow made may be read-only; torch takes neither.
    return torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C"))


def to_model_input(images: torch.Tensor, *, memory_format: torch.memory_format = torch.contiguous_format,
                   ) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 in [-1, 1], as (x - 127.5) / 127.5 (insightface's
    scaling), on the images' device and in `memory_format`. The training loader, verification and
    `train.embed` hand over uint8 images, a quarter of float32's bytes through the workers' shared
    memory and the host-to-device copy, and scale them here, on the device that runs the network."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.to(torch.float32, memory_format=memory_format).sub_(127.5).div_(127.5)


class FaceImageDataset(torch.utils.data.Dataset):
    """Base of the training datasets.

    Subclasses implement `__len__`, `num_classes` and `load(index) -> (uint8
    (H, W, 3) image, int label)`. An item is (uint8 (3, H, W) image, int label),
    scaled for the network by `to_model_input` on its device. It is addressed by an
    `index` or by an `(index, epoch)` key, which is what `ResumableBatchSampler` yields:
    the flip and the augmentations of a sample then depend only on (seed, epoch, index).
    """

    num_classes: int
    # The augmentations (`train.data.augment.Augmentation`), applied before the flip; set by
    # `build_train_dataset`.
    augment = None

    def __init__(self, *, image_size: int, seed: int, flip: bool):
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.flip = bool(flip)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def _index_parts(self) -> list[bytes]:
        """What, beyond the size and the class count, tells this set from another of its kind."""
        return []

    def classes_digest(self) -> str | None:
        """A short digest of the identities' names in label order, for sets that name them (an image
        folder's); None for the others. Equal digests: label k is the same person in both sets."""
        return None

    def fingerprint(self) -> str:
        """A short digest of the set's index (its kind, size, classes and what `_index_parts` adds,
        not its pixels): processes that read different data give different digests."""
        return self._digest(self._index_parts())

    def _digest(self, index_parts: list[bytes]) -> str:
        digest = hashlib.blake2b(digest_size=8)
        for part in [f"{type(self).__name__} {len(self)} {self.num_classes}".encode(), *index_parts]:
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        return digest.hexdigest()

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {key} out of range for a dataset of {n} images")
        image, label = self.load(index)
        if self.augment:
            image = self.augment(image, self.seed, int(epoch), index)
        mirrored = self.flip and flip_decision(self.seed, int(epoch), index)
        return to_chw(image, flip=mirrored), int(label)
