"""``python -m train.tools.roc``: the TAR, thresholds and EER of a hand-made table whose cosines (and ties)
are known; the histogram of impostor cosines against every cosine kept, on the same random faces; the
pairs that fail; what it refuses; outputs whole after a stop; a folder of synthetic people embedded with a
small trained model, saved and read back."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.synthetic import render_face
from train.embed import main as embed_main, write_table
from train.ijb import FARS, curve_rates, tar_at_far
from train.tools import roc
from trainer_fixtures import IMAGE_SIZE, fail_if_called, trained_backbone, two_step_checkpoint


def run_roc(*argv) -> int:
    return roc.main([*map(str, argv), "--workers", "0"])


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def e(k: int) -> np.ndarray:
    return np.eye(7, dtype=np.float32)[k]


# alice: e0, 0.6 e0 + 0.8 e1, e1; bob: e2, 0.8 e2 + 0.6 e3; carol: 0.6 e0 + 0.8 e4, e4; dave: 0.6 e5 + 0.8 e1.
# Genuine cosines (5 pairs): alice 0.6, 0, 0.8; bob 0.8; carol 0.8. Impostor cosines (23 pairs): dave-alice3 0.8
# and dave-alice2 0.64, carol1-alice1 0.6, carol1-alice2 0.36, the other 19 0. (Float32 products of 0.6, 0.8, 1
# and 0: the genuine 0.8 and 0.6 tie the impostor ones exactly.)
HAND = {"alice/1.jpg": e(0), "alice/2.jpg": 0.6 * e(0) + 0.8 * e(1), "alice/3.jpg": e(1), "bob/1.jpg": e(2),
        "bob/2.jpg": 0.8 * e(2) + 0.6 * e(3), "carol/1.jpg": 0.6 * e(0) + 0.8 * e(4), "carol/2.jpg": e(4),
        "dave/1.jpg": 0.6 * e(5) + 0.8 * e(1)}


@pytest.fixture
def hand(tmp_path):
    table = tmp_path / "hand.npy"
    write_table(str(table), list(HAND), np.stack(list(HAND.values())).astype(np.float32))
    return table


def test_a_hand_made_table(hand, tmp_path, capsys):
    out = tmp_path / "roc.csv"
    assert run_roc("--embeddings", hand, "--output", out, "--far", 0.1, "--pairs", 3) == 0
    err = capsys.readouterr().err
    assert "1 person with one face (dave) contributes no genuine pair, only impostor pairs" in err
    assert "2 impostors accepted" in err
    summary = json.loads((tmp_path / "roc.json").read_text())
    # 5 genuine pairs, not 10 (each pair once) nor 13 (with a face against itself).
    assert (summary["faces"], summary["people"], summary["genuine_pairs"], summary["impostor_pairs"]) == (8, 4, 5, 23)
    assert summary["impostor_histogram"]["every_impostor_exact"]
    # FAR 1e-1 of 23 allows floor(2.3) = 2 false accepts: the threshold is the third highest impostor cosine, 0.6,
    # and a pair is accepted strictly above it: the genuine 0.6 (alice 1-2) and the impostor 0.6 are refused.
    # TAR 3/5 (the three 0.8s), 2 false accepts (0.8 and 0.64). Below 1/23 nothing is measurable.
    assert summary["tar_at_far"] == {"1e-06": None, "1e-05": None, "1e-04": None, "1e-03": None, "1e-02": None,
                                     "1e-01": 0.6}
    assert summary["threshold_at_far"]["1e-01"] == 0.6 and summary["false_accepts_at_far"]["1e-01"] == 2
    point = summary["operating_point"]
    assert (point["far"], point["threshold"], point["tar"], point["false_accepts"], point["genuine_rejected"]) == \
        (0.1, 0.6, 0.6, 2, 2)
    assert point["compare_threshold"] == 0.6001  # (train.embed --compare accepts at or above it)
    # The EER: at cosine 0 (the lowest threshold where the larger of the two rates is least), 4 of 23 impostors
    # above it (0.174) and 1 of 5 genuine pairs at or below it (alice 1-3, 0): 0.2. At 0.36: 3/23 and 1/5, 0.2
    # too, a higher threshold. At 0.6: 2/23 and 2/5.
    assert summary["eer"] == {"rate": 0.2, "threshold": 0.0, "far": 4 / 23, "frr": 0.2, "false_accepts": 4,
                              "false_rejects": 1}
    curve = read_csv(out)
    at = {float(row["far"]): row for row in curve}
    assert at[0.1]["threshold"] == "0.600000" and at[0.1]["true_accepts"] == "3"
    # k = 1 (FAR 1/23): 0.64, TAR 3/5; k = 3: 0.36, TAR 4/5; k = 4 to 22: 0 (19 impostors tie there: 4 accepted).
    assert [(r["threshold"], r["false_accepts"]) for r in curve if float(r["far"]) == pytest.approx(1 / 23)] == \
        [("0.640000", "1")]
    assert curve[-1]["far"] == "1" and curve[-1]["threshold"] == "-inf" and curve[-1]["tar"] == "1.000000"

    impostors = read_csv(tmp_path / "roc-impostors.csv")
    assert [(r["cosine"], r["person_a"], r["person_b"], r["accepted"]) for r in impostors] == [
        ("0.800000", "alice", "dave", "yes"), ("0.640000", "alice", "dave", "yes"),
        ("0.600000", "alice", "carol", "no")]
    genuine = read_csv(tmp_path / "roc-genuine.csv")
    assert [(r["cosine"], r["image_a"], r["image_b"], r["rejected"]) for r in genuine] == [
        ("0.000000", "alice/1.jpg", "alice/3.jpg", "yes"), ("0.600000", "alice/1.jpg", "alice/2.jpg", "yes"),
        ("0.800000", "alice/2.jpg", "alice/3.jpg", "no")]
    people = read_csv(tmp_path / "roc-people.csv")
    # Per person at 0.6: alice 2 of her 3 genuine pairs rejected, 2 false accepts (both with dave).
    assert [(r["person"], r["faces"], r["genuine_pairs"], r["rejected"], r["false_accepts"], r["lowest_cosine"])
            for r in people] == [("alice", "3", "3", "2", "2", "0.000000"), ("dave", "1", "0", "0", "2", ""),
                                 ("bob", "2", "1", "0", "0", "0.800000"), ("carol", "2", "1", "0", "0", "0.800000")]


def test_the_curve_gives_small_false_accept_rates_in_full(tmp_path):
    # roc.csv's false_accept_rate to 6 significant digits, as its far: to 6 decimals one false accept in more than
    # 2 million impostor pairs read 0.000000, and 8.9e-7 read 0.000001.
    rows = np.random.default_rng(5).standard_normal((2200, 16)).astype(np.float32)
    table = tmp_path / "random.npy"
    write_table(str(table), [f"p{i // 2}/{i % 2}.jpg" for i in range(len(rows))], rows / np.linalg.norm(rows, axis=1,
                                                                                                         keepdims=True))
    assert run_roc("--embeddings", table, "--output", tmp_path / "roc.csv", "--far", 1e-3) == 0
    impostors = json.loads((tmp_path / "roc.json").read_text())["impostor_pairs"]
    assert impostors > 2_000_000
    counted = [r for r in read_csv(tmp_path / "roc.csv") if r["false_accepts"] not in ("", "0")]
    assert any(int(r["false_accepts"]) == 1 for r in counted)
    for r in counted:
        assert float(r["false_accept_rate"]) == pytest.approx(int(r["false_accepts"]) / impostors, rel=1e-5)


def test_the_same_photo_twice_under_one_person_is_said(hand, tmp_path, capsys):
    # A genuine pair at the duplicate cosine is accepted at any threshold: it raises the TAR, and the run says so.
    assert run_roc("--embeddings", hand, "--output", tmp_path / "plain.csv", "--far", 0.1) == 0
    assert "or more: one photo filed twice" not in capsys.readouterr().err
    table = tmp_path / "twice.npy"
    faces = {**HAND, "bob/3.jpg": e(2)}  # bob/1.jpg again
    write_table(str(table), list(faces), np.stack(list(faces.values())).astype(np.float32))
    assert run_roc("--embeddings", table, "--output", tmp_path / "roc.csv", "--far", 0.1) == 0
    assert "roc: note: 1 genuine pair at cosine 0.99 or more: one photo filed twice under one person" in \
        capsys.readouterr().err
    assert json.loads((tmp_path / "roc.json").read_text())["genuine_pairs_at_duplicate_cosine"] == 1


def test_the_histogram_is_exact_at_its_edges():
    # One impostor cosine exactly 0.5, a bin's upper edge: above 0.5 - 2^-15, not above 0.5. Off by one bin, the
    # histogram would count it above 0.5 (or not above the edge below).
    b = np.array([0.5, math.sqrt(0.75), 0], dtype=np.float32)
    unit = torch.from_numpy(np.stack([np.array([1, 0, 0], np.float32), b, np.array([0, 0, 1], np.float32),
                                      np.array([0, 0, 1], np.float32)]))
    scores = roc.score_pairs(unit, np.array([0, 1, 2, 2]), keep=0)
    assert not scores.exact and scores.impostors == 5 and len(scores.genuine) == 1
    assert scores.false_accepts(0.5) == 0 and scores.false_accepts(0.5 - 2 ** -15) == 1
    assert scores.false_accepts(0.4) is None  # (not an edge: not known from the histogram)
    assert scores.counts.sum() == 5 and scores.counts[roc.SCALE - 1] == 4  # the four 0s: bin (-2^-15, 0]
    assert roc.bin_edge(int(np.flatnonzero(scores.counts)[-1])) == 0.5
    # FAR 0.2 of 5 allows 1: the edge at or above the second highest (0): 0 itself.
    assert scores.threshold_at(0.2) == (0.0, False) and scores.threshold_at(0.1) is None


@pytest.mark.parametrize("keep", [0, 40, 400])
def test_the_histogram_against_every_cosine_kept(keep):
    generator = torch.Generator().manual_seed(keep)
    person = np.sort(torch.randint(0, 30, (180,), generator=generator).numpy())
    centres = torch.randn(30, 12, generator=generator)
    unit = torch.nn.functional.normalize(centres[person] + 1.3 * torch.randn(180, 12, generator=generator), dim=1)
    exact = roc.score_pairs(unit, person, rows=32, columns=64)
    scores = roc.score_pairs(unit, person, rows=32, columns=64, keep=keep)
    assert exact.exact and not scores.exact
    assert scores.impostors == exact.impostors == 180 * 179 // 2 - len(exact.genuine)
    assert np.array_equal(scores.genuine, exact.genuine) and np.array_equal(scores.counts, exact.counts)
    assert np.array_equal(scores.top, exact.top[:keep])
    impostors, genuine = exact.top.astype(np.float64), exact.genuine.astype(np.float64)
    fars = curve_rates(exact.impostors) + list(FARS)
    for want, got in zip(exact.rates_at(fars), scores.rates_at(fars)):
        if want["threshold"] is None:
            assert got["threshold"] is None
            continue
        if got["exact"]:
            assert got == want
            continue
        # A bin edge: at most one bin above the exact threshold, and the counts there exact.
        assert want["threshold"] <= got["threshold"] < want["threshold"] + 2 ** -15
        assert got["false_accepts"] == int((impostors > got["threshold"]).sum()) <= math.floor(
            got["far"] * exact.impostors * (1 + 1e-12))
        assert got["true_accepts"] == int((genuine > got["threshold"]).sum()) <= want["true_accepts"]
    assert exact.equal_error()["rate"] <= scores.equal_error()["rate"] < exact.equal_error()["rate"] + 0.01
    # The exact path is train.ijb's tar_at_far on every pair's cosine.
    issame = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostors), bool)]
    for want, got in zip(tar_at_far(np.r_[genuine, impostors], issame, FARS),
                         exact.rates_at(FARS)):
        assert (want["tar"], want["threshold"], want["false_accepts"]) == \
            (got["tar"], got["threshold"], got["false_accepts"])


def people_and_faces(seed: int, sizes: list[int], dim: int = 12, spread: float = 1.3):
    """(person (N,) sorted, (N, dim) unit embeddings): people of ``sizes`` faces, each a random direction plus
    noise."""
    generator = torch.Generator().manual_seed(seed)
    person = np.repeat(np.arange(len(sizes)), sizes)
    centres = torch.randn(len(sizes), dim, generator=generator)
    noise = torch.randn(len(person), dim, generator=generator)
    return person, torch.nn.functional.normalize(centres[person] + spread * noise, dim=1)


def every_pair(unit: torch.Tensor, person: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(genuine cosines, their (G, 2) pairs, impostor cosines) of every pair i < j, row by row, from the one
    product ``unit @ unit.T`` (the block score_pairs makes of a collection smaller than a block)."""
    cosines = (unit @ unit.T).numpy()
    i, j = np.triu_indices(len(unit), 1)
    same = person[i] == person[j]
    return cosines[i, j][same], np.stack([i[same], j[same]], 1), cosines[i, j][~same]


