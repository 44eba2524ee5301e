"""``python -m train.tools.roc``: 1:1 verification on your own labelled faces. Every pair of faces of one
person (genuine) and of two people (impostor) scored with a trained model: the threshold and true accept
rate at each false accept rate, the equal error rate, the ROC curve, and the pairs that fail.

    python -m train.tools.roc --model runs/r50/checkpoint.pt --images people/ --save-embeddings people.npy
    python -m train.tools.roc --embeddings people.npy --far 1e-4 --output roc.csv

The faces are an ImageFolder of aligned faces, ``people/<person>/<image>`` (a face's first folder is its
person; any nesting below it), embedded as ``train.embed`` embeds them (image + mirror, unit length); photos
with ``--landmarks`` or ``--detector`` as ``train.embed`` takes them (each photo's main face); or a table
``train.embed --images people/`` or ``--save-embeddings`` wrote (``--embeddings``: its rows are read, not
embedded). Every pair (i, j), i < j, is scored as the cosine of the two unit embeddings, in blocks, never as
the N x N matrix. A pair is accepted when its cosine is strictly above the threshold, as ``train.ijb``
accepts them: at FAR f of N impostor pairs the threshold is the (k+1)-th highest impostor cosine, k =
floor(f x N), the lowest that accepts at most k of them; a FAR below 1/N is not measurable (-, null).
Impostor pairs are counted in a histogram of 65,536 bins (2^-15 wide, a third of the 4-decimal step
thresholds are given in) beside their exact ``TOP_IMPOSTORS`` highest cosines, and genuine pairs in one of
the same bins beside their exact ``LOWEST_GENUINE`` lowest cosines (12 bytes a pair kept, whatever the
collection's size): the thresholds of the small FARs (every FAR, when the impostor pairs are that few) are
exact, those of larger FARs on a collection with more impostor pairs are bin edges; where the genuine pairs
are more than are kept, a threshold at or above the highest genuine cosine kept is the upper edge of its bin
too. At a bin edge the TAR and false accepts are exact for that edge (a threshold at most one bin above the
exact one).

Outputs: ``--output`` (``roc.csv``: the curve, far,threshold,tar,... at 200 log-spaced FARs and 1e-6 ...
1e-1), the summary beside it (``roc.json``: the counts, TAR and threshold at each FAR, the EER, the
operating point of ``--far``, what the model's recorded 1:1 threshold gives, the model's digests), and
the pairs that fail: ``roc-impostors.csv`` (the ``--pairs`` highest-scoring impostor pairs: the same
person filed under two names, or one photo under both, flagged ``duplicate`` at cosine 0.99 or more),
``roc-genuine.csv`` (the lowest-scoring genuine pairs: a wrong label, a bad crop) and ``roc-people.csv``
(per person, the lowest genuine pair, and the genuine pairs rejected and the impostor pairs accepted at the
operating threshold: the rejected ones counted exactly, in a second pass over the genuine pairs where every
genuine pair kept is rejected; the accepted ones left blank where the threshold lies below the impostors kept).
``--plot roc.png`` draws the curve against a log FAR axis (needs matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

from train.signals import run_tool, signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "roc: "):
    import numpy as np
    import torch

    from train import checkpoint
    from train.embed import (MODEL_HELP, check_table_output, embed_folder, embed_listed_faces, faces_described,
                             folder_images, listed_faces, load_model, model_digests, model_threshold, open_detector,
                             set_amp, table_files, write_table)
    from train.ijb import (FARS, allowed_passes, curve_rates, far_key, format_table, negatives_needed,
                           threshold_allowing)
    from train.tools import (ArgumentParser, add_detector_option, add_embedding_options, check_embedding_options,
                             check_images_folder, check_outputs, check_photo_options, count_of, left_out_said, path_arg,
                             plain_warnings, summary_path, torch_device)
    from train.tools.cluster import DEFAULT_DUPLICATE_COSINE
    from train.tools.search import Faces, _check_made_with, _read_faces, cosine_above, first_folder
    from train.tools.similarity import cosine_blocks

DEFAULT_FAR = 1e-3
DEFAULT_PAIRS = 100
# The histograms of impostor and genuine cosines: bins 2^-15 wide over [-1, 1], bin b holding (edge(b) - 2^-15,
# edge(b)], edge(b) = (b + 1) / 2^15 - 1. A float32 cosine x falls in bin ceil(x * 2^15) + 2^15 - 1, computed
# exactly (a power of two scales a float32 without rounding), so the pairs strictly above an edge are exactly
# the counts of the bins above it. 2^-15 (3.1e-5) is a third of the 4-decimal step a threshold is given in.
SCALE = 1 << 15
BINS = 2 * SCALE
# The impostor cosines kept exactly, the highest (12 bytes each, with the pair): thresholds at FARs that allow
# fewer false accepts than this are exact; 2^20 covers FAR 1e-4 on 100,000 faces (5e9 pairs).
TOP_IMPOSTORS = 1 << 20
# The genuine cosines kept exactly, the lowest (12 bytes each, with the pair): the TAR at any threshold below
# the highest of them is exact, and so are the people's rejected pairs there (above it, they are counted in a
# second pass over the genuine pairs); 2^20 keeps every genuine pair of 100,000 faces of 10 a person (500,000
# pairs), or of one person's 1,448 faces.
LOWEST_GENUINE = 1 << 20
# The blocks of cosines, rows x columns (made on the device), taken STRIP rows at a time: the pass over every
# pair and the second one over the genuine pairs make the same blocks, so the same cosines bit for bit (a
# matrix product of another shape may round a cosine otherwise).
BLOCK_ROWS, BLOCK_COLUMNS, STRIP = 2048, 8192, 512


def bin_edge(b) -> np.ndarray:
    """The upper edge of histogram bin ``b`` (an int or array): the cosine whose pairs above it are
    those of the bins above ``b``."""
    return (np.asarray(b, dtype=np.float64) + 1) / SCALE - 1


def bin_of(cosine: float) -> int:
    """The histogram bin ``cosine`` falls in (the one whose upper edge is at or above it)."""
    return int(min(max(math.ceil(cosine * SCALE) + SCALE - 1, 0), BINS - 1))


def _above_edges(counts: np.ndarray) -> np.ndarray:
    """(BINS,): the pairs strictly above each bin's upper edge, of a histogram's ``counts``."""
    return np.concatenate([np.cumsum(counts[::-1])[::-1][1:], [0]])


def _edge_bins(thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the positions among ``thresholds`` (float64) that are bin edges, their bins)."""
    b = np.rint((thresholds + 1) * SCALE).astype(np.int64) - 1
    edge = (b >= 0) & (b < BINS)
    edge[edge] = bin_edge(b[edge]) == thresholds[edge]
    return np.flatnonzero(edge), b[edge]


