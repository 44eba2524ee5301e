"""--pretrained_model of an ONNX model: its weights read into the network (train.onnx_weights), checked against
onnxruntime's embeddings of the same graph; graphs that do not map refused in one line."""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pytest
import torch

from train import export
from train.config import parse_args
from train.models import get_model
from train.onnx_weights import OnnxGraphMismatch, read_onnx_weights
from train.trainer import Trainer, main

import trainer_fixtures
from conftest import assert_close_report
from trainer_fixtures import IMAGE_SIZE, base_argv

one_thread = trainer_fixtures.one_thread  # (the fixture, for usefixtures below)

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

EMBEDDING_SIZE = 64  # (base_argv's)


def trained_looking(network: str, image_size: int, embedding_size: int, seed: int = 0) -> torch.nn.Module:
    """A network whose BatchNorm statistics, shifts and PReLU slopes are not their initial values (a folded
    BatchNorm at its defaults would be the identity, and would hide a misplaced one)."""
    torch.manual_seed(seed)
    model = get_model(network, image_size=image_size, embedding_size=embedding_size)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.2, 0.2)
                if module.weight.requires_grad:  # (the embedding's fixed scale stays 1)
                    module.weight.uniform_(0.5, 1.5)
            elif isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(0.0, 0.5)
    return model.eval()


def onnxruntime_embeddings(path, x: np.ndarray, input_name: str = "input") -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {input_name: x})[0])


def read_back(path, network: str, image_size: int, embedding_size: int) -> tuple[torch.nn.Module, dict]:
    fresh = get_model(network, image_size=image_size, embedding_size=embedding_size)
    state, done = read_onnx_weights(str(path), fresh, image_size)
    fresh.load_state_dict(state)
    return fresh.eval(), done


def assert_same_embeddings(model, path, image_size, *, pixels_in_graph=False):
    x = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    fed = x * 127.5 + 127.5 if pixels_in_graph else x
    expected = onnxruntime_embeddings(path, fed.numpy())
    with torch.no_grad():
        got = model(x)
    scale = float(expected.abs().max())
    assert_close_report(got, expected, atol=1e-5 * scale, rtol=1e-5, name="embeddings read back")


@pytest.mark.parametrize("prelu_node", [False, True], ids=["decomposed_prelu", "prelu_node"])
def test_train_exports_graph_reads_back(tmp_path, prelu_node):
    # train.export's graph: each BatchNorm after a convolution folded into it (PyTorch's eval-mode export),
    # PReLU as relu(x) + (-a) * relu(-x) or as the PRelu node.
    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE,
                       prelu_node=prelu_node)
    # Of the network's 19 BatchNorms, the 4 blocks' bn1, the trunk's bn2 and the embedding's are left.
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node) == 6
    model, done = read_back(path, "small", IMAGE_SIZE, EMBEDDING_SIZE)
    # The stem's BN, and each block's bn2, bn3 and shortcut BN.
    assert done == {"folded": 13, "input_scale": 1.0, "image_size": IMAGE_SIZE, "folded_batchnorms": [
        "bn1", *(f"layer{k}.0.{bn}" for k in range(1, 5) for bn in ("bn2", "bn3", "downsample.1"))]}
    assert_same_embeddings(model, path, IMAGE_SIZE)


