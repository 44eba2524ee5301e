"""After training: the backbone state dict and ONNX round trips, and embedding images."""

import collections
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from types import SimpleNamespace

from train import checkpoint, embed, export
from train.data.transforms import load_image_file
from train.verification import compute_embeddings
from train.models import get_model

from trainer_fixtures import IMAGE_SIZE, REPO, one_thread, two_step_checkpoint  # noqa: F401


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint after two steps (so BN statistics are not at their defaults) and its data."""
    return two_step_checkpoint(tmp_path_factory.mktemp("trained"))


def embeddings_of(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_state_dict_round_trip(trained, tmp_path):
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--no-onnx"]) == 0
    settings = json.loads((tmp_path / "backbone.json").read_text())
    assert settings["network"] == "small" and settings["image_size"] == IMAGE_SIZE

    state = checkpoint.load(ckpt)
    original = get_model("small", image_size=IMAGE_SIZE, embedding_size=settings["embedding_size"])
    original.load_state_dict(state["model"])
    exported = get_model("small", image_size=IMAGE_SIZE, embedding_size=settings["embedding_size"])
    exported.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True))
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(embeddings_of(exported, x), embeddings_of(original, x))

    # Without backbone.json the settings are read off the weights' shapes.
    os.remove(tmp_path / "backbone.json")
    model, guessed = checkpoint.load_backbone(str(tmp_path / "backbone.pt"))
    assert guessed == {"network": "small", "embedding_size": settings["embedding_size"], "image_size": IMAGE_SIZE}
    assert torch.equal(embeddings_of(model, x), embeddings_of(original, x))


@pytest.mark.slow
def test_a_tool_whose_reader_goes_away_writes_its_outputs(trained, tmp_path):
    # python -m train.tools.roc ... 2>&1 | head -1: the first line said once head had gone (its table) ended the run
    # in a BrokenPipeError, its results not written.
    ckpt, faces = trained
    command = [sys.executable, "-m", "train.tools.roc", "--model", ckpt, "--images", faces, "--far", "0.1",
               "--output", str(tmp_path / "r.csv")]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as run:
        assert run.stdout.readline().startswith(b"roc: embedding 16 images under ")
        run.stdout.close()  # (as head does, after its lines)
        assert run.wait(timeout=120) == 0
    assert json.loads((tmp_path / "r.json").read_text())["genuine_pairs"] == 24
    assert len((tmp_path / "r.csv").read_text().splitlines()) > 1


@pytest.mark.slow
def test_a_tool_whose_stdout_reader_went_away_exits_as_it_would(trained, tmp_path):
    # python -m train.export ... | head -0: stdout in a pipe is block-buffered (PYTHONUNBUFFERED unset, as a user
    # has it), so the "wrote" lines waited in its buffer past the tool's end and the interpreter's last flush
    # failed: "Exception ignored ... BrokenPipeError" and exit status 120, the export done. A refusal whose reader
    # had gone (2>&1) was exit status 120 too, not 2: its error line, said once the streams were unwrapped, raised.
    ckpt, _ = trained
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)  # (the reader gone before the first line)
    try:
        for checkpoint_path, stderr, code in ((ckpt, subprocess.PIPE, 0), (str(tmp_path / "nope.pt"), write, 2)):
            run = subprocess.run([sys.executable, "-m", "train.export", "--checkpoint", checkpoint_path,
                                  "--output", str(tmp_path / "out"), "--no-onnx"],
                                 cwd=REPO, env=env, stdout=write, stderr=stderr, timeout=120)
            assert run.returncode == code and b"BrokenPipeError" not in (run.stderr or b""), run.stderr
    finally:
        os.close(write)
    assert sorted(os.listdir(tmp_path / "out")) == ["backbone.json", "backbone.pt"]


def test_onnx_round_trip(trained, tmp_path, capsys):
    pytest.importorskip("onnx")
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert os.path.exists(tmp_path / "backbone.onnx")
    ort = pytest.importorskip("onnxruntime")
    assert "onnxruntime matches PyTorch" in out
    model, settings = checkpoint.load_backbone(ckpt)
    session = ort.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE)  # another batch size than the one traced
    got = session.run(["embedding"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, embeddings_of(model, x).numpy(), rtol=1e-4, atol=1e-4)


def test_normalized_onnx_gives_the_verification_embedding(trained, tmp_path, capsys):
    # --normalized-onnx: a graph whose output is what verification compares (image + mirror, unit length),
    # so that a deployment compares dot products with backbone.json's threshold as it is.
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ckpt, faces = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--normalized-onnx"]) == 0
    normalized = tmp_path / "backbone_normalized.onnx"
    out = capsys.readouterr().out
    assert f"wrote {normalized}" in out
    # Its line gives the check's result, as backbone.onnx's does (it said nothing of it).
    assert f"wrote {normalized}: image + mirror, L2-normalised (the embedding verification compares); onnxruntime " \
        "matches PyTorch (max abs difference " in out, out
    model, settings = checkpoint.load_backbone(ckpt)
    paths = sorted(embed.list_images(faces))[:6]
    images = torch.stack([torch.from_numpy(load_image_file(path, settings["image_size"]).transpose(2, 0, 1).copy())
                          for path in paths])
    session = ort.InferenceSession(str(normalized), providers=["CPUExecutionProvider"])
    # (N, D) as backbone.onnx declares it (was (batch, 'Divembedding_dim_1'): no length to read)
    assert session.get_outputs()[0].shape == ["batch", settings["embedding_size"]]
    got = session.run(["embedding"], {"input": ((images.float() - 127.5) / 127.5).numpy()})[0]
    expected = embed.embed_files(model, paths, settings["image_size"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # train.embed flips and normalises again: the graph is its own mirror image, so nothing changes.
    loaded, onnx_settings = embed.load_model(str(normalized), "cpu")
    np.testing.assert_allclose(embed.embed_files(loaded, paths, settings["image_size"]), expected, rtol=1e-4, atol=1e-5)
    # backbone.json beside it gives its threshold, as for backbone.onnx.
    assert "threshold" not in onnx_settings
    (tmp_path / "backbone.json").write_text(json.dumps({**settings, "threshold": 1.25}))
    assert embed.load_model(str(normalized), "cpu")[1]["threshold"] == 1.25
    # An export without it removes the earlier one, which would pass for the new backbone's.
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 0
    assert f"removed {normalized}" in capsys.readouterr().err and not normalized.exists()
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--normalized-onnx", "--no-onnx"])


def op_counts(path):
    import onnx

    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_prelu_is_written_as_relus_of_the_same_values_and_onnx_prelu_keeps_the_node(trained, tmp_path, capsys):
    # onnxruntime's PRelu kernel is slow on CPUs: the graphs hold relu(x) + (-a) * relu(-x), which gives the
    # PRelu node's embeddings bit for bit; --onnx-prelu writes the node.
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ckpt, _ = trained
    for flags, folder in (([], "relus"), (["--onnx-prelu"], "node")):
        assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / folder), "--normalized-onnx", *flags]) == 0
        assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    prelus = sum(isinstance(module, torch.nn.PReLU) for module in checkpoint.load_backbone(ckpt)[0].modules())
    x = torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE).numpy()
    for name in ("backbone.onnx", "backbone_normalized.onnx"):
        relus, node = op_counts(tmp_path / "relus" / name), op_counts(tmp_path / "node" / name)
        assert prelus == 5 and node["PRelu"] == prelus and "Neg" not in node, name
        # (no Sub: insightface takes nodes named Sub... and Mul... among the first eight for a graph fed 0-255)
        assert "PRelu" not in relus and relus["Neg"] == prelus and "Sub" not in relus, name
        got, expected = (ort.InferenceSession(str(tmp_path / folder / name), providers=["CPUExecutionProvider"])
                         .run(None, {"input": x})[0] for folder in ("relus", "node"))
        assert np.array_equal(got, expected), f"{name}: max abs difference {np.abs(got - expected).max():.3g}"


@pytest.mark.parametrize("channels", [1, 6])
def test_decomposed_prelu_gives_prelus_values_bit_for_bit(channels):
    prelu = torch.nn.PReLU(channels)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.25, -0.7, 0.0, 1.5, 3e-5, 1e4][:channels]))
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 3e38, -3e38])
    for shape in ((4, 6), (3, 6, 5), (2, 6, 7, 3)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 10.0 ** torch.randint(
            -8, 9, shape, generator=torch.Generator().manual_seed(0))
        x.view(-1)[:len(special)] = special
        with torch.no_grad():
            got, expected = export.DecomposedPReLU(prelu)(x), prelu(x)
        # (NaN where both are: a zero slope times -inf; a zero's sign may differ)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


class TinyPReLUNet(torch.nn.Module):
    """A convolution, a PReLU of a slope per channel and one of a single slope, and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv, self.prelu = torch.nn.Conv2d(3, 4, 3, 2), torch.nn.PReLU(4)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 8), torch.nn.PReLU())
        with torch.no_grad():
            self.prelu.weight.copy_(torch.tensor([0.25, -0.5, 0.0, 2.0]))

    def forward(self, x):
        return self.head(self.prelu(self.conv(x)))


def test_every_opset_writes_prelu_as_relus_and_the_model_keeps_its_prelus(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = TinyPReLUNet().eval()
    x = torch.randn(3, 3, 8, 8).numpy()
    for opset in export.OPSETS or (7, 17, 20):
        outputs = []
        for prelu_node in (False, True):
            path = str(tmp_path / f"{opset}-{prelu_node}.onnx")
            export.export_onnx(model, path, 8, opset, prelu_node=prelu_node)
            assert export.check_onnx(model, path, 8) is not None
            assert ("PRelu" in op_counts(path)) == prelu_node, opset
            outputs.append(ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0])
        assert np.array_equal(*outputs), opset
    assert [type(module) for module in model.modules()].count(torch.nn.PReLU) == 2  # (put back after each export)


def graph_io(path):
    """({input or output name: (element type, shape)}, the element types of the graph's weights)."""
    import onnx

    model = onnx.load(str(path))
    io = {value.name: (value.type.tensor_type.elem_type,
                       [dim.dim_value or dim.dim_param for dim in value.type.tensor_type.shape.dim])
          for value in list(model.graph.input) + list(model.graph.output)}
    return io, collections.Counter(tensor.data_type for tensor in model.graph.initializer)


