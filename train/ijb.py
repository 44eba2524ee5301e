"""``python -m train.ijb``: IJB-B / IJB-C 1:1 template verification (TAR at FAR = 1e-6 ... 1e-1), the
benchmark the ArcFace paper reports, and 1:N template identification (rank-k identification rate
and TPIR at FPIR), run on insightface's ``IJB_release`` files.

The protocol is insightface's (``recognition/arcface_torch/eval_ijbc.py``): every loose crop is aligned
to the ArcFace 5-point template by a least-squares similarity transform; its embedding is
embedding(image) + embedding(mirror) (F1), kept un-normalised so that its norm weighs it (N1) and
multiplied by the detector's faceness score (D1); a template's feature is the sum over its media of
the mean feature of the media's frames, L2-normalised; a pair scores the cosine of its templates.

Where this differs from insightface, and why:

- TAR at FAR is exact rather than read off the nearest point of scikit-learn's ROC curve, which may lie
  above the FAR asked for. A pair is accepted when its score is strictly above the threshold, so
  pairs tied with it are rejected and the FAR achieved never exceeds the one asked for; a FAR that
  allows less than one false accept (FAR x negatives < 1) is reported as not measurable (null).
- Images are decoded and warped with Pillow instead of OpenCV (same pixel-centre convention, same
  black border); OpenCV's fixed-point bilinear rounds a little differently, so an aligned pixel
  may differ by one grey level.
- A model whose input is not 112 pixels (insightface's always are) is shown the 112 crop resized, as the
  trainer showed it its training faces, not a crop framed by insightface's template for that size.
- Faces are joined to their landmarks by image name; insightface joins them by line position, which
  gives the same result when, as in the release, both files list the same images in the same order.
  Media and template features are summed in float64.
- 1:N: each gallery (IJB-C's G1 and G2, IJB-B's S1 and S2) is searched on its own, as the protocol
  defines it: a probe whose subject is in the other gallery is a non-mated search, and FPIR is the
  fraction of non-mated searches whose best score passes the threshold. insightface's ``ijb_1n.py``
  searches both galleries as one, where every probe has its mate, and derives its threshold from all
  non-mate pairs; its figures, which papers quote, are reported beside the protocol's.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

from .signals import signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "ijb: "):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from . import checkpoint
    from .data.transforms import to_chw, to_rgb, unreadable_image
    from .embed import (add_benchmark_options, benchmark_inputs, check_benchmark_options, check_table_output,
                        describe_about, embed_images, load_model, model_digests, read_about, read_table,
                        refuse_amp_of_an_onnx_model, report_unreadable, run_stoppable, set_amp, table_files,
                        write_table)
    from .tools import ArgumentParser, check_outputs, path_arg, say, torch_device

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (1e-4, 1e-3, 1e-2, 1e-1)  # 1:N: TPIR at these FPIRs
INSIGHTFACE_FPIRS = (1e-2, 1e-1)  # those insightface's ijb_1n.py prints
RANKS = (1, 5, 10)  # 1:N: identification rate within these ranks (CMC)
TARGETS = ("IJBC", "IJBB")

# Where the eyes, nose tip and mouth corners land in a 112x112 ArcFace crop (x, y in pixels).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])

# The side of the faces the template is for, and of the training sets' faces.
ALIGNED_SIZE = 112

# Pairs scored per step: two (chunk, D) float64 gathers stay near 130 MB at D = 512.
PAIR_CHUNK = 1 << 15

# Probes searched per step: a (chunk, G) float64 score block is 58 MB for IJB-C's 1772-template G1,
# 116 MB for G1 and G2 together.
PROBE_CHUNK = 1 << 12


# ---------------------------------------------------------------------------------------------
# Alignment


def arcface_template(image_size: int) -> np.ndarray:
    """The 5-point template for an ``image_size`` square crop, scaled as insightface's
    ``face_align.estimate_norm`` scales it: by size/112 for multiples of 112, otherwise as the
    128-pixel crop (the 112 template plus an 8-pixel margin on each side) scaled by size/128."""
    if image_size % 112 == 0:
        return ARCFACE_TEMPLATE * (image_size / 112.0)
    ratio = image_size / 128.0
    return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) matrix M of the rotation + uniform scale + translation (no reflection) that
    maps the points ``src`` (N, 2) closest to ``dst`` (N, 2) in least squares: dst ~ M [src; 1].

    This is Umeyama's (1991) estimate, which skimage's SimilarityTransform computes with an SVD;
    in the plane it has a closed form: with points as complex numbers z (src) and w (dst), the
    map z -> a z + b with a = s e^(i theta) is best at a = sum(conj(z_c) w_c) / sum(|z_c|^2),
    z_c and w_c being the centred points, and b = mean(w) - a mean(z).
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two (N, 2) point sets with N >= 2, got {src.shape} and {dst.shape}")
    z, w = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    z_c, w_c = z - z.mean(), w - w.mean()
    spread = float(np.sum(np.abs(z_c) ** 2))
    if not spread > 0:
        raise ValueError("the source points all coincide: no similarity transform fits them")
    a = np.sum(np.conj(z_c) * w_c) / spread
    b = w.mean() - a * z.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def warp_affine(image: Image.Image, matrix: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` x ``size`` uint8 RGB crop whose pixel (x, y) shows ``image`` at M^-1 (x, y),
    bilinearly interpolated and rounded, with black beyond the image: what OpenCV's
    ``warpAffine(image, M, (size, size), borderValue=0)`` makes.

    Both place pixel centres at integer coordinates (the landmarks are given that way); Pillow's
    coefficients act on coordinates whose centres sit at +0.5, hence the half-pixel shifts. A
    one-pixel black frame makes Pillow blend the image's edge with black as OpenCV does (alone it
    repeats the edge pixel), and each channel is warped as a float image because Pillow's 8-bit
    bilinear truncates, which would darken every crop by half a grey level on average.
    """
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]
    linear, offset = inverse[:, :2], inverse[:, 2]
    shifted = offset + 1.0 + 0.5 - linear @ np.array([0.5, 0.5])  # + 1: the frame
    coefficients = (linear[0, 0], linear[0, 1], shifted[0], linear[1, 0], linear[1, 1], shifted[1])
    framed = ImageOps.expand(to_rgb(image), border=1, fill=0)
    channels = [np.asarray(band.convert("F").transform((size, size), Image.Transform.AFFINE, coefficients,
                                                        resample=Image.Resampling.BILINEAR))
                for band in framed.split()]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def align_face(image: Image.Image, landmarks: np.ndarray, image_size: int) -> np.ndarray:
    """The uint8 (image_size, image_size, 3) ArcFace crop of the face with 5 ``landmarks``
    (left eye, right eye, nose tip, left and right mouth corner; (x, y) in ``image`` pixels)."""
    return warp_affine(image, estimate_similarity(landmarks, arcface_template(image_size)), image_size)


def align_for_model(image: Image.Image, landmarks: np.ndarray, image_size: int) -> np.ndarray:
    """The uint8 (image_size, image_size, 3) crop a model of that input size is shown: the 112-pixel
    ArcFace crop, resized (bilinear) to ``image_size`` when that differs, as the trainer's readers
    resize its 112-pixel training faces. For 112 this is ``align_face``; insightface's models are 112,
    and its templates for other sizes (``arcface_template``) frame the face otherwise than a model
    trained here on resized faces saw it."""
    crop = align_face(image, landmarks, ALIGNED_SIZE)
    if image_size != ALIGNED_SIZE:
        crop = np.asarray(Image.fromarray(crop).resize((image_size, image_size), Image.Resampling.BILINEAR))
    return crop


