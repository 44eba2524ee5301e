"""Face verification the way insightface reports it: pairs of images from a `.bin`
(or a pairs list, or the synthetic set), embedding(image) + embedding(mirrored
image), L2-normalised, and 10-fold accuracy where each fold is judged at the
squared-distance threshold that does best on the other nine folds.

A `.bin` is a pickle of `(bins, issame_list)`: `bins` holds 2 encoded images per
pair, `issame_list` one bool per pair. It is read with an unpickler that can only
build bytes, lists, tuples, bools and numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from train.checkpoint import dangling
from train.data.transforms import decode_image_and_size, load_image_file_and_size, to_chw, to_model_input
from train.onnx_backbone import batch_size_for

# insightface's grid: squared L2 distances between unit vectors lie in [0, 4].
THRESHOLDS = np.arange(0, 4, 0.01)
# insightface's folds: a set needs at least one pair per fold.
NFOLDS = 10


@dataclass
class VerificationSet:
    """`images`: uint8 (2P, 3, H, W), pair k being images[2k] and images[2k + 1];
    `issame`: bool (P,); `group`: the benchmark the set is one subset of (RFW's races: "RFW"), whose
    summary follows the subsets' results (`train.rfw.summaries`)."""

    name: str
    images: torch.Tensor
    issame: np.ndarray
    group: str | None = None

    def __post_init__(self):
        self.issame = np.asarray(self.issame, dtype=bool).reshape(-1)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"{self.name}: images must be uint8 (2P, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.images.shape[0] != 2 * self.issame.size:
            raise ValueError(f"{self.name}: {self.images.shape[0]} images for {self.issame.size} pairs")

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)

    def __repr__(self) -> str:
        return (
            f"VerificationSet({self.name!r}, pairs={self.num_pairs}, same={int(self.issame.sum())}, "
            f"image_size={tuple(self.images.shape[2:])})"
        )


# ---------------------------------------------------------------------------------------------
# Reading sets


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing bytes encoded as {encoding!r}: only latin1 is expected")
    return text.encode("latin1")


_sample = np.zeros(1)
# The callables numpy's own pickles name, taken from numpy rather than imported by name.
_RECONSTRUCT = _sample.__reduce__()[0]
_FROMBUFFER = _sample.__reduce_ex__(5)[0]
_SCALAR = np.bool_(True).__reduce__()[0]


class RestrictedUnpickler(pickle.Unpickler):
    """Builds bytes, lists, tuples, bools and numpy arrays; refuses any other global.

    Bytes, lists, tuples and bools need no global at all. The globals allowed are
    numpy's data-only constructors (`_reconstruct`, `ndarray`, `dtype`; `_frombuffer`
    for arrays pickled with protocol 5; `scalar` for numpy bools in an issame list)
    and `_codecs.encode`, which Python 3 uses for bytes under protocols <= 2, accepted
    for latin1 only. Python 2 pickles are read with encoding='bytes'.
    """

    SAFE_GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy.core.multiarray", "scalar"): _SCALAR,
        ("numpy._core.multiarray", "scalar"): _SCALAR,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return self.SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.source}: refusing to load global {module}.{name}: a verification .bin may hold only "
                "bytes, lists, tuples, bools and numpy arrays"
            ) from None