@pytest.mark.slow
def test_fp16_writes_float16_weights_with_float32_input_and_output_that_agree_with_the_model(trained, tmp_path,
                                                                                           capsys):
    # --fp16: backbone_fp16.onnx (and backbone_normalized_fp16.onnx) beside the fp32 graphs, half their size, fed
    # and read in float32 as insightface's tools and train.embed feed and read a graph.
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ckpt, faces = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--fp16", "--normalized-onnx"]) == 0
    out = capsys.readouterr().out
    model, settings = checkpoint.load_backbone(ckpt)
    x = torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE)  # (another batch size than the one traced)
    for name, fp32_name, module in (("backbone_fp16.onnx", "backbone.onnx", model),
                                    ("backbone_normalized_fp16.onnx", "backbone_normalized.onnx",
                                     export.FlipNormalized(model))):
        path = tmp_path / name
        assert f"wrote {path}: {fp32_name} in float16, its input and output float32; onnxruntime " in out, out
        assert re.search(rf"wrote {re.escape(str(path))}: .*; its largest value [0-9.e+]+, of float16's 65504\n",
                         out), out
        io, weights = graph_io(path)
        assert io == {"input": (onnx.TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]),
                      "embedding": (onnx.TensorProto.FLOAT, ["batch", settings["embedding_size"]])}, name
        assert set(weights) == {onnx.TensorProto.FLOAT16}, (name, weights)
        assert os.path.getsize(path) < 0.55 * os.path.getsize(tmp_path / fp32_name), name
        onnx.checker.check_model(str(path))  # (its nodes in order: onnxruntime 1.19's converter left them not)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        expected = embeddings_of(module, x).numpy()
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=export.TOLERANCES["float16"] * max(np.abs(expected).max(), 1),
                                   err_msg=name)
    # train.embed takes it as any graph; an export without --fp16 removes it (it would pass for the new backbone's).
    loaded, _ = embed.load_model(str(tmp_path / "backbone_fp16.onnx"), "cpu")
    np.testing.assert_allclose(loaded(x).numpy(), embeddings_of(model, x).numpy(), rtol=0.02, atol=0.02)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"removed {tmp_path / 'backbone_fp16.onnx'}" in err and not (tmp_path / "backbone_fp16.onnx").exists()
    assert not (tmp_path / "backbone_normalized_fp16.onnx").exists()


def test_fp16_io_makes_the_float16_graphs_input_and_output_float16(trained, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--fp16", "--fp16-io"]) == 0
    path = tmp_path / "backbone_fp16.onnx"
    assert f"wrote {path}: backbone.onnx in float16, its input and output float16; " in capsys.readouterr().out
    io, weights = graph_io(path)
    assert [io[name][0] for name in ("input", "embedding")] == [onnx.TensorProto.FLOAT16] * 2
    assert graph_io(tmp_path / "backbone.onnx")[0]["input"][0] == onnx.TensorProto.FLOAT  # (the fp32 graph's own)
    model, _ = checkpoint.load_backbone(ckpt)
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE).half()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    expected = embeddings_of(model, x.float()).numpy()
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected,
                               atol=export.TOLERANCES["float16"] * max(np.abs(expected).max(), 1))


@pytest.mark.slow
@pytest.mark.parametrize("io", [[], ["--fp16-io"]])
def test_a_float16_normalized_graph_is_taken_as_one_of_unit_length(trained, tmp_path, capsys, io):
    # backbone_normalized_fp16.onnx's length passed through float16 (a step of 2^-10 at 1): ~1.0002, not 1 to
    # 1e-4, so the tools took it for a backbone's own output and gave norms of 1 (train.verify its XNorm, --norms
    # a table of 1.0002s) where backbone_normalized.onnx is refused them. Its normalisation is now float32 (see
    # test_a_float16_normalized_graph_keeps_its_mirror_and_normalisation_float32), but with --fp16-io its output
    # itself is float16, its length 1 to float16's rounding.
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ckpt, faces = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--fp16", "--normalized-onnx", *io]) == 0
    graph = str(tmp_path / "backbone_normalized_fp16.onnx")
    assert embed.load_model(graph, "cpu")[1].get("unit_length")
    capsys.readouterr()
    assert embed.main(["--model", graph, "--images", faces, "--output", str(tmp_path / "e.npy"),
                       "--norms", str(tmp_path / "norms.csv")]) == 2
    assert f"embed: error: --norms: {graph} gives embeddings of unit length" in capsys.readouterr().err
    assert not (tmp_path / "norms.csv").exists()


def converter_casts(path):
    """{(the value it reads, the element type it casts to)} of each Cast in the float16 graph at ``path`` that
    the fp32 graph beside it (the same name without _fp16) does not have."""
    import onnx

    own = {node.name for node in onnx.load(str(path).replace("_fp16", "")).graph.node}
    return {(node.input[0], next(attribute.i for attribute in node.attribute if attribute.name == "to"))
            for node in onnx.load(str(path)).graph.node if node.op_type == "Cast" and node.name not in own}


@pytest.mark.slow
@pytest.mark.parametrize("io", [[], ["--fp16-io"]])
def test_a_float16_normalized_graph_keeps_its_mirror_and_normalisation_float32(trained, tmp_path, io):
    # onnxruntime's converter puts a Cast to float16 and one back after each node it keeps float32: the sum, the
    # length, the clip and the division were each rounded to float16 (the outputs' length 1 to ~2e-4, a length
    # past 65504 inf). Those round trips go: the casts left are one a value crossing between the float16 backbone
    # and the float32 nodes around it (and the float16 input and output of --fp16-io).
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--fp16", "--normalized-onnx", *io]) == 0
    path = tmp_path / "backbone_normalized_fp16.onnx"
    model = onnx.load(str(path))
    maker = {name: node for node in model.graph.node for name in node.output}
    into, out_of = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    casts = converter_casts(path)
    in_backbone = {name: name in maker and maker[name].name.startswith("/backbone/") for name, _ in casts}
    # (to float16: the image and its mirror, into the backbone; with --fp16-io the embedding too)
    assert sorted(in_backbone[name] for name, to in casts if to == into) == [False] * (1 + bool(io)), casts
    # (to float32: the backbone's output; with --fp16-io the input too)
    assert sorted(in_backbone[name] for name, to in casts if to == out_of) == [False] * bool(io) + [True], casts
    assert not [node.name for node in model.graph.node if node.op_type == "Cast" and node.input[0] in maker
                and maker[node.input[0]].op_type == "Cast"], "a cast of a cast"
    plain = converter_casts(tmp_path / "backbone_fp16.onnx")  # (its input's and output's casts alone, if any)
    assert sorted(to for _, to in plain) == ([] if io else [out_of, into]) and (io or ("input", into) in plain)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, IMAGE_SIZE, IMAGE_SIZE).numpy()
    got = session.run(None, {"input": x.astype(np.float16) if io else x})[0].astype(np.float64)
    lengths = np.linalg.norm(got, axis=1)
    # (with --fp16-io the output itself is float16: its length is 1 to float16's rounding, which the tools allow)
    assert np.abs(lengths - 1).max() <= (1e-3 if io else 1e-6), lengths


def test_the_checks_of_an_old_opset_fp16_graph_print_no_onnxruntime_warnings(trained, tmp_path, capfd):
    # At --opset 7 and 8 onnxruntime's CPU provider has no float16 Neg kernel (the decomposed PReLU's), and each
    # session of the check and of the largest-value scan logged a coloured warning line a node to stderr (15 for
    # the small network): "Could not find a CPU kernel and hence can't constant fold Neg node". Its errors come back
    # as exceptions, which the export's one line gives.
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--fp16", "--opset", "8"]) == 0
    out, err = capfd.readouterr()
    assert f"wrote {tmp_path / 'backbone_fp16.onnx'}: " in out
    assert "onnxruntime:" not in err, err


def test_batch_size_fixes_the_graphs_batch_and_the_check_runs_at_it(trained, tmp_path, capsys, monkeypatch):
    # --batch-size N: the graphs' input says N (TensorRT engines, accelerators); the batch dimension was free.
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    checked = []
    check_onnx = export.check_onnx
    monkeypatch.setattr(export, "check_onnx", lambda model, path, image_size, batch=3, **kwargs: checked.append(
        (os.path.basename(path), batch)) or check_onnx(model, path, image_size, batch, **kwargs))
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--batch-size", "4", "--normalized-onnx",
                        "--fp16"]) == 0
    out = capsys.readouterr().out
    names = ("backbone.onnx", "backbone_normalized.onnx", "backbone_fp16.onnx", "backbone_normalized_fp16.onnx")
    assert sorted(checked) == sorted((name, 4) for name in names)
    model, settings = checkpoint.load_backbone(ckpt)
    for name in names:
        assert f"wrote {tmp_path / name} (batch 4, fixed): " in out, out
        io, _ = graph_io(tmp_path / name)
        assert io["input"][1] == [4, 3, IMAGE_SIZE, IMAGE_SIZE], name
        assert io["embedding"][1] == [4, settings["embedding_size"]], name
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        assert session.run(None, {"input": torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE).numpy()})[0].shape[0] == 4
        with pytest.raises(Exception, match="dimension"):  # (another batch size is refused by the graph)
            session.run(None, {"input": torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE).numpy()})
    # train.embed feeds such a graph slices of its batch.
    x = torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE)
    loaded, _ = embed.load_model(str(tmp_path / "backbone.onnx"), "cpu")
    np.testing.assert_allclose(loaded(x).numpy(), embeddings_of(model, x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--fp16", "--no-onnx"], "--fp16 goes with the ONNX graph, which --no-onnx does not write"),
    (["--batch-size", "8", "--no-onnx"], "--batch-size goes with the ONNX graph, which --no-onnx does not write"),
    (["--fp16-io"], "--fp16-io goes with --fp16"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_fp16_and_batch_size_refuse_what_they_cannot_go_with(trained, tmp_path, capsys, flags, message):
    ckpt, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.endswith(f"export: error: {message}\n"), err
    assert not (tmp_path / "out").exists()


def test_fp16_without_onnxruntime_says_what_to_install(trained, tmp_path, capsys, monkeypatch):
    from train import tools

    monkeypatch.setitem(sys.modules, "onnxruntime.transformers.float16", None)  # its import now fails
    monkeypatch.setattr(tools, "installed_version", lambda *names: None)  # not installed
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "out"), "--fp16"]) == 2
    assert capsys.readouterr().err == "export: error: --fp16 needs the onnx and onnxruntime packages (the [onnx] " \
        "extra): pip install onnx onnxruntime\n"
    assert not (tmp_path / "out").exists()


