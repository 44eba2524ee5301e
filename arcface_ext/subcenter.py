"""Sub-center ArcFace (Deng et al., ECCV 2020): each class owns K centres, and a sample's cosine to a
class is its largest cosine to that class's K sub-centres; the margin, the scale and the softmax are
then the combined margin loss's. Trained on noisy data, a class's clean images gather at one dominant
sub-centre and its noise at the others, which ``train.tools.clean`` then drops.

The class centres are ``weight`` (C·K, D), class c's sub-centres its rows c·K … c·K + K − 1 (as
insightface's reshape to (N, C, K) reads them). This is a PyTorch path, not the fused op: it walks
the classes in chunks, holding an N x chunk·K block of cosines at a time, never the N x C·K matrix,
and recomputes the blocks in the backward pass; fp32 throughout (fp64 for fp64 inputs), also under
autocast, so no cosine is rounded to 16 bits before the exponential. A sample's gradient reaches only
the sub-centre that won its max, as the max's derivative says.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._checks import check_arguments, check_flag, check_options, reduce_rows
from .reference import NORM_EPS, margin_psi

# Cosines held at a time: an N x chunk·K block of about this many values (16 MiB in fp32; a few such
# blocks are alive at once in the backward pass).
BLOCK_VALUES = 1 << 22


def _unit(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = rows.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return rows / norm, norm


def _chunk_classes(n: int, k: int, num_classes: int, chunk: int | None) -> int:
    if chunk is not None:
        return chunk
    return max(1, min(num_classes, BLOCK_VALUES // max(1, n * k)))


class _SubCenterLossRows(torch.autograd.Function):
    """Per-row losses (and clamped target cosines) of the sub-center margin loss; rows not counted 0."""

    @staticmethod
    def forward(ctx, x, w, labels, counted, k, s, m1, m2, m3, lambda_, straight_through, chunk):
        dtype = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            x_hat, x_norm = _unit(x.to(dtype))
            n, dim, num_classes = x.shape[0], x.shape[1], w.shape[0] // k
            target = torch.where(counted, labels, 0)
            # The target's cosine: the best of its class's K sub-centres.
            target_rows, _ = _unit(w.view(num_classes, k, dim)[target].reshape(n * k, dim).to(dtype))
            raw = torch.bmm(target_rows.view(n, k, dim), x_hat.unsqueeze(2)).squeeze(2)
            target_raw, target_sub = raw.max(dim=1)
            target_cos = target_raw.clamp(-1.0, 1.0)
            psi, dpsi = margin_psi(target_cos, m1=m1, m2=m2, lambda_=lambda_)
            target_logit = s * (psi - m3)
            # logsumexp over the other classes' s·cos, online across chunks, the target's logit included.
            run_max, run_sum = target_logit.clone(), torch.ones_like(target_logit)
            step = _chunk_classes(n, k, num_classes, chunk)
            for first in range(0, num_classes, step):
                logits = s * _class_cosines(x_hat, w, first, step, k)[0]
                _mask_target(logits, labels, counted, first, -torch.inf)
                new_max = torch.maximum(run_max, logits.max(dim=1).values)
                run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
                run_max = new_max
            lse = run_max + torch.log(run_sum)
            rows = torch.where(counted, lse - target_logit, torch.zeros_like(lse))
        ctx.save_for_backward(x_hat, x_norm, w, labels, counted, lse, target_logit, target_sub,
                              torch.ones_like(dpsi) if straight_through else dpsi,
                              (target_raw.abs() <= 1.0).to(dtype))
        ctx.k, ctx.s, ctx.step, ctx.dtypes = k, s, step, (x.dtype, w.dtype)
        ctx.mark_non_differentiable(target_cos)
        return rows, target_cos

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, _grad_target_cos):
        x_hat, x_norm, w, labels, counted, lse, target_logit, target_sub, dpsi, inside = ctx.saved_tensors
        k, s = ctx.k, ctx.s
        need_x, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(x_hat.device.type, enabled=False):
            n, num_classes = x_hat.shape[0], w.shape[0] // k
            g = torch.where(counted, grad_rows.to(x_hat.dtype), torch.zeros_like(lse))
            grad_x_hat = torch.zeros_like(x_hat) if need_x else None
            grad_w = torch.zeros(w.shape, dtype=x_hat.dtype, device=w.device) if need_w else None
            for first in range(0, num_classes, ctx.step):
                best, which, unit_rows, norms, best_raw = _class_cosines(x_hat, w, first, ctx.step, k)
                p = torch.exp(s * best - lse[:, None])
                _mask_target(p, labels, counted, first, 0.0)  # the target's share comes below, with its margin
                # (the clamp to [-1, 1] passes no gradient where it clamped)
                grad_best = torch.where(best_raw.abs() <= 1.0, (g[:, None] * s) * p, torch.zeros_like(p))
                grad_cos = torch.zeros(n, best.shape[1], k, dtype=x_hat.dtype, device=x_hat.device)
                grad_cos.scatter_(2, which.unsqueeze(2), grad_best.unsqueeze(2))
                grad_cos = grad_cos.view(n, unit_rows.shape[0])
                if need_x:
                    grad_x_hat += grad_cos @ unit_rows
                if need_w:
                    grad_w[first * k:first * k + unit_rows.shape[0]] = _through_norm(grad_cos.t() @ x_hat,
                                                                                     unit_rows, norms)
            # The target: d loss / d target logit = p_target - 1, times the margin's derivative.
            p_target = torch.exp(target_logit - lse)
            grad_t = g * (p_target - 1.0) * s * dpsi * inside
            rows = torch.where(counted, labels, 0) * k + target_sub
            unit_rows, norms = _unit(w[rows].to(x_hat.dtype))
            grad_x = None
            if need_x:
                grad_x_hat += grad_t[:, None] * unit_rows
                grad_x = _through_norm(grad_x_hat, x_hat, x_norm).to(ctx.dtypes[0])
            if need_w:
                grad_w.index_add_(0, rows, _through_norm(grad_t[:, None] * x_hat, unit_rows, norms))
                grad_w = grad_w.to(ctx.dtypes[1])
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None, None


def _class_cosines(x_hat, w, first, step, k):
    """For classes first … first + step − 1: (N, c) best sub-centre cosine (clamped), (N, c) which
    sub-centre, the (c·K, D) unit sub-centres (in x_hat's dtype, converted a chunk at a time), their
    norms, and (N, c) the best cosine before the clamp."""
    unit_rows, norms = _unit(w[first * k:(first + step) * k].to(x_hat.dtype))
    best_raw, which = (x_hat @ unit_rows.t()).view(x_hat.shape[0], unit_rows.shape[0] // k, k).max(dim=2)
    return best_raw.clamp(-1.0, 1.0), which, unit_rows, norms, best_raw


def _mask_target(block, labels, counted, first, value):
    """Sets each counted row's target column in a block of classes first … to ``value`` (a scatter
    that writes every row, the others their own value: no data-dependent shape, no device sync)."""
    inside = counted & (labels >= first) & (labels < first + block.shape[1])
    column = (labels - first).clamp(0, block.shape[1] - 1).unsqueeze(1)
    kept = block.gather(1, column)
    block.scatter_(1, column, torch.where(inside.unsqueeze(1), torch.full_like(kept, value), kept))


def _through_norm(grad_unit, unit, norm):
    """The gradient of rows v from that of v / max(|v|, eps): projected off v / |v| and divided by
    |v|, or, for rows shorter than eps (divided by eps alone), just divided."""
    projected = (grad_unit - unit * (grad_unit * unit).sum(dim=1, keepdim=True)) / norm
    return torch.where(norm > NORM_EPS, projected, grad_unit / NORM_EPS)


def subcenter_margin_loss(embeddings, weight, labels, *, k, s=64.0, m1=1.0, m2=0.5, m3=0.0, lambda_=0.0,
                          reduction="mean", margin_grad="exact", ignore_index=-1, return_target_cosine=False,
                          check_labels=True, class_chunk=None):
    """The combined margin loss of :func:`arcface_ext.combined_margin_loss` with ``k`` sub-centres a
    class: ``weight`` is (C·k, D), class c's sub-centres rows c·k … c·k + k − 1, and each class's
    cosine is the largest of its sub-centres'. Margins are numbers (not per-row tensors). Labels out
    of [0, C) that are not ``ignore_index`` raise ValueError (a device synchronisation on a GPU), or,
    with ``check_labels=False`` or inside ``torch.compile``, give their row a NaN loss and no
    gradient, as the fused op's unchecked labels do. ``class_chunk`` sets how many classes a block of
    cosines holds (default: about 4M cosines a block). Double backward is not supported."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k (sub-centres a class) must be an int >= 1, got {k!r}")
    if class_chunk is not None and (isinstance(class_chunk, bool) or not isinstance(class_chunk, numbers.Integral)
                                    or class_chunk < 1):
        raise ValueError(f"class_chunk must be None or an int >= 1, got {class_chunk!r}")
    for name, value in (("m2", m2), ("m3", m3)):
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: the sub-center loss takes margins as numbers, not per-row tensors")
    check_arguments(embeddings, weight, labels, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, reduction=reduction,
                    margin_grad=margin_grad, ignore_index=ignore_index)
    return_target_cosine = check_flag("return_target_cosine", return_target_cosine)
    if weight.shape[0] % k:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of k = {k} sub-centres a class")
    num_classes = weight.shape[0] // k
    labels = labels.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if check_flag("check_labels", check_labels) and not torch.compiler.is_compiling() and bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index ({ignore_index})")
    counted = (labels != ignore_index) & ~bad
    rows, target_cos = _SubCenterLossRows.apply(embeddings, weight, labels, counted, int(k), float(s), float(m1),
                                                float(m2), float(m3), float(lambda_),
                                                margin_grad == "straight_through",
                                                None if class_chunk is None else int(class_chunk))
    rows = torch.where(bad, torch.full_like(rows, float("nan")), rows)
    loss = reduce_rows(rows, labels, ignore_index, reduction)
    if return_target_cosine:
        return loss, torch.where(counted, target_cos, torch.full_like(target_cos, float("nan"))).detach()
    return loss


