"""``python -m train.export``: the backbone alone, for inference: a state dict (``backbone.pt``
plus its settings in ``backbone.json``) and an ONNX graph (``backbone.onnx``, compared with
PyTorch through onnxruntime when that is installed, before anything is written); with
``--normalized-onnx`` also ``backbone_normalized.onnx``, whose output is the embedding verification
compares (image plus mirror, L2-normalised), so that ``backbone.json``'s threshold applies to it as it is;
with ``--int8`` also ``backbone_int8.onnx`` (and ``backbone_normalized_int8.onnx``), quantized for CPUs
and edge devices (``train.quantize``); with ``--fp16`` also ``backbone_fp16.onnx`` (and
``backbone_normalized_fp16.onnx``), float16 weights and compute for GPUs and TensorRT, its input and output
float32. ``--batch-size N`` fixes the graphs' batch dimension at N (else it is free). Each PReLU is
written as relu(x) + (-a) * relu(-x), the same values, which onnxruntime runs faster than its PRelu node
(``--onnx-prelu`` keeps the node)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import warnings

from .signals import run_tool, signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "export: "):
    import numpy as np
    import torch

    from . import checkpoint, quantize
    from .config import _str_list
    from .tools import (ORT_DISTRIBUTIONS, ArgumentParser, count_of, first_line, folders_missing, not_importable,
                        path_arg, remove_folders_made)

try:  # the opsets that torch's TorchScript-based exporter writes (7 to 20 in torch 2.13)
    from torch.onnx._constants import ONNX_MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    OPSETS = range(ONNX_MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET + 1)
except ImportError:  # a private module: without it the exporter's own error tells
    OPSETS = None


# The files an export writes into its folder (the trainer sets them aside with a run's own).
STATE_NAME, SETTINGS_NAME, ONNX_NAME = "backbone.pt", "backbone.json", "backbone.onnx"
NORMALIZED_ONNX_NAME = "backbone_normalized.onnx"
INT8_ONNX_NAME, NORMALIZED_INT8_ONNX_NAME = "backbone_int8.onnx", "backbone_normalized_int8.onnx"
FP16_ONNX_NAME, NORMALIZED_FP16_ONNX_NAME = "backbone_fp16.onnx", "backbone_normalized_fp16.onnx"
# Every graph an export may write: one that an export does not write is removed from its folder (an
# earlier export's would pass for the new backbone's).
GRAPH_NAMES = (ONNX_NAME, NORMALIZED_ONNX_NAME, INT8_ONNX_NAME, NORMALIZED_INT8_ONNX_NAME, FP16_ONNX_NAME,
               NORMALIZED_FP16_ONNX_NAME)
# The weights of a graph past protobuf's 2 GB (vit_h's, r2060's), in one file beside it (export_onnx and
# float16_onnx write them so): removed and set aside with the graphs.
DATA_NAMES = tuple(name + ".data" for name in (ONNX_NAME, NORMALIZED_ONNX_NAME, FP16_ONNX_NAME,
                                               NORMALIZED_FP16_ONNX_NAME))
# How far onnxruntime's embeddings may be from PyTorch's, as a fraction of the largest value (at least 1):
# fp32 graphs differ by rounding alone; float16 keeps about 3 significant digits. On the CPU, which computes
# most float16 nodes in float32 (onnxruntime casts their inputs), r18, mbf, vit_t and small at 112 px were
# 0.06 to 0.08 % off, their weights' rounding; a GPU computing in float16 adds its own, hence the margin.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2}
FLOAT16_MAX = 65504.0  # float16's largest finite value: past it a value is inf
FLIP_OPSET = 10  # the first opset in which torch's exporter writes torch.flip (a Slice with a negative step)


class FlipNormalized(torch.nn.Module):
    """A backbone's verification embedding: embedding(x) + embedding(mirrored x), L2-normalised (as
    ``train.verification`` and ``train.embed`` make it). Its own mirror image gives the same output, so
    a tool that flips and normalises again (``train.embed``) gets the same embeddings from it."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.backbone(torch.cat([x, torch.flip(x, dims=[3])]))
        count = x.shape[0]
        summed = both[:count] + both[count:]
        # F.normalize's division written out, the same values: its expand_as left the graph's output
        # (batch, Divembedding_dim_1), a name where a deployment reads the embedding's length.
        return summed / summed.norm(dim=1, keepdim=True).clamp_min(1e-12)


class DecomposedPReLU(torch.nn.Module):
    """``prelu`` (an ``nn.PReLU``, whose slopes it shares) as relu(x) + (-a) * relu(-x), which the ONNX
    exporter writes as Relu, Neg, Mul and Add nodes in place of one PRelu node. The values are PReLU's bit
    for bit (an output is x + 0, or 0 + a * x with (-a) * -x = a * x exactly in IEEE arithmetic; only a
    zero's sign can differ), and onnxruntime runs them faster than its PRelu kernel, which took most of
    MobileFaceNet's time on a CPU (benchmarks/bench_prelu.py). An Add rather than a Sub: insightface takes a
    graph with nodes named Sub... and Mul... among its first eight for one fed pixels 0-255, and a tool that
    renames nodes after their types would name them so here."""

    def __init__(self, prelu: torch.nn.PReLU):
        super().__init__()
        self.weight = prelu.weight
        self.per_channel = prelu.weight.numel() > 1  # (else one slope, which broadcasts as it is)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.PReLU's slopes go along dimension 1, the channels.
        slope = self.weight.reshape(-1, *[1] * (x.dim() - 2)) if self.per_channel else self.weight
        return torch.relu(x) + (-slope) * torch.relu(-x)