def test_an_fp16_graph_the_cpu_cannot_run_is_written_unchecked_in_one_line(trained, tmp_path, capsys, monkeypatch):
    # onnxruntime's CPU provider lacks float16 kernels for some ops (it runs most of them in float32, casting): the
    # graph is for a GPU, so a graph it cannot run is written, said unchecked; a float16 graph that differs is not.
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession

    def no_float16_kernels(path, *args, **kwargs):
        if "fp16" in os.path.basename(str(path)):
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
                               "Conv(11) node with name '/conv1/Conv'")
        return session(path, *args, **kwargs)

    ckpt, _ = trained
    monkeypatch.setattr(ort, "InferenceSession", no_float16_kernels)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "a"), "--fp16"]) == 0
    assert f"wrote {tmp_path / 'a' / 'backbone_fp16.onnx'}: backbone.onnx in float16, its input and output float32; " \
        f"not compared with PyTorch: onnxruntime {ort.__version__}'s CPU provider cannot run it " \
        "([ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Conv(11) node with name " \
        "'/conv1/Conv'); compare it on the GPU it is for; its largest value " in capsys.readouterr().out
    assert (tmp_path / "a" / "backbone_fp16.onnx").exists()
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setitem(export.TOLERANCES, "float16", 1e-9)  # (no float16 graph is that close)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "b"), "--fp16"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("export: error: backbone_fp16.onnx: onnxruntime's embeddings differ from PyTorch's by ") \
        and err.endswith(", in float16); nothing written (without --fp16 the export writes the fp32 graph alone)\n")
    assert not (tmp_path / "b").exists()


def test_an_fp16_graph_whose_values_pass_float16s_range_is_refused(trained, tmp_path, capsys, monkeypatch):
    # onnxruntime's CPU provider computes the float16 graph's nodes in float32: a value past 65504, inf on a GPU
    # computing in float16, passed its check. The fp32 graph's node outputs are measured on the check's batch.
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = TinyPReLUNet().eval()
    path = str(tmp_path / "tiny.onnx")
    export.export_onnx(model, path, 8)
    largest, node = export.largest_value(path, 8)
    with torch.no_grad():
        assert largest == pytest.approx(max(module(export.check_batch(8)).abs().max().item() for module in (
            model.conv, lambda x: model.prelu(model.conv(x)), model)), rel=1e-5)
        model.conv.weight.mul_(1e5)
    export.export_onnx(model, path, 8)
    largest, node = export.largest_value(path, 8)
    assert largest > 65504 and node == "/prelu/Mul"  # (a slope of 2 doubles the convolution's negative values)

    ckpt, _ = trained
    monkeypatch.setattr(export, "largest_value", lambda *args, **kwargs: (1.5e5, "/layer1/Add"))
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "out"), "--fp16"]) == 1
    assert capsys.readouterr().err == "export: error: backbone_fp16.onnx: backbone.onnx's node /layer1/Add computes " \
        "1.5e+05 on the check's batch, past float16's largest value 65504: on a GPU computing in float16 it is inf; " \
        "nothing written (without --fp16 the export writes the fp32 graph alone)\n"
    assert not (tmp_path / "out").exists()


def test_largest_value_reduces_each_output_inside_the_graph_and_reads_external_data(tmp_path, monkeypatch):
    # Every node's output made a graph output was held until the run's end, all at once: r100 took 0.18 GB more
    # an image (3.6 GB at --batch-size 12, 1.9 GB at the check's 3). Each is reduced to its largest magnitude in the
    # graph, run in an order that frees what it read (1.5 GB at 12), from a file beside the graph's.
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = TinyPReLUNet().eval()
    path = tmp_path / "tiny.onnx"
    export.export_onnx(model, str(path), 8)
    sessions = []
    session = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *args, **kwargs: sessions.append(
        (args, session(*args, **kwargs))) or sessions[-1][1])
    largest, node = export.largest_value(str(path), 8)
    (args, made), = sessions
    assert len(made.get_outputs()) > 5 and all(output.shape == [] for output in made.get_outputs())
    assert args[1].execution_order == ort.ExecutionOrder.PRIORITY_BASED
    with torch.no_grad():  # (test_an_fp16_graph_whose_values_pass_float16s_range_is_refused compares it with more)
        assert largest == pytest.approx(max(module(export.check_batch(8)).abs().max().item() for module in (
            model.conv, lambda x: model.prelu(model.conv(x)), model)), rel=1e-5)
    external = tmp_path / "external"
    external.mkdir()
    onnx.save_model(onnx.load(str(path)), str(external / "tiny.onnx"), save_as_external_data=True,
                    location="tiny.onnx.data", size_threshold=0)
    assert export.largest_value(str(external / "tiny.onnx"), 8) == (largest, node)
    assert sorted(os.listdir(external)) == ["tiny.onnx", "tiny.onnx.data"]  # (the file it ran from, gone)


def test_float16_onnx_infers_shapes_from_the_file_as_a_graph_past_2_gb_needs(tmp_path, monkeypatch):
    # Given the graph in memory, the converter serialised it for onnx's shape inference, which fails past protobuf's
    # 2 GB ('Failed to serialize proto': seen with a 2.0 GiB graph of external data, as vit_h's and r2060's are).
    # Given the path, it infers from the file. Here the in-memory inference fails as it does past 2 GB.
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnxruntime.transformers import float16

    def past_2_gb(model, *args, **kwargs):
        raise ValueError("Failed to serialize proto")

    monkeypatch.setattr(float16, "infer_shapes", past_2_gb)
    model = TinyPReLUNet().eval()
    export.export_onnx(model, str(tmp_path / "tiny.onnx"), 8)
    export.float16_onnx(str(tmp_path / "tiny.onnx"), str(tmp_path / "tiny_fp16.onnx"))
    assert {tensor.data_type for tensor in onnx.load(str(tmp_path / "tiny_fp16.onnx")).graph.initializer} == {
        onnx.TensorProto.FLOAT16}
    x = export.check_batch(8)
    got = ort.InferenceSession(str(tmp_path / "tiny_fp16.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=0.01 * max(model(x).abs().max().item(), 1))
    assert sorted(os.listdir(tmp_path)) == ["tiny.onnx", "tiny_fp16.onnx"]  # (the converter's file, gone)


def test_a_float16_graphs_external_data_goes_and_is_set_aside_with_it(trained, tmp_path, capsys):
    # A float16 graph past protobuf's 2 GB (r2060's) keeps its weights in backbone_fp16.onnx.data beside it: an export
    # without --fp16 removed the graph and left its 2 GB of weights, and a fresh run set the graph aside without them.
    from train import trainer

    ckpt, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    for name in ("backbone_fp16.onnx", "backbone_fp16.onnx.data", "backbone_normalized_fp16.onnx.data"):
        (out / name).write_text("an earlier export's")
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--no-onnx"]) == 0
    assert sorted(os.listdir(out)) == ["backbone.json", "backbone.pt"]
    assert f"removed {out / 'backbone_fp16.onnx.data'}: it was from an earlier export" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "backbone_fp16.onnx", "backbone_fp16.onnx.data"):
        (run / name).write_text("a run's")
    aside = trainer.set_aside_earlier_run(str(run))
    assert os.listdir(run) == ["earlier-1"]
    assert sorted(os.listdir(aside)) == ["backbone_fp16.onnx", "backbone_fp16.onnx.data", "checkpoint.pt"]


@pytest.mark.slow
def test_an_fp32_graphs_external_data_is_one_file_that_goes_and_is_set_aside_with_it(trained, tmp_path, monkeypatch,
                                                                                     capsys):
    # Past protobuf's 2 GB (vit_h's, r2060's) torch's TorchScript exporter writes each weight to a file named after it
    # beside the graph: hundreds of files in the output folder, which no later export removed and no fresh run set
    # aside. Written here as torch writes them past 2 GB, for a small graph.
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from train import trainer

    export_of_torch = torch.onnx.export

    def one_file_a_weight(model, args, path, **kwargs):
        export_of_torch(model, args, path, **kwargs)
        onnx.save_model(onnx.load(path), path, save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0)

    ckpt, _ = trained
    out = tmp_path / "out"
    with monkeypatch.context() as patched:
        patched.setattr(torch.onnx, "export", one_file_a_weight)
        assert export.main(["--checkpoint", ckpt, "--output", str(out), "--normalized-onnx"]) == 0
    exported = ["backbone.json", "backbone.onnx", "backbone.onnx.data", "backbone.pt", "backbone_normalized.onnx",
                "backbone_normalized.onnx.data"]
    assert sorted(os.listdir(out)) == exported
    graph = onnx.load(str(out / "backbone.onnx"), load_external_data=False).graph
    assert {entry.value for tensor in graph.initializer for entry in tensor.external_data
            if entry.key == "location"} == {"backbone.onnx.data"}
    capsys.readouterr()
    # A failed export leaves them whole; one without the graphs removes them.
    data = (out / "backbone.onnx.data").read_bytes()
    monkeypatch.setattr(export, "check_onnx", lambda *args, **kwargs: (_ for _ in ()).throw(ValueError("differs")))
    assert export.main(["--checkpoint", ckpt, "--output", str(out)]) == 1
    assert sorted(os.listdir(out)) == exported and (out / "backbone.onnx.data").read_bytes() == data
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--no-onnx"]) == 0
    assert sorted(os.listdir(out)) == ["backbone.json", "backbone.pt"]
    assert f"removed {out / 'backbone.onnx.data'}: it was from an earlier export" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "backbone.onnx", "backbone.onnx.data", "backbone_normalized.onnx.data"):
        (run / name).write_text("a run's")
    aside = trainer.set_aside_earlier_run(str(run))
    assert os.listdir(run) == ["earlier-1"]
    assert sorted(os.listdir(aside)) == ["backbone.onnx", "backbone.onnx.data", "backbone_normalized.onnx.data",
                                         "checkpoint.pt"]


