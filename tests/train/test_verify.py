"""`python -m train.verify`: a trained model's verification accuracy, measured outside training as
training measures it."""

import json
import os
import pickle

import pytest
import torch
from PIL import Image

import arcface_ext
from train import checkpoint, export, verify
from train.data.synthetic import render_face
from train.verification import read_pairs_list

from trainer_fixtures import base_argv, make_face_folder, make_pairs_list, train_one_thread

LOSS_IMPL = "fused" if arcface_ext.extension_available() else "reference"


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """A checkpoint of a run that verified on a pairs list at its end, the list, and a data folder
    holding the same pairs as insightface's lfw.bin."""
    root = tmp_path_factory.mktemp("verify")
    data = make_face_folder(str(root / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(root / "pairs"), pairs=20)
    argv = base_argv(data, str(root / "run"), pairs=pairs, batch_size=8, max_steps=2, loss_impl=LOSS_IMPL)
    assert train_one_thread(argv) == 0
    bins = root / "bins"
    os.makedirs(bins)
    listed, issame = read_pairs_list(pairs)
    encoded = [open(path, "rb").read() for pair in listed for path in pair]  # PNGs, as .bin holds images
    with open(bins / "lfw.bin", "wb") as f:
        pickle.dump((encoded, [bool(x) for x in issame]), f)
    return str(root / "run" / "checkpoint.pt"), pairs, str(bins)


def test_verify_gives_trainings_own_verification(verified, tmp_path, capsys):
    ckpt, pairs, bins = verified
    recorded = checkpoint.load(ckpt)["verification"]["pairs"]
    output = tmp_path / "out" / "results.json"
    # The pairs list, and the same pairs as <data>/lfw.bin: both give what training recorded.
    assert verify.main(["--model", ckpt, "--targets", pairs, "--batch-size", "8", "--output", str(output)]) == 0
    # lfw named twice (by name and by path) is one set, measured once.
    assert verify.main(["--model", ckpt, "--data", bins, "--targets", f"lfw,cfp_fp,lfw,{bins}/lfw.bin",
                        "--batch-size", "8", "--output", str(tmp_path / "bin.json")]) == 0
    captured = capsys.readouterr()
    assert "pairs: accuracy" in captured.out and "lfw: accuracy" in captured.out
    assert "cfp_fp" in captured.err and "skipped" in captured.err  # a name the folder lacks: a note
    assert "\r" not in captured.err and "image/s" not in captured.err  # no progress bar redrawn into a log
    for path, name in ((output, "pairs"), (tmp_path / "bin.json", "lfw")):
        result = json.loads(path.read_text())
        assert list(result["targets"]) == [name] and result["network"] == "small"
        got = result["targets"][name]
        assert got["pairs"] == 20
        for key in ("accuracy", "accuracy_std", "threshold"):
            assert got[key] == recorded[key], (name, key)
        assert got["xnorm"] == pytest.approx(recorded["xnorm"], rel=1e-5)
    assert verify.main(["--model", ckpt, "--targets", pairs, "--output", str(output)]) == 2  # kept
    assert "exists" in capsys.readouterr().err
    # A training list as --data, as the trainer takes it: its folder's lfw.bin ('is not a folder' before).
    with open(os.path.join(bins, "train.lst"), "w") as f:
        f.write("faces/a.png 0\n")
    assert verify.main(["--model", ckpt, "--data", os.path.join(bins, "train.lst"), "--targets", "lfw",
                        "--batch-size", "8", "--output", str(tmp_path / "list.json")]) == 0
    assert json.loads((tmp_path / "list.json").read_text())["targets"]["lfw"] == \
        json.loads((tmp_path / "bin.json").read_text())["targets"]["lfw"]


def test_several_data_folders_are_looked_in_as_a_run_on_several_sets_looks(verified, tmp_path, capsys):
    # A run of --data a,b finds its --val-targets names in each set's folder: its --data, given to train.verify,
    # was 'not a folder'.
    ckpt, _, bins = verified
    other = tmp_path / "other"
    other.mkdir()
    output = tmp_path / "lfw.json"
    assert verify.main(["--model", ckpt, "--data", f"{other},{bins}", "--targets", "lfw", "--batch-size", "8",
                        "--output", str(output)]) == 0
    assert list(json.loads(output.read_text())["targets"]) == ["lfw"]
    assert verify.main(["--model", ckpt, "--data", f"{bins},{tmp_path / 'nowhere'}", "--targets", "lfw"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"verify: error: --data {bins},{tmp_path / 'nowhere'}: {tmp_path / 'nowhere'} is not a folder"


def test_verify_an_onnx_model(verified, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ckpt, pairs, _ = verified
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 0
    for model, name in ((ckpt, "pt.json"), (str(tmp_path / "backbone.onnx"), "onnx.json")):
        assert verify.main(["--model", model, "--targets", pairs, "--output", str(tmp_path / name)]) == 0
    pt, onnx = (json.loads((tmp_path / name).read_text())["targets"]["pairs"] for name in ("pt.json", "onnx.json"))
    assert onnx["accuracy"] == pt["accuracy"] and onnx["xnorm"] == pytest.approx(pt["xnorm"], rel=1e-4)


def test_verify_takes_lfws_pairs_txt_as_the_same_pairs_list(verified, tmp_path, capsys):
    """LFW's own pairs.txt (10 sets of 1 matched and 1 mismatched pair here) over <folder>/<name>/<name>_<NNNN>.jpg
    measures what this project's pairs list of the same pairs, in the same order, measures."""
    ckpt, _, _ = verified
    people = ["Ann_Lee", "Bo_Chen", "Cy_Diaz", "Di_Eze"]
    for who, name in enumerate(people):
        os.makedirs(tmp_path / name)
        for n in (1, 2, 3):
            Image.fromarray(render_face(0, 20_000 + who, n, 32)).save(tmp_path / name / f"{name}_{n:04d}.jpg")
    sets = [((people[k % 4], 1 + k % 2, 3), (people[k % 4], 1 + k % 3, people[(k + 1) % 4], 2)) for k in range(10)]
    with open(tmp_path / "pairs.txt", "w") as f:
        f.write("10\t1\n" + "".join(f"{n}\t{i}\t{j}\n{a}\t{i2}\t{b}\t{j2}\n" for (n, i, j), (a, i2, b, j2) in sets))
    with open(tmp_path / "mine.txt", "w") as f:
        f.writelines(f"{n}/{n}_{i:04d}.jpg {n}/{n}_{j:04d}.jpg 1\n{a}/{a}_{i2:04d}.jpg {b}/{b}_{j2:04d}.jpg 0\n"
                     for (n, i, j), (a, i2, b, j2) in sets)
    results = {}
    for name in ("pairs", "mine"):
        assert verify.main(["--model", ckpt, "--targets", str(tmp_path / f"{name}.txt"), "--batch-size", "8",
                            "--output", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["targets"][name]
    assert results["pairs"] == results["mine"] and results["pairs"]["pairs"] == 20
    os.remove(tmp_path / "Bo_Chen" / "Bo_Chen_0002.jpg")
    capsys.readouterr()
    assert verify.main(["--model", ckpt, "--targets", str(tmp_path / "pairs.txt")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"verify: error: {tmp_path / 'pairs.txt'}: line 3: no image Bo_Chen_0002.jpg (nor Bo_Chen_0002 as .jpeg, "
        f".png, .bmp) in {tmp_path / 'Bo_Chen'} (LFW's pairs name <its folder>/<name>/<name>_<NNNN>.jpg)")


@pytest.mark.slow
def test_synthetic_sets_are_those_of_the_runs_seed(tmp_path, capsys):
    """--data synthetic rebuilds the demo's sets with the checkpoint's own --seed."""
    argv = base_argv("synthetic", str(tmp_path / "run"), pairs="synthetic", batch_size=8, max_steps=1, seed=3,
                     loss_impl=LOSS_IMPL)
    assert train_one_thread(argv) == 0
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    recorded = checkpoint.load(ckpt)["verification"]["synthetic"]
    capsys.readouterr()
    assert verify.main(["--model", ckpt, "--data", "synthetic", "--batch-size", "8", "--output",
                        str(tmp_path / "s.json")]) == 0
    assert "synthetic sets of --seed 3 (the run's)" in capsys.readouterr().err
    got = json.loads((tmp_path / "s.json").read_text())["targets"]["synthetic"]
    assert (got["accuracy"], got["threshold"]) == (recorded["accuracy"], recorded["threshold"])


def test_synthetic_data_with_paths_alone_draws_no_synthetic_set(verified, capsys):
    # --data synthetic --targets <a pairs list> said "synthetic sets of --seed 0 (the run's)" and measured none.
    ckpt, pairs, _ = verified
    assert verify.main(["--model", ckpt, "--data", "synthetic", "--targets", pairs]) == 0
    err = capsys.readouterr().err
    assert "synthetic sets" not in err, err


def test_verify_runs_the_trunk_under_the_runs_amp(tmp_path, capsys):
    """A run trained with --amp verified with its trunk under autocast: train.verify on its checkpoint
    does too (fp32 moves the embeddings, and so XNorm and pairs near the threshold), unless told."""
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(tmp_path / "pairs"), pairs=20)
    argv = base_argv(data, str(tmp_path / "run"), pairs=pairs, batch_size=8, max_steps=2, amp="bf16",
                     loss_impl=LOSS_IMPL)
    assert train_one_thread(argv) == 0
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    recorded = checkpoint.load(ckpt)["verification"]["pairs"]
    capsys.readouterr()
    output = str(tmp_path / "run.json")
    assert verify.main(["--model", ckpt, "--targets", pairs, "--batch-size", "8", "--output", output]) == 0
    got = json.loads(open(output).read())["targets"]["pairs"]
    for key in ("accuracy", "accuracy_std", "threshold"):
        assert got[key] == recorded[key], key
    assert got["xnorm"] == pytest.approx(recorded["xnorm"], rel=1e-6)
    assert "the trunk under --amp bf16, as the run verified" in capsys.readouterr().err
    output = str(tmp_path / "fp32.json")
    assert verify.main(["--model", ckpt, "--targets", pairs, "--batch-size", "8", "--amp", "none", "--output",
                        output]) == 0
    fp32 = json.loads(open(output).read())["targets"]["pairs"]
    assert fp32["xnorm"] != pytest.approx(recorded["xnorm"], rel=1e-4)  # fp32: other embeddings


CPU_FP16_NOTE = ("note: --amp fp16 on the CPU runs several times slower than fp32 (torch's CPU fp16 convolutions); "
                 "--amp bf16 or none for speed")


@pytest.mark.slow
def test_fp16_on_the_cpu_is_kept_and_said_to_be_slow(verified, tmp_path, capsys):
    # verify keeps fp16 on a CPU (the run's, or asked for), where the tools that embed refuse it or embed in fp32:
    # 5-30x slower there (vit_t to r18), which the default command on an fp16 run's checkpoint met without a word.
    ckpt, pairs, _ = verified
    argv = ["--targets", pairs, "--batch-size", "8"]
    assert verify.main(["--model", ckpt, *argv, "--amp", "fp16"]) == 0
    assert CPU_FP16_NOTE in capsys.readouterr().err
    state = checkpoint.load(ckpt)
    state["args"]["amp"] = "fp16"
    fp16_run = str(tmp_path / "fp16.pt")
    torch.save(state, fp16_run)
    assert verify.main(["--model", fp16_run, *argv]) == 0
    err = capsys.readouterr().err
    assert "the trunk under --amp fp16, as the run verified" in err and CPU_FP16_NOTE in err, err
    assert verify.main(["--model", fp16_run, *argv, "--amp", "bf16"]) == 0
    assert "--amp fp16" not in capsys.readouterr().err


def test_data_that_is_a_broken_symbolic_link_is_said_to_be_one(verified, tmp_path, capsys):
    # A link to a disk not mounted: "is not a folder" alone sent the user looking for the link, which is there
    # (3a1e680's checkpoint.dangling); of a run's --data a,b, the one that is.
    ckpt, _, bins = verified
    gone = tmp_path / "faces"
    gone.symlink_to(tmp_path / "unmounted")
    link = f"(a broken symbolic link to {tmp_path / 'unmounted'})"
    assert verify.main(["--model", ckpt, "--data", str(gone)]) == 2
    assert capsys.readouterr().err == f"verify: error: --data {gone} is not a folder {link}\n"
    assert verify.main(["--model", ckpt, "--data", f"{bins},{gone}"]) == 2
    assert capsys.readouterr().err == f"verify: error: --data {bins},{gone}: {gone} is not a folder {link}\n"


def test_a_missing_path_without_data_names_no_folder_of_it(verified, tmp_path, capsys, monkeypatch):
    # Without --data a path is looked for as written only: said so (it said "nor in  (the data's folder)").
    monkeypatch.chdir(tmp_path)
    assert verify.main(["--model", verified[0], "--targets", "missing/lfw.bin"]) == 2
    assert capsys.readouterr().err == "verify: error: --targets: no verification set at missing/lfw.bin\n"


def test_a_refusal_after_the_output_is_checked_leaves_no_folder_of_it(tmp_path, capsys):
    # check_outputs made n1/n2 for a new --output n1/n2/results.json before --data was found not to be a folder,
    # and they were left (every tool under run_tool removes them now; there/ was there and stays).
    (tmp_path / "there").mkdir()
    for output in ("n1/n2/results.json", "there/n2/results.json"):
        assert verify.main(["--model", str(tmp_path / "backbone.pt"), "--data", str(tmp_path / "nowhere"),
                            "--output", str(tmp_path / output)]) == 2
        assert capsys.readouterr().err == f"verify: error: --data {tmp_path / 'nowhere'} is not a folder\n"
    assert os.listdir(tmp_path) == ["there"] and os.listdir(tmp_path / "there") == []


@pytest.mark.parametrize("argv, message", [
    (["--targets", "lfw"], "--targets lfw: a name is looked for in --data FOLDER"),
    ([], "name the sets: --data FOLDER"),
    (["--targets", "missing/lfw.bin"], "no verification set at missing/lfw.bin"),
    (["--data", "."], "none of lfw, cfp_fp, agedb_30 found in --data ."),
    (["--targets", "x.bin", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--data", "nowhere"], "--data nowhere is not a folder"),
    (["--targets", "gaps.txt"], "gaps.txt: line 2: no image absent.png in"),
    (["--data", ".", "--output", "MODEL", "--overwrite"], "is one of the files this run reads"),
    (["--data", "synthetic", "--seed", "-1"], "--seed must be at least 0, got -1"),  # (numpy's words, no flag)
    (["--targets", "x.bin", "--seed", "3"], "--seed goes with --data synthetic: it draws the synthetic sets"),
])
def test_mistakes_are_one_line_errors(verified, tmp_path, capsys, argv, message, monkeypatch):
    ckpt, pairs, _ = verified
    monkeypatch.chdir(tmp_path)
    with open(pairs) as f:  # the list's images are found beside it: its second pair's first is not there
        listed = f.readlines()
    listed[1] = "absent.png " + listed[1].split(" ", 1)[1]
    with open(os.path.join(os.path.dirname(pairs), "gaps.txt"), "w") as f:
        f.writelines(listed)
    argv = [os.path.join(os.path.dirname(pairs), a) if a == "gaps.txt" else ckpt if a == "MODEL" else a for a in argv]
    size = os.path.getsize(ckpt)
    try:
        code = verify.main(["--model", ckpt, *argv])
    except SystemExit as exit_info:  # argparse's errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.splitlines()[-1] and "Traceback" not in err, err
    assert os.path.getsize(ckpt) == size
