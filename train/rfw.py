"""RFW (Racial Faces in-the-Wild; Wang et al., ICCV 2019), the benchmark of a face model's bias across
races: four subsets (African, Asian, Caucasian, Indian) of 6,000 pairs each, in LFW's protocol, read
from the release's folders as verification sets, and the summary papers report beside the four accuracies
(their mean, their standard deviation and the skewed error ratio, the largest error over the smallest).

Two forms of the release are read from a folder given as a verification target:

- the images: ``test/data/<Race>/<id>/<id>_<NNNN>.jpg`` and ``test/txts/<Race>/<Race>_pairs.txt`` (the
  folder given may be ``test`` itself, the folder holding it, or the one holding ``images/test``). A
  pairs file has LFW's lines without LFW's header: ``id n1 n2`` (a matched pair) and ``id1 n1 id2 n2``
  (a mismatched one), each of its 10 folds 300 matched then 300 mismatched pairs, in file order. The
  images are loose crops, aligned here to the ArcFace crop from ``<Race>_lmk.txt`` (a line ``<image
  path> <label> x1 y1 ... x5 y5``: left eye, right eye, nose, left and right mouth corner); a tree
  without that file, of crops aligned already, is read as it is;
- the four ``<Race>_test.bin`` in the folder given (insightface's ``.bin`` format; the release's
  ``bin_for_mxnet/RFW_test.tar.gz``), their pairs in the order they hold them.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

RACES = ("African", "Asian", "Caucasian", "Indian")
# The name the subsets are grouped under: their sets are "RFW/African", ...
GROUP = "RFW"
# Where the test tree may be under the folder given: the folder itself, the release's own layout.
_TREE_PLACES = ("", "test", os.path.join("images", "test"))
_LAYOUT = "RFW's pairs name data/<Race>/<id>/<id>_<NNNN>.jpg"
_SHOWN_FAILURES = 3


@dataclass
class RFWRelease:
    """Where each race's files are: ``bins`` (race -> ``<Race>_test.bin``), or ``pairs`` (race ->
    ``txts/<Race>/<Race>_pairs.txt``), ``images`` (race -> ``data/<Race>``) and ``landmarks`` (race ->
    ``txts/<Race>/<Race>_lmk.txt``, or None where the tree holds aligned crops)."""

    root: str
    bins: dict[str, str] | None = None
    pairs: dict[str, str] | None = None
    images: dict[str, str] | None = None
    landmarks: dict[str, str | None] | None = None

    def files(self) -> list[str]:
        """The files read (not the images)."""
        if self.bins is not None:
            return list(self.bins.values())
        return [*self.pairs.values(), *filter(None, self.landmarks.values())]

    def image_folders(self) -> list[str]:
        return [] if self.images is None else list(self.images.values())


def find_release(folder: str) -> RFWRelease:
    """RFW's files under ``folder`` (see the module's doc): the four ``<Race>_test.bin`` in it, else the
    test tree in it, in ``test/`` or in ``images/test/``. FileNotFoundError naming what is missing."""
    bins = {race: os.path.join(folder, f"{race}_test.bin") for race in RACES}
    present = [race for race, path in bins.items() if os.path.isfile(path)]
    if present:
        missing = [os.path.basename(bins[race]) for race in RACES if race not in present]
        if missing:
            raise FileNotFoundError(f"RFW folder {folder}: it holds {', '.join(f'{r}_test.bin' for r in present)} "
                                    f"but not {', '.join(missing)}: RFW's summary needs its four races")
        return RFWRelease(folder, bins=bins)
    root = next((os.path.join(folder, place) for place in _TREE_PLACES
                 if os.path.isdir(os.path.join(folder, place, "txts"))), None)
    if root is None:
        raise FileNotFoundError(f"{folder} is a folder but not RFW's: no <Race>_test.bin in it, and no txts/ in it, "
                                "in test/ or in images/test/ (RFW's test tree: txts/<Race>/<Race>_pairs.txt and "
                                "data/<Race>/)")
    root = os.path.normpath(root)
    pairs = {race: os.path.join(root, "txts", race, f"{race}_pairs.txt") for race in RACES}
    images = {race: os.path.join(root, "data", race) for race in RACES}
    for race in RACES:
        if not os.path.isfile(pairs[race]):
            raise FileNotFoundError(f"RFW folder {root}: no txts/{race}/{race}_pairs.txt (RFW's summary needs its "
                                    "four races)")
        if not os.path.isdir(images[race]):
            raise FileNotFoundError(f"RFW folder {root}: no data/{race}/ folder of images for "
                                    f"txts/{race}/{race}_pairs.txt")
    landmarks = {race: os.path.join(root, "txts", race, f"{race}_lmk.txt") for race in RACES}
    landmarks = {race: path if os.path.isfile(path) else None for race, path in landmarks.items()}
    lacking = [race for race in RACES if landmarks[race] is None]
    if 0 < len(lacking) < len(RACES):  # (some races aligned, the others read as loose crops: a summary of neither)
        raise FileNotFoundError(f"RFW folder {root}: no " + ", ".join(f"txts/{r}/{r}_lmk.txt" for r in lacking)
                                + f", where {', '.join(r for r in RACES if r not in lacking)} have theirs: each "
                                "race's loose crops are aligned from its landmarks (a tree of crops aligned already "
                                "has none)")
    if lacking:
        warnings.warn(f"RFW folder {root}: no <Race>_lmk.txt in txts/: its images are read as crops aligned "
                      "already (the release's are loose crops, aligned from those files)", stacklevel=2)
    return RFWRelease(root, pairs=pairs, images=images, landmarks=landmarks)


def read_pairs(path: str, images: str) -> tuple[list[tuple[str, str]], np.ndarray, list[int]]:
    """(image pairs as paths under ``images`` (``data/<Race>``), (P,) bool whether each is one person, each
    pair's line number) of a ``<Race>_pairs.txt``, in file order: its 10 folds are the 10 contiguous folds
    of the accuracy. An image missing as named is looked for with the other image extensions (see
    ``train.verification.IMAGE_EXTENSIONS``); ValueError / FileNotFoundError naming the file and line."""
    from train.verification import _find_image, text_lines

    pairs, issame, line_nos = [], [], []
    for line_no, line in text_lines(path):
        fields = line.split()
        matched = len(fields) == 3
        numbers = fields[1:] if matched else fields[1::2]
        if len(fields) not in (3, 4) or not all(x.isdigit() for x in numbers):
            raise ValueError(f"{path}: line {line_no}: expected RFW's 'id n1 n2' (a matched pair) or "
                             f"'id1 n1 id2 n2' (a mismatched one), got {line[:120]!r}")
        names = [(fields[0], fields[1]), (fields[0], fields[2])] if matched else [fields[0:2], fields[2:4]]
        pairs.append(tuple(_find_image(path, line_no, os.path.join(images, identity),
                                       f"{identity}_{int(n):04d}.jpg", f" ({_LAYOUT})")
                           for identity, n in names))
        issame.append(matched)
        line_nos.append(line_no)
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs, np.asarray(issame, dtype=bool), line_nos


def _image_key(path: str) -> tuple[str, str]:
    """(identity folder, file name without extension): how a pair's image and a landmarks line meet."""
    folder, name = os.path.split(path.replace("\\", "/").rstrip("/"))
    return os.path.basename(folder), os.path.splitext(name)[0]


def read_landmarks(path: str) -> dict[tuple[str, str], tuple[np.ndarray, int]]:
    """{(identity, image name without extension): ((5, 2) float64 landmarks, line number)} of a
    ``<Race>_lmk.txt``: lines ``<image path> <label> x1 y1 ... x5 y5``, the path's last two parts
    ``<id>/<id>_<NNNN>.jpg``. ValueError naming the file and line of a line of another shape, a
    coordinate that is not a finite number, or an image listed twice."""
    from train.verification import text_lines

    found: dict[tuple[str, str], tuple[np.ndarray, int]] = {}
    for line_no, line in text_lines(path):
        fields = line.split()
        try:
            values = [float(x) for x in fields[2:]] if len(fields) == 12 else None
        except ValueError:
            values = None
        if values is None or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{path}: line {line_no}: expected RFW's '<image path> <label> x1 y1 ... x5 y5' "
                             f"(12 fields, the coordinates finite numbers), got {line[:120]!r}")
        key = _image_key(fields[0])
        if key in found:
            raise ValueError(f"{path}: line {line_no}: {fields[0]} is listed again (first on line "
                             f"{found[key][1]})")
        found[key] = (np.array(values, dtype=np.float64).reshape(5, 2), line_no)
    if not found:
        raise ValueError(f"{path}: no landmarks")
    return found


