"""AdaFace's training augmentations (Kim et al., CVPR 2022): a crop kept in place on black, a trip
through a lower resolution, and brightness/contrast/saturation jitter, each applied to a sample with its
own probability. They make the low-quality images whose small embedding norms AdaFace's margin adapts to.
The low resolution is OpenCV's (AdaFace resizes with ``cv2.resize``), computed here without OpenCV.

Every random choice comes from a generator seeded by (seed, epoch, index), as the flip's does, so a
sample looks the same whichever worker loads it and a resumed run sees what an uninterrupted one would."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

_MASK64 = (1 << 64) - 1
_STREAM = 0x41444146  # "ADAF": keeps these draws apart from any other use of (seed, epoch, index)

# RandomResizedCrop's ranges, as AdaFace draws its crops: 20-100% of the area, aspect 3:4 to 4:3.
CROP_AREA = (0.2, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
# The low-resolution side as a fraction of the image's, and the interpolations drawn from for the
# way down and the way up: AdaFace's, OpenCV's five (`resize`). Only area averages what it shrinks;
# the others sample it, and leave the aliasing (jagged edges, moire) of a small face in a photo.
LOW_RES_SIDE = (0.2, 1.0)
LOW_RES_KERNELS = ("nearest", "linear", "area", "cubic", "lanczos4")
# ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5): each factor from [0.5, 1.5], in a random order.
PHOTOMETRIC_FACTORS = (0.5, 1.5)
_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


@dataclass(frozen=True)
class Augmentation:
    """Probabilities of AdaFace's three augmentations (its MS1MV2 and WebFace runs use 0.2 each);
    0 turns one off. ``augmentation(image, seed, epoch, index)`` returns a new uint8 (H, W, 3) array or
    ``image`` itself when nothing applies."""

    crop: float = 0.0
    low_res: float = 0.0
    photometric: float = 0.0

    def __post_init__(self):
        for name in ("crop", "low_res", "photometric"):
            p = getattr(self, name)
            if not (isinstance(p, numbers.Real) and math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ValueError(f"{name} augmentation probability must be a number in [0, 1], got {p!r}")
            object.__setattr__(self, name, float(p) + 0.0)

    def __bool__(self) -> bool:
        return self.crop > 0 or self.low_res > 0 or self.photometric > 0

    def describe(self) -> str:
        parts = [f"{label} {p}" for label, p in (("crop", self.crop), ("low-res", self.low_res),
                                                    ("photometric", self.photometric)) if p > 0]
        return ", ".join(parts) or "none"

    def __call__(self, image: np.ndarray, seed: int, epoch: int, index: int) -> np.ndarray:
        if not self:
            return image
        draws = Draws(seed, epoch, index, _STREAM)
        # The three coin flips come first, so whether one augmentation applies does not depend on
        # the draws another made.
        crop, low_res, photometric = draws.uniform(size=3) < (self.crop, self.low_res, self.photometric)
        if crop:
            image = crop_in_place(image, draws)
        if low_res:
            image = through_low_resolution(image, draws)
        if photometric:
            image = jitter_colours(image, draws)
        return image


class Draws:
    """Random numbers from the PCG64 stream of a seed (integers, taken modulo 2^64), made into floats
    here rather than by numpy's ``Generator``, whose methods may change their streams from one numpy
    version to the next (NEP 19); PCG64 and SeedSequence keep theirs. A run resumed under another
    numpy sees the same images."""

    def __init__(self, *entropy: int):
        self._bits = np.random.PCG64(np.random.SeedSequence([int(e) & _MASK64 for e in entropy]))

    def uniform(self, low: float = 0.0, high: float = 1.0, size: int | None = None):
        """A float in [low, high) (an array of ``size`` of them), from 53 random bits each."""
        unit = (self._bits.random_raw(1 if size is None else size) >> np.uint64(11)) * 2.0 ** -53
        values = low + (high - low) * unit
        return float(values[0]) if size is None else values

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high)."""
        return low + min(int(self.uniform() * (high - low)), high - low - 1)

    def permutation(self, n: int) -> np.ndarray:
        return np.argsort(self.uniform(size=n), kind="stable")


