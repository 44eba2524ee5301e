"""RFW (Racial Faces in-the-Wild): its release read as four verification sets, in its own folds, its loose
crops aligned from its landmarks, the summary papers report (mean, std across races, skewed error ratio), in
`train.verify` and in training's verification; a small RFW-shaped tree written here."""

import json
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import arcface_ext
from train import checkpoint, rfw, verify
from train.data import build_verification_sets
from train.data.synthetic import render_face
from train.ijb import ARCFACE_TEMPLATE
from train.verification import NFOLDS, THRESHOLDS, _fold_slices, compute_embeddings, evaluate, read_pairs_list

from trainer_fixtures import base_argv, make_face_folder, one_thread, read_jsonl, train_one_thread  # noqa: F401

LOSS_IMPL = "fused" if arcface_ext.extension_available() else "reference"
IDENTITIES, IMAGES = 4, 3  # a race's identities, and each one's images
FACE, LOOSE = 24, 40  # the face's side in a loose crop, the loose crop's side
SIZE = 32  # the model's input


def identity(race, k):
    return f"m.0{race[:2].lower()}{k}"


def rfw_lines(race):
    """A race's pairs file, RFW's way: per fold one matched line 'id n1 n2' then one mismatched 'id1 n1 id2 n2'
    (RFW's folds are 300 of each), 10 folds."""
    lines = []
    for fold in range(NFOLDS):
        a, b = fold % IDENTITIES, (fold + 1) % IDENTITIES
        n1, n2 = 1 + fold % IMAGES, 1 + (fold + 1) % IMAGES
        lines.append(f"{identity(race, a)}\t{n1}\t{n2}\n")
        lines.append(f"{identity(race, a)}\t{n2}\t{identity(race, b)}\t{n1}\n")
    return lines


def write_rfw(root, *, landmarks=True):
    """RFW's test tree under root: data/<Race>/<id>/<id>_<NNNN>.jpg, loose crops with the face somewhere in
    them (or, without ``landmarks``, aligned crops), and txts/<Race>/<Race>_pairs.txt, _lmk.txt. Returns
    {(race, image path): the face as drawn} for the loose crops."""
    faces = {}
    for r, race in enumerate(rfw.RACES):
        os.makedirs(root / "txts" / race)
        lmk = []
        for k in range(IDENTITIES):
            who = identity(race, k)
            os.makedirs(root / "data" / race / who)
            for n in range(1, IMAGES + 1):
                face = render_face(r, k, n, FACE)
                path = root / "data" / race / who / f"{who}_{n:04d}.jpg"
                if not landmarks:
                    Image.fromarray(render_face(r, k, n, SIZE)).save(path, quality=95)
                    continue
                x, y = 2 + (3 * k + n) % 12, 3 + (5 * k + 2 * n) % 12  # where the face is
                loose = np.full((LOOSE, LOOSE, 3), 90 + 20 * r, dtype=np.uint8)
                loose[y:y + FACE, x:x + FACE] = face
                Image.fromarray(loose).save(path, quality=95)
                faces[race, str(path)] = face
                points = ARCFACE_TEMPLATE * FACE / 112 + [x, y]
                lmk.append(f"test/data/{race}/{who}/{who}_{n:04d}.jpg\t{k}\t"
                           + "\t".join(f"{v:.3f}" for v in points.reshape(-1)) + "\n")
        (root / "txts" / race / f"{race}_pairs.txt").write_text("".join(rfw_lines(race)))
        if landmarks:
            (root / "txts" / race / f"{race}_lmk.txt").write_text("".join(lmk))
    return faces


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release as it unpacks (RFW/images/test/...), a checkpoint of a run that verified on it at its
    end, and each loose crop's face."""
    root = tmp_path_factory.mktemp("rfw")
    faces = write_rfw(root / "RFW" / "images" / "test")
    data = make_face_folder(str(root / "faces"), identities=4, images=4)
    argv = base_argv(data, str(root / "run"), pairs=str(root / "RFW"), batch_size=8, max_steps=2,
                     loss_impl=LOSS_IMPL, eval_every=2)
    assert train_one_thread(argv) == 0
    return root / "RFW", str(root / "run" / "checkpoint.pt"), faces