def test_an_embedding_batchnorm_written_on_an_unsqueezed_input_reads_back(tmp_path):
    # Some exporters write BatchNorm1d of (N, D) as Unsqueeze, BatchNormalization, Squeeze: still the fully
    # connected layer's own BatchNorm, not one folded away.
    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE)
    model = onnx.load(str(path))
    graph = model.graph
    norm = next(n for n in graph.node if n.op_type == "BatchNormalization" and n.input[0].startswith("/fc/"))
    position = list(graph.node).index(norm)
    embedding, output = norm.input[0], norm.output[0]
    norm.input[0], norm.output[0] = "unsqueezed", "normed"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([2], np.int64), "axis_2"))
    graph.node.insert(position, onnx.helper.make_node("Unsqueeze", [embedding, "axis_2"], ["unsqueezed"]))
    graph.node.insert(position + 2, onnx.helper.make_node("Squeeze", ["normed", "axis_2"], [output]))
    onnx.checker.check_model(model)
    edited = tmp_path / "unsqueezed.onnx"
    onnx.save(model, str(edited))
    read, done = read_back(edited, "small", IMAGE_SIZE, EMBEDDING_SIZE)
    assert done["folded"] == 13
    assert_same_embeddings(read, edited, IMAGE_SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("network, embedding_size, folded", [
    ("r18", 512, 21),  # the stem's, 8 blocks' bn2 and bn3, 4 shortcuts'
    ("mbf", 128, 49),  # all 49 BatchNorm2d (each after its convolution); the embedding's BatchNorm1d is kept
])
def test_an_r18_and_mobilefacenet_at_112px_read_back(tmp_path, network, embedding_size, folded):
    path = tmp_path / f"{network}.onnx"
    export.export_onnx(trained_looking(network, 112, embedding_size), str(path), 112)
    model, done = read_back(path, network, 112, embedding_size)
    assert done["folded"] == folded
    assert_same_embeddings(model, path, 112)


@pytest.mark.parametrize("stored", ["external_data", "fp16_initializers"])
def test_a_graph_with_external_data_or_fp16_weights_reads_back(tmp_path, stored):
    # Weights in a file beside the graph (as onnx saves models over 2 GB), or stored in fp16 and cast to fp32
    # in the graph (as fp16 conversions keeping fp32 inputs write them).
    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE)
    model = onnx.load(str(path))
    edited = tmp_path / "edited" / "backbone.onnx"
    edited.parent.mkdir()
    if stored == "external_data":
        onnx.save_model(model, str(edited), save_as_external_data=True, location="backbone.data", size_threshold=0)
        assert (edited.parent / "backbone.data").is_file()
    else:
        graph, casts = model.graph, []
        for tensor in graph.initializer:
            value = onnx.numpy_helper.to_array(tensor)
            if value.dtype == np.float32 and value.size > 1:
                name = tensor.name
                tensor.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float16), f"{name}_fp16"))
                casts.append(onnx.helper.make_node("Cast", [f"{name}_fp16"], [name], to=onnx.TensorProto.FLOAT))
        nodes = casts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.checker.check_model(model)
        onnx.save(model, str(edited))
    read, done = read_back(edited, "small", IMAGE_SIZE, EMBEDDING_SIZE)
    assert done["folded"] == 13
    assert_same_embeddings(read, edited, IMAGE_SIZE)


def mxnet_like(path_in, path_out, *, mean=127.5, scale=0.0078125, eps=2e-5):
    """The graph at ``path_in`` (BatchNorms not folded) as insightface's models converted from MXNet are: fed
    pixels 0-255, scaled in the graph ((x - mean) * scale) with the first convolution's weights divided by what
    that scale adds and a bias added to them, BatchNorm epsilon 2e-5, and each residual Add taking the shortcut
    first."""
    model = onnx.load(str(path_in))
    graph = model.graph
    graph.input[0].name = "pixels"
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    weights = {t.name: t for t in graph.initializer}
    conv_weight = weights[first_conv.input[1]]
    value = onnx.numpy_helper.to_array(conv_weight) / (127.5 * scale)
    conv_weight.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), conv_weight.name))
    # A bias on it (MXNet's convolutions may have one) before its BatchNorm: the network's convolution has none.
    bias = np.random.default_rng(0).uniform(-0.5, 0.5, value.shape[0]).astype(np.float32)
    graph.initializer.append(onnx.numpy_helper.from_array(bias, "conv0_bias"))
    first_conv.input.append("conv0_bias")
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == "input":
                node.input[i] = "scaled"
        if node.op_type == "BatchNormalization":
            for attribute in node.attribute:
                if attribute.name == "epsilon":
                    attribute.f = eps
        producers = {out for n in graph.node for out in n.output}
        if node.op_type == "Add" and all(name in producers for name in node.input):
            node.input[0], node.input[1] = node.input[1], node.input[0]
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(mean, np.float32), "minus_scalar"),
                              onnx.numpy_helper.from_array(np.array(scale, np.float32), "mul_scalar")])
    scaling = [onnx.helper.make_node("Sub", ["pixels", "minus_scalar"], ["centred"], name="_minusscalar0"),
               onnx.helper.make_node("Mul", ["centred", "mul_scalar"], ["scaled"], name="_mulscalar0")]
    nodes = scaling + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path_out))


