"""`--data random`: one fixed batch of random images kept on the training device and labels drawn
uniformly per step, with no files, decoding or worker processes, to measure a training step's speed and
memory without the loader (arcface_torch's ``rec = "synthetic"``, its configs/speed.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

RANDOM = "random"


class RandomFaces:
    """The training "set" of `--data random`: ``num_classes`` identities and no stored images.

    Its images are one batch of uniform uint8 noise, drawn once from ``seed`` (on the CPU, so that every
    device gets the same pixels) and kept on the training device; every step trains on that batch. The
    labels of global step k are drawn uniformly from [0, num_classes) by a generator seeded with
    (seed, k, rank) alone, so that a resumed run sees the labels an uninterrupted one sees. Nothing is held
    per class: any number of identities (millions) costs only the loss's class centres.

    An epoch is ``num_classes`` images (each identity once on average), for the options counted in epochs;
    ``len`` says so."""

    num_workers = 0
    augment = None  # (the noise is neither augmented nor flipped)

    def __init__(self, num_classes: int, *, image_size: int = 112, seed: int = 0):
        if num_classes < 1:
            raise ValueError(f"--data random needs --num-classes of at least 1, got {num_classes}")
        self.num_classes, self.image_size, self.seed = int(num_classes), int(image_size), int(seed)

    def __len__(self) -> int:
        return self.num_classes

    def describe(self) -> str:
        return (f"random: one fixed batch of {self.image_size}px uint8 noise on the training device, labels uniform "
                f"over {self.num_classes} identities each step (no loader, no decoding: a step's speed and memory "
                "alone, nothing learned)")

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(f"RandomFaces {self.num_classes} {self.image_size} {self.seed}".encode(),
                                 digest_size=8)
        return digest.hexdigest()

    def classes_digest(self) -> None:
        return None  # (no identities to name)

    def images(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The fixed uint8 batch (batch_size, 3, image_size, image_size) on ``device``, the same for a seed."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, 256, (batch_size, 3, self.image_size, self.image_size), dtype=torch.uint8,
                             generator=generator).to(device)

    def labels(self, step: int, batch_size: int, rank: int = 0) -> torch.Tensor:
        """The int64 labels of global step ``step`` on process ``rank``: uniform over the classes, a function
        of (seed, step, rank) alone."""
        state = np.random.SeedSequence((self.seed, step, rank)).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) >> 1)
        return torch.randint(0, self.num_classes, (batch_size,), generator=generator)


class RandomBatches:
    """The loader of `--data random`: endless (images, labels) batches from global step ``start_step``,
    the images one tensor already on ``device`` and the labels moved there each step. No worker
    processes; ``batch_sampler.steps_per_epoch`` as a DataLoader's ResumableBatchSampler has it."""

    def __init__(self, dataset: RandomFaces, *, batch_size: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, start_step: int = 0):
        self.dataset, self.batch_size, self.rank, self.start_step = dataset, batch_size, rank, start_step
        self.device = torch.device(device)
        self.steps_per_epoch = max(1, -(-len(dataset) // world_size) // batch_size)
        self.batch_sampler = self  # (where the trainer and its tools read steps_per_epoch)
        self.fixed_images = dataset.images(batch_size, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.start_step
        while True:
            labels = self.dataset.labels(step, self.batch_size, self.rank)
            yield self.fixed_images, labels.to(self.device, non_blocking=True)
            step += 1
