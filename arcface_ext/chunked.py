"""The PyTorch path for the margin losses the fused kernels do not carry: sub-centres (a class's cosine
the best of its K centres), Partial FC's inter-class filtering and CurricularFace's hard negatives
(both change the other classes' logits, each as a function of their own cosine); and, on a device
type without a kernel of the op (Apple's mps, Intel's xpu), every replicated loss, per-row margins
(AdaFace's, ElasticFace's, MagFace's) included: they change only the N target logits.

It walks the classes in chunks, holding an N x chunk·K block of cosines at a time, never the whole
N x C·K matrix, and recomputes the blocks in the backward pass. It computes in fp32 (fp64 for fp64
inputs). Its matrix products are the only exception: under ``torch.autocast`` (fp16/bf16) or with 16-bit
inputs, as for the fused op, they take operands rounded to 16 bits (the embeddings and each chunk of
centres as autocast rounds a matrix product's inputs, a chunk at a time, never a 16-bit copy of the
whole weight; in the backward pass the gradient block too) and accumulate in fp32 with fp32 results
(``torch.mm(..., out_dtype=torch.float32)`` on GPUs, tensor cores; the products of the 16-bit values
in fp32 elsewhere). Norms, cosines, margins and softmax stay fp32: no cosine is rounded to 16 bits
before the exponential. It does the same matrix products as the fused op (four, not three) with a
dozen elementwise passes over each block where the op has fused epilogues: on a CPU it takes about
twice the fused op's time and about its memory (``benchmarks/bench_loss.py``, docs/performance.md).
:func:`shard_forward` and :func:`shard_backward` are its two passes on a shard of the classes, as the
fused op's shard mode runs them (sharded centres).

With c_j the clamped cosine of a class j other than the row's target, its logit is s·f(c_j):

- plain: f(c) = c;
- inter-class filtering (``interclass_filtering_threshold`` τ > 0, the option of insightface's arcface_torch
  ``CombinedMarginLoss``, against the inter-class conflict of the Partial FC paper, An et al., CVPR 2022):
  f(c) = 0 for c > τ, else c. A class that close is taken
  for the same person filed twice (inter-class noise): its logit is zeroed and it gets no gradient;
- CurricularFace (``curricular_t`` t, Huang et al., CVPR 2020): f(c) = c·(t + c) for a hard negative,
  one whose cosine exceeds the target's margined cosine ψ(c_y) - m3 (whose logit would beat the
  target's), else c. t, a running mean of the target cosines, is a constant of the step (no gradient).
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Literal, overload

import torch
from torch import Tensor

from ._checks import (LARGEST_FLOAT, check_arguments, check_flag, check_row_margins_finite, fused_compute_dtype,
                      margins_dtype, raise_bad_label, reduce_rows, skips_label_check)
from .reference import NORM_EPS, _TargetLogit, margin_psi, margin_psi_dm2

# Values a block holds: about this many cosines (N x chunk·K) and centre rows' values (chunk·K x D),
# 16 MiB each in fp32; a few such blocks are alive at once in the backward pass.
BLOCK_VALUES = 1 << 22


def _no_autocast(device_type):
    """Autocast off for the device's type (the meta device has none: shapes only)."""
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


SIXTEEN_BITS = (torch.float16, torch.bfloat16)
# torch.mm(a, b, out_dtype=torch.float32) for 16-bit a, b (CUDA, torch 2.8 and later).
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def gemm_dtype(embeddings: Tensor, weight: Tensor) -> torch.dtype | None:
    """The 16-bit type the chunked path's matrix products take their operands in, or None for the
    compute dtype: the autocast dtype under ``torch.autocast`` for the inputs' device, else the inputs'
    common type when it is 16-bit (fp64 inputs: None, as autocast leaves fp64 matrix products)."""
    dtype = fused_compute_dtype(embeddings, weight)
    return dtype if dtype in SIXTEEN_BITS else None


def _mm(a, b):
    """a·b; for 16-bit operands the fp32 product (fp32 accumulation), not a 16-bit one."""
    if a.dtype not in SIXTEEN_BITS:
        return a @ b
    if _MM_OUT_DTYPE and a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # (exact products of the 16-bit values, summed in fp32)