def test_a_collection_kept_whole_is_every_pair_exactly():
    # Below both caps every cosine is kept: the genuine ones in the pass's order (row by row), the impostor ones
    # highest first, bit for bit those of the product; each person's lowest pair the first of the lowest.
    person, unit = people_and_faces(3, [5, 1, 9, 4, 7, 2, 6])
    genuine, pairs, impostors = every_pair(unit, person)
    scores = roc.score_pairs(unit, person)
    assert scores.exact and scores.genuine_exact
    assert np.array_equal(scores.genuine, genuine) and np.array_equal(scores.genuine_pairs, pairs)
    assert np.array_equal(scores.top, np.sort(impostors)[::-1])
    assert scores.genuine_count == len(genuine) and scores.impostors == len(impostors)
    for p in range(7):
        mine = np.flatnonzero(person[pairs[:, 0]] == p)
        if not len(mine):
            assert scores.lowest_pairs[p].tolist() == [-1, -1] and np.isnan(scores.lowest[p])
            continue
        first = mine[np.argmin(genuine[mine])]
        assert scores.lowest[p] == genuine[first] and scores.lowest_pairs[p].tolist() == pairs[first].tolist()


@pytest.mark.parametrize("cap", [1, 37, 400])
def test_genuine_pairs_past_the_cap(cap):
    # One person of 45 faces (990 of the 1,028 genuine pairs) among small ones, the 'cap' lowest genuine cosines
    # kept: what is kept is bounded and is the lowest, the histogram has every one, the TAR at every bin edge is
    # that of every pair, and each FAR's threshold is exact or the edge above it, with the TAR and false accepts
    # there. (Every pair: the run that keeps every one, of the same blocks.)
    person, unit = people_and_faces(cap, [3, 45, 2, 4, 1, 5, 3, 6])
    exact = roc.score_pairs(unit, person, rows=32, columns=64)
    scores = roc.score_pairs(unit, person, rows=32, columns=64, keep_genuine=cap)
    assert exact.genuine_exact and exact.exact and not scores.genuine_exact
    assert len(scores.genuine) == len(scores.genuine_pairs) == cap and scores.genuine_count == 1028
    genuine, impostors = exact.genuine, exact.top
    assert scores.impostors == len(impostors) == 69 * 68 // 2 - 1028
    # The lowest `cap` (the first of equal ones), in the order of the pass.
    lowest = np.sort(np.argsort(genuine, kind="stable")[:cap])
    assert np.array_equal(scores.genuine, genuine[lowest])
    assert np.array_equal(scores.genuine_pairs, exact.genuine_pairs[lowest])
    want = np.bincount(np.clip(np.ceil(genuine.astype(np.float64) * roc.SCALE) + roc.SCALE - 1, 0,
                               roc.BINS - 1).astype(np.int64), minlength=roc.BINS)
    assert np.array_equal(scores.genuine_counts, want) and np.array_equal(scores.counts, exact.counts)
    assert np.array_equal(scores.lowest, exact.lowest, equal_nan=True)
    assert np.array_equal(scores.lowest_pairs, exact.lowest_pairs)
    genuine = genuine.astype(np.float64)
    edges = roc.bin_edge(np.arange(roc.BINS))[::97]
    assert scores.true_accepts_of(edges).tolist() == [int((genuine > edge).sum()) for edge in edges]
    highest_kept = scores.genuine_sorted[-1]
    assert scores.true_accepts(highest_kept - 1e-9) == int((genuine > highest_kept - 1e-9).sum())
    inside = highest_kept + 2 ** -17
    if roc.bin_edge(roc.bin_of(inside)) != inside:
        assert scores.true_accepts(inside) is None  # (neither below the kept nor an edge)
    impostors = np.sort(impostors.astype(np.float64))
    fars = curve_rates(exact.impostors) + list(FARS)
    moved = 0
    for want, got in zip(exact.rates_at(fars), scores.rates_at(fars)):
        if want["threshold"] is None:
            assert got["threshold"] is None
            continue
        if got["exact"]:
            assert got == want
            continue
        moved += 1
        assert want["threshold"] < got["threshold"] < want["threshold"] + 2 ** -15
        assert got["threshold"] == roc.bin_edge(roc.bin_of(got["threshold"]))
        assert got["false_accepts"] == int((impostors > got["threshold"]).sum()) <= want["false_accepts"]
        assert got["true_accepts"] == int((genuine > got["threshold"]).sum()) <= want["true_accepts"]
        assert got["tar"] == got["true_accepts"] / 1028
    assert moved  # (some thresholds lay among the genuine cosines not kept)
    eer, want = scores.equal_error(), exact.equal_error()
    assert want["rate"] <= eer["rate"] < want["rate"] + 0.01
    assert eer["false_rejects"] == int((genuine <= eer["threshold"]).sum())