# ---------------------------------------------------------------------------------------------
# Reading the release


@dataclass
class IJBProtocol:
    """One target of ``IJB_release``. A face is a line of ``<target>_face_tid_mid.txt``: image
    ``face_image[f]`` (an index into the image arrays) in template ``templates[f]``, media
    ``medias[f]``. Images are the lines of ``<target>_name_5pts_score.txt`` that some face uses,
    in file order; ``pairs`` (P, 2) holds template ids, ``issame`` whether each pair is one person;
    ``identification`` the 1:N galleries and probes, when they were read."""

    target: str
    image_folder: str
    image_names: list[str]
    landmarks: np.ndarray  # (N, 5, 2) float64, in loose-crop pixels
    detector_scores: np.ndarray  # (N,) float32
    face_image: np.ndarray  # (F,) int64
    templates: np.ndarray  # (F,) int64
    medias: np.ndarray  # (F,) int64
    pairs: np.ndarray | None  # (P, 2) int64; None when the 1:1 protocol was not read
    issame: np.ndarray | None  # (P,) bool
    identification: IJBIdentification | None = None


@dataclass
class IJBIdentification:
    """The 1:N protocol: each gallery's templates with their subjects (one template a subject), and
    the probe templates with theirs; template ids are those of ``<target>_face_tid_mid.txt``."""

    galleries: dict[str, tuple[np.ndarray, np.ndarray]]  # name ("G1") -> (template ids, subject ids)
    probes: tuple[np.ndarray, np.ndarray]


def _data_lines(path: str):
    """(line number, fields) of every non-blank line of a whitespace-separated text file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path}")
    line_no = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if fields:
                    yield line_no, fields
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text: {error.reason} (byte 0x{error.object[error.start]:02x}) "
                         f"after line {line_no}") from None


def _line_of_row(path: str, row: int) -> int:
    """The line number of data row ``row`` (0-based, blank lines skipped as np.loadtxt skips them)."""
    for k, (line_no, _) in enumerate(_data_lines(path)):
        if k == row:
            return line_no
    raise IndexError(f"{path} has fewer than {row + 1} data lines")


def read_landmarks(path: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``image_name x1 y1 ... x5 y5 detector_score`` per line -> (names, (N, 5, 2) landmarks,
    (N,) detector scores, (N,) line numbers)."""
    names, values, line_nos, seen = [], [], [], {}
    for line_no, fields in _data_lines(path):
        try:
            numbers = [float(x) for x in fields[1:]]
        except ValueError:
            numbers = []
        if len(fields) != 12 or len(numbers) != 11 or not math.isfinite(numbers[-1]):
            raise ValueError(f"{path}: line {line_no}: expected 'image_name x1 y1 ... x5 y5 score' "
                             f"(a name, 10 coordinates and a finite score), got {' '.join(fields)[:120]!r}")
        if fields[0] in seen:
            raise ValueError(f"{path}: line {line_no}: {fields[0]} is listed again (first on line {seen[fields[0]]})")
        seen[fields[0]] = line_no
        names.append(fields[0])
        values.append(numbers)
        line_nos.append(line_no)
    if not names:
        raise ValueError(f"{path}: no images listed")
    table = np.array(values, dtype=np.float64)
    return names, table[:, :10].reshape(-1, 5, 2), table[:, 10].astype(np.float32), np.array(line_nos)