def test_sort_nodes_moves_a_node_before_the_nodes_that_read_it_and_keeps_the_rest_in_place():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    # (onnxruntime 1.19's float16 converter appended the input's Cast after the nodes that read it)
    nodes = [helper.make_node("Relu", ["b"], ["c"], name="relu"), helper.make_node("Neg", ["x"], ["n"], name="neg"),
             helper.make_node("Add", ["c", "n"], ["y"], name="add"),
             helper.make_node("Cast", ["x"], ["b"], name="cast", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    export._sort_nodes(graph)
    assert [node.name for node in graph.node] == ["cast", "relu", "neg", "add"]
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    export._sort_nodes(graph)  # (in order already: as it was)
    assert [node.name for node in graph.node] == ["cast", "relu", "neg", "add"]


def test_sort_nodes_puts_a_moved_node_after_a_node_it_reads_that_moves_with_it():
    # A node waiting on two later nodes, the second of which reads the first: both move before it, in their order
    # (the two pushed at once put the second first, before the node it reads, and the checker refused the graph).
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", ["c", "b"], ["y"], name="add"),
             helper.make_node("Relu", ["c"], ["b"], name="relu"), helper.make_node("Neg", ["x"], ["c"], name="neg")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    export._sort_nodes(graph)
    assert [node.name for node in graph.node] == ["neg", "relu", "add"]
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_drop_float16_round_trips_keeps_float32_values_float32_and_the_casts_at_the_boundary():
    # The shape onnxruntime 1.19's converter gives a graph with nodes kept float32 (Add, Mul) around a float16 one
    # (Identity): a Cast to float16 after each float32 value and one back before each float32 node reading it,
    # the float32 input and output cast too. The round trips go; the float16 node's casts stay.
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    def cast(value, to, name):
        return helper.make_node("Cast", [value], [name], name=f"cast_{name}", to=to)

    half, single = TensorProto.FLOAT16, TensorProto.FLOAT
    nodes = [cast("x", half, "x16"), cast("x16", single, "x_add"), cast("x16", single, "x_mul"),
             helper.make_node("Identity", ["x16"], ["i16"], name="identity"), cast("i16", single, "i32"),
             helper.make_node("Add", ["x_add", "i32"], ["s32"], name="add"), cast("s32", half, "s16"),
             cast("s16", single, "s_mul"), helper.make_node("Mul", ["s_mul", "x_mul"], ["m32"], name="mul"),
             cast("m32", half, "m16"), cast("m16", single, "y")]
    types = {"x16": half, "x_add": single, "x_mul": single, "i16": half, "i32": single, "s32": single, "s16": half,
             "s_mul": single, "m32": single, "m16": half}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", single, [4])],
                              [helper.make_tensor_value_info("y", single, [4])],
                              value_info=[helper.make_tensor_value_info(name, to, [4]) for name, to in types.items()])
    export._drop_float16_round_trips(graph)
    assert [(node.name, list(node.input), list(node.output)) for node in graph.node] == [
        ("cast_x16", ["x"], ["x16"]), ("identity", ["x16"], ["i16"]), ("cast_i32", ["i16"], ["i32"]),
        ("add", ["x", "i32"], ["s32"]), ("mul", ["s32", "x"], ["y"])]
    assert sorted(value.name for value in graph.value_info) == ["i16", "i32", "s32", "x16"]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    x = np.array([1.0001, -3.14159, 200.0, 1e-9], dtype=np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # (in float32: 8e4 past float16's 65504 and 2e-18 below its smallest, which float16 made inf and 0)
    np.testing.assert_array_equal(got, (x + x.astype(np.float16).astype(np.float32)) * x)


def test_export_without_onnx_installed(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 0
    assert "skipped ONNX: ONNX export needs the onnx package" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "backbone.pt") and not os.path.exists(tmp_path / "backbone.onnx")


@pytest.mark.parametrize("installed, advice", [
    (None, "pip install onnxruntime to check it"),
    # onnxruntime 1.18 and older beside numpy 2: it was told to install what is installed.
    (("onnxruntime-gpu", "1.18.1"), "onnxruntime-gpu 1.18.1 is installed but does not import under numpy {numpy}: "
                                    "pip install -U onnxruntime-gpu to check it"),
])
def test_export_without_onnxruntime_importing_says_why_the_model_is_unchecked(installed, advice, trained, tmp_path,
                                                                             monkeypatch, capsys):
    from train import onnx_backbone, tools

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    monkeypatch.setattr(tools, "installed_version", lambda *names: installed)
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'backbone.onnx'}: not compared with PyTorch ({advice.format(numpy=np.__version__)})\n" \
        in out, out
    # So does a tool that runs the model (train.embed, verify, detect, ...), naming the ImportError.
    said = (r"pip install onnxruntime" if installed is None else
            r"onnxruntime-gpu 1\.18\.1 is installed but does not import under numpy \S+ \(ModuleNotFoundError: import "
            r"of onnxruntime halted; None in sys\.modules\): pip install -U onnxruntime-gpu")
    with pytest.raises(ValueError, match=rf"^.*backbone\.onnx: an ONNX model runs on onnxruntime: {said} "
                                         r"\(onnxruntime-gpu for CUDA\)$"):
        onnx_backbone.open_session(str(tmp_path / "backbone.onnx"))


def test_export_reports_a_missing_checkpoint(trained, tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    # The run's folder for its checkpoint: said so, with the file it holds.
    run = os.path.dirname(trained[0])
    assert embed.main(["--model", run, "--images", trained[1], "--output", str(tmp_path / "e.npy")]) == 2
    assert capsys.readouterr().err == f"embed: error: {run} is a folder, not a checkpoint file: {trained[0]}?\n"
    # A folder without images, as the face tools say it (was "no images (...) under <it>", naming no option).
    assert embed.main(["--model", trained[0], "--images", str(tmp_path), "--output", str(tmp_path / "e.npy")]) == 2
    assert capsys.readouterr().err == (f"embed: error: --images {tmp_path}: no images (.jpg, .jpeg, .png, .bmp) "
                                       "under it\n")
    # arcface_torch's output folder: its model.pt (and checkpoint_gpu_<rank>.pt) named, as the file to give.
    folder = tmp_path / "work_dirs"
    folder.mkdir()
    for name in ("model.pt", "checkpoint_gpu_0.pt"):
        shutil.copy(trained[0], folder / name)
    assert embed.main(["--model", str(folder), "--images", trained[1], "--output", str(tmp_path / "e.npy")]) == 2
    assert capsys.readouterr().err == (f"embed: error: {folder} is a folder, not a checkpoint file: "
                                       f"{folder / 'model.pt'} or {folder / 'checkpoint_gpu_0.pt'}?\n")


def test_export_and_embed_report_a_corrupt_checkpoint(trained, tmp_path, capsys):
    ckpt, faces = trained
    with open(ckpt, "rb") as f:
        truncated = f.read()[:5000]  # a copy cut short
    for name, content in (("truncated.pt", truncated), ("text.pt", b"not a checkpoint\n")):
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(content)
        assert export.main(["--checkpoint", path, "--output", str(tmp_path / "export")]) == 2
        assert embed.main(["--model", path, "--images", faces, "--output", str(tmp_path / "emb.npy")]) == 2
        err = capsys.readouterr().err
        assert err.count(f"export: error: {path}: not a readable checkpoint") == 1 and "Traceback" not in err
        assert err.count(f"embed: error: {path}: not a readable checkpoint") == 1


@pytest.mark.parametrize("table, failing", [("t.npy", "the names"), ("t.npy", "the provenance"),
                                            ("t.csv", "the provenance")])
def test_a_full_disk_as_a_table_is_written_leaves_the_table_of_before(tmp_path, monkeypatch, table, failing):
    # The values, the names and the provenance were each renamed into place as written: a full disk at the names
    # left new values beside the names of another table (of the same count: read as that table), and at the
    # provenance, a new table beside the provenance (model, digest) of the one before.
    path = str(tmp_path / table)
    names, vectors = [f"{i}.jpg" for i in range(4)], np.eye(4, dtype=np.float32)
    embed.write_table(path, names, vectors, about={"model": "first"})
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    again = names[::-1]
    if failing == "the names":
        class CutShort(str):  # (the disk full as this name is written)
            def __add__(self, other):
                full_disk()

        again[-1] = CutShort(again[-1])
    else:
        monkeypatch.setattr(json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        embed.write_table(path, again, 2 * vectors, about={"model": "second"})
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_embed_folder_and_compare(trained, tmp_path, capsys):
    ckpt, faces = trained
    output = tmp_path / "emb.npy"
    assert embed.main(["--model", ckpt, "--images", faces, "--output", str(output)]) == 0
    vectors = np.load(output)
    names = (tmp_path / "emb.txt").read_text().split()
    assert vectors.shape[0] == len(names) == 16 and names[0] == os.path.join("id_000", "00.png")
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    capsys.readouterr()
    assert embed.main(["--model", ckpt, "--images", faces, "--output", str(tmp_path / "bare")]) == 0
    assert f"{tmp_path / 'bare.npy'}, {tmp_path / 'bare.txt'}, {tmp_path / 'bare.npy.json'}" in \
        capsys.readouterr().out  # the files np.save wrote, and where they came from
    assert np.array_equal(np.load(tmp_path / "bare.npy"), vectors)
    about = json.loads((tmp_path / "emb.npy.json").read_text())
    assert {k: about[k] for k in ("made_by", "model", "images", "faces", "flip", "normalised", "rows", "values")} == {
        "made_by": "train.embed", "model": os.path.abspath(ckpt), "images": os.path.abspath(faces),
        "faces": "the images as they are", "flip": True, "normalised": True, "rows": 16, "values": vectors.shape[1]}
    # A table written again without provenance (by code calling write_table) leaves no stale one.
    embed.write_table(str(output), names[:2], vectors[:2])
    assert not (tmp_path / "emb.npy.json").exists()
    # Verification's embeddings, whether the images are decoded here or by worker processes.
    model, settings = checkpoint.load_backbone(ckpt)
    images = torch.stack([torch.from_numpy(load_image_file(os.path.join(faces, name), settings["image_size"])
                                           .transpose(2, 0, 1).copy()) for name in names])
    expected = compute_embeddings(model, SimpleNamespace(images=images), device="cpu")
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    for workers in ("0", "2"):
        out = tmp_path / f"workers{workers}.npy"
        assert embed.main(["--model", ckpt, "--images", faces, "--output", str(out), "--workers", workers,
                           "--batch-size", "5"]) == 0
        np.testing.assert_allclose(np.load(out), vectors, rtol=1e-5, atol=1e-6)

    assert embed.main(["--model", ckpt, "--images", faces, "--output", str(tmp_path / "emb.csv")]) == 0
    header, first = (tmp_path / "emb.csv").read_text().splitlines()[:2]
    assert header.startswith("image,e0,e1") and first.startswith(names[0] + ",")
    np.testing.assert_allclose(np.array(first.split(",")[1:], dtype=np.float32), vectors[0], rtol=1e-5, atol=1e-6)

    image = os.path.join(faces, names[0])
    capsys.readouterr()
    assert embed.main(["--model", ckpt, "--compare", image, image, "--threshold", "0.5"]) == 0
    assert "cosine similarity 1.0000: same person (threshold 0.5000, from --threshold)" in capsys.readouterr().out
    other = os.path.join(faces, names[-1])
    assert embed.main(["--model", ckpt, "--compare", image, other, "--threshold", "1"]) == 0
    assert "different people" in capsys.readouterr().out


def test_cosine_threshold_from_verification():
    # A squared distance t between unit vectors is a cosine of 1 - t/2.
    assert embed.cosine_threshold({"threshold": 1.4}, None) == (pytest.approx(0.3), "the model's last verification")
    assert embed.cosine_threshold({}, None)[0] == embed.DEFAULT_COSINE_THRESHOLD
    assert embed.cosine_threshold({"threshold": 1.4}, 0.7) == (0.7, "--threshold")


def test_export_opset_is_checked_before_anything_is_written(trained, tmp_path, capsys):
    ckpt, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "out"), "--opset", "99"])
    assert exit_info.value.code == 2 and "--opset 99: torch's ONNX exporter writes opsets" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_export_that_fails_removes_the_folders_it_made(trained, tmp_path, capsys, monkeypatch):
    # It removed --output n1/n2/out, left empty by the failure, and left n1/n2 (as the trainer did: ddab0b8).
    ckpt, _ = trained

    def fails(*args, **kwargs):
        raise ValueError("injected")

    monkeypatch.setattr(export, "export_onnx", fails)
    (tmp_path / "there").mkdir()
    for output in ("n1/n2/out", "there/n2/out"):
        assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / output)]) == 1
        assert capsys.readouterr().err.startswith("export: error: injected; nothing written")
    assert sorted(os.listdir(tmp_path)) == ["there"] and os.listdir(tmp_path / "there") == []