@pytest.mark.parametrize("threshold", ["kept", "tie", 0.25, 2.0])
def test_each_persons_rejected_pairs_counted_in_a_second_pass(threshold):
    # One person of 45 faces across the blocks (rows 32, columns 64) among small ones, one of a single face: each
    # person's genuine pairs at or below the threshold, counted over the same blocks as the pass over every pair,
    # are those of the pass's cosines (the product of the whole table rounds some otherwise, so a tie would be
    # lost); at a genuine cosine itself (a tie: rejected), below all and above all.
    person, unit = people_and_faces(7, [3, 45, 1, 2, 4, 5, 3, 6])
    exact = roc.score_pairs(unit, person, rows=32, columns=64)
    threshold = {"kept": float(np.median(exact.genuine)), "tie": float(exact.genuine[17])}.get(threshold, threshold)
    want = np.bincount(person[exact.genuine_pairs[:, 0]][exact.genuine <= threshold], minlength=8)
    got = roc.rejected_of_people(unit, person, threshold, rows=32, columns=64, strip=8)
    assert got.tolist() == want.tolist() and got.dtype == np.int64
    assert got[2] == 0 and got.sum() == exact.genuine_count - exact.true_accepts(threshold)


def test_the_second_pass_makes_the_blocks_of_the_first_that_hold_genuine_pairs():
    # cosine_blocks' column_ends: of the blocks of every pair, those with a column before a row's person's end, the
    # same cosines bit for bit (blocks of another shape round some cosines otherwise).
    from train.tools.similarity import cosine_blocks

    person, unit = people_and_faces(7, [3, 45, 1, 2, 4, 5, 3, 6])
    end = np.searchsorted(person, person, side="right")
    every = {(start, first): cosines for start, first, cosines in cosine_blocks(unit, device="cpu", rows=32,
                                                                                 columns=64)}
    some = list(cosine_blocks(unit, device="cpu", rows=32, columns=64, column_ends=end))
    assert [(start, first) for start, first, _ in some] == [(0, 0), (32, 32), (64, 64)] == [
        (start, first) for start, first in every if first < end[start:start + 32].max()] != list(every)
    assert all(torch.equal(cosines, every[start, first]) for start, first, cosines in some)