def _as_bytes(item, where: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(f"{where}: expected encoded image bytes, got {type(item).__name__}")


def _as_issame(values, where: str) -> np.ndarray:
    flags = np.asarray(values)
    if flags.shape == (0,):  # an empty list has no type to tell: no pairs, which the caller counts
        return flags.astype(bool)
    if flags.ndim != 1 or not (flags.dtype == bool or (np.issubdtype(flags.dtype, np.integer)
                                                        and np.isin(flags, (0, 1)).all())):
        raise ValueError(f"{where}: the same/different list must hold one bool per pair, got {flags.dtype} "
                         f"{flags.shape}")
    return flags.astype(bool)


def _warn_not_square(where: str, sizes: list[tuple[str, tuple[int, int]]], total: int, image_size: int) -> None:
    """One warning for the images of a set that are not square (``sizes``: (which, (height, width)) of each):
    photos, or crops of another layout, among aligned faces; each is stretched to the model's square input."""
    if sizes:
        which, (height, width) = sizes[0]
        warnings.warn(f"{where}: {len(sizes)} of {total} images are not square ({which} is {width}x{height}, "
                      f"width x height): each is stretched to {image_size}x{image_size}, where a verification set "
                      "holds aligned square face crops", stacklevel=3)


def _decode_pairs(name: str, encoded: list[bytes], issame: np.ndarray, image_size: int, where: str) -> VerificationSet:
    images = torch.empty((len(encoded), 3, image_size, image_size), dtype=torch.uint8)
    not_square = []
    for i, data in enumerate(encoded):
        img, (height, width) = decode_image_and_size(data, image_size, source=f"{where}: image {i}")
        images[i] = to_chw(img)
        if height != width:
            not_square.append((f"image {i}", (height, width)))
    _warn_not_square(where, not_square, len(encoded), image_size)
    return VerificationSet(name, images, issame)


def load_bin(path: str, image_size: int = 112) -> VerificationSet:
    """Read an insightface verification `.bin` (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

    Raises pickle.UnpicklingError naming the file when it is not a pickle of
    data (a crafted file that names any other global), ValueError when it is
    data of the wrong shape or holds an undecodable image.
    """
    with open(path, "rb") as f:
        try:
            content = RestrictedUnpickler(f, source=path).load()
        except Exception as exc:  # a truncated or foreign file fails in many ways, all of them this
            if isinstance(exc, pickle.UnpicklingError) and str(exc).startswith(path):
                raise  # a refused global, already explained
            raise pickle.UnpicklingError(f"{path}: not a readable verification .bin: {exc!r}") from exc
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list), got {type(content).__name__}")
    bins, issame = content
    issame = _as_issame(issame, path)
    if not isinstance(bins, (list, tuple, np.ndarray)) or len(bins) != 2 * issame.size:
        raise ValueError(f"{path}: {issame.size} pairs need {2 * issame.size} images, found "
                         f"{len(bins) if hasattr(bins, '__len__') else type(bins).__name__}")
    encoded = [_as_bytes(item, f"{path}: image {i}") for i, item in enumerate(bins)]
    name = os.path.splitext(os.path.basename(path))[0]
    return _decode_pairs(name, encoded, issame, image_size, path)


def text_lines(path: str) -> list[tuple[int, str]]:
    """(line number, the line stripped) of each line of the text file at ``path`` that is neither blank nor a
    comment (``#``); a byte-order mark is not part of the first. A file that is not UTF-8 text (an image or a
    ``.bin`` given as a pairs file) is a ValueError naming it and its line, not the decoder's bare message."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        read = error.object  # (after a byte-order mark, the bytes that follow it)
        line_no = read.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}: line {line_no}: not UTF-8 text ({error.reason}, byte 0x{read[error.start]:02x}): "
                         "a text file was expected") from None
    lines = []
    for line_no, line in enumerate(io.StringIO(text, newline=None), 1):  # (\r\n and \r end lines as \n does)
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append((line_no, line))
    return lines


# Extensions tried for an image a pair file names: LFW's names carry none, and a folder of aligned crops may hold
# .png where the dataset shipped .jpg.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def read_pairs_list(path: str) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Parse a pairs file, its format told by its first line (blank lines and `#` comments aside):

    - this project's pairs list: `image1 image2 0|1` a line (tabs, or double quotes, allow spaces in names);
    - LFW's `pairs.txt`: a header `sets n`, then per set n lines `name n1 n2` (matched) and n lines
      `name1 n1 name2 n2` (mismatched), images `<name>/<name>_<NNNN>.<ext>`; `pairsDevTrain.txt` /
      `pairsDevTest.txt` have a header `n` and one set;
    - CALFW's `pairs_CALFW.txt` and CPLFW's `pairs_CPLFW.txt`: a pair is two lines `image label`, the label
      0 on both lines of a mismatched pair and the same positive number on both of a matched one.

    Image paths are taken from the file's folder. LFW's 10 sets are kept in file order, so that the 10
    contiguous folds of the accuracy are its folds; a file of all matched pairs then as many mismatched ones
    (CALFW's, CPLFW's, LFW's View 1) is reordered so that fold k holds the k-th tenth of each half, the folds
    FaceX-Zoo takes for CALFW and CPLFW. An image LFW's or CALFW's files name that the folder lacks under any
    of IMAGE_EXTENSIONS is a FileNotFoundError naming it and where it was looked for. LFW's lines without its
    header (RFW's `<Race>_pairs.txt`, whose races `train.rfw` reads from RFW's folder) are a ValueError saying so.
    """
    lines = text_lines(path)
    if not lines:
        raise ValueError(f"{path}: no pairs")
    first = lines[0][1].split()
    if len(first) in (3, 4) and first[1].isdigit() and first[-1].isdigit() and (len(first) == 3 or
                                                                               not first[2].isdigit()):
        # (Read as a pairs list, 'id 2 1' would name the images 'id' and '2'.)
        raise ValueError(f"{path}: line {lines[0][0]}: {lines[0][1][:120]!r} is a line of LFW's pairs, but the file "
                         "has no header 'sets n' before it: RFW's <Race>_pairs.txt, whose races are read together "
                         "from RFW's folder (a target /data/RFW, holding test/txts/ and test/data/), or LFW's "
                         "pairs.txt without its first line")
    if 1 <= len(first) <= 2 and all(x.isdigit() for x in first):
        return _read_lfw_pairs(path, lines)
    if len(first) == 2 and first[1].isdigit():
        return _read_two_line_pairs(path, lines)
    return _read_own_pairs_list(path, lines)


