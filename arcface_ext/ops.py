"""The dispatcher-level ops of arcface_ext and their fake (meta) kernels for torch.compile (the
autograd formulas are in C++, csrc/autograd.cpp). Importing this module loads the compiled library
`arcface_ext._C`."""
from __future__ import annotations

import torch
from torch import Tensor

IMPORT_ERROR: ImportError | None
try:
    # (a compiled module without a stub: the type checkers see no _C)
    from . import _C  # type: ignore[attr-defined]  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    IMPORT_ERROR = error
else:
    IMPORT_ERROR = None
TRAIN_DEVICES: frozenset[str] = frozenset()
# Device types the op serves: its kernels' (cpu, cuda) and "meta" (its fake kernel, shapes only; torch.compile's
# fake tensors keep their device's type). functional.combined_margin_loss runs the loss in plain PyTorch on the
# others (Apple's mps, Intel's xpu, ...). Looked up once: a set-membership test a call, a constant for torch.compile.
OP_DEVICES: frozenset[str] = frozenset()


def _loss_dtype(embeddings):
    return torch.float64 if embeddings.dtype == torch.float64 else torch.float32


def margin_softmax_forward(embeddings: Tensor, weight: Tensor, labels: Tensor, s: float, m1: float, m2: float,
                           m3: float, lambda_: float, ignore_index: int, straight_through: bool, workspace_bytes: int,
                           class_offset: int = 0, num_classes: int = -1, row_margins: Tensor | None = None,
                           check_labels: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(loss per row, log-sum-exp per row, clamped target cosine per row). With a shard of the
    classes (``weight`` holds classes [class_offset, class_offset + C) of ``num_classes``), a row
    whose target is elsewhere gets the shard's log-sum-exp as its loss and 0 as its cosine.
    ``row_margins`` (N, 2) float64, when given, replaces m2 and m3 row by row. ``check_labels=False``
    skips the CUDA op's checks of the labels' values and the margins' finiteness (device syncs): a bad
    row gets a NaN loss instead."""
    return torch.ops.arcface_ext.margin_softmax_forward(
        embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index, straight_through,
        workspace_bytes, class_offset, num_classes, row_margins, check_labels)


def margin_softmax_backward(grad_loss: Tensor, embeddings: Tensor, weight: Tensor, labels: Tensor, logsumexp: Tensor,
                            s: float, m1: float, m2: float, m3: float, lambda_: float, ignore_index: int,
                            straight_through: bool, workspace_bytes: int, needs_embeddings_grad: bool,
                            needs_weight_grad: bool, class_offset: int = 0, num_classes: int = -1,
                            row_margins: Tensor | None = None, check_labels: bool = True) -> tuple[Tensor, Tensor]:
    """Gradients of Σ_i grad_loss[i]·loss[i] w.r.t. (embeddings, weight) given each row's
    log-sum-exp; with a shard of the classes and the whole softmax's log-sum-exp, the shard's part
    of the whole loss's gradients. A gradient not asked for comes back empty. ``check_labels=False``
    skips the labels' value check (a device sync on CUDA) for labels the forward already checked;
    out-of-range labels then get no gradient."""
    return torch.ops.arcface_ext.margin_softmax_backward(
        grad_loss, embeddings, weight, labels, logsumexp, s, m1, m2, m3, lambda_, ignore_index,
        straight_through, workspace_bytes, needs_embeddings_grad, needs_weight_grad, class_offset,
        num_classes, row_margins, check_labels)


def margin_softmax_train(embeddings: Tensor, weight: Tensor, labels: Tensor, s: float, m1: float, m2: float, m3: float,
                         lambda_: float, ignore_index: int, straight_through: bool, workspace_bytes: int, mean: bool,
                         needs_embeddings_grad: bool, needs_weight_grad: bool,
                         row_margins: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(reduced loss, target cosine per row, its gradients), computed in one call."""
    return torch.ops.arcface_ext.margin_softmax_train(
        embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index, straight_through,
        workspace_bytes, mean, needs_embeddings_grad, needs_weight_grad, row_margins)


def reduce_loss(loss: Tensor, labels: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """The per-row ``loss`` over the rows whose label is not ``ignore_index``: their sum, or for
    ``"mean"`` their sum over their count (0 when none count); ``"none"`` returns it as it is. One
    kernel each way, where the same in ATen calls took seven."""
    if reduction == "none":
        return loss
    return torch.ops.arcface_ext.reduce_loss(loss, labels, ignore_index, reduction == "mean")


def _gradients_like(embeddings, weight, needs_embeddings_grad, needs_weight_grad):
    """The fake kernels' gradient outputs: full-size where asked for, empty otherwise."""
    grad_embeddings = embeddings.new_empty(embeddings.shape) if needs_embeddings_grad else embeddings.new_empty((0,))
    grad_weight = weight.new_empty(weight.shape) if needs_weight_grad else weight.new_empty((0,))
    return grad_embeddings, grad_weight


def _devices_with_kernel(op_name):
    return frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if torch._C._dispatch_has_kernel_for_dispatch_key(op_name, key))


if IMPORT_ERROR is None:
    # Device types whose kernels include the one-call training op (looked up once: a constant
    # for torch.compile).
    TRAIN_DEVICES = _devices_with_kernel("arcface_ext::margin_softmax_train")
    OP_DEVICES = _devices_with_kernel("arcface_ext::margin_softmax_forward") | {"meta"}

    @torch.library.register_fake("arcface_ext::margin_softmax_forward")
    def _forward_fake(embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index,
                      straight_through, workspace_bytes, class_offset=0, num_classes=-1, row_margins=None,
                      check_labels=True):
        torch._check(embeddings.dim() == 2 and weight.dim() == 2 and labels.dim() == 1)
        torch._check(embeddings.shape[1] == weight.shape[1])
        torch._check(labels.shape[0] == embeddings.shape[0])
        loss = embeddings.new_empty((embeddings.shape[0],), dtype=_loss_dtype(embeddings))
        return loss, torch.empty_like(loss), torch.empty_like(loss)

    @torch.library.register_fake("arcface_ext::margin_softmax_backward")
    def _backward_fake(grad_loss, embeddings, weight, labels, logsumexp, s, m1, m2, m3, lambda_,
                       ignore_index, straight_through, workspace_bytes, needs_embeddings_grad,
                       needs_weight_grad, class_offset=0, num_classes=-1, row_margins=None,
                       check_labels=True):
        return _gradients_like(embeddings, weight, needs_embeddings_grad, needs_weight_grad)

    def _kept_bytes(n, c):
        # csrc/kept_block.h's kept_layout: the (N, C rounded up to 8) bf16 block, N row factors
        # (float) and recompute flags (byte), C inverse norms (float) and clamp flags (byte).
        return n * ((c + 7) // 8 * 8) * 2 + 5 * n + 5 * c

    @torch.library.register_fake("arcface_ext::margin_softmax_forward_kept")
    def _forward_kept_fake(embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index,
                           straight_through, workspace_bytes, row_margins=None, check_labels=True):
        loss, logsumexp, target_cosine = _forward_fake(
            embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index, straight_through, workspace_bytes)
        kept = embeddings.new_empty((_kept_bytes(embeddings.shape[0], weight.shape[0]),), dtype=torch.uint8)
        return loss, logsumexp, target_cosine, kept

    @torch.library.register_fake("arcface_ext::margin_softmax_backward_kept")
    def _backward_kept_fake(grad_loss, embeddings, weight, labels, kept, s, m1, m2, m3, lambda_,
                            ignore_index, straight_through, needs_embeddings_grad, needs_weight_grad,
                            row_margins=None):
        return _gradients_like(embeddings, weight, needs_embeddings_grad, needs_weight_grad)

    @torch.library.register_fake("arcface_ext::reduce_loss")
    def _reduce_loss_fake(loss, labels, ignore_index, mean):
        torch._check(loss.dim() == 1 and labels.dim() == 1)
        torch._check(loss.shape[0] == labels.shape[0])
        return loss.new_empty(())

    @torch.library.register_fake("arcface_ext::reduce_loss_backward")
    def _reduce_loss_backward_fake(grad, labels, ignore_index, mean):
        return grad.new_empty((labels.shape[0],))

    # The autograd formulas of margin_softmax_forward, margin_softmax_train and reduce_loss are in C++
    # (csrc/autograd.cpp): there they cost a training step no Python.

    @torch.library.register_fake("arcface_ext::margin_softmax_train")
    def _train_fake(embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index,
                    straight_through, workspace_bytes, mean, needs_embeddings_grad,
                    needs_weight_grad, row_margins=None):
        dtype = _loss_dtype(embeddings)
        loss = embeddings.new_empty((), dtype=dtype)
        target_cosine = embeddings.new_empty((embeddings.shape[0],), dtype=dtype)
        return (loss, target_cosine, *_gradients_like(embeddings, weight, needs_embeddings_grad, needs_weight_grad))
