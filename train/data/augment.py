"""The trainer's augmentations, each applied to a sample with its own probability. AdaFace's (Kim et al.,
CVPR 2022): a crop kept in place on black, a trip through a lower resolution, and brightness/contrast/
saturation jitter; they make the low-quality images whose small embedding norms AdaFace's margin adapts to.
The low resolution is OpenCV's (AdaFace resizes with ``cv2.resize``), computed here without OpenCV. Then the
three of arcface_torch's ``dali_aug`` in torchvision's terms: ``GaussianBlur``, ``ColorJitter(hue=h)`` and
``RandomGrayscale``, computed as torchvision computes them on a PIL image, without torchvision.

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
# The blur's, hue's and grayscale's draws: a stream of their own, so that AdaFace's draw what they drew before.
_MORE_STREAM = 0x42484753  # "BHGS"

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
# torchvision's GaussianBlur(kernel_size, sigma=(0.1, 2.0)) as face pipelines write it; ColorJitter(hue=0.05),
# about the 0-20 degrees of arcface_torch's dali_aug.
BLUR_KERNEL = 5
BLUR_SIGMA = (0.1, 2.0)
HUE_SHIFT = 0.05
# The order the augmentations apply in: AdaFace's, with the blur after the low resolution and the hue and
# grayscale after the photometric jitter, as arcface_torch's dali_aug runs its resize, blur, HSV and gray.
ORDER = ("crop", "low_res", "blur", "photometric", "hue", "grayscale")


@dataclass(frozen=True)
class Augmentation:
    """Probabilities of the six augmentations, applied in the order of ORDER (AdaFace's MS1MV2 and WebFace
    runs use 0.2 each for its crop, low_res and photometric); 0 turns one off. ``blur_kernel`` (odd, in
    pixels) and ``blur_sigma`` (low, high) are GaussianBlur's; ``hue_shift`` is ColorJitter's hue, the
    largest shift as a fraction of the colour circle (at most 0.5). ``augmentation(image, seed, epoch,
    index)`` returns a new uint8 (H, W, 3) array or ``image`` itself when nothing applies."""

    crop: float = 0.0
    low_res: float = 0.0
    photometric: float = 0.0
    blur: float = 0.0
    hue: float = 0.0
    grayscale: float = 0.0
    blur_kernel: int = BLUR_KERNEL
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    hue_shift: float = HUE_SHIFT

    def __post_init__(self):
        for name in ORDER:
            p = getattr(self, name)
            if not (isinstance(p, numbers.Real) and math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ValueError(f"{name} augmentation probability must be a number in [0, 1], got {p!r}")
            object.__setattr__(self, name, float(p) + 0.0)
        kernel = self.blur_kernel
        if not (isinstance(kernel, numbers.Integral) and kernel >= 3 and kernel % 2 == 1):
            raise ValueError(f"blur_kernel must be an odd number of pixels, at least 3, got {kernel!r}")
        object.__setattr__(self, "blur_kernel", int(kernel))
        sigma = tuple(self.blur_sigma)
        if not (len(sigma) == 2 and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in sigma)
                and 0 < sigma[0] <= sigma[1]):
            raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, got {self.blur_sigma!r}")
        object.__setattr__(self, "blur_sigma", (float(sigma[0]), float(sigma[1])))
        shift = self.hue_shift
        if not (isinstance(shift, numbers.Real) and 0.0 < shift <= 0.5):
            raise ValueError(f"hue_shift must be a number in (0, 0.5], got {shift!r}")
        object.__setattr__(self, "hue_shift", float(shift))

    def __bool__(self) -> bool:
        return any(getattr(self, name) > 0 for name in ORDER)

    def describe(self) -> str:
        low, high = self.blur_sigma
        sigma = f"{low:g}" if low == high else f"{low:g}-{high:g}"  # (one --blur-sigma: that sigma always)
        details = {"blur": f" (kernel {self.blur_kernel}, sigma {sigma})", "hue": f" (±{self.hue_shift:g})"}
        parts = [f"{name.replace('_', '-')} {getattr(self, name)}{details.get(name, '')}" for name in ORDER
                 if getattr(self, name) > 0]
        return ", ".join(parts) or "none"

    def __call__(self, image: np.ndarray, seed: int, epoch: int, index: int) -> np.ndarray:
        # (A stream is seeded only when one of its augmentations is asked for: ~50 µs a sample.)
        crop = low_res = photometric = blur = hue = grayscale = False
        if self.crop or self.low_res or self.photometric:
            draws = Draws(seed, epoch, index, _STREAM)
            # The three coin flips come first, so whether one augmentation applies does not depend on
            # the draws another made.
            crop, low_res, photometric = draws.uniform(size=3) < (self.crop, self.low_res, self.photometric)
        if self.blur or self.hue or self.grayscale:
            # The others' flips and parameters, all drawn at once from their own stream: AdaFace's draws are
            # those of before they came, and none of these depends on which augmentations apply.
            *flips, sigma_unit, shift_unit = Draws(seed, epoch, index, _MORE_STREAM).uniform(size=5)
            blur, hue, grayscale = np.array(flips) < (self.blur, self.hue, self.grayscale)
        if crop:
            image = crop_in_place(image, draws)
        if low_res:
            image = through_low_resolution(image, draws)
        if blur:
            low, high = self.blur_sigma
            image = gaussian_blur(image, self.blur_kernel, low + (high - low) * sigma_unit)
        if photometric:
            image = jitter_colours(image, draws)
        if hue:
            image = shift_hue(image, self.hue_shift * (2 * shift_unit - 1))
        if grayscale:
            image = to_grayscale(image)
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
    return separable(image, rows, columns)


def separable(image: np.ndarray, rows: torch.Tensor, columns: torch.Tensor) -> np.ndarray:
    """uint8 (H, W, C) ``image`` filtered by float32 weights ``rows`` (height x H) down its columns and
    ``columns`` (width x W) along its rows, rounded to uint8: a resize or a blur."""
    source_height, source_width, channels = image.shape
    height, width = rows.shape[0], columns.shape[0]
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


def gaussian_blur(image: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """``image`` blurred by a Gaussian of standard deviation ``sigma`` pixels, cut to ``kernel`` (odd)
    taps, past the edges mirrored: torchvision's ``gaussian_blur``, as its GaussianBlur applies it."""
    return separable(image, blur_weights(image.shape[0], kernel, sigma), blur_weights(image.shape[1], kernel, sigma))


