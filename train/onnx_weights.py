"""The weights of an ONNX recognition graph (insightface's released ``w600k_r50.onnx`` and ``glintr100.onnx``,
``train.export``'s ``backbone.onnx``) read into the PyTorch backbone of the same layout, for ``--pretrained_model``.

Both graphs are put in one canonical order and walked side by side: the file's, and the network's own, traced
to ONNX here (each of its weights then named by its state-dict key). The canonical order visits, at each join,
the deeper branch first (a residual block's main branch before its shortcut), so that it does not depend on
the order in which an exporter wrote the nodes or the inputs of an Add. A BatchNorm that the file's exporter
folded into the convolution before it (PyTorch's eval-mode export does) becomes the identity plus that
convolution's bias, which calibrate_batchnorms then fits to the data for training mode; the file's input scaling
((x - 127.5) * 0.0078125 in the graphs converted from MXNet) is moved into the first convolution's weights, the
network taking (x - 127.5) / 127.5 as all networks here do.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .tools import first_line

# Nodes that carry no weights and that these graphs hold between the weighted ones (and the arithmetic of
# their shapes): passed over. Another op is refused, naming it.
_PLAIN_OPS = {"Relu", "Neg", "Add", "Sub", "Mul", "Div", "Flatten", "Reshape", "Identity", "Cast", "Dropout",
              "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Constant", "Slice", "Transpose", "Sqrt", "Pow",
              "ReduceL2", "ReduceSum", "Clip", "Max", "Expand", "ConstantOfShape", "Size"}
_WEIGHTED_OPS = {"Conv", "BatchNormalization", "PRelu", "Gemm", "MatMul"}
# The ops through which a constant is worked out from the graph's initializers and Constant nodes.
_CONSTANT_OPS = {"Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Neg", "Transpose", "Flatten"}
_KINDS = {"conv": "convolution", "bn": "BatchNorm", "prelu": "PReLU", "linear": "fully connected layer"}


class OnnxGraphMismatch(ValueError):
    """The graph is read, but its weighted layers are not the network's: the message says where they differ."""


@dataclass
class _Layer:
    """One weighted layer in canonical order: ``tensors`` by role (weight, bias, mean, var), each a value (the
    file's) or a state-dict key (the network's); ``feeds_bn``: its output goes straight into a BatchNorm."""

    kind: str
    node: str
    tensors: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)
    feeds_bn: bool = False


