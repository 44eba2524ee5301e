"""``python -m train.export``: the backbone alone, for inference: a state dict (``backbone.pt``
plus its settings in ``backbone.json``) and an ONNX graph (``backbone.onnx``, compared with
PyTorch through onnxruntime when that is installed, before anything is written); with
``--normalized-onnx`` also ``backbone_normalized.onnx``, whose output is the embedding verification
compares (image plus mirror, L2-normalised), so that ``backbone.json``'s threshold applies to it as it is."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch

from . import checkpoint
from .signals import Stopped, signals_held, stop_on_signals

try:  # the opsets that torch's TorchScript-based exporter writes (7 to 20 in torch 2.13)
    from torch.onnx._constants import ONNX_MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    OPSETS = range(ONNX_MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET + 1)
except ImportError:  # a private module: without it the exporter's own error tells
    OPSETS = None


# The files an export writes into its folder (the trainer sets them aside with a run's own).
STATE_NAME, SETTINGS_NAME, ONNX_NAME = "backbone.pt", "backbone.json", "backbone.onnx"
NORMALIZED_ONNX_NAME = "backbone_normalized.onnx"
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
        return torch.nn.functional.normalize(both[:count] + both[count:], dim=1)


class OnnxNotInstalled(ImportError):
    """The optional ``onnx`` package is missing: the ONNX step is skipped, not failed."""


def export_onnx(model: torch.nn.Module, path: str, image_size: int, opset: int = 17) -> None:
    """``model`` (eval mode, fp32) traced to an ONNX graph with a dynamic batch dimension, written to
    ``path`` (a file, not memory: past protobuf's 2 GB, ViT-H's size, the weights go to external data
    files beside it).

    Raises OnnxNotInstalled without the ``onnx`` package (the exporter builds the graph with it),
    ValueError when the exporter fails."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise OnnxNotInstalled("ONNX export needs the onnx package: pip install onnx (and onnxruntime to check "
                               "the result)") from None
    model = model.eval()
    dummy = torch.zeros(1, 3, image_size, image_size)
    kwargs = dict(input_names=["input"], output_names=["embedding"], opset_version=opset)
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but needs no onnxscript; it is what this uses.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            try:
                torch.onnx.export(model, (dummy,), path, dynamo=False,
                                  dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, **kwargs)
            except TypeError:  # a torch without the legacy exporter: the torch.export-based one
                torch.onnx.export(model, (dummy,), path, dynamic_shapes=({0: torch.export.Dim("batch")},), **kwargs)
        except Exception as error:  # the exporter fails in many ways (unsupported ops, tracing, size)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"the ONNX exporter failed (opset {opset}): {reason}") from error


