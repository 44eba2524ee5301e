"""`python -m train.export --int8`: the graph quantized to int8 by onnxruntime, calibrated on aligned faces,
checked against the fp32 graph before it is written, and run by the tools that take ONNX models."""

import os
import signal
import sys

import numpy as np
import pytest
import torch

from train import checkpoint, distill, embed, export, quantize, tools, trainer, verify

from trainer_fixtures import base_argv, make_face_folder, make_pairs_list, one_thread, train_one_thread  # noqa: F401

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(checkpoint after two steps on a folder of 16 faces, that folder, the pairs list the run verified on)."""
    root = tmp_path_factory.mktemp("int8")
    data = make_face_folder(str(root / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(root / "pairs"), pairs=20)
    argv = base_argv(data, str(root / "run"), pairs=pairs, batch_size=8, max_steps=2)
    assert train_one_thread(argv) == 0
    return str(root / "run" / "checkpoint.pt"), data, pairs


def code_of(argv):
    try:
        return export.main(argv)
    except SystemExit as exit_info:  # argparse's own checks
        return exit_info.code


def cosines(a, b):
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
def test_the_int8_graph_agrees_with_the_fp32_one_and_runs_where_onnx_models_do(run, tmp_path, capsys):
    ckpt, faces, pairs = run
    out = tmp_path / "export"
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--int8", "synthetic", "--int8-faces", "24",
                        "--int8-targets", "synthetic", "--normalized-onnx"]) == 0
    printed = capsys.readouterr()
    int8, normalized = out / "backbone_int8.onnx", out / "backbone_normalized_int8.onnx"
    assert f"wrote {int8}: backbone.onnx in int8, calibrated on 24 faces of synthetic; against backbone.onnx, their " \
           "embeddings' cosine 0." in printed.out and "over 24 faces not used for calibration" in printed.out
    assert "  synthetic: accuracy " in printed.out and f"wrote {normalized}: backbone_normalized.onnx in int8" in \
        printed.out
    assert sorted(os.listdir(out)) == ["backbone.json", "backbone.onnx", "backbone.pt", "backbone_int8.onnx",
                                       "backbone_normalized.onnx", "backbone_normalized_int8.onnx"]  # no work files
    # Quantized: int8 weights per output channel of every convolution, behind DequantizeLinear; a quarter of the size.
    graph = onnx.load(str(int8)).graph
    weights = {t.name: t for t in graph.initializer}
    convolutions = [n for n in graph.node if n.op_type == "Conv"]
    producers = {output: n for n in graph.node for output in n.output}
    for conv in convolutions:
        dequantize = producers[conv.input[1]]
        assert dequantize.op_type == "DequantizeLinear", conv.name
        assert weights[dequantize.input[0]].data_type == onnx.TensorProto.INT8
        assert len(weights[dequantize.input[1]].dims) == 1 and weights[dequantize.input[1]].dims[0] > 1  # per channel
    assert os.path.getsize(int8) < 0.4 * os.path.getsize(out / "backbone.onnx")

    # train.embed and train.verify take it, its threshold from backbone.json as for backbone.onnx.
    fp32_table, int8_table = tmp_path / "fp32.npy", tmp_path / "int8.npy"
    for model, table in ((out / "backbone.onnx", fp32_table), (int8, int8_table)):
        assert embed.main(["--model", str(model), "--images", faces, "--output", str(table), "--workers", "0"]) == 0
    assert cosines(np.load(fp32_table), np.load(int8_table)).min() > 0.95
    threshold = checkpoint.load_backbone(ckpt)[1]["threshold"]  # (the run verified at its end)
    assert embed.load_model(str(int8), "cpu")[1]["threshold"] == threshold
    capsys.readouterr()
    assert verify.main(["--model", str(int8), "--targets", pairs]) == 0
    assert "pairs: accuracy " in capsys.readouterr().out
    # The normalized int8 graph: its mirror and normalisation left in float, its outputs of unit length.
    settings = embed.load_model(str(normalized), "cpu")[1]
    assert settings["unit_length"] and settings["threshold"] == threshold
    kinds = {n.op_type for n in onnx.load(str(normalized)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "ReduceL2", "Div"} <= kinds
    # A teacher (run by onnxruntime, as backbone.onnx is).
    teacher = distill.load_teacher(str(int8), None, embedding_size=64, image_size=32, amp="none",
                                   device=torch.device("cpu"))
    assert teacher.settings["embedding_size"] == 64


def quantize_linear_ranges(path):
    """{a quantized value: (its scale, its zero point)} of the int8 graph at ``path``."""
    graph = onnx.load(str(path)).graph
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    return {n.input[0]: (float(weights[n.input[1]]), int(weights[n.input[2]]))
            for n in graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.slow
def test_a_fixed_batch_int8_graph_is_calibrated_and_checked_in_batches_of_its_size(run, tmp_path, monkeypatch,
                                                                                   capsys):
    # --batch-size 3 with --int8 was refused: the calibration fed slices of 32, which a graph of 3 refuses.
    import onnxruntime.quantization

    ckpt, faces, pairs = run
    fed, options = [], []  # (the calibration batches of each quantization, and its options)
    quantize_static = onnxruntime.quantization.quantize_static

    def recorded(model_input, model_output, reader, **kwargs):
        get_next, batches = reader.get_next, []

        def recorded_next():
            batch = get_next()
            if batch is not None:
                batches.append(batch["input"])
            return batch
        fed.append(batches)
        options.append(kwargs)
        reader.get_next = recorded_next
        return quantize_static(model_input, model_output, reader, **kwargs)

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", recorded)
    out = tmp_path / "fixed"
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--batch-size", "3", "--int8", faces,
                        "--int8-faces", "8", "--int8-targets", pairs, "--normalized-onnx"]) == 0
    printed = capsys.readouterr().out
    int8, normalized = out / "backbone_int8.onnx", out / "backbone_normalized_int8.onnx"
    # The check ran on the 8 other faces (in slices of 3, the repeats' embeddings dropped) and the pairs.
    assert f"wrote {int8} (batch 3, fixed): backbone.onnx in int8, calibrated on 8 faces of {faces}; against " \
           "backbone.onnx, their embeddings' cosine 0." in printed
    assert "over 8 faces not used for calibration" in printed
    assert "  pairs: accuracy " in printed and f"wrote {normalized} (batch 3, fixed): backbone_normalized.onnx in " \
        "int8" in printed
    # Calibrated in batches of 3: the 8 faces, then the first again to fill the last batch.
    calibration = quantize.read_faces(faces, 8, image_size=32, run={}).calibration
    assert len(fed) == 2
    # The repeats leave the ranges as they were only because they are each value's smallest and largest (MinMax,
    # not its moving average). A histogram calibration (entropy, percentile) counts a repeated face twice, yet on
    # these 8 faces it too gave the free batch's ranges (measured), so the comparison at the end cannot tell.
    for kwargs in options:
        assert kwargs["calibrate_method"] == onnxruntime.quantization.CalibrationMethod.MinMax, kwargs
        assert not (kwargs.get("extra_options") or {}).get("CalibMovingAverage"), kwargs
    for batches in fed:
        assert [len(batch) for batch in batches] == [3, 3, 3]
        np.testing.assert_array_equal(np.concatenate(batches), np.concatenate([calibration, calibration[:1]]))
    # The int8 graphs keep the fixed batch, and agree with the fp32 ones within the export's tolerance.
    x = calibration[:3]
    for fp32_name, path in (("backbone.onnx", int8), ("backbone_normalized.onnx", normalized)):
        session, fp32 = (ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
                         for graph in (path, out / fp32_name))
        assert session.get_inputs()[0].shape == [3, 3, 32, 32] and session.get_outputs()[0].shape == [3, 64], path
        with pytest.raises(Exception, match="dimension"):  # (another batch size is refused by the graph)
            session.run(None, {"input": np.concatenate([x, x[:1]])})
        assert cosines(session.run(None, {"input": x})[0], fp32.run(None, {"input": x})[0]).min() > 0.95
    # 7 faces: two batches of 3 and one of 1 filled up to 3, the check's cosines over the 7.
    agreement = quantize.agreement(str(out / "backbone.onnx"), str(int8), calibration[:7])
    assert agreement.faces == 7 and agreement.mean > quantize.MIN_MEAN_COSINE
    # Repeated faces leave MinMax calibration as it was: the ranges of a free batch, calibrated on the same faces.
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "free"), "--int8", faces, "--int8-faces",
                        "8", "--int8-targets", "none", "--normalized-onnx"]) == 0
    for name in ("backbone_int8.onnx", "backbone_normalized_int8.onnx"):
        assert quantize_linear_ranges(out / name) == quantize_linear_ranges(tmp_path / "free" / name), name


def test_calibration_and_check_slices_fill_a_fixed_batch_with_faces_seen_already():
    images = np.arange(8, dtype=np.float32).reshape(8, 1)
    got = list(quantize.slices(images, 3))
    assert [count for _, count in got] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate([piece for piece, _ in got]).ravel(), [0, 1, 2, 3, 4, 5, 6, 7, 0])
    # Fewer images than the batch: round and round.
    (piece, count), = quantize.slices(images[:3], 8)
    assert count == 3 and piece.ravel().tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    # A free batch: slices of CALIBRATION_BATCH, the last one short.
    many = np.zeros((quantize.CALIBRATION_BATCH + 5, 1), np.float32)
    assert [(len(piece), count) for piece, count in quantize.slices(many, None)] == [
        (quantize.CALIBRATION_BATCH, quantize.CALIBRATION_BATCH), (5, 5)]


def test_prelu_stays_float_so_the_int8_graph_gives_what_it_gave_with_prelu_nodes(run, tmp_path):
    # backbone.onnx writes PReLU as relu(x) + (-a) * relu(-x); quantized, those nodes stay float as the PRelu
    # node did (quantized, their Mul and Add lowered the agreement), so the two int8 graphs agree bit for bit.
    ckpt, _, _ = run
    for flags, folder in (([], "relus"), (["--onnx-prelu"], "node")):
        assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / folder), "--int8", "synthetic",
                            "--int8-faces", "8", "--int8-targets", "none", *flags]) == 0
    prelus = sum(isinstance(module, torch.nn.PReLU) for module in checkpoint.load_backbone(ckpt)[0].modules())
    assert len(quantize.decomposed_prelu_nodes(onnx.load(str(tmp_path / "relus" / "backbone.onnx")).graph)) == \
        5 * prelus > 0
    kinds = {node.op_type for node in onnx.load(str(tmp_path / "relus" / "backbone_int8.onnx")).graph.node}
    assert "PRelu" not in kinds and {"Neg", "Mul", "QuantizeLinear"} <= kinds
    x = torch.randn(4, 3, 32, 32).numpy()
    got, expected = (ort.InferenceSession(str(tmp_path / folder / "backbone_int8.onnx"),
                                          providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                     for folder in ("relus", "node"))
    assert np.array_equal(got, expected), f"max abs difference {np.abs(got - expected).max():.3g}"


@pytest.mark.slow
def test_int8_calibrates_on_the_runs_own_faces_and_verifies_on_its_sets(run, tmp_path, capsys):
    ckpt, faces, pairs = run
    # The run's --data: its 16 faces, 8 to calibrate and 8 to check; the run's pairs list verified.
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "a"), "--int8", "--int8-faces", "8"]) == 0
    printed = capsys.readouterr()
    assert f"calibrated on 8 faces of {faces}; against backbone.onnx" in printed.out
    assert "over 8 faces not used for calibration" in printed.out and "  pairs: accuracy " in printed.out
    assert "note" not in printed.err
    # Fewer faces than the count: all of them calibrate, said so; --int8-targets none verifies nothing.
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "b"), "--int8", "--int8-targets",
                        "none"]) == 0
    printed = capsys.readouterr()
    assert f"note: --int8 {faces} holds 16 faces: all of them calibrate, and the int8 graph is checked on them" in \
        printed.err and "over 16 faces (the calibration faces: none left)" in printed.out
    assert "accuracy" not in printed.out
    # 12 of 16: the 4 others check, said so.
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "c"), "--int8", faces, "--int8-faces",
                        "12", "--int8-targets", "none"]) == 0
    assert f"note: --int8 {faces} holds 16 faces: 12 calibrate, and the int8 graph is checked on the 4 others" in \
        capsys.readouterr().err
    # One face: said as one (it was "1 faces").
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "e"), "--int8", faces, "--int8-faces",
                        "1", "--int8-targets", "none"]) == 0
    printed = capsys.readouterr()
    assert f"calibrated on 1 face of {faces};" in printed.out and "over 1 face not used" in printed.out
    # An export's backbone.pt records no run: the faces must be named.
    assert export.main(["--checkpoint", str(tmp_path / "a" / "backbone.pt"), "--output", str(tmp_path / "d"),
                        "--int8"]) == 2
    assert capsys.readouterr().err == f"export: error: --int8: {tmp_path / 'a' / 'backbone.pt'} records no " \
        "training data to calibrate on (not a training checkpoint): name the faces, --int8 FACES\n"
    # A run whose data is not here (trained on another machine): said so; its verification sets left out.
    state = checkpoint.load(ckpt)
    state["args"] = {**state["args"], "data": str(tmp_path / "elsewhere"), "val_targets": ["lfw", "/x/pairs.txt"]}
    torch.save(state, tmp_path / "moved.pt")
    assert export.main(["--checkpoint", str(tmp_path / "moved.pt"), "--output", str(tmp_path / "d"), "--int8"]) == 2
    assert capsys.readouterr().err.startswith("export: error: --int8 (the run's --data) "
                                              f"'{tmp_path / 'elsewhere'}': no such folder;")
    assert export.main(["--checkpoint", str(tmp_path / "moved.pt"), "--output", str(tmp_path / "d"), "--int8",
                        faces, "--int8-faces", "8"]) == 0
    printed = capsys.readouterr()
    assert "note: the run's verification set /x/pairs.txt is not here: not measured" in printed.err
    assert f"note: verification target 'lfw': no lfw.bin in '{tmp_path / 'elsewhere'}'; skipped" in printed.err
    assert "accuracy" not in printed.out


def test_the_normalized_graph_is_quantized_at_the_last_opsets_too(run, tmp_path, capsys):
    # At --opset 18 to 20 (ReduceL2's axes an input) onnxruntime's symbolic shape inference gave up on
    # backbone_normalized.onnx: "onnxruntime cannot quantize the graph to int8: object of type 'NoneType' has no len()".
    ckpt, _, _ = run
    out = tmp_path / "export"
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--opset", "18", "--normalized-onnx", "--int8",
                        "synthetic", "--int8-faces", "8", "--int8-targets", "none"]) == 0
    assert f"wrote {out / 'backbone_normalized_int8.onnx'}: backbone_normalized.onnx in int8" in capsys.readouterr().out
    session = ort.InferenceSession(str(out / "backbone_normalized_int8.onnx"), providers=["CPUExecutionProvider"])
    embeddings = session.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0]
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)


def test_faces_of_another_size_than_the_models_are_said_to_be_resized(run, tmp_path, capsys):
    # Calibration faces of another size (photos, not aligned faces, say) were resized without a word, where
    # the trainer says it of its --data.
    ckpt, faces, _ = run
    photos = make_face_folder(str(tmp_path / "photos"), identities=2, images=4, size=48)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "a"), "--int8", photos,
                        "--int8-targets", "none"]) == 0
    assert (f"note: --int8 {photos} holds 48x48 (width x height) images (its first image); they are resized to "
            "32x32 (the model's input)\n") in capsys.readouterr().err
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "b"), "--int8", faces,
                        "--int8-targets", "none"]) == 0
    assert "resized" not in capsys.readouterr().err


def test_the_runs_relative_data_is_read_from_the_folder_it_ran_in(run, tmp_path, monkeypatch, capsys):
    # A run of `--data faces` exported from another folder: --int8 looked for ./faces here ("no such folder").
    ckpt, faces, pairs = run
    state = checkpoint.load(ckpt)
    assert state["working_directory"] == os.getcwd()  # the trainer records where it ran
    root = os.path.dirname(faces)
    state["args"] = {**state["args"], "data": os.path.basename(faces),
                     "val_targets": [os.path.relpath(pairs, root)]}
    state["working_directory"] = root
    torch.save(state, tmp_path / "relative.pt")
    monkeypatch.chdir(tmp_path)
    assert export.main(["--checkpoint", "relative.pt", "--output", "out", "--int8", "--int8-faces", "8"]) == 0
    printed = capsys.readouterr()
    assert f"calibrated on 8 faces of {faces}; against backbone.onnx" in printed.out
    assert "  pairs: accuracy " in printed.out and "note" not in printed.err
    # A checkpoint that records no folder (before it did) reads them here, as typed.
    del state["working_directory"]
    torch.save(state, tmp_path / "older.pt")
    assert export.main(["--checkpoint", "older.pt", "--output", "out2", "--int8"]) == 2
    assert capsys.readouterr().err.startswith("export: error: --int8 (the run's --data) "
                                              f"'{os.path.basename(faces)}': no such folder under {tmp_path};")
    # A run whose folder moved (or that trained on another machine): the error says where it ran, not only here.
    state["working_directory"] = str(tmp_path / "moved")
    torch.save(state, tmp_path / "moved.pt")
    assert export.main(["--checkpoint", "moved.pt", "--output", "out3", "--int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"export: error: --int8 (the run's --data) '{os.path.basename(faces)}': no such folder "
                          f"under {tmp_path};")
    assert err.endswith(f"; the run was started in {tmp_path / 'moved'}, which is not there any more: name the faces, "
                        "--int8 FACES\n") and not os.path.exists("out3")


def earlier_export(folder):
    """Every file of an earlier export, each holding its own name."""
    os.makedirs(folder, exist_ok=True)
    for name in (export.STATE_NAME, export.SETTINGS_NAME, *export.GRAPH_NAMES):
        (folder / name).write_text(name)


def assert_earlier_export_untouched(folder):
    assert sorted(os.listdir(folder)) == sorted([export.STATE_NAME, export.SETTINGS_NAME, *export.GRAPH_NAMES])
    for name in os.listdir(folder):
        assert (folder / name).read_text() == name


def test_an_int8_graph_that_does_not_agree_is_refused_and_nothing_written(run, tmp_path, monkeypatch, capsys):
    # Calibrated on faces scaled otherwise than the graph takes them (pixels / 255, say): ranges 20 times too
    # narrow, which saturate on real faces.
    ckpt, faces, _ = run
    earlier_export(tmp_path)
    read_faces = quantize.read_faces

    def misscaled(*args, **kwargs):
        got = read_faces(*args, **kwargs)
        got.calibration = got.calibration * 0.05
        return got

    monkeypatch.setattr(quantize, "read_faces", misscaled)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--int8", "--int8-faces", "8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("export: error: backbone_int8.onnx: the int8 graph does not agree with the fp32 one: their "
                          "embeddings' cosine ") and err.endswith(
        "over 8 faces, under 0.9; nothing written (without --int8 the export writes the fp32 graph alone)\n")
    assert err.count("\n") == 1
    assert_earlier_export_untouched(tmp_path)


def test_graphs_an_export_does_not_write_are_removed(run, tmp_path, capsys):
    ckpt, _, _ = run
    earlier_export(tmp_path)
    # --int8 without --normalized-onnx: the earlier normalized graphs, fp32 and int8, go.
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--int8", "--int8-faces", "8"]) == 0
    err = capsys.readouterr().err
    for name in ("backbone_normalized.onnx", "backbone_normalized_int8.onnx"):
        assert f"removed {tmp_path / name}: it was from an earlier export" in err
    assert sorted(os.listdir(tmp_path)) == ["backbone.json", "backbone.onnx", "backbone.pt", "backbone_int8.onnx"]
    # Without --int8: the int8 graph of the export before goes, which would pass for the new backbone's.
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path)]) == 0
    assert f"removed {tmp_path / 'backbone_int8.onnx'}: it was from an earlier export" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["backbone.json", "backbone.onnx", "backbone.pt"]


def test_a_stop_while_calibrating_writes_nothing(run, tmp_path, monkeypatch, capsys):
    # SIGTERM while onnxruntime runs the calibration faces: it unwinds through onnxruntime's quantization.
    import tempfile

    import onnxruntime.quantization

    ckpt, _, _ = run
    earlier_export(tmp_path)
    quantize_static = onnxruntime.quantization.quantize_static

    def stopped_while_calibrating(model_input, model_output, reader, **kwargs):
        get_next = reader.get_next

        def stop_at_the_second_batch():
            calls.append(None)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return get_next()
        calls = []
        reader.get_next = stop_at_the_second_batch
        return quantize_static(model_input, model_output, reader, **kwargs)

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", stopped_while_calibrating)
    monkeypatch.setattr(quantize, "CALIBRATION_BATCH", 4)
    onnxruntime_folders = set(os.listdir(tempfile.gettempdir()))
    try:
        assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--int8", "--int8-faces", "8"]) == 143
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert capsys.readouterr().err == "export: stopped by SIGTERM: nothing written\n"
    assert_earlier_export_untouched(tmp_path)  # (no private folder left)
    assert not {name for name in set(os.listdir(tempfile.gettempdir())) - onnxruntime_folders
                if name.startswith("ort.quant.")}  # onnxruntime's own working folder gone too


def test_a_full_disk_while_quantizing_is_said_as_such(run, tmp_path, monkeypatch, capsys):
    # It was "onnxruntime cannot quantize the graph to int8: [Errno 28] ...", as if the graph were at fault.
    import errno

    import onnxruntime.quantization

    def full_disk(model_input, model_output, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), model_output)

    ckpt, _, _ = run
    earlier_export(tmp_path)
    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", full_disk)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--int8", "--int8-faces", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: error: [Errno 28] No space left on device") and "cannot quantize" not in err, err
    assert_earlier_export_untouched(tmp_path)


def test_a_fresh_run_sets_an_earlier_exports_int8_graphs_aside(tmp_path):
    earlier_export(tmp_path)
    (tmp_path / "checkpoint.pt").write_text("a run's")
    aside = trainer.set_aside_earlier_run(str(tmp_path))
    assert os.listdir(tmp_path) == ["earlier-1"] and aside == str(tmp_path / "earlier-1")
    assert {"backbone_int8.onnx", "backbone_normalized_int8.onnx"} <= set(os.listdir(aside))


def test_the_settings_of_every_graph_are_backbone_json(tmp_path):
    for name in export.GRAPH_NAMES:
        assert checkpoint.settings_path(str(tmp_path / name)) == str(tmp_path / "backbone.json")


@pytest.mark.parametrize("argv, message", [
    (["--int8", "--no-onnx"], "--int8 quantizes backbone.onnx, which --no-onnx does not write"),
    (["--int8-faces", "8"], "--int8-faces goes with --int8"),
    (["--int8-targets", "lfw"], "--int8-targets goes with --int8"),
    (["--int8", "--int8-faces", "0"], "--int8-faces must be at least 1, got 0"),
    (["--int8", "--opset", "12"], "--int8 needs --opset 13 or later (its weights' scales per channel are "
                                  "QuantizeLinear's axis, from opset 13), got 12"),
])
def test_int8_option_mistakes_are_argparse_errors(run, tmp_path, capsys, argv, message):
    ckpt, _, _ = run
    assert code_of(["--checkpoint", ckpt, "--output", str(tmp_path / "out"), *argv]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)
    assert not (tmp_path / "out").exists()


def test_int8_mistakes_are_one_line_errors_before_anything_is_written(run, tmp_path, monkeypatch, capsys):
    ckpt, _, _ = run
    out = tmp_path / "out"
    missing = tmp_path / "absent"
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--int8", str(missing)]) == 2
    assert capsys.readouterr().err == f"export: error: --int8 {str(missing)!r}: no such folder; expected " \
        "'synthetic', a folder with train.rec + train.idx, an image folder, or a list file (.lst, .txt)\n"
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--int8", "synthetic", "--int8-targets",
                        str(tmp_path / "pairs.txt")]) == 2
    assert capsys.readouterr().err == "export: error: --int8-targets: no verification set at " \
        f"{tmp_path / 'pairs.txt'}\n"
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # `import onnxruntime.quantization` fails
    monkeypatch.setattr(tools, "installed_version", lambda *names: None)  # not installed
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--int8", "synthetic"]) == 2
    assert capsys.readouterr().err == "export: error: --int8 needs the onnx and onnxruntime packages (the [onnx] " \
        "extra): pip install onnx onnxruntime\n"
    # Installed, and not importing (onnxruntime 1.18 and older beside numpy 2): "pip install onnxruntime" said to
    # install what is installed.
    monkeypatch.setattr(tools, "installed_version", lambda *names: ("onnxruntime", "1.18.1"))
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--int8", "synthetic"]) == 2
    assert capsys.readouterr().err == ("export: error: --int8 needs onnxruntime: onnxruntime 1.18.1 is installed "
                                       f"but does not import under numpy {np.__version__} (ModuleNotFoundError: "
                                       "import of onnxruntime.quantization halted; None in sys.modules): pip install "
                                       "-U onnxruntime\n")
    assert not out.exists()


def test_the_runs_own_sets_are_found_in_each_of_its_data_folders(tmp_path, capsys):
    # A run of --data a,b found a path like sub/pairs.txt in b's folder; --int8 took it for a set not here.
    first = make_face_folder(str(tmp_path / "a"), identities=2, images=2)
    second = make_face_folder(str(tmp_path / "b"), identities=2, images=2)
    make_pairs_list(os.path.join(second, "sub"), pairs=20)
    sets = quantize.verification_sets([os.path.join("sub", "pairs.txt")], f"{first},{second}", 32, seed=0,
                                      skip_missing=True)
    assert list(sets) == ["pairs"] and "not here" not in capsys.readouterr().err
