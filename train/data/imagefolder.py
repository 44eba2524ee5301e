"""A folder of aligned faces, one sub-folder per identity: the simplest way to
bring your own data (and what `python -m train.tools.pack_rec` packs)."""

from __future__ import annotations

import hashlib
import operator
import os
import warnings
from collections.abc import Sequence

import numpy as np

from .transforms import IMAGE_EXTENSIONS, DataError, FaceImageDataset, load_image_file, unreadable_image


def scan_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(identity names, [(image path, label)]) of an ImageFolder tree.

    Identities are the sub-folders holding at least one image, sorted by name;
    label i is the i-th of them. Images (.jpg .jpeg .png .bmp, any case) are
    sorted by file name within their folder; nested folders are not searched (a warning says
    which hold images left out so).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} " + (
            "is a file, not a folder" if os.path.exists(root) else "does not exist"))
    identities: list[str] = []
    samples: list[tuple[str, int]] = []
    loose, nested, beside = 0, [], []  # what the layout leaves out, said rather than dropped silently
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            loose += name.lower().endswith(IMAGE_EXTENSIONS)
            continue
        entries = os.listdir(folder)
        files = sorted(f for f in entries if f.lower().endswith(IMAGE_EXTENSIONS))
        # (isdir only for the few names that are not images: a folder of 5M images costs no more calls;
        # a sub-folder without images, as a tool's own .ipynb_checkpoints or @eaDir, is not said)
        has_folders = any(_holds_images(os.path.join(folder, f)) for f in entries
                          if not f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            if has_folders:
                nested.append(name)
            continue
        if has_folders:
            beside.append(name)
        label = len(identities)
        identities.append(name)
        samples.extend((os.path.join(folder, f), label) for f in files)
    if loose:
        warnings.warn(f"image folder {root!r}: {loose} image(s) directly in it, outside any identity folder, are "
                      "left out", stacklevel=2)
    if nested:
        warnings.warn(f"image folder {root!r}: {len(nested)} folder(s) hold images only in sub-folders, which are not "
                      f"searched, and are left out ({', '.join(nested[:3])}{', ...' if len(nested) > 3 else ''})",
                      stacklevel=2)
    if beside:
        shown = ", ".join(beside[:3]) + (", ..." if len(beside) > 3 else "")
        warnings.warn(f"image folder {root!r}: {len(beside)} identity folder(s) also hold sub-folders, which are not "
                      f"searched: their images are left out ({shown})", stacklevel=2)
    if not samples:
        raise ValueError(
            f"image folder {root!r} holds no identity sub-folder with {'/'.join(IMAGE_EXTENSIONS)} images"
        )
    return identities, samples


def _holds_images(path: str) -> bool:
    """Whether ``path`` is a folder with an image directly in it."""
    try:
        return os.path.isdir(path) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(path))
    except OSError:
        return False


def header_size(path: str) -> tuple[int, int] | None:
    """(H, W) of the image at ``path`` from its header (a folder of aligned faces is of one size, so
    this says what the trainer resizes from), or None when it does not open (reading it says why)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError):
        return None
    return height, width


class PathList(Sequence):
    """The image paths of an ImageFolder, ``root`` joined to names kept in one numpy byte buffer.

    A Python list of 42M path strings (WebFace42M) takes ~5 GB, and every DataLoader worker ends
    up with its own copy: reading a string updates its reference count, which copies its memory page
    into the forked worker (pytorch/pytorch#13246). Two numpy arrays have no reference counts to
    touch, so the workers keep sharing them, and they take a third of the memory."""

    def __init__(self, root: str, names: list[str]):
        self.root = os.path.join(root, "")
        encoded = [name.encode("utf-8", "surrogateescape") for name in names]
        self._ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return int(self._ends.size)

    def _position(self, index) -> int:
        position = operator.index(index)  # a TypeError for 1.5 or "1", as a list's
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"image {index} out of range for {len(self)} images")
        return position

    def name(self, index: int) -> str:
        """The path below the root of image ``index`` (as a list file gives it: it may be absolute)."""
        index = self._position(index)
        start = int(self._ends[index - 1]) if index > 0 else 0
        return self._buffer[start:int(self._ends[index])].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return os.path.join(self.root, self.name(index))  # (a list file's names may be absolute)

    def joined_names(self) -> bytes:
        """The names below the root, one a line (no last newline), as UTF-8 bytes."""
        return np.insert(self._buffer, self._ends[:-1], ord("\n")).tobytes()


class ImageFolderDataset(FaceImageDataset):
    """Aligned face images under `root/<identity>/<image>`, resized to image_size when needed."""

    def __init__(self, root: str, *, image_size: int = 112, seed: int = 0, flip: bool = True):
        super().__init__(image_size=image_size, seed=seed, flip=flip)
        self.root = root
        self.identities, samples = scan_image_folder(root)
        self._keep(samples)

    def _keep(self, samples: list[tuple[str, int]]) -> None:
        """Holds ``samples`` ([(path, label)], paths joined to ``self.root`` or absolute) and what their
        first image says of the stored size."""
        # (Paths are os.path.join(root, ...) as listed; relpath would take 30 s for 5.8M.)
        prefix = os.path.join(self.root, "")
        self.paths = PathList(self.root, [path[len(prefix):] if path.startswith(prefix) else path
                                          for path, _ in samples])
        self.labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        self.num_classes = len(self.identities)
        self.stored_size, self.stored_size_source = header_size(samples[0][0]), "its first image"

    def __len__(self) -> int:
        return len(self.paths)

    def _index_parts(self) -> list[bytes]:
        # The names below the root (nodes may mount it at different places) and their identities.
        return [self.paths.joined_names(), self.labels.tobytes()]

    def classes_digest(self) -> str:
        digest = hashlib.blake2b(digest_size=8)
        for name in self.identities:
            encoded = name.encode("utf-8", "surrogateescape")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        return digest.hexdigest()

    def load(self, index: int) -> tuple[np.ndarray, int]:
        path = self.paths[index]
        try:
            image = load_image_file(path, self.image_size)
        except OSError as exc:  # removed or unreadable since the folder was listed
            raise DataError(unreadable_image(path, exc)) from exc
        return image, int(self.labels[index])