def blur_weights(size: int, kernel: int, sigma: float) -> torch.Tensor:
    """float32 (size, size): row i weighs the pixels of a line that the blur's pixel i is made of. The
    taps are torchvision's (the Gaussian at -r..r, r = kernel // 2, normalised, in float32); a tap past an
    edge falls on the pixel mirrored about it, the edge pixel not repeated (torch's "reflect" padding)."""
    radius = kernel // 2
    offsets = np.linspace(-radius, radius, kernel, dtype=np.float32)
    # Any sigma > 0 is accepted. One that float32 rounds to 0 (below ~1e-45) made 0/0 at the centre tap, NaN
    # taps and a black image; floored at float32's smallest normal, the image is unchanged (a vanishing blur's
    # limit). One past float32's range is inf: equal taps. The overflows on the way are meant (no warning from
    # each worker); the other sigmas give the taps they gave.
    with np.errstate(over="ignore"):
        sigma = max(np.float32(sigma), np.finfo(np.float32).tiny)
        taps = np.exp(np.float32(-0.5) * (offsets / sigma) ** 2)
    taps /= taps.sum()
    position = np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :]
    if size == 1:
        position = np.zeros_like(position)
    else:  # mirrored as often as it takes: a kernel wider than the image reflects off both edges
        period = 2 * (size - 1)
        position = np.abs(position) % period
        position = np.where(position >= size, period - position, position)
    weights = np.zeros((size, size), dtype=np.float32)
    np.add.at(weights, (np.repeat(np.arange(size), kernel), position.ravel()), np.tile(taps, size))
    return torch.from_numpy(weights)


def shift_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """``image`` with its hue turned by ``shift`` of the colour circle (in [-0.5, 0.5]), saturation and
    value kept: torchvision's ``adjust_hue`` on a PIL image, through Pillow's HSV, whose hue is a byte
    (the shift, in 255ths, cut toward 0, turns it modulo 256)."""
    hue, saturation, value = Image.fromarray(image).convert("HSV").split()
    turned = np.asarray(hue, dtype=np.uint8) + np.uint8(int(shift * 255) % 256)  # (wraps round, as a byte)
    return np.asarray(Image.merge("HSV", (Image.fromarray(turned, "L"), saturation, value)).convert("RGB"))


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """``image``'s luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, Pillow's "L") in all three channels:
    torchvision's RandomGrayscale on a PIL image."""
    luma = np.asarray(Image.fromarray(image).convert("L"))
    return np.repeat(luma[:, :, None], 3, axis=2)