def test_a_checkpoint_that_cannot_be_read_says_so(trained, tmp_path, capsys, monkeypatch):
    # (was "not a readable checkpoint (truncated, or not saved by torch.save with tensors only?): [Errno 13] ...")
    ckpt, _ = trained

    def refused(path, *args, **kwargs):  # (chmod 000 does not stop root, who runs the tests here)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(torch, "load", refused)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"export: error: {ckpt}: cannot read it: Permission denied\n"
    assert not (tmp_path / "out").exists()


def test_a_bare_state_dicts_image_size_is_112_where_it_fits_else_a_guess_said(trained, tmp_path, capsys):
    # A bare state dict's weights fit a range of image sizes. The demo network at 112 px was exported as 128 px,
    # the top of its range, and train.embed resized faces to that, for other embeddings without an error.
    torch.save(get_model("small", image_size=112, embedding_size=64).state_dict(), tmp_path / "at112.pt")
    assert export.main(["--checkpoint", str(tmp_path / "at112.pt"), "--output", str(tmp_path / "a"), "--no-onnx"]) == 0
    assert json.loads((tmp_path / "a" / "backbone.json").read_text())["image_size"] == 112
    assert "note" not in capsys.readouterr().err
    # Where 112 px is not one of them, the size taken is said, and how to record the right one.
    ckpt, _ = trained
    torch.save(checkpoint.load(ckpt)["model"], tmp_path / "at32.pt")
    assert checkpoint.load_backbone(str(tmp_path / "at32.pt"))[1]["image_size"] == IMAGE_SIZE
    assert capsys.readouterr().err == f"note: {tmp_path / 'at32.pt'} records no image size, and its weights fit any " \
        f"from 1 to 32 px: taken as 32 px (python -m train.export --image-size N records the size in backbone.json " \
        "beside the weights)\n"
    assert export.main(["--checkpoint", str(tmp_path / "at32.pt"), "--output", str(tmp_path / "b"), "--no-onnx",
                        "--image-size", "30"]) == 0
    assert json.loads((tmp_path / "b" / "backbone.json").read_text())["image_size"] == 30
    assert "note" not in capsys.readouterr().err
    checkpoint.load_backbone(str(tmp_path / "b" / "backbone.pt"))  # (the size recorded beside it: no note)
    assert "note" not in capsys.readouterr().err


def test_compare_with_a_model_that_records_no_threshold_says_the_default_is_no_measured_one(tmp_path, capsys):
    # The README: without a verification's threshold --compare takes 0.3, "which no verification chose: the
    # message says so"; the line said only "from the default".
    torch.save(get_model("small", image_size=112, embedding_size=64).state_dict(), tmp_path / "backbone.pth")
    face = tmp_path / "a.png"
    Image.fromarray(np.full((112, 112, 3), 128, np.uint8)).save(face)
    assert embed.main(["--model", str(tmp_path / "backbone.pth"), "--compare", str(face), str(face)]) == 0
    out, err = capsys.readouterr()
    assert "cosine similarity 1.0000: same person (threshold 0.3000, from the default)" in out
    assert f"embed: note: {tmp_path / 'backbone.pth'} records no verification that gives the threshold: cosine 0.3 " \
        "is taken, a starting point, not a measured threshold (give --threshold: " in err, err


def test_a_recorded_threshold_that_decides_nothing_is_said_so(tmp_path, capsys):
    # A model at chance (3 steps of mbf) verified at 50% with threshold 0.0 (no threshold did better than
    # "all different"): cosine 1.0, which --compare applied without a word, calling a collapsed model's
    # two faces one person (their cosine rounds to 1); cluster and search refused cosine <= 0 only.
    torch.save(get_model("small", image_size=112, embedding_size=64).state_dict(), tmp_path / "backbone.pth")
    (tmp_path / "backbone.json").write_text(json.dumps({"network": "small", "embedding_size": 64, "image_size": 112,
                                                        "threshold": 0.0}))
    face = tmp_path / "a.png"
    Image.fromarray(np.full((112, 112, 3), 128, np.uint8)).save(face)
    model = str(tmp_path / "backbone.pth")
    assert embed.main(["--model", model, "--compare", str(face), str(face)]) == 0
    out, err = capsys.readouterr()
    assert "(threshold 1.0000, from the model's last verification)" in out  # (the verdict: as the cosine rounds)
    assert err == (f"embed: note: {model}'s last verification threshold is cosine 1.0000: verification found no "
                   "threshold better than calling every pair different (a model at chance?): a verdict at it means "
                   "nothing (give --threshold: python -m train.tools.roc measures the one of a false accept rate on "
                   "your own labelled faces)\n")
    assert embed.main(["--model", model, "--compare", str(face), str(face), "--threshold", "0.5"]) == 0
    assert capsys.readouterr().err == ""
    # The tools that decide with it refuse it (as one at cosine 0 or below); roc, which reports what it
    # gives beside the thresholds it measures, takes it.
    settings = {"threshold": 0.0}
    with pytest.raises(ValueError, match=r"last verification threshold is cosine 1\.0000: verification found no "
                                         r"threshold better than calling every pair different .*: give --threshold$"):
        embed.model_threshold(model, settings, None, tool="cluster")
    with pytest.raises(ValueError, match=r"cosine -0\.1000, which takes faces that are not alike at all"):
        embed.model_threshold(model, {"threshold": 2.2}, None, tool="search")
    assert embed.model_threshold(model, settings, None, tool="roc", decides=False)[0] == 1.0
    assert embed.model_threshold(model, settings, 0.4, tool="cluster")[:2] == (0.4, "--threshold")


def test_export_refuses_a_layout_that_contradicts_the_checkpoint(trained, tmp_path, capsys):
    # --network r18 with a training checkpoint built r18 and printed load_state_dict's 94 lines.
    ckpt, _ = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "out"), "--network", "r18"]) == 2
    err = capsys.readouterr().err
    assert err == f"export: error: {ckpt} records --network small, --network r18 given: that option is for a bare " \
                  "state dict whose layout cannot be guessed; leave it out\n"
    assert not (tmp_path / "out").exists()
    # A bare state dict told the wrong layout: what it holds, in one sentence.
    bare = tmp_path / "bare.pt"
    torch.save(checkpoint.load(ckpt)["model"], bare)
    with pytest.raises(ValueError, match=r"does not fit network r18 with embedding size 64 at 32px: it holds network "
                                         r"small with embedding size 64 at 32px$"):
        checkpoint.load_backbone(str(bare), network="r18", embedding_size=64, image_size=32)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "same"), "--network", "small",
                        "--no-onnx"]) == 0  # the recorded value itself is no contradiction


def earlier_export(folder):
    """The three files of an earlier export, each holding its own name."""
    os.makedirs(folder, exist_ok=True)
    for name in ("backbone.pt", "backbone.json", "backbone.onnx"):
        (folder / name).write_text(name)


def assert_earlier_export_untouched(folder):
    assert sorted(os.listdir(folder)) == ["backbone.json", "backbone.onnx", "backbone.pt"]  # no temporary left
    for name in os.listdir(folder):
        assert (folder / name).read_text() == name