def _unit(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = rows.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return rows / norm, norm


def _chunk_classes(n: int, dim: int, k: int, num_classes: int, chunk: int | None) -> int:
    if chunk is not None:
        return chunk
    return max(1, min(num_classes, BLOCK_VALUES // max(1, max(n, dim) * k)))


def _negatives(best, s, threshold, curricular_t, hard_above):
    """The logits s·f(c) of a block of clamped cosines c (N, c) of non-target classes, and f'(c)
    (None where it is 1 everywhere)."""
    if threshold > 0:
        # (a NaN cosine, from a non-finite centre, is not filtered: it stays NaN, as in the forward of
        # insightface's mask and the unfiltered loss, rather than hiding behind a finite loss)
        dirty = best > threshold
        return s * torch.where(dirty, torch.zeros_like(best), best), (~dirty).to(best.dtype)
    if curricular_t is not None:
        hard = best > hard_above[:, None]
        t = curricular_t.to(best.dtype)
        return (s * torch.where(hard, best * (t + best), best),
                torch.where(hard, t + 2.0 * best, torch.ones_like(best)))
    return s * best, None


class _Targets:
    """What a call needs of its rows' targets: which rows count (label not ``ignore_index`` and in
    [0, num_classes)), which of them this block of centres holds (``owned``; every counted row unless
    the centres are a shard of the classes), their best sub-centre (row of ``weight``), the clamped
    target cosine, and the target logit s·(ψ − m3) with its chain factor s·dψ/dc (0 where the clamp
    clamped), all in the compute dtype. ``m2`` and ``m3`` are numbers or one margin a row ((N,) tensors,
    taken in the compute dtype, as the reference takes them): only these N logits depend on them. With
    ``gemm`` (a 16-bit type) the embeddings are rounded to it first: the matrix products' operand
    (``x_op``), and the norm's and the target cosines' input."""

    def __init__(self, x, w, labels, *, k, s, m1, m2, m3, lambda_, straight_through, ignore_index, class_offset,
                 num_classes, gemm=None):
        self.dtype = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
        self.gemm = gemm
        if gemm is not None:
            x = x.to(gemm)
        self.x_hat, self.x_norm = _unit(x.to(self.dtype))
        # The products' left operand: x̂ itself in fp32/fp64; the rounded embeddings, scaled by 1/|x| after
        # the product, with 16-bit operands (so that the cosines are those of the rounded inputs).
        self.x_op = self.x_hat if gemm is None else x
        n, dim = x.shape
        self.local = w.shape[0] // k
        total = self.local if num_classes < 0 else num_classes
        labels = labels.long()
        self.counted = (labels != ignore_index) & (labels >= 0) & (labels < total)
        self.bad = (labels != ignore_index) & ~self.counted
        # Targets as indices into this block of classes; rows whose target it does not hold are not owned.
        self.position = labels - class_offset
        self.owned = self.counted & (self.position >= 0) & (self.position < self.local)
        target = torch.where(self.owned, self.position, 0)
        # The target's cosine: the best of its class's K sub-centres.
        rows = w.view(self.local, k, dim)[target].reshape(n * k, dim)
        rows, _ = _unit((rows if gemm is None else rows.to(gemm)).to(self.dtype))
        raw = torch.bmm(rows.view(n, k, dim), self.x_hat.unsqueeze(2)).squeeze(2)
        raw, sub = raw.max(dim=1)
        self.row = target * k + sub
        self.cosine = raw.clamp(-1.0, 1.0)
        m2, m3 = (m.detach().to(self.dtype) if isinstance(m, Tensor) else m for m in (m2, m3))
        psi, dpsi = margin_psi(self.cosine, m1=m1, m2=m2, lambda_=lambda_)
        self.logit = s * (psi - m3)
        self.slope = s * (torch.ones_like(dpsi) if straight_through else dpsi) * (raw.abs() <= 1.0).to(self.dtype)

    def centres(self, w, first, step, k):
        """Rows of ``w`` for classes first … first + step − 1, as the products take them."""
        return w[first * k:(first + step) * k].to(self.dtype if self.gemm is None else self.gemm)


def shard_forward(x: Tensor, w: Tensor, labels: Tensor, *, k: int = 1, s: float, m1: float, m2: float | Tensor,
                  m3: float | Tensor, lambda_: float, straight_through: bool, ignore_index: int, class_offset: int = 0,
                  num_classes: int = -1, threshold: float = 0.0, curricular_t: Tensor | None = None,
                  hard_above: Tensor | None = None, chunk: int | None = None,
                  gemm_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The chunked path's forward on a block of classes, with the fused op's (``margin_softmax_forward``)
    outputs and shard semantics: ``w`` holds classes [class_offset, class_offset + C) of
    ``num_classes`` (-1: just its own C) and labels index all of them. Returns (per-row loss, the
    row's log-sum-exp, the clamped target cosine): a row whose target is in another shard gets the
    shard's log-sum-exp as its loss and target cosine 0; ignored rows 0, 0, 0; a label outside
    [0, num_classes) a NaN loss. CurricularFace's hard-negative test needs each row's margined target
    cosine ψ(c_y) − m3: ``hard_above`` (N,) gives it (from :func:`margined_target`, for targets in
    other shards); without it every counted row's target must be in ``w``. ``m2`` and ``m3``: numbers,
    or (N,) tensors of per-row margins (no gradient here: :func:`chunked_margin_loss` gives them theirs).
    ``gemm_dtype``: the 16-bit type of the matrix products' operands (:func:`gemm_dtype`), or None."""
    with torch.no_grad(), _no_autocast(x.device.type):
        r = _Targets(x, w, labels, k=k, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, straight_through=straight_through,
                     ignore_index=ignore_index, class_offset=class_offset, num_classes=num_classes,
                     gemm=gemm_dtype)
        n, dim = x.shape
        hard_above = r.logit / s if hard_above is None else hard_above.to(r.dtype)
        # logsumexp over the other classes' logits, online across chunks, the target's logit included.
        run_max = torch.where(r.owned, r.logit, torch.full_like(r.logit, -torch.inf))
        run_sum = r.owned.to(r.dtype)
        step = _chunk_classes(n, dim, k, r.local, chunk)
        for first in range(0, r.local, step):
            logits, _ = _negatives(_class_cosines(r, w, first, step, k)[0], s, threshold, curricular_t, hard_above)
            _mask_target(logits, r.position, r.owned, first, -torch.inf)
            new_max = torch.maximum(run_max, logits.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
            run_max = new_max
        zero = torch.zeros_like(run_max)
        lse = torch.where(r.counted, run_max + torch.log(run_sum), zero)
        rows = torch.where(r.owned, lse - r.logit, lse)
        rows = torch.where(r.bad, torch.full_like(rows, float("nan")), rows)
        return rows, lse, torch.where(r.owned, r.cosine, zero)


# no_grad as a decorator, one context manager in the body: torch 2.14.1's dynamo on Python 3.13 fails to trace
# (an AssertionError on its block stack) a loop with a branch under two nested ones.
@torch.no_grad()
def shard_backward(grad_rows: Tensor, x: Tensor, w: Tensor, labels: Tensor, logsumexp: Tensor, *, k: int = 1,
                   s: float, m1: float, m2: float | Tensor, m3: float | Tensor, lambda_: float,
                   straight_through: bool, ignore_index: int, needs_embeddings_grad: bool = True,
                   needs_weight_grad: bool = True, class_offset: int = 0, num_classes: int = -1, threshold: float = 0.0,
                   curricular_t: Tensor | None = None, hard_above: Tensor | None = None, chunk: int | None = None,
                   gemm_dtype: torch.dtype | None = None) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of Σ_i grad_rows[i]·loss[i] for :func:`shard_forward`'s block of classes, given each
    row's log-sum-exp (the whole softmax's when the classes are sharded: then they are this shard's part
    of the whole loss's gradients), as ``margin_softmax_backward``. Returns (d/dx or None, d/dw or None)
    in the inputs' dtypes; rows not counted get none."""
    with _no_autocast(x.device.type):
        r = _Targets(x, w, labels, k=k, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, straight_through=straight_through,
                     ignore_index=ignore_index, class_offset=class_offset, num_classes=num_classes,
                     gemm=gemm_dtype)
        n, dim = x.shape
        g = torch.where(r.counted, grad_rows.to(r.dtype), torch.zeros_like(r.logit))
        # (+inf where nothing counts: no exp overflows into a 0·inf there)
        lse = torch.where(r.counted, logsumexp.to(r.dtype), torch.full_like(r.logit, torch.inf))
        hard_above = r.logit / s if hard_above is None else hard_above.to(r.dtype)
        x_hat = r.x_hat
        row_factor: Tensor | float = g[:, None] * s
        x_hat_op = x_hat
        if r.gemm is not None:
            # 16-bit operands, as the fused kernels form them: the gradient block leaves out each row's
            # upstream gradient g_i (a loss scaler's factor among them), applied after the products, so
            # that it stays within s / |w_j| whatever the loss scale; the centres' product takes
            # x̂_i·g_i / max|g| instead, and the result is multiplied by max|g|.
            g_max = g.abs().amax() if n else g.new_ones(())
            g_max = torch.where(g_max > 0, g_max, torch.ones_like(g_max))
            row_factor, x_hat_op = s, (x_hat * (g / g_max)[:, None]).to(r.gemm)
        # The target (rows whose target this block holds): d loss / d target logit = p_target - 1,
        # times the margin's chain factor; its part of the centres' gradient joins its chunk's block.
        grad_t = torch.where(r.owned, g * (torch.exp(r.logit - lse) - 1.0) * r.slope, torch.zeros_like(g))
        unit_rows, target_norms = _unit((w[r.row] if r.gemm is None else w[r.row].to(r.gemm)).to(r.dtype))
        # (None where the flags ask for no gradient, and used only where they ask for one)
        grad_x_hat: Any = torch.zeros_like(x_hat) if needs_embeddings_grad else None
        grad_w: Any = None
        target_part: Any = None
        if needs_weight_grad:
            target_part = _through_norm(grad_t[:, None] * x_hat, unit_rows, target_norms)
            # Written a chunk at a time in the weight's dtype (no fp32 copy of 16-bit centres' gradient).
            grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        step = _chunk_classes(n, dim, k, r.local, chunk)
        for first in range(0, r.local, step):
            best, which, rows_w, norms, best_raw = _class_cosines(r, w, first, step, k)
            logits, slope = _negatives(best, s, threshold, curricular_t, hard_above)
            # d loss / d c = g·s·p·f'(c), p the softmax; in place, one block at a time.
            grad_best = logits.sub_(lse[:, None]).exp_().mul_(row_factor)
            _mask_target(grad_best, r.position, r.owned, first, 0.0)  # the target's share comes below
            if slope is not None:
                grad_best.mul_(slope)
            # (the clamp to [-1, 1] passes no gradient where it clamped)
            grad_best.masked_fill_(best_raw.abs() > 1.0, 0.0)
            if k == 1:
                grad_cos = grad_best
            else:
                grad_cos = torch.zeros(n, best.shape[1], k, dtype=r.dtype, device=x.device)
                grad_cos.scatter_(2, which.unsqueeze(2), grad_best.unsqueeze(2))
                grad_cos = grad_cos.view(n, rows_w.shape[0])
            # The normalisation as a rank-1 scaling (no unit copy of the centres): with S = G / |w_j|
            # column-wise, x̂'s gradient is S·w and the centres' (Sᵀx̂ projected off ŵ_j) / |w_j|.
            scaled = grad_cos.div_(norms.t())
            if r.gemm is not None:
                # Rounded to 16 bits; fp16 saturates at ±65504 rather than overflowing (centres shorter
                # than s / 65504: their gradient is then too small, as the fused op's is).
                if r.gemm == torch.float16:
                    scaled.clamp_(-65504.0, 65504.0)
                scaled = scaled.to(r.gemm)
            if needs_embeddings_grad:
                if r.gemm is None:
                    grad_x_hat.addmm_(scaled, rows_w)
                else:
                    grad_x_hat.addcmul_(g[:, None], _mm(scaled, rows_w))
            if needs_weight_grad:
                block = _mm(scaled.t(), x_hat_op)
                if r.gemm is not None:
                    block.mul_(g_max)
                dot = (block * rows_w).sum(dim=1, keepdim=True).mul_((norms > NORM_EPS).to(norms.dtype))
                block.addcmul_(rows_w, dot.div_(norms.square()), value=-1.0)
                lo, size = first * k, rows_w.shape[0]
                inside = r.owned & (r.row >= lo) & (r.row < lo + size)
                block.index_add_(0, (r.row - lo).clamp(0, size - 1),
                                 torch.where(inside[:, None], target_part, torch.zeros_like(target_part)))
                grad_w[lo:lo + size] = block
        grad_x = None
        if needs_embeddings_grad:
            grad_x_hat.addcmul_(grad_t[:, None], unit_rows)
            grad_x = _through_norm(grad_x_hat, x_hat, r.x_norm).to(x.dtype)
        return grad_x, grad_w


def shard_target_cosines(x: Tensor, w: Tensor, labels: Tensor, *, k: int = 1, ignore_index: int, class_offset: int = 0,
                         num_classes: int = -1, gemm_dtype: torch.dtype | None = None, **_: Any) -> Tensor:
    """The clamped target cosine of each row whose target ``w`` (classes [class_offset, class_offset + C)
    of ``num_classes``) holds, 0 at the others: summed over the shards (an all-reduce), every row's."""
    with torch.no_grad(), _no_autocast(x.device.type):
        r = _Targets(x, w, labels, k=k, s=1.0, m1=1.0, m2=0.0, m3=0.0, lambda_=0.0, straight_through=True,
                     ignore_index=ignore_index, class_offset=class_offset, num_classes=num_classes,
                     gemm=gemm_dtype)
        return torch.where(r.owned, r.cosine, torch.zeros_like(r.cosine))


def margined_target(target_cosine: Tensor, *, m1: float, m2: float, m3: float, lambda_: float, **_: Any) -> Tensor:
    """ψ(c_y) − m3 for clamped target cosines: the cosine a negative must beat to be hard (CurricularFace)."""
    with torch.no_grad():
        return margin_psi(target_cosine, m1=m1, m2=m2, lambda_=lambda_)[0] - m3


def moved_t(t: Tensor, target_cosine: Tensor, counted: Tensor, momentum: float) -> Tensor:
    """CurricularFace's t moved by the mean of the counted rows' clamped target cosines at rate
    ``momentum``; t as it was when no row counts or the mean is not finite (no device sync)."""
    with torch.no_grad():
        count = counted.sum()
        mean = torch.where(counted, target_cosine, torch.zeros_like(target_cosine)).sum() / count.clamp_min(1)
        moves = (count > 0) & torch.isfinite(mean)
        return torch.where(moves, t * (1 - momentum) + momentum * mean.to(t.dtype), t)


class _ChunkedLossRows(torch.autograd.Function):
    """Per-row losses (NaN at a bad label, 0 at ignored rows) and clamped target cosines of the
    chunked margin loss, with every class in ``w``. ``m2`` and ``m3``: numbers or per-row (N,) tensors,
    which get their gradients as the op's do (:func:`_row_margins_grad`)."""

    @staticmethod
    def forward(ctx, x, w, labels, curricular_t, m2, m3, options):
        rows, lse, target_cos = shard_forward(x, w, labels, curricular_t=curricular_t, m2=m2, m3=m3, **options)
        per_row = [m if isinstance(m, Tensor) else None for m in (m2, m3)]
        # (the loss rows and target cosines, N values each, for the margins' gradient)
        ctx.save_for_backward(x, w, labels, lse, curricular_t if curricular_t is not None else torch.zeros(()),
                              *per_row, *((rows, target_cos) if any(m is not None for m in per_row) else ()))
        ctx.scalar_margins = tuple(None if isinstance(m, Tensor) else m for m in (m2, m3))
        ctx.options, ctx.curricular = options, curricular_t is not None
        ctx.mark_non_differentiable(target_cos)
        return rows, target_cos

    @staticmethod
    def backward(ctx, grad_rows, _grad_target_cos):
        if torch.is_grad_enabled():  # (create_graph=True: the passes below record no graph)
            raise RuntimeError("the chunked margin loss does not support double backward (create_graph=True)")
        x, w, labels, lse, t, m2, m3, *rows_and_cosines = ctx.saved_tensors
        m2, m3 = (tensor if scalar is None else scalar for tensor, scalar in zip((m2, m3), ctx.scalar_margins))
        grad_x = grad_w = grad_m2 = grad_m3 = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x, grad_w = shard_backward(grad_rows, x, w, labels, lse, curricular_t=t if ctx.curricular else None,
                                            m2=m2, m3=m3, needs_embeddings_grad=ctx.needs_input_grad[0],
                                            needs_weight_grad=ctx.needs_input_grad[1], **ctx.options)
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            grad_m2, grad_m3 = _row_margins_grad(grad_rows, *rows_and_cosines, labels, m2, m3,
                                                 num_classes=w.shape[0] // ctx.options["k"], **ctx.options)
            grad_m2 = grad_m2.to(m2.dtype) if ctx.needs_input_grad[4] else None
            grad_m3 = grad_m3.to(m3.dtype) if ctx.needs_input_grad[5] else None
        return grad_x, grad_w, None, None, grad_m2, grad_m3, None


@torch.no_grad()
def _row_margins_grad(grad_rows: Tensor, rows: Tensor, target_cosine: Tensor, labels: Tensor, m2: float | Tensor,
                      m3: float | Tensor, *, num_classes: int, s: float, m1: float, lambda_: float, ignore_index: int,
                      **_: Any) -> tuple[Tensor, Tensor]:
    """The gradients of Σ_i grad_rows[i]·loss[i] with respect to per-row m2 and m3, as the op's autograd
    forms them (csrc/autograd.cpp) from each row's loss and clamped target cosine: with p = exp(−loss) the
    target's softmax probability, d loss/d m3 = s·(1 − p) and d loss/d m2 = −s·(1 − p)·dψ/dm2. Rows not
    counted (ignored, or an unchecked bad label) get 0; a non-finite margin's row a NaN."""
    counted = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    zero = torch.zeros_like(rows)
    weight = torch.where(counted, grad_rows.to(rows.dtype) * s * -torch.expm1(-rows), zero)
    m2 = m2.to(rows.dtype) if isinstance(m2, Tensor) else m2
    dm2 = margin_psi_dm2(torch.where(counted, target_cosine, zero), m1=m1, m2=m2, lambda_=lambda_)
    return -weight * dm2, weight


def _class_cosines(r, w, first, step, k):
    """For classes first … first + step − 1: (N, c) best sub-centre cosine (clamped), (N, c) which
    sub-centre (None for k = 1), the (c·K, D) sub-centres (as the products take them, converted a
    chunk at a time, not normalised), their norms clamped to eps (c·K, 1, compute dtype), and (N, c)
    the best cosine before the clamp. The normalisation is a rank-1 scaling of the dot products, not a
    copy of the centres (with 16-bit operands, of the embeddings too)."""
    rows = r.centres(w, first, step, k)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True, dtype=r.dtype).clamp_min(NORM_EPS)
    raw = _mm(r.x_op, rows.t()).div_(norms.t())
    if r.gemm is not None:
        raw.div_(r.x_norm)
    which = None
    if k > 1:
        raw, which = raw.view(r.x_op.shape[0], rows.shape[0] // k, k).max(dim=2)
    return raw.clamp(-1.0, 1.0), which, rows, norms, raw


def _mask_target(block, labels, counted, first, value):
    """Sets each counted row's target column in a block of classes first … to ``value`` (a scatter
    that writes every row, the others their own value: no data-dependent shape, no device sync)."""
    inside = counted & (labels >= first) & (labels < first + block.shape[1])
    column = (labels - first).clamp(0, block.shape[1] - 1).unsqueeze(1)
    kept = block.gather(1, column)
    block.scatter_(1, column, torch.where(inside.unsqueeze(1), torch.full_like(kept, value), kept))


def _through_norm(grad_unit, unit, norm):
    """The gradient of rows v from that of v / max(|v|, eps): projected off v / |v| and divided by
    |v|, or, for rows shorter than eps (divided by eps alone), just divided. In place: ``grad_unit``
    becomes the result (a block of centre rows is the size of the cosine block or larger)."""
    longer = (norm > NORM_EPS).to(norm.dtype)
    dot = (grad_unit * unit).sum(dim=1, keepdim=True).mul_(longer)
    return grad_unit.addcmul_(unit, dot, value=-1.0).div_(norm)


class _SmoothingCosines(torch.autograd.Function):
    """For each row, in ``dtype``: its target's cosine x̂·ŵ_y and its cosines' sum x̂·Σ_j ŵ_j, with
    ŵ_j = w_j / n_j, n_j = max(‖w_j‖, eps). Σ_j ŵ_j takes the centres a block at a time (no normalised copy of
    the matrix); its gradient, G/n_j − w_j·(w_j·G)/n_j³ for G the rows' x̂ weighted by their gradients (G/n_j
    alone for a row shorter than eps), is one matrix-vector product and one pass that writes the centres'
    gradient, into which the targets' rows are then added."""

    @staticmethod
    def forward(ctx, x, w, target, dtype):
        x_unit, x_norm = _unit(x.to(dtype))
        step = max(1, BLOCK_VALUES // max(1, w.shape[1]))
        unit_sum = torch.zeros(w.shape[1], dtype=dtype, device=w.device)
        norms = torch.empty(w.shape[0], 1, dtype=dtype, device=w.device)
        for first in range(0, w.shape[0], step):
            block = w[first:first + step].to(dtype)
            norms[first:first + step] = block.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
            unit_sum += norms[first:first + step, 0].reciprocal() @ block
        centres = w.index_select(0, target).to(dtype) / norms[target]
        ctx.save_for_backward(x_unit, x_norm, w, norms, target, unit_sum, centres)
        ctx.x_dtype = x.dtype
        return (x_unit * centres).sum(dim=1), x_unit @ unit_sum

    @staticmethod
    def backward(ctx, grad_target, grad_sum):
        x_unit, x_norm, w, norms, target, unit_sum, centres = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x_unit = grad_target[:, None] * centres + grad_sum[:, None] * unit_sum
            grad_x = _through_norm(grad_x_unit, x_unit, x_norm).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            weighted = grad_sum @ x_unit
            grad_w = torch.empty_like(w)
            step = max(1, BLOCK_VALUES // max(1, w.shape[1]))
            for first in range(0, w.shape[0], step):
                block, norm = w[first:first + step].to(weighted.dtype), norms[first:first + step, 0]
                along = torch.where(norm > NORM_EPS, (block @ weighted) / norm.pow(3), torch.zeros_like(norm))
                grad_w[first:first + step] = (block * -along[:, None]).addr_(norm.reciprocal(), weighted)
            grad_centres = _through_norm(grad_target[:, None] * x_unit, centres, norms[target])
            grad_w.index_add_(0, target, grad_centres.to(w.dtype))
        return grad_x, grad_w, None, None


def label_smoothing_rows(embeddings: Tensor, weight: Tensor, labels: Tensor, *, epsilon: float, s: float, m1: float,
                         m2: float | Tensor, m3: float | Tensor, lambda_: float, margin_grad: str, ignore_index: int,
                         dtype: torch.dtype) -> Tensor:
    """Per row, what ``nn.CrossEntropyLoss(label_smoothing=ε)`` adds to the margin softmax's loss:
    ε·(z_y − mean_j z_j), z_y = s·(ψ − m3) the target logit and z_j = s·c_j the C − 1 others, in ``dtype``
    (0 at rows not counted). The mean takes Σ_j c_j as x̂·Σ_j ŵ_j: one sum of the unit centres, no N x C
    matrix. (The op clamps each c_j to ±1, this sum does not: they differ by rounding only.)"""
    with _no_autocast(embeddings.device.type):
        num_classes = weight.shape[0]
        counted = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
        target_cosine, cosine_sum = _SmoothingCosines.apply(embeddings, weight,
                                                            torch.where(counted, labels, 0).long(), dtype)
        target_cosine = target_cosine.clamp(-1.0, 1.0)
        m2, m3 = (v.to(dtype) if torch.is_tensor(v) else float(v) for v in (m2, m3))
        target_logit = _TargetLogit.apply(target_cosine, float(s), float(m1), m2, m3, float(lambda_),
                                          margin_grad == "straight_through")
        mean_logit = (s * (cosine_sum - target_cosine) + target_logit) / num_classes
        rows = epsilon * (target_logit - mean_logit)
        return torch.where(counted, rows, torch.zeros_like(rows))


@overload
def check_int_option(name: str, value: int | None, *, optional: Literal[False] = ...) -> int: ...
@overload
def check_int_option(name: str, value: int | None, *, optional: bool) -> int | None: ...
def check_int_option(name: str, value: int | None, *, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an int >= 1, got {value!r}")
    return int(value)


def check_filtering_threshold(value: float) -> float:
    """Partial FC's inter-class filtering threshold: a number in [0, 1], 0 (insightface's default) for
    none."""
    if (isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real)
            or not 0 <= value <= 1):
        raise ValueError(f"interclass_filtering_threshold must be a number in [0, 1] (0: no filtering), got {value!r}")
    return float(value)


def check_curricular_t(value: float | Tensor | None, embeddings: Tensor) -> Tensor | None:
    """CurricularFace's t: None, a finite number, or a one-element float tensor (kept on the device, no
    sync), returned as a 0-dim tensor on the embeddings' device."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"curricular_t must be a number or a one-element float tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        if value.device != embeddings.device:
            raise ValueError(f"curricular_t is on {value.device}, the embeddings on {embeddings.device}")
        return value.detach().reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -LARGEST_FLOAT <= value <= LARGEST_FLOAT:
        raise ValueError(f"curricular_t must be a finite number or a one-element float tensor, got {value!r}")
    return torch.tensor(float(value), dtype=margins_dtype(embeddings.device), device=embeddings.device)


# The loss, or (loss, target cosine) with return_target_cosine=True (overloads for type checkers).
@overload
def chunked_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int = ..., s: float = ...,
                        m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                        interclass_filtering_threshold: float = ..., curricular_t: float | Tensor | None = ...,
                        reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                        return_target_cosine: Literal[False] = ..., check_labels: bool = ...,
                        class_chunk: int | None = ...) -> Tensor: ...
@overload
def chunked_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int = ..., s: float = ...,
                        m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                        interclass_filtering_threshold: float = ..., curricular_t: float | Tensor | None = ...,
                        reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                        return_target_cosine: Literal[True], check_labels: bool = ...,
                        class_chunk: int | None = ...) -> tuple[Tensor, Tensor]: ...
@overload
def chunked_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int = ..., s: float = ...,
                        m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                        interclass_filtering_threshold: float = ..., curricular_t: float | Tensor | None = ...,
                        reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                        return_target_cosine: bool, check_labels: bool = ...,
                        class_chunk: int | None = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def chunked_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int = 1, s: float = 64.0,
                        m1: float = 1.0, m2: float | Tensor = 0.5, m3: float | Tensor = 0.0, lambda_: float = 0.0,
                        interclass_filtering_threshold: float = 0.0, curricular_t: float | Tensor | None = None,
                        reduction: str = "mean", margin_grad: str = "exact", ignore_index: int = -1,
                        return_target_cosine: bool = False, check_labels: bool = True,
                        class_chunk: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The combined margin loss of :func:`arcface_ext.combined_margin_loss`, on the chunked PyTorch
    path, with what the fused op lacks (see the module's docstring):

    - ``k`` sub-centres a class: ``weight`` is (C·k, D), class c's sub-centres rows c·k … c·k + k − 1,
      and each class's cosine is the largest of its sub-centres';
    - ``interclass_filtering_threshold`` τ in (0, 1]: other classes with a cosine above τ get logit 0
      and no gradient (0: none);
    - ``curricular_t``: CurricularFace's t (a number or a one-element tensor; None: not CurricularFace).
      :class:`arcface_ext.CurricularFaceLoss` keeps it up to date.

    Filtering and CurricularFace do not go together. ``m2`` and ``m3`` may be (N,) tensors, one margin a
    row, as :func:`arcface_ext.combined_margin_loss` takes them (in the compute dtype here): only the
    targets' logits change, and a margin tensor that requires grad gets the op's gradient. Labels out of
    [0, C) that are not ``ignore_index``, and non-finite per-row margins, raise ValueError (a device
    synchronisation on a GPU), or, with ``check_labels=False`` or inside ``torch.compile``, give their
    row a NaN loss (a bad label's no gradient, a non-finite margin's a NaN one), as the fused op's
    unchecked labels and margins do. ``class_chunk`` sets how many classes a block of
    cosines holds (default: about 4M cosines a block). Under ``torch.autocast`` or with 16-bit inputs
    the matrix products take 16-bit operands, with fp32 accumulation and results (the module's
    docstring); the rest, the loss included, is fp32. Double backward is not supported."""
    k = check_int_option("k (sub-centres a class)", k)
    class_chunk = check_int_option("class_chunk", class_chunk, optional=True)
    check_arguments(embeddings, weight, labels, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, reduction=reduction,
                    margin_grad=margin_grad, ignore_index=ignore_index)
    threshold = check_filtering_threshold(interclass_filtering_threshold)
    curricular_t = check_curricular_t(curricular_t, embeddings)
    if threshold > 0 and curricular_t is not None:
        raise ValueError("interclass_filtering_threshold and curricular_t do not go together: each sets the other "
                         "classes' logits")
    return_target_cosine = check_flag("return_target_cosine", return_target_cosine)
    if weight.shape[0] % k:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of k = {k} sub-centres a class")
    num_classes = weight.shape[0] // k
    labels = labels.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    # CPU labels are checked whatever check_labels says, as the fused op checks them (no device sync).
    if (not skips_label_check(check_flag("check_labels", check_labels), labels) and not torch.compiler.is_compiling()
            and labels.device.type != "meta"):
        if bool(bad.any()):
            raise_bad_label(labels, bad, num_classes, ignore_index, "the number of classes in weight" if k == 1 else
                            f"the number of classes in weight, {k} sub-centres a class")
        check_row_margins_finite(m2, m3)
    counted = (labels != ignore_index) & ~bad
    m2, m3 = (m if isinstance(m, Tensor) else float(m) for m in (m2, m3))
    options = dict(k=k, s=float(s), m1=float(m1), lambda_=float(lambda_),
                   straight_through=margin_grad == "straight_through", ignore_index=int(ignore_index),
                   threshold=threshold, chunk=class_chunk, gemm_dtype=gemm_dtype(embeddings, weight))
    rows, target_cos = _ChunkedLossRows.apply(embeddings, weight, labels, curricular_t, m2, m3, options)
    loss = reduce_rows(rows, labels, ignore_index, reduction)
    if return_target_cosine:
        return loss, torch.where(counted, target_cos, torch.full_like(target_cos, float("nan"))).detach()
    return loss