@contextlib.contextmanager
def decomposed_prelu(model: torch.nn.Module):
    """``model`` with each of its ``nn.PReLU`` modules replaced by a DecomposedPReLU while the block runs,
    and put back after it (also on an error or a stop). Subclasses of nn.PReLU, which may compute otherwise,
    and ``F.prelu`` called in a forward are left as they are."""
    replaced = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                if type(child) is torch.nn.PReLU]
    try:
        for parent, name, prelu in replaced:
            setattr(parent, name, DecomposedPReLU(prelu))
        yield model
    finally:
        for parent, name, prelu in replaced:
            setattr(parent, name, prelu)


class OnnxNotInstalled(ImportError):
    """The optional ``onnx`` package is missing: the ONNX step is skipped, not failed."""


def export_onnx(model: torch.nn.Module, path: str, image_size: int, opset: int = 17, *,
                prelu_node: bool = False, batch: int | None = None) -> None:
    """``model`` (eval mode, fp32) traced to an ONNX graph with a dynamic batch dimension, or one fixed at
    ``batch``, written to ``path`` (a file, not memory: past protobuf's 2 GB, ViT-H's size, its weights go to
    ``path`` + ".data" beside it, as in float16_onnx). Its PReLUs are written as DecomposedPReLU writes them, or
    with ``prelu_node`` as ONNX's PRelu node.

    Raises OnnxNotInstalled without the ``onnx`` package (the exporter builds the graph with it),
    ValueError when the exporter fails."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise OnnxNotInstalled("ONNX export needs the onnx package: pip install onnx (and onnxruntime to check "
                               "the result)") from None
    model = model.eval()
    dummy = torch.zeros(batch or 1, 3, image_size, image_size)
    dynamic = batch is None
    kwargs = dict(input_names=["input"], output_names=["embedding"], opset_version=opset)
    with warnings.catch_warnings(), contextlib.nullcontext() if prelu_node else decomposed_prelu(model):
        # The TorchScript-based exporter is deprecated but needs no onnxscript; it is what this uses.
        warnings.simplefilter("ignore", DeprecationWarning)
        # (into a folder of its own: past 2 GB torch's TorchScript exporter writes each weight to a file named
        # after it, hundreds of them, whose names the next graph's may take; they become one file below)
        folder = tempfile.mkdtemp(prefix=".onnx-export-", dir=os.path.dirname(path) or ".")
        exported = os.path.join(folder, os.path.basename(path))
        try:
            try:
                try:
                    torch.onnx.export(model, (dummy,), exported, dynamo=False, dynamic_axes={
                        "input": {0: "batch"}, "embedding": {0: "batch"}} if dynamic else None, **kwargs)
                except TypeError:  # a torch without the legacy exporter: the torch.export-based one
                    torch.onnx.export(model, (dummy,), exported, dynamic_shapes=(
                        {0: torch.export.Dim("batch")},) if dynamic else None, **kwargs)
            except Exception as error:  # the exporter fails in many ways (unsupported ops, tracing, size)
                reason = first_line(error)
                raise ValueError(f"the ONNX exporter failed (opset {opset}): {reason}") from error
            _with_one_data_file(exported, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _with_one_data_file(exported: str, path: str) -> None:
    """The graph at ``exported`` moved to ``path``; one whose weights are in external data files (past 2 GB)
    written there with them in ``path`` + ".data", the name the export removes and the trainer sets aside."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph = onnx.load(exported, load_external_data=False).graph
    tensors = [*graph.initializer, *(attribute.t for node in graph.node for attribute in node.attribute
                                     if attribute.HasField("t"))]
    if not any(uses_external_data(tensor) for tensor in tensors):
        os.replace(exported, path)
        return
    # (saved in a folder of its own, then moved: onnx.save appends the weights to a file of that name already
    # there, an earlier export's, which kept it at the head of the new one's)
    folder = os.path.join(os.path.dirname(exported), "one-data-file")
    os.mkdir(folder)
    joined = os.path.join(folder, os.path.basename(path))
    onnx.save(onnx.load(exported), joined, save_as_external_data=True, location=os.path.basename(path) + ".data")
    if os.path.exists(joined + ".data"):  # (not where every weight is under onnx.save's 1 KB threshold)
        os.replace(joined + ".data", path + ".data")
    os.replace(joined, path)


class NotCheckable(Exception):
    """onnxruntime's CPU provider cannot run a float16 graph (a node it has no float16 kernel for): the
    graph is written unchecked, and this says why in one line."""