def test_a_failed_onnx_export_is_an_error_and_writes_nothing(trained, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    ckpt, _ = trained
    earlier_export(tmp_path)

    def exporter_fails(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::exotic' to ONNX is not supported.\nMore lines.")

    monkeypatch.setattr(torch.onnx, "export", exporter_fails)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == ("export: error: the ONNX exporter failed (opset 17): Exporting the operator 'aten::exotic' to "
                   "ONNX is not supported.; nothing written (--no-onnx exports the state dict alone)\n")
    assert_earlier_export_untouched(tmp_path)


def test_an_onnx_graph_that_onnxruntime_disagrees_with_is_not_written(trained, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ckpt, _ = trained
    earlier_export(tmp_path)

    class WrongSession(ort.InferenceSession):  # the graph's embeddings, off by one
        def run(self, outputs, feeds):
            return [y + 1 for y in super().run(outputs, feeds)]

    monkeypatch.setattr(ort, "InferenceSession", WrongSession)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("export: error: onnxruntime's embeddings differ from PyTorch's by ") and err.count("\n") == 1
    assert_earlier_export_untouched(tmp_path)


def test_export_without_onnx_removes_an_earlier_onnx(trained, tmp_path, monkeypatch, capsys):
    ckpt, _ = trained
    earlier_export(tmp_path)
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"removed {tmp_path / 'backbone.onnx'}: it was from an earlier export and does not match" in err
    assert sorted(os.listdir(tmp_path)) == ["backbone.json", "backbone.pt"]
    assert json.loads((tmp_path / "backbone.json").read_text())["network"] == "small"


def test_embed_keeps_existing_files_unless_told(trained, tmp_path, capsys):
    ckpt, faces = trained
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg 1\n")  # the user's, beside the embeddings they ask for
    argv = ["--model", ckpt, "--images", faces, "--output", str(tmp_path / "pairs.npy")]
    assert embed.main(argv) == 2
    assert capsys.readouterr().err == f"embed: error: {pairs} exists: pass --overwrite to replace it\n"
    assert sorted(os.listdir(tmp_path)) == ["pairs.txt"] and pairs.read_text() == "a.jpg b.jpg 1\n"
    assert embed.main(argv + ["--overwrite"]) == 0
    assert len(pairs.read_text().split()) == 16 and np.load(tmp_path / "pairs.npy").shape[0] == 16
    assert sorted(os.listdir(tmp_path)) == ["pairs.npy", "pairs.npy.json", "pairs.txt"]  # no temporary left
    assert embed.main(argv) == 2 and "pairs.npy exists" in capsys.readouterr().err


def test_embed_warns_of_photos_that_are_not_face_crops(trained, tmp_path, capsys):
    # A photo of any shape was squeezed into the model's square input without a word.
    ckpt, faces = trained
    photo = tmp_path / "photos" / "p" / "wide.png"
    photo.parent.mkdir(parents=True)
    Image.open(sorted(embed.list_images(faces))[0]).resize((48, 32)).save(photo)
    assert embed.main(["--model", ckpt, "--images", str(tmp_path / "photos"), "--output", str(tmp_path / "e.npy"),
                       "--workers", "0"]) == 0
    assert f"warning: {photo} is 48x32 (width x height), not square" in capsys.readouterr().err
    assert embed.main(["--model", ckpt, "--compare", str(photo), str(photo), "--threshold", "0.5"]) == 0
    assert capsys.readouterr().err.count("not square") == 2
    # Photos past the folder's first image (a crop) were not looked at: they are counted as they are read.
    crop = tmp_path / "photos" / "a" / "crop.png"
    crop.parent.mkdir()
    Image.open(sorted(embed.list_images(faces))[0]).save(crop)
    Image.open(photo).resize((40, 30)).save(tmp_path / "photos" / "p" / "wider.png")
    for workers in ("0", "1"):
        assert embed.main(["--model", ckpt, "--images", str(tmp_path / "photos"), "--output", str(tmp_path / "e.npy"),
                           "--workers", workers, "--overwrite"]) == 0
        err = capsys.readouterr().err
        assert f"warning: 2 of the 3 images are not square (the first: {photo}, 48x32)" in err, err
        assert "(width x height), not square" not in err  # the first image, a crop, was square


def test_embed_csv_quotes_names(trained, tmp_path):
    ckpt, faces = trained
    odd = tmp_path / "faces"
    os.makedirs(odd / 'smith, "jo"')
    shutil.copy(os.path.join(faces, "id_000", "00.png"), odd / 'smith, "jo"' / "1,2.png")
    assert embed.main(["--model", ckpt, "--images", str(odd), "--output", str(tmp_path / "e.csv")]) == 0
    with open(tmp_path / "e.csv", newline="") as f:
        header, row = list(csv.reader(f))
    assert row[0] == os.path.join('smith, "jo"', "1,2.png") and len(row) == len(header)


def test_a_full_disk_as_the_norms_are_written_leaves_the_table_and_norms_of_before(trained, tmp_path, monkeypatch,
                                                                                   capsys):
    # The norms were written after the table's files had been renamed into place: a full disk there left the new
    # table (whose .json names the norms file) beside the norms of the one before, which quality reads as its own
    # where the faces' names are the same.
    ckpt, faces = trained
    copied = tmp_path / "copied"
    shutil.copytree(faces, copied)
    work = tmp_path / "out"
    work.mkdir()
    argv = ["--model", ckpt, "--output", str(work / "t.npy"), "--norms", str(work / "n.csv")]
    assert embed.main([*argv, "--images", faces]) == 0
    before = {name: (work / name).read_bytes() for name in os.listdir(work)}
    assert sorted(before) == ["n.csv", "t.npy", "t.npy.json", "t.txt"]
    fdopen, opened = os.fdopen, []

    def full_disk_at_the_norms(fd, mode="r", *args, **kwargs):  # (text files: the names, the .json, the norms)
        opened.append(mode)
        if opened.count("w") == 3:
            os.close(fd)
            raise OSError(28, "No space left on device")
        return fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "fdopen", full_disk_at_the_norms)
    capsys.readouterr()
    assert embed.main([*argv, "--images", str(copied), "--overwrite"]) == 2
    assert capsys.readouterr().err == "embed: error: [Errno 28] No space left on device\n"
    assert {name: (work / name).read_bytes() for name in os.listdir(work)} == before  # (no temporary left either)


def test_embed_writes_feature_norms(trained, tmp_path, capsys):
    """--norms: each face's mean of ‖f(image)‖ and ‖f(mirror)‖ before normalisation (MagFace's quality),
    in the rows' order; --compare prints the two; neither replaces a file the run reads."""
    ckpt, faces = trained
    output, norms = tmp_path / "e.npy", tmp_path / "norms.csv"
    assert embed.main(["--model", ckpt, "--images", faces, "--output", str(output), "--norms", str(norms),
                       "--workers", "0", "--batch-size", "5"]) == 0
    assert str(norms) in capsys.readouterr().out
    names = (tmp_path / "e.txt").read_text().splitlines()
    with open(norms, newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["image", "norm"] and [row[0] for row in rows] == names
    model, settings = checkpoint.load_backbone(ckpt)
    images = torch.stack([torch.from_numpy(load_image_file(os.path.join(faces, name), settings["image_size"])
                                           .transpose(2, 0, 1).copy()) for name in names])
    x = (images.float() - 127.5) / 127.5
    expected = (embeddings_of(model, x).norm(dim=1) + embeddings_of(model, x.flip(3)).norm(dim=1)) / 2
    got = np.array([float(row[1]) for row in rows])
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)
    assert np.ptp(got) > 0      # one number a face, not one for all

    first, last = os.path.join(faces, names[0]), os.path.join(faces, names[-1])
    assert embed.main(["--model", ckpt, "--compare", first, last]) == 0
    assert f"feature norms {got[0]:.2f} and {got[-1]:.2f}" in capsys.readouterr().out

    def error(argv):
        try:
            code = embed.main(["--model", ckpt, *argv])
        except SystemExit as exit_info:
            code = exit_info.code
        return code, capsys.readouterr().err
    # The norms file may not be the table, nor replace the model with --overwrite; --compare prints its own.
    code, err = error(["--images", faces, "--output", str(output), "--norms", str(tmp_path / "e.txt"),
                       "--overwrite"])
    assert code == 2 and "--norms and --output must be different files" in err
    code, err = error(["--images", faces, "--output", str(tmp_path / "f.npy"), "--norms", ckpt, "--overwrite"])
    assert code == 2 and "one of the files this run reads" in err and os.path.getsize(ckpt) > 0
    code, err = error(["--compare", first, last, "--norms", str(tmp_path / "n.csv")])
    assert code == 2 and "--norms goes with --images" in err
    code, err = error(["--images", faces, "--output", str(tmp_path / "g.npy"), "--norms", str(norms)])
    assert code == 2 and f"{norms} exists" in err and not os.path.exists(tmp_path / "g.npy")
    # The .txt beside an .npy output may not replace the --landmarks file either.
    landmarks = tmp_path / "lm.txt"
    landmarks.write_text("id_000/00.png 1 2 3 4 5 6 7 8 9 10\n")
    code, err = error(["--images", faces, "--landmarks", str(landmarks), "--output", str(tmp_path / "lm.npy"),
                       "--overwrite"])
    assert code == 2 and "one of the files this run reads" in err and landmarks.read_text().startswith("id_000")


@pytest.mark.parametrize("mistake, message", [
    ("corrupt image", "x.png: cannot read the image: not an image format Pillow reads (17 bytes)"),
    ("corrupt compare", "x.png: cannot read the image: not an image format Pillow reads (17 bytes)"),
    ("batch size 0", "--batch-size must be at least 1"),
    ("device foo", "--device 'foo' is not a torch device"),
    ("device cuda", "--device cuda, but torch sees no CUDA device"),
    # (each of these was taken without a word: no file written, no decision made, a <folder>.npy beside it)
    ("output with compare", "--output goes with --images (--compare prints its result)"),
    ("threshold with images", "--threshold goes with --compare (--images writes the embeddings, and decides nothing)"),
    ("threshold past 1", "--threshold is a cosine similarity, from -1 to 1: got 2.0"),
    ("threshold nan", "--threshold is a cosine similarity, from -1 to 1: got nan"),
    ("output a folder", "is a folder: name a .npy or .csv file"),
    ("images not a folder", "--images ABSENT is not a folder"),
    ("compare a folder", "--compare FACES is a folder, not an image: name two image files"),  # (was: no image at)
])
def test_embed_mistakes_are_one_line_errors(trained, tmp_path, capsys, mistake, message):
    ckpt, faces = trained
    if mistake == "device cuda" and torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device")
    broken = tmp_path / "broken"
    shutil.copytree(faces, broken)
    (broken / "id_001" / "x.png").write_bytes(b"\x89PNG not an image")
    output = str(tmp_path / "e.npy")
    compared = [os.path.join(faces, "id_000", "00.png"), os.path.join(faces, "id_000", "01.png")]
    argv = {
        "corrupt image": ["--images", str(broken), "--output", output],
        "corrupt compare": ["--compare", os.path.join(faces, "id_000", "00.png"), str(broken / "id_001" / "x.png")],
        "batch size 0": ["--images", faces, "--output", output, "--batch-size", "0"],
        "device foo": ["--images", faces, "--output", output, "--device", "foo"],
        "device cuda": ["--images", faces, "--output", output, "--device", "cuda"],
        "output with compare": ["--compare", *compared, "--output", output],
        "threshold with images": ["--images", faces, "--output", output, "--threshold", "0.3"],
        "threshold past 1": ["--compare", *compared, "--threshold", "2"],
        "threshold nan": ["--compare", *compared, "--threshold", "nan"],
        "output a folder": ["--images", faces, "--output", str(tmp_path)],
        "images not a folder": ["--images", str(tmp_path / "absent"), "--output", output],
        "compare a folder": ["--compare", compared[0], faces],
    }[mistake]
    message = message.replace("ABSENT", str(tmp_path / "absent")).replace("FACES", faces)
    try:
        code = embed.main(["--model", ckpt, *argv])
    except SystemExit as exit_info:  # argparse's own check
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.splitlines()[-1] and "Traceback" not in err, err
    assert not os.path.exists(output) and not os.path.exists(str(tmp_path) + ".npy")
    if mistake.startswith(("device", "corrupt", "images", "compare")):  # (the others: argparse's, its usage line first)
        assert err.startswith("embed: error: ") and err.count("\n") == 1, err


def test_embed_says_a_compared_image_that_is_a_broken_symbolic_link_is_one(trained, tmp_path, capsys):
    # A link to a disk not mounted: "no image at" alone sent the user looking for the link, which is there
    # (3a1e680's checkpoint.dangling).
    ckpt, faces = trained
    gone = tmp_path / "gone.png"
    gone.symlink_to(tmp_path / "unmounted.png")
    assert embed.main(["--model", ckpt, "--compare", os.path.join(faces, "id_000", "00.png"), str(gone)]) == 2
    assert capsys.readouterr().err == \
        f"embed: error: no image at {gone} (a broken symbolic link to {tmp_path / 'unmounted.png'})\n"


def test_embed_makes_the_output_folder(trained, tmp_path):
    ckpt, faces = trained
    output = tmp_path / "new" / "folder" / "e.npy"
    assert embed.main(["--model", ckpt, "--images", faces, "--output", str(output)]) == 0
    assert np.load(output).shape[0] == 16


class _OneAtATime(torch.nn.Module):
    """A backbone exported with a fixed reshape to a batch of one, behind a free batch dimension."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x).reshape(1, -1)


class _RawPixels(torch.nn.Module):
    """A backbone behind the input scaling MXNet's converted models carry in their graph: fed pixels
    0-255, it subtracts and multiplies first; with ``shape`` its input's size is read too (a Shape
    node beside the Sub), with ``cast`` the scaling is done in float64 (Cast nodes around it)."""

    def __init__(self, backbone, *, shape=False, cast=False):
        super().__init__()
        self.backbone, self.shape, self.cast = backbone, shape, cast

    def forward(self, x):
        y = x.double() if self.cast else x
        y = ((y - 127.5) * (1 / 127.5)).float()
        out = self.backbone(y)
        return out.reshape(x.shape[0], -1) if self.shape else out


def _export_graph(module, path, *, dynamic=True):
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation
        kwargs = dict(input_names=["data"], output_names=["fc1"], opset_version=17,
                      dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}} if dynamic else None)
        dummy = (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),)
        try:
            torch.onnx.export(module.eval(), dummy, str(path), dynamo=False, **kwargs)
        except TypeError:  # a torch before the exporter's `dynamo` switch: TorchScript's is its only one
            torch.onnx.export(module.eval(), dummy, str(path), **kwargs)
    return str(path)


@pytest.mark.slow
def test_embed_and_compare_with_onnx_models(trained, tmp_path, capsys):
    """`--model x.onnx`: train.export's graph gives what its state dict gives; a graph that scales its
    own input (as insightface's models converted from MXNet do) is fed pixels, one of fixed batch
    size is fed slices of it; a graph that is not a recognition model is a one-line error."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from train.onnx_backbone import feeds_raw_pixels, load_onnx_backbone

    ckpt, faces = trained
    export_dir = tmp_path / "export"
    assert export.main(["--checkpoint", ckpt, "--output", str(export_dir)]) == 0
    expected = tmp_path / "pt.npy"
    assert embed.main(["--model", str(export_dir / "backbone.pt"), "--images", faces, "--output", str(expected),
                       "--workers", "0"]) == 0
    vectors = np.load(expected)
    model, settings = checkpoint.load_backbone(ckpt)
    graphs = {
        "export": str(export_dir / "backbone.onnx"),
        "raw": _export_graph(_RawPixels(model), tmp_path / "raw.onnx"),
        "raw_shape": _export_graph(_RawPixels(model, shape=True), tmp_path / "raw_shape.onnx"),
        "raw_cast": _export_graph(_RawPixels(model, cast=True), tmp_path / "raw_cast.onnx"),
        "batch1": _export_graph(model, tmp_path / "batch1.onnx", dynamic=False),
        "reshape1": _export_graph(_OneAtATime(model), tmp_path / "reshape1.onnx"),
    }
    for kind, graph in graphs.items():
        onnx_model, onnx_settings = load_onnx_backbone(graph)
        assert onnx_settings["image_size"] == IMAGE_SIZE and onnx_settings["embedding_size"] == vectors.shape[1]
        assert onnx_model.raw_pixels == kind.startswith("raw") == feeds_raw_pixels(graph, onnx_model.input.name)
        assert onnx_model.batch == (1 if kind in ("batch1", "reshape1") else None)
        out = tmp_path / f"{kind}.npy"
        assert embed.main(["--model", graph, "--images", faces, "--output", str(out), "--workers", "0",
                           "--batch-size", "5"]) == 0
        np.testing.assert_allclose(np.load(out), vectors, atol=2e-5, err_msg=kind)
    # An ONNX file under another name (a download saved as model.bin) is told by its first bytes.
    renamed = tmp_path / "model.bin"
    shutil.copy(graphs["export"], renamed)
    out = tmp_path / "renamed.npy"
    assert embed.main(["--model", str(renamed), "--images", faces, "--output", str(out), "--workers", "0"]) == 0
    np.testing.assert_allclose(np.load(out), vectors, atol=2e-5)
    # The export's backbone.json (beside backbone.onnx) gives the threshold, as for backbone.pt.
    written = json.loads((export_dir / "backbone.json").read_text())
    assert ("threshold" in written) == ("threshold" in load_onnx_backbone(graphs["export"])[1])
    image = os.path.join(faces, "id_000", "00.png")
    capsys.readouterr()
    assert embed.main(["--model", graphs["raw"], "--compare", image, image, "--threshold", "0.5"]) == 0
    assert "cosine similarity 1.0000: same person" in capsys.readouterr().out

    # A graph that gives few values a face (insightface's gender/age model: 3) runs, with a warning.
    class GenderAge(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    capsys.readouterr()
    assert embed.main(["--model", _export_graph(GenderAge(), tmp_path / "genderage.onnx"), "--images", faces,
                       "--output", str(tmp_path / "ga.npy")]) == 0
    assert "3-D outputs: is it a recognition model?" in capsys.readouterr().err

    # Graphs that are no recognition model, and files that are no graph: one-line errors.
    class Features(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 4)

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    for path, message in ((_export_graph(Features(), tmp_path / "features.onnx"), "not (N, D) embeddings"),
                          (str(broken), "onnxruntime cannot load it"),
                          (str(tmp_path / "missing.onnx"), "no model at")):
        assert embed.main(["--model", path, "--images", faces, "--output", str(tmp_path / "x.npy")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not (tmp_path / "x.npy").exists(), err


@pytest.mark.parametrize("content, message", [
    ('{"network": "small", "threshold": "abc"}', "threshold is 'abc', not a number"),
    ("{'network': 'small'}", "not the settings JSON train.export writes"),
    ("[1, 2]", "not the settings JSON train.export writes"),
])
def test_a_bad_settings_file_is_named(trained, tmp_path, capsys, content, message):
    ckpt, faces = trained
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--no-onnx"]) == 0
    (tmp_path / "backbone.json").write_text(content)
    capsys.readouterr()
    assert embed.main(["--model", str(tmp_path / "backbone.pt"), "--compare", os.path.join(faces, "id_000", "00.png"),
                       os.path.join(faces, "id_000", "01.png")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'backbone.json'}: {message}" in err and err.count("\n") == 1, err


def test_a_file_that_is_not_a_feature_table_is_named_so(tmp_path):
    # train.ijb / train.tinyface --features garbage.pt (the file exists) said "no file at garbage.pt.npy".
    other = tmp_path / "garbage.pt"
    other.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match=r"garbage\.pt: not a feature table: a \.npy .* or a \.csv"):
        embed.read_table(str(other))
    with pytest.raises(FileNotFoundError, match=r"no file at .*missing\.npy"):  # a name without .npy: np.save's
        embed.read_table(str(tmp_path / "missing"))
    # A folder (cluster --embeddings aligned/, ijb --features feats) said "no file at aligned/.npy".
    for folder in (str(tmp_path), str(tmp_path) + os.sep):
        with pytest.raises(ValueError, match=rf"^{re.escape(folder)} is a folder, not a table: a \.npy .* or a \.csv"):
            embed.read_table(folder)


@pytest.mark.parametrize("inputs, message", [
    ([("data", [None, 3, 32, 32]), ("mask", [None, 3, 32, 32])], "the graph takes 2 inputs, not one image batch"),
    ([("data", [None, 1, 32, 32])], "the graph's input data is ['n0', 1, 32, 32], not (N, 3, H, W) images"),
    ([("data", [None, 3, 32])], "the graph's input data is ['n0', 3, 32], not (N, 3, H, W) images"),
    ([("data", [None, 3, 32, 24])], "the graph's input is 32x24; the faces here are square"),
])
def test_a_graph_whose_input_is_not_one_batch_of_square_colour_faces_is_named(tmp_path, capsys, inputs, message):
    # A detector, a grey-scale or a 112x96 (SphereFace's) model given as --model: one line naming the file and
    # its input, before any face is read.
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n0" if d is None else d for d in shape])
              for name, shape in inputs]
    graph = helper.make_graph([helper.make_node("Flatten", ["data"], ["fc1"])], "g", values,
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, None)])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    face = tmp_path / "face.png"
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE)).save(face)
    assert embed.main(["--model", str(path), "--compare", str(face), str(face)]) == 2
    assert capsys.readouterr().err == f"embed: error: {path}: {message}\n"


