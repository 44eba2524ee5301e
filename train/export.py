"""``python -m train.export``: the backbone alone, for inference: a state dict (``backbone.pt``
plus its settings in ``backbone.json``) and an ONNX graph (``backbone.onnx``, compared with
PyTorch through onnxruntime when that is installed)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from . import checkpoint


def export_onnx(model: torch.nn.Module, path: str, image_size: int, opset: int = 17) -> None:
    """Trace ``model`` (eval mode, fp32) to ONNX with a dynamic batch dimension.

    Needs the ``onnx`` package (the exporter builds the graph with it)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx package: pip install onnx (and onnxruntime to check "
                           "the result)") from None
    model = model.eval()
    dummy = torch.zeros(1, 3, image_size, image_size)
    kwargs = dict(input_names=["input"], output_names=["embedding"], opset_version=opset,
                  dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but needs no onnxscript; it is what this uses.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(model, (dummy,), path, dynamo=False, **kwargs)
        except TypeError:  # a torch without the legacy exporter: the torch.export-based one
            torch.onnx.export(model, (dummy,), path, dynamic_shapes=({0: torch.export.Dim("batch")},),
                              input_names=["input"], output_names=["embedding"], opset_version=opset)


def check_onnx(model: torch.nn.Module, path: str, image_size: int, batch: int = 3) -> float | None:
    """Max abs difference between onnxruntime's and PyTorch's embeddings of a random batch
    (None when onnxruntime is not installed). Raises AssertionError past 1e-4 relative."""
    import onnx

    onnx.checker.check_model(onnx.load(path))
    try:
        import onnxruntime
    except ImportError:
        return None
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"input": x.numpy()})[0]
    error = float(abs(got - expected).max())
    scale = float(abs(expected).max())
    if not error <= 1e-4 * max(scale, 1.0):
        raise AssertionError(f"onnxruntime differs from PyTorch by {error:.3g} (embedding scale {scale:.3g})")
    return error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint (runs/<network>/checkpoint.pt) or a backbone state dict")
    p.add_argument("--output", default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument("--network", default=None, help="only for bare state dicts whose layout cannot be guessed")
    p.add_argument("--embedding-size", "--embedding_size", dest="embedding_size", type=int, default=None)
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="also write backbone.onnx")
    args = p.parse_args(argv)

    try:
        model, settings = checkpoint.load_backbone(args.checkpoint, network=args.network,
                                                   embedding_size=args.embedding_size, image_size=args.image_size)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = args.output or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(output, exist_ok=True)
    state_path = os.path.join(output, "backbone.pt")
    checkpoint.save_atomic(model.state_dict(), state_path)
    checkpoint.write_json_atomic(os.path.join(output, "backbone.json"), settings)
    print(f"wrote {state_path} ({settings['network']}, {settings['embedding_size']}-D, {settings['image_size']}px)")
    if not args.onnx:
        return 0
    onnx_path = os.path.join(output, "backbone.onnx")
    try:
        export_onnx(model, onnx_path, settings["image_size"], args.opset)
    except RuntimeError as error:
        print(f"skipped ONNX: {error}", file=sys.stderr)
        return 0
    error = check_onnx(model, onnx_path, settings["image_size"])
    checked = ("not compared with PyTorch (pip install onnxruntime to check it)" if error is None
               else f"onnxruntime matches PyTorch (max abs difference {error:.2e})")
    print(f"wrote {onnx_path}: {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