def test_a_graph_with_its_batchnorms_its_input_scaling_and_shortcuts_first_reads_back(tmp_path):
    # The MXNet-converted layout: BatchNorms kept (epsilon 2e-5, the network's 1e-5), (x - 127.5) * 0.0078125
    # in the graph, a convolution's bias before a BatchNorm, and the residual Adds' inputs the other way round
    # from the network's.
    kept = tmp_path / "kept.onnx"
    network = trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE)
    with warnings.catch_warnings():  # (the TorchScript exporter's deprecation, as train.export has it)
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), str(kept), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    path = tmp_path / "mxnet_like.onnx"
    mxnet_like(kept, path)
    model, done = read_back(path, "small", IMAGE_SIZE, EMBEDDING_SIZE)
    assert done["folded"] == 0 and done["input_scale"] == pytest.approx(127.5 * 0.0078125)
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    expected = onnxruntime_embeddings(path, (x * 127.5 + 127.5).numpy(), "pixels")
    with torch.no_grad():
        got = model(x)
    assert_close_report(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5, name="embeddings")
    # A scaling not centred on 127.5 (a mean of 127) is a shift, which the padding makes inexact: refused.
    off_centre = tmp_path / "off_centre.onnx"
    mxnet_like(kept, off_centre, mean=127.0)
    with pytest.raises(OnnxGraphMismatch, match=r"^its input scaling, a x \+ b .* is not centred on 127\.5"):
        read_back(off_centre, "small", IMAGE_SIZE, EMBEDDING_SIZE)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_pretrained_model_takes_an_onnx_model(tmp_path, capsys, monkeypatch):
    from train import onnx_weights

    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE)
    # The calibration's forward pass takes minutes on a CPU (r50): the note that says what it does comes first.
    said_before = []
    calibrate = onnx_weights.calibrate_batchnorms
    monkeypatch.setattr(onnx_weights, "calibrate_batchnorms",
                        lambda *a: said_before.append(capsys.readouterr().err) or calibrate(*a))
    trainer = Trainer(parse_args(base_argv("synthetic", str(tmp_path / "run"), pretrained_model=str(path))))
    assert len(said_before) == 1 and "calibrated on 256 images of --data" in said_before[0], said_before
    err = said_before[0] + capsys.readouterr().err
    assert f"initialised the backbone from {path} (an ONNX model)" in err
    assert f"note: {path}: 13 BatchNorms were folded into the layers before them" in err
    assert_same_embeddings(trainer.backbone.eval(), path, IMAGE_SIZE)


@pytest.mark.usefixtures("one_thread")
def test_an_onnx_model_of_another_network_is_refused_in_one_line(tmp_path):
    path = tmp_path / "w600k_r50.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, 32), str(path), IMAGE_SIZE)
    with pytest.raises(SystemExit) as error:
        main(base_argv("synthetic", str(tmp_path / "run"), pretrained_model=str(path)))
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        f"train: error: --pretrained_model {path} does not fit --network small --embedding-size 64 --image-size "
        f"{IMAGE_SIZE}: its weighted layer 24 (/fc/Gemm) is a fully connected layer 128->32, the network's 128->64 "
        "(its graph has 13 convolutions, 6 BatchNorms, 5 PReLUs and 1 fully connected layer (a 32-D output))")