def test_a_graph_of_fixed_batch_is_fed_padded_slices_and_one_of_free_size_faces_of_112px(tmp_path, capsys):
    # Third-party graphs: one exported with a fixed batch of 3 runs 5 faces as slices of 3, the last padded,
    # each face's own output kept (the padding's dropped); one whose height and width are free is fed 112 px
    # faces, said in a note; one with a single fixed side takes that side.
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from train.onnx_backbone import load_onnx_backbone

    def graph(name, shape):
        nodes = [helper.make_node("ReduceMean", ["data"], ["fc1"], axes=[2, 3], keepdims=0)]
        made = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, shape)],
                                 [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, None)])
        model = helper.make_model(made, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        onnx.save(model, str(tmp_path / name))
        return str(tmp_path / name)

    model, settings = load_onnx_backbone(graph("fixed.onnx", [3, 3, 32, 32]))
    assert model.batch == 3 and settings["image_size"] == 32 and settings["embedding_size"] == 3
    faces = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(model(faces), faces.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    model, settings = load_onnx_backbone(graph("free.onnx", ["n", 3, "h", "w"]))
    assert model.batch is None and settings["image_size"] == 112
    assert f"note: {tmp_path / 'free.onnx'}: the graph's input size is not fixed; faces are fed at 112px" in \
        capsys.readouterr().err
    assert load_onnx_backbone(graph("side.onnx", ["n", 3, "h", 96]))[1]["image_size"] == 96


def test_a_graph_exported_again_to_its_path_has_its_new_weights_alone_in_its_data_file(tmp_path, monkeypatch):
    # onnx.save appends external data to a file of that name that is there already: export_onnx called again on a
    # path of a graph past 2 GB kept the earlier export's weights at the head of path + ".data", which grew by them
    # each time. Written here one file a weight, as torch writes them past 2 GB, for a small graph.
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    export_of_torch = torch.onnx.export

    def one_file_a_weight(model, args, path, **kwargs):
        export_of_torch(model, args, path, **kwargs)
        onnx.save_model(onnx.load(path), path, save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0)

    monkeypatch.setattr(torch.onnx, "export", one_file_a_weight)
    torch.manual_seed(0)
    path = str(tmp_path / "backbone.onnx")
    sizes = []
    for _ in range(2):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
        export.export_onnx(model, path, 8)
        sizes.append(os.path.getsize(path + ".data"))
    assert sizes[1] == sizes[0], f"backbone.onnx.data grew from {sizes[0]} to {sizes[1]} bytes"
    assert sorted(os.listdir(tmp_path)) == ["backbone.onnx", "backbone.onnx.data"]
    x = torch.randn(2, 3, 8, 8)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_graph_of_fixed_batch_is_fed_whole_runs_by_the_tools_that_embed(tmp_path):
    # A batch of 8 faces fed to a graph fixed at 6 ran 6 + 2 padded on each batch, not on the last alone (embed's
    # 64 with a graph of 48: a third of the runs padding); the tools now take batches that fill whole runs (6
    # faces, or 3 with their mirrors), the same embeddings in the fewest runs.
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from train.embed import embed_images
    from train.onnx_backbone import load_onnx_backbone
    from train.verification import VerificationSet, compute_embeddings

    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3 * 8 * 8, 64), np.float32), "w")

    def graph(name, batch):
        nodes = [helper.make_node("Flatten", ["data"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["fc1"])]
        made = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                            [batch, 3, 8, 8])],
                                 [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, None)], [weights])
        onnx.save(helper.make_model(made, opset_imports=[helper.make_opsetid("", 13)], ir_version=8),
                  str(tmp_path / name))
        return load_onnx_backbone(str(tmp_path / name))[0]

    fixed, free = graph("fixed.onnx", 6), graph("free.onnx", "n")
    runs = []
    run = fixed._run
    fixed._run = lambda array: runs.append(array.shape[0]) or run(array)
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    faces = [(image, "") for image in images]
    for flip, fewest in ((False, 4), (True, 8)):
        runs.clear()
        got = embed_images(fixed, faces, device="cpu", batch_size=8, workers=0, flip=flip)
        np.testing.assert_allclose(got, embed_images(free, faces, device="cpu", batch_size=8, workers=0, flip=flip),
                                   rtol=1e-6, atol=1e-5)
        assert runs == [6] * fewest
    runs.clear()
    vset = VerificationSet("toy", images, np.arange(12) % 2 == 0)
    np.testing.assert_allclose(compute_embeddings(fixed, vset, device="cpu", batch_size=8),
                               compute_embeddings(free, vset, device="cpu", batch_size=8), rtol=1e-6, atol=1e-6)
    assert runs == [6] * 8


