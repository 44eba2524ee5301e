"""A list file of aligned faces and their identities, the other way than an image folder to bring your own
data: FaceX-Zoo's `train_file` and the cleaned CASIA-WebFace / VGGFace2 lists (`path label`), insightface's
face2rec2 `.lst` (`flag<TAB>path<TAB>label`) and mxnet im2rec's (`index<TAB>label<TAB>path`)."""

from __future__ import annotations

import codecs
import math
import os

import numpy as np

from .imagefolder import ImageFolderDataset
from .transforms import DataError, FaceImageDataset

LIST_EXTENSIONS = (".lst", ".txt")

# The line forms, as error messages name them. A line with two or more tabs is one of the last two, told
# apart by which of its second and third fields is a number; any other line is a path and a label.
PATH_LABEL = "path label"
INSIGHTFACE = "flag<TAB>path<TAB>label"
IM2REC = "index<TAB>label<TAB>path"


def is_image_list(spec: str) -> bool:
    """Whether `--data spec` names a list file (.lst or .txt) rather than a folder."""
    return spec.lower().endswith(LIST_EXTENSIONS) and os.path.isfile(spec)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _label(text: str, where: str) -> int:
    """The identity ``text`` gives: an integer >= 0, written as one or as mxnet's im2rec writes it (3.000000)."""
    try:
        value = int(text)  # exactly: a float holds integers up to 2**53 only (ids past it became one)
    except ValueError:
        number = _number(text)
        value = int(number) if number is not None and number.is_integer() else -1
    if not 0 <= value < 2**63:  # (the labels are held as int64)
        raise DataError(f"{where}: label {text!r} is not an identity: expected an integer >= 0"
                        + (" and < 2**63" if value > 0 else ""))
    return value


def _form(fields: list[str], where: str) -> str:
    """The form of the list, from its first line's tab-separated fields."""
    if len(fields) < 3:
        return PATH_LABEL
    second, third = _number(fields[1]) is not None, _number(fields[2]) is not None
    if third and not second:
        return INSIGHTFACE
    if second and not third:
        return IM2REC
    raise DataError(f"{where}: cannot tell the image path from the label: expected '{PATH_LABEL}', "
                    f"'{INSIGHTFACE}' (insightface's face2rec2) or '{IM2REC}' (mxnet's im2rec)")


def _parse(line: str, form: str, where: str) -> tuple[str, int]:
    """(image path, label) of a list line of ``form``."""
    if form == PATH_LABEL:
        fields = line.rsplit(None, 1)  # a path may hold spaces; the label is the last field
        if len(fields) == 2 and "\t" not in fields[0]:
            return fields[0], _label(fields[1], where)
    else:
        fields = [field.strip() for field in line.split("\t")]
        path_at, label_at = (1, 2) if form == INSIGHTFACE else (2, 1)
        # insightface's face2rec2 allows a box (4 numbers) and 5 landmarks (10) after the label.
        counts = (3, 7, 17) if form == INSIGHTFACE else (3,)
        swapped = len(fields) >= 3 and _number(fields[path_at]) is not None and _number(fields[label_at]) is None
        if len(fields) in counts and _number(fields[0]) is not None and not swapped:
            if len(fields) > 3 and _number(fields[0]) == 0:
                raise DataError(f"{where}: flag 0 with a face box: a face face2rec2 would align from the box and "
                                "landmarks; the trainer reads aligned faces (align them first: python -m "
                                "train.tools.align)")
            return fields[path_at], _label(fields[label_at], where)
    raise DataError(f"{where}: expected '{form}', the form of the list's first line, got {line[:80]!r}")