class _Graph:
    """An ONNX graph's constants, producers and readers, and its weighted layers in canonical order."""

    def __init__(self, graph, origin: str):
        from onnx import numpy_helper

        self.origin = origin
        self.whose = "the network's" if origin == "network" else "its"
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.numpy_helper = numpy_helper
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.readers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.input = next(i.name for i in graph.input if i.name not in self.initializers)
        self.output = graph.output[0].name
        # Data: what the image flows through (not the arithmetic of shapes, which starts at a Shape node).
        self.data = {self.input}
        for node in self.nodes:
            if node.op_type not in ("Shape", "Size") and any(name in self.data for name in node.input):
                self.data.update(node.output)
        self.input_scale: np.ndarray | None = None
        self.input_shift: np.ndarray | None = None

    def constant(self, name: str) -> tuple[np.ndarray, str | None] | None:
        """(value, the initializer it comes from) of a constant input, or None for data."""
        if name in self.data or not name:
            return None
        if name in self.initializers:
            return self.numpy_helper.to_array(self.initializers[name]), name
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":  # (its one attribute: value, a tensor, or value_float, value_ints, ...)
            value = _attributes(node).popitem()[1]
            return (self.numpy_helper.to_array(value) if hasattr(value, "dims") else np.array(value)), None
        if node.op_type not in _CONSTANT_OPS:
            return None
        found = self.constant(node.input[0])
        if found is None:
            return None
        value, source = found
        attrs = _attributes(node)
        second = self.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        second = None if second is None else second[0]
        if node.op_type == "Neg":
            value = -value
        elif node.op_type == "Unsqueeze":
            for axis in sorted(int(a) for a in (second if second is not None else attrs["axes"])):
                value = np.expand_dims(value, axis if axis >= 0 else axis + value.ndim + 1)
        elif node.op_type == "Squeeze":
            axes = second if second is not None else attrs.get("axes")
            value = np.squeeze(value, axis=None if axes is None else tuple(int(a) for a in axes))
        elif node.op_type == "Reshape":
            shape = [value.shape[i] if s == 0 else int(s) for i, s in enumerate(second)]
            value = value.reshape(shape)
        elif node.op_type == "Transpose":
            value = np.transpose(value, attrs.get("perm"))
        elif node.op_type == "Flatten":
            axis = attrs.get("axis", 1)
            value = value.reshape(int(np.prod(value.shape[:axis])), -1)
        return value, source

    def depth_order(self) -> dict[str, int]:
        """The number of weighted nodes on the longest path from the input to each node's output."""
        depth = {self.input: 0}
        for node in self.nodes:
            own = int(node.op_type in _WEIGHTED_OPS or self._is_decomposed_prelu(node))
            deepest = max((depth.get(name, -1) for name in node.input if name in self.data), default=-1)
            for out in node.output:
                depth[out] = deepest + own
        return depth

    def canonical_nodes(self) -> list:
        """The nodes the output depends on through data, in post-order, the deeper input of each visited first."""
        depth = self.depth_order()
        seen, order = set(), []
        start = self.producer.get(self.output)
        if start is None:
            return order
        stack = [(start, None)]
        while stack:
            node, pending = stack.pop()
            if pending is None:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                inputs = [name for name in node.input if name in self.data and name in self.producer]
                # Deeper first, the input order breaking ties (sorted is stable).
                pending = sorted(inputs, key=lambda name: -depth.get(name, 0))
            for i, name in enumerate(pending):
                producer = self.producer[name]
                if id(producer) not in seen:
                    stack.append((node, pending[i + 1:]))
                    stack.append((producer, None))
                    break
            else:
                order.append(node)
        return order

    def _is_decomposed_prelu(self, node) -> bool:
        """A Mul of a constant and Relu(Neg(x)): train.export's relu(x) + (-a) * relu(-x)."""
        if node.op_type != "Mul" or len(node.input) != 2:
            return False
        data = [name for name in node.input if name in self.data]
        if len(data) != 1:
            return False
        relu = self.producer.get(data[0])
        neg = self.producer.get(relu.input[0]) if relu is not None and relu.op_type == "Relu" else None
        return neg is not None and neg.op_type == "Neg" and self.constant(
            next(n for n in node.input if n != data[0])) is not None

    def _feeds_bn(self, name: str) -> bool:
        """Whether ``name`` goes into a BatchNorm alone, through copies and reshapes (an exporter may write a
        BatchNorm1d of (N, D) as Unsqueeze, BatchNormalization, Squeeze)."""
        while True:
            readers = self.readers.get(name, [])
            if len(readers) != 1:
                return False
            if readers[0].op_type in ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape"):
                name = readers[0].output[0]
                continue
            return readers[0].op_type == "BatchNormalization" and readers[0].input[0] == name

    def layers(self) -> list[_Layer]:
        """The weighted layers in canonical order; OnnxGraphMismatch for a node this does not read."""
        layers: list[_Layer] = []
        for node in self.canonical_nodes():
            op, name = node.op_type, node.name or node.output[0]
            constants = {i: self.constant(n) for i, n in enumerate(node.input)}
            if op == "Conv":
                attrs = _attributes(node)
                layer = _Layer("conv", name)
                self._take(layer, "weight", constants.get(1), node)
                spatial = len(layer.shapes["weight"]) - 2
                layer.attributes = {"group": attrs.get("group", 1),
                                    "strides": tuple(attrs.get("strides") or (1,) * spatial),
                                    "pads": tuple(attrs.get("pads") or (0,) * 2 * spatial)}
                if constants.get(2) is not None:
                    self._take(layer, "bias", constants[2], node)
            elif op == "BatchNormalization":
                layer = _Layer("bn", name, attributes={"eps": float(_attributes(node).get("epsilon", 1e-5))})
                for i, role in enumerate(("weight", "bias", "running_mean", "running_var"), 1):
                    self._take(layer, role, constants.get(i), node)
            elif op == "PRelu":
                layer = _Layer("prelu", name)
                self._take(layer, "weight", constants.get(1), node)
            elif self._is_decomposed_prelu(node):
                layer = _Layer("prelu", name)
                value, source = next(c for c in constants.values() if c is not None)
                self._take(layer, "weight", (-value, source), node)
            elif op == "Gemm":
                attrs = _attributes(node)
                if attrs.get("transA", 0):
                    raise OnnxGraphMismatch(f"{self.whose} Gemm node {name} transposes its input (transA), which a "
                                            "fully connected layer does not")
                layer = _Layer("linear", name)
                weight = constants.get(1)
                if weight is None:
                    raise OnnxGraphMismatch(f"{self.whose} Gemm node {name} has no constant weight")
                value, source = weight
                alpha = float(attrs.get("alpha", 1.0))
                self._take(layer, "weight", (alpha * (value if attrs.get("transB", 0) else value.T), source), node,
                           transposed=not attrs.get("transB", 0))
                if constants.get(2) is not None:
                    value, source = constants[2]
                    self._take(layer, "bias", (float(attrs.get("beta", 1.0)) * value, source), node)
            elif op == "MatMul":
                weight = constants.get(1)
                if weight is None or weight[0].ndim != 2:
                    raise OnnxGraphMismatch(f"{self.whose} MatMul node {name} has no constant 2-D weight")
                layer = _Layer("linear", name)
                self._take(layer, "weight", (weight[0].T, weight[1]), node, transposed=True)
                bias_add = self._bias_add(node.output[0])
                if bias_add is not None:
                    self._take(layer, "bias", bias_add, node)
            elif op in _PLAIN_OPS:
                self._plain(node, name, constants, layers)
                continue
            else:
                raise OnnxGraphMismatch(f"{self.whose} node {name} is a {op}, an op this does not read (it reads Conv, "
                                        "BatchNormalization, PRelu, Gemm, MatMul and the plain ops between them)")
            output = node.output[0]
            if op == "MatMul" and "bias" in layer.tensors:
                output = next(r for r in self.readers[output] if r.op_type == "Add").output[0]
            layer.feeds_bn = self._feeds_bn(output)
            layers.append(layer)
        return layers

    def _bias_add(self, name: str):
        readers = self.readers.get(name, [])
        if len(readers) == 1 and readers[0].op_type == "Add":
            other = [n for n in readers[0].input if n != name]
            return self.constant(other[0]) if len(other) == 1 else None
        return None

    def _plain(self, node, name: str, constants: dict, layers: list[_Layer]) -> None:
        """Checks a node without weights: a constant Add, Sub, Mul or Div on the data is the input scaling where
        no weighted layer came before it, the bias of a MatMul, or refused (weights this cannot place)."""
        op = node.op_type
        if op not in ("Add", "Sub", "Mul", "Div"):
            return
        found = [c for i, c in constants.items() if c is not None]
        if not found:
            return
        if op == "Add" and any(self.producer.get(n) is not None and self.producer[n].op_type == "MatMul"
                               for n in node.input):
            return  # (the MatMul's bias, read with it)
        value = found[0][0].astype(np.float64)
        if layers:
            raise OnnxGraphMismatch(f"{self.whose} node {name} ({op}) applies constant weights of shape "
                                    f"{tuple(value.shape)} that no layer of the network holds")
        if value.size not in (1, 3):
            raise OnnxGraphMismatch(f"{self.whose} input scaling {name} ({op}) has {value.size} values, not 1 or 3")
        value = np.broadcast_to(value.reshape(-1), (3,)).copy()
        scale = np.ones(3) if self.input_scale is None else self.input_scale
        shift = np.zeros(3) if self.input_shift is None else self.input_shift
        data_first = node.input[0] in self.data
        if op in ("Mul", "Div"):
            factor = value if op == "Mul" else 1.0 / value
            scale, shift = scale * factor, shift * factor
        elif op == "Add":
            shift = shift + value
        elif data_first:  # x - c
            shift = shift - value
        else:  # c - x
            scale, shift = -scale, value - shift
        self.input_scale, self.input_shift = scale, shift

    def _take(self, layer: _Layer, role: str, found, node, transposed: bool = False) -> None:
        if found is None:
            raise OnnxGraphMismatch(f"{self.whose} {node.op_type} node {layer.node} has no constant {role}")
        value, source = found
        if self.origin == "network" and source is None:
            raise OnnxGraphMismatch(f"the network's {role} of {layer.node} is not one of its weights as traced")
        layer.tensors[role] = source if self.origin == "network" else value
        layer.shapes[role] = tuple(value.shape)
        if transposed:
            layer.attributes["transposed"] = True


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _network_graph(model: torch.nn.Module, image_size: int):
    """``model``'s own graph, traced in training mode (its BatchNorms kept, not folded into the convolutions)
    from a copy, each weight named by its state-dict key."""
    import onnx

    traced = copy.deepcopy(model).cpu().float().train()
    if hasattr(traced, "gradient_checkpointing"):
        traced.gradient_checkpointing = False
    if hasattr(traced, "amp"):
        traced.amp = "none"
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(traced, (torch.zeros(2, 3, image_size, image_size),), buffer, dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=["input"], output_names=["embedding"])
    return onnx.load_from_string(buffer.getvalue()).graph