def float16_onnx(fp32_path: str, fp16_path: str, *, float16_io: bool = False, only_under: str | None = None) -> None:
    """The fp32 graph at ``fp32_path`` with float16 weights and compute, written to ``fp16_path``
    (onnxruntime's converter). Its input and output stay float32, casts inside, unless ``float16_io``;
    with ``only_under`` the nodes whose names do not start with it stay float32, and the values between them
    too (backbone_normalized.onnx's mirror and normalisation: an embedding's sum of squares overflows float16
    past a length of 256).
    Raises ValueError when the converter fails."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # (the converter is given the path: it then infers the shapes from the file, which works past protobuf's 2 GB;
    # given the graph in memory, it serialised it, which failed for a graph of 2.0 GiB, as vit_h's and r2060's are)
    names = [node.name for node in onnx.load(fp32_path, load_external_data=False).graph.node]
    kept = [name for name in names if only_under and not name.startswith(only_under)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (its notes on values clamped to float16's range)
            converted = convert_float_to_float16(fp32_path, keep_io_types=not float16_io, node_block_list=kept)
    except Exception as error:  # (its failures have no common base)
        reason = first_line(error)
        raise ValueError(f"onnxruntime's float16 converter failed: {reason}") from error
    _drop_float16_round_trips(converted.graph)
    _sort_nodes(converted.graph)
    # (protobuf's limit, less room for the rest; the weights counted one by one, as a message past it has no size)
    large = sum(tensor.ByteSize() for tensor in converted.graph.initializer) >= 2 ** 31 - 2 ** 20
    onnx.save(converted, fp16_path, save_as_external_data=large,
              location=os.path.basename(fp16_path) + ".data" if large else None)


def _drop_float16_round_trips(graph) -> None:
    """``graph`` without the converter's float32 -> float16 -> float32 round trips: a Cast to float16 of a
    float32 value read by a Cast back to float32. The converter puts one after each node it keeps float32,
    so that between two such nodes (backbone_normalized_fp16.onnx's sum, length, clip and division) each
    value was rounded to float16 (the outputs' length 1 to ~2e-4, not float32's ~1e-7, and a length past
    65504 inf); the reads of the second Cast now read the float32 value, and a Cast to float16 that nothing
    reads any more goes. The casts left are those between float16 and float32 nodes (and the float16 input
    and output of ``float16_io``). Types from the graph's inputs, weights and value_info, which the converter
    fills in (both onnxruntime 1.19's and 1.32's); a value of unknown type is left as it is."""
    import onnx

    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16

    def cast_to(node, element_type: int) -> bool:
        return node.op_type == "Cast" and any(
            attribute.name == "to" and attribute.i == element_type for attribute in node.attribute)

    float32 = {value.name for value in [*graph.input, *graph.value_info, *graph.output]
               if value.type.tensor_type.elem_type == FLOAT}
    float32 |= {tensor.name for tensor in graph.initializer if tensor.data_type == FLOAT}
    maker = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    outputs = {value.name for value in graph.output}
    returns = {}  # a float32 value -> the indices of the Casts back to float32 of its Cast to float16
    for index, node in enumerate(graph.node):
        first = graph.node[maker[node.input[0]]] if cast_to(node, FLOAT) and node.input[0] in maker else None
        if first is not None and cast_to(first, FLOAT16) and first.input[0] in float32:
            returns.setdefault(first.input[0], []).append(index)
    renamed, dropped = {}, set()  # (a value's name -> its name now; the nodes that go)
    backs_of_all = {index for backs in returns.values() for index in backs}
    for source, backs in returns.items():
        # (where a Cast back makes a graph output, the float32 value takes its name: a value its maker names,
        # not a graph input, a weight or a Cast back that goes too, and for one such output at most)
        named = [graph.node[index].output[0] for index in backs if graph.node[index].output[0] in outputs]
        if named and (len(named) > 1 or source not in maker or maker[source] in backs_of_all or source in outputs):
            backs = [index for index in backs if graph.node[index].output[0] not in outputs]
            named = []
        if named:
            renamed[source] = named[0]
        renamed.update((graph.node[index].output[0], source) for index in backs
                       if graph.node[index].output[0] not in outputs)
        dropped.update(backs)

    def now(name: str) -> str:  # (a value renamed twice: a round trip of a round trip's value)
        while renamed.get(name, name) != name:
            name = renamed[name]
        return name

    firsts = {maker[graph.node[index].input[0]] for index in dropped}
    read = {now(name) for index, node in enumerate(graph.node) if index not in dropped for name in node.input}
    read |= outputs
    dropped |= {index for index in firsts if not any(name in read for name in graph.node[index].output)}
    if not dropped:
        return

    def copy(message):  # (a message removed from its repeated field is not to be read after)
        duplicate = type(message)()
        duplicate.CopyFrom(message)
        return duplicate

    nodes = [copy(node) for index, node in enumerate(graph.node) if index not in dropped]
    for node in nodes:
        for values in (node.input, node.output):
            names = [now(name) for name in values]
            del values[:]
            values.extend(names)
    made = {name for node in nodes for name in node.output} - outputs
    kept = [copy(value) for value in graph.value_info if value.name in made]
    del graph.node[:], graph.value_info[:]
    graph.node.extend(nodes)
    graph.value_info.extend(kept)


def _sort_nodes(graph) -> None:
    """``graph``'s nodes in an order where each comes after the nodes it reads from, as ONNX requires
    (onnxruntime 1.19's converter appends the input's casts at the end, which onnx's checker and TensorRT's
    parser refuse): each node where it was, unless a node it reads from comes later, which then moves
    before it."""
    maker = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    placed, order = set(), []
    for first in range(len(graph.node)):
        stack = [first]  # (a path of nodes each read by the one below it: one waiting node is pushed at a time)
        while stack:  # (not recursion: a chain of moved nodes may be as long as the graph)
            index = stack[-1]
            if index in placed:
                stack.pop()
                continue
            waiting = [maker[name] for name in graph.node[index].input
                       if name in maker and maker[name] not in placed and maker[name] not in stack]
            if waiting:
                stack.append(waiting[0])
            else:
                placed.add(index)
                order.append(index)
                stack.pop()
    if order != list(range(len(graph.node))):
        nodes = [type(node)() for node in graph.node]
        for copy, node in zip(nodes, graph.node):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(nodes[index] for index in order)


def check_batch(image_size: int, batch: int = 3) -> torch.Tensor:
    """The random batch the graphs are checked on (the same each time)."""
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def largest_value(path: str, image_size: int, batch: int = 3, only_under: str | None = None) -> tuple[float, str]:
    """(the largest magnitude among the values the nodes of the fp32 graph at ``path`` compute on
    check_batch, the node that computes it), over the nodes whose names start with ``only_under`` if given:
    what its float16 graph holds in float16. onnxruntime's CPU provider computes most float16 nodes in
    float32, so its check cannot see a value past FLOAT16_MAX, which a GPU computing in float16 makes inf.
    Each float output is reduced inside the graph to its largest magnitude (Abs, then ReduceMax, which passes
    over a NaN: one reaching the embedding fails the fp32 check), so that the run holds an inference's memory,
    not every node's output at once (r100 held 0.18 GB more an image so); the graph is run from a file beside
    ``path``, which reads its external data."""
    import onnx
    import onnxruntime
    from onnx import helper

    model = onnx.load(path, load_external_data=False)
    typed = onnx.shape_inference.infer_shapes(model).graph  # (the outputs' element types)
    floats = {value.name for value in [*typed.value_info, *typed.output]
              if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    del typed  # (a copy of the graph)
    maker = {name: node.name for node in model.graph.node if not only_under or node.name.startswith(only_under)
             for name in node.output if name in floats}
    del model.graph.output[:]
    nodes, probes = [], {}
    for node in model.graph.node:  # (each probe right after its node: onnxruntime runs them in this order)
        nodes.append(node)
        for name in node.output:
            if name in maker:
                magnitude, largest = f"largest_value/abs_{len(probes)}", f"largest_value/max_{len(probes)}"
                probes[largest] = maker[name]
                nodes += [helper.make_node("Abs", [name], [magnitude]),
                          helper.make_node("ReduceMax", [magnitude], [largest], keepdims=0)]
                model.graph.output.append(helper.make_tensor_value_info(largest, onnx.TensorProto.FLOAT, []))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    handle, probed = tempfile.mkstemp(prefix=".largest-value-", suffix=".onnx", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(model.SerializeToString())
        options = onnxruntime.SessionOptions()
        # (in its default order onnxruntime ran the probes late, holding the outputs they read: r100 took 2 GB
        # more at a batch of 12; in this one, an inference's memory)
        options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
        session = onnxruntime.InferenceSession(probed, options, providers=["CPUExecutionProvider"])
        values = session.run(None, {"input": check_batch(image_size, batch).numpy()})
    finally:
        os.remove(probed)
    # (an empty output's maximum is -inf; of equal ones, the first node's)
    return max(((float(value), node) for value, node in zip(values, probes.values())), key=lambda pair: pair[0],
               default=(0.0, ""))


def check_onnx(model: torch.nn.Module, path: str, image_size: int, batch: int = 3, *,
               float16: bool = False) -> float | None:
    """Max abs difference between onnxruntime's and PyTorch's embeddings of a random batch for the
    ONNX graph at ``path`` (None when onnxruntime is not installed), after onnx's own checker. A graph
    whose input is float16 is fed the batch rounded to float16, PyTorch too.
    Raises ValueError when the graph is invalid, does not run, or differs past TOLERANCES (``float16``:
    the graph computes in float16), NotCheckable when onnxruntime's CPU provider cannot run a float16 graph."""
    import onnx

    try:
        onnx.checker.check_model(path)  # (a path: the checker then also takes graphs past 2 GB)
    except onnx.checker.ValidationError as error:
        raise ValueError(f"the exported ONNX graph is not valid: {str(error).strip().splitlines()[0]}") from error
    try:
        import onnxruntime
    except ImportError:
        return None
    x = check_batch(image_size, batch)
    options = onnxruntime.SessionOptions()
    # (Its errors come back as exceptions, said in one line below. Its warnings went to stderr: at --opset 7 and 8
    # a coloured line for each float16 Neg node it had no CPU kernel to fold.)
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        half_input = session.get_inputs()[0].type == "tensor(float16)"
        x = x.half().float() if half_input else x  # (PyTorch is given the values the graph is given)
        got = session.run(["embedding"], {"input": x.numpy().astype(np.float16 if half_input else np.float32)})[0]
    except Exception as error:  # onnxruntime's errors have no common base but Exception
        reason = first_line(error)
        if float16 and ("NOT_IMPLEMENTED" in reason or type(error).__name__ == "NotImplemented"):
            raise NotCheckable(f"onnxruntime {onnxruntime.__version__}'s CPU provider cannot run it ({reason})") \
                from error
        raise ValueError(f"onnxruntime cannot run the exported graph: {reason}") from error
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    error = float(np.abs(got.astype(np.float32) - expected).max())
    scale = float(np.abs(expected).max())
    if not error <= TOLERANCES["float16" if float16 else "float32"] * max(scale, 1.0):
        raise ValueError(f"onnxruntime's embeddings differ from PyTorch's by {error:.3g} (embedding scale "
                         f"{scale:.3g}{', in float16' if float16 else ''})")
    return error


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.export", name="export", description=__doc__)
    p.add_argument("--checkpoint", type=path_arg, required=True,
                   help="a training checkpoint (runs/<network>/checkpoint.pt) or a backbone state dict")
    p.add_argument("--output", type=path_arg, default=None,
                   help="output folder (default: the checkpoint's folder); an earlier export there is replaced")
    p.add_argument("--network", default=None, help="only for bare state dicts whose layout cannot be guessed")
    p.add_argument("--embedding-size", "--embedding_size", dest="embedding_size", type=int, default=None,
                   help="the embedding's length, as --network: only for bare state dicts")
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None,
                   help="the input side in pixels, as --network: only for bare state dicts")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (" + (f"{OPSETS.start} to {OPSETS.stop - 1}; " if OPSETS else "") + "default: 17)")
    p.add_argument("--normalized-onnx", action="store_true",
                   help=f"also write {NORMALIZED_ONNX_NAME}: embedding(image) + embedding(mirror), L2-normalised, the "
                   "embedding verification chose backbone.json's threshold on (cosine = dot product; same person at "
                   "cosine >= 1 - threshold/2)")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="also write backbone.onnx (without it, or without the onnx package, the backbone.onnx of an "
                   "earlier export in the folder is removed)")
    p.add_argument("--onnx-prelu", "--onnx_prelu", dest="onnx_prelu", action="store_true",
                   help="write each PReLU as ONNX's PRelu node (for a converter or runtime that wants it) rather than "
                   "relu(x) + (-a) * relu(-x): the same values, which onnxruntime runs faster")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None, metavar="N",
                   help="fix the ONNX graphs' batch dimension at N, for TensorRT engines and accelerators that want "
                   "fixed shapes; they are checked at N, and the int8 graphs calibrated at N too (default: a free "
                   "batch dimension)")
    p.add_argument("--fp16", action="store_true",
                   help=f"also write {FP16_ONNX_NAME} (with --normalized-onnx, {NORMALIZED_FP16_ONNX_NAME} too): "
                   "backbone.onnx with float16 weights and compute, half its size, for GPUs (TensorRT, onnxruntime's "
                   "CUDA provider); its input and output stay float32, as insightface and other tools feed and read "
                   "them, and it is checked against PyTorch to 1%% of the embedding's scale")
    p.add_argument("--fp16-io", "--fp16_io", dest="fp16_io", action="store_true",
                   help="with --fp16: the float16 graphs' input and output are float16 too, for a pipeline that "
                   "feeds float16 (no casts in the graph)")
    p.add_argument("--int8", nargs="?", const="", default=None, metavar="FACES",
                   help=f"also write {INT8_ONNX_NAME} (with --normalized-onnx, {NORMALIZED_INT8_ONNX_NAME} too): the "
                   "graph quantized to int8 for CPUs and edge devices (onnxruntime's static quantization: QDQ, int8 "
                   "weights per channel, uint8 activations), calibrated on aligned faces of FACES, what the trainer's "
                   "--data takes (an image folder, a folder with train.rec/train.idx, a list file, synthetic; "
                   "default: the run's own --data), and checked against the fp32 graph on others before anything "
                   f"is written (refused when their embeddings' mean cosine is under {quantize.MIN_MEAN_COSINE})")
    p.add_argument("--int8-faces", "--int8_faces", dest="int8_faces", type=int, default=None,
                   help=f"faces of FACES that calibrate (default {quantize.DEFAULT_FACES}); as many others, where it "
                   "holds them, check the int8 graph")
    p.add_argument("--int8-targets", "--int8_targets", dest="int8_targets", type=_str_list, default=None,
                   help="verification sets to measure both graphs on, as train.verify's --targets: paths of .bin "
                   "files, pairs files or RFW's folder, or names looked for in FACES's folder (<folder>/<name>.bin); "
                   "default: the run's --val-targets, found as the run found them; none: none")
    args = p.parse_args(argv)
    if args.normalized_onnx and not args.onnx:
        p.error("--normalized-onnx with --no-onnx: give one")
    if args.int8 is not None and not args.onnx:
        p.error("--int8 quantizes backbone.onnx, which --no-onnx does not write")
    for flag, value in (("--int8-faces", args.int8_faces), ("--int8-targets", args.int8_targets)):
        if value is not None and args.int8 is None:
            p.error(f"{flag} goes with --int8")
    if args.int8_faces is not None and args.int8_faces < 1:
        p.error(f"--int8-faces must be at least 1, got {args.int8_faces}")
    if args.fp16_io and not args.fp16:
        p.error("--fp16-io goes with --fp16")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    for flag, given in (("--opset", args.opset is not None), ("--onnx-prelu", args.onnx_prelu),
                        ("--fp16", args.fp16), ("--batch-size", args.batch_size is not None)):
        if given and not args.onnx:  # (--opset was taken without a word)
            p.error(f"{flag} goes with the ONNX graph, which --no-onnx does not write")
    args.opset = 17 if args.opset is None else args.opset
    for flag, value in (("--embedding-size", args.embedding_size), ("--image-size", args.image_size)):
        if value is not None and value < 1:  # (a negative size was a traceback from torch)
            p.error(f"{flag} must be at least 1, got {value}")
    if args.onnx and OPSETS is not None and args.opset not in OPSETS:
        p.error(f"--opset {args.opset}: torch's ONNX exporter writes opsets {OPSETS.start} to {OPSETS.stop - 1}")
    if args.normalized_onnx and args.opset < FLIP_OPSET:
        p.error(f"--normalized-onnx needs --opset {FLIP_OPSET} or later (its mirror image is ONNX's Slice with a "
                f"negative step, from opset {FLIP_OPSET}), got {args.opset}")
    if args.int8 is not None and args.opset < quantize.INT8_OPSET:
        p.error(f"--int8 needs --opset {quantize.INT8_OPSET} or later (its weights' scales per channel are "
                f"QuantizeLinear's axis, from opset {quantize.INT8_OPSET}), got {args.opset}")
    # Ctrl-C and SIGTERM unwind: the private folder goes, and the output folder is as it was, or (when they
    # come while the files move into place) holds the whole export.
    return run_tool(lambda: _export(args), tool="export", whole=" as the files moved into place: the export is whole",
                    blank_line=False)


