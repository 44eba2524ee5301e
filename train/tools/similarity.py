"""Searches over the cosines of unit embeddings made in blocks, never as one N x N matrix, and the
connected components of the pairs they find (``clean``: class pairs alike enough to be one
identity)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def cosine_blocks(unit: torch.Tensor, *, device, rows: int = 2048, columns: int = 65536
                  ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(first row, first column, cosines) of the blocks of ``unit @ unit.T`` ((N, D) unit vectors) on
    or right of the diagonal, ``rows`` x ``columns`` at most, made on ``device``: each pair (i, j),
    i < j, lies in one block (a block on the diagonal holds some pairs j <= i too, which the caller
    masks)."""
    unit = unit.to(device, torch.float32)
    for start in range(0, len(unit), rows):
        block = unit[start:start + rows]
        for first in range(start, len(unit), columns):
            yield start, first, block @ unit[first:first + columns].T


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) each node's component in the graph of the edges (a[e], b[e]): the smallest node joined to
    it. Vectorised: every root takes the smallest root it shares an edge with, then each node its
    root's root, until each edge's two ends share a root."""
    label = np.arange(n)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while True:
        while True:  # each node to its root
            root = label[label]
            if np.array_equal(root, label):
                break
            label = root
        ra, rb = label[a], label[b]
        apart = ra != rb
        if not apart.any():
            return label
        ra, rb = ra[apart], rb[apart]
        smaller = np.minimum(ra, rb)
        np.minimum.at(label, ra, smaller)
        np.minimum.at(label, rb, smaller)