def test_the_people_when_the_rejected_pairs_are_not_all_kept(tmp_path, capsys, monkeypatch):
    # Every genuine pair kept rejected at the operating threshold: each person's rejected pairs are counted in a
    # second pass over the genuine pairs, as every pair's cosines give them at that threshold (they were blank,
    # the people listed by their lowest genuine pair); the genuine pairs listed, the counts and each person's
    # lowest pair are those of the run that keeps every one.
    person, unit = people_and_faces(5, [30, 4, 3, 5, 2, 6, 3], spread=2.5)
    table = tmp_path / "people.npy"
    write_table(str(table), [f"p{p}/{k}.jpg" for k, p in enumerate(person)], unit.numpy())
    assert run_roc("--embeddings", table, "--output", tmp_path / "all.csv", "--far", 0.01, "--pairs", 5) == 0
    assert "second pass" not in capsys.readouterr().err
    monkeypatch.setattr(roc, "LOWEST_GENUINE", 20)
    assert run_roc("--embeddings", table, "--output", tmp_path / "capped.csv", "--far", 0.01, "--pairs", 5) == 0
    err = capsys.readouterr().err
    everything, capped = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("all", "capped"))
    assert everything["genuine_histogram"]["every_genuine_exact"] and everything["recount_seconds"] is None
    assert capped["genuine_histogram"] == {"bins": roc.BINS, "width": 2 ** -15, "exact_lowest": 20,
                                           "every_genuine_exact": False}
    assert capped["genuine_pairs"] == everything["genuine_pairs"] == 435 + 6 + 3 + 10 + 1 + 15 + 3
    assert capped["operating_point"]["people_rejected_known"] and capped["recount_seconds"] >= 0
    assert "roc: the 20 lowest genuine pairs, those kept exactly, are all rejected at FAR 0.01: counting each " \
        "person's rejected pairs in a second pass over the 473 genuine pairs\n" in err
    assert "each person's count of them is unknown" not in err and "counted in a second pass, " in err
    assert read_csv(tmp_path / "capped-genuine.csv") == read_csv(tmp_path / "all-genuine.csv")
    # At the capped run's threshold (the upper edge of the exact one's bin), every pair's cosines.
    genuine, pairs, _ = every_pair(unit, person)
    threshold = roc.score_pairs(unit, person, keep_genuine=20).rates_at([0.01])[0]["threshold"]
    assert threshold == roc.bin_edge(roc.bin_of(threshold)) and threshold > everything["threshold_at_far"]["1e-02"]
    rejected = np.bincount(person[pairs[:, 0]][genuine <= threshold], minlength=7)
    people, known = read_csv(tmp_path / "capped-people.csv"), read_csv(tmp_path / "all-people.csv")
    assert [(r["person"], r["rejected"], r["rejected_share"]) for r in people] == [
        (f"p{p}", str(rejected[p]), f"{rejected[p] / int(r['genuine_pairs']):.4f}") for p, r in
        zip(np.lexsort((np.arange(7), -rejected)), people)]
    assert sum(int(r["rejected"]) for r in people) == capped["operating_point"]["genuine_rejected"] > 20
    assert sorted((r["person"], r["faces"], r["genuine_pairs"], r["lowest_cosine"], r["lowest_pair_a"],
                   r["lowest_pair_b"]) for r in people) == sorted(
        (r["person"], r["faces"], r["genuine_pairs"], r["lowest_cosine"], r["lowest_pair_a"], r["lowest_pair_b"])
        for r in known)
    # The thresholds and TAR: exact, or a bin edge at most 2^-15 above with the TAR and false accepts there.
    for far, threshold in capped["threshold_at_far"].items():
        if capped["threshold_exact_at_far"][far]:
            assert threshold == everything["threshold_at_far"][far]
            assert capped["tar_at_far"][far] == everything["tar_at_far"][far]
        elif threshold is not None:
            assert everything["threshold_at_far"][far] < threshold < everything["threshold_at_far"][far] + 2 ** -15
            assert capped["tar_at_far"][far] <= everything["tar_at_far"][far]