def _aligned_crops(race: str, paths: list[str], landmarks_path: str, images: str, pairs_path: str,
                   line_of: dict[str, int], image_size: int) -> dict[str, torch.Tensor]:
    """{image path: uint8 (3, S, S) ArcFace crop} of ``paths``, aligned from their landmarks as
    ``train.ijb`` aligns IJB's loose crops. ValueError naming the images that have no landmarks or
    cannot be read (the first few, and their count)."""
    from train.ijb import LooseCrops
    from train.tools.align import landmark_notes

    landmarks = read_landmarks(landmarks_path)
    unlisted = [p for p in paths if _image_key(p) not in landmarks]
    if unlisted:
        raise ValueError(f"{pairs_path}: line {line_of[unlisted[0]]}: {os.path.relpath(unlisted[0], images)} has no "
                         f"landmarks in {landmarks_path} ({len(unlisted)} such image(s) of {race})")
    points = np.stack([landmarks[_image_key(p)][0] for p in paths])
    line_nos = np.array([landmarks[_image_key(p)][1] for p in paths])
    # Landmarks in another order than the template's (a column misread) make crops that are not faces' crops:
    # said, as train.tools.align says it.
    for note in landmark_notes(points, line_nos):
        warnings.warn(f"{landmarks_path}: {note}", stacklevel=2)
    sources = [f"{landmarks_path}: line {n}" for n in line_nos]
    crops = LooseCrops("", paths, points, image_size, sources=sources, check_bounds=True)
    result, failures = {}, []
    for i, path in enumerate(paths):
        crop, failure = crops[i]
        if crops.unusable[i]:  # (LooseCrops makes them black, as insightface does IJB's)
            failure = f"{sources[i]}: {path}: its 5 landmarks coincide"
        if failure:
            failures.append(failure)
        result[path] = crop
    if failures:
        shown = "; ".join(failures[:_SHOWN_FAILURES]) + ("; ..." if len(failures) > _SHOWN_FAILURES else "")
        hint = " (crops aligned already? RFW's landmarks are of its loose crops: a tree of aligned crops is read " \
               f"as it is without txts/{race}/{race}_lmk.txt)" if any(": its landmarks lie outside" in f
                                                                        for f in failures) else ""
        raise ValueError(f"RFW {race}: {len(failures)} of {len(paths)} images could not be aligned: {shown}{hint}")
    return result