def read_image_list(list_path: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(identities, [(image path, label)]) of a list file, as `scan_image_folder` gives an image folder's.

    Lines are `path label` (space- or tab-separated; a path may hold spaces), insightface's
    `flag<TAB>path<TAB>label` (the flag, or an index in its forks' lists, is not read; a face box and
    landmarks may follow when the flag is 1) or mxnet im2rec's `index<TAB>label<TAB>path`, one form a
    file, found from its first line; blank lines and lines starting with `#` are skipped. Paths are
    relative to the list's folder, or absolute. Labels are integers >= 0 (`3.000000` too), not
    necessarily 0..C-1: label k is the k-th smallest label of the list, and identity k is that label
    as text. Images keep the list's order. Every image is checked to be there, by one listing of
    each folder (as an image folder is read): one missing is an error naming its line.
    """
    folder = os.path.dirname(list_path)
    paths: list[str] = []
    labels: list[int] = []
    line_numbers: list[int] = []
    form, relative = None, False
    with open(list_path, "rb") as f:  # UTF-16 with its byte-order mark: Windows PowerShell's `>`, Notepad's 'Unicode'
        utf16 = f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    with open(list_path, encoding="utf-16" if utf16 else "utf-8-sig", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{list_path}: line {line_no}"
            form = form or _form(line.split("\t"), where)
            path, label = _parse(line, form, where)
            relative = relative or not os.path.isabs(path)
            paths.append(os.path.join(folder, path))
            labels.append(label)
            line_numbers.append(line_no)
    if not paths:
        raise DataError(f"{list_path}: lists no image (lines '{PATH_LABEL}', '{INSIGHTFACE}' or '{IM2REC}')")
    missing = _missing(paths)
    if missing:
        first = missing[0]
        more = f" ({len(missing)} of its {len(paths)} images are missing)" if len(missing) > 1 else ""
        hint = (f": paths are read relative to the list's folder ({os.path.abspath(folder)}); put the list (or a "
                "link to it) in the folder its paths start from, or write them absolute") if (
            relative and len(missing) == len(paths)) else ""
        raise FileNotFoundError(f"{list_path}: line {line_numbers[first]}: no image {paths[first]}{more}{hint}")
    identities, remapped = np.unique(np.asarray(labels, dtype=np.int64), return_inverse=True)
    return [str(label) for label in identities.tolist()], list(zip(paths, remapped.tolist()))


def _missing(paths: list[str]) -> list[int]:
    """The indices of ``paths`` that name no file, found by listing each folder once (a million stat
    calls cost more, most on a network file system)."""
    by_folder: dict[str, list[int]] = {}
    for index, path in enumerate(paths):
        by_folder.setdefault(os.path.dirname(path), []).append(index)
    missing = []
    for folder, indices in by_folder.items():
        try:
            names = set(os.listdir(folder or "."))
        except OSError:  # no such folder, or not one
            missing += indices
            continue
        # (A name the listing spells otherwise, on a case-insensitive file system, is asked about.)
        missing += [i for i in indices if os.path.basename(paths[i]) not in names and not os.path.isfile(paths[i])]
    return sorted(missing)


def remapped_labels_note(identities: list[str]) -> str | None:
    """What a list's labels become when they are not 0..C-1 already; None when they are."""
    if all(name == str(k) for k, name in enumerate(identities)):
        return None
    return (f"the list's {len(identities)} labels ({identities[0]} to {identities[-1]}) are classes 0 to "
            f"{len(identities) - 1} in ascending order: class k is the list's k-th smallest label")


def _spelled_one_way(path: str) -> str:
    """``path`` with its `.` and `..` and doubled separators resolved, where it has any (most have none:
    normalising every path of a million-line list would cost a second)."""
    return os.path.normpath(path) if path.startswith(".") or "/." in path or "//" in path else path


def repeated_images_note(identities: list[str], samples: list[tuple[str, int]], shown: int = 3) -> str | None:
    """What a list that names an image more than once trains on: the image drawn as often, and, under two
    labels, one face taught as two people (label noise); None when every image is listed once. Paths are
    compared with their `.` and `..` resolved (`a/./b.jpg` is `a/b.jpg`; a symbolic link is another path)."""
    hashes = np.fromiter((hash(_spelled_one_way(path)) for path, _ in samples), dtype=np.int64, count=len(samples))
    values, counts = np.unique(hashes, return_counts=True)
    if not (counts > 1).any():
        return None
    candidates = set(values[counts > 1].tolist())
    labels_of: dict[str, list[int]] = {}
    for (path, label), key in zip(samples, hashes.tolist()):
        if key in candidates:
            labels_of.setdefault(_spelled_one_way(path), []).append(label)
    repeated = {path: labels for path, labels in labels_of.items() if len(labels) > 1}
    if not repeated:
        return None  # (hashes that collided)
    relabelled = [(path, labels) for path, labels in repeated.items() if len(set(labels)) > 1]

    def names(labels: list[int]) -> str:
        return " and ".join(dict.fromkeys(identities[k] for k in labels))

    if len(repeated) == 1:
        path, labels = next(iter(repeated.items()))
        text = f"{path} is listed {len(labels)} times, so drawn as often"
        return text + (f", under labels {names(labels)}: one face taught as different people" if relabelled
                       else f" (label {names(labels)})")
    listed = sum(len(labels) for labels in repeated.values())
    text = f"{len(repeated)} images are listed more than once ({listed} lines), each drawn as often as it is listed"
    if relabelled:
        examples = "; ".join(f"{path} as {names(labels)}" for path, labels in relabelled[:shown])
        text += (f"; {len(relabelled)} of them under two or more labels, one face taught as different people "
                 f"({examples}{'; ...' if len(relabelled) > shown else ''})")
    else:
        path, labels = next(iter(repeated.items()))
        text += f" (such as {path}, {len(labels)} times)"
    return text


class ImageListDataset(ImageFolderDataset):
    """The aligned faces a list file names (`read_image_list`), read as an image folder's are: label k
    is the list's k-th smallest label, `identities[k]` that label as text."""

    def __init__(self, list_path: str, *, image_size: int = 112, seed: int = 0, flip: bool = True):
        FaceImageDataset.__init__(self, image_size=image_size, seed=seed, flip=flip)
        self.list_path = list_path
        self.root = os.path.dirname(list_path)  # what the paths are relative to (the fingerprint's names are)
        self.identities, samples = read_image_list(list_path)
        self._keep(samples)
        self.labels_note = remapped_labels_note(self.identities)  # said by the trainer
        self.repeats_note = repeated_images_note(self.identities, samples)  # likewise

    def _index_parts(self) -> list[bytes]:
        # The list's own labels too: they name the identities, as an image folder's names do (which its
        # paths hold), so that a list relabelled 1..C from 0..C-1 is not taken for the same data.
        return [*super()._index_parts(), "\n".join(self.identities).encode()]