class PairScores:
    """What the pass over every pair leaves. The impostor pairs: their number, the (BINS,) histogram of
    their cosines, their ``top`` highest cosines (descending) with their rows, exactly. The genuine pairs:
    their number, the (BINS,) histogram of their cosines, their lowest cosines (``genuine``, in the order
    the pass met them) with their rows (``genuine_pairs``), exactly, and each person's lowest one
    (``lowest``, ``lowest_pairs``, in the order of the people; NaN and -1 for a person without one).
    ``at_least`` and ``genuine_at_least``: for each cosine watched, the impostor and genuine pairs at or
    above it, counted exactly in the pass."""

    def __init__(self, *, impostors: int, counts, top, top_pairs, at_least: dict, genuine_count: int,
                 genuine_counts, genuine, genuine_pairs, genuine_at_least: dict, lowest, lowest_pairs):
        self.impostors, self.counts, self.top, self.top_pairs, self.at_least = impostors, counts, top, top_pairs, \
            at_least
        self.genuine_count, self.genuine_counts, self.genuine, self.genuine_pairs = genuine_count, genuine_counts, \
            genuine, genuine_pairs
        self.genuine_at_least, self.lowest, self.lowest_pairs = genuine_at_least, lowest, lowest_pairs
        self.genuine_sorted = np.sort(genuine.astype(np.float64))
        self.top_ascending = top[::-1].astype(np.float64)
        self.above_edge = _above_edges(counts)
        self.genuine_above_edge = _above_edges(genuine_counts)

    @property
    def exact(self) -> bool:
        """Whether every impostor cosine is kept (every threshold is then exact)."""
        return len(self.top) == self.impostors

    @property
    def genuine_exact(self) -> bool:
        """Whether every genuine cosine is kept (the TAR at every threshold is then exact)."""
        return len(self.genuine) == self.genuine_count

    def false_accepts(self, threshold: float) -> int | None:
        """Impostor pairs strictly above ``threshold``; None where that is not known exactly (a cosine
        below the lowest one kept that is not a bin edge)."""
        count = int(self.false_accepts_of(np.array([threshold], dtype=np.float64))[0])
        return None if count < 0 else count

    def false_accepts_of(self, thresholds: np.ndarray) -> np.ndarray:
        """:meth:`false_accepts` of each of ``thresholds`` (float64), -1 where it is not known."""
        found = np.full(len(thresholds), -1, dtype=np.int64)
        kept = np.ones(len(thresholds), dtype=bool) if self.exact else \
            thresholds >= (self.top_ascending[0] if len(self.top) else math.inf)
        found[kept] = len(self.top) - np.searchsorted(self.top_ascending, thresholds[kept], side="right")
        found[thresholds == -math.inf] = self.impostors
        rest = np.flatnonzero(~kept & (thresholds > -math.inf))
        at, b = _edge_bins(thresholds[rest])
        found[rest[at]] = self.above_edge[b]
        return found

    def true_accepts(self, threshold: float) -> int | None:
        """Genuine pairs strictly above ``threshold``; None where that is not known exactly (a cosine at or
        above the highest genuine one kept, where not every one is, that is not a bin edge)."""
        count = int(self.true_accepts_of(np.array([threshold], dtype=np.float64))[0])
        return None if count < 0 else count

    def true_accepts_of(self, thresholds: np.ndarray) -> np.ndarray:
        """:meth:`true_accepts` of each of ``thresholds`` (float64), -1 where it is not known."""
        found = np.full(len(thresholds), -1, dtype=np.int64)
        # Below the highest genuine cosine kept, every one at or below the threshold is kept.
        kept = np.ones(len(thresholds), dtype=bool) if self.genuine_exact else \
            (thresholds < (self.genuine_sorted[-1] if len(self.genuine) else -math.inf)) | (thresholds == -math.inf)
        found[kept] = self.genuine_count - np.searchsorted(self.genuine_sorted, thresholds[kept], side="right")
        rest = np.flatnonzero(~kept)
        at, b = _edge_bins(thresholds[rest])
        found[rest[at]] = self.genuine_above_edge[b]
        return found

    def rejected_known(self, threshold: float) -> bool:
        """Whether every genuine pair at or below ``threshold`` is among those kept (each person's
        rejected pairs are then counted from them, not in :func:`rejected_of_people`'s second pass)."""
        return self.genuine_exact or threshold == -math.inf or bool(
            len(self.genuine) and threshold < self.genuine_sorted[-1])

    def threshold_at(self, far: float) -> tuple[float, bool] | None:
        """(the lowest threshold that accepts at most floor(far x N) of the N impostor pairs, whether it is
        that exact cosine rather than the upper edge of its histogram bin); None where floor(far x N) is 0.
        ``train.ijb.threshold_allowing`` where every impostor is kept, and its count otherwise. Where the
        genuine pairs above that cosine are not known (it lies among the genuine cosines not kept), the
        upper edge of its bin, where they are."""
        found = self._impostor_threshold(far)
        if found is None or self.true_accepts(found[0]) is not None:
            return found
        return float(bin_edge(bin_of(found[0]))), False

    def _impostor_threshold(self, far: float) -> tuple[float, bool] | None:
        if self.exact:
            threshold = threshold_allowing(self.top_ascending, far)
            return None if threshold is None else (threshold, True)
        allowed = allowed_passes(far, self.impostors)
        if allowed < 1:
            return None
        if allowed >= self.impostors:
            return -math.inf, True
        if allowed < len(self.top):
            return float(self.top[allowed]), True
        # The lowest edge with at most `allowed` impostors above it: the exact threshold lies in its bin.
        b = int(np.searchsorted(-self.above_edge, -allowed, side="left"))
        return float(bin_edge(b)), False

    def rates_at(self, fars) -> list[dict]:
        """For each FAR: {'far', 'tar', 'threshold', 'exact', 'false_accepts', 'true_accepts'}, as
        ``train.ijb.tar_at_far`` gives them (tar and threshold None where the FAR is not measurable)."""
        rows = []
        for far in fars:
            found = self.threshold_at(far)
            if found is None:
                rows.append({"far": far, "tar": None, "threshold": None, "exact": None, "false_accepts": None,
                             "true_accepts": None})
                continue
            threshold, exact = found
            accepted = self.true_accepts(threshold)
            rows.append({"far": far, "tar": accepted / self.genuine_count, "threshold": threshold, "exact": exact,
                         "false_accepts": self.false_accepts(threshold), "true_accepts": accepted})
        return rows

    def equal_error(self) -> dict:
        """The equal error rate: the lowest rate r at which one threshold keeps both the false accept rate
        (impostor pairs above it) and the false reject rate (genuine pairs at or below it) at or below r;
        the lowest such threshold among those where both are known exactly (-inf, every cosine kept, each
        bin edge), and the two rates there."""
        candidates = [[-math.inf], self.top_ascending, self.genuine_sorted]
        if not (self.exact and self.genuine_exact):
            candidates.append(bin_edge(np.arange(BINS)))
        t = np.unique(np.concatenate(candidates))
        false_accepts, true_accepts = self.false_accepts_of(t), self.true_accepts_of(t)
        known = (false_accepts >= 0) & (true_accepts >= 0)
        t, false_accepts = t[known], false_accepts[known]
        false_rejects = self.genuine_count - true_accepts[known]
        far, frr = false_accepts / self.impostors, false_rejects / self.genuine_count
        at = int(np.argmin(np.maximum(far, frr)))  # (the first: the lowest threshold)
        return {"rate": float(max(far[at], frr[at])), "threshold": _cosine(t[at]), "far": float(far[at]),
                "frr": float(frr[at]), "false_accepts": int(false_accepts[at]),
                "false_rejects": int(false_rejects[at])}


