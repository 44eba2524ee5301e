"""A face-recognition backbone in an ONNX file, run by onnxruntime behind the module interface that
``train.embed`` and ``train.ijb`` embed with: insightface's released models (``w600k_r50.onnx``,
``glintr100.onnx``, ...), or ``train.export``'s ``backbone.onnx``.

The model takes one (N, 3, S, S) RGB batch and gives (N, D) embeddings. Its input scale is told by
its graph, as insightface's ``ArcFaceONNX`` tells it: a graph that starts by subtracting a constant
and multiplying (the models converted from MXNet) is fed pixels 0-255; any other (PyTorch's exports,
this trainer's) is fed (x - 127.5) / 127.5.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch

from .tools import first_line

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
DEFAULT_IMAGE_SIZE = 112


def is_onnx_file(path: str) -> bool:
    """Whether ``--model PATH`` names an ONNX model: its name ends in ``.onnx``, or the file starts as
    ONNX files do (the ``ir_version`` field, tag 0x08) rather than as torch's files (a zip archive,
    or a pickle for the legacy format)."""
    if path.lower().endswith(".onnx"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x08 and head[1] < 0x80


class OnnxBackbone(torch.nn.Module):
    """forward(x): (N, D) float32 embeddings, on x's device, of (N, 3, S, S) images scaled as
    (x - 127.5) / 127.5 (what ``to_model_input`` makes). A graph whose batch size is fixed (1, say)
    is run on slices of that size, the last one padded (``batch_size_for`` gives a caller batches that fill
    them)."""

    def __init__(self, session, *, raw_pixels: bool, batch: int | None):
        super().__init__()
        self.session, self.raw_pixels, self.batch = session, raw_pixels, batch
        self.input = session.get_inputs()[0]
        self.output_name = session.get_outputs()[0].name
        self.dtype = _DTYPES[self.input.type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.raw_pixels:
            x = x * 127.5 + 127.5
        array = x.detach().float().cpu().numpy().astype(self.dtype, copy=False)
        if self.batch is None:
            out = self._run(array)
        else:
            pieces = []
            for start in range(0, array.shape[0], self.batch):
                piece = array[start:start + self.batch]
                count = piece.shape[0]
                if count < self.batch:
                    piece = np.concatenate([piece, np.zeros((self.batch - count, *piece.shape[1:]), piece.dtype)])
                pieces.append(self._run(piece)[:count])
            out = np.concatenate(pieces)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)

    def _run(self, array: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input.name: array})[0]


def fixed_batch(session) -> int | None:
    """The batch size that the graph of onnxruntime's ``session`` fixes for its (first) input, None where it
    is free."""
    size = session.get_inputs()[0].shape[0]
    return size if isinstance(size, int) and size > 0 else None


def batch_size_for(backbone: torch.nn.Module, batch_size: int, inputs_per_image: int = 1) -> int:
    """The batch size, at most ``batch_size`` unless that is less than one run, whose images
    (``inputs_per_image`` inputs each: 2 with the mirror) fill whole runs of ``backbone``'s graph where its
    batch is fixed: a batch of 64 fed to a graph of 48 ran 2 x 48, a third of it padding, on each batch, not
    on the last alone. ``batch_size`` itself for any other backbone."""
    fixed = backbone.batch if isinstance(backbone, OnnxBackbone) else None
    if not fixed:
        return batch_size
    step = fixed // math.gcd(fixed, inputs_per_image)  # (the fewest images that fill whole runs)
    return max(step, batch_size // step * step)


def feeds_raw_pixels(path: str, input_name: str) -> bool:
    """Whether the graph at ``path`` normalises its own input, so that it is fed pixels 0-255: the
    input (through Cast and Identity nodes, beside Shape nodes reading its size) goes into a Sub whose
    result (likewise) goes into a Mul or Div, as MXNet's ``_minusscalar`` and ``_mulscalar``; or,
    insightface's own test, a node named Sub/_minus and one named Mul/_mul among the first 8. False
    without the onnx package to read the graph with (a note says so)."""
    try:
        import onnx
    except ImportError:
        print(f"note: {path}: without the onnx package its graph cannot be read; it is fed (x - 127.5) / 127.5",
              file=sys.stderr)
        return False
    graph = onnx.load(path, load_external_data=False).graph
    names = [node.name for node in graph.node[:8]]
    if any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names):
        return True
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def next_op(value: str):
        """The node that computes on ``value``, through casts and copies; None when not one."""
        while True:
            nodes = [n for n in readers.get(value, []) if n.op_type != "Shape"]
            if len(nodes) != 1:
                return None
            if nodes[0].op_type not in ("Cast", "Identity"):
                return nodes[0]
            value = nodes[0].output[0]

    first = next_op(input_name)
    if first is None or first.op_type != "Sub":
        return False
    second = next_op(first.output[0])
    return second is not None and second.op_type in ("Mul", "Div")


def open_session(path: str, device: torch.device | str = "cpu"):
    """An onnxruntime session of the graph at ``path``, on ``device``'s GPU when it is CUDA's and this
    onnxruntime has a CUDA provider, else on the CPU (a note where ``device`` is not the CPU). Raises
    FileNotFoundError, or ValueError naming the file when onnxruntime is missing or cannot load it."""
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a folder, not a model file")
    if not os.path.isfile(path):
        from .checkpoint import dangling

        raise FileNotFoundError(f"no model at {path}{dangling(path)}")
    try:
        import onnxruntime
    except ImportError as error:
        from .tools import ORT_DISTRIBUTIONS, not_importable

        advice = not_importable("onnxruntime", error, ORT_DISTRIBUTIONS)
        raise ValueError(f"{path}: an ONNX model runs on onnxruntime: {advice} (onnxruntime-gpu for CUDA)") from None
    device = torch.device(device)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        else:
            print(f"note: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu): {path} runs on the CPU",
                  file=sys.stderr)
    elif device.type != "cpu":  # mps, xpu: onnxruntime's providers for them (CoreML, OpenVINO) are not used here
        print(f"note: {path} runs on the CPU: onnxruntime is given the CPU or CUDA only here (what PyTorch computes "
              f"runs on {device})", file=sys.stderr)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # its errors come back as exceptions, which the messages here give
    try:
        session = onnxruntime.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime's errors share no base class but Exception
        raise ValueError(f"{path}: onnxruntime cannot load it: {first_line(error)}") from None
    return session


def load_onnx_backbone(path: str, device: torch.device | str = "cpu") -> tuple[OnnxBackbone, dict]:
    """(the model, settings: network "onnx", embedding_size, image_size, and the ``threshold`` of
    ``train.export``'s ``backbone.json`` beside it when there is one). Raises FileNotFoundError,
    or ValueError naming the file when onnxruntime is missing or the graph is not one image batch in
    and (N, D) embeddings out."""
    session = open_session(path, device)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"{path}: the graph takes {len(inputs)} inputs, not one image batch")
    shape, kind = inputs[0].shape, inputs[0].type
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"{path}: the graph's input {inputs[0].name} is {shape}, not (N, 3, H, W) images")
    if kind not in _DTYPES:
        raise ValueError(f"{path}: the graph's input is {kind}, not float or float16")
    height, width = shape[2], shape[3]
    if isinstance(height, int) and isinstance(width, int):
        if height != width:
            raise ValueError(f"{path}: the graph's input is {height}x{width}; the faces here are square")
        image_size = height
    elif isinstance(height, int) or isinstance(width, int):
        image_size = height if isinstance(height, int) else width
    else:
        image_size = DEFAULT_IMAGE_SIZE
        print(f"note: {path}: the graph's input size is not fixed; faces are fed at {image_size}px", file=sys.stderr)
    batch = fixed_batch(session)

    model = OnnxBackbone(session, raw_pixels=feeds_raw_pixels(path, inputs[0].name), batch=batch)
    probe, failure = _probe(model, image_size)
    if failure and batch is None:
        # A graph whose batch dimension is free but which reshapes to a batch of 1 inside (a fixed
        # Reshape from its export) runs one image at a time.
        model.batch = 1
        probe, failure_of_one = _probe(model, image_size)
        if failure_of_one:
            model.batch = None
        else:
            print(f"note: {path} runs on one image at a time (its graph fails on a batch of 2)", file=sys.stderr)
    if probe is None:
        raise ValueError(f"{path}: {failure}")
    dimension = int(probe.shape[1])
    outputs = session.get_outputs()
    print(f"note: {path}: fed " + ("pixels 0-255 (its graph scales its input)" if model.raw_pixels else
                                   "(x - 127.5) / 127.5") + f", {image_size}px; its output {outputs[0].name} is "
          f"the {dimension}-D embedding" + (f" (of {len(outputs)} outputs)" if len(outputs) > 1 else ""),
          file=sys.stderr)
    if len(outputs) > 1 or dimension < 64:
        print(f"warning: {path}: " + (f"{len(outputs)} outputs" if len(outputs) > 1 else f"{dimension}-D outputs")
              + ": is it a recognition model? (insightface's are one 512-D output; its model packs also hold "
              "detection, landmark and gender/age models)", file=sys.stderr)
    settings = {"network": "onnx", "embedding_size": dimension, "image_size": int(image_size)}
    # Outputs of unit length (a graph that normalises, as train.export's backbone_normalized.onnx does)
    # have no feature norm to tell: a tool asked for norms says so rather than printing 1s. To 1e-3, as
    # ijb.unit_length takes a table's: a float16 output's length is 1 to float16's rounding (~1e-4), as
    # train.export --fp16 --fp16-io --normalized-onnx's backbone_normalized_fp16.onnx gives it.
    if torch.allclose(probe.float().norm(dim=1), torch.ones(2), atol=1e-3):
        settings["unit_length"] = True
    from .checkpoint import read_settings, settings_path

    sidecar = settings_path(path)  # train.export's backbone.json
    if os.path.exists(sidecar):
        recorded = read_settings(sidecar)
        if recorded.get("threshold") is not None:
            settings["threshold"] = recorded["threshold"]
        if "verification_cut_short" in recorded:  # (train.checkpoint.cut_short_note)
            settings["verification_cut_short"] = recorded["verification_cut_short"]
    return model.eval(), settings


def _probe(model: OnnxBackbone, image_size: int) -> tuple[torch.Tensor | None, str]:
    """(model's output for 2 black images, "") when it is (2, D) embeddings, else (None, why not)."""
    try:
        probe = model(torch.zeros(2, 3, image_size, image_size))
    except Exception as error:  # onnxruntime's errors share no base class but Exception
        return None, f"onnxruntime cannot run it on {image_size}px images: {first_line(error)}"
    if probe.ndim != 2 or probe.shape[0] != 2:
        return None, (f"the graph gives {tuple(probe.shape)} for 2 images, not (N, D) embeddings (a recognition "
                      "model's output)")
    return probe, ""


