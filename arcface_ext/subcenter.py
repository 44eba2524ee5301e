"""Sub-center ArcFace (Deng et al., ECCV 2020): each class owns K centres, and a sample's cosine to a
class is its largest cosine to that class's K sub-centres; the margin, the scale and the softmax are
then the combined margin loss's. Trained on noisy data, a class's clean images gather at one dominant
sub-centre and its noise at the others, which ``train.tools.clean`` then drops.

The class centres are ``weight`` (C·K, D), class c's sub-centres its rows c·K … c·K + K − 1 (as
insightface's reshape to (N, C, K) reads them). This is the chunked PyTorch path of
:mod:`arcface_ext.chunked`, not the fused op: it never holds the N x C·K matrix, and computes in fp32
(fp64 for fp64 inputs); under autocast or with 16-bit inputs only its matrix products take 16-bit
operands, with fp32 accumulation and results. A sample's gradient reaches only the sub-centre that won
its max, as the max's derivative says.
"""
from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor, nn
from torch.types import Device

from ._checks import check_arguments, check_centres_dtype, check_flag, check_options, skips_label_check
from . import reference
from .chunked import check_filtering_threshold, check_int_option, chunked_margin_loss
from .modules import NO_SINGLE_MARGIN, LossModule
from .sampling import check_sample_rate, sample_step


# The loss, or (loss, target cosine) with return_target_cosine=True (overloads for type checkers).
@overload
def subcenter_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int, s: float = ...,
                          m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                          reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                          return_target_cosine: Literal[False] = ...,
                          check_labels: bool = ..., class_chunk: int | None = ...,
                          interclass_filtering_threshold: float = ...) -> Tensor: ...
@overload
def subcenter_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int, s: float = ...,
                          m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                          reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                          return_target_cosine: Literal[True],
                          check_labels: bool = ..., class_chunk: int | None = ...,
                          interclass_filtering_threshold: float = ...) -> tuple[Tensor, Tensor]: ...
@overload
def subcenter_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int, s: float = ...,
                          m1: float = ..., m2: float | Tensor = ..., m3: float | Tensor = ..., lambda_: float = ...,
                          reduction: str = ..., margin_grad: str = ..., ignore_index: int = ...,
                          return_target_cosine: bool,
                          check_labels: bool = ..., class_chunk: int | None = ...,
                          interclass_filtering_threshold: float = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def subcenter_margin_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, k: int, s: float = 64.0,
                          m1: float = 1.0, m2: float | Tensor = 0.5, m3: float | Tensor = 0.0, lambda_: float = 0.0,
                          reduction: str = "mean", margin_grad: str = "exact", ignore_index: int = -1,
                          return_target_cosine: bool = False, check_labels: bool = True, class_chunk: int | None = None,
                          interclass_filtering_threshold: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
    """The combined margin loss of :func:`arcface_ext.combined_margin_loss` with ``k`` sub-centres a
    class: ``weight`` is (C·k, D), class c's sub-centres rows c·k … c·k + k − 1, and each class's
    cosine is the largest of its sub-centres'. ``m2`` and ``m3`` may be per-row (N,) tensors, as
    :func:`arcface_ext.chunked_margin_loss` takes them. Labels out of [0, C) that are not
    ``ignore_index`` raise ValueError (a device synchronisation on a GPU), or, with
    ``check_labels=False`` or inside ``torch.compile``, give their row a NaN loss and no gradient, as
    the fused op's unchecked labels do. ``class_chunk`` sets how many classes a block of
    cosines holds (default: about 4M cosines a block); ``interclass_filtering_threshold`` as
    :func:`arcface_ext.chunked_margin_loss`'s. Double backward is not supported."""
    return chunked_margin_loss(embeddings, weight, labels, k=k, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_,
                               interclass_filtering_threshold=interclass_filtering_threshold, reduction=reduction,
                               margin_grad=margin_grad, ignore_index=ignore_index,
                               return_target_cosine=return_target_cosine, check_labels=check_labels,
                               class_chunk=class_chunk)