def _read_own_pairs_list(path: str, lines: list[tuple[int, str]]) -> tuple[list[tuple[str, str]], np.ndarray]:
    folder = os.path.dirname(os.path.abspath(path))
    pairs, issame = [], []
    for line_no, line in lines:
        if "\t" in line:
            fields = line.split("\t")
        elif '"' in line:  # "my photo.jpg" other.jpg 1
            fields = next(csv.reader([line], delimiter=" ", skipinitialspace=True))
        else:
            fields = line.split()
        fields = [x.strip() for x in fields if x.strip()]
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise ValueError(f"{path}: line {line_no}: expected 'image1 image2 0|1', got {line[:120]!r}")
        pairs.append(tuple(_listed_image(path, line_no, folder, p) for p in fields[:2]))
        issame.append(fields[2] == "1")
    return pairs, np.asarray(issame, dtype=bool)


def _listed_image(path: str, line_no: int, folder: str, named: str) -> str:
    """`folder/named`, as a pairs list names it (no other extension is tried: a crop's is its format's), said by
    its line where it is not there (the pair's number was no line's where the list has comments or blank lines),
    with the folder it was looked for in where the name is relative."""
    found = os.path.join(folder, named)
    if not os.path.isfile(found):
        raise FileNotFoundError(f"{path}: line {line_no}: no image {named}"
                                f"{'' if os.path.isabs(named) else f' in {folder}'}{dangling(found)}")
    return found


def _find_image(path: str, line_no: int, folder: str, named: str, layout: str = "") -> str:
    """`folder/named`, else its stem with the first of IMAGE_EXTENSIONS that exists there."""
    stem, own = os.path.splitext(named)
    others = [ext for ext in IMAGE_EXTENSIONS if ext != own.lower()]
    candidates = [named] + [stem + ext for ext in others]
    found = next((os.path.join(folder, c) for c in candidates if os.path.isfile(os.path.join(folder, c))), None)
    if found is None:
        raise FileNotFoundError(f"{path}: line {line_no}: no image {named} (nor {stem} as {', '.join(others)}) in "
                                f"{folder}{layout}")
    return found


