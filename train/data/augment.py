"""AdaFace's training augmentations (Kim et al., CVPR 2022): a crop kept in place on black, a trip
through a lower resolution, and brightness/contrast/saturation jitter, each applied to a sample with its
own probability. They make the low-quality images whose small embedding norms AdaFace's margin adapts to.

Every random choice comes from a generator seeded by (seed, epoch, index), as the flip's does, so a
sample looks the same whichever worker loads it and a resumed run sees what an uninterrupted one would."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

_MASK64 = (1 << 64) - 1
_STREAM = 0x41444146  # "ADAF": keeps these draws apart from any other use of (seed, epoch, index)

# RandomResizedCrop's ranges, as AdaFace draws its crops: 20-100% of the area, aspect 3:4 to 4:3.
CROP_AREA = (0.2, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
# The low-resolution side as a fraction of the image's, and the resampling filters drawn from for
# the way down and the way up (Pillow's five closest to AdaFace's OpenCV nearest, linear, area, cubic
# and Lanczos; Pillow's filters other than nearest antialias when shrinking, as OpenCV's area does).
LOW_RES_SIDE = (0.2, 1.0)
LOW_RES_FILTERS = (Image.NEAREST, Image.BILINEAR, Image.BOX, Image.BICUBIC, Image.LANCZOS)
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
            if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ValueError(f"{name} augmentation probability must be in [0, 1], got {p!r}")

    def __bool__(self) -> bool:
        return self.crop > 0 or self.low_res > 0 or self.photometric > 0

    def describe(self) -> str:
        parts = [f"{label} {p:g}" for label, p in (("crop", self.crop), ("low-res", self.low_res),
                                                    ("photometric", self.photometric)) if p > 0]
        return ", ".join(parts) or "none"

    def __call__(self, image: np.ndarray, seed: int, epoch: int, index: int) -> np.ndarray:
        if not self:
            return image
        rng = np.random.default_rng((seed & _MASK64, epoch & _MASK64, index & _MASK64, _STREAM))
        # The three coin flips come first, so whether one augmentation applies does not depend on
        # the draws another made.
        crop, low_res, photometric = rng.random(3) < (self.crop, self.low_res, self.photometric)
        if crop:
            image = crop_in_place(image, rng)
        if low_res:
            image = through_low_resolution(image, rng)
        if photometric:
            image = jitter_colours(image, rng)
        return image


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering CROP_AREA of the image at an aspect ratio (w / h) in
    CROP_ASPECT, drawn as torchvision's RandomResizedCrop draws its boxes: area uniform, log-aspect
    uniform, ten tries, then the largest centred box of an allowed aspect."""
    area = height * width
    log_low, log_high = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_AREA)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < CROP_ASPECT[0]:
        w, h = width, int(round(width / CROP_ASPECT[0]))
    elif ratio > CROP_ASPECT[1]:
        h, w = height, int(round(height * CROP_ASPECT[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_in_place(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` black outside a random box (`crop_box`) and unchanged inside it. The crop is not
    resized: the face stays where alignment put it, and part of it is missing, as in an occluded or
    badly framed photo."""
    top, left, h, w = crop_box(image.shape[0], image.shape[1], rng)
    out = np.zeros_like(image)
    out[top:top + h, left:left + w] = image[top:top + h, left:left + w]
    return out


def through_low_resolution(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` shrunk to LOW_RES_SIDE of its side and enlarged back, each way with a random filter:
    a small face in a large photo, blurred, blocky or ringing."""
    height, width = image.shape[:2]
    side = rng.uniform(*LOW_RES_SIDE)
    down, up = rng.integers(0, len(LOW_RES_FILTERS), 2)
    small = (max(1, int(side * width)), max(1, int(side * height)))
    picture = Image.fromarray(image).resize(small, LOW_RES_FILTERS[down])
    return np.asarray(picture.resize((width, height), LOW_RES_FILTERS[up]))


def jitter_colours(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor from PHOTOMETRIC_FACTORS, in a
    random order (torchvision's ColorJitter on a PIL image, which uses these Pillow enhancers: contrast
    about the mean grey level, saturation against the greyscale image)."""
    factors = rng.uniform(*PHOTOMETRIC_FACTORS, len(_ENHANCERS))
    picture = Image.fromarray(image)
    for k in rng.permutation(len(_ENHANCERS)):
        picture = _ENHANCERS[k](picture).enhance(float(factors[k]))
    return np.asarray(picture)