def test_a_graph_with_an_op_it_does_not_read_is_refused(tmp_path):
    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE)
    model = onnx.load(str(path))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.name = "Sigmoid", "/prelu/Sigmoid"
    odd = tmp_path / "sigmoid.onnx"
    onnx.save(model, str(odd))
    with pytest.raises(OnnxGraphMismatch, match=re.escape("its node /prelu/Sigmoid is a Sigmoid, an op this does not "
                                                          "read")):
        read_back(odd, "small", IMAGE_SIZE, EMBEDDING_SIZE)
    # What is not an ONNX file at all, named so.
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a protobuf at all")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(junk))}: not a readable ONNX model"):
        read_back(junk, "small", IMAGE_SIZE, EMBEDDING_SIZE)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_run_from_an_onnx_model_exports_and_round_trips(tmp_path):
    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE)
    run = tmp_path / "run"
    assert main(base_argv("synthetic", str(run), pretrained_model=str(path), max_steps=2)) == 0
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(run / "checkpoint.pt"), "--output", str(out)]) == 0
    model, done = read_back(out / "backbone.onnx", "small", IMAGE_SIZE, EMBEDDING_SIZE)
    assert done["folded"] == 13
    assert_same_embeddings(model, out / "backbone.onnx", IMAGE_SIZE)
    assert os.path.isfile(out / "backbone.pt")


def with_statistics_of(network: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """``network`` with each BatchNorm's running mean and variance those of its input over ``batches``, as a
    trained network's are of its data (trained_looking's are not: in training mode, which normalises with the
    batch's statistics, even the BatchNorms a file keeps would then give other embeddings than the file's)."""
    norms = [m for m in network.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # (a cumulative average)
    network.train()
    with torch.no_grad():
        for batch in batches:
            network(batch)
    for module in norms:
        module.momentum = 0.1
    return network.eval()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_folded_batchnorms_are_calibrated_so_that_training_starts_from_the_files_network(tmp_path, capsys):
    # Fine-tuning runs in training mode. A BatchNorm folded away in the file, read as the identity, would there
    # normalise its input with the batch's statistics (each channel to mean 0, variance 1); calibrated on
    # images of --data, it keeps the file's network in training mode as well as in eval mode.
    from train.data import build_train_dataset
    from train.data.transforms import to_model_input

    args = parse_args(base_argv("synthetic", str(tmp_path / "run"), pretrained_model=str(tmp_path / "backbone.onnx")))
    dataset, _ = build_train_dataset("synthetic", image_size=IMAGE_SIZE, seed=0, flip=True)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(5))[:576]
    batches = [to_model_input(torch.stack([dataset[int(i)][0] for i in part])) for part in order.split(64)]
    network = with_statistics_of(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), batches[:8])
    export.export_onnx(network, args.pretrained_model, IMAGE_SIZE)
    trainer = Trainer(args)
    err = capsys.readouterr().err
    assert f"note: {args.pretrained_model}: 13 BatchNorms were folded into the layers before them" in err
    assert "calibrated on 256 images of --data" in err
    # Eval mode: the file's embeddings, as before.
    assert_same_embeddings(trainer.backbone.eval(), args.pretrained_model, IMAGE_SIZE)

    def relative_error(got, expected):
        return float((got - expected).norm(dim=1).div(expected.norm(dim=1)).max())

    # Training mode, on images that neither the file's statistics nor the calibration saw, in a batch of the
    # run's size (16) and in a larger one: the file's network in training mode (the one exported, each of its
    # BatchNorms normalising with the batch's statistics). And no further from the file's embeddings (eval
    # mode, onnxruntime's) than that network is: the BatchNorms the file kept make that difference, as they do
    # in a run from any checkpoint (here large: an untrained network's embeddings have a large common part, which
    # the embedding's BatchNorm takes out by the batch's mean).
    for batch in (batches[-1][:16], batches[-1]):
        with torch.no_grad():
            got = trainer.backbone.train()(batch)
            files_in_training = network.train()(batch)
        network.eval()
        from_training = relative_error(got, files_in_training)
        assert from_training < 0.15, (f"training mode's embeddings differ from the file's network's in training "
                                      f"mode by {from_training:.3g} (relative, at most)")
        expected = onnxruntime_embeddings(args.pretrained_model, batch.numpy())
        gap, own_gap = relative_error(got, expected), relative_error(files_in_training, expected)
        assert gap < own_gap + 0.05, (f"training mode's embeddings differ from the file's by {gap:.3g} (relative, "
                                      f"at most), the file's network's in training mode by {own_gap:.3g}")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_random_data_calibrates_on_its_noise(tmp_path, capsys):
    # --data random (timing a step) has no images to index: its one batch of noise is what it trains on.
    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE)
    Trainer(parse_args(base_argv("random", str(tmp_path / "run"), pretrained_model=str(path), num_classes=8)))
    assert "13 BatchNorms were folded into the layers before them when it was exported: calibrated on 256 images " \
        "of --data" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_run_from_an_onnx_model_resumes_without_reading_it_again(tmp_path, capsys):
    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE)
    run = tmp_path / "run"
    argv = base_argv("synthetic", str(run), pretrained_model=str(path), max_steps=2, save_every=2)
    assert main(argv) == 0
    # The file gone (or replaced): the resumed run takes its checkpoint's weights, and says nothing of the file.
    path.write_bytes(b"\x08\x07not a protobuf at all")
    capsys.readouterr()
    assert main([*argv, "--resume", "auto", "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "(an ONNX model)" not in err and "calibrated" not in err, err


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="no gloo")
def test_under_two_processes_the_first_reads_the_onnx_model_and_the_others_take_its_weights_or_refusal(tmp_path):
    from trainer_fixtures import train_on_ranks

    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE)
    result = train_on_ranks(base_argv("synthetic", str(tmp_path / "run"), pretrained_model=str(path), max_steps=2,
                                      batch_size=8))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(f"initialised the backbone from {path} (an ONNX model)") == 1, result.stderr[-3000:]
    assert result.stderr.count("13 BatchNorms were folded into the layers before them") == 1
    # A file of another network: every process stops, with the first's one line.
    other = tmp_path / "w600k_r50.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, 32), str(other), IMAGE_SIZE)
    result = train_on_ranks(base_argv("synthetic", str(tmp_path / "other"), pretrained_model=str(other),
                                      batch_size=8))
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"--pretrained_model {other} does not fit --network small" in result.stderr, result.stderr[-3000:]