def test_the_table_is_held_once(tmp_path, capsys, monkeypatch):
    # The rows read (50,000 x 128 float32, 25.6 MB, in no order of people) are sorted by person in their place and
    # scored as they are: no float64 copy of the table to check their length, no sorted copy.
    import tracemalloc

    generator = np.random.default_rng(0)
    rows = generator.standard_normal((50_000, 128), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    table = tmp_path / "big.npy"
    write_table(str(table), [f"p{p}/{k}.jpg" for k, p in enumerate(generator.integers(0, 5000, len(rows)))], rows)
    del rows
    seen = {}
    read = roc._read_faces

    def reading(*args):
        seen["faces"] = read(*args)
        return seen["faces"]

    def scoring(unit, person, **kwargs):
        seen["unit"], seen["person"], seen["peak"] = unit, person, tracemalloc.get_traced_memory()[1]
        raise ValueError("scored elsewhere")

    monkeypatch.setattr(roc, "_read_faces", reading)
    monkeypatch.setattr(roc, "score_pairs", scoring)
    tracemalloc.start()
    try:
        assert run_roc("--embeddings", table, "--output", tmp_path / "roc.csv", "--far", 0.01) == 2
    finally:
        tracemalloc.stop()
    assert "roc: error: scored elsewhere" in capsys.readouterr().err
    faces, unit = seen["faces"], seen["unit"]
    assert np.shares_memory(unit.numpy(), faces.embeddings) and np.all(np.diff(seen["person"]) >= 0)
    assert seen["peak"] < 2 * 25.6e6, seen["peak"]
    people = [name.split("/")[0] for name in faces.names]
    assert people == sorted(people, key=lambda name: int(name[1:])) or people == sorted(people)
    original = np.load(table)
    named = {name: k for k, name in enumerate(open(str(table)[:-4] + ".txt").read().splitlines())}
    assert np.array_equal(faces.embeddings, original[[named[name] for name in faces.names]])


def test_rows_are_permuted_in_their_place():
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    for order in (np.arange(10), np.array([3, 0, 1, 2, 9, 5, 8, 7, 6, 4]), np.random.default_rng(1).permutation(10)):
        permuted = rows.copy()
        roc._permute_rows(permuted, order)
        assert np.array_equal(permuted, rows[order])


def test_input_errors(hand, tmp_path, capsys):
    out = tmp_path / "roc.csv"
    one = tmp_path / "one.npy"
    write_table(str(one), ["alice/1.jpg", "alice/2.jpg"], np.stack([e(0), e(1)]))
    assert run_roc("--embeddings", one, "--output", out) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"roc: error: --embeddings {one}: every face is of one person, alice: no "
                                        "impostor pair (two people's faces) to measure a false accept rate with"]
    single = tmp_path / "single.npy"
    write_table(str(single), ["alice/1.jpg", "bob/1.jpg"], np.stack([e(0), e(1)]))
    assert run_roc("--embeddings", single, "--output", out) == 2
    assert "no person has two faces: no genuine pair" in capsys.readouterr().err
    loose = tmp_path / "loose.npy"
    write_table(str(loose), ["alice/1.jpg", "2.jpg"], np.stack([e(0), e(1)]))
    assert run_roc("--embeddings", loose, "--output", out) == 2
    assert "2.jpg is in no folder: a face's first folder is its person" in capsys.readouterr().err
    # 23 impostor pairs measure FAR 1/23 at best.
    assert run_roc("--embeddings", hand, "--output", out, "--far", 0.01) == 2
    err = capsys.readouterr().err
    assert "--far 0.01: 23 impostor pairs measure a FAR of 0.0435 at best (1 of them); 0.01 needs 100 or more" in err
    assert "roc: scoring" not in err  # (refused before the pairs are scored: minutes on 100,000 faces)
    # FAR 1/23 measures exactly 1 of them (as threshold_allowing counts it); just below it does not.
    assert run_roc("--embeddings", hand, "--output", tmp_path / "one" / "roc.csv", "--far", 1 / 23) == 0
    assert "1 impostor accepted" in capsys.readouterr().err
    assert run_roc("--embeddings", hand, "--output", out, "--far", 0.0434) == 2
    assert "0.0434 needs 24 or more" in capsys.readouterr().err
    assert not os.path.exists(out)
    for argv, said in (
            (["--far", 1], "--far is a false accept rate, above 0 and below 1"),
            (["--save-embeddings", tmp_path / "s.npy"], "--save-embeddings goes with --images"),
            (["--output", tmp_path / "roc.txt"], "--output names a .csv file"),
            (["--plot", tmp_path / "roc.gif"], "a .png, .pdf or .svg file")):
        with pytest.raises(SystemExit) as exit:
            run_roc("--embeddings", hand, *argv)
        assert exit.value.code == 2 and said in capsys.readouterr().err
    # --embeddings takes a table alone (it said "no such folder, image or table", of a folder too).
    assert run_roc("--embeddings", tmp_path / "none.npy", "--output", out) == 2
    assert capsys.readouterr().err == f"roc: error: --embeddings {tmp_path / 'none.npy'}: no such table\n"
    assert run_roc("--embeddings", tmp_path, "--output", out) == 2
    assert capsys.readouterr().err == (f"roc: error: --embeddings {tmp_path} is a folder, not a table: --images "
                                       f"{tmp_path} embeds its faces\n")
    # An output that exists is kept without --overwrite; one of the table's files is never an output.
    assert run_roc("--embeddings", hand, "--output", out, "--far", 0.1) == 0
    before = out.read_bytes()
    assert run_roc("--embeddings", hand, "--output", out, "--far", 0.1) == 2
    assert f"{out} exists: pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before


