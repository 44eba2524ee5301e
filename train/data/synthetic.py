"""The demo's embedded data: procedurally drawn face-like identities.

An identity is a set of random facial parameters (face shape, skin tone, hair,
eye/brow/nose/mouth geometry and colours, beard, glasses, moles); a sample of it
adds pose, expression, lighting, background, occluders, blur and noise. Every
image is a pure function of (seed, identity, sample), drawn on demand with a few
vectorised numpy operations, so a set of any size costs nothing up front and
verification identities can be kept disjoint from training ones by numbering.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .transforms import FaceImageDataset, to_chw

# Separate random streams, so that changing how samples vary leaves identities as they are.
_IDENTITY_STREAM, _SAMPLE_STREAM, _PAIRS_STREAM = 1, 2, 3
_NOISE_BANK_SIZE = 1 << 20

SKIN_LIGHT = np.array([236, 200, 172], np.float32)
SKIN_DARK = np.array([92, 58, 38], np.float32)
HAIR_COLOURS = np.array(
    [[28, 24, 22], [62, 40, 28], [112, 74, 46], [196, 164, 108], [146, 68, 36], [150, 150, 150], [218, 214, 206]],
    np.float32,
)
HAIR_WEIGHTS = np.array([0.30, 0.22, 0.16, 0.12, 0.07, 0.08, 0.05])
IRIS_COLOURS = np.array([[84, 52, 30], [66, 108, 158], [76, 116, 68], [118, 128, 138], [128, 96, 52]], np.float32)
LIP_DARK = np.array([150, 70, 72], np.float32)


@dataclass(frozen=True)
class Identity:
    """What stays the same across every image of one synthetic person.
    Lengths are in face units: the image spans [-1, 1] at pose scale 1."""

    skin: np.ndarray
    face_cy: float
    face_rx: float
    face_ry: float
    jaw_taper: float  # 0: oval, larger: pointed chin
    hair: np.ndarray
    hair_volume: float  # how far hair stands off the head; 0 for bald
    hairline: float  # forehead height where the hair starts
    hair_curve: float  # how much the hairline recedes at the temples
    hair_part: float  # asymmetry of the hairline
    hair_length: float  # long hair falls to this height behind the head, 0 for short
    ear_size: float
    eye_y: float
    eye_dx: float  # half the distance between the eyes
    eye_rx: float
    eye_ry: float  # eye height / width
    eye_tilt: float
    iris: np.ndarray
    iris_r: float
    brow_gap: float
    brow_len: float
    brow_thick: float
    brow_tilt: float
    nose_y: float  # nose tip height
    nose_w: float
    nose_len: float
    mouth_y: float
    mouth_w: float
    lip_h: float
    lips: np.ndarray
    beard: float  # opacity, 0 for none
    moustache: float
    glasses: np.ndarray | None  # frame colour
    glasses_r: float
    moles: tuple[tuple[float, float, float], ...]  # (u, v, radius)


class _Draws:
    """Uniform numbers drawn from `rng` in one call and handed out one at a time:
    a generator call per parameter would cost more than drawing the image."""

    def __init__(self, rng: np.random.Generator, n: int):
        self._values = rng.random(n).tolist()
        self._next = 0

    def __call__(self, low: float = 0.0, high: float = 1.0) -> float:
        value = self._values[self._next]
        self._next += 1
        return low + (high - low) * value

    def colour(self, low: float, high: float) -> np.ndarray:
        return np.float32([self(low, high), self(low, high), self(low, high)])

    def index(self, weights: np.ndarray) -> int:
        return int(np.searchsorted(np.cumsum(weights), self() * weights.sum(), side="right"))


@functools.lru_cache(maxsize=8192)
def draw_identity(seed: int, identity: int) -> Identity:
    """The parameters of synthetic `identity` (cached: every image of it needs them)."""
    u = _Draws(np.random.default_rng((seed, _IDENTITY_STREAM, identity)), 128)
    tone = u()
    skin = SKIN_LIGHT * (1 - tone) + SKIN_DARK * tone + u.colour(-10, 10)
    hair = HAIR_COLOURS[u.index(HAIR_WEIGHTS)] + u.colour(-16, 16)
    iris = IRIS_COLOURS[u.index(np.ones(len(IRIS_COLOURS)))] + u.colour(-14, 14)
    lips = skin * u(0.55, 0.8) + LIP_DARK * u(0.1, 0.4)
    face_ry = u(0.66, 0.82)
    bald = u() < 0.08
    male = u() < 0.5
    glasses = HAIR_COLOURS[u.index(np.ones(3))] * u(0.5, 1.5) if u() < 0.18 else None
    return Identity(
        skin=np.clip(skin, 30, 250).astype(np.float32),
        face_cy=u(0.02, 0.14),
        face_rx=face_ry * u(0.70, 0.86),
        face_ry=face_ry,
        jaw_taper=u(0.0, 0.45),
        hair=np.clip(hair, 10, 240).astype(np.float32),
        hair_volume=0.0 if bald else u(0.04, 0.20),
        hairline=u(-0.62, -0.38),
        hair_curve=u(-0.25, 0.6),
        hair_part=u(-0.25, 0.25),
        hair_length=0.0 if (bald or u() < 0.55) else u(0.2, 0.9),
        ear_size=u(0.09, 0.15),
        eye_y=u(-0.20, -0.06),
        eye_dx=u(0.21, 0.31),
        eye_rx=u(0.085, 0.125),
        eye_ry=u(0.32, 0.55),
        eye_tilt=u(-0.15, 0.15),
        iris=np.clip(iris, 0, 255).astype(np.float32),
        iris_r=u(0.45, 0.62),
        brow_gap=u(0.07, 0.16),
        brow_len=u(0.10, 0.17),
        brow_thick=u(0.018, 0.045),
        brow_tilt=u(-0.30, 0.25),
        nose_y=u(0.10, 0.24),
        nose_w=u(0.055, 0.11),
        nose_len=u(0.15, 0.30),
        mouth_y=u(0.32, 0.46),
        mouth_w=u(0.13, 0.24),
        lip_h=u(0.025, 0.06),
        lips=np.clip(lips, 20, 250).astype(np.float32),
        beard=u(0.5, 0.95) if (male and u() < 0.35) else 0.0,
        moustache=u(0.5, 0.95) if (male and u() < 0.35) else 0.0,
        glasses=None if glasses is None else np.clip(glasses, 0, 255).astype(np.float32),
        glasses_r=u(1.25, 1.6),
        moles=tuple((u(-0.45, 0.45), u(-0.3, 0.45), u(0.012, 0.025)) for _ in range(int(u(0, 2.999)))),
    )


@dataclass(frozen=True)
class Capture:
    """How one image of an identity was taken: pose, expression, light, scene."""

    angle: float
    scale: float
    shift: tuple[float, float]
    yaw: float
    pitch: float
    eye_open: float
    brow_raise: float
    smile: float
    mouth_open: float
    background: np.ndarray  # two colours of a gradient
    background_dir: float
    clothes: np.ndarray
    light_gain: np.ndarray  # per channel
    light_dir: float
    light_strength: float
    contrast: float
    gamma: float
    occluder: tuple | None  # (u, v, rx, ry, angle, colour)
    blur: bool
    noise_sigma: float
    noise_offset: int  # where this image's sensor noise starts in the shared noise bank


def draw_capture(seed: int, identity: int, sample: int) -> Capture:
    """How image `sample` of `identity` was taken."""
    u = _Draws(np.random.default_rng((seed, _SAMPLE_STREAM, identity, sample)), 64)
    occluder = None
    if u() < 0.12:
        occluder = (u(-0.6, 0.6), u(-0.5, 0.7), u(0.15, 0.4), u(0.08, 0.3), u(0, math.pi), u.colour(0, 255))
    return Capture(
        angle=u(-0.12, 0.12),
        scale=u(0.92, 1.06),
        shift=(u(-0.05, 0.05), u(-0.05, 0.05)),
        yaw=u(-0.3, 0.3),
        pitch=u(-0.25, 0.25),
        eye_open=u(0.35, 1.15),
        brow_raise=u(-0.03, 0.05),
        smile=u(-0.6, 1.8),
        mouth_open=u() ** 2 * 0.7,
        background=np.stack([u.colour(0, 255), u.colour(0, 255)]),
        background_dir=u(0, 2 * math.pi),
        clothes=u.colour(0, 255),
        light_gain=u(0.6, 1.3) * u.colour(0.9, 1.1),
        light_dir=u(0, 2 * math.pi),
        light_strength=u(0.0, 0.5),
        contrast=u(0.75, 1.2),
        gamma=u(0.75, 1.35),
        occluder=occluder,
        blur=u() < 0.25,
        noise_sigma=u(3, 14),
        noise_offset=int(u() * _NOISE_BANK_SIZE),
    )


def _unit(x: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] in place (np.clip's dispatch costs more than the maths on these small arrays)."""
    return np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Standard normal noise shared by all images (each starts at its own offset):
    slicing it is ten times cheaper than drawing fresh noise per image."""
    return np.random.default_rng(0x5EED).standard_normal(_NOISE_BANK_SIZE, dtype=np.float32)


def _sensor_noise(offset: int, shape: tuple[int, ...]) -> np.ndarray:
    bank, n = _noise_bank(), math.prod(shape)
    if n > bank.size:
        return np.resize(bank, n).reshape(shape)
    start = offset % (bank.size - n + 1)
    return bank[start:start + n].reshape(shape)


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    return ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)


class _Canvas:
    """An image with the face coordinate frame (u right, v down) of one pose.
    Shapes are evaluated only inside their bounding box and anti-aliased over
    about one pixel."""

    def __init__(self, size: int, capture: Capture):
        self.size = size
        xs = _pixel_centres(size)
        self.cos, self.sin = math.cos(capture.angle), math.sin(capture.angle)
        self.scale = capture.scale
        self.tx, self.ty = capture.shift
        x = (xs - self.tx)[None, :]
        y = (xs - self.ty)[:, None]
        self.u = ((self.cos * x + self.sin * y) / self.scale).astype(np.float32)
        self.v = ((-self.sin * x + self.cos * y) / self.scale).astype(np.float32)
        self.pixel = 2.0 / (size * self.scale)
        self.image = np.empty((size, size, 3), np.float32)

    def window(self, cu: float, cv: float, radius: float):
        """Pixel slices covering the face-frame disc (cu, cv, radius), or None if off-image."""
        x = self.scale * (self.cos * cu - self.sin * cv) + self.tx
        y = self.scale * (self.sin * cu + self.cos * cv) + self.ty
        half = self.size / 2
        col, row, r = (x + 1) * half - 0.5, (y + 1) * half - 0.5, radius * self.scale * half + 2
        c0, c1 = max(0, int(col - r)), min(self.size, int(col + r) + 2)
        r0, r1 = max(0, int(row - r)), min(self.size, int(row + r) + 2)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ellipse(self, cu, cv, ru, rv, angle=0.0, window=None):
        """(window, coverage) of an ellipse; coverage is None when it is off-image."""
        window = window or self.window(cu, cv, max(ru, rv))
        if window is None:
            return None, None
        du, dv = self.u[window] - cu, self.v[window] - cv
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            du, dv = c * du + s * dv, c * dv - s * du
        du *= du * (1.0 / (ru * ru))
        dv *= dv * (1.0 / (rv * rv))
        du += dv
        return window, self.rim_squared(du, min(ru, rv))

    def rim_squared(self, r2: np.ndarray, radius: float) -> np.ndarray:
        """Coverage of the inside (r < 1) of a shape of normalised radius r, given r**2,
        in place. Near the rim 1 - r**2 ~ 2 (1 - r), so no square root is needed."""
        k = radius / (2.0 * self.pixel)
        r2 *= -k
        r2 += k + 0.5
        return _unit(r2)

    def above(self, window, curve_v):
        """Coverage of the region v < curve_v(u) inside `window`."""
        d = curve_v(self.u[window]) - self.v[window]
        d *= 1.0 / self.pixel
        d += 0.5
        return _unit(d)

    def paint(self, window, coverage, colour, opacity=1.0):
        if window is None:
            return
        region = self.image[window]
        change = colour - region
        change *= coverage[..., None] if opacity == 1.0 else (coverage * opacity)[..., None]
        region += change


def _draw_background(canvas: _Canvas, cap: Capture) -> None:
    t = math.cos(cap.background_dir) * canvas.u + math.sin(cap.background_dir) * canvas.v
    t *= 0.35
    t += 0.5
    _unit(t)
    first, second = cap.background
    canvas.image[:] = first + t[..., None] * (second - first)


def _draw_face(canvas: _Canvas, who: Identity, cap: Capture) -> None:
    yaw, pitch = cap.yaw, cap.pitch
    # Turning the head moves features that stand out from the face further than the outline.
    fu = yaw * 0.16
    fv = pitch * 0.08
    face_cu = yaw * 0.05
    face_rx = who.face_rx * (1 - 0.12 * abs(yaw))

    # Long hair behind the head, neck and shoulders.
    if who.hair_length > 0:
        w, cov = canvas.ellipse(face_cu, who.face_cy + who.hair_length * 0.4,
                                face_rx + who.hair_volume + 0.08, who.face_ry * 0.6 + who.hair_length * 0.6)
        canvas.paint(w, cov, who.hair)
    w, cov = canvas.ellipse(face_cu * 0.5, who.face_cy + who.face_ry + 0.55, face_rx * 1.9, 0.6)
    canvas.paint(w, cov, cap.clothes)
    w, cov = canvas.ellipse(face_cu * 0.7, who.face_cy + who.face_ry * 0.85, face_rx * 0.55, who.face_ry * 0.55)
    canvas.paint(w, cov, who.skin * 0.85)

    # Ears: the one turned away hides behind the face.
    for side in (-1, 1):
        visible = 1 - max(0.0, side * yaw) * 1.8
        if visible > 0.1:
            w, cov = canvas.ellipse(face_cu + side * (face_rx + who.ear_size * 0.25), who.eye_y + 0.08 + fv * 0.5,
                                    who.ear_size * 0.55 * visible, who.ear_size)
            canvas.paint(w, cov, who.skin * 0.9)

    # Face: an oval narrowing towards the chin, darker at the rim.
    face_window = canvas.window(face_cu, who.face_cy, max(face_rx, who.face_ry))
    if face_window is not None:
        du = canvas.u[face_window] - face_cu
        dv = (canvas.v[face_window] - who.face_cy) / who.face_ry
        narrowing = 1 - who.jaw_taper * np.clip(dv, 0, 1) ** 2
        r2 = (du / (face_rx * narrowing)) ** 2 + dv ** 2
        shade = 1.0 - 0.22 * np.minimum(r2, 1.0) ** 1.5
        face_cov = canvas.rim_squared(r2, face_rx)
        canvas.paint(face_window, face_cov, who.skin * shade[..., None])

    # Hair on top of the head, down to a hairline curved at the temples.
    if who.hair_volume > 0:
        head_rx, head_ry = face_rx + who.hair_volume, who.face_ry + who.hair_volume
        w, cov = canvas.ellipse(face_cu, who.face_cy - who.hair_volume * 0.5, head_rx, head_ry)
        if cov is not None:
            def hairline(uu):
                across = uu - face_cu
                return who.hairline + fv + who.hair_curve * across ** 2 + who.hair_part * across

            canvas.paint(w, cov * canvas.above(w, hairline), who.hair)

    # Eyebrows, eyes, glasses.
    for side in (-1, 1):
        narrow = 1 - 0.35 * max(0.0, side * yaw)
        ex, ey = side * who.eye_dx * narrow + fu * 0.6, who.eye_y + fv * 0.6
        brow_y = ey - who.brow_gap - cap.brow_raise
        w, cov = canvas.ellipse(ex + side * 0.02, brow_y, who.brow_len * narrow, who.brow_thick, side * who.brow_tilt)
        canvas.paint(w, cov, who.hair * 0.75, 0.9)

        erx, ery = who.eye_rx * narrow, who.eye_rx * who.eye_ry * cap.eye_open
        w, sclera = canvas.ellipse(ex, ey, erx, max(ery, 0.004), side * who.eye_tilt)
        if sclera is not None:
            canvas.paint(w, sclera, np.float32([238, 236, 230]))
            d2 = (canvas.u[w] - (ex + fu * 0.2)) ** 2 + (canvas.v[w] - ey) ** 2
            iris_r, pupil_r = who.eye_rx * who.iris_r, who.eye_rx * 0.22
            canvas.paint(w, canvas.rim_squared(d2 * (1 / iris_r ** 2), iris_r) * sclera, who.iris)
            canvas.paint(w, canvas.rim_squared(d2 * (1 / pupil_r ** 2), pupil_r) * sclera, np.float32([15, 12, 12]))
        if who.glasses is not None:
            gr = who.eye_rx * who.glasses_r
            w, outer = canvas.ellipse(ex, ey, gr * narrow, gr * 0.8)
            if outer is not None:
                _, inner = canvas.ellipse(ex, ey, gr * narrow - 0.025, gr * 0.8 - 0.025, window=w)
                canvas.paint(w, _unit(outer - inner), who.glasses)
    if who.glasses is not None:
        w, cov = canvas.ellipse(fu * 0.6, who.eye_y + fv * 0.6 - 0.02, who.eye_dx * 0.35, 0.014)
        canvas.paint(w, cov, who.glasses)

    # Nose: a shaded ridge and two nostrils.
    nu, nv = fu, who.nose_y + fv
    w, cov = canvas.ellipse(nu * 0.8, nv - who.nose_len * 0.5, who.nose_w * 0.45, who.nose_len * 0.6)
    canvas.paint(w, cov, who.skin * 0.78, 0.5)
    for side in (-1, 1):
        w, cov = canvas.ellipse(nu + side * who.nose_w * 0.5, nv, who.nose_w * 0.32, who.nose_w * 0.2)
        canvas.paint(w, cov, who.skin * 0.45, 0.85)

    # Beard and moustache under the mouth.
    mu, mv = fu * 0.7, who.mouth_y + fv * 0.5
    if who.beard > 0 and face_window is not None:
        chin = 1 - canvas.above(face_window, lambda uu: np.full_like(uu, mv - 0.02))
        canvas.paint(face_window, face_cov * chin, who.hair, who.beard)
    if who.moustache > 0:
        w, cov = canvas.ellipse(mu, mv - who.lip_h - 0.03, who.mouth_w * 0.95, 0.035)
        canvas.paint(w, cov, who.hair, who.moustache)

    # Mouth: lips bent by the smile, dark inside when open.
    w = canvas.window(mu, mv, who.mouth_w + 0.05)
    if w is not None:
        du = canvas.u[w] - mu
        bend = cap.smile * 0.9 * du ** 2
        open_h = who.lip_h * (1 + 2.5 * cap.mouth_open)
        dv = canvas.v[w] - mv + bend
        canvas.paint(w, canvas.rim_squared((du / who.mouth_w) ** 2 + (dv / open_h) ** 2, open_h), who.lips)
        if cap.mouth_open > 0.05:
            ih = open_h * 0.75 * cap.mouth_open / (cap.mouth_open + 0.1)
            inside = canvas.rim_squared((du / (who.mouth_w * 0.8)) ** 2 + (dv / ih) ** 2, ih)
            canvas.paint(w, inside, np.float32([60, 20, 25]))

    for mole_u, mole_v, radius in who.moles:
        w, cov = canvas.ellipse(mole_u * face_rx / who.face_rx + fu * 0.5, mole_v + fv * 0.5, radius, radius)
        canvas.paint(w, cov, who.skin * 0.35, 0.9)


def _finish(canvas: _Canvas, cap: Capture) -> np.ndarray:
    """Occluder, optics, light, camera response and sensor noise, to uint8."""
    img = canvas.image
    if cap.occluder is not None:
        ou, ov, orx, ory, oa, colour = cap.occluder
        w, cov = canvas.ellipse(ou, ov, orx, ory, oa)
        canvas.paint(w, cov, colour)
    if cap.blur:
        # A softer lens: a [1, 2, 1] / 4 blur along both axes.
        img[1:-1] = 0.25 * (img[:-2] + img[2:]) + 0.5 * img[1:-1]
        img[:, 1:-1] = 0.25 * (img[:, :-2] + img[:, 2:]) + 0.5 * img[:, 1:-1]
    xs = _pixel_centres(canvas.size) * cap.light_strength
    light = (1.0 + math.cos(cap.light_dir) * xs)[None, :] + (math.sin(cap.light_dir) * xs)[:, None]
    img *= light[..., None] * cap.light_gain
    # Contrast around the mean, then the camera's gamma curve as a lookup table.
    mean = float(img.mean())
    img *= cap.contrast
    img += mean * (1.0 - cap.contrast)
    levels = np.clip(img, 0, 255).astype(np.uint8)
    curve = (255.0 * (np.arange(256, dtype=np.float32) / 255.0) ** cap.gamma).astype(np.float32)
    img = curve[levels]
    img += cap.noise_sigma * _sensor_noise(cap.noise_offset, img.shape)
    img += 0.5
    return np.clip(img, 0, 255).astype(np.uint8)


def render_face(seed: int, identity: int, sample: int, image_size: int) -> np.ndarray:
    """The uint8 (image_size, image_size, 3) RGB image `sample` of synthetic `identity`."""
    who = draw_identity(seed, identity)
    cap = draw_capture(seed, identity, sample)
    canvas = _Canvas(image_size, cap)
    _draw_background(canvas, cap)
    _draw_face(canvas, who, cap)
    return _finish(canvas, cap)


def verification_identity_base(name: str) -> int:
    """First identity number of the synthetic verification set `name`: far above
    any training identity (those are 0 .. N-1 with N < 2**32)."""
    return (1 + zlib.crc32(name.encode())) << 32


class SyntheticFaces(FaceImageDataset):
    """`num_identities` x `images_per_identity` synthetic faces; label = identity.

    Image i shows identity `first_identity + i // images_per_identity`, sample
    `i % images_per_identity`; it is drawn when asked for, so the set is free to build.
    """

    def __init__(self, num_identities: int, images_per_identity: int, *, image_size: int = 112,
                 seed: int = 0, flip: bool = True, first_identity: int = 0):
        super().__init__(image_size=image_size, seed=seed, flip=flip)
        if num_identities < 1 or images_per_identity < 1:
            raise ValueError(
                f"need at least one identity and one image each, got {num_identities} x {images_per_identity}"
            )
        self.num_classes = int(num_identities)
        self.images_per_identity = int(images_per_identity)
        self.first_identity = int(first_identity)

    def __len__(self) -> int:
        return self.num_classes * self.images_per_identity

    def _index_parts(self) -> list[bytes]:
        return [str((self.seed, self.first_identity, self.images_per_identity)).encode()]

    def load(self, index: int) -> tuple[np.ndarray, int]:
        label, sample = divmod(index, self.images_per_identity)
        return render_face(self.seed, self.first_identity + label, sample, self.image_size), label


def synthetic_pairs(name: str, *, num_pairs: int = 600, num_identities: int = 300, image_size: int = 112,
                    seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Verification pairs over identities disjoint from training: (uint8 (2P, 3, H, W)
    images, interleaved pairs; bool (P,) same-identity flags, alternating True/False so
    that every contiguous fold is balanced)."""
    if num_pairs < 2 or num_identities < 2:
        raise ValueError(f"need at least 2 pairs and 2 identities, got {num_pairs} and {num_identities}")
    base = verification_identity_base(name)
    rng = np.random.default_rng((seed, _PAIRS_STREAM, base))
    issame = np.arange(num_pairs) % 2 == 0
    images = torch.empty((2 * num_pairs, 3, image_size, image_size), dtype=torch.uint8)
    for k in range(num_pairs):
        first = int(rng.integers(num_identities))
        second = first if issame[k] else int((first + rng.integers(1, num_identities)) % num_identities)
        samples = rng.integers(0, 1 << 31, 2)
        for j, (who, sample) in enumerate(((first, samples[0]), (second, samples[1]))):
            img = render_face(seed, base + who, int(sample), image_size)
            images[2 * k + j] = to_chw(img)
    return images, issame