def read_onnx_weights(path: str, model: torch.nn.Module, image_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """``model``'s state dict with the weights of the ONNX graph at ``path`` in place of its own, and what was
    done to fit them (``folded``: how many BatchNorms were taken as the identity, ``folded_batchnorms``: their
    module names, for calibrate_batchnorms; ``input_scale``: the factor moved into
    the first convolution, 1.0 when none; ``image_size``: the graph's input side, None where not fixed). Raises
    ValueError naming the file when it cannot be read (no onnx package, not an ONNX file), OnnxGraphMismatch
    (saying where, and what the graph holds) when its layers are not ``model``'s."""
    try:
        import onnx
    except ImportError:
        raise ValueError(f"{path}: reading an ONNX model's weights needs the onnx package: pip install onnx") from None
    try:
        file_graph = onnx.load(path).graph
    except Exception as error:  # protobuf's DecodeError, external data missing: all of them this
        reason = first_line(error)
        raise ValueError(f"{path}: not a readable ONNX model: {reason}") from None
    file = _Graph(file_graph, "file")
    theirs = file.layers()
    try:
        ours = _Graph(_network_graph(model, image_size), "network").layers()
    except OnnxGraphMismatch as error:
        raise OnnxGraphMismatch(f"{error}: ONNX weights are read into the convolutional networks (iResNets, "
                                "mbf)") from None
    except Exception as error:  # torch's exporter fails in many ways (a network of one's own)
        reason = first_line(error)
        raise OnnxGraphMismatch(f"the network cannot be traced to ONNX to be matched with it: {reason}") from None
    try:
        state, done = _fit(file, theirs, ours, model)
    except OnnxGraphMismatch as error:
        if str(error).startswith("its graph has"):
            raise
        raise OnnxGraphMismatch(f"{error} (its graph {describe_layers(theirs)})") from None
    return state, {**done, "image_size": _input_side(file_graph)}


def _fit(file: _Graph, theirs: list[_Layer], ours: list[_Layer], model: torch.nn.Module) -> tuple[dict, dict]:
    """(the state dict, what was done): the two lists of layers walked side by side."""
    state = {key: value.clone() for key, value in model.state_dict().items()}
    folded, i, j = [], 0, 0
    pending_bias = None  # a file's convolution bias that the network's convolution has no place for
    while i < len(ours) and j < len(theirs):
        mine, found = ours[i], theirs[j]
        if mine.kind == "bn" and pending_is_folded(ours, i, theirs, j):
            _put_identity_bn(state, mine, pending_bias, _module_eps(model, mine.tensors["running_var"]))
            folded.append(_module_name(mine))
            pending_bias, i = None, i + 1
            continue
        if mine.kind != found.kind:
            raise OnnxGraphMismatch(f"its weighted layer {j + 1} ({found.node}) is a {_KINDS[found.kind]} "
                                    f"{_shape_of(found)}, the network's is a {_KINDS[mine.kind]} {_shape_of(mine)}")
        _check_shapes(mine, found, j)
        for role, key in mine.tensors.items():
            value = found.tensors.get(role)
            if value is None:  # (the file's layer has no bias where the network's has one)
                value = np.zeros(state[key].shape, np.float32)
            state[key] = torch.from_numpy(np.array(value, np.float32)).reshape(state[key].shape)
        if mine.kind == "bn":
            ours_eps = _module_eps(model, mine.tensors["running_var"])
            var = state[mine.tensors["running_var"]] + (found.attributes["eps"] - ours_eps)
            state[mine.tensors["running_var"]] = var.clamp_min(0)
            if pending_bias is not None:  # BN(Wx + b) = BN with its mean less b, of Wx
                state[mine.tensors["running_mean"]] -= torch.from_numpy(np.array(pending_bias, np.float32))
                pending_bias = None
        elif "bias" in found.tensors and "bias" not in mine.tensors:
            pending_bias = np.asarray(found.tensors["bias"]).reshape(-1)
        elif pending_bias is not None:
            raise OnnxGraphMismatch(f"the bias of the layer before its layer {j + 1} ({found.node}) has no place "
                                    "in the network")
        i, j = i + 1, j + 1
    if i < len(ours) and ours[i].kind == "bn" and pending_is_folded(ours, i, theirs, j):
        _put_identity_bn(state, ours[i], pending_bias, _module_eps(model, ours[i].tensors["running_var"]))
        folded, pending_bias, i = folded + [_module_name(ours[i])], None, i + 1
    if i < len(ours) or j < len(theirs) or pending_bias is not None:
        raise OnnxGraphMismatch(f"its graph {describe_layers(theirs)}, the network {describe_layers(ours)}")
    scale = 1.0
    if file.input_scale is not None:
        scale = _move_input_scaling(file, state, ours)
    return state, {"folded": len(folded), "folded_batchnorms": folded, "input_scale": scale}


def _input_side(graph) -> int | None:
    """The side of the graph's square input where it is fixed, else None."""
    initializers = {t.name for t in graph.initializer}
    value = next(i for i in graph.input if i.name not in initializers)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    return dims[2] if len(dims) == 4 and dims[2] and dims[2] == dims[3] else None


def pending_is_folded(ours: list[_Layer], i: int, theirs: list[_Layer], j: int) -> bool:
    """Whether the network's BatchNorm ``ours[i]`` was folded into the file's layer before ``theirs[j]``: the
    network's layer before it feeds it, and the file's counterpart feeds no BatchNorm."""
    return i > 0 and j > 0 and ours[i - 1].feeds_bn and ours[i - 1].kind in ("conv", "linear") \
        and not theirs[j - 1].feeds_bn


def _put_identity_bn(state: dict, layer: _Layer, bias, eps: float) -> None:
    """The BatchNorm ``layer`` made the identity plus ``bias`` in eval mode: weight 1, mean 0, and a variance
    whose sum with eps is 1."""
    weight = state[layer.tensors["weight"]]
    state[layer.tensors["weight"]] = torch.ones_like(weight)
    state[layer.tensors["bias"]] = (torch.zeros_like(weight) if bias is None
                                    else torch.from_numpy(np.array(bias, np.float32)).reshape(weight.shape))
    state[layer.tensors["running_mean"]] = torch.zeros_like(weight)
    state[layer.tensors["running_var"]] = torch.full_like(weight, 1.0 - eps)


def calibrate_batchnorms(model: torch.nn.Module, names: list[str], batches) -> int:
    """Re-expresses each BatchNorm of ``model`` named in ``names`` (those folded away in the file, read as the
    identity plus a shift) for the statistics of its input over ``batches`` (model inputs), measured with the
    network in eval mode: running mean m and variance v, weight a sqrt(v + eps) and bias b + a m, where a x + b
    is the map it applied. Eval mode then computes a x + b as before (up to rounding), and training mode, which
    normalises with each batch's statistics, nearly so on batches like those (the identity BatchNorm, there,
    would have rescaled each channel to variance 1). -> the number of images measured."""
    modules = {name: model.get_submodule(name) for name in names}
    sums: dict[str, list] = {}

    def measure(name):
        def hook(module, inputs):
            x = inputs[0].detach().double().transpose(0, 1).reshape(inputs[0].shape[1], -1)
            total = sums.setdefault(name, [0, 0.0, 0.0])
            total[0] += x.shape[1]
            total[1] = total[1] + x.sum(1)
            total[2] = total[2] + (x * x).sum(1)
        return hook

    handles = [module.register_forward_pre_hook(measure(name)) for name, module in modules.items()]
    was_training, images = model.training, 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(batch)
                images += batch.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not images:
        return 0
    with torch.no_grad():
        for name, module in modules.items():
            count, total, squares = sums[name]
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0)
            scale = module.weight.double() / (module.running_var.double() + module.eps).sqrt()
            shift = module.bias.double() - module.running_mean.double() * scale
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            module.weight.copy_(scale * (var + module.eps).sqrt())
            module.bias.copy_(shift + scale * mean)
    return images


