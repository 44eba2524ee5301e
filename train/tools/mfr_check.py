"""``python -m train.tools.mfr_check MODEL.onnx [--track cfat]``: whether an ONNX face-recognition model meets
the rules of insightface's MFR challenge (MFR-Ongoing) for a submission, one line a rule with what was
measured, before it is zipped and sent: exit status 0 when every rule passes, 1 when one fails. It reads any
ONNX file, ``train.export``'s or another's; docs/evaluation.md says where each limit comes from.

The rules are those of insightface's challenges/mfr/README.md and of its submission checker, onnx_helper.py
(``ArcFaceORT.check``): a file of at most 1024 MiB without float16 (or any narrower) weights, one float32
input of [*, 3, 112, 112] that a batch of 32 runs through, one 2-D output of at most the track's length, a
graph of at least 8 nodes; and, for the server's onnxruntime-gpu 1.8, IR version 7 and opset 14 at most,
standard ONNX operators only. The inference time the checker limits is the server GPU's: it is measured
here and said, not judged; the MFR rules set no limit on FLOPs, which are counted and said."""

from __future__ import annotations

import os
import sys
import time

from train.signals import run_tool, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "mfr_check: "):
    import numpy as np

    from train.tools import ORT_DISTRIBUTIONS, ArgumentParser, first_line, not_importable, path_arg, say

# The checker's tracks (recognition/arcface_torch/onnx_helper.py at insightface commit 882125e): (largest embedding,
# inference time limit in ms on the server's GPU). Its file size limit is 1024 MiB on every track.
TRACKS = {"cfat": (512, 15), "ms1m": (512, 10), "glint": (1024, 20), "unconstrained": (1024, 30)}
MAX_FILE_MIB = 1024
IMAGE_SIZE = 112  # the README's ['*', 3, 112, 112]
MIN_NODES = 8  # the checker's "too small onnx graph"
CHECK_BATCH = 32  # the checker's batch run (check_batch), whose output must be finite
# The server runs onnxruntime-gpu 1.8 (the README), which implements ONNX 1.9: opset 14, IR version 7
# (onnxruntime's compatibility table; torch's exporter writes IR 8 from opset 15).
SERVER_ONNXRUNTIME, MAX_OPSET, MAX_IR_VERSION = "1.8", 14, 7
STANDARD_DOMAINS = ("", "ai.onnx")
# ONNX's own traditional-ML operators (Normalizer, ...), standard too: onnxruntime 1.8 implements their opset 2
ONNX_ML_DOMAIN, MAX_ML_OPSET = "ai.onnx.ml", 2
TIMED_RUNS, TIMED_RANK = 50, 5  # the checker's timing: the 6th fastest of 50 runs of one image
# How far the graph's multiply-adds may be from train.models.multiply_adds' for one of train.export's graphs:
# the two count the same convolutions and products; the graph's may hold a few more (a product that PyTorch
# computes as an addition of broadcasts, say).
MULTIPLY_ADDS_TOLERANCE = 0.01


def server_feeds_raw_pixels(graph) -> bool:
    """What the checker takes the input's scale for: pixels 0-255 where a node named Sub... or _minus... and
    one named Mul..., _mul... or Div... are among the graph's first 8 (an MXNet model's own normalisation),
    else (x - 127.5) / 127.5. It goes by the nodes' names alone."""
    names = [node.name for node in graph.node[:8]]
    return (any(name.startswith(("Sub", "_minus")) for name in names)
            and any(name.startswith(("Mul", "_mul", "Div")) for name in names))