def read_template_media(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``image_name template_id media_id`` per line -> (names, templates, medias)."""
    names, ids = [], []
    for line_no, fields in _data_lines(path):
        if len(fields) != 3 or not (_is_int(fields[1]) and _is_int(fields[2])):
            raise ValueError(f"{path}: line {line_no}: expected 'image_name template_id media_id', "
                             f"got {' '.join(fields)[:120]!r}")
        names.append(fields[0])
        ids.append((int(fields[1]), int(fields[2])))
    if not names:
        raise ValueError(f"{path}: no faces listed")
    ids = np.array(ids, dtype=np.int64)
    return names, ids[:, 0], ids[:, 1]


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def read_template_pairs(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``template1 template2 label`` per line (label 1: same person, 0: different) -> ((P, 2) template
    ids, (P,) bool). Read with np.loadtxt (IJB-C lists 15.7M pairs); only when that fails is the
    file scanned line by line, to name the line at fault."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "input contained no data": reported below
        try:
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
        except ValueError:
            table = None
    if table is None or table.shape[1] != 3:
        for line_no, fields in _data_lines(path):
            if len(fields) != 3 or not all(map(_is_int, fields)):
                raise ValueError(f"{path}: line {line_no}: expected 'template1 template2 0|1', "
                                 f"got {' '.join(fields)[:120]!r}")
        raise ValueError(f"{path}: not a list of 'template1 template2 0|1' lines")
    if table.shape[0] == 0:
        raise ValueError(f"{path}: no pairs listed")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise ValueError(f"{path}: line {_line_of_row(path, int(bad[0]))}: label {table[bad[0], 2]} is "
                         f"neither 1 (same person) nor 0 (different)")
    return table[:, :2].copy(), table[:, 2] == 1


def read_template_subjects(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The templates of a 1:N list (``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_probe_mixed.csv``, ...): CSV
    with a row a face image, whose ``TEMPLATE_ID`` and ``SUBJECT_ID`` columns (named by a header row;
    without one, the first two columns) give each template its subject. -> (template ids in order of
    first listing, their subject ids, the line of each template's first row). A template listed with
    two subjects is an error naming both lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path}")
    columns, first_line, subject_of = None, {}, {}
    line_no = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            for row in reader:
                if reader.line_num > line_no + 1:  # a quoted field with line breaks: an unclosed quote
                    raise ValueError(f"{path}: line {line_no + 1}: a quoted field runs over lines {line_no + 1}-"
                                     f"{reader.line_num} (a quote left open?)")
                line_no = reader.line_num
                fields = [field.strip() for field in row]
                if not any(fields):
                    continue
                if columns is None:
                    if not _is_int(fields[0]):
                        names = [field.upper() for field in fields]
                        if "TEMPLATE_ID" not in names or "SUBJECT_ID" not in names:
                            raise ValueError(f"{path}: line {line_no}: expected a header with TEMPLATE_ID and "
                                             f"SUBJECT_ID columns, or rows 'template_id,subject_id,...', got "
                                             f"{','.join(fields)[:120]!r}")
                        columns = names.index("TEMPLATE_ID"), names.index("SUBJECT_ID")
                        continue
                    columns = 0, 1
                wanted = [fields[c] if c < len(fields) else "" for c in columns]
                if not all(map(_is_int, wanted)):
                    raise ValueError(f"{path}: line {line_no}: expected a template id and a subject id (integers) "
                                     f"in columns {columns[0] + 1} and {columns[1] + 1}, got "
                                     f"{','.join(fields)[:120]!r}")
                template, subject = int(wanted[0]), int(wanted[1])
                if template not in subject_of:
                    subject_of[template], first_line[template] = subject, line_no
                elif subject_of[template] != subject:
                    raise ValueError(f"{path}: line {line_no}: template {template} is listed with subject "
                                     f"{subject}, and with subject {subject_of[template]} on line "
                                     f"{first_line[template]}")
    except csv.Error as error:  # a quote left open at the end, a field past csv's size limit
        raise ValueError(f"{path}: line {line_no + 1}: not readable as CSV: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text: {error.reason} (byte 0x{error.object[error.start]:02x}) "
                         f"after line {line_no}") from None
    if not subject_of:
        raise ValueError(f"{path}: no templates listed")
    templates = np.fromiter(subject_of, dtype=np.int64, count=len(subject_of))
    return (templates, np.fromiter(subject_of.values(), dtype=np.int64, count=len(subject_of)),
            np.fromiter(first_line.values(), dtype=np.int64, count=len(subject_of)))


def identification_paths(meta: str, target: str) -> dict[str, str]:
    """The 1:N lists of insightface's updated meta data: two galleries (IJB-C's G1 and G2, IJB-B's S1
    and S2) and the mixed probes (still images and video frames)."""
    prefix = os.path.join(meta, target.lower())
    galleries = ("G1", "G2") if target == "IJBC" else ("S1", "S2")
    return {**{name: f"{prefix}_1N_gallery_{name}.csv" for name in galleries},
            "probe": f"{prefix}_1N_probe_mixed.csv"}


def missing_identification(root: str, target: str) -> list[str]:
    """The 1:N lists the release under ``root`` lacks (insightface's first IJB_release had none)."""
    return _missing_lists(os.path.join(find_release(root, target), "meta"), target)


def _missing_lists(meta: str, target: str) -> list[str]:
    """The 1:N lists that the ``meta`` folder lacks."""
    return [path for path in identification_paths(meta, target).values() if not os.path.isfile(path)]


def read_identification(meta: str, target: str, known_templates: np.ndarray, faces_path: str) -> IJBIdentification:
    """Read and check the 1:N lists: every template must have faces in ``faces_path``, and a gallery
    holds one template a subject (insightface's ijb_1n.py stops on a subject enrolled twice)."""
    missing = _missing_lists(meta, target)
    if missing:  # (--protocol 1:N or both; it said "no file at" the first alone)
        raise FileNotFoundError(f"no 1:N list{'s' if len(missing) > 1 else ''} {', '.join(missing)} (insightface's "
                                f"updated meta data): get {'them' if len(missing) > 1 else 'it'}, or measure 1:1 "
                                "alone (--protocol 1:1)")
    lists = {}
    for name, path in identification_paths(meta, target).items():
        templates, subjects, lines = read_template_subjects(path)
        unknown = ~np.isin(templates, known_templates)
        if unknown.any():
            k = int(np.argmax(unknown))
            raise ValueError(f"{path}: line {lines[k]}: template {templates[k]} is not in {faces_path} "
                             f"({int(unknown.sum())} templates of this list are not)")
        if name != "probe":
            _, first, counts = np.unique(subjects, return_index=True, return_counts=True)
            if (counts > 1).any():
                k = int(first[np.argmax(counts > 1)])
                again = int(np.flatnonzero(subjects == subjects[k])[1])
                raise ValueError(f"{path}: line {lines[again]}: subject {subjects[k]} has a second template, "
                                 f"{templates[again]} (the first, {templates[k]}, on line {lines[k]}): a gallery "
                                 "holds one template a subject")
        lists[name] = templates, subjects, lines, path
    # The galleries split the subjects, and a probe is no gallery template (it would find itself).
    probe_templates, probe_subjects, probe_lines, probe_path = lists.pop("probe")
    enrolled = {}  # template or subject -> (gallery, line)
    for name, (templates, subjects, lines, path) in lists.items():
        for template, subject, line in zip(templates.tolist(), subjects.tolist(), lines.tolist()):
            for kind, key in (("template", template), ("subject", subject)):
                if (kind, key) in enrolled:
                    other, other_line = enrolled[kind, key]
                    raise ValueError(f"{path}: line {line}: {kind} {key} is also in gallery {other} ({other_line}): "
                                     "the galleries hold different subjects")
                enrolled[kind, key] = name, f"{os.path.basename(path)}, line {line}"
    for template, line in zip(probe_templates.tolist(), probe_lines.tolist()):
        if ("template", template) in enrolled:
            other, where = enrolled["template", template]
            raise ValueError(f"{probe_path}: line {line}: template {template} is a gallery template of {other} "
                             f"({where}): a probe would find itself")
    return IJBIdentification(galleries={name: (t, s) for name, (t, s, _, _) in lists.items()},
                             probes=(probe_templates, probe_subjects))


def find_release(root: str, target: str) -> str:
    """The folder holding ``meta/`` and ``loose_crop/``: ``root`` itself or ``root/<target>``."""
    for folder in (root, os.path.join(root, target)):
        if os.path.isdir(os.path.join(folder, "meta")):
            return folder
    raise FileNotFoundError(f"no meta/ folder in {root} or {os.path.join(root, target)}: --data-root should be "
                            f"the {target} folder of insightface's IJB_release (meta/ and loose_crop/)")


def release_files(root: str, target: str) -> list[str]:
    """The meta files of the release under ``root`` that the tool reads (those there): its landmarks,
    faces, pairs and 1:N lists."""
    prefix = os.path.join(find_release(root, target), "meta", target.lower())
    names = [f"{prefix}_name_5pts_score.txt", f"{prefix}_face_tid_mid.txt", pairs_file(root, target),
             *identification_paths(os.path.dirname(prefix), target).values()]
    return [name for name in names if os.path.exists(name)]


def pairs_file(root: str, target: str) -> str:
    """The 1:1 list of template pairs (``<target>_template_pair_label.txt``) of the release under ``root``."""
    return os.path.join(find_release(root, target), "meta", f"{target.lower()}_template_pair_label.txt")


def read_protocol(root: str, target: str = "IJBC", protocols=("1:1",), *, check_images: bool = True) -> IJBProtocol:
    """Read and cross-check the meta files of ``target`` under ``root``: the images, landmarks and
    templates, with ``protocols`` "1:1" the template pairs, with "1:N" the galleries and probes; that
    the images are there unless ``check_images`` is False (features saved earlier are scored).
    Raises FileNotFoundError or ValueError naming the file and line at fault."""
    unknown_protocols = set(protocols) - {"1:1", "1:N"}
    if unknown_protocols or not protocols:
        raise ValueError(f"protocols must be some of '1:1' and '1:N', got {protocols!r}")
    folder = find_release(root, target)
    meta = os.path.join(folder, "meta")
    prefix = os.path.join(meta, target.lower())
    landmarks_path, faces_path, pairs_path = (f"{prefix}_name_5pts_score.txt", f"{prefix}_face_tid_mid.txt",
                                              pairs_file(root, target))
    other = "IJBB" if target == "IJBC" else "IJBC"
    others = f"{other.lower()}_name_5pts_score.txt"  # (--target IJBB on IJB-C's folder, or the reverse)
    if not os.path.isfile(landmarks_path) and os.path.isfile(os.path.join(meta, others)):
        raise FileNotFoundError(f"no file at {landmarks_path}: {meta} holds {other}'s files ({others}): "
                                f"pass --target {other}")
    names, landmarks, scores, landmark_lines = read_landmarks(landmarks_path)
    face_names, templates, medias = read_template_media(faces_path)
    pairs, issame = read_template_pairs(pairs_path) if "1:1" in protocols else (None, None)

    row_of = {name: i for i, name in enumerate(names)}
    face_row = np.empty(len(face_names), dtype=np.int64)
    for f, name in enumerate(face_names):
        if name not in row_of:
            raise ValueError(f"{faces_path}: line {_line_of_row(faces_path, f)}: {name} has no landmarks in "
                             f"{landmarks_path}")
        face_row[f] = row_of[name]

    known = np.unique(templates)
    if pairs is not None:
        unknown = ~np.isin(pairs, known).all(axis=1)
        if unknown.any():
            row = int(np.argmax(unknown))
            template = next(int(t) for t in pairs[row] if not np.isin(t, known))
            raise ValueError(f"{pairs_path}: line {_line_of_row(pairs_path, row)}: template {template} is not in "
                             f"{faces_path} ({int(unknown.sum())} pairs name unknown templates)")
        if issame.all() or not issame.any():
            raise ValueError(f"{pairs_path}: every pair is labelled {int(issame[0])}: a ROC needs both "
                             "same-person and different-person pairs")
    identification = read_identification(meta, target, known, faces_path) if "1:N" in protocols else None

    used = np.unique(face_row)  # sorted: file order
    image_folder = os.path.join(folder, "loose_crop")
    missing = [int(i) for i in used if not os.path.isfile(os.path.join(image_folder, names[i]))] if check_images else []
    if missing and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"no loose_crop/ folder in {folder}, for the images {landmarks_path} lists: "
                                f"--data-root should be the {target} folder of insightface's IJB_release (meta/ and "
                                "loose_crop/)")
    if missing:
        more = f" ({len(missing) - 1} more images are missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{landmarks_path}: line {landmark_lines[missing[0]]}: no image at "
                                f"{os.path.join(image_folder, names[missing[0]])}{more}")
    return IJBProtocol(
        target=target, image_folder=image_folder, image_names=[names[i] for i in used],
        landmarks=landmarks[used], detector_scores=scores[used], face_image=np.searchsorted(used, face_row),
        templates=templates, medias=medias, pairs=pairs, issame=issame, identification=identification,
    )