def _export(args: argparse.Namespace) -> int:
    """``main`` after parsing; raises OSError or ValueError naming what is at fault (before anything
    is written in the output folder)."""
    output = args.output or os.path.dirname(os.path.abspath(args.checkpoint))
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output} is a file, not a folder to export into")
    checkpoint.check_output_folder(output, f"--output {output}")
    names = [STATE_NAME, SETTINGS_NAME] + ([ONNX_NAME] if args.onnx else []) + (
        [NORMALIZED_ONNX_NAME] if args.normalized_onnx else []) + (
        [INT8_ONNX_NAME] if args.int8 is not None else []) + (
        [NORMALIZED_INT8_ONNX_NAME] if args.int8 is not None and args.normalized_onnx else []) + (
        [FP16_ONNX_NAME] if args.fp16 else []) + ([NORMALIZED_FP16_ONNX_NAME] if args.fp16 and args.normalized_onnx
                                                  else [])
    for name in names:
        if os.path.isdir(os.path.join(output, name)):
            raise ValueError(f"{os.path.join(output, name)} is a folder: the export writes a file of that name")
    if args.int8 is not None:
        quantize.require_onnxruntime()
    if args.fp16:
        quantize.require_onnxruntime("--fp16", "onnxruntime.transformers.float16")
    model, settings = checkpoint.load_backbone(args.checkpoint, network=args.network,
                                               embedding_size=args.embedding_size, image_size=args.image_size)
    # The faces and verification sets of --int8, read before anything is made: a mistake in them is said at once.
    faces, sets = _int8_inputs(args, settings["image_size"]) if args.int8 is not None else (None, {})
    made = folders_missing(output)  # (with the folders above it that it makes: a new --output n1/n2/n3's n1, n2)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as error:  # (a read-only file system, which os.access does not see)
        raise ValueError(f"--output {output}: cannot make the folder: {error.strerror or error}") from None
    state_path, onnx_path = os.path.join(output, STATE_NAME), os.path.join(output, ONNX_NAME)
    normalized_path = os.path.join(output, NORMALIZED_ONNX_NAME)

    # Every file is made (and the graphs checked) in a private folder first; a failure or a stop leaves
    # the output folder as it was.
    try:
        staging = tempfile.mkdtemp(prefix=".backbone-export-", dir=output)
    except PermissionError:
        raise ValueError(f"--output {output}: cannot write in {output} (read-only, or not yours)") from None
    try:
        graph, skipped, difference, normalized_difference = None, None, None, None
        if args.onnx:
            graph = os.path.join(staging, ONNX_NAME)
            try:
                export_onnx(model, graph, settings["image_size"], args.opset, prelu_node=args.onnx_prelu,
                            batch=args.batch_size)
                difference = check_onnx(model, graph, settings["image_size"], args.batch_size or 3)
                if args.normalized_onnx:
                    deployed = FlipNormalized(model).eval()
                    export_onnx(deployed, os.path.join(staging, NORMALIZED_ONNX_NAME), settings["image_size"],
                                args.opset, prelu_node=args.onnx_prelu, batch=args.batch_size)
                    normalized_difference = check_onnx(deployed, os.path.join(staging, NORMALIZED_ONNX_NAME),
                                                       settings["image_size"], args.batch_size or 3)
            except OnnxNotInstalled as error:
                graph, skipped = None, str(error)
                for name in os.listdir(staging):
                    os.remove(os.path.join(staging, name))
            except ValueError as error:
                print(f"export: error: {error}; nothing written (--no-onnx exports the state dict alone)",
                      file=sys.stderr)
                return 1
        halves = {}
        if args.fp16 and graph is not None:
            try:
                halves = _float16(staging, model, settings["image_size"], args)
            except ValueError as error:
                print(f"export: error: {error}; nothing written (without --fp16 the export writes the fp32 graph "
                      "alone)", file=sys.stderr)
                return 1
        agreements = {}
        if faces is not None:
            try:
                agreements = _quantize(staging, faces, sets, args.normalized_onnx)
            except ValueError as error:
                print(f"export: error: {error}; nothing written (without --int8 the export writes the fp32 graph "
                      "alone)", file=sys.stderr)
                return 1
        checkpoint.save_atomic(model.state_dict(), os.path.join(staging, STATE_NAME))
        checkpoint.write_json_atomic(os.path.join(staging, SETTINGS_NAME), settings)

        # Graphs of an earlier export that this one does not write would pass for this one's.
        written = set(os.listdir(staging))
        for name in written:  # (backbone.onnx.data: the others were looked for before the work)
            if os.path.isdir(os.path.join(output, name)):
                raise ValueError(f"{os.path.join(output, name)} is a folder: the export writes a file of that name")
        stale = [os.path.join(output, name) for name in GRAPH_NAMES + DATA_NAMES
                 if name not in written and os.path.exists(os.path.join(output, name))]
        with signals_held():  # all the files move, and the stale ones go, or nothing changes
            # The state dict last: a reader that takes backbone.pt for the sign of a finished export finds
            # the graphs and settings in place.
            for name in sorted(os.listdir(staging), key=lambda name: name == STATE_NAME):
                os.replace(os.path.join(staging, name), os.path.join(output, name))
            for path in stale:
                os.remove(path)
        print(f"wrote {state_path} ({settings['network']}, {settings['embedding_size']}-D, "
              f"{settings['image_size']}px)")
        cut_short = checkpoint.cut_short_note(args.checkpoint, settings, "export")  # (backbone.json carries it too)
        if cut_short:  # (once written, as cluster and search say their notes once past their refusals)
            print(cut_short, file=sys.stderr)
        for path in stale:
            print(f"removed {path}: it was from an earlier export and does not match the new backbone.pt",
                  file=sys.stderr)
        if graph is None:
            if skipped:
                print(f"skipped ONNX: {skipped}", file=sys.stderr)
            return 0

        def checked(difference: float | None) -> str:
            return (f"not compared with PyTorch ({not_importable('onnxruntime', None, ORT_DISTRIBUTIONS)} to check "
                    "it)" if difference is None
                    else f"onnxruntime matches PyTorch (max abs difference {difference:.2e})")
        batch = "" if args.batch_size is None else f" (batch {args.batch_size}, fixed)"
        print(f"wrote {onnx_path}{batch}: {checked(difference)}")
        if args.normalized_onnx:
            print(f"wrote {normalized_path}{batch}: image + mirror, L2-normalised (the embedding verification "
                  f"compares); {checked(normalized_difference)}")
        for name, half_checked in halves.items():
            fp32_name = NORMALIZED_ONNX_NAME if name == NORMALIZED_FP16_ONNX_NAME else ONNX_NAME
            io = "float16" if args.fp16_io else "float32"
            print(f"wrote {os.path.join(output, name)}{batch}: {fp32_name} in float16, its input and output {io}; "
                  f"{half_checked}")
        for name, agreement in agreements.items():
            fp32_name = NORMALIZED_ONNX_NAME if name == NORMALIZED_INT8_ONNX_NAME else ONNX_NAME
            print(f"wrote {os.path.join(output, name)}{batch}: {fp32_name} in int8, calibrated on "
                  f"{count_of(len(faces.calibration), 'face')} of {faces.spec}; against {fp32_name}, "
                  f"{quantize.describe(agreement)}"
                  + (" not used for calibration" if faces.held_out else " (the calibration faces: none left)"))
            for target, (fp32, int8) in agreement.targets.items():
                print(f"  {target}: accuracy {int8['accuracy']:.4f} ± {int8['accuracy_std']:.4f} in int8, "
                      f"{fp32['accuracy']:.4f} ± {fp32['accuracy_std']:.4f} in fp32 "
                      f"(threshold {int8['threshold']:.3f} and {fp32['threshold']:.3f})")
        return 0
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        remove_folders_made(made)  # the folders this run made, left empty by a failure or a stop