class SubCenterMarginLoss(nn.Module):
    """The sub-center margin loss with its own class centres ``weight`` (num_classes·k, D): ArcFace
    (the defaults), CosFace (``m2=0, m3=...``), SphereFace or their combination, as
    :class:`arcface_ext.CombinedMarginLoss`. ``k=3`` is the paper's choice. Called as
    ``criterion(embeddings, labels)``; ``return_target_cosine=True`` also returns each row's target
    cosine (to its best sub-centre)."""

    def __init__(self, num_classes, embedding_size, k=3, s=64.0, m1=1.0, m2=0.5, m3=0.0, lambda_=0.0, *,
                 reduction="mean", margin_grad="exact", ignore_index=-1, check_labels=True, class_chunk=None,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if class_chunk is not None and (isinstance(class_chunk, bool) or
                                        not isinstance(class_chunk, numbers.Integral) or class_chunk < 1):
            raise ValueError(f"class_chunk must be None or an int >= 1, got {class_chunk!r}")
        check_options(s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, reduction=reduction, margin_grad=margin_grad,
                      ignore_index=ignore_index)
        self.check_labels = check_flag("check_labels", check_labels)
        self.num_classes, self.embedding_size, self.k = int(num_classes), int(embedding_size), int(k)
        self.s, self.m1, self.m2, self.m3, self.lambda_ = float(s), float(m1), float(m2), float(m3), float(lambda_)
        self.reduction, self.margin_grad, self.ignore_index = reduction, margin_grad, int(ignore_index)
        self.class_chunk = class_chunk
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.k, self.embedding_size, device=device,
                                               dtype=dtype))
        nn.init.normal_(self.weight, std=0.01)  # insightface's initialisation, as CombinedMarginLoss's

    def forward(self, embeddings, labels, return_target_cosine=False):
        return subcenter_margin_loss(embeddings, self.weight, labels, k=self.k, s=self.s, m1=self.m1, m2=self.m2,
                                     m3=self.m3, lambda_=self.lambda_, reduction=self.reduction,
                                     margin_grad=self.margin_grad, ignore_index=self.ignore_index,
                                     return_target_cosine=return_target_cosine, check_labels=self.check_labels,
                                     class_chunk=self.class_chunk)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, k={self.k}, s={self.s}, "
                f"m1={self.m1}, m2={self.m2}, m3={self.m3}"
                + (f", lambda_={self.lambda_}" if self.lambda_ else "")
                + (f", margin_grad={self.margin_grad!r}" if self.margin_grad != "exact" else "")
                + ("" if self.check_labels else ", check_labels=False"))