def test_a_stop_leaves_the_outputs_whole_or_as_they_were(hand, tmp_path, capsys, monkeypatch):
    out = tmp_path / "roc.csv"
    score = roc.score_pairs

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return score(*args, **kwargs)

    monkeypatch.setattr(roc, "score_pairs", stopped)
    try:
        assert run_roc("--embeddings", hand, "--output", out, "--far", 0.1) == 130
    finally:  # the first stop leaves the signals ignored, for a process about to exit
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "roc: stopped by SIGINT: nothing written" in capsys.readouterr().err
    assert not any(name.startswith("roc") for name in os.listdir(tmp_path))
    monkeypatch.undo()
    write = roc.checkpoint.FilesTogether.write  # (the outputs' writes, renamed together at the end)

    def write_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        write(*args, **kwargs)

    monkeypatch.setattr(roc.checkpoint.FilesTogether, "write", write_then_signal)
    try:
        assert run_roc("--embeddings", hand, "--output", out, "--far", 0.1) == 143
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "stopped by SIGTERM as the outputs were written: they are whole" in capsys.readouterr().err
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("roc")) == [
        "roc-genuine.csv", "roc-impostors.csv", "roc-people.csv", "roc.csv", "roc.json"]
    assert json.loads((tmp_path / "roc.json").read_text())["genuine_pairs"] == 5


