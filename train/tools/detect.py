"""Find the faces in photos with insightface's SCRFD detector (an ONNX file) and write their 5
landmarks in the file that ``train.tools.align`` and ``train.embed --landmarks`` read.

    python -m train.tools.detect --detector det_10g.onnx --images RAW_ROOT --output landmarks.txt
                                 [--threshold 0.5] [--size 640] [--all-faces] [--workers N]
                                 [--device cpu|cuda] [--resume | --overwrite]

The detector is one of insightface's SCRFD models with keypoints: ``det_10g.onnx`` of its
``buffalo_l`` pack, ``det_500m.onnx`` of ``buffalo_s``, or a ``scrfd_*_kps`` / ``*_bnkps`` export
(3 strides with 2 anchors a place, or 5 strides with 1). As insightface's ``SCRFD.detect`` does, each
photo (upright by its EXIF orientation) is scaled to fit --size x --size keeping its shape, placed in
the top-left corner on black, fed as (RGB - 127.5) / 128, and the anchors above --threshold are
decoded, scaled back to the photo's pixels and kept by non-maximum suppression (IoU 0.4). Unlike
insightface's, the photo is scaled by Pillow's antialiased bilinear filter (OpenCV's resize does not
antialias), points are mapped back through pixel centres ((x + 0.5) / scale - 0.5, where insightface
divides by the scale) and each axis by its own scale (insightface uses the height's for both).

Every image under --images (recursively, linked folders too) gets one line: its main face, the one
insightface's ``max_num=1`` picks (the largest box, with a penalty for lying off the photo's
centre), as ``path x1 y1 ... x5 y5 score``; with --all-faces a line for each face, best first, which
align and embed read as several faces of the photo. A photo without a face above the threshold, or
that does not decode, gets a comment line saying so, is listed at the end, and makes the exit
status 1.

Lines are written to ``<output>.partial`` as the photos are done, and the file takes its name when
all are: a run stopped by Ctrl-C or SIGTERM keeps what it did, and --resume finishes it (with the
same photos, detector and settings, which the file's first line records).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
import time
import warnings

from train.signals import (Stopped, readers_may_leave, stop_on_signals,  # (the standard library only)
                           stop_while_importing)

with stop_while_importing(__name__, "detect: "):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from train.data import leave_signals_to_the_main_process, worker_start_method
    from train.data.transforms import decode_failure, to_rgb
    from train.embed import images_under
    from train.onnx_backbone import open_session
    from train.tools import (ArgumentParser, RunLock, check_images_folder, check_outputs, first_line, listable_name,
                             path_arg, taking_back_folders, usable_cpus)
    from train.tools.align import _fields, _numbers

# insightface's FaceAnalysis: det_size (640, 640), det_thresh 0.5; SCRFD's nms_threshold 0.4.
DEFAULT_SIZE = 640
DEFAULT_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
_SHOWN_FAILURES = 20
_NO_FACE, _UNREADABLE = "# no face: ", "# unreadable: "


def detector_device_error(text: str) -> str | None:
    """Why ``--device text`` cannot run the detector, None where it can: onnxruntime runs it, here on
    the CPU or on CUDA (with onnxruntime-gpu), not on PyTorch's other devices (mps, xpu)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        return f"--device {text!r} is not a device (cpu, cuda, cuda:1, ...)"
    if device.type not in ("cpu", "cuda"):
        return (f"--device {text}: the detector runs on onnxruntime, here on cpu or cuda (with onnxruntime-gpu), not "
                f"on {device.type}: leave --device out")
    return None