def _float16(staging: str, model: torch.nn.Module, image_size: int, args: argparse.Namespace) -> dict[str, str]:
    """The float16 graphs of the fp32 ones in ``staging``, made beside them and checked against PyTorch
    ({name: what the check found}); ValueError when the converter fails, a graph differs past TOLERANCES,
    or a value it computes on the check's batch is past float16's range."""
    import onnxruntime

    found = {}
    for fp32_name, fp16_name, module in ((ONNX_NAME, FP16_ONNX_NAME, model),) + (
            ((NORMALIZED_ONNX_NAME, NORMALIZED_FP16_ONNX_NAME, FlipNormalized(model).eval()),)
            if args.normalized_onnx else ()):
        path, batch = os.path.join(staging, fp16_name), args.batch_size or 3
        only_under = "/backbone/" if fp32_name == NORMALIZED_ONNX_NAME else None
        float16_onnx(os.path.join(staging, fp32_name), path, float16_io=args.fp16_io, only_under=only_under)
        largest, node = largest_value(os.path.join(staging, fp32_name), image_size, batch, only_under)
        if not largest <= FLOAT16_MAX:
            raise ValueError(f"{fp16_name}: {fp32_name}'s node {node} computes {largest:.3g} on the check's batch, "
                             f"past float16's largest value {FLOAT16_MAX:g}: on a GPU computing in float16 it is inf")
        try:
            difference = check_onnx(module, path, image_size, batch, float16=True)
        except NotCheckable as error:  # (the graph is valid: onnx's checker passed it)
            found[fp16_name] = f"not compared with PyTorch: {error}; compare it on the GPU it is for"
        except ValueError as error:
            raise ValueError(f"{fp16_name}: {error}") from None
        else:
            found[fp16_name] = (f"onnxruntime {onnxruntime.__version__} on the CPU matches PyTorch within float16's "
                                f"precision (max abs difference {difference:.2e})")
        found[fp16_name] += f"; its largest value {largest:.3g}, of float16's {FLOAT16_MAX:g}"
    return found