class _Kept:
    """The ``size`` highest (or lowest) of a stream of cosines, with their pairs, exactly; among equal
    cosines the first to come. Held in arrays made once, room for 2 x ``size`` and what one :meth:`add`
    brings (its pages taken as they are filled): kept in arrays made anew at each add, they would be freed
    into the allocator's heap and much of it kept from the system."""

    def __init__(self, size: int, highest: bool):
        self.size, self.highest, self.held = size, highest, 0
        self.cosines, self.pairs = np.empty(3 * size, np.float32), np.empty((3 * size, 2), np.int32)
        # Once `size` are held: a cosine not beyond it is not kept (one equal to it came after those kept).
        self.bound = (-math.inf if highest else math.inf) if size else (math.inf if highest else -math.inf)

    def add(self, cosines: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        count = len(cosines)
        if self.held + count > len(self.cosines):  # (more at once than `size`: a strip's genuine pairs)
            self._prune()
            if self.held + count > len(self.cosines):
                self.cosines = np.concatenate([self.cosines[:self.held], np.empty(count, np.float32)])
                self.pairs = np.concatenate([self.pairs[:self.held], np.empty((count, 2), np.int32)])
        held = slice(self.held, self.held + count)
        self.cosines[held], self.pairs[held, 0], self.pairs[held, 1] = cosines, a, b
        self.held += count
        if self.held > 2 * self.size:
            self._prune()

    def _prune(self) -> None:
        size, cosines = min(self.size, self.held), self.cosines[:self.held]
        if size == self.held:
            return
        if size == 0:
            self.held = 0
            return
        kth = np.partition(cosines, self.held - size if self.highest else size - 1)[
            self.held - size if self.highest else size - 1]
        chosen = cosines > kth if self.highest else cosines < kth
        chosen[np.flatnonzero(cosines == kth)[:size - int(np.count_nonzero(chosen))]] = True
        chosen = np.flatnonzero(chosen)
        self.cosines[:size], self.pairs[:size] = cosines[chosen], self.pairs[chosen]
        self.held, self.bound = size, float(kth)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, (K, 2) int32 pairs) of those kept, in the order they came."""
        if self.held > self.size:
            self._prune()
        return self.cosines[:self.held].copy(), self.pairs[:self.held].copy()


def _bins(cosines: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The histogram bins (int32, in ``out`` where given) of ``cosines``, computed in their place (they are
    overwritten); those below -1 (and -inf) in bin 0, those above 1 in the last."""
    cosines.mul_(SCALE).ceil_().clamp_(1 - SCALE, SCALE).add_(SCALE - 1)
    return cosines.to(torch.int32) if out is None else out.copy_(cosines)


def score_pairs(unit: torch.Tensor, person: np.ndarray, *, device="cpu", keep: int = TOP_IMPOSTORS,
                keep_genuine: int = LOWEST_GENUINE, watch=(), rows: int = BLOCK_ROWS, columns: int = BLOCK_COLUMNS,
                strip: int = STRIP, log=None) -> PairScores:
    """Every pair (i, j), i < j, of the (N, D) unit embeddings, whose people ``person`` (N,) are sorted
    (non-decreasing), scored by its cosine in blocks of ``rows`` x ``columns`` made on ``device`` and
    taken ``strip`` rows at a time: the impostor pairs (two people) and the genuine pairs (one person)
    counted in histograms (:class:`PairScores`), the ``keep`` highest impostor and ``keep_genuine``
    lowest genuine cosines kept with their pairs, each person's lowest genuine pair kept, and the pairs
    of each kind at or above each cosine of ``watch`` counted. ``log`` (a callable) is told the share of
    the pairs done every 30 s."""
    n = len(unit)
    person = np.asarray(person)
    if n and np.any(np.diff(person) < 0):
        raise ValueError("score_pairs: the rows must be sorted by person")
    columns = max(rows, columns)
    # A row's pairs with the faces of its person, and those with the faces before it (the pairs j <= i), are
    # the columns before the end of its person's faces: a prefix of its columns in every block.
    end = np.searchsorted(person, person, side="right")
    of_person = np.concatenate([[0], np.cumsum(np.diff(person) != 0)]) if n else np.empty(0, np.int64)
    people = int(of_person[-1]) + 1 if n else 0
    lowest = np.full(people, np.nan, dtype=np.float32)
    lowest_pairs = np.full((people, 2), -1, dtype=np.int32)
    column_at = torch.arange(columns, device=device)[None, :]
    # A strip's masks, its bins and its genuine cosines (for their rows' lowest) are made in these, made once:
    # made anew for each strip, they would be freed into the allocator's heap and much of it kept from the
    # system (hundreds of MB on 100,000 faces).
    size = min(strip, rows, n) * min(columns, n)
    masks = torch.empty(3, size, dtype=torch.bool, device=device)
    bins = torch.empty(size, dtype=torch.int32, device=device)  # (before them, as float32: the genuine ones)
    counts = torch.zeros(BINS + 1, dtype=torch.int64, device=device)  # (the last: the pairs left out)
    genuine_counts = torch.zeros(BINS, dtype=torch.int64, device=device)
    at_least, genuine_at_least = {t: 0 for t in watch}, {t: 0 for t in watch}
    top, low = _Kept(keep, highest=True), _Kept(keep_genuine, highest=False)
    genuine_count = 0
    pairs, done, reported = n * (n - 1) / 2, 0, time.monotonic()

    for start, first, cosines in cosine_blocks(unit, device=device, rows=rows, columns=columns):
        done += cosines.numel()
        if log is not None and time.monotonic() - reported > 30:
            reported = time.monotonic()
            log(f"compared {min(1.0, done / max(1.0, pairs)):.0%} of the {int(pairs):,} pairs of faces")
        c = cosines.shape[1]
        for at in range(0, len(cosines), strip):
            part = cosines[at:at + strip]  # (a view: its rows start + at, ...)
            row, h = start + at, len(part)
            scratch = [buffer[:h * c].view(h, c) for buffer in (*masks, bins, bins.view(torch.float32))]
            prefix = None
            if end[row + h - 1] > first:  # some rows have pairs left out or genuine here
                genuine_start, prefix_end = _genuine_columns(end, row, h, first, c)
                prefix = torch.lt(column_at[:, :c], torch.from_numpy(prefix_end).to(device)[:, None], out=scratch[0])
                if np.any(prefix_end > genuine_start):
                    genuine = torch.ge(column_at[:, :c], torch.from_numpy(genuine_start).to(device)[:, None],
                                       out=scratch[1]).logical_and_(prefix)
                    genuine_count += _genuine(part, genuine, row, first, low, genuine_at_least, genuine_counts,
                                              of_person, lowest, lowest_pairs, scratch[2], scratch[4])
                part.masked_fill_(prefix, -math.inf)
            best = float(part.amax())
            for t in at_least:
                if best >= t:
                    at_least[t] += int(torch.count_nonzero(torch.ge(part, t, out=scratch[2])))
            if keep and best > top.bound:
                above = torch.gt(part, top.bound, out=scratch[2])
                if int(torch.count_nonzero(above)) > keep:  # (a strip larger than `keep`)
                    values, index = part.flatten().topk(keep)
                    i, j = index // c, index % c
                else:
                    i, j = torch.nonzero(above, as_tuple=True)
                    values = part[i, j]
                top.add(values.cpu().numpy(), (i + row).cpu().numpy(), (j + first).cpu().numpy())
            # The histogram, in place of the cosines (not needed after this).
            b = _bins(part, out=scratch[3])
            if prefix is not None:
                b.masked_fill_(prefix, BINS)
            counts += torch.bincount(b.flatten(), minlength=BINS + 1)
    top_values, top_pairs = top.result()
    if len(top_values):  # descending, as topk orders them
        top_values, order = torch.from_numpy(top_values).topk(len(top_values))
        top_values, top_pairs = top_values.numpy(), top_pairs[order.numpy()]
    genuine, genuine_pairs = low.result()
    return PairScores(impostors=n * (n - 1) // 2 - genuine_count, counts=counts[:BINS].cpu().numpy(), top=top_values,
                      top_pairs=top_pairs, at_least=at_least, genuine_count=genuine_count,
                      genuine_counts=genuine_counts.cpu().numpy(), genuine=genuine, genuine_pairs=genuine_pairs,
                      genuine_at_least=genuine_at_least, lowest=lowest, lowest_pairs=lowest_pairs)