def test_the_release_is_four_sets_in_rfws_folds(release):
    folder, _, _ = release
    test = folder / "images" / "test"
    for given in (folder, folder / "images", test):  # the release's folder, or one below it
        assert rfw.find_release(str(given)).root == str(test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the landmarks fit the face template: no note)
        sets = build_verification_sets("", [str(folder)], image_size=SIZE)
    assert list(sets) == [f"RFW/{race}" for race in rfw.RACES]
    for race in rfw.RACES:
        vset = sets[f"RFW/{race}"]
        assert vset.group == "RFW" and vset.num_pairs == 2 * NFOLDS and vset.images.shape[2:] == (SIZE, SIZE)
        pairs, issame, line_nos = rfw.read_pairs(str(test / "txts" / race / f"{race}_pairs.txt"),
                                                 str(test / "data" / race))
        assert line_nos == list(range(1, 2 * NFOLDS + 1))
        # The pairs in file order: fold k of the accuracy is the file's k-th fold (its matched line, then its
        # mismatched one), as RFW's 6,000 lines are 10 folds of 300 matched then 300 mismatched.
        for k, fold in enumerate(_fold_slices(vset.num_pairs, NFOLDS)):
            assert fold.tolist() == [2 * k, 2 * k + 1] and vset.issame[fold].tolist() == [True, False]
            matched, mismatched = rfw_lines(race)[2 * k].split(), rfw_lines(race)[2 * k + 1].split()
            assert pairs[2 * k] == tuple(str(test / "data" / race / matched[0] / f"{matched[0]}_{int(n):04d}.jpg")
                                         for n in matched[1:])
            assert pairs[2 * k + 1] == tuple(str(test / "data" / race / who / f"{who}_{int(n):04d}.jpg")
                                             for who, n in (mismatched[:2], mismatched[2:]))


def test_loose_crops_are_aligned_from_their_landmarks(release):
    folder, _, faces = release
    vset = build_verification_sets("", [str(folder)], image_size=SIZE)["RFW/Asian"]
    pairs, _, _ = rfw.read_pairs(str(folder / "images/test/txts/Asian/Asian_pairs.txt"),
                                 str(folder / "images/test/data/Asian"))
    for k, pair in enumerate(pairs[:4]):
        for j, path in enumerate(pair):
            crop = vset.images[2 * k + j].permute(1, 2, 0).numpy().astype(float)
            # The face as drawn, scaled to the crop: the landmarks were read as x, y and put it there.
            drawn = np.asarray(Image.fromarray(faces["Asian", path]).resize((SIZE, SIZE), Image.Resampling.BILINEAR),
                               float)
            assert np.abs(crop - drawn).mean() < 12, (path, np.abs(crop - drawn).mean())
            # ... and elsewhere in the loose crop it is not.
            assert np.abs(crop - np.roll(drawn, 6, axis=1)).mean() > 2 * np.abs(crop - drawn).mean()


def tiny_backbone():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 16))


def fold_accuracies(embeddings, issame):
    """The 10-fold accuracy written out: fold k is the file's k-th tenth; its threshold, of the grid, is the
    first most accurate on the other nine."""
    e1, e2 = embeddings[0::2], embeddings[1::2]
    dist = ((e1 - e2) ** 2).sum(axis=1)
    tenth = len(issame) // NFOLDS
    accuracies = []
    for k in range(NFOLDS):
        test = np.zeros(len(issame), bool)
        test[k * tenth:(k + 1) * tenth] = True
        train_acc = [np.mean((dist[~test] < t) == issame[~test]) for t in THRESHOLDS]
        best = THRESHOLDS[int(np.argmax(train_acc))]
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
    return float(np.mean(accuracies))


