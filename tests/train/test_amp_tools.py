"""--amp of the tools that embed images (train.embed and the face tools built on it): the trunk autocast as
train.verify autocasts it, by default as the run that made a training checkpoint did."""

import json

import numpy as np
import pytest
import torch

import arcface_ext
from train import checkpoint, embed, export, verify
from train.tools import clean, cluster, quality, roc, search

from trainer_fixtures import base_argv, make_face_folder, train_on_ranks, train_one_thread

LOSS_IMPL = "fused" if arcface_ext.extension_available() else "reference"
DEFAULT_NOTE = "the trunk under --amp bf16, as the run verified (--amp none for fp32)"


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """The checkpoint of a run trained with --amp bf16, and a folder of faces (a folder an identity)."""
    root = tmp_path_factory.mktemp("amp")
    faces = make_face_folder(str(root / "faces"), identities=4, images=4)
    assert train_one_thread(base_argv(faces, str(root / "run"), batch_size=8, max_steps=2, amp="bf16",
                                      loss_impl=LOSS_IMPL)) == 0
    return str(root / "run" / "checkpoint.pt"), faces


def embedded(ckpt, faces, output, *amp):
    assert embed.main(["--model", ckpt, "--images", faces, "--workers", "0", "--output", str(output), *amp]) == 0
    return np.load(output)


def test_embed_under_bf16_is_near_fp32_and_the_default_is_the_runs(bf16_run, tmp_path, capsys):
    ckpt, faces = bf16_run
    fp32 = embedded(ckpt, faces, tmp_path / "fp32.npy", "--amp", "none")
    assert DEFAULT_NOTE not in capsys.readouterr().err
    bf16 = embedded(ckpt, faces, tmp_path / "bf16.npy", "--amp", "bf16")
    # The table stays fp32 (the head runs in fp32, and the rows are written as float32).
    assert fp32.dtype == bf16.dtype == np.float32
    cosines = (fp32 * bf16).sum(axis=1)
    assert cosines.min() > 0.99, cosines.min()
    assert np.abs(fp32 - bf16).max() > 1e-4  # autocast is on: bf16's rounding moves the embeddings
    default = embedded(ckpt, faces, tmp_path / "default.npy")
    np.testing.assert_array_equal(default, bf16)  # the run's own --amp
    assert DEFAULT_NOTE in capsys.readouterr().err