def _genuine_columns(end: np.ndarray, row: int, h: int, first: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(h,) each, the columns of rows ``row``, ..., ``row + h - 1`` in a block of ``c`` columns from
    ``first`` that hold their genuine pairs, from the first to the end (past the last): a row's pairs
    (i, j), i < j < ``end[i]``, its person's end (its people sorted). The pairs before the end, j <= i
    as well, are those before the second."""
    return (np.clip(np.arange(row, row + h) + 1 - first, 0, c), np.clip(end[row:row + h] - first, 0, c))


def rejected_of_people(unit: torch.Tensor, person: np.ndarray, threshold: float, *, device="cpu",
                       rows: int = BLOCK_ROWS, columns: int = BLOCK_COLUMNS, strip: int = STRIP,
                       log=None) -> np.ndarray:
    """(person[-1] + 1,) int64: each person's genuine pairs (i, j), i < j, of the (N, D) unit embeddings,
    whose people ``person`` are sorted, at or below ``threshold`` (those a threshold rejects), counted
    exactly in a second pass: the blocks :func:`score_pairs` made of the same ``rows``, ``columns`` and
    ``device`` that hold genuine pairs, the same cosines bit for bit, and of each strip only the columns
    of its genuine pairs compared. ``log`` (a callable) is told the share of the blocks done every 30 s."""
    n = len(unit)
    person = np.asarray(person)
    rejected = np.zeros(int(person[-1]) + 1 if n else 0, dtype=np.int64)
    if n < 2:
        return rejected
    columns = max(rows, columns)
    end = np.searchsorted(person, person, side="right")
    blocks = sum(len(range(start, int(end[min(start + rows, n) - 1]), columns)) for start in range(0, n, rows))
    column_at = torch.arange(columns, device=device)[None, :]
    # (made once: made for each strip, they would be freed into the allocator's heap, as score_pairs says)
    masks = torch.empty(2, min(strip, rows, n) * min(columns, n), dtype=torch.bool, device=device)
    done, reported = 0, time.monotonic()
    for start, first, cosines in cosine_blocks(unit, device=device, rows=rows, columns=columns, column_ends=end):
        done += 1
        if log is not None and time.monotonic() - reported > 30:
            reported = time.monotonic()
            log(f"counted the rejected genuine pairs of {done / blocks:.0%} of the {blocks:,} blocks that hold them")
        c = cosines.shape[1]
        for at in range(0, len(cosines), strip):
            row, h = start + at, min(strip, len(cosines) - at)
            genuine_start, genuine_end = _genuine_columns(end, row, h, first, c)
            some = genuine_end > genuine_start
            if not some.any():
                continue
            a, b = int(genuine_start[some].min()), int(genuine_end[some].max())
            hit, inside = (buffer[:h * (b - a)].view(h, b - a) for buffer in masks)
            torch.le(cosines[at:at + h, a:b], threshold, out=hit)
            hit.logical_and_(torch.ge(column_at[:, a:b], torch.from_numpy(genuine_start).to(device)[:, None],
                                      out=inside))
            hit.logical_and_(torch.lt(column_at[:, a:b], torch.from_numpy(genuine_end).to(device)[:, None],
                                      out=inside))
            np.add.at(rejected, person[row:row + h], torch.count_nonzero(hit, dim=1).cpu().numpy())
    return rejected


def _genuine(part: torch.Tensor, genuine: torch.Tensor, row: int, first: int, low: _Kept, at_least: dict,
             counts: torch.Tensor, of_person: np.ndarray, lowest: np.ndarray, lowest_pairs: np.ndarray,
             mask: torch.Tensor, spare: torch.Tensor) -> int:
    """The genuine pairs of ``part`` (rows ``row``, ... and columns ``first``, ...) where ``genuine``:
    counted (histogram ``counts``, ``at_least``), the lowest kept (``low``), each person's lowest one
    (``lowest``, ``lowest_pairs``) updated; their number. ``mask`` and ``spare``: room the shape of
    ``part`` (bool, float32)."""
    values = part[genuine]  # (in the pass's order: row by row)
    for t in at_least:
        at_least[t] += int(torch.count_nonzero(values >= t))
    if len(values) and float(values.min()) < low.bound:
        # Those below the bound, or (a strip of more than are kept) at most its low.size-th lowest: room for the
        # pairs of about that many, not of every genuine pair of a large person's strip.
        below, compare = low.bound, torch.lt
        if len(values) > low.size:
            kth = float(np.partition(values.cpu().numpy(), low.size - 1)[low.size - 1])
            below, compare = (kth, torch.le) if kth < low.bound else (below, compare)
        hit = genuine if below == math.inf else compare(part, below, out=mask).logical_and_(genuine)
        i, j = torch.nonzero(hit, as_tuple=True)
        low.add(part[i, j].cpu().numpy(), (i + row).cpu().numpy(), (j + first).cpu().numpy())
    # Each row's lowest (the first of equal ones), then each person's among the rows (the first row).
    row_lowest, column = torch.where(genuine, part, spare.fill_(math.inf), out=spare).min(1)
    row_lowest, column = row_lowest.cpu().numpy(), column.cpu().numpy()
    rows = np.flatnonzero(row_lowest < math.inf)
    who = of_person[row + rows]
    order = np.lexsort((rows, row_lowest[rows], who))
    who, first_of = np.unique(who[order], return_index=True)
    rows = rows[order[first_of]]
    better = ~(lowest[who] <= row_lowest[rows])  # (NaN: none yet; an equal one came first)
    who, rows = who[better], rows[better]
    lowest[who] = row_lowest[rows]
    lowest_pairs[who] = np.stack([row + rows, first + column[rows]], 1)
    counts += torch.bincount(_bins(values), minlength=BINS)
    return len(values)


def _main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.tools.roc", name="roc", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=path_arg, metavar="DIR",
                        help="an ImageFolder of aligned faces, DIR/<person>/<image> (a face's first folder is its "
                        "person); photos with --landmarks or --detector")
    source.add_argument("--embeddings", type=path_arg, metavar="TABLE",
                        help="a table python -m train.embed --images DIR or --save-embeddings wrote (.npy with its "
                        ".txt, or .csv; a row's first folder is its person): scored without embedding")
    p.add_argument("--model", type=path_arg, default=None,
                   help=MODEL_HELP + "; with --embeddings only for its recorded threshold (default: the model the "
                   "table's .json names, where it still is)")
    p.add_argument("--save-embeddings", type=path_arg, metavar="TABLE", default=None,
                   help="with --images: also write the embeddings as a table (.npy with a .txt, or .csv; a .json "
                   "beside it names the model and its digests), for --embeddings TABLE next time")
    p.add_argument("--landmarks", type=path_arg, metavar="FILE", default=None,
                   help="the images under --images are photos: score the faces this file lists, each aligned from "
                   "its 5 landmarks (as train.embed --landmarks; one face a photo)")
    p.add_argument("--extension", default=None, help="appended to every image path of --landmarks")
    add_detector_option(p, "the images under --images")
    p.add_argument("--far", type=float, default=DEFAULT_FAR, metavar="RATE",
                   help="the false accept rate of the operating threshold, at which the people's rejected genuine "
                   f"pairs are counted (default {DEFAULT_FAR:g})")
    p.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                   help=f"how many of the highest impostor and lowest genuine pairs to list (default {DEFAULT_PAIRS})")
    p.add_argument("--output", type=path_arg, default="roc.csv",
                   help="the ROC curve (a .csv; default roc.csv), with the summary (.json) and the pairs that fail "
                   "(-impostors.csv, -genuine.csv, -people.csv) beside it")
    p.add_argument("--plot", type=path_arg, metavar="FILE", default=None,
                   help="also draw the curve, TAR against a log FAR axis, to FILE (.png, .pdf or .svg; needs "
                   "matplotlib)")
    add_embedding_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output, the files beside it, --plot and --save-embeddings' files when they exist")
    args = p.parse_args(argv)
    check_embedding_options(p, args)
    if args.images and not args.model:
        p.error("--images needs --model, the model that embeds the faces")
    if not 0 < args.far < 1:
        p.error(f"--far is a false accept rate, above 0 and below 1: got {args.far:g}")
    if args.pairs < 0:
        p.error(f"--pairs must be at least 0, got {args.pairs}")
    if not args.output.endswith(".csv"):
        p.error(f"--output names a .csv file, got {args.output}")
    if args.save_embeddings and not args.images:
        p.error("--save-embeddings goes with --images (--embeddings is a table of faces embedded already)")
    check_photo_options(p, args, "--images", " (--embeddings is a table of faces embedded already)")
    if args.plot:
        from train.plots import _pyplot

        if os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg"):
            p.error(f"--plot {args.plot}: a .png, .pdf or .svg file")
        if _pyplot() is None:
            p.error("--plot needs matplotlib (pip install matplotlib, or the [train] extra)")
    args.written = []

    def said(stop) -> str | None:
        if args.written and args.output not in args.written:
            return f": the embeddings' table was written ({', '.join(args.written)}), no results"
        return None

    # Ctrl-C and SIGTERM unwind: the embeddings' table is written whole as soon as the faces are embedded, the
    # results all together.
    return run_tool(lambda: run(args), tool="roc", said=said)


def main(argv: list[str] | None = None) -> int:
    with plain_warnings():
        return _main(argv)


def failing_outputs(output: str) -> dict[str, str]:
    """The files beside ``--output`` that list the pairs that fail."""
    stem = output[:-len(".csv")]
    return {kind: f"{stem}-{kind}.csv" for kind in ("impostors", "genuine", "people")}


def run(args: argparse.Namespace) -> int:
    """``main`` after parsing; raises OSError or ValueError naming the argument or file at fault. The
    inputs, the model and the outputs are checked before any face is embedded."""
    device = torch_device(args.device)
    faces = None
    if args.embeddings:
        if os.path.isdir(args.embeddings):
            raise ValueError(f"--embeddings {args.embeddings} is a folder, not a table: --images {args.embeddings} "
                             "embeds its faces")
        faces = _read_faces("--embeddings", args.embeddings)
    else:
        check_images_folder(args.images)
    model_path = args.model
    if model_path is None and faces is not None and faces.about.get("model"):
        if os.path.isfile(faces.about["model"]):
            model_path = faces.about["model"]
        else:
            print(f"roc: note: {faces.about['model']}, the model the table was made with, is not there any more: its "
                  "recorded threshold is not known", file=sys.stderr)
    model, settings = None, {}
    if model_path:
        model, settings = load_model(model_path, device if args.images else "cpu", args.amp)
        if args.images:
            set_amp(model, args.amp, model_path, device=device)
    if faces is not None and model_path:
        _check_made_with(faces, "--embeddings", args.embeddings, model_path, model, settings, {}, tool="roc")
    outputs = [args.output, summary_path(args.output), *failing_outputs(args.output).values()]
    outputs += [args.plot] if args.plot else []
    if args.save_embeddings:
        check_table_output("--save-embeddings", args.save_embeddings)
        outputs += table_files(args.save_embeddings, about=True)
    if len({os.path.realpath(path) for path in outputs}) < len(outputs):
        raise ValueError(f"--output {args.output}, --plot and --save-embeddings must name different files")
    inputs = (model_path, checkpoint.settings_path(model_path) if model_path else None, args.landmarks,
              args.detector, *(table_files(args.embeddings, about=True) if args.embeddings else ()))
    detector = open_detector(args.detector, device) if args.detector else None
    check_outputs(outputs, args.overwrite, inputs=inputs, image_folders=(args.images,) if args.images else ())

    failures = []
    listed = paths = None
    if faces is None:
        # The faces listed, and their people and the --far they can measure checked, before any is embedded
        # (a face in no folder, one person only, no person with two faces, a --far too low: said once all had
        # been embedded, minutes on). (An image left out later, one that does not decode, counts here.)
        if args.landmarks:
            listed = listed_faces(args.images, args.landmarks, extension=args.extension)
            names = listed.names
        else:
            paths, names = folder_images(args.images, failures)
        people, person = people_of(names, "--images", args.images)
        impostor_pairs(args, person, len(people))
        faces = _embed(args, model, settings, device, detector, failures, paths, names, listed)
        if args.save_embeddings:
            about = {"made_by": "train.tools.roc", "model": os.path.abspath(model_path),
                     **model_digests(model_path, model), "image_size": settings["image_size"], "flip": True,
                     "amp": getattr(model, "amp", "none"), "normalised": True, "images": os.path.abspath(args.images),
                     "faces": faces_described(args.landmarks, args.detector)}
            with signals_held():
                args.written += write_table(args.save_embeddings, faces.names, faces.embeddings, about=about)
            print(f"roc: wrote {', '.join(args.written)}", file=sys.stderr)
            faces.about = about
        else:
            faces.about = {"model": os.path.abspath(model_path), **model_digests(model_path, model),
                           "faces": faces_described(args.landmarks, args.detector)}
    try:
        return _verify(args, faces, model_path, settings, device, failures)
    except (OSError, ValueError) as error:
        if not args.written:
            raise
        raise type(error)(f"{error} (the embeddings' table was written: {', '.join(args.written)}; --embeddings "
                          f"{args.save_embeddings} scores it without embedding the faces again)") from None


def _embed(args, model, settings: dict, device, detector, failures: list[str], paths: list[str] | None,
           names: list[str], listed) -> Faces:
    """The faces under ``--images`` (aligned crops, or photos with --landmarks, ``listed``, or ``detector``,
    --detector opened; else the images at ``paths``, named ``names``, as ``folder_images`` lists them), embedded
    as ``train.embed`` embeds them; a face that cannot be read is left out (``failures``)."""
    size = settings["image_size"]
    if args.landmarks:
        print(f"roc: embedding the faces {args.landmarks} lists in the photos under {args.images} with {args.model} "
              f"({size}px) on {device}", file=sys.stderr, flush=True)
        names, embeddings = embed_listed_faces(model, args.images, args.landmarks, size, extension=args.extension,
                                               device=device, batch_size=args.batch_size, workers=args.workers,
                                               listed=listed)
        return Faces(names, embeddings, None)
    print(f"roc: embedding {count_of(len(paths), 'photo' if detector else 'image')} under {args.images} with "
          f"{args.model} ({size}px) on {device}", file=sys.stderr, flush=True)
    names, embeddings = embed_folder(model, args.images, paths, names, size, failures=failures, detector=detector,
                                     device=device, batch_size=args.batch_size, workers=args.workers)
    return Faces(names, embeddings, None)


def people_of(faces: list[str], flag: str, source: str) -> tuple[list[str], np.ndarray]:
    """(the people, by name, sorted; (N,) each face's person) of the faces named ``faces``, a face's person
    its first folder. ValueError naming the input when a face is in no folder, when one person only is there
    (no impostor pair), or when no person has two faces (no genuine pair)."""
    names = [first_folder(name) for name in faces]
    if None in names:
        row = names.index(None)
        raise ValueError(f"{flag} {source}: {faces[row]} is in no folder: a face's first folder is its person "
                         f"({flag} people/ holding people/<person>/<image>)")
    people, person = np.unique(names, return_inverse=True)
    if len(people) < 2:
        raise ValueError(f"{flag} {source}: every face is of one person, {people[0]}: no impostor pair (two people's "
                         "faces) to measure a false accept rate with")
    if np.bincount(person).max() < 2:
        raise ValueError(f"{flag} {source}: no person has two faces: no genuine pair (one person's faces) to "
                         "measure a true accept rate with")
    return people.tolist(), person


def impostor_pairs(args, person: np.ndarray, people: int) -> int:
    """How many impostor pairs (two people's faces) the faces of ``person`` (each one's person, of ``people``)
    make; ValueError naming --far when they are too few to measure it."""
    sizes = np.bincount(person, minlength=people)
    n = len(person)
    impostors = n * (n - 1) // 2 - int((sizes * (sizes - 1) // 2).sum())
    if allowed_passes(args.far, impostors) < 1:
        raise ValueError(f"--far {args.far:g}: {impostors:,} impostor pairs measure a FAR of {1 / impostors:.3g} at "
                         f"best (1 of them); {args.far:g} needs {negatives_needed(args.far):,} or more")
    return impostors


def _verify(args, faces: Faces, model_path: str | None, settings: dict, device, failures: list[str]) -> int:
    """Score every pair of ``faces``, whose rows (and names) it sorts by person in their place: the
    embeddings are held once."""
    source = args.embeddings or args.images
    flag = "--embeddings" if args.embeddings else "--images"
    people, person = people_of(faces.names, flag, source)
    sizes = np.bincount(person, minlength=len(people))
    n = len(faces.names)
    # Known from the people's sizes: a --far they cannot measure is refused before the pairs are scored (minutes).
    impostor_pairs(args, person, len(people))
    alone = [people[p] for p in np.flatnonzero(sizes == 1)]
    if alone:
        print(f"roc: note: {count_of(len(alone), 'person', 'people')} with one face ({', '.join(alone[:5])}"
              f"{f' and {len(alone) - 5} more' if len(alone) > 5 else ''}) "
              f"{'contributes' if len(alone) == 1 else 'contribute'} no genuine pair, only impostor pairs",
              file=sys.stderr)
    order = np.argsort(person, kind="stable")
    embeddings = np.ascontiguousarray(faces.embeddings, dtype=np.float32)
    if not embeddings.flags.writeable:
        embeddings = embeddings.copy()
    _permute_rows(embeddings, order)
    faces.names, faces.embeddings = [faces.names[i] for i in order], embeddings
    unit = torch.from_numpy(embeddings)
    sorted_person = person[order]
    model_cosine = model_source = None
    if model_path and "threshold" in settings:
        # (recorded: no default's note; reported, not decided with: one that decides nothing shows it in the rates it
        # gives)
        model_cosine, model_source, note = model_threshold(model_path, settings, None, tool="roc", decides=False)
        if note:  # (of a final verification cut short)
            print(note, file=sys.stderr)
    watch = sorted({DEFAULT_DUPLICATE_COSINE} | ({model_cosine} if model_cosine is not None else set()))
    print(f"roc: scoring the {n * (n - 1) // 2:,} pairs of {count_of(n, 'face')} of "
          f"{count_of(len(people), 'person', 'people')} on {device}", file=sys.stderr, flush=True)
    started = time.monotonic()
    scores = score_pairs(unit, sorted_person, device=device, keep=TOP_IMPOSTORS, keep_genuine=LOWEST_GENUINE,
                         watch=watch,
                         log=lambda message: print(f"roc: {message}", file=sys.stderr, flush=True))
    seconds = time.monotonic() - started
    rates = sorted(set(curve_rates(scores.impostors)) | set(FARS) | {args.far})
    curve = scores.rates_at(rates)
    at = {row["far"]: row for row in curve}
    operating = at[args.far]
    threshold = operating["threshold"]
    eer = scores.equal_error()
    recount_seconds = None
    if scores.rejected_known(threshold):
        of = sorted_person[scores.genuine_pairs[:, 0]] if len(scores.genuine) else np.empty(0, dtype=np.int64)
        rejected = np.bincount(of[scores.genuine <= threshold], minlength=len(people))
    else:  # (every genuine pair kept is rejected: those above them were not kept one by one)
        print(f"roc: the {len(scores.genuine):,} lowest genuine pairs, those kept exactly, are all rejected at FAR "
              f"{args.far:g}: counting each person's rejected pairs in a second pass over the "
              f"{scores.genuine_count:,} genuine pairs", file=sys.stderr, flush=True)
        recount_started = time.monotonic()
        rejected = rejected_of_people(unit, sorted_person, threshold, device=device,
                                      log=lambda message: print(f"roc: {message}", file=sys.stderr, flush=True))
        recount_seconds = time.monotonic() - recount_started
    genuine_rows, impostor_rows, people_rows = _failing(scores, faces.names, people, sorted_person, threshold,
                                                        rejected, args.pairs)
    summary = {
        "made_by": "train.tools.roc",
        "images": os.path.abspath(args.images) if args.images else faces.about.get("images"),
        # (what the rows are: the images as they are, or the faces aligned in photos; a table's .json says it)
        "faces_are": faces.about.get("faces"),
        "embeddings": os.path.abspath(args.embeddings) if args.embeddings else None,
        "model": os.path.abspath(model_path) if model_path else faces.about.get("model"),
        **{key: faces.about[key] for key in ("model_sha256", "model_weights_sha256") if key in faces.about},
        "faces": n, "people": len(people), "people_with_one_face": len(alone), "left_out": len(failures),
        "genuine_pairs": scores.genuine_count, "impostor_pairs": scores.impostors,
        "accept": "cosine strictly above the threshold",
        "impostor_histogram": {"bins": BINS, "width": 1 / SCALE, "exact_highest": len(scores.top),
                               "every_impostor_exact": scores.exact},
        "genuine_histogram": {"bins": BINS, "width": 1 / SCALE, "exact_lowest": len(scores.genuine),
                              "every_genuine_exact": scores.genuine_exact},
        "tar_at_far": {far_key(far): at[far]["tar"] for far in FARS},
        "threshold_at_far": {far_key(far): _cosine(at[far]["threshold"]) for far in FARS},
        "threshold_exact_at_far": {far_key(far): at[far]["exact"] for far in FARS},
        "false_accepts_at_far": {far_key(far): at[far]["false_accepts"] for far in FARS},
        "eer": eer,
        "operating_point": {
            "far": args.far, "threshold": _cosine(threshold), "threshold_exact": operating["exact"],
            "compare_threshold": cosine_above(threshold), "tar": operating["tar"],
            "false_accepts": operating["false_accepts"],
            "genuine_rejected": scores.genuine_count - operating["true_accepts"],
            "people_rejected_known": True},  # (false once, where they were not counted: for scripts that read it)
        "duplicate_cosine": DEFAULT_DUPLICATE_COSINE,
        "impostor_pairs_at_duplicate_cosine": scores.at_least[DEFAULT_DUPLICATE_COSINE],
        "genuine_pairs_at_duplicate_cosine": scores.genuine_at_least[DEFAULT_DUPLICATE_COSINE],
        "seconds": round(seconds, 3), "pairs_per_second": round(n * (n - 1) / 2 / max(seconds, 1e-9)),
        "recount_seconds": None if recount_seconds is None else round(recount_seconds, 3),
    }
    if model_cosine is not None:
        # As train.embed --compare decides with it: the same person at or above it.
        impostors_in = scores.at_least[model_cosine]
        genuine_in = scores.genuine_at_least[model_cosine]
        summary["model_threshold"] = {
            "cosine": round(model_cosine, 6), "from": model_source,
            "accept": "cosine at or above it, as train.embed --compare decides", "far": impostors_in / scores.impostors,
            "false_accepts": impostors_in, "tar": genuine_in / scores.genuine_count}
    summary["outputs"] = [os.path.abspath(path) for path in
                          [args.output, *failing_outputs(args.output).values()] + ([args.plot] if args.plot else [])]
    summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files = failing_outputs(args.output)
    with signals_held():  # the curve, its summary and the failing pairs: all of them or none
        with checkpoint.written_together() as together:
            _write_csv(together, args.output, ["far", "threshold", "tar", "false_accepts", "false_accept_rate",
                                               "true_accepts", "threshold_exact"],
                       [[f"{r['far']:.6g}", _cell(r["threshold"]), _cell(r["tar"]), _cell(r["false_accepts"]),
                         "" if r["false_accepts"] is None else f"{r['false_accepts'] / scores.impostors:.6g}",
                         _cell(r["true_accepts"]), _cell(r["exact"])] for r in curve])
            _write_csv(together, files["impostors"], ["rank", "cosine", "accepted", "duplicate", "image_a", "person_a",
                                                      "image_b", "person_b"], impostor_rows)
            _write_csv(together, files["genuine"], ["rank", "cosine", "rejected", "person", "image_a", "image_b"],
                       genuine_rows)
            _write_csv(together, files["people"], ["person", "faces", "genuine_pairs", "rejected", "rejected_share",
                                                   "false_accepts", "lowest_cosine", "lowest_pair_a", "lowest_pair_b"],
                       people_rows)
            together.write_json(summary_path(args.output), summary)
        args.written += [args.output, summary_path(args.output)]
    drawn = False
    if args.plot:  # after the results, which a failure here must not cost
        from train.plots import plot_ijb

        points = [r for r in curve if r["tar"] is not None]
        try:
            plot_ijb(args.plot, os.path.basename(os.path.normpath(source)), roc=([r["far"] for r in points],
                                                                                [r["tar"] for r in points]))
            drawn = True
        except Exception as error:  # noqa: BLE001 (a full disk, a matplotlib backend's failure)
            print(f"roc: error: could not draw {args.plot}: {error}", file=sys.stderr)
    _report(args, summary, [at[far] for far in FARS], scores, failures, drawn, model_cosine)
    return 1 if failures or (args.plot and not drawn) else 0


def _permute_rows(array: np.ndarray, order: np.ndarray) -> None:
    """``array[:] = array[order]`` in its place, one row at a time along the permutation's cycles: no
    second copy of the table (a table of a million faces is 2 GB)."""
    order = order.tolist()
    placed = [False] * len(order)
    for start, source in enumerate(order):
        if placed[start] or source == start:
            continue
        held, at = array[start].copy(), start
        while order[at] != start:
            array[at] = array[order[at]]
            placed[at], at = True, order[at]
        array[at], placed[at] = held, True


def _cosine(value):
    return None if value is None or value == -math.inf else round(float(value), 6)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-inf" if value == -math.inf else f"{value:.6f}"
    return str(value)


def _write_csv(together: checkpoint.FilesTogether, path: str, header: list[str], rows) -> None:
    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    together.write(path, write, binary=False)


def _failing(scores: PairScores, names: list[str], people: list[str], person: np.ndarray, threshold: float,
             rejected: np.ndarray, count: int) -> tuple[list, list, list]:
    """The rows of the failing pairs' tables: the ``count`` lowest genuine pairs, the ``count`` highest
    impostor pairs (of those kept), and each person's lowest genuine pair, genuine pairs rejected
    (``rejected``, counted at ``threshold``) and impostor pairs accepted (where the threshold lies among
    the impostor cosines kept) at ``threshold``."""
    lowest = np.argsort(scores.genuine, kind="stable")[:count]
    genuine_rows = [[k + 1, f"{scores.genuine[g]:.6f}", _cell(bool(scores.genuine[g] <= threshold)),
                     people[person[scores.genuine_pairs[g, 0]]], names[scores.genuine_pairs[g, 0]],
                     names[scores.genuine_pairs[g, 1]]] for k, g in enumerate(lowest)]
    impostor_rows = []
    for k in range(min(count, len(scores.top))):
        a, b = scores.top_pairs[k]
        cosine = float(scores.top[k])
        impostor_rows.append([k + 1, f"{cosine:.6f}", _cell(cosine > threshold),
                              _cell(cosine >= DEFAULT_DUPLICATE_COSINE), names[a], people[person[a]], names[b],
                              people[person[b]]])
    faces = np.bincount(person, minlength=len(people))
    pairs = faces * (faces - 1) // 2
    false_accepts = None
    if scores.exact or (len(scores.top) and threshold >= scores.top[-1]):
        accepted = scores.top_pairs[scores.top > threshold]
        false_accepts = np.bincount(person[accepted.ravel()], minlength=len(people))
    lowest_cosine = np.full(len(people), np.nan, dtype=np.float32)
    lowest_pairs = np.full((len(people), 2), -1, dtype=np.int64)
    found = scores.lowest_pairs[:, 0] >= 0
    lowest_cosine[person[scores.lowest_pairs[found, 0]]] = scores.lowest[found]
    lowest_pairs[person[scores.lowest_pairs[found, 0]]] = scores.lowest_pairs[found]
    people_rows = []
    # The most rejected first, then the most false accepts.
    ranked = np.lexsort((np.arange(len(people)), -(false_accepts if false_accepts is not None else pairs * 0),
                         -rejected))
    for p in ranked:
        a, b = lowest_pairs[p]
        people_rows.append([people[p], int(faces[p]), int(pairs[p]), int(rejected[p]),
                            f"{rejected[p] / pairs[p]:.4f}" if pairs[p] else "",
                            "" if false_accepts is None else int(false_accepts[p]),
                            f"{lowest_cosine[p]:.6f}" if a >= 0 else "", names[a] if a >= 0 else "",
                            names[b] if a >= 0 else ""])
    return genuine_rows, impostor_rows, people_rows


def _report(args, summary: dict, rows: list[dict], scores: PairScores, failures: list[str], drawn: bool,
            model_cosine: float | None) -> None:
    point, eer = summary["operating_point"], summary["eer"]
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    say(f"roc: {summary['faces']} faces of {summary['people']} people: {summary['genuine_pairs']:,} genuine pairs, "
        f"{summary['impostor_pairs']:,} impostor pairs ({summary['seconds']:.1f} s, "
        f"{summary['pairs_per_second']:,} pairs/s"
        + ("" if summary["recount_seconds"] is None else
           f"; each person's rejected pairs counted in a second pass, {summary['recount_seconds']:.1f} s")
        + "); accepted when the cosine is above the threshold:")
    say(format_table(rows))
    if any(r["tar"] is None for r in rows):
        say(f"  (-: FAR below 1/{scores.impostors:,}, less than one false accept among the impostor pairs: not "
            "measurable)")
    edges = [far_key(r["far"]) for r in rows if r["exact"] is False]
    if edges:
        say(f"  (the thresholds at FAR {', '.join(edges)} are histogram bin edges, at most {1 / SCALE:.1e} above the "
            "exact ones; TAR and false accepts are exact at them)")
    say(f"roc: EER {eer['rate']:.2%} at cosine {eer['threshold']:.4f} (FAR {eer['far']:.2%}, FRR {eer['frr']:.2%})")
    model = summary.get("model_threshold")
    if model:
        # The cosine as recorded, not the summary's 6 digits: rounded twice it could print a digit above the one
        # train.embed --compare and search print for the same threshold.
        say(f"roc: the model's recorded 1:1 threshold, cosine {model_cosine:.4f} ({model['from']}), accepts "
            f"{model['false_accepts']:,} impostor pairs (FAR {model['far']:.3g}) and {model['tar']:.2%} of the "
            "genuine pairs on these faces")
    duplicates = summary["impostor_pairs_at_duplicate_cosine"]
    if duplicates:
        say(f"roc: note: {count_of(duplicates, 'impostor pair')} at cosine {DEFAULT_DUPLICATE_COSINE} or more: one "
            "photo, or one person, filed under two names? (the first in "
            f"{failing_outputs(args.output)['impostors']})")
    duplicates = summary["genuine_pairs_at_duplicate_cosine"]
    if duplicates:  # (accepted at every threshold: they raise the TAR the tool reports)
        say(f"roc: note: {count_of(duplicates, 'genuine pair')} at cosine {DEFAULT_DUPLICATE_COSINE} or more: one "
            "photo filed twice under one person (saved again, re-encoded)? Each is accepted at any threshold and "
            "raises the TAR above; train.tools.cluster finds such duplicates")
    files = failing_outputs(args.output)
    say(f"roc: at FAR {args.far:g}: threshold cosine {point['threshold']:.6f}"
        + ("" if point["threshold_exact"] else " (a bin edge)")
        + f", TAR {point['tar']:.2%} ({point['genuine_rejected']:,} genuine pairs rejected, "
        f"{point['false_accepts']:,} impostor{'' if point['false_accepts'] == 1 else 's'} accepted); train.embed "
        "--compare and search --threshold "
        f"{point['compare_threshold']:.4f} (they accept at or above it); wrote {args.output}, "
        f"{summary_path(args.output)}, {files['impostors']}, {files['genuine']}, {files['people']}"
        + (f", {args.plot}" if drawn else "")
        + left_out_said((len(failures), "photo" if args.landmarks or args.detector else "image")))


if __name__ == "__main__":
    sys.exit(main())