class SubCenterMarginLoss(LossModule):
    """The sub-center margin loss with its own class centres ``weight`` (num_classes·k, D): ArcFace
    (the defaults), CosFace (``m2=0, m3=...``), SphereFace or their combination, as
    :class:`arcface_ext.CombinedMarginLoss`. ``k=3`` is the paper's choice. Called as
    ``criterion(embeddings, labels)``; ``return_target_cosine=True`` also returns each row's target
    cosine (to its best sub-centre). ``interclass_filtering_threshold`` > 0 also filters the other
    classes as arcface_torch does (:mod:`arcface_ext.chunked`). ``sample_rate`` < 1 is partial FC as
    in :class:`arcface_ext.CombinedMarginLoss` (training mode; a sampled class brings its k
    sub-centres; ``last_sampled_classes``). ``use_reference=True`` runs
    :func:`arcface_ext.reference.subcenter_margin_loss` (the whole matrix) instead.
    :class:`arcface_ext.ShardedSubCenterMarginLoss` is the same with sharded class centres."""

    m = NO_SINGLE_MARGIN

    def __init__(self, num_classes: int, embedding_size: int, k: int = 3, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, lambda_: float = 0.0, *, reduction: str = "mean",
                 margin_grad: str = "exact", ignore_index: int = -1, check_labels: bool = True,
                 class_chunk: int | None = None, interclass_filtering_threshold: float = 0.0,
                 sample_rate: float = 1.0, use_reference: bool = False, device: Device = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size), ("k", k)):
            check_int_option(name, value)
        class_chunk = check_int_option("class_chunk", class_chunk, optional=True)
        check_options(s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, reduction=reduction, margin_grad=margin_grad,
                      ignore_index=ignore_index)
        self.check_labels = check_flag("check_labels", check_labels)
        self.interclass_filtering_threshold = check_filtering_threshold(interclass_filtering_threshold)
        self.num_classes, self.embedding_size, self.k = int(num_classes), int(embedding_size), int(k)
        self.s, self.m1, self.m2, self.m3, self.lambda_ = float(s), float(m1), float(m2), float(m3), float(lambda_)
        self.reduction, self.margin_grad, self.ignore_index = reduction, margin_grad, int(ignore_index)
        self.class_chunk = class_chunk
        self.sample_rate = check_sample_rate(sample_rate)
        self.last_sampled_classes = None
        self.use_reference = check_flag("use_reference", use_reference)
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.k, self.embedding_size, device=device,
                                               dtype=check_centres_dtype(dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.01), insightface's initialisation, as CombinedMarginLoss's (for deferred initialisation:
        built under ``torch.device("meta")``, then ``to_empty`` and this)."""
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: Tensor, labels: Tensor,
                return_target_cosine: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        weight, ignore_index, check_labels = self.weight, self.ignore_index, self.check_labels
        if self.training and self.sample_rate < 1.0:
            check_arguments(embeddings, weight, labels, s=self.s, m1=self.m1, m2=self.m2, m3=self.m3,
                            lambda_=self.lambda_, reduction=self.reduction, margin_grad=self.margin_grad,
                            ignore_index=ignore_index)
            index, labels = sample_step(labels, self.num_classes, self.sample_rate, ignore_index,
                                        skips_label_check(check_labels, labels))
            self.last_sampled_classes = index
            rows = (index[:, None] * self.k + torch.arange(self.k, device=index.device)).reshape(-1)
            # Ignored rows are -1 among the positions; the labels were checked (or marked) above.
            weight, ignore_index, check_labels = weight.index_select(0, rows), -1, False
        if self.use_reference:
            return reference.chunked_margin_loss(
                embeddings, weight, labels, k=self.k, s=self.s, m1=self.m1, m2=self.m2, m3=self.m3,
                lambda_=self.lambda_, interclass_filtering_threshold=self.interclass_filtering_threshold,
                reduction=self.reduction, margin_grad=self.margin_grad, ignore_index=ignore_index,
                return_target_cosine=return_target_cosine, check_labels=check_labels)
        return chunked_margin_loss(embeddings, weight, labels, k=self.k, s=self.s, m1=self.m1, m2=self.m2,
                                   m3=self.m3, lambda_=self.lambda_,
                                   interclass_filtering_threshold=self.interclass_filtering_threshold,
                                   reduction=self.reduction, margin_grad=self.margin_grad,
                                   ignore_index=ignore_index, return_target_cosine=return_target_cosine,
                                   check_labels=check_labels, class_chunk=self.class_chunk)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, k={self.k}, s={self.s}, "
                f"m1={self.m1}, m2={self.m2}, m3={self.m3}"
                + (f", lambda_={self.lambda_}" if self.lambda_ else "")
                + (f", interclass_filtering_threshold={self.interclass_filtering_threshold}"
                   if self.interclass_filtering_threshold else "")
                + (f", margin_grad={self.margin_grad!r}" if self.margin_grad != "exact" else "")
                + (f", sample_rate={self.sample_rate}" if self.sample_rate < 1.0 else "")
                + ("" if self.check_labels else ", check_labels=False")
                + (", use_reference=True" if self.use_reference else ""))