class FaceDetector:
    """An SCRFD face detector with 5 keypoints in an ONNX file, run by onnxruntime.
    ``detect(image)``: (boxes (K, 4) x1 y1 x2 y2, scores (K,), landmarks (K, 5, 2)) of the faces in a
    Pillow RGB image, in its pixels, best score first."""

    def __init__(self, path: str, *, size: int | None = None, threshold: float = DEFAULT_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD, device: str = "cpu"):
        self.path, self.threshold, self.nms_threshold = path, float(threshold), float(nms_threshold)
        self.session = open_session(path, device)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] != 3:
            raise ValueError(f"{path}: the graph's inputs are {[i.shape for i in inputs]}, not one (1, 3, H, W) image: "
                             "not an SCRFD face detector")
        if len(outputs) in (6, 10):
            raise ValueError(f"{path}: this SCRFD model finds boxes only ({len(outputs)} outputs), no landmarks to "
                             "align by: use one with keypoints (insightface's det_10g.onnx, scrfd_*_kps)")
        if len(outputs) not in (9, 15):
            raise ValueError(f"{path}: the graph has {len(outputs)} output(s): not an SCRFD face detector with "
                             "keypoints (9 or 15: scores, boxes and keypoints at each of 3 or 5 strides)")
        self.input_name, self.output_names = inputs[0].name, [o.name for o in outputs]
        self.strides = (8, 16, 32) if len(outputs) == 9 else (8, 16, 32, 64, 128)
        height, width = inputs[0].shape[2:]
        if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
            if size is not None and (size, size) != (width, height):
                raise ValueError(f"--size {size}: {path} takes {width}x{height} images only")
            self.width, self.height = width, height
        else:
            side = DEFAULT_SIZE if size is None else int(size)
            if side <= 0 or side % self.strides[-1]:
                raise ValueError(f"--size must be a positive multiple of {self.strides[-1]} (this detector's largest "
                                 f"stride), got {side}")
            self.width = self.height = side
        self.anchors = None  # per place, from the first run's output sizes
        self._centres = self._probe()

    def _probe(self) -> list[np.ndarray]:
        """Runs the graph on a black image to learn its outputs' layout; the anchor centres of each
        stride."""
        try:
            outputs = self._run(np.zeros((self.height, self.width, 3), np.uint8))
        except Exception as error:  # onnxruntime's errors share no base class but Exception
            raise ValueError(f"{self.path}: onnxruntime cannot run it on a {self.width}x{self.height} image: "
                             f"{first_line(error)}") from None
        # insightface lists the scores of each stride, then the boxes, then the keypoints; an export that
        # orders them otherwise is put in that order by their shapes: 1, 4 or 10 columns, and fewer rows
        # at a larger stride.
        places = [(self.height // s) * (self.width // s) for s in self.strides]
        score_rows = [o.shape[0] for o in outputs if o.ndim == 2 and o.shape[1] == 1]
        anchors = max(score_rows) // places[0] if score_rows and places[0] else 0
        order = []
        for kind, columns in (("scores", 1), ("boxes", 4), ("keypoints", 10)):
            group = sorted((k for k, o in enumerate(outputs) if o.ndim == 2 and o.shape[1] == columns),
                           key=lambda k: -outputs[k].shape[0])
            expected = [(n * anchors, columns) for n in places]
            if anchors not in (1, 2) or [outputs[k].shape for k in group] != expected:
                raise ValueError(f"{self.path}: its outputs are {[o.shape for o in outputs]}, not the {kind} of an "
                                 f"SCRFD face detector at {self.width}x{self.height} ({expected}, with 1 or 2 anchors "
                                 "a place)")
            order += group
        self.output_names = [self.output_names[k] for k in order]
        self.anchors = anchors
        centres = []
        for stride in self.strides:
            ys, xs = np.mgrid[:self.height // stride, :self.width // stride]
            # An anchor sits at its place's top-left corner (insightface's anchor_centers), each place's
            # anchors one after the other.
            points = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            centres.append(np.repeat(points, anchors, axis=0))
        return centres

    def _run(self, canvas: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for a (height, width, 3) uint8 RGB canvas, each as (rows, columns):
        a leading batch dimension of 1 dropped."""
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        return [np.asarray(o, dtype=np.float32).reshape(-1, o.shape[-1]) if o.ndim else np.asarray(o)
                for o in outputs]

    def letterbox(self, image: Image.Image) -> tuple[np.ndarray, float, float]:
        return letterbox(image, self.width, self.height)

    def detect_canvas(self, canvas: np.ndarray, scale_x: float, scale_y: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``detect`` of a canvas that ``letterbox`` made."""
        outputs, levels = self._run(canvas), len(self.strides)
        boxes, scores, points = [], [], []
        for level, stride in enumerate(self.strides):
            score = outputs[level][:, 0]
            keep = np.flatnonzero(score >= self.threshold)
            centres = self._centres[level][keep]
            distances = outputs[levels + level][keep] * stride  # to the left, top, right, bottom edges
            offsets = outputs[2 * levels + level][keep].reshape(-1, 5, 2) * stride
            boxes.append(np.concatenate([centres - distances[:, :2], centres + distances[:, 2:]], axis=1))
            points.append(centres[:, None, :] + offsets)
            scores.append(score[keep])
        boxes, scores, points = np.concatenate(boxes), np.concatenate(scores), np.concatenate(points)
        # From the canvas's pixels to the photo's, through pixel centres as the resize maps them; then
        # the suppression, in the photo's pixels as insightface's (its + 1 a side depends on the scale).
        scale = np.array([scale_x, scale_y], np.float64)
        boxes = ((boxes.reshape(-1, 2, 2) + 0.5) / scale - 0.5).reshape(-1, 4)
        points = (points + 0.5) / scale - 0.5
        order = np.argsort(-scores, kind="stable")
        kept = order[non_maximum_suppression(boxes[order], self.nms_threshold)]
        return boxes[kept], scores[kept].astype(np.float64), points[kept]

    def detect(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.detect_canvas(*self.letterbox(image))


def letterbox(image: Image.Image, width: int, height: int) -> tuple[np.ndarray, float, float]:
    """(a detector's (height, width, 3) input canvas: ``image`` scaled to fit it keeping its shape, in
    its top-left corner on black; the scales of x and y), as insightface's SCRFD.detect makes it."""
    if image.height / image.width > height / width:
        new_height = height
        new_width = max(1, int(new_height * image.width / image.height))
    else:
        new_width = width
        new_height = max(1, int(new_width * image.height / image.width))
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[:new_height, :new_width] = np.asarray(image.resize((new_width, new_height), Image.Resampling.BILINEAR))
    return canvas, new_width / image.width, new_height / image.height


def non_maximum_suppression(boxes: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of ``boxes`` (K, 4), sorted best first, that no better box overlaps by more than
    ``threshold`` IoU (areas counted in whole pixels, + 1 a side, as insightface's SCRFD counts)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, kept = np.arange(len(boxes)), []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(best)
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        overlap = width * height
        order = rest[overlap / (areas[best] + areas[rest] - overlap) <= threshold]
    return np.array(kept, dtype=np.int64)


def main_face(boxes: np.ndarray, width: int, height: int) -> int:
    """The index of the face insightface's ``max_num=1`` keeps: the largest box area less twice the
    squared distance of its centre from the photo's."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    offset = (boxes[:, 0] + boxes[:, 2]) / 2 - width // 2, (boxes[:, 1] + boxes[:, 3]) / 2 - height // 2
    return int(np.argmax(area - 2.0 * (offset[0] ** 2 + offset[1] ** 2)))


def quote_name(name: str) -> str:
    """``name`` as a landmarks file's first field: in double quotes when it holds white space,
    commas or quotes, or starts with # (which would make the line a comment)."""
    if name.startswith("#") or any(c.isspace() or c in ',"' for c in name):
        out = io.StringIO()
        csv.writer(out, delimiter=" ", quoting=csv.QUOTE_ALL, lineterminator="").writerow([name])
        return out.getvalue()
    return name


def face_line(name: str, landmarks: np.ndarray, score: float) -> str:
    return " ".join([quote_name(name), *(f"{v:.2f}" for v in landmarks.reshape(-1)), f"{score:.4f}"]) + "\n"


class Photos(torch.utils.data.Dataset):
    """(index, the detector's canvas, x scale, y scale, width, height, "") of each photo, upright by its
    EXIF orientation; (index, None, 0, 0, 0, 0, why) for one that does not decode."""

    def __init__(self, paths: list[str], width: int, height: int):
        self.paths, self.width, self.height = paths, width, height

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's about a corrupt EXIF block: the pixels are there
                with Image.open(self.paths[index]) as image:
                    upright = to_rgb(ImageOps.exif_transpose(image))
        except FileNotFoundError:
            return index, None, 0.0, 0.0, 0, 0, "no such file (a broken link?)"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return index, None, 0.0, 0.0, 0, 0, decode_failure(error)
        canvas, scale_x, scale_y = letterbox(upright, self.width, self.height)
        return index, canvas, scale_x, scale_y, upright.width, upright.height, ""


def _as_is(item):
    return item


def detect_photos(detector: FaceDetector, paths: list[str], *, all_faces: bool = False, workers: int = 0):
    """Yields, photo by photo in order, (its index in ``paths``, the scores (F,) and landmarks
    (F, 5, 2) of its faces, "" or why it has none). The faces are its main face (insightface's
    ``max_num=1`` pick) or, with ``all_faces``, all of them, best first; a photo that does not decode
    has None for both. ``workers`` processes decode and scale the photos; they leave SIGTERM and
    Ctrl-C to this process."""
    loader = torch.utils.data.DataLoader(
        Photos(paths, detector.width, detector.height), batch_size=None, num_workers=workers, collate_fn=_as_is,
        worker_init_fn=leave_signals_to_the_main_process() if workers else None,
        multiprocessing_context=worker_start_method() if workers else None)
    for index, canvas, scale_x, scale_y, width, height, failure in loader:
        if canvas is None:
            yield index, None, None, f"cannot read the image: {failure}"
            continue
        boxes, scores, points = detector.detect_canvas(canvas, scale_x, scale_y)
        if not len(scores):
            yield index, scores, points, f"no face scores {detector.threshold:g} or more"
            continue
        chosen = slice(None) if all_faces else [main_face(boxes, width, height)]
        yield index, scores[chosen], points[chosen], ""


def _settings_line(args: argparse.Namespace, detector: FaceDetector) -> str:
    return (f"# train.tools.detect: photos {os.path.abspath(args.images)}, detector {os.path.abspath(args.detector)}, "
            f"{detector.width}x{detector.height}, threshold {args.threshold:g}, "
            f"{'all faces' if args.all_faces else 'main face'}\n")


def _face_name(line: str) -> str | None:
    """The photo a line of a face names, or None when the line is not a whole face."""
    fields = _fields(line)
    if len(fields) < 12 or _numbers(fields[1:12]) is None:
        return None
    return fields[0]


def _done_in_partial(path: str, settings: str) -> tuple[list[str], set[str]]:
    """(the lines of a stopped run's partial file to keep, the photos they cover). A photo that did
    not decode is tried again, as is one whose line is damaged (a last line cut short). ValueError
    when the file was written with other settings, or is not one of these files."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a file detect writes (not UTF-8 text): pass --overwrite to start "
                         "again") from None
    if not lines or lines[0] != settings:
        raise ValueError(f"{path} was written with other settings ({lines[0].strip()[2:] if lines else 'none'}): "
                         "resume with those, or pass --overwrite to start again")
    kept, redo = [], set()  # (line, the photo it names or None), the photos with a damaged line
    for line in lines:
        if line.startswith(_UNREADABLE):
            continue
        if line.startswith(_NO_FACE):
            names = _fields(line[len(_NO_FACE):])
            name = names[0] if len(names) == 1 and line.endswith("\n") else None
        elif line.startswith("#"):
            kept.append((line, None))
            continue
        else:
            name = _face_name(line) if line.endswith("\n") else None
        if name is None:  # damaged (a last line cut short): its photo, if its name reads, is done again
            with contextlib.suppress(ValueError, csv.Error, IndexError):
                redo.add(os.path.normpath(_fields(line[len(_NO_FACE):] if line.startswith(_NO_FACE) else line)[0]))
            continue
        kept.append((line, os.path.normpath(name)))
    kept = [(line, name) for line, name in kept if name not in redo]
    return [line for line, _ in kept], {name for _, name in kept if name is not None}


class _Partial:
    """``<output>.partial``, written whole from ``lines`` and then open for appending."""

    def __init__(self, path: str, lines: list[str]):
        self.path = path
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(lines)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, lines: list[str]) -> None:
        self.file.writelines(lines)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def main(argv: list[str] | None = None) -> int:
    with readers_may_leave():  # (its reader gone, 2>&1 | head: its first line raised, exit status 120)
        try:
            return taking_back_folders(lambda: _main(argv))
        except KeyboardInterrupt:  # a Ctrl-C before the photos (loading the detector, listing the folder)
            print("\ndetect: stopped by SIGINT while starting, before this run did any photo", file=sys.stderr)
            return 130


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m train.tools.detect", name="detect",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", type=path_arg, required=True,
                        help="an SCRFD face detector with keypoints in an ONNX file (insightface's det_10g.onnx)")
    parser.add_argument("--images", type=path_arg, required=True, help="the folder of photos (read recursively)")
    parser.add_argument("--output", type=path_arg, required=True,
                        help="the landmarks file to write (paths relative to --images)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"the least detection score of a face (default {DEFAULT_THRESHOLD}, insightface's)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"the side of the square the photos are scaled into for the detector (default "
                             f"{DEFAULT_SIZE}, or the graph's own when it is fixed)")
    parser.add_argument("--all-faces", action="store_true",
                        help="a line for every face found (group photos), not only the main face")
    parser.add_argument("--workers", type=int, default=min(4, usable_cpus()),
                        help="processes decoding and scaling the photos (0: in this process; default: one a core "
                             "this process may use, up to 4)")
    parser.add_argument("--device", default="cpu",
                        help="where the detector runs: cpu, or cuda[:N] with onnxruntime-gpu (default: cpu)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace --output, or a stopped run's partial file")
    existing.add_argument("--resume", action="store_true", help="finish the stopped run whose partial file is there")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:
        parser.error(f"--threshold must lie between 0 and 1, got {args.threshold}")
    if args.workers < 0:
        parser.error(f"--workers must be at least 0, got {args.workers}")
    if detector_device_error(args.device):
        parser.error(detector_device_error(args.device))
    started = time.monotonic()
    partial_path = args.output + ".partial"

    lock = None
    try:
        check_images_folder(args.images)
        for flag, path in (("--images", args.images), ("--detector", args.detector)):
            if not listable_name(os.path.abspath(path)):  # the file's first line records both
                raise ValueError(f"{flag} {path!r}: its path is not UTF-8 text without line breaks")
        if os.path.exists(args.detector) and os.path.realpath(args.output) == os.path.realpath(args.detector):
            raise ValueError(f"--output {args.output} is --detector: name another file")
        if args.resume and not os.path.lexists(partial_path) and os.path.isfile(args.output):
            raise ValueError(f"--resume: {args.output} is the output of a run that finished (no {partial_path} of a "
                             "stopped one is there): nothing to finish; --overwrite detects again")
        # A stopped run that was replacing --output resumes without --overwrite.
        check_outputs([args.output], args.overwrite or (args.resume and os.path.isfile(partial_path)),
                      image_folders=(args.images,))
        lock = RunLock(args.output + ".lock", f"another detect run is writing {args.output}: wait for it, or stop "
                       "it and pass --resume")
        if os.path.isdir(partial_path):
            raise ValueError(f"{partial_path}, where detect keeps a run's lines, is a folder")
        if os.path.lexists(partial_path) and not (args.resume or args.overwrite):
            raise ValueError(f"{partial_path} is left from a stopped run: pass --resume to finish it, or --overwrite "
                             "to start again")
        detector = FaceDetector(args.detector, size=args.size, threshold=args.threshold, device=args.device)
        paths = images_under(args.images)  # (was "--images <it> holds no .jpg, .jpeg, .png or .bmp file")
        if os.path.realpath(args.output) in {os.path.realpath(path) for path in paths}:
            raise ValueError(f"--output {args.output} is one of the photos: name another file")
        settings = _settings_line(args, detector)
        kept, done = _done_in_partial(partial_path, settings) if args.resume and os.path.exists(partial_path) \
            else ([], set())
        partial = _Partial(partial_path, kept or [
            settings, "# image x1 y1 ... x5 y5 score: left eye, right eye, nose tip, left and right mouth corner, in "
            "the photo's pixels\n"])
    except (OSError, ValueError) as error:
        if lock is not None:
            lock.release()
        print(f"detect: error: {error}", file=sys.stderr)
        return 2
    try:
        return _detect_all(args, detector, paths, partial, kept, done, started)
    finally:
        lock.release()


def _detect_all(args, detector: FaceDetector, paths: list[str], partial: _Partial, kept: list[str], done: set[str],
                started: float) -> int:
    """The photos not ``done`` into ``partial``, then the summary; the exit status."""
    partial_path = partial.path
    names = [os.path.relpath(path, args.images) for path in paths]
    failures = [f"{paths[i]!r}: its name is not UTF-8 text without line breaks, which a line of the file must be"
                for i, name in enumerate(names) if not listable_name(name)]
    todo = [i for i, name in enumerate(names) if listable_name(name) and os.path.normpath(name) not in done]
    print(f"detect: {len(todo)} photo(s) of {args.images} at {detector.width}x{detector.height}"
          + (f" ({len(done)} done by the stopped run)" if done else ""), file=sys.stderr)

    faces = found = 0
    earlier_faces = sum(not line.startswith("#") for line in kept)
    earlier_empty = sum(line.startswith(_NO_FACE) for line in kept)  # the stopped run's photos without a face
    bar = progress(len(todo), "detect")
    try:
        with stop_on_signals():
            for index, scores, points, why in \
                    detect_photos(detector, [paths[i] for i in todo], all_faces=args.all_faces, workers=args.workers):
                name = names[todo[index]]
                if why:
                    lines = [f"{_UNREADABLE if scores is None else _NO_FACE}{quote_name(name)}\n"]
                    failures.append(f"{os.path.join(args.images, name)}: {why}")
                else:
                    lines = [face_line(name, p, score) for p, score in zip(points, scores)]
                    faces, found = faces + len(scores), found + 1
                partial.write(lines)
                if bar is not None:
                    bar.update(1)
    except Stopped as stop:
        if bar is not None:
            bar.close()
        partial.close()
        print(f"\ndetect: stopped by {stop.name}: the photos done are in {partial_path}; rerun with --resume to "
              "finish", file=sys.stderr)
        return 128 + stop.number
    except OSError as error:  # a full disk, say
        partial.close()
        print(f"\ndetect: error: cannot write {partial_path}: {error.strerror or error}; the photos done are in it: "
              "rerun with --resume when it can be written", file=sys.stderr)
        return 2
    if bar is not None:
        bar.close()
    partial.close()
    try:
        os.replace(partial_path, args.output)
    except OSError as error:
        print(f"detect: error: cannot name {partial_path} {args.output}: {error.strerror or error}", file=sys.stderr)
        return 2
    for shown, failure in enumerate(failures):
        if shown == _SHOWN_FAILURES:
            print(f"detect: ... and {len(failures) - shown} more", file=sys.stderr)
            break
        print(f"detect: {failure}", file=sys.stderr)
    if earlier_empty:
        print(f"detect: and {earlier_empty} photo(s) without a face in the stopped run (see the comments in "
              f"{args.output})", file=sys.stderr)
    print(f"detect: wrote {faces} face(s) of {found} photo(s) to {args.output} in {time.monotonic() - started:.1f} s"
          + (f" ({faces + earlier_faces} in the file with the stopped run's)" if done else "")
          + (f"; {len(failures) + earlier_empty} photo(s) have no face line (listed above)"
             if failures or earlier_empty else ""), file=sys.stderr)
    return 1 if failures or earlier_empty else 0


def progress(total: int, desc: str):
    """A bar of ``total`` photos on a terminal (``train.progress.progress_bar``)."""
    from train.progress import progress_bar

    return progress_bar(total, desc, "photo")


if __name__ == "__main__":
    sys.exit(main())