def test_the_summary_is_mean_std_and_skewed_error_ratio(release):
    folder, _, _ = release
    sets = build_verification_sets("", [str(folder)], image_size=SIZE)
    backbone = tiny_backbone()
    results = {name: evaluate(backbone, vset, device="cpu", batch_size=16) for name, vset in sets.items()}
    accuracies = {}
    for name, vset in sets.items():
        embeddings = compute_embeddings(backbone, vset, device="cpu", batch_size=16, dtype=np.float64)
        accuracies[name.split("/")[1]] = fold_accuracies(embeddings, vset.issame)
        assert results[name]["accuracy"] == pytest.approx(accuracies[name.split("/")[1]], abs=1e-12)
    got = rfw.summaries(rfw.grouped_accuracies(sets, results))["RFW"]
    values = list(accuracies.values())
    mean = sum(values) / 4
    errors = {race: 1 - acc for race, acc in accuracies.items()}
    assert got["accuracies"] == pytest.approx(accuracies)
    assert got["mean"] == pytest.approx(mean)
    assert got["std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 4) ** 0.5)  # over the 4, not 3
    assert got["ser"] == pytest.approx(max(errors.values()) / min(errors.values()))
    assert errors[got["largest_error"]] == max(errors.values())
    assert errors[got["smallest_error"]] == min(errors.values())
    # No error on one race: no ratio (None in JSON), said so.
    perfect = rfw.summary({"African": 0.9, "Asian": 0.95, "Caucasian": 1.0, "Indian": 0.92})
    assert perfect["ser"] is None and perfect["smallest_error"] == "Caucasian"
    assert "SER undefined (African's error 0.1000 over Caucasian's 0.0000)" in rfw.summary_line("RFW", perfect)


def test_verify_prints_each_race_and_the_summary(release, tmp_path, capsys):
    folder, ckpt, _ = release
    output = tmp_path / "rfw.json"
    assert verify.main(["--model", ckpt, "--targets", str(folder), "--batch-size", "8", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    result = json.loads(output.read_text())
    races = {race: result["targets"][f"RFW/{race}"] for race in rfw.RACES}
    summary = result["summaries"]["RFW"]
    for race, got in races.items():
        assert f"RFW/{race}: accuracy {got['accuracy']:.4f} ± {got['accuracy_std']:.4f}" in out
        assert got["pairs"] == 2 * NFOLDS
    accuracies = np.array([got["accuracy"] for got in races.values()])
    assert summary["mean"] == pytest.approx(accuracies.mean()) and summary["std"] == pytest.approx(accuracies.std())
    assert rfw.summary_line("RFW", summary) in out
    # The run verified on the same release at its end: the same figures.
    recorded = checkpoint.load(ckpt)["verification"]
    for race, got in races.items():
        for key in ("accuracy", "accuracy_std", "threshold"):
            assert got[key] == recorded[f"RFW/{race}"][key], (race, key)
    # The release's other form, its four <Race>_test.bin, of the same crops: the same figures.
    bins = tmp_path / "bins"
    os.makedirs(bins)
    sets = build_verification_sets("", [str(folder)], image_size=SIZE)
    for race in rfw.RACES:
        vset = sets[f"RFW/{race}"]
        encoded = []
        for image in vset.images:
            path = tmp_path / "crop.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
            encoded.append(path.read_bytes())
        with open(bins / f"{race}_test.bin", "wb") as f:
            pickle.dump((encoded, vset.issame.tolist()), f)
    assert verify.main(["--model", ckpt, "--targets", str(bins), "--batch-size", "8",
                        "--output", str(tmp_path / "bins.json")]) == 0
    from_bins = json.loads((tmp_path / "bins.json").read_text())
    assert from_bins["targets"] == result["targets"] and from_bins["summaries"] == result["summaries"]


def test_training_logs_the_summary(release):
    folder, ckpt, _ = release
    run = os.path.dirname(ckpt)
    records = read_jsonl(os.path.join(run, "verification.jsonl"))
    assert sorted(r["target"] for r in records if r["step"] == 2) == [f"RFW/{race}" for race in rfw.RACES]
    accuracies = {r["target"].split("/")[1]: r["accuracy"] for r in records if r["step"] == 2}
    with open(os.path.join(run, "training.log")) as f:
        log = f.read()
    assert f"[step 2] {rfw.summary_line('RFW', rfw.summary(accuracies))}" in log
    assert all(r["group"] == "RFW" for r in records)


def test_the_saved_threshold_counts_rfw_as_one_set():
    # backbone.json's threshold is the sets' mean: RFW's four races beside LFW outweighed it 4 to 1.
    races = {f"RFW/{race}": {"threshold": 1.4 + 0.1 * k, "group": "RFW"} for k, race in enumerate(rfw.RACES)}
    results = {"lfw": {"threshold": 1.0}, **races, "cfp_fp": {"threshold": 1.2}}
    assert checkpoint.mean_threshold(results) == pytest.approx((1.0 + 1.55 + 1.2) / 3)
    state = {"args": {"network": "r18", "embedding_size": 512, "image_size": 112}, "verification": results}
    assert checkpoint.recorded_settings(state, "x.pt")["threshold"] == pytest.approx((1.0 + 1.55 + 1.2) / 3)
    # A checkpoint from before records had a group: each set its own.
    old = {name: {"threshold": r["threshold"]} for name, r in results.items()}
    assert checkpoint.mean_threshold(old) == pytest.approx((1.0 + 1.4 + 1.5 + 1.6 + 1.7 + 1.2) / 6)


def test_aligned_crops_without_landmarks_are_read_as_they_are(tmp_path):
    write_rfw(tmp_path / "RFW", landmarks=False)
    # Said: a release whose landmarks files are elsewhere would be read so, its loose crops as faces.
    with pytest.warns(UserWarning, match=f"RFW folder {tmp_path / 'RFW'}: no <Race>_lmk.txt in txts/: its images are "
                                         r"read as crops aligned already \(the release's are loose crops"):
        sets = build_verification_sets("", [str(tmp_path / "RFW")], image_size=SIZE)
    vset = sets["RFW/Indian"]
    first = tmp_path / "RFW/data/Indian" / identity("Indian", 0) / f"{identity('Indian', 0)}_0001.jpg"
    assert torch.equal(vset.images[0], torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1))


@pytest.fixture
def tree(release, tmp_path):
    """A copy of the release's test tree to break."""
    copy = tmp_path / "RFW"
    shutil.copytree(release[0] / "images" / "test", copy)
    return copy


def first_image(race="African"):
    who = identity(race, 0)
    return f"data/{race}/{who}/{who}_0001.jpg"


@pytest.mark.parametrize("breaks, error", [
    (lambda t: os.remove(t / "txts/Indian/Indian_pairs.txt"),
     "RFW folder {t}: no txts/Indian/Indian_pairs.txt (RFW's summary needs its four races)"),
    (lambda t: shutil.rmtree(t / "data/Asian"),
     "RFW folder {t}: no data/Asian/ folder of images for txts/Asian/Asian_pairs.txt"),
    # Some races' landmarks and not the others': half the races would be read as aligned crops.
    (lambda t: os.remove(t / "txts/Asian/Asian_lmk.txt"),
     "RFW folder {t}: no txts/Asian/Asian_lmk.txt, where African, Caucasian, Indian have theirs: each race's loose "
     "crops are aligned from its landmarks"),
    (lambda t: shutil.rmtree(t / "txts"),
     "{t} is a folder but not RFW's: no <Race>_test.bin in it, and no txts/ in it, in test/ or in images/test/"),
    (lambda t: os.remove(t / first_image()),
     "{t}/txts/African/African_pairs.txt: line 1: no image m.0af0_0001.jpg (nor m.0af0_0001 as .jpeg, .png, .bmp) "
     "in {t}/data/African/m.0af0 (RFW's pairs name data/<Race>/<id>/<id>_<NNNN>.jpg)"),
    (lambda t: (t / "txts/Asian/Asian_pairs.txt").write_text("m.0as0\t1\t2\nm.0as0\tone\tm.0as1\t2\n"),
     "{t}/txts/Asian/Asian_pairs.txt: line 2: expected RFW's 'id n1 n2' (a matched pair) or 'id1 n1 id2 n2' (a "
     "mismatched one), got 'm.0as0\\tone\\tm.0as1\\t2'"),
    # Not text (an image saved under the name): the file and line, not the decoder's bare message.
    (lambda t: shutil.copy(t / first_image(), t / "txts/Asian/Asian_pairs.txt"),
     "{t}/txts/Asian/Asian_pairs.txt: line 1: not UTF-8 text (invalid start byte, byte 0xff): a text file was "
     "expected"),
    (lambda t: (t / "txts/Indian/Indian_lmk.txt").write_bytes(
        (t / "txts/Indian/Indian_lmk.txt").read_bytes().replace(b"\n", b"\n\xe9", 2)),
     "{t}/txts/Indian/Indian_lmk.txt: line 2: not UTF-8 text"),
    (lambda t: (t / "txts/African/African_lmk.txt").write_text(
        (t / "txts/African/African_lmk.txt").read_text().replace("\t0\t", "\t", 1)),
     "{t}/txts/African/African_lmk.txt: line 1: expected RFW's '<image path> <label> x1 y1 ... x5 y5' (12 fields, "
     "the coordinates finite numbers), got"),
    (lambda t: (t / "txts/African/African_lmk.txt").write_text(
        "".join((t / "txts/African/African_lmk.txt").read_text().splitlines(True)[1:])),
     "{t}/txts/African/African_pairs.txt: line 1: m.0af0/m.0af0_0001.jpg has no landmarks in "
     "{t}/txts/African/African_lmk.txt (1 such image(s) of African)"),
    (lambda t: (t / first_image()).write_bytes(b"not a jpeg"),
     "RFW African: 1 of 12 images could not be aligned: {t}/txts/African/African_lmk.txt: line 1: "
     "{t}/" + first_image() + ": cannot read the image"),
    (lambda t: Image.new("RGB", (8, 8)).save(t / first_image()),
     "RFW African: 1 of 12 images could not be aligned: {t}/txts/African/African_lmk.txt: line 1: {t}/"
     + first_image() + ": its landmarks lie outside the 8x8 image"),
])
def test_errors_name_the_file_and_line(tree, breaks, error):
    breaks(tree)
    with pytest.raises((OSError, ValueError)) as caught:
        build_verification_sets("", [str(tree)], image_size=SIZE)
    assert str(caught.value).startswith(error.format(t=tree)), str(caught.value)


def test_landmarks_in_another_order_are_said(tree):
    """y before x (a column misread): the crops would not be faces' crops, and a warning says so."""
    path = tree / "txts/Caucasian/Caucasian_lmk.txt"
    lines = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        lines.append("\t".join(fields[:2] + [v for x, y in zip(fields[2::2], fields[3::2]) for v in (y, x)]) + "\n")
    path.write_text("".join(lines))
    with pytest.warns(UserWarning, match=f"{path}: the landmarks fit the face template poorly"):
        build_verification_sets("", [str(tree)], image_size=SIZE)


def test_errors_in_verify(release, tree, tmp_path, capsys):
    _, ckpt, _ = release
    (tree / first_image()).write_bytes(Image.new("RGB", (SIZE, SIZE)).tobytes()[:10])
    assert verify.main(["--model", ckpt, "--targets", str(tree)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("verify: error: RFW African: 1 of 12 images could not be aligned: "
                          f"{tree}/txts/African/") and \
        "\n" not in err
    # A landmarks off their image: aligned crops in a tree that kept RFW's landmarks. The hint says what to do.
    Image.new("RGB", (8, 8)).save(tree / first_image())
    assert verify.main(["--model", ckpt, "--targets", str(tree)]) == 2
    assert "a tree of aligned crops is read as it is without txts/African/African_lmk.txt" in capsys.readouterr().err
    # A race's pairs file given alone: its images are not in its folder, nor are the other races.
    pairs = tree / "txts/Asian/Asian_pairs.txt"
    with pytest.raises(ValueError, match="is a line of LFW's pairs, but the file has no header 'sets n' before it: "
                                         "RFW's <Race>_pairs.txt"):
        read_pairs_list(str(pairs))
    # One .bin of the four.
    os.makedirs(tmp_path / "bins")
    shutil.copy(tmp_path / "RFW" / first_image(), tmp_path / "bins" / "African_test.bin")
    assert verify.main(["--model", ckpt, "--targets", str(tmp_path / "bins")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"verify: error: RFW folder {tmp_path / 'bins'}: it holds African_test.bin but not Asian_test.bin, "
        "Caucasian_test.bin, Indian_test.bin: RFW's summary needs its four races")
    # --output is never one of the files the release holds.
    assert verify.main(["--model", ckpt, "--targets", str(tree), "--output", str(pairs), "--overwrite"]) == 2
    assert "is one of the files this run reads" in capsys.readouterr().err
    assert verify.main(["--model", ckpt, "--targets", str(tree), "--output", str(tree / "data/African/x.png")]) == 2
    assert "is an image's name in" in capsys.readouterr().err


@pytest.mark.slow
def test_a_folder_named_as_a_name_is_said(release, tmp_path, monkeypatch, capsys):
    """--targets RFW, with RFW a folder here: a name, looked for as <data>/RFW.bin (or a synthetic set); the
    message says to write its path."""
    folder, ckpt, _ = release
    monkeypatch.chdir(folder.parent)
    with pytest.raises(SystemExit):
        verify.main(["--model", ckpt, "--targets", "RFW"])
    assert "pass --data, or the path of a .bin or pairs list or of RFW's folder (RFW is a folder here: write its " \
        "path, ./RFW)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="'RFW' is a synthetic set; RFW is a folder here: write its path"):
        assert list(build_verification_sets("synthetic", ["RFW"], image_size=SIZE)) == ["RFW"]
    with pytest.warns(UserWarning, match=r"no RFW.bin in .*; skipped; RFW is a folder here: write its path \(./RFW\)"):
        assert build_verification_sets(str(tmp_path), ["RFW"], image_size=SIZE) == {}
    assert list(build_verification_sets(str(tmp_path), ["./RFW"], image_size=SIZE)) == \
        [f"RFW/{race}" for race in rfw.RACES]
    # RFW's folder in the data folder, beside its .bin files (insightface's layout): its path is named.
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=rf"no RFW.bin in .*; skipped; {folder} is a folder: write its path to read "
                                         "it$"):
        assert build_verification_sets(str(folder.parent), ["RFW"], image_size=SIZE) == {}


def test_the_summary_scalars(tmp_path):
    """Training's TensorBoard / W&B scalars of the summary (no SER where a race made no error)."""
    from train.trainer import RunLog

    log = RunLog(str(tmp_path), 0, tensorboard=False)
    seen = []
    log._scalars = lambda step, scalars: seen.append((step, scalars))
    log.verification_summary(4, "RFW", rfw.summary({"African": 0.8, "Asian": 0.9, "Caucasian": 0.95, "Indian": 0.85}))
    log.verification_summary(5, "RFW", rfw.summary({"African": 0.8, "Asian": 0.9, "Caucasian": 1.0, "Indian": 0.85}))
    assert seen[0][0] == 4 and seen[0][1] == pytest.approx({"verification/RFW_mean": 0.875,
                                                            "verification/RFW_std": np.std([0.8, 0.9, 0.95, 0.85]),
                                                            "verification/RFW_ser": 4.0})
    assert seen[1][0] == 5 and set(seen[1][1]) == {"verification/RFW_mean", "verification/RFW_std"}
