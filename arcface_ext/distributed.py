"""Model parallelism for the class centres: each rank of a process group holds one contiguous shard
of the C x D class-centre matrix, so that neither the centres, their gradient and optimizer state,
nor a C x D gradient all-reduce have to be replicated on every GPU (Glint360K, WebFace42M).

Per step the ranks all-gather their embeddings and labels (N·D values, not C·D), each runs the fused
op on its shard of the classes over the whole gathered batch, and the per-row softmax statistics
(log-sum-exp, target logit) are combined with two all-reduces of N values. The backward runs the
fused op's backward on each shard with the whole softmax's log-sum-exp, and reduce-scatters the
embeddings' gradient back to the rank that owns each row. The result is the loss and the gradients
that a replicated classifier under DistributedDataParallel would give:

- each rank's loss is over its own rows, as with a replicated classifier;
- each rank's embeddings get the gradient of its own loss (all shards' parts summed);
- each shard of the class centres gets the mean over ranks of the gradients of the ranks' losses,
  which is what DDP's gradient averaging gives a replicated classifier.

Every rank must call the loss at the same points, with the same options (it runs collectives);
the local batch sizes may differ.
"""
from __future__ import annotations

import copy
import functools
import itertools
import math
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.types import Device
from torch.nn.utils import parametrize

from . import chunked, ops
from ._checks import (FLOAT_DTYPES, MARGIN_GRADS, check_arguments, check_centres_dtype, check_flag, check_row_margin,
                      fused_compute_dtype, is_dtensor, nan_at_ignored, raise_bad_label, scalar_margin,
                      skips_label_check, stack_row_margins)
from .functional import check_device_has_kernel, get_workspace_bytes, require_extension
from .chunked import check_filtering_threshold
from .modules import NO_SINGLE_MARGIN, AdaFaceMargins, CurricularFaceT, ElasticFaceMargins, LossModule, set_loss_options
from .sampling import bad_labels, sample_classes, sample_size

