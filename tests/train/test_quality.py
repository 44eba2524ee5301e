"""``python -m train.tools.quality``: the error-versus-reject characteristic against a small example worked
by hand (the threshold fixed before rejecting, a pair's quality its worse face's), the expected curve of
random rejection against every ordering of a small set, and the tool on a model trained on synthetic faces:
the scores are ``train.embed --norms``'s, the kept and rejected trees, the ERC of a pairs list with the
model's norm and with a quality file, what it refuses, and its outputs written whole or not at all."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal

import numpy as np
import pytest

from train.embed import main as embed_main
from train.tools import quality
from trainer_fixtures import IMAGE_SIZE, fail_if_called, make_pairs_list, trained_backbone

# The worked example: 4 genuine and 4 impostor pairs, (score, genuine, quality of face 1, of face 2).
PAIRS = [(0.90, True, 5, 6), (0.25, True, 1, 9), (0.35, True, 3, 4), (0.28, True, 7, 8),
         (0.50, False, 2, 2), (0.30, False, 6, 7), (0.10, False, 8, 9), (0.20, False, 9, 9)]


def example():
    scores = np.array([p[0] for p in PAIRS])
    genuine = np.array([p[1] for p in PAIRS])
    faces = np.array([q for p in PAIRS for q in p[2:]], dtype=np.float64)
    return scores, genuine, faces


def test_the_erc_of_a_worked_example():
    scores, genuine, faces = example()
    # FMR 1/4 of 4 impostors lets 1 pass: the threshold is the second highest impostor, 0.30; the genuine pairs
    # at 0.25 and 0.28 fail, FNMR 2/4.
    refused, used = quality.fmr_threshold(np.sort(scores[~genuine]), 0.25)
    assert (refused, used) == (0.30, 0.25)
    # Each pair's quality is its worse face's: 5, 1, 3, 7, 2, 6, 8, 9. Rejected in that order: the failing
    # genuine pair (1), an impostor (2), two genuine pairs that pass (3, 5), an impostor (6), the other failing one.
    pair_q = quality.pair_quality(faces)
    assert pair_q.tolist() == [5, 1, 3, 7, 2, 6, 8, 9]
    fnmr = quality.error_versus_reject(scores, genuine, pair_q, refused)
    np.testing.assert_allclose(fnmr, [1 / 2, 1 / 3, 1 / 3, 1 / 2, 1, 1, 0, 0, 0])
    # (The best face's quality would reject an impostor first, FNMR still 1/2; a threshold chosen again on the
    # impostors left after 2 rejections, 3 of them, could not be measured at FMR 1/4.)
    assert quality.error_versus_reject(scores, genuine, np.maximum(faces[0::2], faces[1::2]), refused)[1] == 0.5
    assert quality.fmr_threshold(np.array([0.1, 0.2, 0.3]), 0.25)[1] == pytest.approx(1 / 3)
    # The areas: trapezoids of width 1/8.
    assert quality.erc_area(fnmr, 1.0) == pytest.approx(3.4166667 / 8)
    assert quality.erc_area(fnmr, 0.25) == pytest.approx((5 / 12 + 1 / 3) / 8)
    assert quality.erc_area(fnmr, 0.2) == pytest.approx(5 / 12 / 8 + 0.075 / 3)
    # The oracle rejects the failing genuine pairs first, the lower score first.
    oracle = quality.error_versus_reject(scores, genuine, quality.oracle_quality(scores, genuine, refused), refused)
    np.testing.assert_allclose(oracle, [1 / 2, 1 / 3, 0, 0, 0, 0, 0, 0, 0])
    rows, curves = quality.erc_summary(scores, genuine, {"q": pair_q}, [0.1, 0.25], 0.2)
    # FMR 0.1 cannot be measured on 4 impostors: it shares 1/4's threshold, one row for both.
    assert len(rows) == 1 and rows[0]["fmr_requested"] == [0.1, 0.25] and rows[0]["fmr"] == 0.25
    assert rows[0]["threshold"] == 0.30 and rows[0]["false_matches"] == 1 and rows[0]["fnmr"] == 0.5
    assert rows[0]["orderings"]["q"]["auc_0_20"] == pytest.approx(quality.erc_area(fnmr, 0.2))
    assert sorted(curves) == [("oracle", 0.25), ("q", 0.25), ("random", 0.25)]


def test_random_rejection_is_the_mean_over_every_order():
    scores = np.array([0.9, 0.2, 0.1, 0.6, 0.3, 0.4])
    genuine = np.array([True, True, False, True, False, False])
    refused = 0.35
    every = np.mean([quality.error_versus_reject(scores, genuine, np.array(order, dtype=float), refused)
                     for order in itertools.permutations(range(6))], axis=0)
    np.testing.assert_allclose(quality.random_rejection(scores, genuine, refused), every)


def test_pairs_of_equal_quality_are_rejected_together_whatever_their_order():
    # Discrete qualities (ISO/IEC 29794-1's 0-100 scores, a face in several pairs as the worse one) tie. No
    # quality threshold rejects some of a run of ties and keeps the others: where it does not split one, the
    # ERC is the FNMR of the pairs of quality at least that threshold, brute force; across a run, a straight
    # line; and the curve is the same in any order of the pairs (it was not: ties were taken in file order).
    rng = np.random.default_rng(3)
    for _ in range(50):
        pairs = int(rng.integers(4, 30))
        scores, genuine = rng.integers(0, 6, pairs) / 5, rng.random(pairs) < 0.5
        genuine[0] = True
        q, refused = rng.integers(0, 4, pairs).astype(float), float(rng.choice(scores))
        fnmr = quality.error_versus_reject(scores, genuine, q, refused)
        for t in np.unique(q):
            kept = genuine & (q >= t)
            want = (scores[kept] <= refused).sum() / kept.sum() if kept.any() else 0  # (0: none left)
            assert fnmr[int((q < t).sum())] == pytest.approx(want)
        assert fnmr[-1] == 0
        every = np.flatnonzero(np.r_[True, np.diff(np.sort(q)) != 0, True])
        np.testing.assert_allclose(fnmr, np.interp(np.arange(pairs + 1), every, fnmr[every]))
        shuffled = rng.permutation(pairs)
        np.testing.assert_allclose(quality.error_versus_reject(scores[shuffled], genuine[shuffled], q[shuffled],
                                                               refused), fnmr)
        # The oracle ties nothing: its curve is the best order's, step by step.
        oracle = quality.error_versus_reject(scores, genuine, quality.oracle_quality(scores, genuine, refused),
                                             refused)
        fails, g = int((genuine & (scores <= refused)).sum()), int(genuine.sum())
        best = [(fails - min(k, fails)) / (g - min(k, fails)) if g > min(k, fails) else 0 for k in range(pairs + 1)]
        np.testing.assert_allclose(oracle, best)


def test_rejected_faces():
    q = np.array([3.0, 1.0, 2.0, 1.0, 5.0])
    assert quality.rejected_faces(q, below=2.0).tolist() == [False, True, False, True, False]
    assert quality.rejected_faces(q, fraction=0.2).tolist() == [False, True, False, False, False]  # (ties: first)
    assert quality.rejected_faces(q, fraction=0.6).tolist() == [False, True, True, True, False]
    assert not quality.rejected_faces(q, fraction=0.0).any()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained on 8 synthetic identities, and a pairs list of 40 pairs of 10 others."""
    root = tmp_path_factory.mktemp("quality")
    ckpt, _ = trained_backbone(root)
    pairs = make_pairs_list(str(root / "pairs"), pairs=40, identities=10, size=IMAGE_SIZE)
    return ckpt, pairs