def _read_lfw_pairs(path: str, lines: list[tuple[int, str]]) -> tuple[list[tuple[str, str]], np.ndarray]:
    (header_no, header), body = lines[0], lines[1:]
    counts = [int(x) for x in header.split()]
    sets, per_set = counts if len(counts) == 2 else (1, counts[0])
    if sets not in (1, NFOLDS) or per_set < 1:
        raise ValueError(f"{path}: line {header_no}: LFW's header 'sets pairs' of {sets} sets of {per_set}: its "
                         f"sets are the folds of the accuracy, {NFOLDS} (pairs.txt) or 1 (pairsDevTrain.txt, "
                         "pairsDevTest.txt)")
    if len(body) != 2 * sets * per_set:
        raise ValueError(f"{path}: the header ({header!r}, line {header_no}) gives {sets} set(s) of {per_set} matched "
                         f"and {per_set} mismatched pairs, {2 * sets * per_set} lines; {len(body)} follow")
    folder = os.path.dirname(os.path.abspath(path))
    pairs, issame = [], []
    for i, (line_no, line) in enumerate(body):
        matched = (i // per_set) % 2 == 0
        fields = line.split()
        numbers = fields[1:] if matched else fields[1::2]
        if len(fields) != (3 if matched else 4) or not all(x.isdigit() for x in numbers):
            raise ValueError(f"{path}: line {line_no}: expected a {'matched' if matched else 'mismatched'} pair "
                             f"{'name n1 n2' if matched else 'name1 n1 name2 n2'} (each set is {per_set} matched "
                             f"pairs, then {per_set} mismatched), got {line[:120]!r}")
        names = [(fields[0], fields[1]), (fields[0], fields[2])] if matched else [fields[0:2], fields[2:4]]
        pairs.append(tuple(_find_image(path, line_no, os.path.join(folder, name), f"{name}_{int(n):04d}.jpg",
                                       " (LFW's pairs name <its folder>/<name>/<name>_<NNNN>.jpg)")
                           for name, n in names))
        issame.append(matched)
    issame = np.asarray(issame, dtype=bool)
    return _official_folds(pairs, issame) if sets == 1 else (pairs, issame)


def _read_two_line_pairs(path: str, lines: list[tuple[int, str]]) -> tuple[list[tuple[str, str]], np.ndarray]:
    if len(lines) % 2:
        raise ValueError(f"{path}: {len(lines)} lines of 'image label': CALFW's and CPLFW's pairs are two lines each, "
                         f"the last (line {lines[-1][0]}) has no second")
    folder = os.path.dirname(os.path.abspath(path))
    pairs, issame = [], []
    for (no1, line1), (no2, line2) in zip(lines[0::2], lines[1::2]):
        fields1, fields2 = line1.split(), line2.split()
        for line_no, line, fields in ((no1, line1, fields1), (no2, line2, fields2)):
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(f"{path}: line {line_no}: expected 'image label' (CALFW's and CPLFW's pairs), got "
                                 f"{line[:120]!r}")
        if fields1[1] != fields2[1]:
            raise ValueError(f"{path}: lines {no1}-{no2}: a pair's two lines carry one label (0: mismatched), got "
                             f"{fields1[1]} and {fields2[1]}")
        pairs.append(tuple(_find_image(path, line_no, folder, name) for line_no, name in ((no1, fields1[0]),
                                                                                       (no2, fields2[0]))))
        issame.append(int(fields1[1]) != 0)
    return _official_folds(pairs, np.asarray(issame, dtype=bool))


def _official_folds(pairs: list[tuple[str, str]], issame: np.ndarray) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Pairs listed all matched then as many mismatched, reordered so that the k-th of the 10 contiguous folds
    (`_fold_slices`) is the k-th tenth of the matched and the k-th tenth of the mismatched (exactly so where a
    half is a multiple of 10 pairs, as in those files); other orders are kept."""
    half = issame.size // 2
    if issame.size != 2 * half or not issame[:half].all() or issame[half:].any():
        return pairs, issame
    order = np.concatenate([np.concatenate([block, half + block]) for block in _fold_slices(half, NFOLDS)])
    return [pairs[i] for i in order], issame[order]


def load_pairs_list(path: str, image_size: int = 112) -> VerificationSet:
    """A verification set from a pairs file (see `read_pairs_list`: a pairs list, LFW's, CALFW's or CPLFW's)."""
    pairs, issame = read_pairs_list(path)
    images = torch.empty((2 * len(pairs), 3, image_size, image_size), dtype=torch.uint8)
    not_square = []
    for k, pair in enumerate(pairs):
        for j, image_path in enumerate(pair):
            try:
                img, (height, width) = load_image_file_and_size(image_path, image_size)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: pair {k + 1}: no image at {image_path}") from None
            images[2 * k + j] = to_chw(img)
            if height != width:
                not_square.append((image_path, (height, width)))
    _warn_not_square(path, not_square, images.shape[0], image_size)
    return VerificationSet(os.path.splitext(os.path.basename(path))[0], images, issame)


# ---------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def compute_embeddings(backbone: torch.nn.Module, vset: VerificationSet, *, device, batch_size: int = 64,
                       return_xnorm: bool = False, on_batch=None, dtype=np.float32):
    """L2-normalised embedding(image) + embedding(mirrored image) of every image: (2P, D) of ``dtype``.
    The sum and its normalisation are computed in float64, as insightface computes them, whatever the
    ``dtype`` kept: a pair's distance then lands on the same side of a threshold of the grid as there.

    Images are fed as (x - 127.5) / 127.5. The backbone runs in eval mode and each
    module's train/eval mode is restored afterwards. With return_xnorm=True also
    returns insightface's 'XNorm': the mean norm of the raw (un-normalised)
    embeddings of the images and of their mirrors. ``on_batch(count)`` is called after each batch
    (a progress bar's update).
    """
    batch_size = batch_size_for(backbone, batch_size, 2)  # (each image with its mirror)
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    try:
        outputs, norm_sum = [], 0.0
        for start in range(0, vset.images.shape[0], batch_size):
            x = to_model_input(vset.images[start:start + batch_size].to(device))
            count = x.shape[0]
            raw = backbone(torch.cat([x, torch.flip(x, dims=[3])])).float()
            norm_sum += float(raw.norm(dim=1).sum())
            raw = raw.cpu().double()  # (on the CPU: some devices have no float64)
            outputs.append(raw[:count] + raw[count:])
            if on_batch is not None:
                on_batch(count)
    finally:
        for module, training in modes:
            module.training = training
    embeddings = torch.nn.functional.normalize(torch.cat(outputs), dim=1).numpy().astype(dtype, copy=False)
    if return_xnorm:
        return embeddings, norm_sum / (2 * vset.images.shape[0])
    return embeddings


def _fold_slices(n: int, nfolds: int) -> list[np.ndarray]:
    """Contiguous folds, the first n % nfolds one longer (sklearn KFold without shuffling)."""
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(nfolds)]