def _read_crops(paths: list[str], pairs_path: str, line_of: dict[str, int], image_size: int
                ) -> tuple[dict[str, torch.Tensor], list[tuple[str, tuple[int, int]]]]:
    """Aligned crops read as they are (resized to ``image_size``), and the (path, (height, width)) of those
    that are not square."""
    from train.data.transforms import load_image_file_and_size, to_chw

    result, not_square = {}, []
    for path in paths:
        try:
            img, (height, width) = load_image_file_and_size(path, image_size)
        except ValueError as error:
            raise ValueError(f"{pairs_path}: line {line_of[path]}: {error}") from None
        result[path] = to_chw(img)
        if height != width:
            not_square.append((path, (height, width)))
    return result, not_square


def load_race(release: RFWRelease, race: str, image_size: int = 112, group: str = GROUP):
    """The ``VerificationSet`` of one race, named ``<group>/<Race>`` (``RFW/African``), in ``group``."""
    from train.verification import VerificationSet, _warn_not_square, load_bin

    if release.bins is not None:
        vset = load_bin(release.bins[race], image_size)
    else:
        pairs_path, images = release.pairs[race], release.images[race]
        pairs, issame, line_nos = read_pairs(pairs_path, images)
        line_of: dict[str, int] = {}
        for pair, line_no in zip(pairs, line_nos):
            for path in pair:
                line_of.setdefault(path, line_no)
        paths = list(line_of)  # each image once, in the order the pairs name them
        if release.landmarks[race] is not None:
            crops = _aligned_crops(race, paths, release.landmarks[race], images, pairs_path, line_of, image_size)
        else:
            crops, not_square = _read_crops(paths, pairs_path, line_of, image_size)
            _warn_not_square(pairs_path, not_square, len(paths), image_size)
        images_tensor = torch.stack([crops[path] for pair in pairs for path in pair])
        vset = VerificationSet(race, images_tensor, issame)
    vset.name, vset.group = f"{group}/{race}", group
    return vset


