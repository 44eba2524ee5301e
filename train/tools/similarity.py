"""Searches over the cosines of unit embeddings made in blocks, never as one N x N matrix, and the
connected components of the pairs they find: shared by ``clean`` (class pairs alike enough to be one
identity) and ``cluster`` (each face's nearest neighbours); and the search of probe faces among a
gallery's people (``search``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch


def cosine_blocks(unit: torch.Tensor, *, device, rows: int = 2048, columns: int = 65536,
                  column_ends: np.ndarray | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(first row, first column, cosines) of the blocks of ``unit @ unit.T`` ((N, D) unit vectors) on
    or right of the diagonal, ``rows`` x ``columns`` at most, made on ``device``: each pair (i, j),
    i < j, lies in one block (a block on the diagonal holds some pairs j <= i too, which the caller
    masks). ``column_ends`` ((N,) ints): only the pairs j < column_ends[i] are wanted, and the blocks
    right of every one of their rows' are not made; those made are the same blocks, bit for bit."""
    unit = unit.to(device, torch.float32)
    for start in range(0, len(unit), rows):
        block = unit[start:start + rows]
        last = len(unit) if column_ends is None else int(np.max(column_ends[start:start + rows]))
        for first in range(start, last, columns):
            yield start, first, block @ unit[first:first + columns].T


def nearest_neighbours(unit: torch.Tensor, k: int, threshold: float, *, device, rows: int = 2048,
                       columns: int = 16384, log=None) -> tuple[np.ndarray, np.ndarray]:
    """Each of the (N, D) unit vectors' ``k`` nearest others by cosine among those at ``threshold`` or
    above: ((N, k) int64 indices, -1 where fewer are; (N, k) float32 cosines, most alike first, -inf
    where fewer are). Each pair's cosine is made once (:func:`cosine_blocks`) and offered to both.
    A block with no cosine at the threshold costs one maximum; one with few (a face's own people
    among many others) gives them as a list, one with many is searched whole. ``log`` (a callable)
    is told the share of the pairs done every 30 s."""
    index, best, _ = nearest_neighbours_and_duplicates(unit, k, threshold, None, device=device, rows=rows,
                                                       columns=columns, log=log)
    return index, best