def _accuracy_per_threshold(dist: np.ndarray, issame: np.ndarray) -> np.ndarray:
    """Accuracy of 'same iff dist < t' for every t in THRESHOLDS."""
    predicted = dist[:, None] < THRESHOLDS[None, :]
    return (predicted == issame[:, None]).mean(axis=0)


def verification_accuracy(embeddings1: np.ndarray, embeddings2: np.ndarray, issame, nfolds: int = NFOLDS) -> dict:
    """k-fold verification accuracy of pairs (embeddings1[k], embeddings2[k]).

    Each fold is scored at the threshold (on squared L2 distance, grid 0, 0.01, ...,
    3.99) that is most accurate on the other folds, the first such threshold on a
    tie; with nfolds=1 the single fold is its own training set. Returns the mean
    and (population) std of the fold accuracies and the mean chosen threshold.
    """
    e1, e2 = np.asarray(embeddings1, dtype=np.float64), np.asarray(embeddings2, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if e1.shape != e2.shape or e1.ndim != 2 or e1.shape[0] != issame.size:
        raise ValueError(f"need two (P, D) embedding arrays and P flags, got {e1.shape}, {e2.shape}, {issame.shape}")
    if not 1 <= nfolds <= issame.size:
        raise ValueError(f"nfolds must be in [1, {issame.size}] for {issame.size} pairs, got {nfolds}")
    dist = np.sum(np.square(e1 - e2), axis=1)
    folds = _fold_slices(issame.size, nfolds)
    accuracies, thresholds = [], []
    for k, test in enumerate(folds):
        train = np.concatenate([f for i, f in enumerate(folds) if i != k]) if nfolds > 1 else test
        best = int(np.argmax(_accuracy_per_threshold(dist[train], issame[train])))
        accuracies.append(float(np.mean((dist[test] < THRESHOLDS[best]) == issame[test])))
        thresholds.append(float(THRESHOLDS[best]))
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "threshold": float(np.mean(thresholds)),
    }


def evaluate(backbone: torch.nn.Module, vset: VerificationSet, *, device, batch_size: int = 64,
             nfolds: int = NFOLDS, on_batch=None) -> dict:
    """{'accuracy', 'accuracy_std', 'threshold', 'xnorm'} of `backbone` on `vset` (``on_batch``: as
    ``compute_embeddings``'s)."""
    # float64: a distance on a point of the threshold grid (a tie: 0.4 from (1, 0) and (0.8, 0.6)) rounded to
    # float32 crosses it, and another threshold would be chosen than insightface's.
    embeddings, xnorm = compute_embeddings(backbone, vset, device=device, batch_size=batch_size, return_xnorm=True,
                                           on_batch=on_batch, dtype=np.float64)
    result = verification_accuracy(embeddings[0::2], embeddings[1::2], vset.issame, nfolds=nfolds)
    result["xnorm"] = xnorm
    return result