def _int8_inputs(args: argparse.Namespace, image_size: int) -> tuple[quantize.Faces, dict]:
    """--int8's faces (the run's --data where no FACES is given) and the verification sets of
    --int8-targets (the run's --val-targets where not given)."""
    from .embed import run_options

    run, started_in = run_options(args.checkpoint)
    run = quantize.run_paths(run, started_in)
    spec = args.int8 or run.get("data")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--int8: {args.checkpoint} records no training data to calibrate on (not a training "
                         "checkpoint): name the faces, --int8 FACES")
    count = args.int8_faces or quantize.DEFAULT_FACES
    try:
        faces = quantize.read_faces(spec, count, image_size=image_size, run=run,
                                    flag="--int8" if args.int8 else "--int8 (the run's --data)")
    except FileNotFoundError as error:
        if args.int8:
            raise
        # (the run's folder moved, or it trained on another machine: the message named here alone)
        where = "" if not started_in else f"; the run was started in {started_in}" + (
            "" if os.path.isdir(started_in) else ", which is not there any more")
        raise FileNotFoundError(f"{error}{where}: name the faces, --int8 FACES") from None
    if not faces.held_out:
        print(f"note: --int8 {spec} holds {count_of(faces.total, 'face')}: all of them calibrate, and the int8 graph "
              f"is checked on them (on faces it was not calibrated on, the agreement may be lower; --int8-faces "
              f"{max(1, faces.total // 2)} leaves half out)", file=sys.stderr)
    elif len(faces.check) < count:
        print(f"note: --int8 {spec} holds {faces.total} faces: {len(faces.calibration)} calibrate, and the int8 graph "
              f"is checked on the {len(faces.check)} others", file=sys.stderr)
    if args.int8_targets is not None:
        sets = quantize.verification_sets(args.int8_targets, spec, image_size, seed=run.get("seed", 0)
                                          if spec == run.get("data") else 0, skip_missing=False)
    elif isinstance(run.get("val_targets"), list) and isinstance(run.get("data"), str):
        sets = quantize.verification_sets(run["val_targets"], run["data"], image_size, seed=run.get("seed", 0),
                                          skip_missing=True)
    else:
        sets = {}
    return faces, sets