@pytest.mark.parametrize("content", [[1, 2], {"optimizer": {}, "step": 3}], ids=["a list", "a dict of no weights"])
def test_a_torch_file_that_holds_no_backbone_is_named(tmp_path, capsys, content):
    # A .pt of something else (an optimizer's state, a list) given as --checkpoint or --model: one line naming
    # it, exit 2, nothing written.
    path = tmp_path / "other.pt"
    torch.save(content, path)
    face = tmp_path / "face.png"
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE)).save(face)
    assert export.main(["--checkpoint", str(path), "--output", str(tmp_path / "export")]) == 2
    assert capsys.readouterr().err == f"export: error: {path}: not a backbone state dict or a training checkpoint\n"
    assert embed.main(["--model", str(path), "--compare", str(face), str(face)]) == 2
    assert capsys.readouterr().err == f"embed: error: {path}: not a backbone state dict or a training checkpoint\n"
    assert not (tmp_path / "export").exists()


def test_a_checkpoint_whose_final_verification_was_cut_short_is_said_so_by_the_tools_of_its_threshold(
        trained, tmp_path, capsys):
    # A stop (or a failure) at the end of a run writes the last step's checkpoint marked verification_cut_short:
    # the threshold it records is an earlier step's (or of some sets). export, embed --compare and the tools that
    # take the model's threshold (cluster, search, roc: model_threshold) took it without a word. Now one note, the
    # same results; an export's backbone.json carries the mark, so its backbone.pt says it too.
    ckpt, faces = trained
    state = checkpoint.load(ckpt)
    record = {"step": 1, "target": "pairs", "accuracy": 0.5, "accuracy_std": 0.1, "threshold": 1.4, "xnorm": 5.0}
    state["verification"] = {"pairs": record}
    checkpoint.save_atomic(state, str(tmp_path / "whole.pt"))
    state["verification_cut_short"] = True
    cut = str(tmp_path / "cut.pt")
    checkpoint.save_atomic(state, cut)
    note = (f"note: {cut} is of a run whose final verification (step {state['step']}) was cut short (python -m train "
            "--resume auto on its checkpoint makes it): its threshold is step 1's")
    image = os.path.join(faces, "id_000", "00.png")
    said = {}
    for name in ("whole.pt", "cut.pt"):
        capsys.readouterr()
        assert embed.main(["--model", str(tmp_path / name), "--compare", image, image]) == 0
        said[name] = capsys.readouterr()
    assert said["cut.pt"].out == said["whole.pt"].out and "from the model's last verification" in said["cut.pt"].out
    assert said["whole.pt"].err == "" and said["cut.pt"].err == f"embed: {note}\n", said
    assert embed.main(["--model", cut, "--compare", image, image, "--threshold", "0.5"]) == 0
    assert capsys.readouterr().err == ""  # (its threshold not taken)
    settings = checkpoint.load_backbone(cut)[1]
    for tool in ("cluster", "search", "roc"):
        assert embed.model_threshold(cut, settings, None, tool=tool, decides=tool != "roc")[2] == f"{tool}: {note}"
        assert embed.model_threshold(cut, settings, 0.4, tool=tool)[2] is None
    whole = checkpoint.load_backbone(str(tmp_path / "whole.pt"))[1]
    assert embed.model_threshold(str(tmp_path / "whole.pt"), whole, None, tool="cluster")[2] is None

    # (Said once the export is written: an export refused says its error alone, as cluster and search do.)
    assert export.main(["--checkpoint", cut, "--output", str(tmp_path / "refused"), "--int8",
                        str(tmp_path / "missing")]) == 2
    assert "note:" not in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert export.main(["--checkpoint", cut, "--output", str(tmp_path / "export"), "--no-onnx"]) == 0
    # (An export keeps the threshold it was written with: the note says to export again after the resume.)
    exported_note = note.replace("makes it)", "makes it, then export again)")
    assert f"export: {exported_note}\n" in capsys.readouterr().err
    written = json.loads((tmp_path / "export" / "backbone.json").read_text())
    assert written["threshold"] == 1.4 and written["verification_cut_short"] == {"step": state["step"],
                                                                                 "threshold_steps": [1]}
    exported = str(tmp_path / "export" / "backbone.pt")
    assert embed.main(["--model", exported, "--compare", image, image]) == 0
    assert capsys.readouterr().err == f"embed: {exported_note.replace(cut, exported)}\n"
