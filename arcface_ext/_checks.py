"""Argument checks shared by the fused op and the reference: metadata only (shapes, dtypes,
devices, Python scalars), so they never break a compiled graph. Label values are checked inside
the op."""
import math
import numbers
import sys

import torch

REDUCTIONS = ("mean", "sum", "none")
# Device types whose op checks the labels' values whatever check_labels says: on the CPU the check
# reads no answer back from a device. (The tests' CUDA emulator, which runs the CUDA op on CPU
# tensors, empties it.)
ALWAYS_CHECKED_DEVICES = frozenset({"cpu"})
MARGIN_GRADS = ("exact", "straight_through")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The margins' bounds as numbers (per-row tensors are only checked finite): past them a margin trains
# nothing useful and says nothing (see check_options). The trainer checks its flags against them.
MAX_ANGULAR_MARGIN = math.pi / 2   # |m2|, radians
MAX_COSINE_MARGIN = 1.0            # |m3|
# The largest finite float. A number is checked finite by comparing it with this: an int past it (10**400)
# has no float, and float() or math.isfinite raised OverflowError, naming no argument.
LARGEST_FLOAT = sys.float_info.max


def check_arguments(embeddings, weight, labels, *, s, m1, m2, m3, lambda_, reduction, margin_grad,
                    ignore_index):
    for name, t in (("embeddings", embeddings), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_not_dtensor(name, t)
        check_dense(name, t)
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (C, D) (class-major), got shape {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    for name, t in (("embeddings", embeddings), ("weight", weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}")
    check_label_dtype(labels)
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(f"embeddings (N, D) = {tuple(embeddings.shape)} and weight (C, D) = "
                         f"{tuple(weight.shape)} disagree on the embedding size D")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has {embeddings.shape[0]} rows")
    if weight.shape[0] == 0:
        raise ValueError("weight must hold at least one class centre (C >= 1)")
    if embeddings.shape[1] == 0:
        raise ValueError(f"embeddings and weight have no columns (D = 0, shapes {tuple(embeddings.shape)} and "
                         f"{tuple(weight.shape)}): an embedding holds at least one value")
    if not (embeddings.device == weight.device == labels.device):
        raise ValueError(f"embeddings, weight and labels must be on one device, got {embeddings.device}, "
                         f"{weight.device} and {labels.device}")
    for name, value in (("m2", m2), ("m3", m3)):
        if isinstance(value, torch.Tensor):
            check_row_margin(name, value, embeddings)
    check_options(s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, reduction=reduction, margin_grad=margin_grad,
                  ignore_index=ignore_index)


def is_dtensor(tensor):
    """Whether ``tensor`` is a DTensor (FSDP2's parameters are), without importing torch.distributed.tensor
    (0.4 s where nothing has yet; torch 2.4 kept it in torch.distributed._tensor): a program that made one
    has imported it."""
    for module in ("torch.distributed.tensor", "torch.distributed._tensor"):
        dtensor = getattr(sys.modules.get(module), "DTensor", None)
        if dtensor is not None and isinstance(tensor, dtensor):
            return True
    return False


def check_not_dtensor(name, tensor):
    """The kernels take local tensors. A DTensor reached the op as PyTorch's 'got mixed torch.Tensor and
    DTensor' or 'does not have a sharding strategy registered', naming neither the argument nor the cause:
    most often FSDP2's sharded parameter, met outside the forward of the module fully_shard was applied to."""
    if not is_dtensor(tensor):
        return
    what = (f"{name} is a DTensor ({', '.join(map(str, tensor.placements))} over {tensor.device_mesh.size()} "
            "rank(s)): arcface_ext's losses take plain tensors")
    if name == "weight":
        raise TypeError(f"{what}. A loss module's weight is FSDP2's sharded DTensor outside the forward of the module "
                        "fully_shard was applied to (once that module reshards after its forward): call the loss "
                        "inside that forward, or fully_shard the loss module itself. For class centres split across "
                        "ranks use arcface_ext.ShardedCombinedMarginLoss; else pass weight.full_tensor()")
    raise TypeError(f"{what}: pass {name}.to_local() (this rank's part) or {name}.full_tensor() (the whole)")


def check_dense(name, tensor):
    """The kernels and the reference take dense tensors: a sparse, mkldnn or nested one reached PyTorch's
    'Could not run ... with arguments from the SparseCPU backend' or an internal error, naming no argument."""
    if tensor.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {tensor.layout} tensor: "
                        f"pass {name}.to_dense()")


def check_options(*, s, m1, m2, m3, lambda_, reduction, margin_grad, ignore_index):
    """The op's numbers and strings (per-row margin tensors are checked with the embeddings, by
    check_row_margin): also what a module checks when it is built."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if margin_grad not in MARGIN_GRADS:
        raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")
    for name, value in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3), ("lambda_", lambda_)):
        if isinstance(value, torch.Tensor) and name in ("m2", "m3"):
            continue
        # A comparison, not math.isfinite: torch.compile traces a hyper-parameter that changes
        # between calls as a symbolic float, which compares but has no isfinite.
        # numbers.Real takes numpy's scalars too (np.float32 is not a float subclass); the callers
        # convert with float().
        if (isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float, numbers.Real))
                or not -LARGEST_FLOAT <= value <= LARGEST_FLOAT):
            raise ValueError(f"{name} must be a finite real number (int or float), got {value!r}")
    if s <= 0:
        raise ValueError(f"s (the scale) must be > 0, got {s}")
    if m1 <= 0:
        raise ValueError(f"m1 (the multiplicative angular margin) must be > 0, got {m1}")
    if lambda_ < 0:
        raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
    # Margins past these bounds train nothing useful and say nothing: an angle past π turns the
    # continuation c - m2·sin m2 into a bonus (m2 = 10 gives a zero loss), and a cosine margin past the
    # cosines' own range cannot be overcome. Degrees for radians is the usual slip.
    if not isinstance(m2, torch.Tensor) and not -MAX_ANGULAR_MARGIN <= m2 <= MAX_ANGULAR_MARGIN:
        raise ValueError(f"m2 (the additive angular margin, in radians) must lie in [-pi/2, pi/2], got {m2} "
                         "(ArcFace's 0.5 rad is 28.6 degrees)")
    if not isinstance(m3, torch.Tensor) and not -MAX_COSINE_MARGIN <= m3 <= MAX_COSINE_MARGIN:
        raise ValueError(f"m3 (the additive cosine margin) must lie in [-1, 1], got {m3}")
    if (isinstance(ignore_index, (bool, torch.Tensor)) or not isinstance(ignore_index, numbers.Integral)
            or not -2**63 <= ignore_index < 2**63):
        raise ValueError(f"ignore_index must be an int (int64), got {ignore_index!r}")


def skips_label_check(check_labels, labels):
    """Whether a call with ``check_labels`` skips the labels' check (asked for, and on a device
    where the check is a sync)."""
    return not check_labels and labels.device.type not in ALWAYS_CHECKED_DEVICES


def check_real(name, value, condition="", ok=lambda v: True):
    """A finite real number (numpy's too) that satisfies ``ok``, as a float; ValueError naming
    ``name`` and what it must be (``condition``) otherwise."""
    if (isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real)
            or not -LARGEST_FLOAT <= value <= LARGEST_FLOAT or not ok(value)):
        raise ValueError(f"{name} must be a finite real number{' ' + condition if condition else ''}, "
                         f"got {value!r}")
    return float(value)


def check_label_dtype(labels):
    """Labels are class indices: an integer tensor (not float, complex or bool)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64 class indices), got {labels.dtype}")


def raise_bad_label(labels, bad, num_classes, ignore_index, bound="the number of classes in weight", rows=None):
    """The error for the first row of ``bad`` (a bool mask over ``labels``, with at least one True), in
    the op's words (csrc/checks.h's raise_bad_label): the row, its label and the range, ``bound`` saying
    where num_classes comes from. With ``rows``, ``labels`` are every rank's, ``rows`` a rank, and the
    error names the rank and its own row."""
    row = int(bad.nonzero()[0, 0])
    where = f"labels[{row}]" if rows is None else f"rank {row // rows}'s labels[{row % rows}]"
    raise ValueError(f"arcface_ext: {where} = {int(labels[row])} is out of range: labels must lie in "
                     f"[0, {num_classes}) ({bound}) or equal ignore_index ({ignore_index})")


def check_centres_dtype(dtype):
    """A loss module's ``dtype`` argument, its class centres': None (torch's default) or a floating dtype the op
    takes, named when not (torch.empty's own error for an int64 parameter did not name the argument)."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype (the class centres') must be torch.float16, torch.bfloat16, torch.float32 or "
                        f"torch.float64, got {dtype!r}")
    return dtype


def check_flag(name, value):
    """A yes/no option: a bool (numpy's too), not a truthy object."""
    # numpy's bool is numpy.bool_ in numpy 1, numpy.bool in numpy 2 (np.True_'s type either way).
    if not isinstance(value, bool) and not (type(value).__module__ == "numpy"
                                            and type(value).__name__ in ("bool_", "bool")):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_row_margin(name, value, embeddings):
    """A per-row margin (AdaFace, ElasticFace, MagFace): a real (N,) tensor on the embeddings'
    device; it gets a gradient when it requires one (MagFace's margin is a function of the norm).
    Its values are checked (finite) inside the op."""
    check_not_dtensor(name, value)
    check_dense(name, value)
    if value.dim() != 1 or value.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{name} as a tensor holds one margin per row: shape (N,) = ({embeddings.shape[0]},), "
                         f"got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} as a tensor must be floating point, got {value.dtype}")
    if value.device != embeddings.device:
        raise ValueError(f"{name} must be on the embeddings' device ({embeddings.device}), got {value.device}")


def check_row_margins_finite(m2, m3):
    """The op's check of per-row margins' values, with its message (a device sync on a GPU): ValueError
    naming the first of m2 (row_margins column 0), m3 (column 1) that holds a NaN or an infinity."""
    for column, (name, margin) in enumerate((("m2", m2), ("m3", m3))):
        if isinstance(margin, torch.Tensor) and not bool(torch.isfinite(margin).all()):
            raise ValueError(f"arcface_ext: the per-row margin {name} must be finite (row_margins column "
                             f"{column} holds a NaN or an infinity)")


def stack_row_margins(m2, m3, embeddings):
    """The op's (N, 2) float64 per-row (m2, m3), or None when both margins are scalars."""
    if not isinstance(m2, torch.Tensor) and not isinstance(m3, torch.Tensor):
        return None
    n = embeddings.shape[0]
    columns = [value.to(torch.float64) if isinstance(value, torch.Tensor)
               else torch.full((n,), float(value), dtype=torch.float64, device=embeddings.device)
               for value in (m2, m3)]
    return torch.stack(columns, dim=1)


def margins_dtype(device):
    """The dtype of the per-row margins (and CurricularFace's t given as a number) that the modules make on
    ``device``: float64, as the op takes them, but float32 on Apple's mps, which has no float64 (there the
    loss runs in plain PyTorch, in fp32)."""
    return torch.float32 if device.type == "mps" else torch.float64


def scalar_margin(value):
    """The op's scalar argument for a margin that may be per-row (then unused: 0.0)."""
    return 0.0 if isinstance(value, torch.Tensor) else float(value)


def compute_dtype(embeddings, weight):
    """The dtype both inputs are brought to: their promotion (16-bit stays 16-bit; the kernels
    accumulate in fp32)."""
    return torch.promote_types(embeddings.dtype, weight.dtype)


def fused_compute_dtype(embeddings, weight):
    """compute_dtype, except under torch.autocast for the inputs' device: then the autocast dtype,
    as autocast does for matrix products (the fused op is one; it accumulates in fp32 and returns
    an fp32 loss). fp64 inputs are left alone, as autocast leaves fp64 matrix products."""
    device_type = embeddings.device.type
    if (device_type != "meta" and torch.is_autocast_enabled(device_type)
            and torch.float64 not in (embeddings.dtype, weight.dtype)):
        return torch.get_autocast_dtype(device_type)
    return compute_dtype(embeddings, weight)


def nan_at_ignored(target_cosine, labels, ignore_index):
    """The op's target cosines (0 at ignored rows) with NaN at the ignored rows."""
    counted = labels != ignore_index
    return torch.where(counted, target_cosine, torch.full_like(target_cosine, float("nan")))


def reduce_rows(loss_rows, labels, ignore_index, reduction):
    """'mean' divides by the number of counted rows; with none counted the loss is 0."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    counted = (labels != ignore_index).sum().clamp_min(1)
    return loss_rows.sum() / counted  # true division keeps loss_rows' dtype (one launch fewer than .to)