def check_onnx(model: torch.nn.Module, path: str, image_size: int, batch: int = 3) -> float | None:
    """Max abs difference between onnxruntime's and PyTorch's embeddings of a random batch for the
    ONNX graph at ``path`` (None when onnxruntime is not installed), after onnx's own checker.
    Raises ValueError when the graph is invalid, does not run, or differs past 1e-4 relative."""
    import onnx

    try:
        onnx.checker.check_model(path)  # (a path: the checker then also takes graphs past 2 GB)
    except onnx.checker.ValidationError as error:
        raise ValueError(f"the exported ONNX graph is not valid: {str(error).strip().splitlines()[0]}") from error
    try:
        import onnxruntime
    except ImportError:
        return None
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(["embedding"], {"input": x.numpy()})[0]
    except Exception as error:  # onnxruntime's errors have no common base but Exception
        raise ValueError(f"onnxruntime cannot run the exported graph: {str(error).strip().splitlines()[0]}") from error
    error = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    if not error <= 1e-4 * max(scale, 1.0):
        raise ValueError(f"onnxruntime's embeddings differ from PyTorch's by {error:.3g} (embedding scale "
                         f"{scale:.3g})")
    return error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint (runs/<network>/checkpoint.pt) or a backbone state dict")
    p.add_argument("--output", default=None,
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
    args = p.parse_args(argv)
    if args.normalized_onnx and not args.onnx:
        p.error("--normalized-onnx with --no-onnx: give one")
    if args.opset is not None and not args.onnx:  # (was taken without a word)
        p.error("--opset goes with the ONNX graph, which --no-onnx does not write")
    args.opset = 17 if args.opset is None else args.opset
    for flag, value in (("--embedding-size", args.embedding_size), ("--image-size", args.image_size)):
        if value is not None and value < 1:  # (a negative size was a traceback from torch)
            p.error(f"{flag} must be at least 1, got {value}")
    if args.onnx and OPSETS is not None and args.opset not in OPSETS:
        p.error(f"--opset {args.opset}: torch's ONNX exporter writes opsets {OPSETS.start} to {OPSETS.stop - 1}")
    if args.normalized_onnx and args.opset < FLIP_OPSET:
        p.error(f"--normalized-onnx needs --opset {FLIP_OPSET} or later (its mirror image is ONNX's Slice with a "
                f"negative step, from opset {FLIP_OPSET}), got {args.opset}")
    try:
        # Ctrl-C and SIGTERM unwind: the private folder goes, and the output folder is as it was, or
        # (when they come while the files move into place) holds the whole export.
        with stop_on_signals():
            return _export(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"stopped by {stop.name}" + (" as the files moved into place: the export is whole"
                                           if stop.after_writing else ": nothing written"), file=sys.stderr)
        return stop.exit_status


def _export(args: argparse.Namespace) -> int:
    """``main`` after parsing; raises OSError or ValueError naming what is at fault (before anything
    is written in the output folder)."""
    output = args.output or os.path.dirname(os.path.abspath(args.checkpoint))
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output} is a file, not a folder to export into")
    names = [STATE_NAME, SETTINGS_NAME] + ([ONNX_NAME] if args.onnx else []) + (
        [NORMALIZED_ONNX_NAME] if args.normalized_onnx else [])
    for name in names:
        if os.path.isdir(os.path.join(output, name)):
            raise ValueError(f"{os.path.join(output, name)} is a folder: the export writes a file of that name")
    model, settings = checkpoint.load_backbone(args.checkpoint, network=args.network,
                                               embedding_size=args.embedding_size, image_size=args.image_size)
    made = not os.path.lexists(output)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as error:  # (was "[Errno 13] Permission denied: 'ro/sub'", naming no option)
        raise ValueError(f"--output {output}: cannot make the folder: {error.strerror or error}") from None
    state_path, onnx_path = os.path.join(output, STATE_NAME), os.path.join(output, ONNX_NAME)
    normalized_path = os.path.join(output, NORMALIZED_ONNX_NAME)

    # Every file is made (and the graphs checked) in a private folder first; a failure or a stop leaves
    # the output folder as it was.
    try:
        staging = tempfile.mkdtemp(prefix=".backbone-export-", dir=output)
    except PermissionError:
        raise ValueError(f"cannot write in --output {output} (read-only, or not yours)") from None
    try:
        graph, skipped, difference = None, None, None
        if args.onnx:
            graph = os.path.join(staging, ONNX_NAME)
            try:
                export_onnx(model, graph, settings["image_size"], args.opset)
                difference = check_onnx(model, graph, settings["image_size"])
                if args.normalized_onnx:
                    deployed = FlipNormalized(model).eval()
                    export_onnx(deployed, os.path.join(staging, NORMALIZED_ONNX_NAME), settings["image_size"],
                                args.opset)
                    check_onnx(deployed, os.path.join(staging, NORMALIZED_ONNX_NAME), settings["image_size"])
            except OnnxNotInstalled as error:
                graph, skipped = None, str(error)
                for name in os.listdir(staging):
                    os.remove(os.path.join(staging, name))
            except ValueError as error:
                print(f"error: {error}; nothing written (--no-onnx exports the state dict alone)", file=sys.stderr)
                return 1
        checkpoint.save_atomic(model.state_dict(), os.path.join(staging, STATE_NAME))
        checkpoint.write_json_atomic(os.path.join(staging, SETTINGS_NAME), settings)

        # Graphs of an earlier export that this one does not write would pass for this one's.
        stale = [path for path in ([onnx_path] if graph is None else []) + (
            [] if args.normalized_onnx and graph is not None else [normalized_path]) if os.path.exists(path)]
        with signals_held():  # all the files move, and the stale ones go, or nothing changes
            # The state dict last: a reader that takes backbone.pt for the sign of a finished export finds
            # the graphs and settings in place.
            for name in sorted(os.listdir(staging), key=lambda name: name == STATE_NAME):
                os.replace(os.path.join(staging, name), os.path.join(output, name))
            for path in stale:
                os.remove(path)
        print(f"wrote {state_path} ({settings['network']}, {settings['embedding_size']}-D, "
              f"{settings['image_size']}px)")
        for path in stale:
            print(f"removed {path}: it was from an earlier export and does not match the new backbone.pt",
                  file=sys.stderr)
        if graph is None:
            if skipped:
                print(f"skipped ONNX: {skipped}", file=sys.stderr)
            return 0
        checked = ("not compared with PyTorch (pip install onnxruntime to check it)" if difference is None
                   else f"onnxruntime matches PyTorch (max abs difference {difference:.2e})")
        print(f"wrote {onnx_path}: {checked}")
        if args.normalized_onnx:
            print(f"wrote {normalized_path}: image + mirror, L2-normalised (the embedding verification compares)")
        return 0
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made:  # the folder this run made, left empty by a failure or a stop
            with contextlib.suppress(OSError):
                os.rmdir(output)


if __name__ == "__main__":
    sys.exit(main())