def _module_name(layer: _Layer) -> str:
    """The network's module of ``layer`` (its weights' state-dict keys less the last part)."""
    return layer.tensors["weight"].rpartition(".")[0]


def _module_eps(model: torch.nn.Module, key: str) -> float:
    module = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    return float(getattr(module, "eps", 1e-5))


def _check_shapes(mine: _Layer, found: _Layer, j: int) -> None:
    if mine.kind == "prelu":
        same = int(np.prod(mine.shapes["weight"])) == int(np.prod(found.shapes["weight"]))
    elif mine.kind == "bn":
        same = mine.shapes["weight"] == found.shapes["weight"]
    else:
        same = mine.shapes["weight"] == found.shapes["weight"] and all(
            mine.attributes.get(a) == found.attributes.get(a) for a in ("group", "strides", "pads"))
    if not same:
        raise OnnxGraphMismatch(f"its weighted layer {j + 1} ({found.node}) is a {_KINDS[found.kind]} "
                                f"{_shape_of(found)}, the network's {_shape_of(mine)}")


def _shape_of(layer: _Layer) -> str:
    shape = layer.shapes.get("weight", ())
    if layer.kind == "conv":
        out, inp, *kernel = shape
        return (f"{inp}->{out} {'x'.join(map(str, kernel))}" + (f" stride {layer.attributes['strides'][0]}"
                if layer.attributes.get("strides") and layer.attributes["strides"][0] != 1 else "")
                + (f" groups {layer.attributes['group']}" if layer.attributes.get("group", 1) != 1 else ""))
    if layer.kind == "linear":
        return f"{shape[1]}->{shape[0]}"
    return f"of {int(np.prod(shape))}"