def nearest_neighbours_and_duplicates(unit: torch.Tensor, k: int, threshold: float,
                                      duplicate_threshold: float | None, *, device, rows: int = 2048,
                                      columns: int = 16384, log=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`nearest_neighbours`, and in the same pass the groups of vectors joined by pairs at
    ``duplicate_threshold`` or above (at least ``threshold``; None: none looked for): (indices, cosines,
    (N,) each vector's group as the smallest vector in it). Each block's pairs are cut to a forest
    joining what they join before they are kept, so that a group of many copies costs no more than
    its vectors."""
    if duplicate_threshold is not None and duplicate_threshold < threshold:
        raise ValueError(f"duplicate_threshold {duplicate_threshold} is below threshold {threshold}: the blocks below "
                         "the threshold are skipped")
    n = len(unit)
    joined_a, joined_b = [], []
    pairs, done, reported = n * (n - 1) / 2, 0, time.monotonic()
    best = torch.full((n, k), -torch.inf)
    index = torch.full((n, k), -1, dtype=torch.int64)

    def offer(nodes: torch.Tensor, values: torch.Tensor, neighbours: torch.Tensor) -> None:
        """Candidates (values, neighbours: (len(nodes), m), -inf where none) for distinct ``nodes``."""
        values = torch.cat([best[nodes], values], dim=1)
        neighbours = torch.cat([index[nodes], neighbours], dim=1)
        values, order = values.topk(k, dim=1)
        best[nodes] = values
        index[nodes] = torch.where(values > -torch.inf, neighbours.gather(1, order), -1)

    def offer_listed(nodes: np.ndarray, neighbours: np.ndarray, values: np.ndarray) -> None:
        """Candidates as a list of (node, neighbour, value): each node's k best offered."""
        order = np.lexsort((-values, nodes))  # by node, each node's best first
        nodes, neighbours, values = nodes[order], neighbours[order], values[order]
        new = np.r_[True, nodes[1:] != nodes[:-1]]
        slot = np.cumsum(new) - 1
        rank = np.arange(len(nodes)) - np.flatnonzero(new)[slot]
        kept = rank < k
        grid = np.full((int(new.sum()), k), -np.inf, dtype=np.float32)
        grid_neighbours = np.full(grid.shape, -1, dtype=np.int64)
        grid[slot[kept], rank[kept]] = values[kept]
        grid_neighbours[slot[kept], rank[kept]] = neighbours[kept]
        offer(torch.from_numpy(nodes[new]), torch.from_numpy(grid), torch.from_numpy(grid_neighbours))

    for start, first, cosines in cosine_blocks(unit, device=device, rows=rows, columns=columns):
        done += cosines.numel()
        if log is not None and time.monotonic() - reported > 30:
            reported = time.monotonic()
            log(f"compared {min(1.0, done / max(1.0, pairs)):.0%} of the {int(pairs):,} pairs of faces")
        if first == start:  # on the diagonal: only the pairs j > i, right of it
            square = min(len(cosines), cosines.shape[1])
            below = torch.ones(square, square, dtype=torch.bool, device=cosines.device).tril()
            cosines[:, :square].masked_fill_(below, -torch.inf)
        top = cosines.amax()
        if top < threshold:  # (a maximum is cheaper than a mask)
            continue
        if duplicate_threshold is not None and top >= duplicate_threshold:
            i, j = torch.nonzero(cosines >= duplicate_threshold, as_tuple=True)
            nodes, root = _forest(i.cpu().numpy() + start, j.cpu().numpy() + first)
            joined_a.append(nodes)
            joined_b.append(root)
        i, j = torch.nonzero(cosines >= threshold, as_tuple=True)
        if len(i) <= 4 * k * (len(cosines) + cosines.shape[1]):
            values = cosines[i, j].cpu().numpy()
            i, j = i.cpu().numpy() + start, j.cpu().numpy() + first
            offer_listed(i, j, values)
            offer_listed(j, i, values)
            continue
        # Many: each row's k best columns, and each column's k best rows, of the rows and columns that have any.
        hit_rows, hit_columns = torch.unique(i), torch.unique(j)
        cosines = cosines[hit_rows][:, hit_columns]
        cosines = cosines.masked_fill(cosines < threshold, -torch.inf)
        values, at = cosines.topk(min(k, cosines.shape[1]), dim=1)
        offer(hit_rows.cpu() + start, values.cpu(), (hit_columns[at] + first).cpu())
        values, at = cosines.topk(min(k, cosines.shape[0]), dim=0)
        offer(hit_columns.cpu() + first, values.T.cpu(), (hit_rows[at.T] + start).cpu())
    if joined_a:
        group = connected_components(n, np.concatenate(joined_a), np.concatenate(joined_b))
    else:
        group = np.arange(n)
    return index.numpy(), best.numpy(), group


def _forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (each node, the smallest node joined to it) that join what the edges (a, b) join: as
    many as their nodes, however many the edges."""
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    return nodes, nodes[connected_components(len(nodes), inverse[:len(a)], inverse[len(a):])]


def nearest_neighbours_among(unit: torch.Tensor, queries: np.ndarray, k: int, threshold: float, *, device,
                             rows: int = 2048, columns: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`nearest_neighbours` gives for the rows ``queries`` (indices) of the (N, D) unit
    vectors alone: each one's ``k`` nearest other rows at ``threshold`` or above ((Q, k) indices, -1
    where fewer are; (Q, k) float32 cosines, -inf where fewer are), for a few rows whose neighbours
    must be found again (len(queries) x N cosines, in blocks of ``rows`` x ``columns``)."""
    unit = unit.to(device, torch.float32)
    queries = torch.as_tensor(queries, dtype=torch.int64).to(device)
    index = np.full((len(queries), k), -1, dtype=np.int64)
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start in range(0, len(queries), rows):
        asked = queries[start:start + rows]
        values = torch.full((len(asked), k), -torch.inf, device=device)
        found = torch.full((len(asked), k), -1, dtype=torch.int64, device=device)
        for first in range(0, len(unit), columns):
            cosines = unit[asked] @ unit[first:first + columns].T
            own = asked - first
            inside = torch.nonzero((own >= 0) & (own < cosines.shape[1])).flatten()
            cosines[inside, own[inside]] = -torch.inf  # not its own neighbour
            cosines.masked_fill_(cosines < threshold, -torch.inf)
            top, at = cosines.topk(min(k, cosines.shape[1]), dim=1)
            values, order = torch.cat([values, top], dim=1).topk(k, dim=1)
            found = torch.cat([found, at + first], dim=1).gather(1, order)
        found = torch.where(values > -torch.inf, found, -1)
        index[start:start + len(asked)], best[start:start + len(asked)] = found.cpu().numpy(), values.cpu().numpy()
    return index, best


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


def best_people(probes: torch.Tensor, gallery: torch.Tensor, person: torch.Tensor, people: int, k: int, *,
                device, mates: torch.Tensor | None = None, cosines: int = 1 << 25
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` people most alike to each of the (P, D) unit ``probes`` among the (G, D) unit ``gallery``
    rows, row g of person ``person[g]`` (0 to ``people`` - 1, each with a row at least), a person scoring
    the cosine of their best row: ((P, k) people, (P, k) float32 cosines, most alike first; (P,) the rank
    of each probe's mate ``mates[p]`` (-1: none) among the people, 1 + the others scoring at least as high,
    so that a tie counts against the mate; 0 without a mate). The cosines are made on ``device`` in
    blocks of whole gallery rows, at most ``cosines`` of them a block, never as one P x G matrix."""
    k = min(k, people)
    gallery = gallery.to(device, torch.float32)
    person = person.to(device, torch.int64)
    one_a_person = len(gallery) == people and bool((person == torch.arange(people, device=device)).all())
    rows = max(1, min(4096, cosines // max(len(gallery), people)))
    found = np.empty((len(probes), k), dtype=np.int64)
    values = np.empty((len(probes), k), dtype=np.float32)
    ranks = np.zeros(len(probes), dtype=np.int64)
    for start in range(0, len(probes), rows):
        block = probes[start:start + rows].to(device, torch.float32) @ gallery.T
        if not one_a_person:  # each person's best row
            block = torch.full((len(block), people), -torch.inf, device=device).scatter_reduce_(
                1, person.expand(len(block), -1), block, "amax")
        top, at = block.topk(k, dim=1)
        values[start:start + len(block)], found[start:start + len(block)] = top.cpu().numpy(), at.cpu().numpy()
        if mates is not None:
            mate = mates[start:start + len(block)].to(device)
            mated = torch.nonzero(mate >= 0).flatten()
            mate_score = block[mated, mate[mated]]
            ranks[start + mated.cpu().numpy()] = (block[mated] >= mate_score[:, None]).sum(dim=1).cpu().numpy()
    return found, values, ranks