def run_quality(*argv) -> int:
    return quality.main([*map(str, argv), "--workers", "0"])


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_embeddings_that_are_a_folder_are_said_to_be_one(tmp_path, capsys):
    # (it said "no file at <folder>/.npy", a file nobody named)
    for named in (tmp_path, f"{tmp_path}{os.sep}"):
        assert run_quality("--embeddings", named, "--output", tmp_path / "q.csv") == 2
        assert capsys.readouterr().err == (f"quality: error: --embeddings {named} is a folder, not a table: --model M "
                                           f"--images {named} scores its faces\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_scores_trees_and_tables(trained, tmp_path, capsys):
    ckpt, pairs = trained
    faces = os.path.dirname(pairs)
    out = tmp_path / "quality.csv"
    assert run_quality("--model", ckpt, "--images", faces, "--output", out, "--sort", "--reject-fraction", 0.25,
                       "--tree", tmp_path / "tree") == 0
    assert "80 faces" in capsys.readouterr().err
    rows = read_csv(out)
    assert rows[0] == ["image", "quality", "rejected"] and len(rows) == 81
    values = [float(r[1]) for r in rows[1:]]
    assert values == sorted(values) and [r[2] for r in rows[1:]] == ["1"] * 20 + ["0"] * 60
    # The scores are train.embed --norms's, and a table it wrote with them is read as the folder is scored.
    table, norms = tmp_path / "e.npy", tmp_path / "norms.csv"
    assert embed_main(["--model", ckpt, "--images", faces, "--output", str(table), "--norms", str(norms),
                       "--workers", "0"]) == 0
    by_name = {r[0]: float(r[1]) for r in rows[1:]}
    assert {r[0]: float(r[1]) for r in read_csv(norms)[1:]} == by_name
    for source in (table, norms):
        assert run_quality("--embeddings", source, "--output", tmp_path / "t.csv", "--overwrite") == 0
        assert {r[0]: float(r[1]) for r in read_csv(tmp_path / "t.csv")[1:]} == by_name
    summary = json.loads((tmp_path / "quality.json").read_text())
    assert summary["faces_scored"] == 80 and summary["rejected"] == 20 and summary["model_weights_sha256"]
    assert summary["quantiles"]["0"] == pytest.approx(values[0], rel=1e-6)
    assert summary["highest_rejected"] == pytest.approx(values[19], rel=1e-6)
    # The tree: each image at its path, linked, under kept/ or rejected/.
    for name, _, out_ in rows[1:]:
        where = tmp_path / "tree" / ("rejected" if out_ == "1" else "kept") / name
        assert os.path.samefile(where, os.path.join(faces, name))
    assert len(os.listdir(tmp_path / "tree" / "rejected")) == 20

    # The norms file is a CSV table, which this tool reads by its .csv name: another name is refused before any
    # face is embedded (norms.npy was a CSV file named .npy, which --embeddings then read as a .npy table, "no
    # file at norms.txt").
    capsys.readouterr()
    for name in ("norms.npy", "norms"):
        assert embed_main(["--model", ckpt, "--images", faces, "--output", str(tmp_path / "n.npy"), "--norms",
                           str(tmp_path / name), "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert err == (f"embed: error: --norms {tmp_path / name}: the norms are a CSV table, image,norm: name a "
                       ".csv file (as train.tools.quality --embeddings reads them)\n"), err
        assert not os.path.exists(tmp_path / name) and not os.path.exists(tmp_path / "n.npy")

    # A table of unit rows that names no norms has no quality to give.
    assert embed_main(["--model", ckpt, "--images", faces, "--output", str(tmp_path / "plain.npy"),
                       "--workers", "0"]) == 0
    capsys.readouterr()
    assert run_quality("--embeddings", tmp_path / "plain.npy", "--output", tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert err.startswith("quality: error: --embeddings") and "records no norms file" in err and err.count("\n") == 1


def test_photos_through_landmarks_say_what_they_took(trained, tmp_path, capsys):
    # --landmarks: the faces a file lists in photos, said before they are embedded (nothing was said) and in the
    # summary. (The crops are aligned already: their landmarks are the template's, each aligned face the crop.)
    from train.ijb import arcface_template

    ckpt, pairs = trained
    faces = os.path.dirname(pairs)
    points = " ".join(f"{v:.4f}" for v in arcface_template(IMAGE_SIZE).ravel())
    names = sorted(os.path.relpath(os.path.join(root, f), faces) for root, _, files in os.walk(faces) for f in files
                   if f.endswith(".png"))
    (tmp_path / "landmarks.txt").write_text("".join(f"{name} {points}\n" for name in names))
    assert run_quality("--model", ckpt, "--images", faces, "--landmarks", tmp_path / "landmarks.txt", "--output",
                       tmp_path / "q.csv") == 0
    err = capsys.readouterr().err
    assert f"quality: embedding the faces {tmp_path / 'landmarks.txt'} lists in the photos under {faces} with {ckpt} " \
        f"({IMAGE_SIZE}px) on cpu\n" in err
    assert f"quality: {len(names)} faces: quality (feature norm) median" in err
    summary = json.loads((tmp_path / "q.json").read_text())
    assert summary["faces"] == f"aligned from the landmarks in {tmp_path / 'landmarks.txt'}"
    # Their --tree is an error that says to align them, with --all-faces too (it said to leave --all-faces out, as
    # for --detector, and without it the faces a landmarks file lists are no files to lay out either).
    for every in ([], ["--all-faces"]):
        assert run_quality("--model", ckpt, "--images", faces, "--landmarks", tmp_path / "landmarks.txt", *every,
                           "--output", tmp_path / "t.csv", "--reject-fraction", 0.25, "--tree", tmp_path / "tree") == 2
        said = f"aligned from the landmarks in {tmp_path / 'landmarks.txt'}{', every face' if every else ''}"
        assert capsys.readouterr().err == (f"quality: error: --tree: the faces are {said}, not image files to lay out: "
                                           "align them with train.tools.align, then score the crops\n")
    assert summary["images"] == os.path.abspath(faces) and summary["faces_scored"] == len(names) == 80


@pytest.mark.slow
def test_the_erc_of_a_pairs_list(trained, tmp_path, capsys):
    ckpt, pairs = trained
    faces = os.path.dirname(pairs)
    out = tmp_path / "erc.csv"
    assert run_quality("--model", ckpt, "--pairs", pairs, "--output", out) == 0
    err = capsys.readouterr().err
    # 20 impostor pairs measure FMR 1/20 at best: both default FMRs take it, said.
    assert "FMR 0.001, 0.01 cannot be measured on 20 impostor pairs" in err
    summary = json.loads((tmp_path / "erc.json").read_text())
    assert (summary["pairs_count"], summary["genuine"], summary["impostors"]) == (40, 20, 20)
    (row,) = summary["thresholds"]
    assert row["fmr"] == 0.05 and row["false_matches"] <= 1
    false_matches = "1 false match)" if row["false_matches"] == 1 else "0 false matches)"  # (not '1 false matches')
    assert f"FMR 0.05 (threshold {row['threshold']:.4f}, {false_matches}: FNMR" in err, err
    at = row["orderings"]
    assert at["random"]["auc_0_20"] == pytest.approx(0.2 * row["fnmr"])  # flat while genuine pairs are left
    assert at["oracle"]["auc_0_100"] <= at["norm"]["auc_0_100"]
    assert os.path.getsize(tmp_path / "erc.png") > 0
    rows = read_csv(out)
    assert rows[0] == ["ordering", "fmr", "reject", "fnmr"] and len(rows) == 1 + 3 * quality.CURVE_POINTS
    # The folder's scores as a quality file give the norm's own curve.
    assert run_quality("--model", ckpt, "--images", faces, "--output", tmp_path / "q.csv") == 0
    assert run_quality("--model", ckpt, "--pairs", pairs, "--output", tmp_path / "erc2.csv", "--quality-file",
                       tmp_path / "q.csv", "--fmr", "0.1", "--no-plot") == 0
    (row,) = json.loads((tmp_path / "erc2.json").read_text())["thresholds"]
    assert row["fmr"] == 0.1 and row["orderings"]["q.csv"] == row["orderings"]["norm"]
    assert not os.path.exists(tmp_path / "erc2.png")


@pytest.mark.slow
def test_bad_arguments_and_outputs(trained, tmp_path, capsys, monkeypatch):
    ckpt, pairs = trained
    faces = os.path.dirname(pairs)
    for argv, said in [
        (["--images", faces], "--images needs --model"),
        (["--model", ckpt, "--pairs", pairs, "--sort"], "--sort goes with --images"),
        (["--model", ckpt, "--images", faces, "--fmr", "0.01"], "--fmr goes with --pairs"),
        (["--model", ckpt, "--pairs", pairs, "--fmr", "0"], "false match rates lie above 0"),
        (["--model", ckpt, "--images", faces, "--tree", tmp_path / "t"], "--tree needs a rule"),
        (["--model", ckpt, "--images", faces, "--reject-fraction", "1"], "--reject-fraction is a share"),
        (["--model", ckpt, "--pairs", pairs, "--output", tmp_path / "e.txt"], "--output names a .csv"),
    ]:
        with pytest.raises(SystemExit) as stop:
            run_quality(*argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err
    q = tmp_path / "q.csv"
    q.write_text("image,quality\np000_0.png,1\n")
    not_a_bin = tmp_path / "x.bin"
    not_a_bin.write_bytes(b"\x80\x04K")  # (a pickle cut short)
    for argv, said in [
        (["--model", ckpt, "--pairs", not_a_bin, "--output", tmp_path / "e.csv"], "x.bin"),
        (["--model", ckpt, "--pairs", tmp_path / "none.txt", "--output", tmp_path / "e.csv"], "no such file"),
        (["--model", ckpt, "--pairs", pairs, "--quality-file", q, "--output", tmp_path / "e.csv"],
         "gives no quality for"),
        (["--model", ckpt, "--images", faces, "--output", tmp_path / "q.csv"], "exists: pass --overwrite"),
        (["--model", ckpt, "--images", faces, "--output", tmp_path / "x.csv", "--reject-below", "1", "--tree",
          faces], "overlap"),
    ]:
        assert run_quality(*argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("quality: error: ") and said in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["q.csv", "x.bin"]  # (nothing written by the runs refused)

    # A Ctrl-C before the outputs: nothing written. A SIGTERM as they are written: waits until all are whole.
    out = tmp_path / "erc.csv"

    def stop_early(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(quality, "erc_summary", stop_early)
    try:
        assert run_quality("--model", ckpt, "--pairs", pairs, "--output", out) == 130
    finally:  # the first stop leaves the signals ignored, for a process about to exit
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "quality: stopped by SIGINT: nothing written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["q.csv", "x.bin"]
    monkeypatch.undo()
    replace = os.replace

    def replace_then_signal(source, target):
        os.kill(os.getpid(), signal.SIGTERM)
        replace(source, target)
    monkeypatch.setattr(os, "replace", replace_then_signal)
    try:
        assert run_quality("--model", ckpt, "--pairs", pairs, "--output", out) == 143
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "stopped by SIGTERM as the outputs were written: they are whole" in capsys.readouterr().err
    assert sorted(f for f in os.listdir(tmp_path) if not f.startswith(".")) == ["erc.csv", "erc.json", "erc.png",
                                                                                "q.csv", "x.bin"]
    assert math.isfinite(json.loads((tmp_path / "erc.json").read_text())["thresholds"][0]["fnmr"])


def test_a_quality_file_is_checked_before_the_pairs_images_are_decoded(trained, tmp_path, capsys, monkeypatch):
    # A --quality-file that gives no quality for an image of a pairs list was said once all the list's images had
    # been decoded (a minute for LFW's 12,000).
    from train import verification

    ckpt, pairs = trained
    q = tmp_path / "q.csv"
    q.write_text("image,quality\np000_0.png,1\n")

    fail_if_called(monkeypatch, verification, "load_pairs_list",
                   "the pairs' images were decoded before --quality-file was checked")
    assert run_quality("--model", ckpt, "--pairs", pairs, "--quality-file", q, "--output", tmp_path / "e.csv") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quality: error: --quality-file {q} gives no quality for ") and err.count("\n") == 1, err


def test_a_pairs_or_quality_file_that_is_a_broken_symbolic_link_is_said_to_be_one(trained, tmp_path, capsys):
    # A link to a disk not mounted: "no such file" alone sent the user looking for the link, which is there
    # (3a1e680's checkpoint.dangling).
    ckpt, pairs = trained
    gone = tmp_path / "gone.txt"
    gone.symlink_to(tmp_path / "unmounted.txt")
    link = f"(a broken symbolic link to {tmp_path / 'unmounted.txt'})"
    assert run_quality("--model", ckpt, "--pairs", gone, "--output", tmp_path / "e.csv") == 2
    assert capsys.readouterr().err == f"quality: error: --pairs {gone}: no such file {link}\n"
    assert run_quality("--model", ckpt, "--pairs", pairs, "--quality-file", gone, "--output", tmp_path / "e.csv") == 2
    assert capsys.readouterr().err == f"quality: error: --quality-file {gone}: no such file {link}\n"
    assert sorted(os.listdir(tmp_path)) == ["gone.txt"]


def test_options_and_tables_it_cannot_score_or_lay_out_are_named(trained, tmp_path, capsys):
    # Each a one-line error naming the option or the file, exit 2, before anything is written.
    from train.embed import IMAGES_AS_THEY_ARE, write_table

    ckpt, _ = trained
    table = tmp_path / "norms.csv"
    write_table(str(table), ["a.png", "b.png"], np.array([[1.0], [2.0]], np.float32))
    for argv, said in [
        (["--embeddings", table, "--fmr", "1e-3,abc"], "argument --fmr: expected false match rates separated by "
                                                       "commas, got '1e-3,abc'"),
        (["--embeddings", table, "--model", ckpt], "--model goes with --images or --pairs"),
        (["--embeddings", table, "--reject-below", "nan"], "--reject-below is a quality, a finite number: got nan"),
        (["--embeddings", table, "--reject-below", "1", "--copy"], "--copy goes with --tree"),
        (["--model", ckpt, "--pairs", table, "--max-reject", "0"], "--max-reject is a share of the pairs, above 0 "
                                                                    "and at most 1: got 0"),
    ]:
        with pytest.raises(SystemExit) as stop:
            run_quality(*argv)
        last = capsys.readouterr().err.splitlines()[-1]
        assert stop.value.code == 2 and last.startswith(f"quality: error: {said}"), last
    images = tmp_path / "images"
    images.mkdir()
    write_table(str(tmp_path / "none.csv"), [], np.zeros((0, 4), np.float32))
    unit = np.eye(4, dtype=np.float32)[:2]
    for name, names, about in [("gone.npy", ["a.png", "b.png"], {"norms": str(tmp_path / "gone.csv")}),
                               ("other.npy", ["a.png", "c.png"], {"norms": str(table)}),
                               ("moved.npy", ["a.png", "b.png"], {"norms": str(table), "faces": IMAGES_AS_THEY_ARE,
                                                                  "images": str(tmp_path / "moved")}),
                               ("here.npy", ["a.png", "b.png"], {"norms": str(table), "faces": IMAGES_AS_THEY_ARE,
                                                                 "images": str(images)}),
                               # (a .json that does not say what its rows are, as train.ijb's --save-features
                               # tables: it said "the faces are None, not image files")
                               ("unsaid.npy", ["a.png", "b.png"], {"norms": str(table), "images": str(images)})]:
        write_table(str(tmp_path / name), names, unit, about=about)
    out, tree = tmp_path / "q.csv", tmp_path / "tree"
    rule = ["--reject-below", "1.5", "--tree", tree]
    (tmp_path / "dangling").symlink_to(tmp_path / "unmounted")
    for argv, said in [
        (["--embeddings", tmp_path / "none.csv"], f"--embeddings {tmp_path / 'none.csv'}: the table holds no faces"),
        (["--embeddings", tmp_path / "gone.npy"], f"--embeddings {tmp_path / 'gone.npy'}: {tmp_path / 'gone.csv'}, "
                                                  "the norms its .json names, is not there any more"),
        (["--embeddings", tmp_path / "other.npy"], f"--embeddings {tmp_path / 'other.npy'}: {table}, the norms its "
                                                   ".json names, lists other faces than the table"),
        (["--embeddings", table, *rule], f"--tree: {table} does not say where its images are"),
        (["--embeddings", tmp_path / "moved.npy", *rule], f"--tree: {tmp_path / 'moved'}, the folder of the images, "
                                                          "is not there any more"),
        (["--embeddings", tmp_path / "here.npy", *rule[:-1], tmp_path], f"--output {out} lies in --tree {tmp_path}"),
        (["--embeddings", tmp_path / "unsaid.npy", *rule],
         f"--tree: {tmp_path / 'unsaid.npy'}'s .json does not say what its rows are (its \"faces\", which train.embed "
         "writes and train.ijb's and train.tinyface's tables lack): score the folder of images with --images "
         "instead\n"),
        (["--model", ckpt, "--pairs", images], f"--pairs {images} is a folder: give one set's file"),
        # A --tree that is a file, lies in a file, or under one (what check_tree_folder says for every tool).
        (["--embeddings", tmp_path / "here.npy", *rule[:-1], table], f"--tree {table} exists and is not a folder"),
        (["--embeddings", tmp_path / "here.npy", *rule[:-1], table / "tree"],
         f"--tree: {table} is a file, not a folder to make tree in"),
        (["--embeddings", tmp_path / "here.npy", *rule[:-1], table / "in" / "tree"],
         f"--tree: cannot make the folder {table / 'in'}: {table} is a file"),
        # A link to nothing is said to be one (it was called a file).
        (["--embeddings", tmp_path / "here.npy", *rule[:-1], tmp_path / "dangling" / "tree"],
         f"--tree: {tmp_path / 'dangling'} is a broken symbolic link to {tmp_path / 'unmounted'}, not a folder to make "
         "tree in"),
        (["--embeddings", tmp_path / "here.npy", *rule[:-1], tmp_path / "dangling" / "in" / "tree"],
         f"--tree: cannot make the folder {tmp_path / 'dangling' / 'in'}: {tmp_path / 'dangling'} is a broken symbolic "
         f"link to {tmp_path / 'unmounted'}"),
        (["--embeddings", tmp_path / "here.npy", *rule[:-1], tmp_path / "dangling"],
         f"--tree {tmp_path / 'dangling'} exists and is not a folder (a broken symbolic link to "
         f"{tmp_path / 'unmounted'})"),
    ]:
        assert run_quality(*argv, "--output", out) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"quality: error: {said}") and err.count("\n") == 1, (said, err)
    assert not out.exists() and not tree.exists() and os.listdir(images) == []
    assert not os.path.lexists(tmp_path / "unmounted")


def test_outputs_beside_a_pairs_list(trained, tmp_path, capsys):
    # A pairs list's images are those it names: the figure may go in its folder (it was refused, 'erc.png is an
    # image's name in <the folder>', run from the folder of one's own pairs.txt), but never onto one of them.
    ckpt, pairs = trained
    faces = os.path.dirname(pairs)
    own = tmp_path / "pairs.txt"
    own.write_text("".join(f"{os.path.join(faces, a)} {os.path.join(faces, b)} {same}\n" for a, b, same in
                           (line.split() for line in open(pairs))))
    assert run_quality("--model", ckpt, "--pairs", own, "--output", tmp_path / "erc.csv") == 0
    assert os.path.getsize(tmp_path / "erc.png") > 0
    capsys.readouterr()
    face = os.path.join(faces, open(pairs).read().split()[0])
    assert run_quality("--model", ckpt, "--pairs", own, "--output", face[:-len(".png")] + ".csv", "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("quality: error: ") and "one of the files this run reads" in err and err.count("\n") == 1
    assert os.path.exists(face) and not os.path.exists(face[:-len(".png")] + ".csv")


def test_a_full_disk_as_the_summary_is_written_leaves_the_earlier_outputs(tmp_path, capsys, monkeypatch):
    # The table was renamed into place before its summary was written: a full disk there left the new table
    # beside the summary (the rule, the quantiles) of the run before.
    own = tmp_path / "own.csv"
    own.write_text("image,quality\n" + "".join(f"p{i}.jpg,{(i * 7 % 20) / 20:.2f}\n" for i in range(20)))
    out = tmp_path / "q.csv"
    assert run_quality("--embeddings", own, "--output", out, "--reject-fraction", 0.25) == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("q.csv", "q.json")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    assert run_quality("--embeddings", own, "--output", out, "--reject-fraction", 0.5, "--overwrite") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name.startswith(("q.", "."))} \
        == before  # (no temporary left either)


def test_a_full_disk_as_the_erc_summary_is_written_leaves_the_earlier_outputs(trained, tmp_path, capsys,
                                                                              monkeypatch):
    # The curves were renamed into place before their summary was written: a full disk there left the new curves
    # beside the summary (and the figure) of the run before.
    ckpt, pairs = trained
    out = tmp_path / "erc.csv"
    assert run_quality("--model", ckpt, "--pairs", pairs, "--output", out, "--no-plot") == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("erc.csv", "erc.json")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    assert run_quality("--model", ckpt, "--pairs", pairs, "--output", out, "--no-plot", "--fmr", "0.5",
                       "--overwrite") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_a_full_disk_as_the_erc_figure_is_drawn_leaves_the_earlier_outputs(trained, tmp_path, capsys, monkeypatch):
    # The figure was drawn after the curves and their summary had been renamed into place: a full disk there left
    # them beside the erc.png of the run before.
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    ckpt, pairs = trained
    out = tmp_path / "erc.csv"
    assert run_quality("--model", ckpt, "--pairs", pairs, "--output", out) == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("erc.csv", "erc.json", "erc.png")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    assert run_quality("--model", ckpt, "--pairs", pairs, "--output", out, "--fmr", "0.5", "--overwrite") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_its_own_table_rejected_again(trained, tmp_path, capsys):
    # Its --output, read back with --embeddings, is ruled again without embedding: the rejected column is not an
    # embedding's second value (it was: 'its rows are embeddings of unit length ... records no norms file'), and its
    # .json gives the images' folder for a tree.
    ckpt, pairs = trained
    faces = os.path.dirname(pairs)
    first = tmp_path / "quality.csv"
    assert run_quality("--model", ckpt, "--images", faces, "--output", first, "--reject-fraction", 0.25) == 0
    scored = {r[0]: float(r[1]) for r in read_csv(first)[1:]}
    below = sum(sorted(scored.values())[39:41]) / 2
    assert run_quality("--embeddings", first, "--output", tmp_path / "again.csv", "--reject-below", below, "--tree",
                       tmp_path / "tree") == 0
    rows = read_csv(tmp_path / "again.csv")
    assert {r[0]: float(r[1]) for r in rows[1:]} == scored
    assert sum(r[2] == "1" for r in rows[1:]) == 40
    assert len(os.listdir(tmp_path / "tree" / "rejected")) == 40
    summary = json.loads((tmp_path / "again.json").read_text())
    assert summary["images"] == os.path.abspath(faces) and summary["model"] == os.path.abspath(ckpt)


def assert_same_scores(rows, expected):
    """The same faces, in the same order, with the same qualities to 1e-5: a face aligned from a photo
    (the crop placed elsewhere, the warp's sums in another order) differs from its crop in the last of
    the 7 digits written on some CPUs ('6.353842' against '6.353841')."""
    assert [name for name, _ in rows] == [name for name, _ in expected]
    assert [float(q) for _, q in rows] == pytest.approx([float(q) for _, q in expected], rel=1e-5), (rows, expected)


@pytest.mark.slow
def test_photos_with_a_detector_score_as_their_aligned_faces(trained, tmp_path, capsys):
    """--detector: each photo's main face found and aligned (the stand-in detector of detector_fixtures, whose
    faces aligned are known crops) is scored as those crops are, its detection score a column beside the
    quality, kept when the table is ruled again; a photo without a face is left out with a warning (exit
    status 1); --tree lays out the photos (not with --all-faces, whose rows are faces of a photo); a bad
    --detector is a one-line error."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from detector_fixtures import crops_and_photos, face_detector, photo_of_faces
    from train.data.synthetic import render_face

    ckpt, _ = trained
    detector = face_detector(tmp_path / "det.onnx")
    faces = {f"p{who}/{sample}.png": render_face(0, who, 700 + sample, 112) for who in range(4) for sample in range(2)}
    crops, photos = tmp_path / "crops", tmp_path / "photos"
    crops_and_photos(faces, IMAGE_SIZE, crops, photos)
    photo_of_faces([], []).save(photos / "nobody.png")
    assert run_quality("--model", ckpt, "--images", crops, "--output", tmp_path / "crops.csv") == 0
    capsys.readouterr()
    assert run_quality("--model", ckpt, "--images", photos, "--detector", detector, "--output", tmp_path / "q.csv",
                       "--reject-fraction", 0.25, "--tree", tmp_path / "tree") == 1
    err = capsys.readouterr().err
    assert f"warning: {photos / 'nobody.png'}: no face scores 0.5 or more" in err
    assert "; 1 photo left out (the warnings above say why); wrote" in err
    rows = read_csv(tmp_path / "q.csv")
    assert rows[0] == ["image", "quality", "detector_score", "rejected"]
    assert_same_scores([r[:2] for r in rows[1:]], read_csv(tmp_path / "crops.csv")[1:])
    assert {r[2] for r in rows[1:]} == {"0.9996"} and sum(r[3] == "1" for r in rows[1:]) == 2
    summary = json.loads((tmp_path / "q.json").read_text())
    assert summary["left_out"] == 1 and summary["faces"] == f"found and aligned by {os.path.abspath(detector)}"
    for name, _, _, out in rows[1:]:
        assert os.path.samefile(tmp_path / "tree" / ("rejected" if out == "1" else "kept") / name, photos / name)
    # Ruled again from the table: the detection scores stay.
    assert run_quality("--embeddings", tmp_path / "q.csv", "--output", tmp_path / "again.csv", "--sort") == 0
    again = read_csv(tmp_path / "again.csv")
    assert again[0] == ["image", "quality", "detector_score"] and sorted(again[1:]) == sorted(r[:3] for r in rows[1:])

    # Every face of a group photo, numbered; such rows are not photos to lay out.
    group = tmp_path / "group"
    group.mkdir()
    photo_of_faces([faces["p0/0.png"], faces["p1/0.png"]], [(64, 64), (320, 400)]).save(group / "g.png")
    assert run_quality("--model", ckpt, "--images", group, "--detector", detector, "--all-faces", "--output",
                       tmp_path / "g.csv") == 0
    by_crop = {r[0]: r[1] for r in read_csv(tmp_path / "crops.csv")[1:]}
    assert_same_scores([r[:2] for r in read_csv(tmp_path / "g.csv")[1:]], [["g.png#1", by_crop["p0/0.png"]],
                                                                            ["g.png#2", by_crop["p1/0.png"]]])
    capsys.readouterr()
    assert run_quality("--model", ckpt, "--images", group, "--detector", detector, "--all-faces", "--output",
                       tmp_path / "h.csv", "--reject-below", 1, "--tree", tmp_path / "t2") == 2
    err = capsys.readouterr().err
    assert err.startswith("quality: error: --tree lays out photos, a row each, and --all-faces makes a row of each "
                          "face of a photo: without --all-faces") and err.count("\n") == 1
    # A train.embed --detector table without norms: scoring it again needs the same --detector, and the error says so.
    assert embed_main(["--model", ckpt, "--images", str(crops.parent / "photos"), "--detector", str(detector),
                       "--output", str(tmp_path / "plain.npy"), "--workers", "0"]) == 1
    capsys.readouterr()
    assert run_quality("--embeddings", tmp_path / "plain.npy", "--output", tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert err.endswith("score the faces with the model, --model M --images DIR with the --landmarks or --detector "
                        f"it was made with (its faces: found and aligned by {os.path.abspath(detector)})\n")
    assert err.count("\n") == 1

    (tmp_path / "not.onnx").write_text("not a graph\n")
    for bad, said in ((tmp_path / "missing.onnx", "no such file"), (group, "a folder, not"),
                      (tmp_path / "not.onnx", "onnxruntime cannot load it")):
        assert run_quality("--model", ckpt, "--images", photos, "--detector", bad, "--output", tmp_path / "x.csv") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"quality: error: --detector {bad}: {said}") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "x.csv")
    for argv, said in ((["--embeddings", tmp_path / "q.csv", "--detector", detector], "--detector goes with --images"),
                       (["--model", ckpt, "--images", photos, "--detector", detector, "--landmarks", "l.txt"],
                        "--detector and --landmarks are two ways")):
        with pytest.raises(SystemExit):
            run_quality(*argv)
        assert said in capsys.readouterr().err