def _train_with_rank_0_slow_to_calibrate(argv):
    """train.trainer.main(argv) on a rank; rank 0 takes 60 s longer (or until terminated) to calibrate the
    folded BatchNorms, while the others wait for its weights."""
    from test_ddp import _sleep_until_terminated
    from train import onnx_weights, trainer

    if os.environ["RANK"] == "0":
        calibrate = onnx_weights.calibrate_batchnorms

        def late(*args):
            _sleep_until_terminated(60)  # (ten times the test's --dist-timeout; then it finds the other ended)
            return calibrate(*args)

        onnx_weights.calibrate_batchnorms = late
    return trainer.main(argv)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="no gloo")
def test_a_rank_waiting_past_dist_timeout_for_the_calibration_says_what_rank_0_does(tmp_path):
    # On a CPU the calibration takes minutes (r50), rank 0's alone: a process that waits longer than
    # --dist-timeout names it, not the verification sets (which it named before).
    from trainer_fixtures import train_on_ranks

    path = tmp_path / "backbone.onnx"
    export.export_onnx(trained_looking("small", IMAGE_SIZE, EMBEDDING_SIZE), str(path), IMAGE_SIZE)
    result = train_on_ranks(base_argv("synthetic", str(tmp_path / "run"), pretrained_model=str(path), batch_size=8,
                                      dist_timeout=0.1), main=_train_with_rank_0_slow_to_calibrate)
    assert result.returncode == 1
    assert (f"train: error: rank 1: waited more than --dist-timeout 0.1 minutes for the other processes during "
            f"start-up (rank 0 reads --pretrained_model {path}, traces the network and calibrates the BatchNorms the "
            "file folded away while the others wait: on a CPU that takes minutes, which needs a longer "
            "--dist-timeout)\n") in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