def crop_box(height: int, width: int, draws: Draws) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering CROP_AREA of the image at an aspect ratio (w / h) in
    CROP_ASPECT, drawn as torchvision's RandomResizedCrop draws its boxes: area uniform, log-aspect
    uniform, ten tries, then the largest centred box of an allowed aspect."""
    area = height * width
    log_low, log_high = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for _ in range(10):
        target = area * draws.uniform(*CROP_AREA)
        aspect = math.exp(draws.uniform(log_low, log_high))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return draws.integer(0, height - h + 1), draws.integer(0, width - w + 1), h, w
    ratio = width / height
    if ratio < CROP_ASPECT[0]:
        w, h = width, int(round(width / CROP_ASPECT[0]))
    elif ratio > CROP_ASPECT[1]:
        h, w = height, int(round(height * CROP_ASPECT[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_in_place(image: np.ndarray, draws: Draws) -> np.ndarray:
    """``image`` black outside a random box (`crop_box`) and unchanged inside it. The crop is not
    resized: the face stays where alignment put it, and part of it is missing, as in an occluded or
    badly framed photo."""
    top, left, h, w = crop_box(image.shape[0], image.shape[1], draws)
    out = np.zeros_like(image)
    out[top:top + h, left:left + w] = image[top:top + h, left:left + w]
    return out


def through_low_resolution(image: np.ndarray, draws: Draws) -> np.ndarray:
    """``image`` shrunk to LOW_RES_SIDE of its side and enlarged back, each way with a random one of
    LOW_RES_KERNELS: a small face in a large photo, blurred, blocky, aliased or ringing."""
    height, width = image.shape[:2]
    side = draws.uniform(*LOW_RES_SIDE)
    down, up = draws.integer(0, len(LOW_RES_KERNELS)), draws.integer(0, len(LOW_RES_KERNELS))
    small = resize(image, max(1, int(side * height)), max(1, int(side * width)), LOW_RES_KERNELS[down])
    return resize(small, height, width, LOW_RES_KERNELS[up])


def resize(image: np.ndarray, height: int, width: int, kernel: str) -> np.ndarray:
    """uint8 (H, W, C) ``image`` resized to (height, width) as OpenCV's ``cv2.resize`` resizes it with
    INTER_NEAREST, INTER_LINEAR, INTER_AREA, INTER_CUBIC or INTER_LANCZOS4 (``kernel``), to within a
    grey level (OpenCV rounds its 8-bit weights to 11 bits): AdaFace's augmentation draws those, and
    they differ from Pillow's filters, which widen when shrinking and so never alias. A resize is
    separable: one (height x H) and one (width x W) matrix of weights (`resampling_weights`)."""
    if kernel == "area" and (height > image.shape[0] or width > image.shape[1]):
        kernel = "area-enlarging"  # on both axes, as OpenCV does unless both shrink
    rows = _weights_tensor(image.shape[0], height, kernel)
    columns = _weights_tensor(image.shape[1], width, kernel)
    # torch's matrix products, not numpy's: in a DataLoader worker torch runs one thread, where numpy's
    # OpenBLAS would start one a core in every worker (on 2 cores, 2 workers: 216 images/s instead of
    # 1,239 with every image augmented).
    source_height, source_width, channels = image.shape
    pixels = torch.tensor(image, dtype=torch.float32).reshape(source_height, source_width * channels)
    tall = torch.mm(rows, pixels).reshape(height, source_width, channels)
    wide = tall.transpose(1, 2).reshape(height * channels, source_width)  # width last, for the columns
    out = torch.mm(wide, columns.T).reshape(height, channels, width).transpose(1, 2)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


@functools.lru_cache(maxsize=4096)  # 112 px: 5 kernels x 2 ways x 91 sides
def _weights_tensor(source: int, size: int, kernel: str) -> torch.Tensor:
    return torch.from_numpy(resampling_weights(source, size, kernel))


def _keys_cubic(d: np.ndarray, a: float = -0.75) -> np.ndarray:
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _lanczos4(d: np.ndarray) -> np.ndarray:
    return np.sinc(d) * np.sinc(d / 4) * (np.abs(d) < 4)


def resampling_weights(source: int, size: int, kernel: str) -> np.ndarray:
    """float32 (size, source): row i weighs the source pixels that output pixel i of a resize from
    ``source`` to ``size`` pixels is made of, as OpenCV's resize weighs them (``kernel`` one of
    LOW_RES_KERNELS, "area" only to shrink, or "area-enlarging"). Output pixel i's centre maps to source
    coordinate (i + 0.5) * scale - 0.5 (scale = source / size); pixels past an edge are the edge's
    (OpenCV's replicated border)."""
    scale = 1.0 / (size / source)  # as OpenCV rounds it: floor(i * scale) is then OpenCV's pixel
    out = np.arange(size)
    weights = np.zeros((size, source))
    if kernel == "nearest":  # the pixel at floor(i * scale), OpenCV's (not the nearest centre)
        weights[out, np.minimum(np.floor(out * scale).astype(np.int64), source - 1)] = 1
        return weights.astype(np.float32)
    if kernel == "area":  # shrinking: each output pixel the mean of the source it covers
        start, pixel = out[:, None] * scale, np.arange(source)[None, :]
        overlap = np.minimum(start + scale, pixel + 1) - np.maximum(start, pixel)
        return (np.clip(overlap, 0, None) / scale).astype(np.float32)
    if kernel == "area-enlarging":  # OpenCV's linear interpolation between pixel edges
        base = np.floor(out * scale).astype(np.int64)
        t = ((out + 1) - (base + 1) * (size / source)).astype(np.float32)  # OpenCV's float, rounding included
        t = np.where(t <= 0, 0.0, t - np.floor(t))
        taps, offsets = np.stack([1 - t, t], axis=1), np.arange(2)
    else:
        position = ((out + 0.5) * scale - 0.5).astype(np.float32)  # OpenCV's float
        base = np.floor(position).astype(np.int64)
        t = (position - base).astype(np.float64)
        if kernel == "linear":
            offsets = np.arange(2)
            taps = np.stack([1 - t, t], axis=1)
        elif kernel == "cubic":
            offsets = np.arange(-1, 3)
            taps = _keys_cubic(t[:, None] - offsets[None, :])
        elif kernel == "lanczos4":
            offsets = np.arange(-3, 5)
            taps = _lanczos4(t[:, None] - offsets[None, :])
            taps /= taps.sum(axis=1, keepdims=True)
        else:
            raise ValueError(f"unknown interpolation {kernel!r}: expected one of {', '.join(LOW_RES_KERNELS)}")
    columns = np.clip(base[:, None] + offsets[None, :], 0, source - 1)
    np.add.at(weights, (np.repeat(out, len(offsets)), columns.ravel()), taps.ravel())
    return weights.astype(np.float32)


def jitter_colours(image: np.ndarray, draws: Draws) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor from PHOTOMETRIC_FACTORS, in a
    random order (torchvision's ColorJitter on a PIL image, which uses these Pillow enhancers: contrast
    about the mean grey level, saturation against the greyscale image)."""
    factors = draws.uniform(*PHOTOMETRIC_FACTORS, size=len(_ENHANCERS))
    picture = Image.fromarray(image)
    for k in draws.permutation(len(_ENHANCERS)):
        picture = _ENHANCERS[k](picture).enhance(float(factors[k]))
    return np.asarray(picture)