def _quantize(staging: str, faces: quantize.Faces, sets: dict, normalized: bool) -> dict[str, quantize.Agreement]:
    """The int8 graphs of the fp32 ones in ``staging``, made beside them and checked ({name: agreement});
    ValueError when onnxruntime cannot quantize one, or its embeddings do not agree with the fp32 graph's."""
    agreements = {}
    for fp32_name, int8_name in ((ONNX_NAME, INT8_ONNX_NAME),) + (
            ((NORMALIZED_ONNX_NAME, NORMALIZED_INT8_ONNX_NAME),) if normalized else ()):
        fp32_path, int8_path = os.path.join(staging, fp32_name), os.path.join(staging, int8_name)
        # (in backbone_normalized.onnx the backbone alone: its nodes are named for FlipNormalized's attribute)
        quantize.quantize(fp32_path, int8_path, faces.calibration,
                          only_under="/backbone/" if fp32_name == NORMALIZED_ONNX_NAME else None)
        try:
            # (the verification sets once: the normalized graph's embeddings are the same faces' mirrored and summed)
            agreements[int8_name] = quantize.compare(fp32_path, int8_path, faces.check,
                                                     sets if fp32_name == ONNX_NAME else None)
        except ValueError as error:
            raise ValueError(f"{int8_name}: {error}") from None
    return agreements


if __name__ == "__main__":
    sys.exit(main())
