"""A stand-in for insightface's SCRFD face detector: an ONNX graph with SCRFD's outputs that finds red
squares, each a "face" whose box and landmarks are known offsets from the square's place; and photos
for it, among them photos of known aligned faces, which the tools that take photos (``--detector``)
must find, align and score as those faces."""

import os
import warnings

import numpy as np
import torch
from PIL import Image

from train.ijb import ALIGNED_SIZE, ARCFACE_TEMPLATE

GREY, RED = (128, 128, 128), (255, 0, 0)
PHOTO_W, PHOTO_H = 1280, 960  # scaled by 1/2 into the 640 x 640 canvas (its lower quarter black)
# The template's points (112-pixel crop) at a quarter size, in units of stride 8: a face 28 canvas
# pixels wide, whose box runs 3.5 strides right and down from the anchor.
KEYPOINTS = ARCFACE_TEMPLATE / 4 / 8
BOX = (0.0, 0.0, 3.5, 3.5)


class RedSquares(torch.nn.Module):
    """SCRFD's outputs (scores, then boxes, then keypoints, each stride's (places x anchors, columns)):
    at stride 8 a place whose pixels are red scores near 1, every other place near 0; boxes and
    keypoints (``points``, (5, 2) in units of stride 8) are the same offsets everywhere. ``least_red``: the
    redness (pure red 2, black 0, grey -1: R - G - B - 1 of the input) that scores 0.5."""

    def __init__(self, strides=(8, 16, 32), anchors=2, keypoints=True, batch_dim=False, by_stride=False,
                 points=KEYPOINTS, least_red=1.0):
        super().__init__()
        self.least_red = least_red
        self.strides, self.anchors, self.keypoints, self.batch_dim = strides, anchors, keypoints, batch_dim
        self.by_stride = by_stride  # the outputs stride by stride, each's scores, boxes and keypoints
        self.register_buffer("box", torch.tensor([BOX], dtype=torch.float32))
        self.register_buffer("points", torch.tensor(np.reshape(points, (1, 10)), dtype=torch.float32))

    def forward(self, x):
        scores, boxes, points = [], [], []
        for stride in self.strides:
            pooled = torch.nn.functional.avg_pool2d(x, stride)
            redness = pooled[:, 0] - pooled[:, 1] - pooled[:, 2] - 1  # red 2, black 0, grey -1
            logit = 8 * (redness - self.least_red) / (2 - self.least_red) if stride == 8 else redness * 0 - 20
            score = torch.sigmoid(logit).reshape(-1, 1, 1).expand(-1, self.anchors, 1).reshape(-1, 1)
            scores.append(score)
            boxes.append(score * 0 + self.box)
            points.append(score * 0 + self.points)
        outputs = scores + boxes + (points if self.keypoints else [])
        if self.by_stride:
            outputs = [o for level in zip(scores, boxes, points) for o in level]
        return tuple(o[None] for o in outputs) if self.batch_dim else tuple(outputs)


def export(module, path, *, fixed=None):
    size = fixed or 640
    outputs = module(torch.zeros(1, 3, 128, 128))
    names = [f"out{i}" for i in range(len(outputs) if isinstance(outputs, tuple) else 1)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(input_names=["input.1"], output_names=names,
                      opset_version=17, dynamic_axes=None if fixed else {"input.1": {2: "h", 3: "w"}})
        try:
            torch.onnx.export(module.eval(), (torch.zeros(1, 3, size, size),), str(path), dynamo=False, **kwargs)
        except TypeError:  # a torch before the exporter's `dynamo` switch
            torch.onnx.export(module.eval(), (torch.zeros(1, 3, size, size),), str(path), **kwargs)
    return str(path)


def photo(squares, size=(PHOTO_W, PHOTO_H), side=16):
    """A grey photo with a red ``side`` x ``side`` square at each (x, y) of ``squares`` (multiples of
    ``side``: one place of stride 8 in the canvas, where the photo is scaled by 8 / side)."""
    pixels = np.full((size[1], size[0], 3), GREY, np.uint8)
    for x, y in squares:
        pixels[y:y + side, x:x + side] = RED
    return Image.fromarray(pixels)


# A face of a photo for FACE_DETECTOR lies this far (x, y) right of and below its red square (8 x 8, the
# photo not scaled: one place of stride 8): beside the square, not over it.
FACE_AT = np.array([16.0, 0.0])


def face_detector(path) -> str:
    """The detector, exported to ``path``, whose landmarks put the ArcFace template (112 pixels) at
    :data:`FACE_AT` from a red square's place: in a photo of :func:`photo_of_faces`, each face aligned from
    them is the face placed there, pixel for pixel (the template's points a float32 rounding off whole
    pixels). Only a red nearly pure is a face (a synthetic face's reddest 8 x 8 pixels can reach 1.1)."""
    return export(RedSquares(points=(ARCFACE_TEMPLATE + FACE_AT) / 8, least_red=1.5), path)


def photo_of_faces(faces, places, size=(640, 640)) -> Image.Image:
    """A grey photo of ``size`` (at most 640 x 640: the detector's canvas, unscaled) with a red 8 x 8 square
    at each (x, y) of ``places`` (multiples of 8) and the uint8 (112, 112, 3) face ``faces[k]`` beside the
    k-th, where :func:`face_detector` finds it."""
    pixels = np.array(photo(places, size, side=8))
    for face, (x, y) in zip(faces, places):
        left, top = x + int(FACE_AT[0]), y + int(FACE_AT[1])
        pixels[top:top + ALIGNED_SIZE, left:left + ALIGNED_SIZE] = face
    return Image.fromarray(pixels)


def crop_for_model(face: np.ndarray, image_size: int) -> Image.Image:
    """The aligned crop a model of ``image_size`` is shown of the 112-pixel ``face``, as
    ``train.ijb.align_for_model`` resizes it: what a photo of :func:`photo_of_faces` gives, aligned."""
    return Image.fromarray(face).resize((image_size, image_size), Image.Resampling.BILINEAR)


def crops_and_photos(faces: dict, image_size: int, crops, photos) -> None:
    """Each 112-pixel face of ``faces`` (name -> uint8 (112, 112, 3)) saved twice: as the aligned crop a
    model of ``image_size`` is shown, at ``crops/<name>``, and in a photo of :func:`photo_of_faces`, at
    ``photos/<name>`` (its red square at a place of its own in each photo)."""
    for k, (name, face) in enumerate(sorted(faces.items())):
        for folder, image in ((crops, crop_for_model(face, image_size)),
                              (photos, photo_of_faces([face], [(8 * (k % 40), 8 * (k % 50))]))):
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image.save(path)