def test_a_full_disk_as_the_summary_is_written_leaves_the_earlier_outputs(hand, tmp_path, capsys, monkeypatch):
    # The curve and the failing pairs were each renamed into place as written: a full disk at the summary, written
    # last, left the new curve beside the summary (and its threshold) of the run before.
    out = tmp_path / "roc.csv"
    assert run_roc("--embeddings", hand, "--output", out, "--far", 0.1) == 0
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name.startswith("roc")}
    assert len(before) == 5

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    assert run_roc("--embeddings", hand, "--output", out, "--far", 0.5, "--overwrite") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name.startswith(("roc", "."))} \
        == before  # (no temporary left either)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained on 8 synthetic identities (its checkpoint, and backbone.pt beside a backbone.json
    recording a verification threshold, cosine 0.55) and a folder of 6 other people, 3 faces each (one of
    them 1 face)."""
    root = tmp_path_factory.mktemp("roc")
    ckpt, backbone = trained_backbone(root)
    for who in range(6):
        for sample in range(1 if who == 5 else 3):
            folder = root / "people" / f"person{who}"
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(render_face(0, 20 + who, 500 + sample, IMAGE_SIZE)).save(folder / f"{sample:02d}.png")
    return ckpt, backbone, str(root / "people")


@pytest.mark.slow
def test_a_folder_embedded_saved_and_read_back(trained, tmp_path, capsys):
    ckpt, backbone, people = trained
    out, saved = tmp_path / "roc.csv", tmp_path / "people.npy"
    assert run_roc("--model", backbone, "--images", people, "--save-embeddings", saved, "--output", out, "--far",
                   0.05, "--plot", tmp_path / "roc.png") == 0
    err = capsys.readouterr().err
    assert "person5) contributes no genuine pair" in err and "the model's recorded 1:1 threshold, cosine 0.5500" in err
    summary = json.loads(out.with_suffix(".json").read_text())
    # 16 faces: 120 pairs, 5 people x 3 genuine pairs.
    assert (summary["faces"], summary["genuine_pairs"], summary["impostor_pairs"]) == (16, 15, 105)
    about = json.loads((tmp_path / "people.npy.json").read_text())
    assert about["made_by"] == "train.tools.roc" and about["rows"] == 16
    assert summary["model_weights_sha256"] == about["model_weights_sha256"]
    model = summary["model_threshold"]
    assert model["cosine"] == 0.55 and 0 <= model["far"] <= 1 and model["false_accepts"] == round(model["far"] * 105)
    assert os.path.getsize(tmp_path / "roc.png") > 0
    # The saved table gives the same numbers without embedding; its model is the one the table names.
    assert run_roc("--embeddings", saved, "--output", tmp_path / "again.csv", "--far", 0.05) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    for key in ("tar_at_far", "threshold_at_far", "eer", "operating_point", "model_threshold", "model_sha256"):
        assert again[key] == summary[key], key
    assert (tmp_path / "again.csv").read_text() == out.read_text()


def test_the_models_threshold_is_printed_as_train_embed_compare_prints_it(trained, tmp_path, capsys):
    # A recorded t of 1.3775000000000002 (an export's, the mean of a run's thresholds) is cosine 0.31124999...:
    # train.embed --compare printed 0.3112, roc 0.3113 (its line formatted the summary's 6-digit 0.31125).
    _, backbone, people = trained
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(backbone, model / "backbone.pt")
    about = json.loads((Path(backbone).parent / "backbone.json").read_text())
    t = 1.3775000000000002
    (model / "backbone.json").write_text(json.dumps({**about, "threshold": t}))
    faces = sorted(str(path) for path in Path(people).rglob("*.png"))[:2]
    assert embed_main(["--model", str(model / "backbone.pt"), "--compare", *faces, "--workers", "0"]) == 0
    compared = capsys.readouterr().out
    assert run_roc("--model", model / "backbone.pt", "--images", people, "--output", tmp_path / "roc.csv",
                   "--far", 0.05) == 0
    err = capsys.readouterr().err
    assert f"(threshold {1 - t / 2:.4f}, from" in compared, compared
    assert f"the model's recorded 1:1 threshold, cosine {1 - t / 2:.4f} (" in err, err
    assert "cut short" not in err, err
    # An export of a checkpoint whose final verification was cut short (its backbone.json carries the mark): one note,
    # as embed --compare, cluster and search say it (test_export).
    cut = {"step": 2, "threshold_steps": [1]}
    (model / "backbone.json").write_text(json.dumps({**about, "threshold": t, "verification_cut_short": cut}))
    assert run_roc("--model", model / "backbone.pt", "--images", people, "--output", tmp_path / "cut.csv",
                   "--far", 0.05) == 0
    err = capsys.readouterr().err
    # (An exported model: the note says to export again once the resume has verified.)
    note = (f"roc: note: {model / 'backbone.pt'} is of a run whose final verification (step 2) was cut short "
            "(python -m train --resume auto on its checkpoint makes it, then export again): its threshold is "
            "step 1's\n")
    assert err.count(note) == 1 and err.count("cut short") == 1, err
    assert f"the model's recorded 1:1 threshold, cosine {1 - t / 2:.4f} (" in err, err


def test_a_save_embeddings_that_is_a_folder_is_refused(tmp_path, capsys):
    # --save-embeddings tables/ wrote the table as tables/.npy, tables/.npy.txt and tables/.npy.json, hidden in the
    # folder, and --save-embeddings tables as tables.npy beside it, without a word.
    ckpt, people = two_step_checkpoint(tmp_path / "model")
    capsys.readouterr()
    folder = tmp_path / "tables"
    folder.mkdir()
    for named in (folder, f"{folder}{os.sep}"):
        assert run_roc("--model", ckpt, "--images", people, "--save-embeddings", named, "--far", 0.05,
                       "--output", tmp_path / "roc.csv") == 2
        said = f"roc: error: --save-embeddings {named} is a folder: name a .npy or .csv file\n"
        assert capsys.readouterr().err == said
        assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == ["model", "tables"]


def test_a_folder_as_collected(trained, tmp_path, capsys):
    # What the README says of a real collection's leftovers: an image that cannot be read is left out, the results
    # are written and the exit status is 1; a file that is not an image and an empty folder are passed over.
    ckpt, backbone, people = trained
    shutil.copytree(people, tmp_path / "people")
    (tmp_path / "people" / "person0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "people" / "person0" / "notes.txt").write_text("taken at the office\n")
    (tmp_path / "people" / "nobody").mkdir()
    assert run_roc("--model", backbone, "--images", tmp_path / "people", "--output", tmp_path / "roc.csv",
                   "--far", 0.05) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "; 1 image left out (the warnings above say why)\n" in err
    summary = json.loads((tmp_path / "roc.json").read_text())
    assert (summary["faces"], summary["people"], summary["left_out"]) == (16, 6, 1)


def test_a_folders_people_and_far_are_checked_before_its_faces_are_embedded(trained, tmp_path, capsys, monkeypatch):
    # A face in no folder, every face of one person, no person with two faces, a --far the faces' impostor pairs
    # cannot measure: known from the folder's names, each was said once every face had been embedded (minutes).
    from train import embed

    ckpt, backbone, people = trained

    fail_if_called(monkeypatch, embed, "embed_files", "the faces were embedded before their people were checked")
    face = open(os.path.join(people, "person0", "00.png"), "rb").read()
    layouts = {"loose": ["person0/00.png", "person0/01.png", "person1/00.png", "stray.png"],
               "alone": ["person0/00.png", "person0/01.png"], "single": ["person0/00.png", "person1/00.png"],
               "few": ["person0/00.png", "person0/01.png", "person1/00.png"]}
    for layout, names in layouts.items():
        for name in names:
            os.makedirs(os.path.dirname(tmp_path / layout / name), exist_ok=True)
            (tmp_path / layout / name).write_bytes(face)
    for layout, said in (("loose", "stray.png is in no folder"), ("alone", "every face is of one person, person0"),
                         ("single", "no person has two faces"),
                         ("few", "--far 0.05: 2 impostor pairs measure a FAR of 0.5 at best")):
        assert run_roc("--model", backbone, "--images", tmp_path / layout, "--output", tmp_path / "roc.csv",
                       "--far", 0.05) == 2
        err = capsys.readouterr().err
        assert err.startswith("roc: error: ") and said in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "roc.csv")


def test_the_default_thresholds_note_points_here(capsys):
    from train.embed import model_threshold

    threshold, source, note = model_threshold(None, {}, None, tool="cluster")
    assert (threshold, source) == (0.3, "the default")
    assert "python -m train.tools.roc measures the one of a false accept rate" in note
    assert capsys.readouterr().err == ""  # (the tool says it, once its refusals are past)


def test_photos_through_landmarks_and_tables_of_other_models(trained, tmp_path, capsys):
    ckpt, backbone, people = trained
    # The crops are aligned already: their landmarks are the template's, and each aligned face is the crop.
    from train.ijb import arcface_template

    points = " ".join(f"{v:.4f}" for v in arcface_template(IMAGE_SIZE).ravel())
    names = sorted(os.path.relpath(os.path.join(root, f), people) for root, _, files in os.walk(people) for f in files)
    (tmp_path / "landmarks.txt").write_text("".join(f"{name} {points}\n" for name in names))
    assert run_roc("--model", backbone, "--images", people, "--landmarks", tmp_path / "landmarks.txt", "--output",
                   tmp_path / "a.csv", "--far", 0.05, "--save-embeddings", tmp_path / "a.npy") == 0
    # What it took, said (it said nothing of the photos before embedding them) and in the summary.
    assert f"roc: embedding the faces {tmp_path / 'landmarks.txt'} lists in the photos under {people} with " \
        f"{backbone} ({IMAGE_SIZE}px) on cpu\n" in capsys.readouterr().err
    summary = json.loads((tmp_path / "a.json").read_text())
    assert (summary["faces"], summary["genuine_pairs"]) == (16, 15)
    landmarks = f"aligned from the landmarks in {tmp_path / 'landmarks.txt'}"
    assert json.loads((tmp_path / "a.npy.json").read_text())["faces"] == summary["faces_are"] == landmarks
    assert run_roc("--embeddings", tmp_path / "a.npy", "--output", tmp_path / "c.csv", "--far", 0.05) == 0
    assert json.loads((tmp_path / "c.json").read_text())["faces_are"] == landmarks
    # Another model's weights: refused. A table of older versions (no digest) of another file: taken, with a note.
    other = tmp_path / "other"
    os.makedirs(other)
    weights = torch.load(backbone)
    first = next(name for name, tensor in weights.items() if tensor.is_floating_point())
    weights[first] = weights[first] + 0.01
    torch.save(weights, other / "backbone.pt")
    (other / "backbone.json").write_text(open(backbone[:-len(".pt")] + ".json").read())
    capsys.readouterr()
    assert run_roc("--model", other / "backbone.pt", "--embeddings", tmp_path / "a.npy", "--output",
                   tmp_path / "b.csv", "--far", 0.05) == 2
    assert "was made with another model than" in capsys.readouterr().err
    about = json.loads((tmp_path / "a.npy.json").read_text())
    del about["model_sha256"], about["model_weights_sha256"]
    (tmp_path / "a.npy.json").write_text(json.dumps(about))
    assert run_roc("--model", ckpt, "--embeddings", tmp_path / "a.npy", "--output", tmp_path / "b.csv", "--far",
                   0.05) == 0
    assert f"roc: note: --embeddings {tmp_path / 'a.npy'} was made with {backbone}" in capsys.readouterr().err


@pytest.mark.slow
def test_photos_with_a_detector_are_scored_as_their_aligned_faces(trained, tmp_path, capsys):
    """--detector (train.embed's shared code): each photo's main face found and aligned by the stand-in
    detector of detector_fixtures gives the pairs' scores of those faces' crops; a photo without a face is
    left out with a warning (exit status 1); a bad --detector is one line, before any embedding."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from detector_fixtures import crops_and_photos, face_detector, photo_of_faces

    ckpt, backbone, _ = trained
    detector = face_detector(tmp_path / "det.onnx")
    crops, photos = tmp_path / "crops", tmp_path / "photos"
    crops_and_photos({f"person{who}/{sample}.png": render_face(0, 20 + who, 600 + sample, 112) for who in range(4)
                      for sample in range(3)}, IMAGE_SIZE, crops, photos)
    photo_of_faces([], []).save(photos / "person0" / "nobody.png")
    assert run_roc("--model", backbone, "--images", crops, "--output", tmp_path / "crops.csv", "--far", 0.05) == 0
    assert f"roc: embedding 12 images under {crops} with" in capsys.readouterr().err
    assert json.loads((tmp_path / "crops.json").read_text())["faces_are"] == "the images as they are"
    assert run_roc("--model", backbone, "--images", photos, "--detector", detector, "--output",
                   tmp_path / "photos.csv", "--far", 0.05) == 1
    err = capsys.readouterr().err
    assert f"roc: embedding 13 photos under {photos} with" in err  # (said '13 images')
    assert json.loads((tmp_path / "photos.json").read_text())["faces_are"] == \
        f"found and aligned by {os.path.abspath(detector)}"
    assert f"warning: {photos / 'person0' / 'nobody.png'}: no face scores 0.5 or more" in err
    assert (tmp_path / "photos.csv").read_text() == (tmp_path / "crops.csv").read_text()
    for kind in ("genuine", "impostors"):
        assert (tmp_path / f"photos-{kind}.csv").read_text() == (tmp_path / f"crops-{kind}.csv").read_text()
    assert json.loads((tmp_path / "photos.json").read_text())["left_out"] == 1
    assert run_roc("--model", backbone, "--images", photos, "--detector", tmp_path, "--output",
                   tmp_path / "x.csv") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"roc: error: --detector {tmp_path}: a folder, not") and err.count("\n") == 1, err