def graph_multiply_adds(model) -> tuple[int, int]:
    """(multiply-adds of one image through the ONNX ``model``'s convolutions and matrix products, as
    train.models.multiply_adds counts them, the number of such nodes whose shapes could not be told, left out of
    the count). The shapes are onnx's shape inference's, with the batch dimension set to 1; those it cannot tell
    (products of sizes the graph computes, as a ViT's attention) are measured in one run of blank images. A graph
    of a fixed batch is counted at it and divided."""
    import onnx

    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    batch = 1
    initializers = {tensor.name for tensor in model_copy.graph.initializer}
    for value in model_copy.graph.input:
        if value.name not in initializers and value.type.tensor_type.shape.dim:
            first = value.type.tensor_type.shape.dim[0]
            if first.HasField("dim_value") and first.dim_value > 0:
                batch = first.dim_value
            else:
                first.dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model_copy, data_prop=True).graph
    shapes = {tensor.name: list(tensor.dims) for tensor in inferred.initializer}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    # Each counted operator: the input of its weight (a convolution), or of its left-hand factor (a product).
    weighted = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
    products = {"Gemm": 0, "MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0}
    needed = {name for node in inferred.node if node.op_type in weighted or node.op_type in products
              for name in (node.output[0], node.input[weighted.get(node.op_type, products.get(node.op_type))])}
    if needed - shapes.keys():  # (a ViT's attention, reshaped by sizes the graph computes: run once to see them)
        shapes.update(_run_for_shapes(model_copy, needed - shapes.keys()))
    total = unknown = 0
    for node in inferred.node:
        if node.op_type not in weighted and node.op_type not in products:
            continue
        out = shapes.get(node.output[0])
        if node.op_type in weighted:
            weight = shapes.get(node.input[weighted[node.op_type]])
            if out is None or weight is None:
                unknown += 1
                continue
            total += int(np.prod(out, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
        else:
            left = shapes.get(node.input[products[node.op_type]])
            if out is None or left is None:
                unknown += 1
                continue
            transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
            inner = left[0] if transposed else left[-1]
            total += int(np.prod(out, dtype=np.int64)) * inner
    return total // batch, unknown


def _run_for_shapes(model, names: set[str]) -> dict[str, list[int]]:
    """The shapes of the values ``names`` of ``model`` (its batch dimension 1), made graph outputs and computed by
    onnxruntime on blank inputs; {} where it cannot run (weights in external data, not read here)."""
    import onnx
    import onnxruntime

    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    known = {value.name for value in probed.graph.output}
    probed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in sorted(names - known))
    initializers = {tensor.name for tensor in probed.graph.initializer}
    feeds = {}
    for value in probed.graph.input:
        if value.name not in initializers:
            tensor = value.type.tensor_type
            feeds[value.name] = np.zeros([d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim],
                                         onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    try:
        session = onnxruntime.InferenceSession(probed.SerializeToString(), providers=["CPUExecutionProvider"])
        wanted = sorted(names)
        return {name: list(value.shape) for name, value in zip(wanted, session.run(wanted, feeds))}
    except Exception:  # (onnxruntime's errors share no base; the nodes are then said to be of unknown shape)
        return {}


def exported_multiply_adds(path: str) -> tuple[int, str] | None:
    """(train.models.multiply_adds of the network whose export ``path`` is, for one image, what it is), where
    ``path`` is one of train.export's graphs with its backbone.json beside it; None otherwise (or where that
    network cannot be built here to count it)."""
    import json

    from train import export
    from train.models import multiply_adds

    name, folder = os.path.basename(path), os.path.dirname(os.path.abspath(path))
    if name not in export.GRAPH_NAMES:
        return None
    try:
        with open(os.path.join(folder, export.SETTINGS_NAME), encoding="utf-8") as f:
            settings = json.load(f)
        count = multiply_adds(settings["network"], settings["image_size"], embedding_size=settings["embedding_size"])
    except (OSError, ValueError, KeyError, TypeError, ImportError):  # not an export's folder, or its network isn't here
        return None
    # (the normalized graphs run the image and its mirror)
    twice = name in (export.NORMALIZED_ONNX_NAME, export.NORMALIZED_INT8_ONNX_NAME, export.NORMALIZED_FP16_ONNX_NAME)
    return count * (2 if twice else 1), f"train.models.multiply_adds of {settings['network']}" + (
        ", twice (image and mirror)" if twice else "")


# ONNX element types narrower than 4 bytes whose numpy type may not show it: onnx 1.16 (pyproject's lower bound)
# gives float32 for bfloat16 and the float8 types; the 4-bit ones are named with them
NARROW_BY_NAME = ("BFLOAT16", "FLOAT8", "FLOAT4", "INT4", "UINT4")


def narrow_type(data_type: int) -> str | None:
    """The name of an ONNX tensor's ``data_type`` ("float16", "bfloat16", "int8", ...) where it is narrower than 4
    bytes, which the checker refuses as a weight; None where it is 4 bytes or more, or has no width (UNDEFINED)."""
    import onnx

    try:
        name = onnx.TensorProto.DataType.Name(data_type)
        width = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return name.lower() if width < 4 or name.startswith(NARROW_BY_NAME) else None


def batch_said(size: int | None) -> str:
    """How the input's first dimension reads where it is not a name: onnxruntime gives None for one of no size."""
    return "of no size or name" if size is None else f"fixed at {size}"


def giga(count: float) -> str:
    return f"{count / 1e9:.3g} G"


class Report:
    """The rules' lines, said as they are found: ``PASS``, ``FAIL`` or ``INFO`` (measured, not judged)."""

    def __init__(self):
        self.failed: list[str] = []

    def rule(self, rule: str, passed: bool | None, text: str) -> None:
        if passed is False:
            self.failed.append(rule)
        say(f"{'INFO' if passed is None else 'PASS' if passed else 'FAIL'} {rule}: {text}")


def check(path: str, track: str) -> int:
    """Says each rule of ``track`` for the ONNX file at ``path``; 0 when all pass, 1 when one fails. ValueError
    (one line) where it is not an ONNX file, or onnx and onnxruntime are not installed."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: name the .onnx file to submit")
    if not os.path.isfile(path):
        from train.checkpoint import dangling

        raise ValueError(f"no file at {path}{dangling(path)}")
    try:
        import onnx
    except ImportError:
        raise ValueError("reading an ONNX file needs the onnx package: pip install onnx onnxruntime") from None
    try:
        import onnxruntime
    except ImportError as error:
        raise ValueError(f"the checks run the model on onnxruntime: "
                         f"{not_importable('onnxruntime', error, ORT_DISTRIBUTIONS)}") from None
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as error:  # (protobuf's DecodeError, and others of a file that is not one)
        reason = first_line(error)
        raise ValueError(f"{path} is not an ONNX model (onnx cannot read it: {reason})") from None
    if not model.graph.node and not model.graph.output:  # (protobuf reads many files as an empty message)
        raise ValueError(f"{path} is not an ONNX model (it holds no graph)")
    limit_length, limit_ms = TRACKS[track]
    report = Report()

    # The file: the submission is `zip xxx.zip model.onnx`, one file, whose size the checker limits.
    external = sorted({entry.value for tensor in model.graph.initializer if tensor.data_location == 1
                       for entry in tensor.external_data if entry.key == "location"})
    mib = os.path.getsize(path) / 2 ** 20
    if external:
        report.rule("file", False, f"{mib:.1f} MiB, its weights in {', '.join(external)} beside it, which a "
                    f"submission of the .onnx alone leaves out (limit {MAX_FILE_MIB} MiB, one file)")
    else:
        report.rule("file", mib <= MAX_FILE_MIB, f"{mib:.1f} MiB (limit {MAX_FILE_MIB} MiB)")

    opset = next((entry.version for entry in model.opset_import if entry.domain in STANDARD_DOMAINS), None)
    ml_opset = next((entry.version for entry in model.opset_import if entry.domain == ONNX_ML_DOMAIN), None)
    report.rule("onnx", model.ir_version <= MAX_IR_VERSION and opset is not None and opset <= MAX_OPSET
                and (ml_opset is None or ml_opset <= MAX_ML_OPSET),
                f"IR version {model.ir_version}, opset {opset}" + (f", {ONNX_ML_DOMAIN} opset {ml_opset}" if ml_opset
                                                                   is not None else "")
                + f" (the server's onnxruntime-gpu {SERVER_ONNXRUNTIME} reads IR version {MAX_IR_VERSION} and opset "
                f"{MAX_OPSET} at most" + (f", {ONNX_ML_DOMAIN} opset {MAX_ML_OPSET}" if ml_opset is not None else "")
                + f"; train.export --opset {MAX_OPSET} writes both)")

    foreign = sorted({f"{node.domain}.{node.op_type}" for node in model.graph.node
                      if node.domain not in (*STANDARD_DOMAINS, ONNX_ML_DOMAIN)})
    count = len(model.graph.node)
    report.rule("ops", not foreign and count >= MIN_NODES,
                f"{count} nodes, " + (f"ops outside standard ONNX: {', '.join(foreign[:5])}" if foreign
                                      else "standard ONNX ops only")
                + f" (at least {MIN_NODES}; no custom ops)")

    narrow = [(tensor.name, name) for tensor in model.graph.initializer
              for name in [narrow_type(tensor.data_type)] if name is not None]
    report.rule("weights", not narrow, (f"{len(narrow)} of {len(model.graph.initializer)} narrower than 4 bytes, the "
                                        f"first {narrow[0][0]} ({narrow[0][1]})" if narrow else
                                        f"all {len(model.graph.initializer)} of 4 bytes or more")
                + " (no float16 or other narrow weights: they make the size misleading)")

    # What onnxruntime takes: the checker's inputs and outputs, and its runs.
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # (its errors come back as exceptions, said here in one line)
    try:
        session = onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # (onnxruntime's errors share no base but Exception)
        reason = first_line(error)
        report.rule("load", False, f"onnxruntime {onnxruntime.__version__} cannot load it: {reason}")
        return finish(path, track, report)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if not inputs or not outputs:
        missing = "input" if not inputs else "output"
        report.rule(missing, False, f"the graph has no {missing}")
        return finish(path, track, report)
    shape = list(inputs[0].shape)
    said_shape = "[" + ", ".join(str(d) for d in shape) + "]"
    right = (len(inputs) == 1 and inputs[0].type == "tensor(float)" and len(shape) == 4 and shape[1] == 3
             and shape[2:] == [IMAGE_SIZE, IMAGE_SIZE])
    report.rule("input", right, f"{len(inputs)} input{'s' if len(inputs) != 1 else ''}, {inputs[0].name} "
                f"{inputs[0].type[7:-1]} {said_shape} (one float input of [*, 3, {IMAGE_SIZE}, {IMAGE_SIZE}], RGB)")
    raw = server_feeds_raw_pixels(model.graph)
    from train.onnx_backbone import feeds_raw_pixels

    needs_raw = feeds_raw_pixels(path, inputs[0].name)
    report.rule("scaling", raw == needs_raw,
                f"the server feeds {'pixels 0-255' if raw else '(x - 127.5) / 127.5'} (by the names of the first 8 "
                "nodes), the graph takes " + ("pixels 0-255 (it subtracts and multiplies first)" if needs_raw else
                                              "(x - 127.5) / 127.5"))
    if not right:
        report.rule("output", len(outputs) == 1, f"{len(outputs)} output{'s' if len(outputs) != 1 else ''}; not run "
                    "(the input is not the one the server feeds)")
        return finish(path, track, report)

    # The checker's batch: a graph of a fixed batch has its batch dimension made free first, as it does.
    feed = session
    if not isinstance(shape[0], str):
        try:
            loaded = onnx.load(path)
            first = next(value for value in loaded.graph.input if value.name == inputs[0].name)
            first.type.tensor_type.shape.dim[0].dim_param = "None"
            feed = onnxruntime.InferenceSession(loaded.SerializeToString(), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as error:
            reason = first_line(error)
            report.rule("batch", False, f"with its batch dimension made free, as the server's checker makes it, "
                        f"onnxruntime cannot load it: {reason}")
            feed = None
    images = np.random.default_rng(0).integers(0, 256, (CHECK_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    images = images if raw else (images - 127.5) / 127.5
    if feed is not None:
        try:
            embeddings = feed.run(None, {inputs[0].name: images})[0]
        except Exception as error:
            reason = first_line(error)
            report.rule("batch", False, f"a batch of {CHECK_BATCH} fails: {reason}"
                        + ("" if isinstance(shape[0], str) else f" (its batch, {batch_said(shape[0])}, made free)"))
        else:
            finite = bool(np.isfinite(embeddings).all())
            report.rule("batch", finite and embeddings.shape[:1] == (CHECK_BATCH,),
                        f"{CHECK_BATCH} images give {embeddings.shape} embeddings, "
                        + ("all finite" if finite else "some NaN or infinite")
                        + ("" if isinstance(shape[0], str) else f" (its batch, {batch_said(shape[0])}, made free as "
                           "the server's checker makes it)"))

    if feed is None:
        report.rule("output", False, "not run (the model does not load with a free batch)")
        return finish(path, track, report)
    one = images[:1]
    times = []
    try:
        for _ in range(TIMED_RUNS):
            start = time.perf_counter()
            embedding = feed.run(None, {inputs[0].name: one})[0]
            times.append(time.perf_counter() - start)
    except Exception as error:  # (a graph whose fixed batch is written into its nodes: the checker's run fails too)
        reason = first_line(error)
        report.rule("output", False, f"one image fails: {reason}" + (
            "" if isinstance(shape[0], str) else f" (its batch, {batch_said(shape[0])}, made free as the server's "
            "checker makes it)"))
        return finish(path, track, report)
    report.rule("output", len(outputs) == 1 and embedding.ndim == 2 and embedding.shape[1] <= limit_length,
                f"{len(outputs)} output{'s' if len(outputs) != 1 else ''}, {outputs[0].name} of shape "
                f"{embedding.shape} for one image (one 2-D output of at most {limit_length} for track {track})")
    fast = sorted(times)[TIMED_RANK] * 1000
    report.rule("time", None, f"{fast:.2f} ms for one image on this machine's CPU, onnxruntime "
                f"{onnxruntime.__version__} (6th fastest of {TIMED_RUNS}); track {track}'s limit, {limit_ms} ms, is "
                "on the server's GPU, not judged here")

    counted, unknown = graph_multiply_adds(model)
    text = f"{giga(counted)} multiply-adds an image, counted from the graph's convolutions and products" + (
        f" ({unknown} of unknown shape left out)" if unknown else "")
    ours = exported_multiply_adds(path)
    if ours is not None:
        apart = abs(counted - ours[0]) / max(ours[0], 1)
        text += f", and {giga(ours[0])} by {ours[1]}, {apart:.1%} apart"
    report.rule("flops", None, text + "; the MFR rules set no limit on them")
    return finish(path, track, report)


def finish(path: str, track: str, report: Report) -> int:
    if report.failed:
        say(f"mfr_check: {path} fails {', '.join(report.failed)} (track {track})")
        return 1
    say(f"mfr_check: {path} passes every rule of track {track} (time judged on the server)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.tools.mfr_check", name="mfr_check", description=__doc__)
    p.add_argument("model", type=path_arg, metavar="MODEL.onnx", help="the ONNX file to submit")
    p.add_argument("--track", choices=sorted(TRACKS), default="cfat",
                   help="the checker's track, which sets the longest embedding and the time limit: cfat (512, 15 ms; "
                   "its default), ms1m (512, 10 ms), glint (1024, 20 ms), unconstrained (1024, 30 ms)")
    args = p.parse_args(argv)
    return run_tool(lambda: check(args.model, args.track), tool="mfr_check", blank_line=False)


if __name__ == "__main__":
    sys.exit(main())
