"""The public function of arcface_ext: the fused combined-margin softmax cross-entropy."""
from __future__ import annotations

import warnings
from typing import Literal, overload

import torch
from torch import Tensor

from . import chunked, ops
from ._checks import (check_arguments, check_flag, check_row_margins_finite, fused_compute_dtype, nan_at_ignored,
                      raise_bad_label, scalar_margin, skips_label_check, stack_row_margins)

# 128 MiB: on the H200 (session 8's sweep, benchmarks/NOTES.md) twice 64 MiB's chunk width took a
# forward + backward at C = 1M from 12.3 to 11.2 ms and at C = 100k from 2.2 to 1.8 ms. The peak
# extra memory at C = 1M, 67 MB measured with 64 MiB, grows by the workspace: about 135 MB, half the
# 256 MiB goal (test_cuda.py checks it on a GPU).
_DEFAULT_WORKSPACE_BYTES = 128 * 1024 * 1024
_workspace_bytes = _DEFAULT_WORKSPACE_BYTES


def set_workspace_bytes(num_bytes: int | None = None) -> None:
    """Bounds the kernels' scratch memory (default 128 MiB; None restores it). The block of
    classes walked at a time shrinks to fit; it never grows to the N x C matrix."""
    global _workspace_bytes
    if num_bytes is None:
        num_bytes = _DEFAULT_WORKSPACE_BYTES
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or not 0 < num_bytes < 2**63:
        raise ValueError(f"num_bytes must be a positive int (int64), got {num_bytes!r}")
    _workspace_bytes = num_bytes


def get_workspace_bytes() -> int:
    return _workspace_bytes


def extension_available() -> bool:
    """Whether the compiled kernels (arcface_ext._C) could be loaded."""
    return ops.IMPORT_ERROR is None


def require_extension() -> None:
    """Raises, saying how to build them, when the compiled kernels could not be loaded."""
    if ops.IMPORT_ERROR is not None:
        raise RuntimeError(
            "arcface_ext's compiled kernels are not available (importing arcface_ext._C failed: "
            f"{ops.IMPORT_ERROR}). Build them with `pip install --no-build-isolation -e .` from the "
            "repository root, or use arcface_ext.reference.combined_margin_loss explicitly.")


# The loss, or (loss, target cosine) with return_target_cosine=True (overloads for type checkers).
@overload
def combined_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, s: float = ..., m1: float = ...,
                         m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ..., reduction: str = ...,
                         margin_grad: str = ..., ignore_index: int = ..., return_target_cosine: Literal[False] = ...,
                         check_labels: bool = ...) -> Tensor: ...
@overload
def combined_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, s: float = ..., m1: float = ...,
                         m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ..., reduction: str = ...,
                         margin_grad: str = ..., ignore_index: int = ..., return_target_cosine: Literal[True],
                         check_labels: bool = ...) -> tuple[Tensor, Tensor]: ...
