"""Runs the CUDA op's kernels on the CPU (see runtime.h and build.py).

With ARCFACE_EXT_EMULATE_CUDA=1, conftest.py calls install() before collection: the ops
arcface_ext::margin_softmax_forward / margin_softmax_backward then run the CUDA source, host code
and kernels, on CPU tensors, and tests/test_cuda.py runs on DEVICE = "cpu":

    ARCFACE_EXT_EMULATE_CUDA=1 python -m pytest tests/test_cuda.py

The one-call training op has no CUDA kernel, so install() also takes it off the CPU's list, as on
a GPU. suspended() brings the real CPU kernels back for a comparison with the CPU op.
"""
import contextlib
import os
import warnings

import torch

EMULATED = os.environ.get("ARCFACE_EXT_EMULATE_CUDA", "0") not in ("", "0")
_OPS = ("margin_softmax_forward", "margin_softmax_backward", "margin_softmax_forward_kept",
        "margin_softmax_backward_kept", "reduce_loss", "reduce_loss_backward", "wgmma_tile_probe",
        "wgmma_weight_tile_probe")
_state = {"library": None, "train_devices": None, "checked_devices": None}


def load():
    """torch.ops.arcface_ext_emulated: the CUDA op's entry points compiled for the emulator."""
    from . import build

    return build.load()


def install():
    """Routes the CPU kernels of the forward and backward ops to the emulated CUDA code, and fills
    every uninitialised tensor (at::empty, the host code's workspaces and outputs included) with NaN
    (the largest integer for integer tensors), so that a kernel reading memory nothing wrote, or
    leaving part of an output unwritten, shows in the results: compute-sanitizer's initcheck.
    CPU tensors then also skip the labels' check when told to (check_labels=False), as CUDA ones do."""
    import arcface_ext._checks
    import arcface_ext.ops

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True

    emulated = load()
    if _state["library"] is None:
        library = torch.library.Library("arcface_ext", "IMPL")
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": the point
            warnings.simplefilter("ignore", UserWarning)
            for name in _OPS:
                library.impl(name, getattr(emulated, name), "CPU")
        _state["library"] = library
        _state["train_devices"] = arcface_ext.ops.TRAIN_DEVICES
        arcface_ext.ops.TRAIN_DEVICES = frozenset()
        _state["checked_devices"] = arcface_ext._checks.ALWAYS_CHECKED_DEVICES
        arcface_ext._checks.ALWAYS_CHECKED_DEVICES = frozenset()


def uninstall():
    import arcface_ext._checks
    import arcface_ext.ops

    if _state["library"] is not None:
        _state["library"]._destroy()
        _state["library"] = None
        arcface_ext.ops.TRAIN_DEVICES = _state["train_devices"]
        arcface_ext._checks.ALWAYS_CHECKED_DEVICES = _state["checked_devices"]


@contextlib.contextmanager
def suspended():
    """The real CPU kernels inside the block (a no-op when nothing is installed)."""
    installed = _state["library"] is not None
    if installed:
        uninstall()
    try:
        yield
    finally:
        if installed:
            install()


def take_launch_log():
    """The kernels launched since the last call, in order."""
    return load().take_launch_log().split()
