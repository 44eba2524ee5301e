"""Writes ``data/opencv_resize.npz``: what OpenCV's ``cv2.resize`` makes of a few images with each of the
five interpolations AdaFace's low-resolution augmentation draws, for ``test_augment.py`` to compare
``train.data.augment.resize`` with, where OpenCV is not installed. Run it by hand with OpenCV present:

    pip install opencv-python-headless && python tests/train/make_opencv_resize_cases.py
"""

import os

import numpy as np

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "opencv_resize.npz")
KERNELS = ("nearest", "linear", "area", "cubic", "lanczos4")  # INTER_NEAREST, ... INTER_LANCZOS4
# (height, width) of the image, then of the resize: the augmentation's 112 px down to a fifth and back
# up (smaller ones up, to keep the file small), odd sizes, to and from one pixel, one axis up and the
# other down.
CASES = [(112, 112, 30, 30), (112, 112, 22, 22), (22, 22, 56, 56), (64, 64, 57, 57), (30, 30, 47, 47),
         (37, 29, 11, 17), (11, 17, 37, 29), (26, 31, 28, 25), (9, 9, 1, 1), (1, 1, 7, 5), (64, 64, 32, 32)]


def case_image(height: int, width: int, seed: int) -> np.ndarray:
    """Half noise, half stripes finer than the smallest resize keeps: the worst cases for aliasing."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    y, x = np.indices((height, width))
    stripes = (127.5 + 127.5 * np.sin(2 * np.pi * (x / 2.7 + y / 5.3)))[..., None].repeat(3, axis=2)
    return np.where((x < width / 2)[..., None], noise, np.rint(stripes)).astype(np.uint8)


def main() -> None:
    import cv2

    out = {}
    for k, (height, width, h, w) in enumerate(CASES):
        image = case_image(height, width, k)
        for name in KERNELS:
            code = getattr(cv2, f"INTER_{name.upper()}")
            out[f"{k}_{name}"] = cv2.resize(image, (w, h), interpolation=code).reshape(h, w, 3)
    np.savez_compressed(PATH, opencv_version=np.array(cv2.__version__), **out)
    print(f"wrote {len(out)} resizes by OpenCV {cv2.__version__} to {PATH}")


if __name__ == "__main__":
    main()