@overload
def combined_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, s: float = ..., m1: float = ...,
                         m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ..., reduction: str = ...,
                         margin_grad: str = ..., ignore_index: int = ..., return_target_cosine: bool,
                         check_labels: bool = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def combined_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, s: float = 64.0, m1: float = 1.0,
                         m2: float | Tensor = 0.5, m3: float | Tensor = 0.0, lambda_: float = 0.0,
                         reduction: str = "mean", margin_grad: str = "exact", ignore_index: int = -1,
                         return_target_cosine: bool = False,
                         check_labels: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    r"""Softmax cross-entropy with the combined angular/cosine margin, fused: the N x C logits are
    never stored.

    For row i with label y: :math:`\hat x = x / \max(\|x\|, \epsilon)`,
    :math:`\hat w_j = w_j / \max(\|w_j\|, \epsilon)`, :math:`c_j = \mathrm{clamp}(\hat x \cdot \hat w_j, -1, 1)`,
    :math:`\theta = \arccos c_y`; the target logit is :math:`s(\psi(\theta) - m_3)` with
    :math:`\psi = \cos(m_1\theta + m_2)` (made monotone past :math:`\pi`; blended with
    :math:`c_y` by ``lambda_`` for SphereFace), every other logit :math:`s\,c_j`.
    ArcFace is (m1, m2, m3) = (1, 0.5, 0), CosFace (1, 0, 0.35), SphereFace (4, 0, 0).

    Args:
        embeddings: (N, D) float tensor (fp32, fp64, fp16 or bf16; 16-bit inputs accumulate in fp32).
            The two inputs are brought to their common dtype; under ``torch.autocast`` (for their
            device) to the autocast dtype instead, as for any matrix product, fp64 excepted.
        weight: (C, D) class centres, class-major as in insightface.
        labels: (N,) integer class indices in [0, C), or ``ignore_index`` for rows that do not count.
        s: the scale (> 0). m1, m2, m3: the margins. lambda_: SphereFace's blend (>= 0).
            ``m2`` and ``m3`` may also be (N,) tensors, one margin per row (AdaFace's, ElasticFace's
            and MagFace's per-sample margins); they get gradients when they require them (MagFace's
            margin is a function of the embedding's norm). A negative ``m2`` that takes θ + m2 below
            0 holds ψ at 1 there (AdaFace clips θ + m2 the same way).
        reduction: ``"mean"`` (over counted rows; 0 when none count), ``"sum"`` or ``"none"`` ((N,), 0 at ignored rows).
        margin_grad: ``"exact"`` (true dψ/dc, finite everywhere) or ``"straight_through"``
            (dψ/dc := 1, the behaviour of today's insightface loss).
        return_target_cosine: also return the clamped target cosine of each row (N,), detached,
            NaN at ignored rows; it comes out of the same pass at no extra cost.
        check_labels: check that every label is in [0, C) or ``ignore_index`` (and that per-row
            margins are finite), raising ``ValueError`` before the loss is computed. On a GPU the
            check reads its answer back, one device synchronisation a call; ``False`` skips it, for
            labels known to be good (a training loop that checked its dataset): a row with a bad
            label then gets a NaN loss (so a mean loss is NaN) and no gradient, and a non-finite
            margin a NaN loss and gradient, never a memory error. CPU tensors are checked either
            way: there the check costs no synchronisation.

    Returns:
        The loss (fp32, or fp64 for fp64 inputs), or ``(loss, target_cosine)``.

    The compiled op has CPU and CUDA kernels. On another device type (Apple's ``mps``, Intel's ``xpu``)
    the same loss runs in plain PyTorch, with a ``UserWarning`` the first time: the chunked path
    (:func:`arcface_ext.chunked.chunked_margin_loss`, memory bounded by its class chunks), per-row margins
    included.
    """
    check_arguments(embeddings, weight, labels, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_,
                    reduction=reduction, margin_grad=margin_grad, ignore_index=ignore_index)
    check_labels = check_flag("check_labels", check_labels)
    return_target_cosine = check_flag("return_target_cosine", return_target_cosine)
    require_extension()
    device_type = embeddings.device.type
    if device_type not in ops.OP_DEVICES:
        return _without_kernel(embeddings, weight, labels, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_,
                               reduction=reduction, margin_grad=margin_grad, ignore_index=ignore_index,
                               return_target_cosine=return_target_cosine, check_labels=check_labels)
    dtype = fused_compute_dtype(embeddings, weight)
    needs_embeddings_grad = torch.is_grad_enabled() and embeddings.requires_grad
    needs_weight_grad = torch.is_grad_enabled() and weight.requires_grad
    labels = labels.long()
    # (Tensor.to costs a dispatch even when it returns its tensor: a few µs of a step's host time.)
    x = embeddings if embeddings.dtype == dtype else embeddings.to(dtype)
    w = weight if weight.dtype == dtype else weight.to(dtype)
    margins = stack_row_margins(m2, m3, embeddings)
    scalars = (float(s), float(m1), scalar_margin(m2), scalar_margin(m3), float(lambda_), int(ignore_index),
               margin_grad == "straight_through", _workspace_bytes)
    # The one-call training op returns no per-row losses, which the margins' own gradient needs.
    differentiable_margins = margins is not None and margins.requires_grad and torch.is_grad_enabled()
    # The training op stores its gradients in the inputs' dtype before the backward scales them: in
    # fp16, a loss scaler's factor would come too late for the entries already rounded to zero.
    if (reduction != "none" and (needs_embeddings_grad or needs_weight_grad) and not differentiable_margins
            and dtype != torch.float16 and device_type in ops.TRAIN_DEVICES):
        # A training step: the gradients come out of the forward's own pass (the backward
        # only scales them), which saves recomputing the cosines.
        loss, target_cosine, _, _ = ops.margin_softmax_train(
            x, w, labels, *scalars, reduction == "mean", needs_embeddings_grad, needs_weight_grad, margins)
    else:
        loss_rows, _, target_cosine = ops.margin_softmax_forward(x, w, labels, *scalars, 0, -1, margins, check_labels)
        loss = ops.reduce_loss(loss_rows, labels, ignore_index, reduction)
    if return_target_cosine:
        return loss, nan_at_ignored(target_cosine, labels, ignore_index)
    return loss