def summary(accuracies: dict[str, float]) -> dict:
    """What papers report of RFW beside each race's accuracy: ``mean``, ``std`` (numpy's, the population
    standard deviation, as the folds' std is), ``ser`` (the skewed error ratio: the largest error, 1 -
    accuracy, over the smallest; None where the smallest is 0) and the races with the ``largest_error``
    and the ``smallest_error``."""
    values = np.array([accuracies[race] for race in accuracies], dtype=np.float64)
    errors = 1.0 - values
    races = list(accuracies)
    largest, smallest = races[int(np.argmax(errors))], races[int(np.argmin(errors))]
    return {
        "accuracies": {race: float(accuracies[race]) for race in races},
        "mean": float(values.mean()),
        "std": float(values.std()),
        "ser": float(errors.max() / errors.min()) if errors.min() > 0 else None,
        "largest_error": largest,
        "smallest_error": smallest,
    }


def summaries(groups: dict[str, dict[str, float]]) -> dict[str, dict]:
    """{group: summary} of ``{group: {race: accuracy}}`` for the groups whose four races are all there."""
    return {group: summary({race: found[race] for race in RACES})
            for group, found in groups.items() if all(race in found for race in RACES)}


def grouped_accuracies(sets: dict, results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{group: {race: accuracy}} of the sets of ``sets`` (name -> VerificationSet) that belong to a group
    (RFW's races) and have a result in ``results`` (name -> {"accuracy": ...})."""
    groups: dict[str, dict[str, float]] = {}
    for name, vset in sets.items():
        group = getattr(vset, "group", None)
        if group and name in results:
            groups.setdefault(group, {})[name.rsplit("/", 1)[-1]] = float(results[name]["accuracy"])
    return groups


def summary_line(group: str, result: dict) -> str:
    """``RFW: mean accuracy 0.9123, std 0.0123 across its 4 races, SER 1.65 (African's error 0.0877 over
    Caucasian's 0.0532)``."""
    errors = {race: 1.0 - acc for race, acc in result["accuracies"].items()}
    largest, smallest = result["largest_error"], result["smallest_error"]
    ser = f"SER {result['ser']:.2f}" if result["ser"] is not None else "SER undefined"
    return (f"{group}: mean accuracy {result['mean']:.4f}, std {result['std']:.4f} across its {len(errors)} races, "
            f"{ser} ({largest}'s error {errors[largest]:.4f} over {smallest}'s {errors[smallest]:.4f})")