# torch 2.13 renamed the single-tensor collectives; the older names still work on older versions.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def class_shard(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The classes [start, stop) that rank ``rank`` of ``world_size`` holds: contiguous runs whose
    sizes differ by at most one (the first ``num_classes % world_size`` ranks hold one more)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
    if num_classes < world_size:
        raise ValueError(f"num_classes ({num_classes}) must be at least the number of ranks ({world_size}): "
                         "every rank holds at least one class centre")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _some_shard_holds(num_classes: int, classes: int) -> bool:
    """Whether some rank of some number of ranks (2 or more) holds ``classes`` of ``num_classes`` in
    :func:`class_shard`: on n ranks a shard holds C // n or -(-C // n) classes, and the only n that can
    give ``classes`` are C // classes and -(-C // classes)."""
    return classes > 0 and any(2 <= ranks <= num_classes and classes in (num_classes // ranks, -(-num_classes // ranks))
                               for ranks in (num_classes // classes, -(-num_classes // classes)))


def _group_info(group):
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of process_group")
        return rank, dist.get_world_size(group)
    if group is not None:
        raise RuntimeError("a process group was given but torch.distributed is not initialised")
    return 0, 1


def _option_text(name, bits):
    """``name=value`` for an option that travelled as a float64's bits in an int64."""
    value = torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()
    if name == "margin_grad":
        return f"margin_grad={MARGIN_GRADS[int(value)]!r}"
    if name in ("num_classes", "embedding_size", "ignore_index"):
        return f"{name}={int(value)}"
    if name == "plus":
        return f"plus={bool(value)}"
    return f"{name}={value!r}"


def _all_gather_rows(local, rows, group, world_size):
    """(world_size * rows, ...) from every rank's ``local`` padded to ``rows`` rows with zeros."""
    if world_size == 1:
        return local
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[:local.shape[0]] = local
    out = local.new_empty((world_size * rows, *local.shape[1:]))
    _all_gather_single(out, padded.contiguous(), group=group)
    return out


class _ShardedMarginSoftmax(torch.autograd.Function):
    """Per-row losses of this rank's rows and their target cosines, for a weight shard (or the
    sampled rows ``index`` of it), given every rank's labels as the op is to see them. ``options``
    are the op's arguments after the labels, up to the per-row margins (None or every rank's);
    ``check_labels`` whether the op checks the labels' values (a sync on a GPU). ``chunked_spec``:
    None for the fused op, else the chunked path's ``threshold``, ``curricular`` (None, or
    CurricularFace's (t, momentum, whether t moves)) and ``gemm_dtype``; the third output is t as
    this call moved it, or None."""

    @staticmethod
    def forward(ctx, embeddings, weight, all_labels, index, rows, options, group, check_labels, chunked_spec):
        ignore_index, class_start, num_classes = options[5], options[8], options[9]
        rank, world_size = _group_info(group)
        n = embeddings.shape[0]
        all_embeddings = _all_gather_rows(embeddings.detach(), rows, group, world_size)
        classes = weight.detach() if index is None else weight.detach().index_select(0, index)

        spec, t, k = None, None, 1
        if chunked_spec is not None:  # the chunked PyTorch path, with the op's shard semantics
            spec = _chunked_options(options, chunked_spec["threshold"])
            k = chunked_spec.get("k", 1)  # (sub-centres: k rows of weight a class)
            spec.update(gemm_dtype=chunked_spec["gemm_dtype"], k=k)
            if chunked_spec["curricular"] is not None:
                # CurricularFace: every row's target cosine (from the shard that holds its target) for
                # its hard-negative test on every shard, and the mean that moves t, the same on all ranks.
                t, momentum, moving = chunked_spec["curricular"]
                target_cosine = chunked.shard_target_cosines(all_embeddings, classes, all_labels, **spec)
                if world_size > 1:
                    dist.all_reduce(target_cosine, group=group)
                if moving:
                    t = chunked.moved_t(t, target_cosine, (all_labels != ignore_index) & (all_labels >= 0)
                                        & (all_labels < num_classes), momentum)
                spec.update(curricular_t=t, hard_above=chunked.margined_target(target_cosine, **spec))
            loss, lse, cosine = chunked.shard_forward(all_embeddings, classes, all_labels, **spec)
        else:
            loss, lse, cosine = ops.margin_softmax_forward(all_embeddings, classes, all_labels, *options,
                                                           check_labels)
        if world_size > 1:
            # The whole softmax's log-sum-exp from the shards' (max first, for range), and the target
            # logit and cosine from the shard that holds each row's target (zero on the others).
            counted = all_labels != ignore_index
            owned = counted & (all_labels >= class_start) & (all_labels < class_start + classes.shape[0] // k)
            lse_max = lse.clone()
            dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
            zero = torch.zeros_like(lse)
            parts = torch.stack([torch.exp(lse - lse_max), torch.where(owned, lse - loss, zero),
                                 torch.where(owned, cosine, zero)])
            dist.all_reduce(parts, group=group)
            lse = lse_max + torch.log(parts[0])
            loss = torch.where(counted, lse - parts[1], torch.zeros_like(lse))
            cosine = parts[2]
            if not check_labels:  # a bad label's row: NaN, as the op gives it on each shard
                bad = bad_labels(all_labels, num_classes, ignore_index)
                loss = loss.masked_fill(bad, float("nan"))
                cosine = cosine.masked_fill(bad, float("nan"))
        mine = slice(rank * rows, rank * rows + n)
        ctx.save_for_backward(all_embeddings, classes, all_labels, lse, index)
        ctx.options, ctx.group, ctx.world_size, ctx.mine, ctx.rows = options, group, world_size, mine, rows
        ctx.spec = spec
        ctx.weight_shape = weight.shape
        ctx.mark_non_differentiable(cosine)
        ctx.set_materialize_grads(False)
        if t is not None:
            ctx.mark_non_differentiable(t)
        return loss[mine], cosine[mine], t

    @staticmethod
    def backward(ctx, grad_loss, grad_cosine, grad_t=None):
        if torch.is_grad_enabled():
            raise RuntimeError("the sharded margin loss does not support double backward (create_graph=True)")
        all_embeddings, classes, all_labels, lse, index = ctx.saved_tensors
        options = ctx.options
        needs_embeddings_grad, needs_weight_grad = ctx.needs_input_grad[:2]
        world_size, n = ctx.world_size, ctx.mine.stop - ctx.mine.start
        if grad_loss is None:  # every rank skips alike: only the target cosines were used
            grad_loss = lse.new_zeros(n)
        all_grad = _all_gather_rows(grad_loss.to(lse.dtype), ctx.rows, ctx.group, world_size)
        if ctx.spec is not None:
            grad_embeddings, grad_classes = chunked.shard_backward(
                all_grad, all_embeddings, classes, all_labels, lse, needs_embeddings_grad=needs_embeddings_grad,
                needs_weight_grad=needs_weight_grad, **ctx.spec)
        else:
            # The forward checked these labels (or was told not to): no second check, no second sync.
            grad_embeddings, grad_classes = ops.margin_softmax_backward(
                all_grad, all_embeddings, classes, all_labels, lse, *options[:8], needs_embeddings_grad,
                needs_weight_grad, *options[8:], False)
        grad_x = grad_w = None
        if needs_embeddings_grad:
            if world_size > 1:
                # Each rank's rows get the sum over shards of their gradient (in fp32 at least, so
                # that 16-bit parts are rounded once, after the sum).
                parts = grad_embeddings.to(torch.promote_types(grad_embeddings.dtype, torch.float32))
                grad_x = parts.new_empty((ctx.rows, parts.shape[1]))
                _reduce_scatter_single(grad_x, parts, group=ctx.group)
                grad_x = grad_x[:n].to(grad_embeddings.dtype)
            else:
                grad_x = grad_embeddings
        if needs_weight_grad:
            if index is not None:  # the classes left out of the sample get no gradient
                grad_classes = grad_classes.new_zeros(ctx.weight_shape).index_copy_(0, index, grad_classes)
            grad_w = grad_classes / world_size if world_size > 1 else grad_classes
        return grad_x, grad_w, None, None, None, None, None, None, None


def _chunked_options(options, threshold):
    """The op's options (after the labels) as :func:`arcface_ext.chunked.shard_forward`'s keywords."""
    s, m1, m2, m3, lambda_, ignore_index, straight_through, _, class_start, num_classes, margins = options
    if margins is not None:
        raise ValueError("the chunked path (inter-class filtering, CurricularFace) does not take per-row margins")
    return dict(s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, ignore_index=ignore_index,
                straight_through=straight_through, class_offset=class_start, num_classes=num_classes,
                threshold=threshold)


class ShardedCombinedMarginLoss(LossModule):
    """:class:`arcface_ext.CombinedMarginLoss` with its class centres split across the ranks of
    ``process_group`` (the default group when None; without torch.distributed initialised, one
    rank holding everything). Rank r owns ``weight`` = the centres of classes
    [``class_start``, ``class_stop``) (see :func:`class_shard`); labels are global class indices.

    Called as ``criterion(embeddings, labels, return_target_cosine=False)`` with this rank's rows;
    the loss is over this rank's rows (``reduction`` as for the unsharded loss). See the module's
    docstring for the gradients. It is not to be wrapped in DistributedDataParallel (its
    ``sharded`` attribute says so to the bundled trainer): DDP would broadcast rank 0's shard over
    the others'. Wrapped on its own, DDP is told to leave ``weight`` alone and refuses the module;
    inside a larger wrapped module, call :func:`ddp_ignore_shards` on that module first (the next
    call raises on every rank when it finds the shards overwritten).

    Every rank calls it alike: the same training mode and dtypes, gradients needed or not on every
    rank, a module built with the same options. The ranks compare these (and whether each rank's
    arguments passed their checks) in the call's first collective, so that a rank that differs makes
    every rank raise, rather than the others waiting in a collective it never joins.

    Its ``state_dict`` records the classes it holds. ``load_state_dict`` takes a state of the same
    shard, or the whole (num_classes, D) matrix (a gathered or a replicated loss's state), of which it
    keeps this rank's rows (num_classes·k rows with k sub-centres a class); a shard of another layout
    (another number of ranks, or of sub-centres) is an error.

    ``sample_rate`` < 1 is partial FC as insightface runs it: in training mode each rank keeps the
    classes of its shard that are targets anywhere in the gathered batch and a uniform sample of
    its other classes (``sample_size(shard size, sample_rate, gathered rows)`` in all), and the
    softmax runs over the union of the ranks' samples. The centres left out get no gradient that
    step. In eval mode every class counts.

    ``check_labels=False`` skips the check of the gathered labels' values on GPUs (a device
    synchronisation): a bad label gives its row a NaN loss on every rank instead. The call's first
    collective still reads its answer back.

    ``interclass_filtering_threshold`` > 0 is Partial FC's inter-class filtering, as in
    :class:`arcface_ext.CombinedMarginLoss` (insightface runs it on sharded centres): each shard
    filters its own classes, on the chunked PyTorch path (:mod:`arcface_ext.chunked`) instead of the
    fused op; the collectives are the same.
    """

    sharded = True
    curricular = False  # (ShardedCurricularFaceLoss)
    # A subclass's own options that the ranks must share, compared as _agree compares the others'.
    compared_options: tuple[str, ...] = ()
    m = NO_SINGLE_MARGIN  # (the subclasses with one: their mixins')

    def chunked_spec(self) -> dict[str, Any] | None:
        """The chunked path's options for this call (see _ShardedMarginSoftmax), or None for the fused op."""
        if self.interclass_filtering_threshold or self.k > 1:
            return {"threshold": self.interclass_filtering_threshold, "curricular": None, "k": self.k}
        return None

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0, lambda_: float = 0.0, *, reduction: str = "mean", margin_grad: str = "exact",
                 ignore_index: int = -1, sample_rate: float = 1.0, check_labels: bool = True,
                 interclass_filtering_threshold: float = 0.0, process_group: dist.ProcessGroup | None = None,
                 device: Device = None, dtype: torch.dtype | None = None, _k: int = 1) -> None:
        super().__init__()
        self.k = _k  # rows of weight a class: sub-centres (ShardedSubCenterMarginLoss)
        set_loss_options(self, num_classes, embedding_size, s, m1, m2, m3, lambda_, reduction, margin_grad,
                         ignore_index, sample_rate, check_labels)
        self.interclass_filtering_threshold = check_filtering_threshold(interclass_filtering_threshold)
        if self.interclass_filtering_threshold and (getattr(self, "per_row_margins", False) or self.curricular):
            raise ValueError(f"interclass_filtering_threshold does not go with {type(self).__name__}'s "
                             f"{'hard negatives' if self.curricular else 'per-row margins'}")
        self.process_group = process_group
        self.rank, self.world_size = _group_info(process_group)
        self.class_start, self.class_stop = class_shard(num_classes, self.rank, self.world_size)
        self.weight = nn.Parameter(torch.empty((self.class_stop - self.class_start) * self.k, embedding_size,
                                               device=device, dtype=check_centres_dtype(dtype)))
        # DistributedDataParallel's broadcast of rank 0's parameters would overwrite the other shards.
        self._ddp_params_and_buffers_to_ignore = ["weight"]
        self.reset_parameters()

    def __setattr__(self, name: str, value: Any) -> None:
        # FSDP2's fully_shard of a module that holds this loss (or of the loss) sets a DTensor, its shard of
        # each parameter, in the parameter's place, through setattr for a module that defines __setattr__.
        # The rank's shard of the classes would be split again as though it were the whole matrix, and each
        # forward would all-gather a mix of the ranks' shards (the same on every rank), or, for shards of
        # unequal sizes, abort (gloo) in that all-gather before this loss runs: refused here, before any
        # collective.
        if name == "weight" and is_dtensor(value):
            raise ValueError(
                f"{type(self).__name__}.weight is this rank's shard of the class centres (classes "
                f"[{self.class_start}, {self.class_stop}) of {self.num_classes}) and cannot be sharded again (FSDP2's "
                "fully_shard, or a DTensor): leave it out, fully_shard(model, ignored_params={loss.weight}), or keep "
                "the loss outside the module you shard, and do not fully_shard the loss itself")
        super().__setattr__(name, value)

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardedCombinedMarginLoss:
        # A process group is a handle on the ranks' connections, which can be neither copied nor
        # pickled: a copy (an EMA or SWA model made with copy.deepcopy) shares it.
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))
        return copied

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.01) as insightface initialises its centres. The ranks draw the same full matrix,
        a block at a time, and keep their rows: the result does not depend on the number of ranks,
        provided every rank's default generator is in the same state (seed them alike)."""
        if self.weight.is_meta:  # deferred initialisation: no values to draw
            return
        # From the CPU's default generator, wherever the weight is: under torch.device("meta") (or "cuda")
        # as the default device, randint without a device drew a meta tensor, which int() refused.
        seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        generator = torch.Generator(device=self.weight.device).manual_seed(seed)
        # The same blocks on every rank (the values a draw gives depend on its size).
        block = max(1, (1 << 24) // self.embedding_size)
        first, last = self.class_start * self.k, self.class_stop * self.k  # (rows: k a class)
        for start in range(0, last, block):
            stop = min(start + block, self.num_classes * self.k)
            values = torch.randn(stop - start, self.embedding_size, generator=generator,
                                 device=self.weight.device, dtype=torch.float32).mul_(0.01)
            lo, hi = max(start, first), min(stop, last)
            if lo < hi:
                self.weight[lo - first:hi - first] = values[lo - start:hi - start]

    # The classes the shard holds, in the state dict as a tensor, not a dict: tools that write state dicts
    # with safetensors (Accelerate's save_state and save_model by default) take tensors only.
    extra_state_fields = ("num_classes", "class_start", "class_stop", "k")

    def get_extra_state(self) -> Tensor:
        return torch.tensor([getattr(self, name) for name in self.extra_state_fields], dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        pass  # checked against the weight in _load_from_state_dict

    @classmethod
    def _shard_record(cls, state):
        """get_extra_state's record as a dict (a state dict's tensor, or the dict older versions wrote,
        without "k" where it was 1), or None."""
        if isinstance(state, torch.Tensor) and state.shape == (len(cls.extra_state_fields),):
            return dict(zip(cls.extra_state_fields, state.tolist()))
        if isinstance(state, dict):
            return {"k": 1, **state}
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # state_dict is load_state_dict's own copy: its entries may be replaced.
        weight_key, extra_key = prefix + "weight", prefix + "_extra_state"
        mine = self._shard_record(self.get_extra_state())
        weight = state_dict.get(weight_key)
        saved = self._shard_record(state_dict[extra_key]) if extra_key in state_dict else mine  # older states: none
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == self.num_classes * self.k:
            state_dict[weight_key] = self.shard_of(weight)  # the whole matrix: this rank's rows
            if local_metadata.get("assign_to_params_buffers", False) and self.world_size > 1:
                # load_state_dict(assign=True) makes the state's tensor the parameter: a view of the whole
                # matrix would keep all of it in this rank's memory, and torch.save of the module's state
                # writes a view's whole storage. The rank's rows alone, as a copy.
                state_dict[weight_key] = state_dict[weight_key].clone()
        elif saved is not None and saved["k"] != self.k:
            error_msgs.append(f"{weight_key} holds {saved['k']} sub-centre(s) a class, this module {self.k}")
            return
        elif saved is not None and saved["num_classes"] != self.num_classes:
            # (Not a matter of ranks, as the message below would say: the whole matrix would not load either.)
            error_msgs.append(f"{weight_key} holds centres of a loss of {saved['num_classes']} classes, this module "
                              f"has {self.num_classes} (num_classes)")
            return
        elif saved is not None and saved != mine:
            held = (saved["class_start"], saved["class_stop"])
            ranks = [r for r in range(self.world_size) if class_shard(self.num_classes, r, self.world_size) == held]
            if saved["num_classes"] == self.num_classes and ranks:
                why = (f"that is rank {ranks[0]}'s shard: a checkpoint that one rank wrote (PyTorch Lightning's and "
                       "Accelerate's under DDP are rank 0's) holds that rank's shard alone. Save the whole matrix "
                       "and its optimizer state with arcface_ext.full_state_dict(model, optimizer), called on every "
                       "rank")
            else:
                why = ("to change the number of ranks, save the whole matrix with "
                       "arcface_ext.full_state_dict(model, optimizer) and load that")
            error_msgs.append(
                f"{weight_key} holds classes [{saved['class_start']}, {saved['class_stop']}) of "
                f"{saved['num_classes']}, this rank holds [{self.class_start}, {self.class_stop}) of "
                f"{self.num_classes}: {why}")
            return
        elif (extra_key not in state_dict and isinstance(weight, torch.Tensor) and weight.dim() == 2
              and weight.shape[0] != self.weight.shape[0]):
            # A matrix without the shard's record (a replicated loss's, another library's) of another size: torch's
            # size mismatch would name this rank's shape only.
            whole = self.num_classes * self.k
            own = "" if self.world_size == 1 else (f" nor this rank's {self.weight.shape[0]} (classes "
                                                   f"[{self.class_start}, {self.class_stop}))")
            # (D, C): another library's layout (pytorch-metric-learning's W), whose transpose is the centres.
            turned = ("; it is (D, C), the centres as columns (pytorch-metric-learning's W): load its transpose, .t()"
                      if tuple(weight.shape) == (self.embedding_size, whole) else "")
            error_msgs.append(f"{weight_key} has {weight.shape[0]} rows: not the whole centres' {whole} "
                              f"({self.num_classes} classes{'' if self.k == 1 else f', {self.k} sub-centres a class'})"
                              f"{own}{turned}")
            return
        state_dict[extra_key] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def shard_of(self, full: Tensor) -> Tensor:
        """This rank's rows of a tensor that has one row per class (k with sub-centres, as ``weight``;
        e.g. a checkpoint's centres)."""
        if full.shape[0] != self.num_classes * self.k:
            per_class = "one per class" if self.k == 1 else f"{self.k} per class"
            raise ValueError(f"expected {self.num_classes * self.k} rows ({per_class}), got shape "
                             f"{tuple(full.shape)}")
        return full[self.class_start * self.k:self.class_stop * self.k]

    def gather(self, shard: Tensor, dst: int = 0, *, piece_bytes: int = 64 << 20) -> Tensor | None:
        """The full (num_classes·k, ...) tensor from every rank's ``shard`` (this rank's rows of it,
        e.g. its weight or its optimizer state), on rank ``dst`` in host memory (None on the others).
        Collective: every rank calls it.

        The rows travel in pieces of at most ``piece_bytes`` per rank, each copied to the host as it
        arrives, so rank ``dst``'s device holds at most world_size pieces at a time rather than the
        whole matrix twice over: at WebFace42M's 2M x 512 fp32 centres the whole is 4.2 GB, and a
        checkpoint gathers it once for the centres and once for each optimizer state."""
        k = self.k
        if shard.shape[0] != (self.class_stop - self.class_start) * k:
            raise ValueError(f"expected this rank's {(self.class_stop - self.class_start) * k} rows, got shape "
                             f"{tuple(shard.shape)}")
        if self.world_size == 1:
            return shard.detach().to("cpu", copy=True)
        bounds = [(start * k, stop * k) for start, stop in
                  (class_shard(self.num_classes, r, self.world_size) for r in range(self.world_size))]
        largest = bounds[0][1] - bounds[0][0]  # the first shard is the largest
        row_bytes = shard[0].numel() * shard.element_size()  # every shard has at least one row
        rows_per_piece = max(1, min(largest, piece_bytes // row_bytes))
        full: Any = None  # (and pieces: tensors on rank dst alone)
        if self.rank == dst:
            full = torch.empty((self.num_classes * k, *shard.shape[1:]), dtype=shard.dtype, device="cpu",
                               pin_memory=shard.is_cuda)
        # gather's group_dst (a rank in the group) is torch 2.6's; dst is global in every version.
        group = dist.group.WORLD if self.process_group is None else self.process_group
        global_dst = dist.get_global_rank(group, dst)  # type: ignore[arg-type]  # (WORLD: set once initialised)
        shard = shard.detach()
        for begin in range(0, largest, rows_per_piece):
            end = min(begin + rows_per_piece, largest)
            piece = shard.new_zeros((end - begin, *shard.shape[1:]))
            mine = shard[begin:end]
            piece[:mine.shape[0]] = mine
            pieces: Any = [torch.empty_like(piece) for _ in bounds] if self.rank == dst else None
            dist.gather(piece, pieces, dst=global_dst, group=self.process_group)
            if self.rank == dst:
                for (start, stop), received in zip(bounds, pieces):
                    count = max(0, min(end, stop - start) - begin)
                    full[start + begin:start + begin + count].copy_(received[:count])
        return full

    def _agree(self, embeddings, labels, error):
        """The call's first collective: every rank's batch size, whether its arguments passed their
        checks (``error`` is its own exception, or None), and how it calls (compute dtype, training
        mode, gradients, label check: a rank that checks would raise alone; sub-centres a class).
        Raises on every rank when any rank failed or they differ; returns the largest local batch size."""
        if error is not None and self.world_size == 1:
            raise error
        rank, world_size = _group_info(self.process_group)
        if (rank, world_size) != (self.rank, self.world_size):
            raise RuntimeError(f"this loss was built for rank {self.rank} of {self.world_size} but is called on rank "
                               f"{rank} of {world_size}: build it after torch.distributed.init_process_group (under "
                               "PyTorch Lightning, in the LightningModule's configure_model hook)")
        if self.world_size == 1:
            return labels.shape[0]
        device = self.weight.device
        options = self._options_compared()
        row = torch.zeros(8 + len(options), dtype=torch.int64, device=device)
        # The options the collectives depend on, as their bits (the floats' too): ranks built with
        # another num_classes or embedding size would hold overlapping shards or gather rows of
        # another length (gloo aborts the process), another sample rate would misplace the union of
        # the samples, other margins would give a row the margin of whichever shard holds its target.
        row[8:] = torch.tensor([value for _, value in options], dtype=torch.float64).view(torch.int64).to(device)
        if error is None:
            grad = torch.is_grad_enabled()
            row[:5] = torch.tensor([labels.shape[0], 1,
                                    1 + FLOAT_DTYPES.index(fused_compute_dtype(embeddings, self.weight)),
                                    int(self.training), int(grad) + int(grad and embeddings.requires_grad)])
            row[6] = int(not skips_label_check(self.check_labels, labels))
            row[7] = self.k
            row[5] = self._first_centre_fingerprint()
        table = torch.empty(self.world_size * row.numel(), dtype=torch.int64, device=device)
        _all_gather_single(table, row, group=self.process_group)
        table = table.view(self.world_size, row.numel()).tolist()
        failed = [r for r, entry in enumerate(table) if not entry[1]]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"rank(s) {failed} of the process group refused their arguments (their own errors say "
                               "why): every rank stops this call")
        # Ranks hold different classes, so their first centres differ, unless DistributedDataParallel
        # over a module holding this loss broadcast rank 0's shard over the others when it was built (it
        # reads the ignore list of the module it wraps only). Compared at every call, not only the
        # first: a model called once before it is wrapped (a sanity check, an evaluation) is overwritten
        # after that call, and its shards then train in step, the same on every rank.
        prints = {entry[5] for entry in table}
        if len(prints) == 1 and 0 not in prints:
            # (The other way to get there: each rank drew its shard alone, after one seed on every rank.)
            raise RuntimeError(
                "every rank's shard of class centres starts with the same centre: DistributedDataParallel "
                "over a module that holds this loss has broadcast rank 0's shard over the other ranks' (and "
                "would average their gradients). Call arcface_ext.ddp_ignore_shards(model) before wrapping "
                "the model (under PyTorch Lightning, in configure_model, once the loss is built), or keep the loss "
                "outside the wrapped module. (Or every rank initialised its shard "
                "from the same seed, e.g. nn.init.normal_ after one torch.manual_seed: rank r's classes would "
                "start as copies of rank 0's; reset_parameters() draws the whole matrix and keeps this rank's "
                "rows.)")
        for column, what, name in (
                (2, "compute dtype", lambda v: str(FLOAT_DTYPES[v - 1]).replace("torch.", "")),
                (3, "mode", lambda v: "training" if v else "eval"),
                (4, "gradients", lambda v: ("grad mode off", "embeddings without grad", "embeddings with grad")[v]),
                (6, "label checks", lambda v: "check_labels=True" if v else "check_labels=False"),
                (7, "sub-centres a class", lambda v: f"k={v}"),
                *((8 + i, option, functools.partial(_option_text, option)) for i, (option, _) in enumerate(options))):
            values = [entry[column] for entry in table]
            if len(set(values)) > 1:
                ranks = ", ".join(f"rank {r}: {name(v)}" for r, v in enumerate(values))
                raise ValueError(f"the ranks must call the sharded loss alike, but they differ in {what} ({ranks})")
        return max(entry[0] for entry in table)

    def _options_compared(self):
        """(name, value) of the options every rank must share, as floats (exact for these ints)."""
        return [("num_classes", self.num_classes), ("embedding_size", self.embedding_size), ("s", self.s),
                ("m1", self.m1), ("m2", self.m2), ("m3", self.m3), ("lambda_", self.lambda_),
                ("margin_grad", MARGIN_GRADS.index(self.margin_grad)), ("ignore_index", self.ignore_index),
                ("sample_rate", self.sample_rate),
                ("interclass_filtering_threshold", self.interclass_filtering_threshold),
                *((name, getattr(self, name)) for name in self.compared_options)]

    def _first_centre_fingerprint(self):
        """A number of this rank's first centre's bytes (0 when there is none or it is all zeros, which
        proves nothing), as a 0-d int64 tensor on the weight's device: no device sync."""
        weight = self.weight.detach()
        if weight.shape[0] == 0:
            return torch.zeros((), dtype=torch.int64, device=weight.device)
        data = weight[0].contiguous().view(torch.uint8).to(torch.int64)
        return (data * torch.arange(1, data.numel() + 1, device=weight.device)).sum()

    def _gather_labels(self, labels, rows):
        """Every rank's labels, each rank's padded with ignore_index to ``rows`` (the largest local
        batch)."""
        if self.world_size == 1:
            return labels
        padded = labels.new_full((rows,), self.ignore_index)
        padded[:labels.shape[0]] = labels
        return _all_gather_rows(padded, rows, self.process_group, self.world_size)

    def _check_gathered_labels(self, all_labels, rows):
        """The range check of every rank's labels, before sampling or the chunked path (the op checks
        them itself otherwise). Every rank checks the same gathered labels, so that all of them raise
        or none does, and the error names the rank and its own row, as the op's does."""
        if all_labels.device.type == "meta":  # shapes only
            return
        bad = bad_labels(all_labels, self.num_classes, self.ignore_index)
        if bool(bad.any()):
            raise_bad_label(all_labels, bad, self.num_classes, self.ignore_index, "num_classes", rows=rows)

    def _sample(self, all_labels):
        """This rank's sample of its classes, and the labels renumbered for the union of the ranks'
        samples (rank r's sample holding places [offsets[r], offsets[r + 1]) of it): (index, labels
        with -1 at ignored rows, this rank's offset, the union's size). Every rank knows every
        sample's size without asking: it depends only on the shard sizes and the gathered rows."""
        bounds = [class_shard(self.num_classes, r, self.world_size) for r in range(self.world_size)]
        sizes = [sample_size(stop - start, self.sample_rate, all_labels.shape[0]) for start, stop in bounds]
        offsets = [0, *itertools.accumulate(sizes)]
        index, positions = sample_classes(all_labels, self.class_stop - self.class_start, self.sample_rate,
                                          class_start=self.class_start, ignore_index=self.ignore_index)
        # A target in another shard only has to fall in its owner's places, not this rank's.
        device = all_labels.device
        owner = torch.searchsorted(torch.tensor([start for start, _ in bounds[1:]], device=device), all_labels,
                                   right=True)
        renumbered = torch.where(positions >= 0, offsets[self.rank] + positions,
                                 torch.tensor(offsets[:-1], device=device)[owner])
        renumbered = torch.where(all_labels != self.ignore_index, renumbered, torch.full_like(renumbered, -1))
        return index, renumbered, offsets[self.rank], offsets[-1]

    def row_margins(self, embeddings: Tensor, labels: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """(m2, m3) for this rank's rows: the module's numbers, or per-row tensors in subclasses whose
        margins depend on the sample (:class:`ShardedAdaFaceLoss`, :class:`ShardedElasticFaceLoss`)."""
        return self.m2, self.m3

    def forward(self, embeddings: Tensor, labels: Tensor,
                return_target_cosine: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        # Checked before the margins, which subclasses read from the embeddings (AdaFace's with a
        # collective of its own in training mode), and agreed on by every rank.
        error = None
        try:
            check_arguments(embeddings, self.weight, labels, s=self.s, m1=self.m1, m2=self.m2, m3=self.m3,
                            lambda_=self.lambda_, reduction=self.reduction, margin_grad=self.margin_grad,
                            ignore_index=self.ignore_index)
            check_flag("return_target_cosine", return_target_cosine)
            require_extension()
            # (the shards' log-sum-exp and their reduction are the op's, the chunked path's too)
            check_device_has_kernel(embeddings, f"{type(self).__name__} (sharded class centres)")
        except (TypeError, ValueError, RuntimeError) as exc:
            error = exc
        rows = self._agree(embeddings, labels, error)
        m2, m3 = self.row_margins(embeddings, labels)
        for name, value in (("m2", m2), ("m3", m3)):
            if isinstance(value, torch.Tensor):
                check_row_margin(name, value, embeddings)
        dtype = fused_compute_dtype(embeddings, self.weight)
        spec = self.chunked_spec()
        if spec is not None:
            # The chunked path takes the inputs as they are (no copy of the whole shard in another dtype):
            # it computes in fp32 (fp64), its products' operands rounded to 16 bits a chunk at a time
            # under autocast or for 16-bit inputs, and returns gradients in the inputs' dtypes.
            spec["gemm_dtype"] = chunked.gemm_dtype(embeddings, self.weight)
            dtype = None
        labels = labels.long()
        all_labels = self._gather_labels(labels, rows)
        index, ignore_index, class_start, num_classes = None, self.ignore_index, self.class_start, self.num_classes
        skip_check = skips_label_check(self.check_labels, labels)
        if self.training and self.sample_rate < 1.0:
            bad = None
            if skip_check:  # a bad row gets a place past the union of the samples: a NaN loss
                bad = bad_labels(all_labels, self.num_classes, self.ignore_index)
            else:
                self._check_gathered_labels(all_labels, rows)
            index, all_labels, class_start, num_classes = self._sample(all_labels)
            if bad is not None:
                all_labels = all_labels.masked_fill(bad, num_classes)
            ignore_index = -1
            self.last_sampled_classes = self.class_start + index
            if self.k > 1:  # the sampled classes' rows of weight
                index = (index[:, None] * self.k + torch.arange(self.k, device=index.device)).reshape(-1)
        elif spec is not None and not skip_check:  # (the chunked path checks no labels)
            self._check_gathered_labels(all_labels, rows)
        margins = stack_row_margins(m2, m3, embeddings)
        if margins is not None and margins.requires_grad:
            raise ValueError("differentiable per-row margins (m2 or m3 requiring grad, as MagFace's) are not "
                             "supported with sharded class centres: use the replicated loss")
        if margins is not None:  # every rank's rows' margins, as the op sees every rank's rows
            margins = _all_gather_rows(margins, rows, self.process_group, self.world_size)
        options = (self.s, self.m1, scalar_margin(m2), scalar_margin(m3), self.lambda_, int(ignore_index),
                   self.margin_grad == "straight_through", get_workspace_bytes(), class_start, num_classes, margins)
        try:
            inputs = (embeddings, self.weight) if dtype is None else (embeddings.to(dtype), self.weight.to(dtype))
            loss_rows, cosine, t = _ShardedMarginSoftmax.apply(*inputs, all_labels, index, rows, options,
                                                               self.process_group, not skip_check, spec)
        except ValueError as error:  # the op names a row of the gathered batch: name the rank's own row
            found = re.search(r"labels\[(\d+)\]", str(error))
            if found is None or rows == 0:
                raise
            k = int(found.group(1))
            raise ValueError(str(error).replace(found.group(0), f"rank {k // rows}'s labels[{k % rows}]", 1)) from None
        loss = ops.reduce_loss(loss_rows, labels, self.ignore_index, self.reduction)
        if t is not None and self.training:
            with torch.no_grad():
                self.t.copy_(t)  # type: ignore[operator]  # (ShardedCurricularFaceLoss's buffer t)
        if return_target_cosine:
            return loss, nan_at_ignored(cosine, labels, self.ignore_index)
        return loss

    def extra_repr(self) -> str:
        sampled = f", sample_rate={self.sample_rate}" if self.sample_rate < 1.0 else ""
        sampled += "" if self.check_labels else ", check_labels=False"
        if self.interclass_filtering_threshold:
            sampled += f", interclass_filtering_threshold={self.interclass_filtering_threshold}"
        k = f"k={self.k}, " if self.k > 1 else ""
        # (lambda_ and margin_grad where CombinedMarginLoss says them: the trainer's loss line under torchrun)
        given = (f", lambda_={self.lambda_}" if self.lambda_ else "") + (
            f", margin_grad={self.margin_grad!r}" if self.margin_grad != "exact" else "")
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {k}s={self.s}, "
                f"m1={self.m1}, m2={self.m2}, m3={self.m3}{given}{sampled}, classes [{self.class_start}, "
                f"{self.class_stop}) on rank {self.rank} of {self.world_size}")


class ShardedSubCenterMarginLoss(ShardedCombinedMarginLoss):
    """:class:`arcface_ext.SubCenterMarginLoss` with sharded class centres: rank r holds the ``k``
    sub-centres of each of its classes [``class_start``, ``class_stop``), ``weight`` of
    (class_stop − class_start)·k rows, class c's sub-centres rows (c − class_start)·k … + k − 1 (the
    whole matrix, as :meth:`gather` returns it, is the replicated module's layout). Each shard walks
    its own classes on the chunked PyTorch path (:mod:`arcface_ext.chunked`) with the fused op's
    collectives; ``sample_rate`` (partial FC: a sampled class brings all its sub-centres) and
    ``interclass_filtering_threshold`` as :class:`ShardedCombinedMarginLoss`'s. At WebFace42M's 2M
    identities, three sub-centres of 512 fp32 values are 12 GB of centres, 24 GB with their momentum:
    this splits them across the ranks."""

    def __init__(self, num_classes: int, embedding_size: int, k: int = 3, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, lambda_: float = 0.0, *, device: Device = None,
                 dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_,
                         _k=chunked.check_int_option("k", k), device=device, dtype=dtype, **kwargs)


def ddp_ignore_shards(model: nn.Module) -> list[str]:
    """Tells DistributedDataParallel to leave the class shards of the sharded losses inside ``model``
    alone: call it before wrapping a module that holds one (DDP reads the list of parameters to
    ignore from the module it wraps only, so a sharded loss inside a larger model would otherwise
    have rank 0's shard broadcast over the others' and the ranks' shard gradients averaged). Returns
    the names it added."""
    names = [prefix + "weight" for prefix, _ in _sharded_losses(model)]
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    added = [name for name in names if name not in ignored]
    model._ddp_params_and_buffers_to_ignore = ignored + added  # type: ignore[assignment]  # (a list: DDP's own name)
    return added


def _sharded_losses(model):
    """(state-dict prefix, module) of the sharded losses in ``model`` (itself included), in the same order
    on every rank. Refuses a loss whose ``weight`` is parametrized (torch.nn.utils.parametrize, weight_norm):
    its parameters are then the parametrization's originals, under other names, which neither DDP's ignore
    list nor the gathers below would find (the rank's own originals were saved as though whole)."""
    losses = [(f"{name}." if name else "", module) for name, module in model.named_modules()
              if isinstance(module, ShardedCombinedMarginLoss)]
    for prefix, module in losses:
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(
                f"{prefix or type(module).__name__ + '.'}weight is parametrized (torch.nn.utils.parametrize): "
                "ddp_ignore_shards, full_state_dict and shard_optimizer_state take a sharded loss's plain weight "
                "only. Remove the parametrization (parametrize.remove_parametrizations(loss, 'weight')) or "
                "parametrize a replicated loss")
    return losses


def _map_class_state(model, optimizer, state_dict, per_class):
    """A copy of the optimizer state dict ``state_dict`` in which the per-class tensors (momentum, Adam's
    moments; not a step count) of every sharded loss's centres went through ``per_class(module, name,
    tensor)``, in the same order on every rank (it may be a collective). The parameters are told apart by
    their place in ``optimizer``'s groups, as torch's load_state_dict pairs them; nothing is written in place."""
    losses = {id(module.weight): (prefix, module) for prefix, module in _sharded_losses(model)}
    state_dict = {**state_dict, "state": dict(state_dict["state"])}
    if len(optimizer.param_groups) != len(state_dict["param_groups"]):
        raise ValueError(f"the optimizer state dict has {len(state_dict['param_groups'])} parameter group(s), the "
                         f"optimizer {len(optimizer.param_groups)}")
    # (As torch's load_state_dict would say, after its load hooks: paired off by place, another parameter's state
    # was taken for a loss's, and refused for its rows, naming the loss.)
    for number, (group, saved) in enumerate(zip(optimizer.param_groups, state_dict["param_groups"])):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"the optimizer state dict's parameter group {number} has {len(saved['params'])} "
                             f"parameter(s), the optimizer's {len(group['params'])}")
    done = set()
    for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        for param, index in zip(group["params"], saved["params"]):
            # No state before the first step. A parameter a group lists twice (deprecated by torch) has one
            # index: its state mapped twice was the whole's rows gathered again, which raised on rank dst alone.
            if id(param) not in losses or index not in state_dict["state"] or index in done:
                continue
            done.add(index)
            prefix, module = losses[id(param)]
            entry = dict(state_dict["state"][index])
            for key in sorted(entry):
                if torch.is_tensor(entry[key]) and entry[key].dim() > 0:
                    entry[key] = per_class(module, f"{prefix}weight's {key}", entry[key])
            state_dict["state"][index] = entry
    return state_dict


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    dst: int = 0) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(model_state, optimizer_state)``: ``model.state_dict()`` and ``optimizer.state_dict()`` (None
    without an optimizer) with the class centres of every sharded loss in ``model`` whole, as a replicated
    loss holds them (num_classes·k rows, gathered into host memory with the loss's ``gather``), and so their
    optimizer state (momentum, Adam's moments): one checkpoint that resumes on any number of ranks, or on a
    replicated loss. Returned on rank ``dst`` of the losses' process group (of the default group in a model
    without one), ``(None, None)`` on the others. Collective: every rank calls it. To resume,
    ``model.load_state_dict`` keeps each rank's rows of the whole centres itself; the optimizer's state goes
    through :func:`shard_optimizer_state` first."""
    losses = _sharded_losses(model)
    initialised = dist.is_available() and dist.is_initialized()
    # Refused on every rank before any collective: on one rank it returned (None, None) without a word.
    for size in {module.world_size for _, module in losses} or {dist.get_world_size() if initialised else 1}:
        if not (isinstance(dst, int) and 0 <= dst < size):
            raise ValueError(f"dst must be a rank of the {'losses' if losses else 'default'} process group, in "
                             f"[0, {size}): got {dst!r}")
    model_state = model.state_dict()
    for prefix, module in losses:
        model_state[prefix + "weight"] = module.gather(module.weight.detach(), dst)
        model_state.pop(prefix + "_extra_state", None)  # which classes a shard holds: the whole has no range
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = _map_class_state(model, optimizer, optimizer.state_dict(),
                                           lambda module, name, tensor: module.gather(tensor, dst))
    if losses:
        mine = all(module.rank == dst for _, module in losses)
    else:
        mine = (dist.get_rank() if initialised else 0) == dst
    return (model_state, optimizer_state) if mine else (None, None)


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          state_dict: dict[str, Any]) -> dict[str, Any]:
    """This rank's optimizer state dict from ``state_dict``, whose sharded losses' centres have their whole
    per-class state (:func:`full_state_dict`'s, or a replicated loss's): each rank's rows of it, for
    ``optimizer.load_state_dict``. A rank's own state passes unchanged. Not a collective. Also a load hook:
    ``optimizer.register_load_state_dict_pre_hook(lambda opt, state: shard_optimizer_state(model, opt, state))``."""
    def rows(module, name, tensor):
        whole, own = module.num_classes * module.k, module.weight.shape[0]
        if tensor.shape[0] == whole:
            # A copy of the rows (not a view, which optimizer.load_state_dict keeps as it is on the host): the
            # rank's state held the whole matrix's storage, and, read with mmap=True, kept the file mapped.
            return module.shard_of(tensor).clone() if own < whole else tensor
        if tensor.shape[0] == own:
            return tensor
        classes, part = divmod(tensor.shape[0], module.k)
        if not part and _some_shard_holds(module.num_classes, classes):  # (a rank's own, of another number of ranks)
            why = (": a rank's own optimizer.state_dict() holds its shard's rows alone: save with "
                   "arcface_ext.full_state_dict(model, optimizer)")
        else:  # (e.g. full_state_dict's of a loss of another class count: it was told to save with full_state_dict)
            why = (f", nor a rank's shard of its {module.num_classes} classes on any number of ranks: the state of a "
                   "loss of another number of classes (num_classes)")
        raise ValueError(f"optimizer state {name} has {tensor.shape[0]} rows: neither the whole centres' "
                         f"{whole} nor this rank's {own} (classes [{module.class_start}, {module.class_stop})){why}")

    return _map_class_state(model, optimizer, state_dict, rows)


class ShardedAdaFaceLoss(AdaFaceMargins, ShardedCombinedMarginLoss):
    """:class:`ShardedCombinedMarginLoss` with AdaFace's margins (:class:`AdaFaceMargins`). The
    running norm statistics follow the norms of every rank's counted rows (one all-reduce of three
    numbers a step), so that they are the same on every rank."""

    compared_options = ("m", "h", "t_alpha")

    def _norm_statistics(self, norms: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
        if self.world_size == 1:
            return super()._norm_statistics(norms, counted)
        weights = counted.double()
        norms = norms.double()
        moments = torch.stack([(norms * weights).sum(), (norms.square() * weights).sum(), weights.sum()])
        dist.all_reduce(moments, group=self.process_group)
        total, squares, count = moments
        mean = total / count
        variance = (squares - count * mean * mean).clamp_min(0) / (count - 1)  # unbiased, as Tensor.std
        return mean, torch.where(count > 1, variance.sqrt(), torch.full_like(variance, math.nan))


class ShardedElasticFaceLoss(ElasticFaceMargins, ShardedCombinedMarginLoss):
    """:class:`ShardedCombinedMarginLoss` with ElasticFace's margins (:class:`ElasticFaceMargins`):
    each rank draws the margins of its own rows, and with ``plus=True`` (ElasticFace+) hands them out by
    its rows' target cosines, which the ranks that hold their classes compute (a gather of the rows and an
    all-reduce of N cosines, in training mode)."""

    # (its m is m2 or m3; a rank with std = 0 would gather no margins where the others gather theirs, one
    # without plus would not join the collectives of target_cosines)
    compared_options = ("std", "plus")

    def target_cosines(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """This rank's rows' clamped target cosines (0 at ignored rows): every rank's rows gathered, each
        rank's shard giving those of its classes, summed over the ranks."""
        if self.world_size == 1:
            return super().target_cosines(embeddings, labels)
        sizes = torch.empty(self.world_size, dtype=torch.int64, device=embeddings.device)
        _all_gather_single(sizes, torch.tensor([labels.shape[0]], device=embeddings.device), group=self.process_group)
        rows = int(sizes.max())
        all_labels = self._gather_labels(labels.long(), rows)
        all_embeddings = _all_gather_rows(embeddings.detach(), rows, self.process_group, self.world_size)
        cosine = chunked.shard_target_cosines(all_embeddings, self.weight.detach(), all_labels,
                                              ignore_index=self.ignore_index, class_offset=self.class_start,
                                              num_classes=self.num_classes,
                                              gemm_dtype=chunked.gemm_dtype(embeddings, self.weight))
        dist.all_reduce(cosine, group=self.process_group)
        start = self.rank * rows
        return cosine[start:start + labels.shape[0]]


class ShardedCurricularFaceLoss(CurricularFaceT, ShardedCombinedMarginLoss):
    """:class:`arcface_ext.CurricularFaceLoss` with sharded class centres: each rank's shard tests its
    own classes against every row's margined target cosine (an all-reduce of N values brings each
    row's from the shard that holds its target), on the chunked PyTorch path. t moves by the mean of
    every rank's counted rows' target cosines, the same on every rank (the replicated loss under DDP
    follows rank 0's batches instead)."""

    compared_options = ("momentum",)  # (t, moved at another rate, would differ between ranks)

    def chunked_spec(self) -> dict[str, Any] | None:
        return {"threshold": 0.0, "curricular": (self.t, self.momentum, self.training)}

    def extra_repr(self) -> str:
        return f"m={self.m}, momentum={self.momentum}, {super().extra_repr()}"