# The device types _without_kernel has warned about: one warning each a process.
_warned_without_kernel: set[str] = set()


def check_device_has_kernel(tensor: Tensor, what: str) -> None:
    """NotImplementedError naming ``what`` (the caller) where ``tensor``'s device type has no kernel of the
    op and ``what`` cannot run without one."""
    if tensor.device.type not in ops.OP_DEVICES:
        raise NotImplementedError(
            f"{what} needs arcface_ext's compiled op, which has kernels for {', '.join(_kernel_devices())} only, "
            f"not for {tensor.device.type} tensors (its PyTorch fallback covers the replicated losses: "
            "combined_margin_loss, CombinedMarginLoss and the other modules)")


def _kernel_devices() -> list[str]:
    return sorted(ops.OP_DEVICES - {"meta"}) or ["none"]


def _build_hint(device: str) -> str:
    """For CUDA tensors on a build without CUDA kernels (no nvcc found when it was built): how to build them."""
    if device != "cuda":
        return ""
    return (". This build of arcface_ext has no CUDA kernels (its build found no CUDA toolkit): reinstall it with the "
            "toolkit's nvcc on the PATH or CUDA_HOME set, or FORCE_CUDA=1 (pip install --no-build-isolation -e .)")


def _without_kernel(embeddings, weight, labels, *, s, m1, m2, m3, lambda_, reduction, margin_grad, ignore_index,
                    return_target_cosine, check_labels):
    """combined_margin_loss (its arguments checked) on a device type that has no kernel of the op: the
    chunked path (memory bounded by its class chunks; per-row margins change only the targets' logits),
    computing as the op does: fp32 (fp64 for fp64 inputs), the matrix products' operands rounded to 16 bits
    for 16-bit inputs or under autocast, with the op's value checks and messages."""
    device = embeddings.device.type
    compiling = torch.compiler.is_compiling()
    if device not in _warned_without_kernel and not compiling:
        _warned_without_kernel.add(device)
        warnings.warn(f"arcface_ext: the fused op has no {device} kernel (only {', '.join(_kernel_devices())}): "
                      f"combined_margin_loss runs in plain PyTorch on {device}, on the chunked PyTorch path "
                      "(arcface_ext.chunked: memory bounded by its class chunks, slower than the op); the same loss "
                      "up to rounding" + _build_hint(device), UserWarning, stacklevel=3)
    labels = labels.long()
    if not skips_label_check(check_labels, labels) and not compiling:
        # The op's checks and messages (a device sync, as on CUDA); the path below then checks nothing more.
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            raise_bad_label(labels, bad, weight.shape[0], ignore_index)
        check_row_margins_finite(m2, m3)
    # (It reads autocast and 16-bit inputs itself: 16-bit operands for its products, fp32 for the rest.)
    return chunked.chunked_margin_loss(embeddings, weight, labels, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_,
                                       reduction=reduction, margin_grad=margin_grad, ignore_index=ignore_index,
                                       return_target_cosine=return_target_cosine, check_labels=False)
