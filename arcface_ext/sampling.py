"""Class sampling for the margin softmax (partial FC, An et al., CVPR 2022): each training step
keeps the classes of the batch's targets and a uniform random sample of the others, and the softmax
runs over that subset only. With millions of identities it cuts the loss's work by the sample rate;
the paper reports accuracy close to the full softmax at a rate of 0.1, and more robustness to
noisy labels.

The sample is drawn without a host synchronisation (its size is fixed in advance, large enough to
hold every target), so it costs a few small kernels per step on a GPU.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ._checks import check_label_dtype, raise_bad_label


def check_sample_rate(sample_rate: float) -> float:
    if (isinstance(sample_rate, (bool, torch.Tensor)) or not isinstance(sample_rate, numbers.Real)
            or not 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def sample_size(num_classes: int, sample_rate: float, num_rows: int) -> int:
    """How many of ``num_classes`` classes a step with ``num_rows`` rows keeps: ``int(sample_rate *
    num_classes)`` as insightface's partial FC, raised to ``min(num_classes, num_rows)`` so that the
    classes of all the rows' targets always fit (at least one). (insightface's, when the targets'
    classes outnumber ``int(sample_rate * num_classes)``, is those classes alone: a size that depends
    on the batch's labels, which a sample drawn without a host synchronisation cannot have.)"""
    for name, value, least in (("num_classes", num_classes, 1), ("num_rows", num_rows, 0)):
        # (torch.SymInt: a batch size under torch.compile's dynamic shapes.)
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    sample_rate = check_sample_rate(sample_rate)
    return min(num_classes, max(1, int(sample_rate * num_classes), min(num_classes, num_rows)))


def check_label_values(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises ValueError unless every label is in [0, num_classes) or is ``ignore_index``. It reads
    one value back from the labels' device: the sampled paths remap labels before the op could
    check them."""
    if labels.device.type == "meta":  # shapes only (a model traced or sized on the meta device)
        return
    bad = bad_labels(labels, num_classes, ignore_index)
    if bool(bad.any()):
        raise_bad_label(labels, bad, num_classes, ignore_index, "num_classes")


@torch.no_grad()
def sample_classes(labels: Tensor, num_classes: int, sample_rate: float, *, class_start: int = 0,
                   ignore_index: int = -1, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A sample of the classes [class_start, class_start + num_classes) for one step.

    Every class that is the target of a counted row (a label in that range, not ``ignore_index``)
    is kept; the rest of the ``sample_size(num_classes, sample_rate, len(labels))`` places go to
    other classes drawn uniformly without replacement (``generator``, or the default generator of
    the labels' device).

    Returns ``(index, positions)``: ``index`` (K,) int64, the sampled classes as offsets from
    ``class_start``, sorted; ``positions`` (N,) int64, each row's target's place in ``index``, or -1
    for rows that are ignored or whose target lies outside the range. Labels are not range-checked
    here (see :func:`check_label_values`).
    """
    sample_rate = check_sample_rate(sample_rate)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor, got {getattr(labels, 'shape', type(labels).__name__)}")
    check_label_dtype(labels)
    device = labels.device
    labels = labels.long()
    k = sample_size(num_classes, sample_rate, labels.shape[0])
    local = labels - class_start
    targeted = (labels != ignore_index) & (local >= 0) & (local < num_classes)
    safe = torch.where(targeted, local, torch.zeros_like(local))
    if k == num_classes:
        index = torch.arange(num_classes, device=device)
    else:
        # Targets score 2, every other class a uniform draw in [0, 1): the top k are the targets and
        # a uniform sample of the rest. amax keeps a scatter of several rows onto a class exact.
        # (No generator argument when there is none: torch.compile cannot trace rand's generator
        # overload for a size that changes between calls.)
        scores = torch.rand(num_classes, device=device,  # type: ignore[call-overload]  # (**{generator})
                            **({} if generator is None else {"generator": generator}))
        scores.scatter_reduce_(0, safe, targeted.to(scores.dtype) * 2.0, reduce="amax")
        index = torch.topk(scores, k, sorted=False).indices.sort().values
    positions = torch.searchsorted(index, safe)
    return index, torch.where(targeted, positions, torch.full_like(positions, -1))


def bad_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Which rows' labels are neither in [0, num_classes) nor ``ignore_index`` (no host sync)."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))


def sample_step(labels: Tensor, num_classes: int, sample_rate: float, ignore_index: int,
                skip_check: bool) -> tuple[Tensor, Tensor]:
    """Partial FC's sample for one call of a replicated loss: the labels checked (a ValueError), or with
    ``skip_check`` a bad row given the position past the sample (the loss gives it a NaN), then the
    sample drawn. Returns (index, positions) as :func:`sample_classes`, ignored rows at -1."""
    bad = None
    if skip_check:
        bad = bad_labels(labels, num_classes, ignore_index)
    else:
        check_label_values(labels, num_classes, ignore_index)
    index, positions = sample_classes(labels, num_classes, sample_rate, ignore_index=ignore_index)
    if bad is not None:
        positions = positions.masked_fill(bad, index.shape[0])
    return index, positions