def test_fp16_is_refused_on_the_cpu_and_a_runs_fp16_embeds_in_fp32(bf16_run, tmp_path, capsys):
    # torch's CPU fp16 convolutions: r18, 8 images at 112 px, 19 s against 0.6 s in fp32.
    ckpt, faces = bf16_run
    output = tmp_path / "e.npy"
    assert embed.main(["--model", ckpt, "--images", faces, "--workers", "0", "--output", str(output),
                       "--amp", "fp16"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "embed: error: --amp fp16 on the CPU: torch's fp16 convolutions there run several times slower than "
        "fp32 (r18: some 30x; --amp bf16 autocasts on the CPU)"]
    assert not output.exists()
    state = checkpoint.load(ckpt)
    state["args"]["amp"] = "fp16"
    fp16_run = str(tmp_path / "fp16.pt")
    torch.save(state, fp16_run)
    fp32 = embedded(ckpt, faces, tmp_path / "fp32.npy", "--amp", "none")
    np.testing.assert_array_equal(embedded(fp16_run, faces, tmp_path / "run.npy"), fp32)
    assert ("the run trained under --amp fp16, several times slower than fp32 on the CPU (torch's fp16 "
            "convolutions): embedded in fp32 (--amp bf16 to autocast)") in capsys.readouterr().err


@pytest.mark.parametrize("tool, argv", [
    (cluster, ["--images", "{faces}", "--output", "{out}/c.csv"]),
    (search, ["--gallery", "{faces}", "--probes", "{faces}", "--output", "{out}/s.csv"]),
    (roc, ["--images", "{faces}", "--output", "{out}/r.csv", "--far", "0.1"]),
    (quality, ["--images", "{faces}", "--output", "{out}/q.csv"]),
    (clean, ["--data", "{faces}", "--output", "{out}/clean"]),
])
def test_the_face_tools_take_amp(bf16_run, tmp_path, capsys, tool, argv):
    ckpt, faces = bf16_run
    name = tool.__name__.rsplit(".", 1)[1]
    argv = ["--model", ckpt, "--workers", "0", *(a.format(faces=faces, out=tmp_path) for a in argv)]
    assert tool.main([*argv, "--amp", "fp16"]) == 2
    err = capsys.readouterr().err
    assert f"{name}: error: --amp fp16 on the CPU: torch's fp16 convolutions" in err, err
    assert tool.main(argv) == 0
    assert DEFAULT_NOTE in capsys.readouterr().err


@pytest.mark.parametrize("tool", [cluster, roc, quality])
def test_amp_with_embeddings_is_refused(tmp_path, capsys, tool):
    # (nothing is embedded: it was taken without a word)
    table = str(tmp_path / "t.csv")
    embed.write_table(table, ["a/1.png", "b/1.png"], np.eye(2, dtype=np.float32))
    with pytest.raises(SystemExit) as exit:
        tool.main(["--embeddings", table, "--amp", "bf16", "--output", str(tmp_path / "o.csv")])
    assert exit.value.code == 2
    assert "--amp with --embeddings: the table's embeddings are as they were made" in capsys.readouterr().err


@pytest.mark.parametrize("tool, argv, table", [
    (embed, ["--images", "{faces}", "--output", "{out}/e.npy"], "e.npy"),
    (search, ["--gallery", "{faces}", "--save-gallery", "{out}/g.npy", "--output", "{out}/s.csv"], "g.npy"),
    (roc, ["--images", "{faces}", "--save-embeddings", "{out}/r.npy", "--output", "{out}/r.csv", "--far", "0.1"],
     "r.npy"),
])
@pytest.mark.slow
def test_a_table_records_its_amp(bf16_run, tmp_path, tool, argv, table):
    # (a table of the run's bf16 and one of fp32 are near, not equal: its .json says which it is)
    ckpt, faces = bf16_run
    argv = ["--model", ckpt, "--workers", "0", *(a.format(faces=faces, out=tmp_path) for a in argv)]
    assert tool.main(argv) == 0
    assert json.loads((tmp_path / f"{table}.json").read_text())["amp"] == "bf16"
    assert tool.main([*argv, "--amp", "none", "--overwrite"]) == 0
    assert json.loads((tmp_path / f"{table}.json").read_text())["amp"] == "none"


@pytest.mark.parametrize("tool", [embed, cluster, clean])
def test_the_help_says_fp16_is_refused_on_a_cpu(tool, capsys):
    # (verify's help is as it was: it keeps fp16 on a CPU)
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    assert "fp16 is refused on a CPU, where bf16 autocasts" in " ".join(capsys.readouterr().out.split())


def test_search_of_two_tables_refuses_amp(tmp_path, capsys):
    # (nothing is embedded: --amp was taken without a word, as cluster's, roc's and quality's with --embeddings were)
    gallery, probes = str(tmp_path / "g.csv"), str(tmp_path / "p.csv")
    embed.write_table(gallery, ["a/1.png", "b/1.png"], np.eye(2, dtype=np.float32))
    embed.write_table(probes, ["a/2.png"], np.eye(2, dtype=np.float32)[:1])
    output = tmp_path / "s.csv"
    assert search.main(["--gallery", gallery, "--probes", probes, "--threshold", "0.3", "--amp", "bf16",
                        "--output", str(output)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"search: error: --amp bf16: --gallery {gallery} and --probes {probes} are tables, whose embeddings are as "
        "they were made"]
    assert not output.exists()
    assert search.main(["--gallery", gallery, "--probes", probes, "--threshold", "0.3", "--output", str(output)]) == 0


@pytest.mark.slow
def test_an_onnx_model_refuses_amp(bf16_run, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ckpt, faces = bf16_run
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 0
    onnx = str(tmp_path / "backbone.onnx")
    capsys.readouterr()
    output = tmp_path / "e.npy"
    assert embed.main(["--model", onnx, "--images", faces, "--workers", "0", "--output", str(output),
                       "--amp", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The one line alone: before the model is read, not after its loader's note on how the graph is fed.
    assert err == [f"embed: error: --amp bf16: {onnx} is an ONNX model, run as its graph is"], err
    assert not output.exists()
    assert verify.main(["--model", onnx, "--data", "synthetic", "--amp", "bf16"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"verify: error: --amp bf16: {onnx} is an ONNX model, run as its graph is"]
    # By default it runs as its graph is, without a word (an ONNX file holds no run's --amp).
    assert embed.main(["--model", onnx, "--images", faces, "--workers", "0", "--output", str(output)]) == 0
    assert "--amp" not in capsys.readouterr().err
    assert json.loads((tmp_path / "e.npy.json").read_text())["made_by"] == "train.embed"


@pytest.fixture(scope="module")
def onnx_model(bf16_run, tmp_path_factory):
    """train.export's backbone.onnx of the bf16 run's checkpoint."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("onnx")
    assert export.main(["--checkpoint", bf16_run[0], "--output", str(folder)]) == 0
    return str(folder / "backbone.onnx")


@pytest.mark.parametrize("tool, argv", [
    (cluster, ["--images", "{faces}", "--output", "{out}/c.csv"]),
    (search, ["--gallery", "{faces}", "--probes", "{faces}", "--output", "{out}/s.csv"]),
    (roc, ["--images", "{faces}", "--output", "{out}/r.csv", "--far", "0.1"]),
    (quality, ["--images", "{faces}", "--output", "{out}/q.csv"]),
    (quality, ["--pairs", "{out}/pairs.txt", "--output", "{out}/q.csv"]),
    (clean, ["--data", "{faces}", "--output", "{out}/clean"]),
], ids=["cluster", "search", "roc", "quality", "quality-pairs", "clean"])
@pytest.mark.slow
def test_the_face_tools_refuse_amp_of_an_onnx_model_before_reading_it(bf16_run, onnx_model, tmp_path, capsys,
                                                                        tool, argv):
    # The one line alone, as embed's and verify's: not after the ONNX loader's notes on how the graph is fed.
    _, faces = bf16_run
    (tmp_path / "pairs.txt").write_text("a.png b.png 1\n")
    name = tool.__name__.rsplit(".", 1)[1]
    argv = ["--model", onnx_model, "--workers", "0", *(a.format(faces=faces, out=tmp_path) for a in argv)]
    capsys.readouterr()
    assert tool.main([*argv, "--amp", "bf16"]) == 2
    said = capsys.readouterr()
    assert said.err.strip().splitlines() == [
        f"{name}: error: --amp bf16: {onnx_model} is an ONNX model, run as its graph is"], said.err
    assert said.out == ""


@pytest.mark.parametrize("tool, argv", [
    (embed, ["--images", "{faces}", "--output", "{out}/e.npy"]),
    (verify, ["--data", "synthetic"]),
    (cluster, ["--images", "{faces}", "--output", "{out}/c.csv"]),
    (quality, ["--pairs", "{out}/pairs.txt", "--output", "{out}/q.csv"]),
], ids=["embed", "verify", "cluster", "quality-pairs"])
def test_amp_with_a_missing_onnx_model_says_it_is_not_there(tmp_path, capsys, tool, argv):
    # Said as without --amp: a .onnx name that names no file is not taken for an ONNX model (the refusal of --amp,
    # then, after it, that the file is not there).
    (tmp_path / "faces").mkdir()
    (tmp_path / "pairs.txt").write_text("a.png b.png 1\n")
    model, name = str(tmp_path / "missing.onnx"), tool.__name__.rsplit(".", 1)[1]
    assert tool.main(["--model", model, *(a.format(faces=tmp_path / "faces", out=tmp_path) for a in argv),
                      "--amp", "bf16"]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [f"{name}: error: no model at {model}"]


@pytest.mark.slow
def test_clean_under_torchrun_says_the_runs_amp_once(bf16_run, tmp_path):
    # (each rank printed it: a line a process, where clean's other notes are rank 0's)
    ckpt, faces = bf16_run
    result = train_on_ranks(["--model", ckpt, "--data", faces, "--workers", "0", "--report-only", "--output",
                             str(tmp_path / "out"), "--embeddings", str(tmp_path / "e.npy")], main=clean.main)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(DEFAULT_NOTE) == 1, result.stderr
    assert json.loads(open(str(tmp_path / "e.npy.json")).read())["amp"] == "bf16"


def test_cleans_embeddings_file_is_of_one_amp(bf16_run, tmp_path, capsys):
    # clean --embeddings keeps a model's embeddings of the data for the next run: not those of another --amp.
    ckpt, faces = bf16_run
    cache = str(tmp_path / "e.npy")
    argv = ["--model", ckpt, "--data", faces, "--workers", "0", "--embeddings", cache, "--report-only"]
    assert clean.main([*argv, "--output", str(tmp_path / "a"), "--amp", "none"]) == 0
    assert json.loads(open(cache + ".json").read())["amp"] == "none"
    capsys.readouterr()
    assert clean.main([*argv, "--output", str(tmp_path / "b"), "--amp", "none"]) == 0
    assert "embeddings of 16 images read from" in capsys.readouterr().err
    assert clean.main([*argv, "--output", str(tmp_path / "c")]) == 2  # the run's bf16
    assert f"--embeddings {cache} was made with another model or data (changed: --amp)" in capsys.readouterr().err
    # A file of before --amp (no amp recorded) is of fp32.
    sidecar = json.loads(open(cache + ".json").read())
    del sidecar["amp"]
    with open(cache + ".json", "w") as f:
        json.dump(sidecar, f)
    assert clean.main([*argv, "--output", str(tmp_path / "d"), "--amp", "none"]) == 0
    assert "embeddings of 16 images read from" in capsys.readouterr().err