# ---------------------------------------------------------------------------------------------
# Embedding


def unusable_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(N,) bool: the 5 points of (N, 5, 2) ``landmarks`` coincide or are not finite, so that no
    similarity fits them."""
    spread = np.nan_to_num(landmarks.std(axis=1).sum(axis=1), nan=0.0, posinf=0.0)
    return ~(spread > 0)


def landmarks_off_image(landmarks: np.ndarray, width: int, height: int) -> str | None:
    """Why a face's (5, 2) ``landmarks`` cannot be on a ``width`` x ``height`` image (their centre
    lies outside it: coordinates of another image, or of another scale), or None."""
    centre = landmarks.mean(axis=0)
    if -0.5 <= centre[0] <= width - 0.5 and -0.5 <= centre[1] <= height - 0.5:
        return None
    return f"its landmarks lie outside the {width}x{height} image (centred at {centre[0]:.0f}, {centre[1]:.0f})"


class LooseCrops(torch.utils.data.Dataset):
    """Item i: (uint8 (3, S, S) aligned crop of image i, "" or why it could not be read). A bad
    image is reported rather than raised so that the message reaches the user without a worker's
    traceback around it. Images whose landmarks are unusable become black crops: insightface's
    similarity estimate is NaN for them, and OpenCV warps a NaN matrix to black.

    ``sources`` (where each face is listed, "file: line 7") prefixes the face's messages; with
    ``check_bounds``, landmarks that lie off their image are reported rather than warped to a black
    crop (IJB's protocol is kept as insightface evaluates it, so ``train.ijb`` leaves it off)."""

    def __init__(self, folder: str, names: list[str], landmarks: np.ndarray, image_size: int, *,
                 sources: list[str] | None = None, check_bounds: bool = False):
        self.folder, self.names, self.landmarks, self.image_size = folder, names, landmarks, int(image_size)
        self.unusable = unusable_landmarks(landmarks)
        self.sources, self.check_bounds = sources, check_bounds

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = os.path.join(self.folder, self.names[index])

        def blank():
            # (Made only where one is returned: in the main process, without loader workers, torch fills a tensor
            # this size on its intra-op threads, 1-3 ms an image when the machine's cores are busy.)
            return torch.zeros((3, self.image_size, self.image_size), dtype=torch.uint8)

        if self.unusable[index]:
            return blank(), ""
        prefix = f"{self.sources[index]}: " if self.sources is not None else ""
        try:
            with Image.open(path) as image:
                # Upright as its EXIF orientation says, as OpenCV's imread (insightface's reader)
                # turns it: the landmarks are in those pixels.
                upright = ImageOps.exif_transpose(image)
                off = landmarks_off_image(self.landmarks[index], upright.width, upright.height) \
                    if self.check_bounds else None
                if off:
                    return blank(), f"{prefix}{path}: {off}"
                crop = align_for_model(upright, self.landmarks[index], self.image_size)
        except FileNotFoundError:
            return blank(), unreadable_image(f"{prefix}{path}", "no such file")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return blank(), unreadable_image(f"{prefix}{path}", error)
        return to_chw(crop), ""


# ---------------------------------------------------------------------------------------------
# Templates and scores


def image_weights(features: np.ndarray, detector_scores: np.ndarray | None = None, *,
                  norm_score: bool = True) -> np.ndarray | None:
    """What each image's feature is multiplied by before pooling: 1 / its norm unless
    ``norm_score``, times its detector score when given. insightface keeps the norm (N1) and applies
    the score (D1): both lower the weight of noisy or non-face images. None when every weight is 1."""
    weights = None
    if not norm_score:
        norms = np.sqrt(np.einsum("ij,ij->i", features, features, dtype=np.float64))
        weights = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    if detector_scores is not None:
        scores = np.asarray(detector_scores, dtype=np.float64)
        weights = scores if weights is None else weights * scores
    return weights


def unit_length(features: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Whether every non-zero feature has length 1 (to ``tolerance``): a table of normalised
    features (train.embed's), whose norms then weigh nothing."""
    norms = np.sqrt(np.einsum("ij,ij->i", features, features, dtype=np.float64))
    norms = norms[norms > 0]
    return bool(norms.size) and bool(np.all(np.abs(norms - 1) <= tolerance))


def _sum_by_group(values: np.ndarray, rows: np.ndarray, weights: np.ndarray, groups: np.ndarray,
                  num_groups: int, chunk: int = 1 << 14) -> np.ndarray:
    """(num_groups, D) float64: group g sums weights[i] * values[rows[i]] over every i with
    groups[i] == g, ``chunk`` rows at a time so that no float64 copy of ``values`` is made whole."""
    sums = np.zeros((num_groups, values.shape[1]), dtype=np.float64)
    for start in range(0, rows.size, chunk):
        end = start + chunk
        block = values[rows[start:end]].astype(np.float64)
        block *= weights[start:end, None]
        np.add.at(sums, groups[start:end], block)
    return sums


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray, *,
                      face_image: np.ndarray | None = None,
                      weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, sorted; (T, D) float64 unit-length template features).

    Face f is image ``face_image[f]`` (f itself by default) weighted by ``weights[image]``; the
    faces of one template that share a media id (the frames of a video, or a single photo) are
    averaged, those averages summed over the template's media, and the sum L2-normalised (a zero
    sum stays zero). A media id is grouped within its template only, as insightface groups it.
    The sum of media means is taken in one pass, as the sum of each face over its media's size.
    """
    templates, medias = np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)
    face_image = np.arange(templates.size) if face_image is None else np.asarray(face_image, dtype=np.int64)
    _, media_of_face = np.unique(np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
    media_of_face = media_of_face.reshape(-1)
    face_weights = 1.0 / np.bincount(media_of_face)[media_of_face]
    if weights is not None:
        face_weights *= np.asarray(weights, dtype=np.float64)[face_image]
    template_ids, template_of_face = np.unique(templates, return_inverse=True)
    sums = _sum_by_group(features, face_image, face_weights, template_of_face.reshape(-1), len(template_ids))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return template_ids, sums / np.where(norms > 0, norms, 1.0)


def pair_scores(features: np.ndarray, first: np.ndarray, second: np.ndarray, *, chunk: int = PAIR_CHUNK) -> np.ndarray:
    """Cosine of rows ``first[k]`` and ``second[k]`` of unit-length ``features``, ``chunk`` pairs at a
    time; each score is computed alone, so the chunk size does not change it."""
    scores = np.empty(len(first), dtype=np.float64)
    for start in range(0, len(first), chunk):
        end = start + chunk
        scores[start:end] = np.einsum("ij,ij->i", features[first[start:end]], features[second[start:end]])
    return scores


# ---------------------------------------------------------------------------------------------
# ROC


def allowed_passes(rate: float, count: int) -> int:
    """floor(rate x count): how many of ``count`` negative pairs (or searches) a false accept rate lets
    pass; 1e-12: rate x count landing a hair below an integer."""
    return math.floor(rate * count * (1 + 1e-12))


def negatives_needed(rate: float) -> int:
    """The fewest negatives on which ``rate`` lets one pass (:func:`allowed_passes` 1): where it can be
    measured."""
    return math.ceil(1 / rate * (1 - 1e-12))


def threshold_allowing(negatives: np.ndarray, rate: float) -> float | None:
    """The lowest threshold that scores strictly above it leave at most floor(rate x N) of the N sorted
    ``negatives`` (fewer when negatives tie with it): the (k+1)-th highest, -inf when every one may
    pass, None when not one may (the rate cannot be measured on N)."""
    allowed = allowed_passes(rate, negatives.size)
    if allowed < 1:
        return None
    return -math.inf if allowed >= negatives.size else float(negatives[negatives.size - 1 - allowed])


def tar_at_far(scores: np.ndarray, issame: np.ndarray, fars=FARS) -> list[dict]:
    """For each FAR: {'far', 'tar', 'threshold', 'false_accepts'}.

    A pair is accepted when its score is strictly above the threshold. With N negative pairs a FAR
    allows k = floor(FAR * N) false accepts; the threshold is the (k+1)-th highest negative score,
    the lowest that accepts at most k negatives (fewer when negatives tie with it), and TAR is the
    fraction of positive pairs above it, the most any threshold reaches at that FAR. Where k = 0
    (FAR < 1/N) the FAR cannot be measured on these pairs: tar and threshold are None.
    """
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    positives, negatives = np.sort(scores[issame]), np.sort(scores[~issame])
    if positives.size == 0 or negatives.size == 0:
        raise ValueError(f"need positive and negative pairs, got {positives.size} and {negatives.size}")
    rows = []
    for far in fars:
        threshold = threshold_allowing(negatives, far)
        if threshold is None:
            rows.append({"far": far, "tar": None, "threshold": None, "false_accepts": None})
            continue
        accepted = positives.size - np.searchsorted(positives, threshold, side="right")
        false_accepts = negatives.size - np.searchsorted(negatives, threshold, side="right")
        rows.append({"far": far, "tar": float(accepted / positives.size), "threshold": threshold,
                     "false_accepts": int(false_accepts)})
    return rows


def curve_rates(count: int, points: int = 200) -> list[float]:
    """Log-spaced rates from the smallest measurable on ``count`` negatives (1/count) to 1."""
    low = math.log10(1.0 / max(count, 1))
    return sorted({float(r) for r in np.logspace(low, 0.0, points)})


# ---------------------------------------------------------------------------------------------
# 1:N identification


def mate_index(probe_subjects: np.ndarray, gallery_subjects: np.ndarray) -> np.ndarray:
    """(P,) int64: the gallery row of each probe's subject, -1 where the gallery lacks it. A subject
    listed twice in the gallery is an error."""
    row_of = {}
    for row, subject in enumerate(np.asarray(gallery_subjects, dtype=np.int64).tolist()):
        if subject in row_of:
            raise ValueError(f"subject {subject} has two gallery templates (rows {row_of[subject]} and {row})")
        row_of[subject] = row
    return np.array([row_of.get(subject, -1) for subject in np.asarray(probe_subjects, dtype=np.int64).tolist()],
                    dtype=np.int64)


def search_gallery(probes: np.ndarray, gallery: np.ndarray, mates: np.ndarray, *, chunk: int = PROBE_CHUNK,
                   on_non_mates=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search each of the unit-length ``probes`` (P, D) in ``gallery`` (G, D) by cosine, ``chunk``
    probes at a time. -> ((P,) best score, (P,) mate score (NaN without a mate), (P,) mate rank: 1 + the
    other gallery templates scoring at least as high, so that a tie counts against the mate; 0
    without a mate). ``on_non_mates(scores)`` is handed each chunk's scores with the mates' set to
    -inf."""
    if gallery.shape[0] == 0:
        raise ValueError("the gallery is empty")
    count = probes.shape[0]
    best, mate_score, mate_rank = np.empty(count), np.full(count, np.nan), np.zeros(count, dtype=np.int64)
    for start in range(0, count, chunk):
        end = min(start + chunk, count)
        scores = np.asarray(probes[start:end], dtype=np.float64) @ np.asarray(gallery, dtype=np.float64).T
        best[start:end] = scores.max(axis=1)
        rows = np.flatnonzero(mates[start:end] >= 0)
        if rows.size:
            mate = scores[rows, mates[start:end][rows]]
            mate_score[start + rows] = mate
            mate_rank[start + rows] = np.count_nonzero(scores[rows] >= mate[:, None], axis=1)
            scores[rows, mates[start:end][rows]] = -np.inf
        if on_non_mates is not None:
            on_non_mates(scores)
    return best, mate_score, mate_rank


def open_set_identification(probes: np.ndarray, probe_subjects: np.ndarray, gallery: np.ndarray,
                            gallery_subjects: np.ndarray, *, fpirs=FPIRS, ranks=RANKS,
                            chunk: int = PROBE_CHUNK) -> dict:
    """1:N open-set identification of unit-length template features, as the IJB-B/C protocol defines
    it (and NIST's FRVT): a probe whose subject the gallery holds is a mated search, any other a
    non-mated one.

    - ``rank``: CMC, the fraction of mated searches whose mate is among the ``k`` best scores.
    - ``tpir_at_fpir``: a search returns the gallery's best template when its score is strictly above
      a threshold. FPIR is the fraction of non-mated searches that return one; TPIR the fraction of
      mated searches that return their mate (rank 1 and above the threshold). The threshold for an
      FPIR is chosen from the non-mated searches' best scores as ``tar_at_far`` chooses it: at most
      floor(FPIR x non-mated) false alarms, None where that is 0.
    """
    mates = mate_index(probe_subjects, gallery_subjects)
    best, mate_score, mate_rank = search_gallery(probes, gallery, mates, chunk=chunk)
    mated = mates >= 0
    non_mated = np.sort(best[~mated])
    result = {"templates": int(gallery.shape[0]), "mated_searches": int(mated.sum()),
              "non_mated_searches": int(non_mated.size),
              "rank": {k: float(np.mean(mate_rank[mated] <= k)) if mated.any() else None for k in ranks},
              "tpir_at_fpir": []}
    for fpir in fpirs:
        threshold = threshold_allowing(non_mated, fpir) if non_mated.size else None
        row = {"fpir": fpir, "tpir": None, "threshold": threshold, "false_alarms": None}
        if threshold is not None:
            row["false_alarms"] = int(non_mated.size - np.searchsorted(non_mated, threshold, side="right"))
            if mated.any():
                row["tpir"] = float(np.mean((mate_rank[mated] == 1) & (mate_score[mated] > threshold)))
        result["tpir_at_fpir"].append(row)
    return result


def insightface_identification(probes: np.ndarray, probe_subjects: np.ndarray, gallery: np.ndarray,
                               gallery_subjects: np.ndarray, *, fpirs=INSIGHTFACE_FPIRS, ranks=RANKS,
                               chunk: int = PROBE_CHUNK) -> dict:
    """The figures insightface's ``ijb_1n.py`` prints (which papers quote as IJB-C 1:N), computed as it
    computes them on its gallery of G1 and G2 together, where every probe has its mate:

    - ``rank``: the fraction of probes whose mate is among the ``k`` best scores (ties count against
      the mate here; insightface's unstable argsort breaks them arbitrarily);
    - ``tpir_at_fpir``: its threshold for "FPIR" f is the ceil(f x P)-th highest score among all
      probe-gallery pairs of different subjects (P probes), and its rate the fraction of probes whose
      mate scores strictly above it, whatever the mate's rank. This is not the protocol's FPIR (a
      fraction of non-mated searches; see ``open_set_identification``), but it is the number quoted.

    A probe without exactly one template of its subject in the gallery is an error, as there."""
    mates = mate_index(probe_subjects, gallery_subjects)
    if (mates < 0).any():
        k = int(np.argmax(mates < 0))
        none = int((mates < 0).sum())
        raise ValueError(f"the probes' subject {int(np.asarray(probe_subjects)[k])} has no gallery template "
                         f"({none} {'probe has' if none == 1 else 'probes have'} none)")
    count = probes.shape[0]
    needed = [math.ceil(count * fpir) for fpir in fpirs]
    keep = max(needed)
    kept = [np.empty(0)]

    def highest(scores):  # the `keep` highest non-mate scores so far
        values = scores[np.isfinite(scores)].ravel()
        if values.size > keep:
            values = np.partition(values, values.size - keep)[values.size - keep:]
        merged = np.concatenate([kept[0], values])
        kept[0] = merged if merged.size <= keep else np.partition(merged, merged.size - keep)[merged.size - keep:]

    _, mate_score, mate_rank = search_gallery(probes, gallery, mates, chunk=chunk, on_non_mates=highest)
    top = np.sort(kept[0])[::-1]
    result = {"templates": int(gallery.shape[0]), "probes": int(count),
              "rank": {k: float(np.mean(mate_rank <= k)) for k in ranks}, "tpir_at_fpir": []}
    for fpir, k in zip(fpirs, needed):
        threshold = float(top[k - 1]) if 1 <= k <= top.size else None
        result["tpir_at_fpir"].append({"fpir": fpir, "threshold": threshold,
                                       "tpir": None if threshold is None else float(np.mean(mate_score > threshold))})
    return result


# ---------------------------------------------------------------------------------------------
# Command line


def far_key(far: float) -> str:
    return f"{far:.0e}"


def format_table(rows: list[dict]) -> str:
    """TAR (%) and the cosine threshold under each FAR; '-' where the FAR is not measurable."""
    def cells(values, fmt):
        return "".join(f"{'-' if v is None else format(v, fmt):>9}" for v in values)

    return "\n".join([
        "  FAR      " + "".join(f"{far_key(r['far']):>9}" for r in rows),
        "  TAR (%)  " + cells([None if r["tar"] is None else 100 * r["tar"] for r in rows], ".2f"),
        "  cosine   " + cells([r["threshold"] for r in rows], ".4f"),
    ])


def verify_pairs(protocol: IJBProtocol, template_ids: np.ndarray, pooled: np.ndarray, target: str) -> dict:
    """Score the 1:1 pairs, print the table, and return the results' 1:1 entries."""
    pair_index = np.searchsorted(template_ids, protocol.pairs)
    scores = pair_scores(pooled, pair_index[:, 0], pair_index[:, 1])
    rows = tar_at_far(scores, protocol.issame)
    positives = int(protocol.issame.sum())
    say(f"{target} 1:1 verification, {len(template_ids)} templates, {len(scores)} pairs "
          f"({positives} same, {len(scores) - positives} different):")
    say(format_table(rows))
    if any(r["tar"] is None for r in rows):
        say(f"  (-: FAR below 1/{len(scores) - positives}, less than one false accept among the different-person "
              "pairs: not measurable)")
    return {
        "counts": {"pairs": int(len(scores)), "positive_pairs": positives,
                   "negative_pairs": int(len(scores) - positives)},
        "tar_at_far": {far_key(r["far"]): r["tar"] for r in rows},
        "threshold_at_far": {far_key(r["far"]): _threshold_value(r["threshold"]) for r in rows},
        "false_accepts_at_far": {far_key(r["far"]): r["false_accepts"] for r in rows},
    }


def _percent(value, fmt=".2f", width=9) -> str:
    return f"{'-' if value is None else format(100 * value, fmt):>{width}}"


def _threshold_value(threshold):
    return None if threshold in (None, -math.inf) else threshold


def identify(lists: IJBIdentification, template_ids: np.ndarray, pooled: np.ndarray, target: str) -> dict:
    """Search the probes in each gallery on its own (the protocol's open-set figures, and their mean
    over the galleries), then in all galleries together as insightface's ijb_1n.py does; print the
    tables and return the results' "identification" entry."""
    def features(templates):
        return pooled[np.searchsorted(template_ids, templates)]

    probe_templates, probe_subjects = lists.probes
    probes = features(probe_templates)
    galleries = {name: open_set_identification(probes, probe_subjects, features(templates), subjects)
                 for name, (templates, subjects) in lists.galleries.items()}

    def mean(values):
        return None if not values or any(v is None for v in values) else float(np.mean(values))

    runs = list(galleries.values())
    averaged = {"rank": {k: mean([r["rank"][k] for r in runs]) for k in RANKS},
                "tpir": [mean([r["tpir_at_fpir"][i]["tpir"] for r in runs]) for i in range(len(FPIRS))]}

    say(f"{target} 1:N identification, {len(probe_templates)} probe templates searched in each gallery on its own "
          "(open set: a probe whose subject the gallery lacks is a non-mated search):")
    say("  gallery  templates     mated  non-mated" + "".join(f"{f'rank-{k} (%)':>13}" for k in RANKS))
    for name, r in galleries.items():
        say(f"  {name:<8}{r['templates']:>10}{r['mated_searches']:>10}{r['non_mated_searches']:>11}"
              + "".join(_percent(r["rank"][k], width=13) for k in RANKS))
    if len(galleries) > 1:
        say(f"  {'mean':<39}" + "".join(_percent(averaged["rank"][k], width=13) for k in RANKS))
    say("  FPIR             " + "".join(f"{far_key(f):>9}" for f in FPIRS))
    for name, r in galleries.items():
        say(f"  {name + ' TPIR (%)':<17}" + "".join(_percent(row["tpir"]) for row in r["tpir_at_fpir"]))
        say(f"  {name + ' cosine':<17}" + "".join(
            f"{'-' if _threshold_value(row['threshold']) is None else format(row['threshold'], '.4f'):>9}"
            for row in r["tpir_at_fpir"]))
    if len(galleries) > 1:
        say(f"  {'mean TPIR (%)':<17}" + "".join(_percent(v) for v in averaged["tpir"]))
    if any(row["threshold"] is None for r in runs for row in r["tpir_at_fpir"]):
        say("  (-: FPIR below 1/non-mated searches, less than one false alarm allowed: not measurable)")

    result = {
        "probe_templates": int(len(probe_templates)),
        "galleries": {name: {
            "templates": r["templates"], "mated_searches": r["mated_searches"],
            "non_mated_searches": r["non_mated_searches"],
            **{f"rank_{k}": r["rank"][k] for k in RANKS},
            "tpir_at_fpir": {far_key(row["fpir"]): row["tpir"] for row in r["tpir_at_fpir"]},
            "threshold_at_fpir": {far_key(row["fpir"]): _threshold_value(row["threshold"])
                                  for row in r["tpir_at_fpir"]},
            "false_alarms_at_fpir": {far_key(row["fpir"]): row["false_alarms"] for row in r["tpir_at_fpir"]},
        } for name, r in galleries.items()},
        "mean": {**{f"rank_{k}": averaged["rank"][k] for k in RANKS},
                 "tpir_at_fpir": {far_key(f): v for f, v in zip(FPIRS, averaged["tpir"])}},
    }

    together = "+".join(lists.galleries)
    templates = np.concatenate([t for t, _ in lists.galleries.values()])
    subjects = np.concatenate([s for _, s in lists.galleries.values()])
    try:
        closed = insightface_identification(probes, probe_subjects, features(templates), subjects)
    except ValueError as error:  # a probe without its mate, or a subject in two galleries
        say(f"  insightface's ijb_1n.py figures ({together} as one gallery) not computed: {error}; that script "
              "stops there")
        result["insightface"] = {"gallery": together, "error": str(error)}
        return result
    say(f"  insightface's ijb_1n.py figures, {together} as one closed-set gallery of {closed['templates']} templates "
          "(its \"TPIR at FPIR f\": probes whose mate scores above the ceil(f x probes)-th highest non-mate "
          "score):")
    say("    " + "   ".join(f"top-{k} {100 * closed['rank'][k]:.2f}" for k in RANKS) + "   " + "   ".join(
        f"TPIR {'-' if row['tpir'] is None else format(100 * row['tpir'], '.2f')} at {far_key(row['fpir'])}"
        for row in closed["tpir_at_fpir"]))
    result["insightface"] = {
        "gallery": together, "templates": closed["templates"],
        **{f"rank_{k}": closed["rank"][k] for k in RANKS},
        "tpir_at_fpir": {far_key(row["fpir"]): row["tpir"] for row in closed["tpir_at_fpir"]},
        "threshold_at_fpir": {far_key(row["fpir"]): row["threshold"] for row in closed["tpir_at_fpir"]},
    }
    return result


def draw_curves(path: str, target: str, protocol: IJBProtocol, template_ids: np.ndarray, pooled: np.ndarray) -> None:
    """``--plot``: the ROC of the 1:1 pairs and each gallery's TPIR against FPIR, at 200 log-spaced
    rates from the smallest each can measure and the tables' rates, thresholds chosen as the tables
    choose them (drawn as steps: a rate holds until the next point's)."""
    from .plots import plot_ijb

    roc = identification = None
    if protocol.issame is not None:
        index = np.searchsorted(template_ids, protocol.pairs)
        scores = pair_scores(pooled, index[:, 0], index[:, 1])
        rates = sorted(set(curve_rates(int((~protocol.issame).sum()))) | set(FARS))
        rows = [r for r in tar_at_far(scores, protocol.issame, rates) if r["tar"] is not None]
        roc = ([r["far"] for r in rows], [r["tar"] for r in rows])
    if protocol.identification is not None:
        identification = {}
        probe_templates, probe_subjects = protocol.identification.probes
        probes = pooled[np.searchsorted(template_ids, probe_templates)]
        for name, (templates, subjects) in protocol.identification.galleries.items():
            non_mated = int((~np.isin(probe_subjects, subjects)).sum())
            found = open_set_identification(probes, probe_subjects, pooled[np.searchsorted(template_ids, templates)],
                                            subjects, fpirs=sorted(set(curve_rates(non_mated)) | set(FPIRS)), ranks=())
            rows = [r for r in found["tpir_at_fpir"] if r["tpir"] is not None]
            identification[name] = ([r["fpir"] for r in rows], [r["tpir"] for r in rows])
    plot_ijb(path, target, roc=roc, identification=identification)


def saved_features(path: str, image_names: list[str], hint: str = "features of another release or --target?"
                   ) -> np.ndarray:
    """The rows of an earlier run's ``--save-features`` table for ``image_names``, in their order.
    Raises ValueError when the table lacks one of them or holds others (``hint`` says what that may be)."""
    names, table = read_table(path)
    row_of = {name: row for row, name in enumerate(names)}
    missing = [name for name in image_names if name not in row_of]
    if missing:
        raise ValueError(f"{path} has no features for {len(missing)} of the {len(image_names)} images of this release "
                         f"(the first: {missing[0]}): {hint}")
    if len(names) != len(image_names):  # IJB-B's image names are some of IJB-C's
        listed = set(image_names)
        extra = next(name for name in names if name not in listed)
        raise ValueError(f"{path} has features of {len(names) - len(image_names)} images this release does not use "
                         f"(the first: {extra}): {hint}")
    return table[[row_of[name] for name in image_names]]


def embed_release(model: torch.nn.Module, images, folder: str, args: argparse.Namespace, device, *,
                  tool: str) -> np.ndarray | None:
    """A benchmark's release images (``images``, a dataset of ``folder``'s) embedded as --flip, --batch-size
    and --workers say (train.ijb's, train.tinyface's: ``tool``, its short name); None, with every image that
    does not decode named (:func:`report_unreadable`), when some do not: one round of fixes, not one per file."""
    unreadable = []
    features = embed_images(model.to(device), images, device=device, batch_size=args.batch_size,
                            workers=args.workers, flip=args.flip, unreadable=unreadable,
                            log=lambda message: say(message, file=sys.stderr, flush=True),
                            workers_leave_signals=True)
    if unreadable:
        report_unreadable(unreadable, folder, tool)
        return None
    return features


def save_features(args: argparse.Namespace, names: list[str], features: np.ndarray, model: torch.nn.Module,
                  settings: dict, *, made_by: str, images: str, tool: str) -> bool:
    """--save-features' table of a benchmark's image features (train.ijb's, train.tinyface's: ``tool``, its
    short name), with what made them; False, said, where it cannot be written (a full disk, say): the
    scores are still computed and written."""
    try:
        with signals_held():  # the .npy and its .txt, both or neither
            written = write_table(args.save_features, names, features, about={
                "made_by": made_by, "model": os.path.abspath(args.model), **model_digests(args.model, model),
                "network": settings.get("network"), "image_size": settings["image_size"], "flip": args.flip,
                "amp": getattr(model, "amp", "none"), "normalised": bool(settings.get("unit_length")),
                "images": images})
        say(f"image features: {', '.join(written)}")
    except OSError as error:
        say(f"{tool}: error: could not write the image features to {args.save_features}: {error}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    return run_stoppable(_main, argv, "ijb")


def _main(argv: list[str] | None) -> int:
    p = ArgumentParser(prog="python -m train.ijb", name="ijb", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_options(
        p, features_help="instead of a model, the image features an earlier run saved with --save-features (.npy "
        "with its .txt, or .csv): scored again without embedding, e.g. with another --protocol or "
        "--no-detector-score (--flip is as it was when they were saved)",
        workers_help="DataLoader processes decoding and aligning images",
        flip_help="add the embedding of the mirrored crop (insightface's F1; the default)")
    p.add_argument("--data-root", "--data_root", type=path_arg, dest="data_root", required=True,
                   help="the IJBC (or IJBB) folder of IJB_release, holding meta/ and loose_crop/ (or its parent)")
    p.add_argument("--target", default="IJBC", type=str.upper, choices=TARGETS,
                   help="the benchmark whose meta/ files are read: IJBC or IJBB (default: IJBC)")
    p.add_argument("--protocol", default="auto", type=str.upper, choices=("AUTO", "1:1", "1:N", "BOTH"),
                   help="1:1 template verification, 1:N identification (the release's gallery and probe lists), or "
                   "both; auto (default): 1:1, and 1:N too when meta/ holds its lists")
    p.add_argument("--detector-score", action=argparse.BooleanOptionalAction, default=True,
                   help="weigh each image by its detector score (insightface's D1)")
    p.add_argument("--norm-score", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each image feature's norm as its weight (N1); --no-norm-score normalises first")
    p.add_argument("--output", type=path_arg, default=None, help="results JSON (default: ijbc.json or ijbb.json)")
    p.add_argument("--plot", type=path_arg, metavar="FILE", default=None,
                   help="also draw the 1:1 ROC (TAR against FAR) and the 1:N TPIR against FPIR of each gallery into "
                   "FILE (.png, .pdf or .svg; needs matplotlib)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output, --save-features and --plot files that exist; without it they are kept")
    args = p.parse_args(argv)
    output = args.output or f"{args.target.lower()}.json"
    written = [output, *(table_files(args.save_features, about=True) if args.save_features else []),
               *([args.plot] if args.plot else [])]
    unused = check_benchmark_options(p, args, written, "--output, --save-features and --plot")
    if args.plot:
        from .plots import _pyplot

        if os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg"):
            p.error(f"--plot {args.plot}: a .png, .pdf or .svg file")
        if _pyplot() is None:
            p.error("--plot needs matplotlib (pip install matplotlib, or the [train] extra)")
    started = time.monotonic()

    note = None  # auto's choice of protocols: said once nothing below refuses the run, not before another error
    try:
        device = torch_device(args.device)
        if not args.features:  # (before the release's lists are read, as train.embed and train.verify refuse it)
            refuse_amp_of_an_onnx_model(args.amp, args.model)
        protocols = {"1:1": ("1:1",), "1:N": ("1:N",), "BOTH": ("1:1", "1:N")}.get(args.protocol)
        if protocols is None:  # auto
            missing = missing_identification(args.data_root, args.target)
            protocols = ("1:1",) if missing else ("1:1", "1:N")
            pairs_path = pairs_file(args.data_root, args.target)
            if not missing and not os.path.isfile(pairs_path):
                protocols = ("1:N",)
                note = f"note: 1:N identification only: no 1:1 pairs list {pairs_path}"
            elif missing:
                note = (f"note: 1:1 verification only: no 1:N list{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} (insightface's updated meta data)")
        protocol = read_protocol(args.data_root, args.target, protocols, check_images=not args.features)
        if args.features:
            model, settings = None, {"image_size": None, "network": None}
            features = saved_features(args.features, protocol.image_names)
            about = read_about(args.features, features)
        else:
            model, settings = load_model(args.model, device, args.amp)
            set_amp(model, args.amp, args.model, device=device)
        # Checked before hours of embedding, not found unusable after them; not the release's own files.
        if args.save_features:
            check_table_output("--save-features", args.save_features)
        check_outputs(written, args.overwrite,
                      inputs=(*benchmark_inputs(args), *release_files(args.data_root, args.target)),
                      image_folders=(protocol.image_folder,))
    except (OSError, ValueError) as error:
        say(f"ijb: error: {error}", file=sys.stderr)
        return 2
    if unused:
        say(unused, file=sys.stderr)
    if note:
        say(note)
    size = settings["image_size"]
    lists = []
    if protocol.issame is not None:
        lists.append(f"{len(protocol.issame)} pairs")
    if protocol.identification is not None:
        lists.append(f"{len(protocol.identification.probes[0])} probe templates searched in "
                     + " and ".join(protocol.identification.galleries))
    say(f"{args.target}: {len(protocol.image_names)} images, {protocol.templates.size} faces, "
          f"{len(np.unique(protocol.templates))} templates, {'; '.join(lists)}; "
          + (f"features from {args.features}{describe_about(about)}" if args.features
             else f"embedding at {size}px on {device}"), flush=True)

    unusable = int(unusable_landmarks(protocol.landmarks).sum())
    embedding_started = time.monotonic()
    if model is not None:
        crops = LooseCrops(protocol.image_folder, protocol.image_names, protocol.landmarks, size)
        if unusable:
            say(f"note: {unusable} images have coincident or non-finite landmarks; they are embedded as black "
                  "crops, as insightface's alignment makes them")
        features = embed_release(model, crops, protocol.image_folder, args, device, tool="ijb")
        if features is None:
            return 2
    embedding_seconds = time.monotonic() - embedding_started
    features_saved = True
    if args.save_features:
        features_saved = save_features(
            args, protocol.image_names, features, model, settings, made_by="train.ijb", tool="ijb",
            images=f"the loose crops of {args.target} under {os.path.abspath(protocol.image_folder)}, aligned from "
            "the release's landmarks")

    normalised = settings.get("unit_length") if model is not None else (
        bool(about and about.get("normalised")) or unit_length(features))
    if args.norm_score and normalised:
        source = f"{args.model} gives" if model is not None else f"{args.features} holds"
        say(f"note: {source} features of unit length: the faces of a template are not weighted by their feature "
            "norm, as insightface's evaluation (and --norm-score, the default) weighs them; the backbone's own output "
            "keeps the norms (a checkpoint, or train.export's backbone.onnx)", file=sys.stderr)
    weights = image_weights(features, protocol.detector_scores if args.detector_score else None,
                            norm_score=args.norm_score)
    template_ids, pooled = template_features(features, protocol.templates, protocol.medias,
                                             face_image=protocol.face_image, weights=weights)
    weightless = int((~pooled.any(axis=1)).sum())
    if weightless:
        say(f"note: {weightless} template(s) have no weight (each of their faces has a zero feature"
            + (", or a detector score of 0: --no-detector-score weighs the faces equally" if args.detector_score
               else "") + "): a zero feature, which matches nothing", file=sys.stderr)
    result = {
        "target": args.target,
        "model": os.path.abspath(args.model) if args.model else None,
        **({"features": os.path.abspath(args.features), "features_about": about} if args.features else {}),
        "data_root": os.path.abspath(args.data_root),
        "protocols": list(protocols),
        "options": {"flip": None if args.features else args.flip, "detector_score": args.detector_score,
                    "norm_score": args.norm_score, "image_size": size, "network": settings.get("network"),
                    "batch_size": args.batch_size,
                    "device": str(device), "amp": None if args.features else getattr(model, "amp", "none")},
        "counts": {"images": len(protocol.image_names), "faces": int(protocol.templates.size),
                   "media": int(len(np.unique(np.stack([protocol.templates, protocol.medias], axis=1), axis=0))),
                   "templates": int(len(template_ids)), "unusable_landmarks": unusable},
    }
    if protocol.issame is not None:
        entries = verify_pairs(protocol, template_ids, pooled, args.target)
        result["counts"].update(entries.pop("counts"))
        result.update(entries)
    if protocol.identification is not None:
        result["identification"] = identify(protocol.identification, template_ids, pooled, args.target)
    result["seconds"] = {"embedding": round(embedding_seconds, 1), "total": round(time.monotonic() - started, 1)}
    try:
        with signals_held():
            checkpoint.write_json_atomic(output, result)
    except OSError as error:
        say(f"ijb: error: could not write {output}: {error}", file=sys.stderr)
        return 2
    say(f"wrote {output}")
    if args.plot:  # after the results, which a failure here must not cost
        try:
            draw_curves(args.plot, args.target, protocol, template_ids, pooled)
            say(f"curves: {args.plot}")
        except Exception as error:  # noqa: BLE001 (a full disk, a matplotlib backend's failure)
            say(f"ijb: error: could not draw {args.plot}: {error}", file=sys.stderr)
            return 2
    return 0 if features_saved else 2


if __name__ == "__main__":
    sys.exit(main())
