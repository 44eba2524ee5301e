"""The pure-PyTorch reference of the combined margin loss: the ground truth that tests and
benchmarks compare the fused kernels against. It builds the whole N x C logit matrix, as every
public implementation does; it is written for clarity, not speed.

For row i with label y: x̂ = x / max(‖x‖, eps), ŵ_j = w_j / max(‖w_j‖, eps),
c_j = clamp(x̂·ŵ_j, -1, 1), θ = arccos(c_y), target logit s·(ψ(θ) - m3), other logits s·c_j,
loss_i = logsumexp_j(logit_ij) - logit_iy.
"""
from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

from . import _checks
from ._checks import check_arguments, check_flag, compute_dtype, reduce_rows

NORM_EPS = 1e-12  # as F.normalize; csrc/margin.h kNormEps
SIN_THETA_EPS = 1e-6  # csrc/margin.h kSinThetaEps


def margin_psi(cosine: Tensor, *, m1: float, m2: float | Tensor, lambda_: float) -> tuple[Tensor, Tensor]:
    """ψ(c) and dψ/dc (exact, finite at c = ±1) for clamped target cosines c; ``m2`` a number or
    one margin per row."""
    per_row = isinstance(m2, torch.Tensor)
    if m1 == 1.0 and not per_row and m2 == 0.0:
        psi, dpsi = cosine, torch.ones_like(cosine)
    else:
        theta = torch.acos(cosine)
        sin_theta = torch.sin(theta).clamp_min(SIN_THETA_EPS)
        if m1 == 1.0:
            # ArcFace: cos(θ + m2) while 0 <= θ + m2 <= π, insightface's linear continuation past
            # π, and ψ held at 1 below 0 (a negative margin: AdaFace clips θ + m2 there).
            angle = theta + m2
            within = angle <= math.pi
            below = angle < 0
            sin_m2 = torch.sin(m2) if isinstance(m2, torch.Tensor) else math.sin(m2)
            psi = torch.where(within, torch.cos(angle), cosine - m2 * sin_m2)
            dpsi = torch.where(within, torch.sin(angle) / sin_theta, torch.ones_like(cosine))
            psi = torch.where(below, torch.ones_like(cosine), psi)
            dpsi = torch.where(below, torch.zeros_like(cosine), dpsi)
            if isinstance(m2, torch.Tensor):  # rows without an angular margin: CosFace's ψ = c, as the kernels branch
                psi = torch.where(m2 == 0, cosine, psi)
                dpsi = torch.where(m2 == 0, torch.ones_like(cosine), dpsi)
        else:
            # SphereFace: the monotone ψ = (-1)^k cos(m1·θ + m2) - 2k, k = floor((m1·θ + m2) / π).
            t = m1 * theta + m2
            k = torch.floor(t / math.pi)
            sign = torch.where(torch.remainder(k, 2) == 0, 1.0, -1.0).to(cosine.dtype)
            psi = sign * torch.cos(t) - 2 * k
            dpsi = sign * m1 * torch.sin(t) / sin_theta
    if lambda_ > 0:
        psi = (psi + lambda_ * cosine) / (1 + lambda_)
        dpsi = (dpsi + lambda_) / (1 + lambda_)
    return psi, dpsi


def margin_psi_dm2(cosine: Tensor, *, m1: float, m2: float | Tensor, lambda_: float) -> Tensor:
    """dψ/dm2 for clamped target cosines c (the gradient of per-row angular margins, as MagFace's
    margin, a function of the embedding's norm, needs), branch by branch as :func:`margin_psi`."""
    theta = torch.acos(cosine)
    if m1 == 1.0:
        angle = theta + m2
        m2 = torch.as_tensor(m2, dtype=cosine.dtype, device=cosine.device)
        dm2 = torch.where(angle <= math.pi, -torch.sin(angle), -(torch.sin(m2) + m2 * torch.cos(m2)))
        dm2 = torch.where(angle < 0, torch.zeros_like(dm2), dm2)
    else:
        t = m1 * theta + m2
        k = torch.floor(t / math.pi)
        sign = torch.where(torch.remainder(k, 2) == 0, 1.0, -1.0).to(cosine.dtype)
        dm2 = -sign * torch.sin(t)
    return dm2 / (1 + lambda_) if lambda_ > 0 else dm2