def describe_layers(layers: list[_Layer]) -> str:
    """"has 21 convolutions, 12 BatchNorms, 9 PReLUs and 1 fully connected layer (a 64-D output)"."""
    from .models import IRESNET_LAYERS

    counts = {kind: sum(layer.kind == kind for layer in layers) for kind in _KINDS}
    parts = [f"{n} {_KINDS[kind]}{'s' if n != 1 else ''}" for kind, n in counts.items()]
    linear = [layer for layer in layers if layer.kind == "linear"]
    # An iResNet has a stem, two convolutions a block and a projected shortcut a stage.
    iresnet = [name for name, blocks in IRESNET_LAYERS.items() if counts["conv"] == 1 + 2 * sum(blocks) + 4]
    return f"has {', '.join(parts[:-1])} and {parts[-1]}" + (
        f" (a {linear[-1].shapes['weight'][0]}-D output)" if linear else "") + (
        f", as many convolutions as iResNet {iresnet[0]}" if iresnet else "")


def _move_input_scaling(file: _Graph, state: dict, ours: list[_Layer]) -> float:
    """The file's graph takes pixels 0-255 and scales them (a x + b per channel) before its first convolution;
    the network takes u = (x - 127.5) / 127.5, so a x + b = 127.5 a u + (127.5 a + b): exact as a factor of the
    first convolution's weights where 127.5 a + b is 0 (a shift is not: the padding stays 0). -> that factor."""
    scale, shift = file.input_scale, file.input_shift
    if not np.allclose(127.5 * scale + shift, 0, atol=1e-4 * np.abs(127.5 * scale).max()):
        raise OnnxGraphMismatch(f"its input scaling, a x + b with a = {scale.tolist()} and b = {shift.tolist()}, "
                                "is not centred on 127.5 as the network's input (x - 127.5) / 127.5 is")
    first = next(layer for layer in ours if layer.kind == "conv")
    key = first.tensors["weight"]
    factor = torch.from_numpy((127.5 * scale).astype(np.float32))
    state[key] = state[key] * factor.reshape(1, -1, 1, 1)
    return float(127.5 * scale.mean())
