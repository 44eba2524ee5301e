"""TinyFace 1:N identification (`python -m train.tinyface`): the ranks against a brute-force search,
the folders and file names read as the release names them, and the tool end to end on a tiny
synthetic release, with a model and with saved features."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from train import checkpoint, tinyface
from train.data.synthetic import render_face
from train.embed import embed_files, load_model, model_digests, read_table, write_table
from train.models import get_model

from trainer_fixtures import IMAGE_SIZE, one_thread  # noqa: F401


def brute_force_ranks(probes, probe_labels, gallery, gallery_labels):
    ranks = []
    for probe, label in zip(probes.astype(np.float64), probe_labels):
        scores = gallery.astype(np.float64) @ probe
        mates = gallery_labels == label
        if not mates.any():
            ranks.append(0)
            continue
        best = scores[mates].max()
        ranks.append(1 + int(np.sum(scores[~mates] >= best)))
    return np.array(ranks)


def test_mate_ranks_match_a_brute_force_search_ties_included():
    rng = np.random.default_rng(0)
    # Few distinct values: many exact ties between mates and non-mates.
    gallery = rng.integers(-2, 3, (300, 8)).astype(np.float32)
    probes = rng.integers(-2, 3, (70, 8)).astype(np.float32)
    gallery_labels = np.concatenate([rng.integers(0, 30, 200), np.full(100, -1)])
    probe_labels = rng.integers(0, 35, 70)  # some identities the gallery lacks
    got = tinyface.mate_ranks(probes, probe_labels, gallery, gallery_labels, chunk=16)
    expected = brute_force_ranks(probes, probe_labels, gallery, gallery_labels)
    assert np.array_equal(got, expected), np.flatnonzero(got != expected)[:5]
    assert (got == 0).any() and (got > 1).any() and (got == 1).any()
    with pytest.raises(ValueError, match="the gallery is empty"):
        tinyface.mate_ranks(probes, probe_labels, gallery[:0], gallery_labels[:0])


def test_identities_are_the_file_names_numbers():
    assert tinyface.identities(["Probe/12_3.jpg", "Gallery_Match/0012_1.png", "x/40.jpg", "y/7_3_x.jpg"]).tolist() == [
        12, 12, 40, 7]
    for name in ("Probe/a_1.jpg", "Probe/\u00b2_1.jpg", "Probe/\u0663_1.jpg", "Probe/99999999999999999999_1.jpg"):
        with pytest.raises(ValueError, match="expected TinyFace's <identity>_<n> file name"):
            tinyface.identities(["Probe/1_1.jpg", name])


PROBE_IDS, MATCH_PER_ID, DISTRACTORS = (3, 5, 8, 13), 2, 6


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyface")
    data = root / "Testing_Set"
    for folder in tinyface.FOLDERS:
        (data / folder).mkdir(parents=True)
    for who in PROBE_IDS:
        Image.fromarray(render_face(0, who, 0, 20)[:, 2:18]).save(data / "Probe" / f"{who}_1.jpg")  # 20 x 16
        for k in range(MATCH_PER_ID):
            Image.fromarray(render_face(0, who, k + 1, 20)).save(data / "Gallery_Match" / f"{who}_{k + 1}.jpg")
    for k in range(DISTRACTORS):
        Image.fromarray(render_face(0, 100 + k, 0, 20)).save(data / "Gallery_Distractor" / f"{1000 + k}.jpg")
    torch.manual_seed(0)
    model = get_model("small", embedding_size=32, image_size=IMAGE_SIZE)
    path = str(root / "backbone.pt")
    checkpoint.save_atomic(model.state_dict(), path)
    with open(root / "backbone.json", "w") as f:
        json.dump({"network": "small", "embedding_size": 32, "image_size": IMAGE_SIZE}, f)
    return str(data), path


def test_the_tool_ranks_what_the_model_embeds(release, tmp_path, capsys):
    data, model_path = release
    out, table = tmp_path / "tinyface.json", tmp_path / "features.npy"
    assert tinyface.main(["--model", model_path, "--data-root", data, "--device", "cpu", "--workers", "0",
                          "--output", str(out), "--save-features", str(table)]) == 0
    result = json.loads(out.read_text())
    assert (result["probes"], result["gallery_match"], result["gallery_distractors"], result["identities"]) == (
        4, 8, DISTRACTORS, 4)
    assert "TinyFace: 4 probes searched among 8 gallery images and 6 distractors" in capsys.readouterr().out
    protocol = tinyface.TinyFaceProtocol(data)
    model, _ = checkpoint.load_backbone(model_path)
    features = embed_files(model, [os.path.join(data, n) for n in protocol.image_names], IMAGE_SIZE)
    probes, gallery = features[:4], features[4:]
    ranks = brute_force_ranks(probes, protocol.probe_labels, gallery, protocol.gallery_labels)
    assert result["rank"] == {str(k): pytest.approx(float(np.mean(ranks <= k))) for k in tinyface.RANKS}
    names, saved = read_table(str(table))
    assert names == protocol.image_names and names[0] == os.path.join("Probe", "13_1.jpg")
    np.testing.assert_allclose(saved / np.linalg.norm(saved, axis=1, keepdims=True), features, atol=1e-5)
    about = json.loads((tmp_path / "features.npy.json").read_text())
    assert (about["made_by"], about["model"], about["flip"], about["image_size"], about["rows"]) == (
        "train.tinyface", os.path.abspath(model_path), True, IMAGE_SIZE, len(names))
    # The model's digests, as train.embed's tables record them (search and cluster tell a table's model by them).
    assert {key: about[key] for key in ("model_sha256", "model_weights_sha256")} == model_digests(
        model_path, load_model(model_path, "cpu")[0])
    assert tinyface.main(["--features", str(table), "--data-root", data, "--output", str(tmp_path / "again.json"),
                          "--workers", "0"]) == 0
    said = capsys.readouterr()
    # (was taken without a word: nothing is embedded)
    assert "note: --workers is not used with --features, which are scored as they are" in said.err
    assert json.loads((tmp_path / "again.json").read_text())["features_about"] == about
    assert f"(model {os.path.abspath(model_path)}, with the mirror, {IMAGE_SIZE}px)" in said.out


def test_saved_features_are_scored_again(release, tmp_path, capsys):
    data, _ = release
    protocol = tinyface.TinyFaceProtocol(data)
    names = protocol.image_names
    # Each image along its identity's axis, distractors along their own: every probe at rank 1, except
    # the one whose feature is turned towards a distractor.
    axis = {who: i for i, who in enumerate(PROBE_IDS)}
    features = np.zeros((len(names), 16), dtype=np.float32)
    for row, name in enumerate(names):
        folder, base = name.split(os.sep)
        features[row, axis[int(base.split("_")[0])] if folder != "Gallery_Distractor" else 8 + row % 8] = 1
    features[0] = 0
    features[0, 8 + (len(names) - 1) % 8] = 1  # probe 13_1 now along the last distractor's axis
    csv = tmp_path / "features.csv"
    write_table(str(csv), names, features)
    out = tmp_path / "again.json"
    assert tinyface.main(["--features", str(csv), "--data-root", data, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    # 13_1's mates score 0, tied with the 12 other gallery images (ties count against the mate): rank 13.
    assert result["rank"] == {"1": 0.75, "5": 0.75, "10": 0.75, "20": 1.0}
    assert result["options"]["flip"] is None
    assert result["options"]["amp"] is None  # (as the features were made: features_about says it, where known)
    assert "rank-1 75.00%  rank-5 75.00%  rank-10 75.00%  rank-20 100.00%" in capsys.readouterr().out


@pytest.mark.parametrize("without, said", [
    ((13,), "note: 1 probe has no image of its identity in Gallery_Match; it is left out of the rates"),
    ((8, 13), "note: 2 probes have no image of their identity in Gallery_Match; they are left out of the rates")])
def test_probes_without_a_mate_are_counted_in_the_note(release, tmp_path, capsys, without, said):
    data = tmp_path / "Testing_Set"
    shutil.copytree(release[0], data)
    for who in without:  # (their Gallery_Match images gone: their probes have no mate)
        for n in range(1, MATCH_PER_ID + 1):
            os.remove(data / "Gallery_Match" / f"{who}_{n}.jpg")
    names = tinyface.TinyFaceProtocol(str(data)).image_names
    write_table(str(tmp_path / "features.csv"), names, np.eye(len(names), dtype=np.float32))
    assert tinyface.main(["--features", str(tmp_path / "features.csv"), "--data-root", str(data), "--output",
                          str(tmp_path / "tinyface.json")]) == 0
    assert said in capsys.readouterr().out.splitlines()
    assert json.loads((tmp_path / "tinyface.json").read_text())["probes_without_mate"] == len(without)


def test_the_release_folder_above_and_a_release_without_mates(release, tmp_path, capsys):
    data, _ = release
    above = tmp_path / "tinyface"
    above.mkdir()
    os.symlink(data, above / "Testing_Set")
    assert tinyface.TinyFaceProtocol(str(tmp_path)).root == str(above / "Testing_Set")  # tinyface/Testing_Set
    protocol = tinyface.TinyFaceProtocol(data)
    features = np.eye(len(protocol.image_names), dtype=np.float32)  # no probe's mate scores above the rest...
    features[:, 0] = 1e-30  # ...and tiny features are still features (normalised in float64)
    result = tinyface.identification(protocol, features)
    assert result["rank"][1] == 0.0 and result["probes_without_mate"] == 0
    protocol.probe_labels = protocol.probe_labels + 1000
    with pytest.raises(ValueError, match="no probe's identity has an image in Gallery_Match"):
        tinyface.identification(protocol, features)


def test_a_release_lacking_one_folder_names_that_one(tmp_path):
    # It named all three, wherever the others were: the release's tinyface/Testing_Set without its distractors said
    # "--data-root tinyface: no Probe/, Gallery_Match/, Gallery_Distractor/ folder".
    testing = tmp_path / "tinyface" / "Testing_Set"
    for folder in ("Probe", "Gallery_Match"):
        (testing / folder).mkdir(parents=True)
    for root, where in ((testing, ""), (tmp_path / "tinyface", f" {testing} has"), (tmp_path, f" {testing} has")):
        with pytest.raises(FileNotFoundError, match="^" + re.escape(
                f"--data-root {root}:{where} no Gallery_Distractor/ folder (expected TinyFace's Testing_Set, which "
                "holds Probe, Gallery_Match, Gallery_Distractor, or a folder above it)") + "$"):
            tinyface.find_testing_set(str(root))


def test_mistakes_are_one_line_errors(release, tmp_path, capsys):
    data, model_path = release
    assert tinyface.main(["--model", model_path, "--data-root", str(tmp_path), "--output",
                          str(tmp_path / "o.json")]) == 2
    assert ("no Probe/, Gallery_Match/, Gallery_Distractor/ folder (expected TinyFace's Testing_Set"
            in capsys.readouterr().err)
    assert tinyface.main(["--model", model_path, "--data-root", str(tmp_path / "none")]) == 2
    assert "--data-root " in capsys.readouterr().err
    # The output may not replace what the run reads (--overwrite would have turned the model into JSON).
    assert tinyface.main(["--model", model_path, "--data-root", data, "--output", model_path, "--overwrite"]) == 2
    assert "backbone.pt is one of the files this run reads" in capsys.readouterr().err
    # A folder it cannot write in is found before the embedding, not after it.
    real_access = os.access
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "access",
                      lambda path, mode: False if str(path) == str(tmp_path / "ro") else real_access(path, mode))
        (tmp_path / "ro").mkdir()
        assert tinyface.main(["--model", model_path, "--data-root", data, "--output",
                              str(tmp_path / "ro" / "r.json")]) == 2
    assert "cannot write r.json in" in capsys.readouterr().err
    (tmp_path / "o.json").write_text("mine")
    assert tinyface.main(["--model", model_path, "--data-root", data, "--output", str(tmp_path / "o.json")]) == 2
    assert "o.json exists: pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o.json").read_text() == "mine"
    partial = tmp_path / "partial.csv"
    write_table(str(partial), ["Probe/3_1.jpg"], np.ones((1, 2), dtype=np.float32))
    assert tinyface.main(["--features", str(partial), "--data-root", data, "--output", str(tmp_path / "p.json")]) == 2
    assert "has no features for" in capsys.readouterr().err
    for extra, message in [(["--features", "x.npy", "--save-features", "y.npy"], "already saved"),
                           (["--features", "x.npy", "--no-flip"], "--flip/--no-flip with --features")]:
        with pytest.raises(SystemExit):
            tinyface.main(extra + ["--data-root", data])
        assert message in capsys.readouterr().err
    # A refused call says its error alone: the note on --workers/--batch-size (unused with --features) belongs
    # to a run that goes ahead (it was said first, before argparse's usage or the tool's own error).
    for extra in (["--save-features", "y.npy"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit):
            tinyface.main(["--features", "x.npy", "--workers", "0", *extra, "--data-root", data])
        assert capsys.readouterr().err.startswith("usage: python -m train.tinyface")
    assert tinyface.main(["--features", str(partial), "--batch-size", "8", "--data-root", data, "--output",
                          str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tinyface: error: {partial} has no features for 17 of the 18 images of this release (the first: "
        f"{os.path.join('Probe', '13_1.jpg')}): features of another release?"]


def test_amp_autocasts_the_trunk_and_the_features_stay_fp32(release, tmp_path, capsys):
    data, model_path = release
    features = {}
    for amp in ("none", "bf16"):
        out = tmp_path / f"{amp}.npy"
        assert tinyface.main(["--model", model_path, "--data-root", data, "--device", "cpu", "--workers", "0",
                              "--amp", amp, "--output", str(tmp_path / f"{amp}.json"), "--save-features",
                              str(out)]) == 0
        features[amp] = np.load(out)
        # The results and the features' .json record the autocast the features were made under.
        assert json.loads((tmp_path / f"{amp}.json").read_text())["options"]["amp"] == amp
        assert json.loads((tmp_path / f"{amp}.npy.json").read_text())["amp"] == amp
    assert features["none"].dtype == features["bf16"].dtype == np.float32
    fp32, bf16 = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (features["none"], features["bf16"]))
    assert (fp32 * bf16).sum(axis=1).min() > 0.99
    assert np.abs(fp32 - bf16).max() > 1e-4  # autocast is on
    capsys.readouterr()
    assert tinyface.main(["--model", model_path, "--data-root", data, "--device", "cpu", "--workers", "0", "--amp",
                          "fp16", "--output", str(tmp_path / "fp16.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "tinyface: error: --amp fp16 on the CPU: torch's fp16 convolutions there run several times slower than "
        "fp32 (r18: some 30x; --amp bf16 autocasts on the CPU)"]
    with pytest.raises(SystemExit):
        tinyface.main(["--features", str(tmp_path / "none.npy"), "--amp", "bf16", "--data-root", data])
    assert "--amp with --features: the features are as they were embedded" in capsys.readouterr().err


def test_amp_of_an_onnx_model_is_refused_before_reading_it(release, tmp_path, capsys):
    # The one line alone, as train.embed's: not after the ONNX loader's notes on how the graph is fed.
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from train import export

    data, model = release
    backbone, settings = checkpoint.load_backbone(model)
    graph = str(tmp_path / "backbone.onnx")
    export.export_onnx(backbone, graph, settings["image_size"])
    capsys.readouterr()
    assert tinyface.main(["--model", graph, "--data-root", data, "--workers", "0", "--device", "cpu", "--amp",
                          "bf16", "--output", str(tmp_path / "tinyface.json")]) == 2
    said = capsys.readouterr()
    assert said.err.splitlines() == [f"tinyface: error: --amp bf16: {graph} is an ONNX model, run as its graph is"], \
        said.err
    assert said.out == "" and not (tmp_path / "tinyface.json").exists()
    # Nor after the release's files: refused before they are read (a --data-root that is not there).
    assert tinyface.main(["--model", graph, "--data-root", str(tmp_path / "no-release"), "--device", "cpu", "--amp",
                          "bf16", "--output", str(tmp_path / "tinyface.json")]) == 2
    said = capsys.readouterr()
    assert said.err.splitlines() == [f"tinyface: error: --amp bf16: {graph} is an ONNX model, run as its graph is"], \
        said.err


def test_release_images_are_never_outputs_and_every_unreadable_one_is_named(release, tmp_path, capsys):
    import shutil

    data, model_path = release
    copy = tmp_path / "Testing_Set"
    shutil.copytree(data, copy)
    common = ["--model", model_path, "--data-root", str(copy), "--device", "cpu", "--workers", "0", "--overwrite"]
    probe = copy / "Probe" / "3_1.jpg"
    kept = probe.read_bytes()
    assert tinyface.main(common + ["--output", str(probe)]) == 2
    assert "is an image's name in" in capsys.readouterr().err and probe.read_bytes() == kept
    for name in ("Gallery_Match/5_1.jpg", "Gallery_Distractor/1002.jpg"):
        (copy / name).write_bytes(b"not a jpeg")
    out = tmp_path / "t.json"
    assert tinyface.main(common + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "5_1.jpg" in err and "1002.jpg" in err and "tinyface: error: 2 image(s) of" in err and not out.exists(), err