class _TargetLogit(torch.autograd.Function):
    """s·(ψ(c) - m3) with its derivative written out: exact (finite everywhere) or, with
    straight_through, dψ/dc := 1 as today's insightface loss has it. Per-row margins (tensors) get
    their gradients too: -s for m3, s·dψ/dm2 for m2."""

    @staticmethod
    def forward(ctx, cosine, s, m1, m2, m3, lambda_, straight_through):
        psi, dpsi = margin_psi(cosine, m1=m1, m2=m2, lambda_=lambda_)
        dm2 = None
        if ctx.needs_input_grad[3]:
            dm2 = margin_psi_dm2(cosine, m1=m1, m2=m2, lambda_=lambda_)
        ctx.save_for_backward(torch.ones_like(dpsi) if straight_through else dpsi, dm2)
        ctx.s = s
        return s * (psi - m3)

    @staticmethod
    def backward(ctx, grad):
        dpsi, dm2 = ctx.saved_tensors
        grad_m2 = grad * ctx.s * dm2 if ctx.needs_input_grad[3] else None
        grad_m3 = -ctx.s * grad if ctx.needs_input_grad[4] else None
        return grad * ctx.s * dpsi, None, None, grad_m2, grad_m3, None, None


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
    """Same signature and semantics as :func:`arcface_ext.combined_margin_loss`."""
    check_arguments(embeddings, weight, labels, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_,
                    reduction=reduction, margin_grad=margin_grad, ignore_index=ignore_index)
    check_labels = not _checks.skips_label_check(check_flag("check_labels", check_labels), labels)
    return_target_cosine = check_flag("return_target_cosine", return_target_cosine)
    dtype = compute_dtype(embeddings, weight)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # never round a cosine to 16 bits before the exponential
    x = embeddings.to(dtype)
    w = weight.to(dtype)
    labels = labels.long()
    num_classes = w.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if check_labels and not torch.compiler.is_compiling() and bool(bad.any()):
        _checks.raise_bad_label(labels, bad, num_classes, ignore_index)
    # Unchecked (check_labels=False), a bad row is not counted: it gets a NaN loss and no gradient.
    counted = (labels != ignore_index) & ~bad

    x_hat = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    w_hat = w / w.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    cosine = (x_hat @ w_hat.t()).clamp(-1.0, 1.0)
    target = torch.where(counted, labels, 0).unsqueeze(1)
    target_cosine = cosine.gather(1, target).squeeze(1)
    m2, m3 = (value.to(dtype) if isinstance(value, torch.Tensor) else float(value) for value in (m2, m3))
    target_logit = _TargetLogit.apply(target_cosine, float(s), float(m1), m2, m3,
                                      float(lambda_), margin_grad == "straight_through")
    # Under autocast the cosines come out of the matrix product in the autocast dtype while per-row
    # margin tensors keep the target logit in fp32: the logits take the wider of the two.
    logits = (s * cosine).to(torch.promote_types(cosine.dtype, target_logit.dtype))
    logits = logits.scatter(1, target, target_logit.unsqueeze(1).to(logits.dtype))
    loss_rows = torch.logsumexp(logits, dim=1) - target_logit
    loss_rows = torch.where(counted, loss_rows, torch.zeros_like(loss_rows))
    loss_rows = torch.where(bad, torch.full_like(loss_rows, float("nan")), loss_rows)
    loss = reduce_rows(loss_rows, labels, ignore_index, reduction)
    if return_target_cosine:
        nan = torch.full_like(target_cosine, float("nan"))
        return loss, torch.where(counted, target_cosine, nan).detach()
    return loss


# The loss, or (loss, target cosine) with return_target_cosine=True (overloads for type checkers).
@overload
def chunked_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int = ..., s: float = ...,
                        m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                        interclass_filtering_threshold: float = ..., curricular_t: float | Tensor | None = ...,
                        reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                        return_target_cosine: Literal[False] = ..., check_labels: bool = ...) -> Tensor: ...
@overload
def chunked_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int = ..., s: float = ...,
                        m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                        interclass_filtering_threshold: float = ..., curricular_t: float | Tensor | None = ...,
                        reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                        return_target_cosine: Literal[True], check_labels: bool = ...) -> tuple[Tensor, Tensor]: ...
