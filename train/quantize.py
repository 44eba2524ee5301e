"""int8 quantization of ``train.export``'s ONNX graphs for CPUs and edge devices: onnxruntime's static
quantization (QDQ format, int8 weights per output channel, uint8 activations) calibrated on aligned faces,
and the int8 graph checked against the fp32 one on other faces before ``train.export`` writes it."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .tools import ORT_DISTRIBUTIONS, count_of, first_line, not_importable

DEFAULT_FACES = 300
# QuantizeLinear's axis, which per-channel weights need, comes with opset 13.
INT8_OPSET = 13
# A working quantization keeps the embeddings' directions (a mean cosine of 0.997 and 0.998 on the trained
# models the README measures); an int8 graph under this is broken (calibrated on faces scaled otherwise, say).
MIN_MEAN_COSINE = 0.9
# The slices a graph whose batch is free is fed (calibrated and checked); one whose batch is fixed is fed its own.
CALIBRATION_BATCH = 32


def require_onnxruntime(flag: str = "--int8", module: str = "onnxruntime.quantization") -> None:
    """ValueError saying what ``flag`` needs installed when onnx or onnxruntime's ``module`` (its quantization,
    or for --fp16 its float16 converter) is missing."""
    missing = ValueError(f"{flag} needs the onnx and onnxruntime packages (the [onnx] extra): pip install onnx "
                         "onnxruntime")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise missing from None
    try:
        importlib.import_module(module)
    except ImportError as error:
        advice = not_importable("onnxruntime", error, ORT_DISTRIBUTIONS)
        if advice.startswith("pip install "):  # (not installed)
            raise missing from None
        raise ValueError(f"{flag} needs onnxruntime: {advice}") from None  # (installed: a build for numpy 1, say)


@dataclass
class Faces:
    """Aligned faces as ``backbone.onnx`` takes them ((N, 3, S, S) float32, (x - 127.5) / 127.5): those that
    calibrate, and those the int8 graph is checked on, which are others where ``spec`` holds others
    (``held_out``), else the calibration faces themselves."""
    spec: str
    total: int
    calibration: np.ndarray
    check: np.ndarray
    held_out: bool


def run_paths(run: dict, folder: str | None) -> dict:
    """``run`` (a training run's options) with its relative ``--data`` and verification-set paths made
    absolute in ``folder``, the folder it ran in, where they are there: read from another folder, they are
    still the run's. Unchanged where the checkpoint records no folder (older ones)."""
    from .data import RANDOM, SYNTHETIC, is_target_path, split_data_spec

    if not folder or os.path.abspath(folder) == os.getcwd():
        return run

    def there(path: str) -> str:
        joined = os.path.join(folder, path)
        return joined if not os.path.isabs(path) and os.path.lexists(joined) else path

    run = dict(run)
    data = run.get("data")
    if isinstance(data, str) and data and data not in (SYNTHETIC, RANDOM):  # (names, not paths)
        try:
            run["data"] = ",".join(there(part) for part in split_data_spec(data))
        except ValueError:  # (checked when the run started: left for read_faces to say)
            pass
    targets = run.get("val_targets")
    if isinstance(targets, list):  # (a set's name is looked for in --data's folders)
        run["val_targets"] = [there(t) if isinstance(t, str) and is_target_path(t) else t for t in targets]
    return run


def read_faces(spec: str, count: int, *, image_size: int, run: dict, flag: str = "--int8") -> Faces:
    """``count`` faces of ``spec`` (what the trainer's ``--data`` takes), drawn at random from the whole set
    (the same ones every time), and up to ``count`` others. ``run``: the options of the run the model comes
    from ({} for none), whose synthetic faces are drawn as it drew them. Raises OSError or ValueError
    naming ``flag``, or an image that cannot be read."""
    from .data import SYNTHETIC, build_train_dataset, resized_note
    from .data.transforms import to_model_input

    seed, sizes = 0, {}
    if spec == SYNTHETIC and run.get("data") == SYNTHETIC:
        seed = run.get("seed", 0)
        sizes = {key: run[key] for key in ("synthetic_identities", "synthetic_images_per_identity") if key in run}
    try:
        dataset, _ = build_train_dataset(spec, image_size=image_size, seed=seed, flip=False, **sizes)
    except (OSError, ValueError) as error:  # its messages are the trainer's, about --data
        message = str(error)
        raise type(error)(f"{flag} " + message[len("--data "):] if message.startswith("--data ") else
                          f"{flag} {spec}: {message}") from None
    for name, part in getattr(dataset, "parts", [(spec, dataset)]):  # (said as the trainer says it of --data)
        resized = resized_note(f"{flag} {name}", part, image_size, "the model's input")
        if resized:
            print(resized, file=sys.stderr)
    total = len(dataset)
    if total == 0:
        raise ValueError(f"{flag} {spec}: no faces in it")
    # At random: a set is stored identity after identity, and its first faces would be a few people's.
    picked = np.random.default_rng(0).choice(total, size=min(total, 2 * count), replace=False)

    def images(indices: np.ndarray) -> np.ndarray:
        return to_model_input(torch.stack([dataset[int(i)][0] for i in indices])).numpy()

    calibration = images(picked[:count])
    others = picked[count:]
    return Faces(spec, total, calibration, images(others) if len(others) else calibration, bool(len(others)))


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantization logs through the root logger (a warning for every BatchNorm's weights it
    leaves per tensor, and the like), which a tool would print: held back while it runs."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def quantize(fp32_path: str, int8_path: str, calibration: np.ndarray, *, only_under: str | None = None) -> None:
    """The fp32 graph at ``fp32_path`` (``train.export``'s: input ``input``) quantized to ``int8_path`` by
    onnxruntime's static quantization, calibrated on ``calibration`` (MinMax ranges) fed in ``slices`` (of the
    graph's batch where it is fixed, which the int8 graph keeps). ``only_under``: only
    the nodes whose names start with it are quantized (the backbone inside ``backbone_normalized.onnx``:
    its mirror and its normalisation stay float, and its outputs of unit length). Its working files go in
    a folder beside ``int8_path``, removed before this returns. Raises ValueError when onnxruntime cannot
    quantize the graph."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, fixed: int | None):
            self.batches = slices(calibration, fixed)

        def get_next(self):
            piece = next(self.batches, None)
            return None if piece is None else {"input": piece[0]}

    # BatchNorm stays float (those that follow no convolution, which the preprocessing cannot fold: an iResNet
    # block's first, the embedding layer's): the CPU has no int8 kernel for it, so quantized it only adds
    # rounding and a dequantize-quantize round trip (r50 at batch 16: 0.97 s against 0.70 s on this project's
    # machine).
    op_types = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - {"BatchNormalization"})
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=os.path.dirname(os.path.abspath(int8_path))) as work, \
            _quiet():
        prepared = os.path.join(work, "prepared.onnx")
        try:
            # Shape inference, and onnxruntime's graph optimisations (each BatchNorm after a convolution folded
            # into it), as onnxruntime's quantization guide has it.
            try:
                quant_pre_process(fp32_path, prepared)
            except OSError:
                raise
            except Exception:
                # Its symbolic shape inference gives up on some graphs (backbone_normalized.onnx at opset 18
                # to 20, whose ReduceL2 takes its axes as an input: "object of type 'NoneType' has no len()"):
                # onnx's own shape inference then.
                quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
            graph = onnx.load(prepared, load_external_data=False).graph
            batch = graph.input[0].type.tensor_type.shape.dim[0]
            fixed = batch.dim_value if batch.HasField("dim_value") and batch.dim_value > 0 else None
            # PReLU stays float, as a PRelu node does (it has no int8 kernel): the int8 graph then gives the
            # embeddings it gave with PRelu nodes (quantized, the decomposition's Mul and Add lowered the
            # agreement; benchmarks/bench_prelu.py).
            excluded = decomposed_prelu_nodes(graph) + ([] if only_under is None else [
                node.name for node in graph.node if not node.name.startswith(only_under)])
            quantize_static(prepared, int8_path, Batches(fixed), quant_format=QuantFormat.QDQ, per_channel=True,
                            # 7-bit weights: 8-bit ones can saturate int16 sums on x86 CPUs without VNNI
                            # (onnxruntime's advice for them; no slower with VNNI)
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=op_types,
                            nodes_to_exclude=excluded)
            onnx.checker.check_model(int8_path)
        except OSError:  # a full disk, a quota: the file system's failure, not the graph's
            raise
        except Exception as error:  # onnxruntime's and onnx's errors share no base class but Exception
            reason = first_line(error)
            raise ValueError(f"onnxruntime cannot quantize the graph to int8: {reason}") from error


def slices(images: np.ndarray, fixed: int | None):
    """``images`` in slices of CALIBRATION_BATCH for a graph whose batch is free, or of ``fixed`` for one whose
    batch is fixed at ``fixed``, each as (slice, how many of its images are its own): the last one filled up to
    ``fixed`` with the first images again (round and round where there are fewer). Repeated, not blank: the
    MinMax calibration takes each value's smallest and largest over the images, which an image seen already
    leaves as they were, where a blank one would add its own (dropping a short last slice would leave faces
    out, and all of them below ``fixed``); a histogram calibration (entropy, percentile) would count a repeated
    image twice. The check's embeddings of the repeats are dropped."""
    size = fixed or CALIBRATION_BATCH
    for start in range(0, len(images), size):
        piece = images[start:start + size]
        count = len(piece)
        if fixed and count < fixed:
            piece = np.concatenate([piece, images[np.arange(fixed - count) % len(images)]])
        yield piece, count


def decomposed_prelu_nodes(graph) -> list[str]:
    """The names of the nodes in which ``train.export`` wrote each PReLU, relu(x) + (-a) * relu(-x): a Relu
    of x and a Mul of a Relu of a Neg of x, added (``export.DecomposedPReLU``). (onnxruntime's quantization
    leaves out nodes by name: one without a name is not found.)"""
    producers = {output: node for node in graph.node for output in node.output}
    names = []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for positive, scaled in (add.input, add.input[::-1]):
            positive, scaled = producers.get(positive), producers.get(scaled)
            if positive is None or scaled is None or positive.op_type != "Relu" or scaled.op_type != "Mul":
                continue
            negative = next((producers[name] for name in scaled.input
                             if name in producers and producers[name].op_type == "Relu"), None)
            negated = producers.get(negative.input[0]) if negative is not None else None
            if negated is not None and negated.op_type == "Neg" and negated.input[0] == positive.input[0]:
                nodes = (positive, negated, negative, scaled, add)
                names += [node.name for node in nodes] if all(node.name for node in nodes) else []
                break
    return names


@dataclass
class Agreement:
    """How an int8 graph's embeddings compare with its fp32 graph's: the cosine of each face's two
    embeddings (mean and minimum, over ``faces`` faces) and, for each verification set, the two graphs'
    results (``train.verification.evaluate``'s), fp32's first."""
    faces: int
    mean: float
    min: float
    targets: dict[str, tuple[dict, dict]] = field(default_factory=dict)


def agreement(fp32_path: str, int8_path: str, faces: np.ndarray) -> Agreement:
    """The cosine of the embeddings the int8 graph at ``int8_path`` and the fp32 one at ``fp32_path`` give
    each of ``faces`` (backbone.onnx's input), fed in ``slices`` (of the graphs' batch where it is fixed)."""
    from .onnx_backbone import fixed_batch, open_session

    embeddings = []
    for path in (fp32_path, int8_path):
        session = open_session(path)
        embeddings.append(np.concatenate([session.run(None, {"input": piece})[0][:count] for piece, count
                                          in slices(faces, fixed_batch(session))]).astype(np.float64))
    expected, got = embeddings
    cosine = (expected * got).sum(axis=1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
    return Agreement(len(faces), float(np.mean(cosine)), float(np.min(cosine)))


def compare(fp32_path: str, int8_path: str, faces: np.ndarray, sets: dict | None = None) -> Agreement:
    """``agreement``, and the two graphs' results on the verification ``sets`` (name: VerificationSet).
    Raises ValueError when the embeddings' mean cosine is under MIN_MEAN_COSINE (before the sets are
    verified)."""
    from .onnx_backbone import OnnxBackbone, fixed_batch, open_session
    from .verification import evaluate

    result = agreement(fp32_path, int8_path, faces)
    if not result.mean >= MIN_MEAN_COSINE:  # (NaN too: an embedding of zeros)
        raise ValueError(f"the int8 graph does not agree with the fp32 one: {describe(result)}, under "
                         f"{MIN_MEAN_COSINE}")
    if sets:
        fp32, int8 = (OnnxBackbone(session, raw_pixels=False, batch=fixed_batch(session))
                      for session in map(open_session, (fp32_path, int8_path)))
        for name, vset in sets.items():
            result.targets[name] = (evaluate(fp32, vset, device="cpu"), evaluate(int8, vset, device="cpu"))
    return result


def describe(agreement: Agreement) -> str:
    return (f"their embeddings' cosine {agreement.mean:.4f} on the mean, {agreement.min:.4f} at the least, over "
            f"{count_of(agreement.faces, 'face')}")


def verification_sets(targets: list[str], spec: str, image_size: int, *, seed: int, skip_missing: bool) -> dict:
    """The verification sets of ``targets`` (as ``train.verify``'s ``--targets``: names looked for in
    ``spec``'s folder, paths), a note for each one skipped; with ``skip_missing`` (the run's own sets, on
    another machine than the run's), a path that is not here is skipped with a note too."""
    from .data import build_verification_sets, data_folders, find_target

    if skip_missing:
        kept = []
        for target in targets:
            try:
                find_target(data_folders(spec), target)
                kept.append(target)
            except FileNotFoundError:
                print(f"note: the run's verification set {target} is not here: not measured", file=sys.stderr)
        targets = kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sets = build_verification_sets(spec, targets, image_size=image_size, seed=seed, flag="--int8-targets")
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    return sets
