"""Several training sets as one (`--data A,B`): their images one after another, each set's identities
given labels after the previous sets' (no identity is taken for the same person in two sets)."""

from __future__ import annotations

import bisect
import itertools
import os

import numpy as np

from .transforms import FaceImageDataset

# A checkpoint's data is looked for among the other orders of at most this many sets (8! = 40,320 digests).
MAX_REORDERED_SETS = 8


def split_data_spec(spec: str) -> list[str]:
    """The sets a `--data` value names: several, separated by commas (``a,b``), unless a file or folder
    of that very name exists (a path holding a comma). ValueError for an empty part, a set named twice, or
    synthetic among others."""
    if "," not in spec or os.path.lexists(spec):
        return [spec]
    parts = [part.strip() for part in spec.split(",")]
    if not all(parts):
        raise ValueError(f"--data {spec!r}: an empty name between commas; separate the sets by single commas")
    if "synthetic" in parts:
        raise ValueError(f"--data {spec!r}: synthetic, the demo's drawn faces, is a set of its own, not combined "
                         "with others")
    if "random" in parts:
        raise ValueError(f"--data {spec!r}: random, the noise for timing a step, is a source of its own, not "
                         "combined with others")
    seen: dict[str, str] = {}
    for part in parts:
        key = os.path.realpath(part)
        if key in seen:
            raise ValueError(f"--data {spec!r}: {part} is named twice" + (
                f" (as {seen[key]})" if seen[key] != part else "")
                + ": its images would be read twice, as other identities the second time")
        seen[key] = part
    return parts


class CombinedFaces(FaceImageDataset):
    """``parts`` (name, dataset) one after another: image ``i`` of part ``k`` is image
    ``image_offsets[k] + i``, and its label ``label_offsets[k]`` plus its label in the part. The
    augmentations and the flip are this set's own, of (seed, epoch, combined index), as for one set."""

    def __init__(self, parts: list[tuple[str, FaceImageDataset]], *, image_size: int, seed: int, flip: bool):
        super().__init__(image_size=image_size, seed=seed, flip=flip)
        self.parts = parts
        self.image_offsets = np.cumsum([0, *(len(dataset) for _, dataset in parts)]).tolist()
        self.label_offsets = np.cumsum([0, *(dataset.num_classes for _, dataset in parts)]).tolist()
        self.num_classes = self.label_offsets[-1]
        self._part_prints: list[bytes] | None = None

    def __len__(self) -> int:
        return self.image_offsets[-1]

    def _index_parts(self, order: tuple[int, ...] | None = None) -> list[bytes]:
        if self._part_prints is None:  # (an image folder's joins every file name: once)
            self._part_prints = [f"{type(dataset).__name__} {dataset.fingerprint()}".encode()
                                 for _, dataset in self.parts]
        return [self._part_prints[k] for k in (order or range(len(self.parts)))]

    def order_of(self, fingerprint: str) -> list[str] | None:
        """The sets' names in the order that combines them into the set of ``fingerprint`` (a checkpoint's
        record of its data), where that is another order of these very sets; None otherwise. (A RecordIO
        set names no identities: its record tells the same sets named in another order, whose labels
        would all be other people's.)"""
        if len(self.parts) > MAX_REORDERED_SETS:
            return None
        orders = itertools.permutations(range(len(self.parts)))
        next(orders)  # (this one)
        found = next((order for order in orders if self._digest(self._index_parts(order)) == fingerprint), None)
        return None if found is None else [self.parts[k][0] for k in found]

    def classes_digest(self) -> str | None:
        # The parts' identities in order, where every part names its own (image folders).
        digests = [dataset.classes_digest() for _, dataset in self.parts]
        return None if None in digests else "+".join(digests)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        part = bisect.bisect_right(self.image_offsets, index) - 1
        image, label = self.parts[part][1].load(index - self.image_offsets[part])
        return image, self.label_offsets[part] + label

    def describe(self) -> list[str]:
        """One line a part: its name, its image count and its labels' range in the combined set."""
        return [f"{name}: {len(dataset)} images, labels {self.label_offsets[k]} to {self.label_offsets[k + 1] - 1} "
                f"({dataset.num_classes} identities)" for k, (name, dataset) in enumerate(self.parts)]