@overload
def chunked_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int = ..., s: float = ...,
                        m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                        interclass_filtering_threshold: float = ..., curricular_t: float | Tensor | None = ...,
                        reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                        return_target_cosine: bool, check_labels: bool = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def chunked_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int = 1, s: float = 64.0,
                        m1: float = 1.0, m2: float | Tensor = 0.5, m3: float | Tensor = 0.0, lambda_: float = 0.0,
                        interclass_filtering_threshold: float = 0.0, curricular_t: float | Tensor | None = None,
                        reduction: str = "mean", margin_grad: str = "exact", ignore_index: int = -1,
                        return_target_cosine: bool = False,
                        check_labels: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`arcface_ext.chunked_margin_loss` the plain way: the whole N x C·k cosine matrix, each
    class's best sub-centre by max-pooling (insightface's reshape to (N, C, k)), the other classes'
    cosines filtered (set to 0 above the threshold, as insightface multiplies them by a 0/1 mask) or
    CurricularFace's hard negatives replaced by c·(t + c), then :func:`combined_margin_loss`'s margin
    and softmax; autograd differentiates all of it (the max passes the gradient to the winner), per-row
    margin tensors included. Unchecked bad labels give their row a NaN loss, as
    :func:`combined_margin_loss`'s."""
    check_arguments(embeddings, weight, labels, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, reduction=reduction,
                    margin_grad=margin_grad, ignore_index=ignore_index)
    if weight.shape[0] % k:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of k = {k} sub-centres a class")
    check_labels = check_flag("check_labels", check_labels)  # (unchecked on any device, as the chunked path)
    dtype = torch.float64 if torch.float64 in (embeddings.dtype, weight.dtype) else torch.float32
    labels = labels.long()
    num_classes = weight.shape[0] // k
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if check_labels and not torch.compiler.is_compiling() and bool(bad.any()):
        _checks.raise_bad_label(labels, bad, num_classes, ignore_index, "the number of classes in weight" if k == 1
                                else f"the number of classes in weight, {k} sub-centres a class")
    counted = (labels != ignore_index) & ~bad
    with torch.autocast(embeddings.device.type, enabled=False):
        x = embeddings.to(dtype)
        w = weight.to(dtype)
        x_hat = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        w_hat = w / w.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        cosine = (x_hat @ w_hat.t()).clamp(-1.0, 1.0).view(x.shape[0], w.shape[0] // k, k).amax(dim=2)
        target = torch.where(counted, labels, 0).unsqueeze(1)
        target_cosine = cosine.gather(1, target).squeeze(1)
        m2, m3 = (value.to(dtype) if isinstance(value, torch.Tensor) else float(value) for value in (m2, m3))
        target_logit = _TargetLogit.apply(target_cosine, float(s), float(m1), m2, m3, float(lambda_),
                                          margin_grad == "straight_through")
        if interclass_filtering_threshold > 0:
            with torch.no_grad():
                keep = (cosine <= interclass_filtering_threshold).to(dtype)
            cosine = cosine * keep
        elif curricular_t is not None:
            t = torch.as_tensor(curricular_t, dtype=dtype, device=cosine.device).detach()
            with torch.no_grad():
                hard = cosine > (target_logit / s).unsqueeze(1)
            cosine = torch.where(hard, cosine * (t + cosine), cosine)
        logits = (s * cosine).scatter(1, target, target_logit.unsqueeze(1))
        rows = torch.where(counted, torch.logsumexp(logits, dim=1) - target_logit, torch.zeros_like(target_logit))
        rows = torch.where(bad, torch.full_like(rows, float("nan")), rows)
    loss = reduce_rows(rows, labels, ignore_index, reduction)
    if return_target_cosine:
        return loss, torch.where(counted, target_cosine, torch.full_like(target_cosine, float("nan"))).detach()
    return loss


# The loss, or (loss, target cosine) with return_target_cosine=True (overloads for type checkers).
@overload
def subcenter_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int, s: float = ...,
                          m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                          reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                          return_target_cosine: Literal[False] = ...,
                          interclass_filtering_threshold: float = ...) -> Tensor: ...
@overload
def subcenter_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int, s: float = ...,
                          m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                          reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                          return_target_cosine: Literal[True],
                          interclass_filtering_threshold: float = ...) -> tuple[Tensor, Tensor]: ...
@overload
def subcenter_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int, s: float = ...,
                          m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                          reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                          return_target_cosine: bool,
                          interclass_filtering_threshold: float = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def subcenter_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int, s: float = 64.0,
                          m1: float = 1.0, m2: float | Tensor = 0.5, m3: float | Tensor = 0.0, lambda_: float = 0.0,
                          reduction: str = "mean", margin_grad: str = "exact", ignore_index: int = -1,
                          return_target_cosine: bool = False,
                          interclass_filtering_threshold: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
    """Sub-center margin loss (as :func:`arcface_ext.subcenter_margin_loss`) the plain way
    (:func:`chunked_margin_loss` with ``k`` sub-centres)."""
    return chunked_margin_loss(embeddings, weight, labels, k=k, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_,
                               interclass_filtering_threshold=interclass_filtering_threshold, reduction=reduction,
                               margin_grad=margin_grad, ignore_index=ignore_index,
                               return_target_cosine=return_target_cosine)
