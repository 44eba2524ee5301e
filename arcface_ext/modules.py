"""nn.Module front ends that own the class-centre matrix (C, D) and call the fused loss."""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import TYPE_CHECKING, Any, Callable, Literal, cast, overload

import torch
from torch import Tensor, nn
from torch.types import Device

from . import _checks, chunked, functional, reference
from .chunked import check_filtering_threshold
from ._checks import check_arguments, check_flag, check_options, check_real, margins_dtype, reduce_rows
from .sampling import bad_labels, check_sample_rate, sample_step

if TYPE_CHECKING:
    class LossModule(nn.Module):
        """For type checkers only (at run time, nn.Module; the mixins' base, object): what every margin-loss
        module has, the options set_loss_options sets and the weight, and what calling one returns
        (nn.Module types a call as returning Any)."""

        num_classes: int
        embedding_size: int
        s: float
        m1: float
        m2: float
        m3: float
        lambda_: float
        m: float
        reduction: str
        margin_grad: str
        ignore_index: int
        sample_rate: float
        check_labels: bool
        last_sampled_classes: Tensor | None
        weight: Tensor

        def reset_parameters(self) -> None: ...

        @overload
        def __call__(self, embeddings: Tensor, labels: Tensor, return_target_cosine: Literal[False] = ...) -> Tensor:
            ...

        @overload
        def __call__(self, embeddings: Tensor, labels: Tensor,
                     return_target_cosine: Literal[True]) -> tuple[Tensor, Tensor]: ...

        @overload
        def __call__(self, embeddings: Tensor, labels: Tensor,
                     return_target_cosine: bool) -> Tensor | tuple[Tensor, Tensor]: ...

        def __call__(self, embeddings: Tensor, labels: Tensor,
                     return_target_cosine: bool = False) -> Tensor | tuple[Tensor, Tensor]: ...

    # What a mixin (AdaFace's, ElasticFace's margins, CurricularFace's t) reads of the module it is mixed into.
    LossMixin = LossModule
else:
    LossModule = nn.Module
    LossMixin = object


def norm_dtype(embeddings: Tensor) -> Tensor:
    """The embeddings in the dtype their norms are taken in (the per-row margins' inputs): fp32 for
    16-bit embeddings, fp64 for fp64."""
    return embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))


def set_loss_options(module: LossModule, num_classes: int, embedding_size: int, s: float, m1: float, m2: float,
                     m3: float, lambda_: float, reduction: str, margin_grad: str, ignore_index: int,
                     sample_rate: float, check_labels: bool = True) -> None:
    """The options every margin-loss module keeps as attributes, checked as the op checks them, so
    that a bad option fails when the module is built rather than at its first call."""
    for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    check_options(s=s, m1=m1, m2=m2, m3=m3, lambda_=lambda_, reduction=reduction, margin_grad=margin_grad,
                  ignore_index=ignore_index)
    num_classes, embedding_size = int(num_classes), int(embedding_size)
    module.sample_rate = check_sample_rate(sample_rate)
    # The classes the last sampled training step kept (global indices), None before one ran.
    module.last_sampled_classes = None
    module.num_classes = num_classes
    module.embedding_size = embedding_size
    module.s, module.m1, module.m2, module.m3, module.lambda_ = (float(s), float(m1), float(m2), float(m3),
                                                                 float(lambda_))
    module.reduction = reduction
    module.margin_grad = margin_grad
    module.ignore_index = int(ignore_index)
    module.check_labels = check_flag("check_labels", check_labels)


def margin_attribute(option_of: Callable[[Any], str], doc: str) -> Any:
    """The constructor's ``m`` as an attribute (a property): it reads and sets the option that holds it
    (``option_of(module)``: "m1", "m2" or "m3"), checked as the constructor checks it, so that a margin
    scheduled between steps (``criterion.m = 0.1``, as WeSpeaker's and 3D-Speaker's margin schedulers set
    theirs) takes effect rather than landing in an attribute that nothing reads. (Typed Any: the class
    declares it, ``m: float = margin_attribute(...)``.)"""
    def get(self: LossModule) -> float:
        return getattr(self, option_of(self))

    def set(self: LossModule, value: float) -> None:
        option = option_of(self)
        options = dict(s=self.s, m1=self.m1, m2=self.m2, m3=self.m3, lambda_=self.lambda_)
        options[option] = value
        check_options(**options, reduction=self.reduction, margin_grad=self.margin_grad, ignore_index=self.ignore_index)
        setattr(self, option, float(value))
    return property(get, set, doc=doc)


def no_margin_attribute(hint: str) -> Any:
    """``m`` on a module that has no single margin (built from m1, m2, m3, or MagFace's l_m and u_m):
    setting it raises, naming what to set (``hint``), where it landed in an attribute that nothing read;
    reading it is the AttributeError it was."""
    def get(self: LossModule) -> float:
        raise AttributeError(f"{type(self).__name__} has no single margin m: {hint}")

    def set(self: LossModule, value: float) -> None:
        raise AttributeError(f"{type(self).__name__} has no single margin m to set: {hint}")
    return property(get, set)


# (CombinedMarginLoss's, SubCenterMarginLoss's and their sharded forms')
NO_SINGLE_MARGIN = no_margin_attribute("set m1, m2 or m3, the margins it was built with")

# The combined margin's three, which the modules with their own margin arguments set themselves.
MARGINS = ("m1", "m2", "m3")
# Other libraries' names for this package's arguments, for the error that refuses them.
OTHER_LIBRARIES_NAMES = {
    "margin": "its margin is m; angular ones in radians, where pytorch-metric-learning's are in degrees",
    "scale": "the scale is s", "in_features": "the embedding's size is embedding_size",
    "out_features": "the number of classes is num_classes", "sub_centers": "sub-centres: SubCenterMarginLoss's k",
}


def check_passed_on(module: nn.Module, kwargs: dict[str, Any], sets: tuple[str, ...], instead: str) -> None:
    """The keyword arguments ``kwargs`` that a loss module passes on to the class it extends, checked: the
    margins it sets itself (``sets``: ArcFaceLoss's m is its m2) are refused with ``instead``, what to pass
    (``{base}`` in it: the class they end up in), and names that class does not take are refused naming
    this module, where Python's errors named the class it extends ("CombinedMarginLoss.__init__() got
    multiple values for keyword argument 'm2'")."""
    name = type(module).__name__

    def passes_on(cls) -> bool:
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())

    # The first class up the MRO, past one whose __init__ passes **kwargs on (the caller's), whose __init__ takes
    # none: the one they end up in. (Not the first of all: a user's subclass of a fixed signature, calling
    # super().__init__(C, D, reduction="sum"), would be taken for it and its options refused.)
    mro = [cls for cls in type(module).__mro__ if "__init__" in vars(cls)]
    caller = next(k for k, cls in enumerate(mro) if passes_on(cls))
    base = next(cls for cls in mro[caller + 1:] if not passes_on(cls))
    given = [option for option in sets if option in kwargs]
    if given:
        raise TypeError(f"{name} sets {', '.join(given)} itself: {instead.format(base=base.__name__)}")
    taken = [p for p in inspect.signature(base.__init__).parameters
             if p not in ("self", "num_classes", "embedding_size", "s", *sets) and not p.startswith("_")]
    for option in kwargs:
        if option not in taken and not option.startswith("_"):
            hint = f" ({OTHER_LIBRARIES_NAMES[option]})" if option in OTHER_LIBRARIES_NAMES else ""
            raise TypeError(f"{name} got an unexpected keyword argument {option!r}{hint}; besides its own, it takes "
                            f"{base.__name__}'s {', '.join(taken)}")


class CombinedMarginLoss(LossModule):
    """Margin softmax cross-entropy with its own class centres ``weight`` (C, D).

    Called as ``criterion(embeddings, labels)``; ``return_target_cosine=True`` also returns each
    row's clamped target cosine (for plotting the θ distribution). ``use_reference=True`` runs the
    pure-PyTorch reference instead of the compiled kernels (never chosen silently).

    ``sample_rate`` < 1 is partial FC (:mod:`arcface_ext.sampling`): in training mode each call's
    softmax runs over the classes of its targets and a uniform sample of the others,
    ``sample_size(C, sample_rate, N)`` classes in all (``last_sampled_classes`` says which); the
    centres left out get no gradient that step (an optimizer's momentum and weight decay still
    move them, as in insightface). In eval mode every class counts.

    ``check_labels=False`` skips the label check, a device synchronisation a call on a GPU, as
    :func:`arcface_ext.combined_margin_loss` does (a bad label gives its row a NaN loss instead).

    ``interclass_filtering_threshold`` τ > 0 is inter-class filtering (arcface_torch's option of the
    same name): the other classes whose cosine exceeds τ get logit 0 and no gradient.
    It runs on the chunked PyTorch path (:mod:`arcface_ext.chunked`), not the fused op.

    ``label_smoothing`` ε > 0 is ``nn.CrossEntropyLoss(label_smoothing=ε)`` on the margin logits: each
    row's loss gains ε·(z_y − mean_j z_j) (:func:`arcface_ext.chunked.label_smoothing_rows`: a sum of
    the unit centres and N dot products beside the fused op, still no N x C matrix). With
    ``sample_rate`` the mean is over the sampled classes. Not with inter-class filtering or
    CurricularFace.
    """

    m = NO_SINGLE_MARGIN

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0, lambda_: float = 0.0, *, reduction: str = "mean", margin_grad: str = "exact",
                 ignore_index: int = -1, sample_rate: float = 1.0, check_labels: bool = True,
                 use_reference: bool = False, interclass_filtering_threshold: float = 0.0,
                 label_smoothing: float = 0.0, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        set_loss_options(self, num_classes, embedding_size, s, m1, m2, m3, lambda_, reduction, margin_grad,
                         ignore_index, sample_rate, check_labels)
        self.use_reference = check_flag("use_reference", use_reference)
        self.interclass_filtering_threshold = check_filtering_threshold(interclass_filtering_threshold)
        if self.interclass_filtering_threshold and (self.per_row_margins or self.curricular):
            raise ValueError(f"interclass_filtering_threshold does not go with {type(self).__name__}'s "
                             f"{'per-row margins' if self.per_row_margins else 'hard negatives'}")
        self.label_smoothing = check_real("label_smoothing", label_smoothing, "in [0, 1]", lambda v: 0 <= v <= 1)
        if self.label_smoothing and (self.interclass_filtering_threshold or self.curricular):
            raise ValueError("label_smoothing does not go with "
                             f"{'CurricularFace' if self.curricular else 'interclass_filtering_threshold'}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size, device=device,
                                               dtype=_checks.check_centres_dtype(dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # insightface initialises the class centres with N(0, 0.01); only their direction matters.
        nn.init.normal_(self.weight, std=0.01)

    # Whether row_margins reads the embeddings (AdaFace, ElasticFace, MagFace): then the arguments
    # are checked before it, so that a bad call raises the op's message and moves no statistics.
    per_row_margins = False
    # Whether the module changes its hard negatives' logits (CurricularFace): the chunked path then.
    curricular = False

    def row_margins(self, embeddings: Tensor, labels: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """(m2, m3) for this call: the module's numbers, or per-row tensors in subclasses whose
        margins depend on the sample (:class:`AdaFaceLoss`, :class:`ElasticFaceLoss`)."""
        return self.m2, self.m3

    def chunked_options(self, embeddings: Tensor, labels: Tensor) -> dict[str, Any] | None:
        """The options of :func:`arcface_ext.chunked_margin_loss` this call needs, or None for the
        fused op: inter-class filtering here, CurricularFace's t in :class:`CurricularFaceLoss`."""
        if self.interclass_filtering_threshold:
            return {"interclass_filtering_threshold": self.interclass_filtering_threshold}
        return None

    def _check(self, embeddings: Tensor, labels: Tensor) -> None:
        check_arguments(embeddings, self.weight, labels, s=self.s, m1=self.m1, m2=self.m2, m3=self.m3,
                        lambda_=self.lambda_, reduction=self.reduction, margin_grad=self.margin_grad,
                        ignore_index=self.ignore_index)

    def forward(self, embeddings: Tensor, labels: Tensor,
                return_target_cosine: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        weight, ignore_index = self.weight, self.ignore_index
        sampled = self.training and self.sample_rate < 1.0
        if sampled or self.per_row_margins or self.curricular:
            self._check(embeddings, labels)
        m2, m3 = self.row_margins(embeddings, labels)
        options = self.chunked_options(embeddings, labels)
        loss_fn: Callable[..., Any]
        if options is None:
            loss_fn = reference.combined_margin_loss if self.use_reference else functional.combined_margin_loss
        else:
            loss_fn = functools.partial(reference.chunked_margin_loss if self.use_reference else
                                        chunked.chunked_margin_loss, **options)
        skip_check = _checks.skips_label_check(self.check_labels, labels)
        if sampled:
            index, labels = sample_step(labels, self.num_classes, self.sample_rate, ignore_index, skip_check)
            # Ignored rows are -1 among the positions (a class index can no longer be ignore_index).
            weight, ignore_index = weight.index_select(0, index), -1
            self.last_sampled_classes = index
        reduction = "none" if self.label_smoothing else self.reduction
        out: Any = loss_fn(embeddings, weight, labels, s=self.s, m1=self.m1, m2=m2, m3=m3,
                      lambda_=self.lambda_, reduction=reduction, margin_grad=self.margin_grad,
                      ignore_index=ignore_index, return_target_cosine=return_target_cosine,
                      check_labels=not skip_check)
        if not self.label_smoothing:
            return out
        loss, target_cosine = out if return_target_cosine else (out, None)
        loss = loss + chunked.label_smoothing_rows(
            embeddings, weight, labels, epsilon=self.label_smoothing, s=self.s, m1=self.m1, m2=m2, m3=m3,
            lambda_=self.lambda_, margin_grad=self.margin_grad, ignore_index=ignore_index, dtype=loss.dtype)
        loss = reduce_rows(loss, labels, ignore_index, self.reduction)
        return loss if target_cosine is None else (loss, target_cosine)

    def extra_repr(self) -> str:
        return ", ".join(self._repr_parts())

    def _repr_parts(self) -> list[str]:
        parts = [f"num_classes={self.num_classes}", f"embedding_size={self.embedding_size}",
                 f"s={self.s}", f"m1={self.m1}", f"m2={self.m2}", f"m3={self.m3}"]
        if self.lambda_:
            parts.append(f"lambda_={self.lambda_}")
        if self.margin_grad != "exact":
            parts.append(f"margin_grad={self.margin_grad!r}")
        if self.sample_rate < 1.0:
            parts.append(f"sample_rate={self.sample_rate}")
        if self.interclass_filtering_threshold:
            parts.append(f"interclass_filtering_threshold={self.interclass_filtering_threshold}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if not self.check_labels:
            parts.append("check_labels=False")
        if self.use_reference:
            parts.append("use_reference=True")
        return parts


def easy_margins(module: LossModule, embeddings: Tensor, labels: Tensor, margins: float | Tensor) -> Tensor:
    """The per-row angular ``margins`` where the row's target cosine is > 0, and 0 elsewhere (target
    logit s·cos θ, constant there): the "easy margin" of MagFace's and ArcMarginProduct's code. The
    targets' cosines take a gather and N dot products (no N x C product), rounded as the op's product
    rounds its operands."""
    cosine = chunked.shard_target_cosines(embeddings.detach(), module.weight.detach(), labels,
                                          ignore_index=module.ignore_index,
                                          gemm_dtype=chunked.gemm_dtype(embeddings, module.weight))
    if not torch.is_tensor(margins):
        margins = torch.full_like(cosine, margins, dtype=margins_dtype(cosine.device))
    return torch.where(cosine > 0, margins, torch.zeros_like(margins))


class ArcFaceLoss(CombinedMarginLoss):
    """Additive angular margin: target logit s·cos(θ + m), continued linearly past θ + m = π (as
    pytorch-metric-learning's ``ArcFaceLoss`` and ArcMarginProduct's ``easy_margin=False`` do).

    ``easy_margin=True`` applies the margin only where cos θ > 0 and leaves the target logit at s·cos θ
    elsewhere, as ``ArcMarginProduct(easy_margin=True)`` (ronghuaiyang/arcface-pytorch and its many
    copies) does. The two differ for targets more than π/2 from their centre. Not with
    ``interclass_filtering_threshold``.

    The other keyword arguments are :class:`CombinedMarginLoss`'s: ``reduction``, ``margin_grad``,
    ``ignore_index``, ``sample_rate``, ``check_labels``, ``use_reference``, ``interclass_filtering_threshold``,
    ``label_smoothing``."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5, *,
                 easy_margin: bool = False, device: Device = None, dtype: torch.dtype | None = None,
                 **kwargs: Any) -> None:
        easy_margin = check_flag("easy_margin", easy_margin)
        check_passed_on(self, kwargs, MARGINS, "its margin is m (m2 = m): pass m, or build {base} with m1, m2 and m3 "
                        "of your own")
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=m, m3=0.0, device=device, dtype=dtype, **kwargs)
        if easy_margin and self.interclass_filtering_threshold:
            raise ValueError("interclass_filtering_threshold does not go with ArcFaceLoss's easy_margin")
        self.easy_margin = easy_margin
        # The margins then depend on the sample: the arguments are checked before row_margins reads them.
        self.per_row_margins = easy_margin

    m: float = margin_attribute(lambda module: "m2",
                                "The angular margin m (the option m2), radians; settable between steps.")

    def row_margins(self, embeddings: Tensor, labels: Tensor) -> tuple[float | Tensor, float | Tensor]:
        if not self.easy_margin:
            return self.m2, self.m3
        return easy_margins(self, embeddings, labels, self.m2), self.m3

    def _repr_parts(self) -> list[str]:
        return super()._repr_parts() + (["easy_margin=True"] if self.easy_margin else [])


class CosFaceLoss(CombinedMarginLoss):
    """Additive cosine margin: target logit s·(cos θ - m).

    The other keyword arguments are :class:`CombinedMarginLoss`'s: ``reduction``, ``margin_grad``,
    ``ignore_index``, ``sample_rate``, ``check_labels``, ``use_reference``, ``interclass_filtering_threshold``,
    ``label_smoothing``."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.35, *,
                 device: Device = None, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        check_passed_on(self, kwargs, MARGINS, "its margin is m (m3 = m): pass m, or build {base} with m1, m2 and m3 "
                        "of your own")
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=0.0, m3=m, device=device, dtype=dtype, **kwargs)

    m: float = margin_attribute(lambda module: "m3", "The cosine margin m (the option m3); settable between steps.")


class SphereFaceLoss(CombinedMarginLoss):
    """Multiplicative angular margin: target logit s·ψ(mθ), optionally blended with cos θ by lambda_:
    s·(ψ + λ·cos θ)/(1 + λ), ψ = (-1)^k cos(mθ) - 2k. SphereFace's own code (wy1iu/sphereface) anneals
    λ during training, max(5, 1000 / (1 + 0.12·iteration)), and scales ψ by the feature's own norm
    instead of normalising the feature; here the embedding is normalised and scaled by s, and λ is the
    constant you give (assign ``criterion.lambda_`` between steps to anneal it).

    The other keyword arguments are :class:`CombinedMarginLoss`'s: ``reduction``, ``margin_grad``,
    ``ignore_index``, ``sample_rate``, ``check_labels``, ``use_reference``, ``interclass_filtering_threshold``,
    ``label_smoothing``."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 4, lambda_: float = 0.0, *,
                 device: Device = None, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        check_passed_on(self, kwargs, MARGINS, "its margin is m (m1 = m): pass m, or build {base} with m1, m2 and m3 "
                        "of your own")
        super().__init__(num_classes, embedding_size, s=s, m1=float(m), m2=0.0, m3=0.0, lambda_=lambda_, device=device,
                         dtype=dtype, **kwargs)

    m: float = margin_attribute(lambda module: "m1",
                                "The multiplicative margin m (the option m1); settable between steps.")


def _apply_keeping_dtype(module, apply, names, fn, *args, **kwargs):
    """``module._apply`` (``apply``, the base class's) but the buffers ``names`` do not follow casts to
    16 bits, only the device move: running statistics stay fp32 when the module is cast to 16 bits (a
    bf16 running mean would round away its 1% steps). A cast to fp64 they follow."""
    before = {name: module._buffers[name] for name in names}
    result = apply(fn, *args, **kwargs)
    for name, buffer in before.items():
        if (module._buffers[name].dtype in (torch.float16, torch.bfloat16)
                and buffer.dtype != module._buffers[name].dtype):
            module._buffers[name] = buffer.to(module._buffers[name].device)
    return result


class AdaFaceMargins(LossMixin):
    """AdaFace's per-row margins (Kim et al., CVPR 2022), for a margin-loss module (mixed in before
    it): a margin that adapts to image quality, read from the embedding's norm. With
    z_i = clip(h·(‖x_i‖ - μ) / (σ + 1e-3), -1, 1), where μ and σ are running (EMA, rate ``t_alpha``)
    statistics of the batches' clipped norms, row i's target logit is s·(cos(θ - m·z_i) - (m + m·z_i)):
    an angular margin for hard (low-norm) rows, a cosine one for easy rows. The margins are constants
    of the step (no gradient through the norm), as in AdaFace. μ and σ (buffers ``batch_mean``,
    ``batch_std``, AdaFace's initial 20 and 100) move in training mode only; they are fp32 (fp64 in an
    fp64 module) and stay fp32 when the module is cast to 16 bits (a bf16 running mean would round away
    its 1% steps).

    Where AdaFace's code (mk-minchul/AdaFace ``head.py``) differs: it moves μ and σ at every call, over
    the whole batch (here: training mode only, the counted rows only), clamps every cosine to
    ±(1 - 1e-3) and θ - m·z_i to [1e-3, π - 1e-3]; here cosines are clamped to ±1, ψ is held at 1 where
    θ - m·z_i < 0 and continues linearly past π (c - m2·sin m2, the combined loss's rule). The losses
    differ only for cosines within 1e-3 of ±1 and for targets more than π - m from their centre."""

    per_row_margins = True
    initial_statistics = {"batch_mean": 20.0, "batch_std": 100.0}  # AdaFace's
    batch_mean: Tensor
    batch_std: Tensor
    # The statistics row_margins moved, for forward to store once the loss is computed.
    _moved_statistics: tuple[Tensor, Tensor] | None

    @staticmethod
    def _checked_m(value: float) -> float:
        # Its margins reach m angular and 2m cosine: m = 1 is already far past AdaFace's 0.4.
        return check_real("AdaFace's m", value, "in [0, 1]", lambda v: 0 <= v <= 1)

    @property
    def m(self) -> float:
        """AdaFace's margin m; settable between steps, checked as the constructor checks it."""
        return self._m

    @m.setter
    def m(self, value: float) -> None:
        self._m = self._checked_m(value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "m" in state:  # a module pickled whole before m was a property
            state["_m"] = state.pop("m")
        super().__setstate__(state)

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, h: float = 0.333,
                 t_alpha: float = 0.01, *, device: Device = None, dtype: torch.dtype | None = None,
                 **kwargs: Any) -> None:
        m = self._checked_m(m)
        h = check_real("AdaFace's h", h, "> 0", lambda v: v > 0)
        t_alpha = check_real("AdaFace's t_alpha", t_alpha, "in (0, 1]", lambda v: 0 < v <= 1)
        check_passed_on(self, kwargs, MARGINS, "its margins follow m, h and the embeddings' norms: pass m")
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=0.0, m3=0.0, device=device, dtype=dtype, **kwargs)
        self.m, self.h, self.t_alpha = m, h, t_alpha
        # fp32 (fp64 in an fp64 module), as CurricularFace's t.
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name, value in self.initial_statistics.items():
            self.register_buffer(name, torch.tensor(value, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "batch_mean" in self._buffers:  # (not yet registered when the base class's __init__ calls this)
            with torch.no_grad():
                for name, value in self.initial_statistics.items():
                    cast(Tensor, self._buffers[name]).fill_(value)  # (registered in __init__: not None)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return _apply_keeping_dtype(self, super()._apply, self.initial_statistics, fn, *args, **kwargs)

    def _norm_statistics(self, norms: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, unbiased std) of the norms the running statistics follow: this batch's counted rows
        (NaN with fewer than two)."""
        weights = counted.to(norms.dtype)
        count = weights.sum()
        mean = (norms * weights).sum() / count
        variance = ((norms - mean).square() * weights).sum() / (count - 1)
        return mean, torch.where(count > 1, variance.sqrt(), torch.full_like(variance, math.nan))

    def row_margins(self, embeddings: Tensor, labels: Tensor) -> tuple[float | Tensor, float | Tensor]:
        with torch.no_grad():
            norms = norm_dtype(embeddings.detach()).norm(dim=1).clamp(0.001, 100.0)
            mean, std = self.batch_mean, self.batch_std
            if self.training:
                batch_mean, batch_std = self._norm_statistics(norms, labels != self.ignore_index)
                # Fewer than two counted rows have no spread: the statistics stay (decided on the
                # device).
                seen = torch.isfinite(batch_std)
                mean, std = (torch.where(seen, buffer * (1 - self.t_alpha) + self.t_alpha * value.to(buffer.dtype),
                                         buffer)
                             for buffer, value in ((mean, batch_mean), (std, batch_std)))
                # Stored by forward once the loss is computed: a call the op refuses (bad labels,
                # checked on the device) leaves them as they were.
                self._moved_statistics = (mean, std)
            z = ((norms - mean) / (std + 1e-3) * self.h).clamp(-1.0, 1.0)
            # A non-finite embedding (NaN norm) gets margin 0: its loss is NaN anyway, as for the other
            # losses, where a NaN margin would make the op refuse the whole call.
            z = torch.nan_to_num(z, nan=0.0)
            return -self.m * z, self.m + self.m * z

    def forward(self, embeddings: Tensor, labels: Tensor,
                return_target_cosine: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        self._moved_statistics = None
        out = super().forward(embeddings, labels, return_target_cosine=return_target_cosine)
        if self._moved_statistics is not None:
            with torch.no_grad():
                for buffer, value in zip((self.batch_mean, self.batch_std), self._moved_statistics):
                    buffer.copy_(value)
            self._moved_statistics = None
        return out

    def extra_repr(self) -> str:
        return f"m={self.m}, h={self.h}, t_alpha={self.t_alpha}, {super().extra_repr()}"


# ElasticFace's default standard deviations by (kind, plus): its paper's 0.05, and its configurations' for
# ElasticFace+ (the trainer's --elastic-std defaults read them too).
ELASTICFACE_STDS = {("arc", False): 0.05, ("cos", False): 0.05, ("arc", True): 0.0175, ("cos", True): 0.02}


class ElasticFaceMargins(LossMixin):
    """ElasticFace's per-row margins (Boutros et al., CVPRW 2022), for a margin-loss module (mixed in
    before it): each training row draws its margin from N(m, std²), an angular one (``kind="arc"``:
    s·cos(θ + m_i), ElasticFace-Arc) or a cosine one (``kind="cos"``: s·(cos θ - m_i),
    ElasticFace-Cos). ``m`` defaults to the paper's 0.5 (arc) or 0.35 (cos), ``std`` to its 0.05 (with
    ``plus``, to the 0.0175 (arc) and 0.02 (cos) of ElasticFace's configurations for ElasticFace+). In
    eval mode every row gets m. The draws come from ``generator`` when given (on the embeddings'
    device), else torch's default one. Past θ + m_i = π the angular form continues linearly, as the
    combined loss does, where ElasticFace's code takes cos(θ + m_i) itself (which turns back up there).

    ``plus=True`` is ElasticFace+ (ElasticFace-Arc+, -Cos+): the same draws, handed out by the rows'
    target cosines cos θ_y (a gather and N dot products, no N x C product), the largest margin to the
    row farthest from its class centre, the smallest to the nearest; ignored rows take no part. This is
    the pairing the two sorts of ElasticFace's code set up (cosines descending, draws ascending); its
    code then indexes the sorted draws by the cosines' order (``draws[order]``), which gives row i the
    draw of rank ``order[i]``, not one ranked by row i's own cosine (the two agree only when the order
    is its own inverse). Each call (each rank, under DDP or with sharded centres) ranks its own rows, as
    ElasticFace's code does on each GPU."""

    per_row_margins = True

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float | None = None,
                 std: float | None = None, kind: str = "arc", *, plus: bool = False,
                 generator: torch.Generator | None = None, device: Device = None, dtype: torch.dtype | None = None,
                 **kwargs: Any) -> None:
        if kind not in ("arc", "cos"):
            raise ValueError(f"kind must be 'arc' or 'cos', got {kind!r}")
        plus = check_flag("plus", plus)
        if std is None:
            std = ELASTICFACE_STDS[kind, plus]
        std = check_real("std", std, ">= 0", lambda v: v >= 0)
        # Checked here: a seed given as the generator failed only at the first training call, in randn's
        # multi-line "received an invalid combination of arguments", naming no argument.
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {generator!r} (for a seed: "
                            "torch.Generator().manual_seed(seed))")
        if m is None:
            m = 0.5 if kind == "arc" else 0.35
        margins = dict(m2=m, m3=0.0) if kind == "arc" else dict(m2=0.0, m3=m)
        check_passed_on(self, kwargs, MARGINS,
                        "its margins are drawn around m (m2 for kind 'arc', m3 for 'cos'): pass m")
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, **margins, device=device, dtype=dtype, **kwargs)
        self.std, self.kind, self.plus, self.generator = float(std), kind, plus, generator

    m: float = margin_attribute(lambda module: "m2" if module.kind == "arc" else "m3",
                                "The margins' mean m (the option m2 for kind 'arc', m3 for 'cos'); "
                                "settable between steps.")

    def row_margins(self, embeddings: Tensor, labels: Tensor) -> tuple[float | Tensor, float | Tensor]:
        if not self.training or self.std == 0:
            return self.m2, self.m3
        # No generator argument when there is none: torch.compile cannot trace randn's generator
        # overload for a batch size that changes between calls.
        generator = {} if self.generator is None else {"generator": self.generator}
        drawn = torch.randn(embeddings.shape[0], device=embeddings.device, dtype=margins_dtype(embeddings.device),
                            **generator).mul_(self.std).add_(self.m)  # type: ignore[call-overload]  # (**generator)
        if self.plus:
            drawn = self._by_target_cosine(embeddings, labels, drawn)
        return (drawn, 0.0) if self.kind == "arc" else (0.0, drawn)

    def _by_target_cosine(self, embeddings: Tensor, labels: Tensor, drawn: Tensor) -> Tensor:
        """ElasticFace+: the counted rows' ``drawn`` margins, largest first, to their rows in the order of
        their target cosines, lowest first; ``m`` at ignored rows (their margin counts for nothing)."""
        cosine = self.target_cosines(embeddings, labels)
        counted = labels != self.ignore_index
        # Ignored rows sort last on both sides (cosine +inf, draw -inf), so that the counted rows share out
        # their own draws; a NaN cosine (a non-finite embedding, whose loss is NaN) after the finite ones.
        key = torch.where(counted, torch.nan_to_num(cosine.to(drawn.dtype), nan=2.0, posinf=2.0, neginf=-2.0),
                          torch.full_like(drawn, math.inf))
        order = torch.argsort(key, stable=True)
        ranked = torch.where(counted, drawn, torch.full_like(drawn, -math.inf)).sort(descending=True).values
        handed = torch.empty_like(drawn).index_copy_(0, order, ranked)
        return torch.where(counted, handed, torch.full_like(drawn, self.m))

    def target_cosines(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The rows' clamped target cosines (0 at ignored rows), without gradients: a gather and N dot products."""
        return chunked.shard_target_cosines(embeddings.detach(), self.weight.detach(), labels,
                                            ignore_index=self.ignore_index,
                                            gemm_dtype=chunked.gemm_dtype(embeddings, self.weight))

    def extra_repr(self) -> str:
        plus = ", plus=True" if self.plus else ""
        return f"kind={self.kind!r}, m={self.m}{plus}, std={self.std}, {super().extra_repr()}"


class AdaFaceLoss(AdaFaceMargins, CombinedMarginLoss):
    """:class:`CombinedMarginLoss` with AdaFace's margins (:class:`AdaFaceMargins`)."""


class ElasticFaceLoss(ElasticFaceMargins, CombinedMarginLoss):
    """:class:`CombinedMarginLoss` with ElasticFace's margins (:class:`ElasticFaceMargins`)."""


class MagFaceLoss(CombinedMarginLoss):
    """MagFace (Meng et al., CVPR 2021): an ArcFace whose margin grows with the embedding's norm a_i,
    m(a_i) = l_m + (u_m - l_m)·(a_i - l_a)/(u_a - l_a) with a_i clipped to [l_a, u_a], plus the
    regulariser λ_g·g(a_i), g(a) = a/u_a² + 1/a, which rewards large norms; the norm becomes a
    measure of the face's quality. Unlike AdaFace's, these margins are differentiable: the gradient
    flows through m(a_i) into the norm, as in MagFace. The defaults are its MS1MV2 settings.

    By default the margin applies at every θ (MagFace's ``MagLinear(easy_margin=False)``), continuing
    linearly past θ + m = π. ``easy_margin=True`` is what MagFace's training code builds (``MagLinear``'s
    default): no margin wherever cos θ <= 0 (target logit s·cos θ, and no gradient into the norm through
    the margin there). The two differ for targets more than π/2 from their centre, as many are early in
    training. Not available with sharded class centres.

    The other keyword arguments are :class:`CombinedMarginLoss`'s: ``reduction``, ``margin_grad``,
    ``ignore_index``, ``sample_rate``, ``check_labels``, ``use_reference``, ``interclass_filtering_threshold``,
    ``label_smoothing``; inter-class filtering does not go with its per-row margins.
    """

    per_row_margins = True
    m = no_margin_attribute("its margin runs from l_m to u_m with the embedding's norm: set those")

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                 l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0, easy_margin: bool = False, *,
                 device: Device = None, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        for name, value in (("l_a", l_a), ("u_a", u_a), ("l_m", l_m), ("u_m", u_m), ("lambda_g", lambda_g)):
            check_real(name, value)
        easy_margin = check_flag("easy_margin", easy_margin)
        if not (0 < l_a < u_a and 0 <= l_m <= u_m <= math.pi / 2 and lambda_g >= 0):
            raise ValueError(f"MagFace needs 0 < l_a < u_a, 0 <= l_m <= u_m <= pi/2 and lambda_g >= 0, got l_a={l_a}, "
                             f"u_a={u_a}, l_m={l_m}, u_m={u_m}, lambda_g={lambda_g}")
        check_passed_on(self, kwargs, MARGINS, "its margin follows the embedding's norm from l_m to u_m: pass those")
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=0.0, m3=0.0, device=device, dtype=dtype, **kwargs)
        self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = (float(v) for v in (l_a, u_a, l_m, u_m, lambda_g))
        self.easy_margin = easy_margin

    def _norms(self, embeddings: Tensor) -> Tensor:
        return norm_dtype(embeddings).norm(dim=1).clamp(self.l_a, self.u_a)

    def row_margins(self, embeddings: Tensor, labels: Tensor) -> tuple[float | Tensor, float | Tensor]:
        norms = self._norms(embeddings)
        margins = self.l_m + (self.u_m - self.l_m) / (self.u_a - self.l_a) * (norms - self.l_a)
        # A non-finite embedding's margin (NaN, from its norm) as l_m: its loss is NaN anyway, where a NaN
        # margin would make the op refuse the whole call.
        margins = torch.nan_to_num(margins, nan=self.l_m)
        if self.easy_margin:
            margins = easy_margins(self, embeddings, labels, margins)
        return margins, self.m3

    def forward(self, embeddings: Tensor, labels: Tensor,
                return_target_cosine: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        out: Any = super().forward(embeddings, labels, return_target_cosine=return_target_cosine)
        loss, target_cosine = out if return_target_cosine else (out, None)
        norms = self._norms(embeddings)
        g = norms / self.u_a ** 2 + 1 / norms
        regulariser = reduce_rows(torch.where(labels != self.ignore_index, g, torch.zeros_like(g)), labels,
                                  self.ignore_index, self.reduction)
        loss = loss + self.lambda_g * regulariser.to(loss.dtype)
        return loss if target_cosine is None else (loss, target_cosine)

    def extra_repr(self) -> str:
        # Its own parameters for m1, m2, m3 (its margin is the norm's), then the options the others show.
        parts = [part for part in self._repr_parts() if not part.startswith(("m1=", "m2=", "m3="))]
        own = [f"l_a={self.l_a}", f"u_a={self.u_a}", f"l_m={self.l_m}", f"u_m={self.u_m}", f"lambda_g={self.lambda_g}"]
        return ", ".join(parts[:3] + own + (["easy_margin=True"] if self.easy_margin else []) + parts[3:])


class CurricularFaceT(LossMixin):
    """CurricularFace's running t (buffer ``t``) and margin for a margin-loss module (mixed in before
    it): ``m`` ArcFace's angular margin, t moving at rate ``momentum``; fp32 (fp64 in an fp64 module),
    never cast to 16 bits."""

    curricular = True
    t: Tensor
    momentum: float
    # t as chunked_options moved it, for forward to store once the loss is computed.
    _moved_t: Tensor | None
    m: float = margin_attribute(lambda module: "m2",
                                "ArcFace's angular margin m (the option m2), radians; settable between steps.")

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 momentum: float = 0.01, *, device: Device = None, dtype: torch.dtype | None = None,
                 **kwargs: Any) -> None:
        if (isinstance(momentum, (bool, torch.Tensor)) or not isinstance(momentum, numbers.Real)
                or not 0 < momentum <= 1):
            raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
        check_passed_on(self, kwargs, MARGINS, "its margin is m (m2 = m): pass m")
        super().__init__(num_classes, embedding_size, s=s, m1=1.0, m2=m, m3=0.0, device=device, dtype=dtype, **kwargs)
        self.momentum = float(momentum)
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("t", torch.zeros((), device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "t" in self._buffers:  # (not yet registered when the base class's __init__ calls this)
            with torch.no_grad():
                self.t.zero_()

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return _apply_keeping_dtype(self, super()._apply, ("t",), fn, *args, **kwargs)


class CurricularFaceLoss(CurricularFaceT, CombinedMarginLoss):
    """CurricularFace (Huang et al., CVPR 2020): ArcFace's target logit s·cos(θ + m), and each hard
    negative, another class j whose cosine c_j exceeds the target's margined cosine cos(θ + m) (whose
    logit would beat the target's), gets s·c_j·(t + c_j) instead of s·c_j. t (buffer ``t``, from 0) is
    a running mean of the batches' target cosines at rate ``momentum`` (its 0.01): early in training t
    is near 0 and the hard negatives count less (easy samples first); as the target cosines rise so
    does t, and the hard negatives count more. The modulation's own gradient, t + 2c_j, flows; t is a
    constant of the step.

    t moves in training mode only, once a call, before that call's logits use it (as in
    CurricularFace), from the counted rows' clamped target cosines, and not when they hold a NaN (a
    non-finite embedding): that call's loss is NaN, t stays. It is fp32 (fp64 in an fp64 module) and
    stays fp32 when the module is cast to 16 bits. Under DistributedDataParallel (which broadcasts
    buffers from rank 0 at every forward) it follows rank 0's batches. Past θ + m = π the target
    logit continues linearly (c - m·sin m, CurricularFace's and arcface_torch's earlier ArcFace's),
    and the hard-negative test compares with that same margined cosine, where CurricularFace's code
    compares with cos(θ + m) itself (which turns back up there); the two differ only for targets
    more than π - m from their class.

    It runs on the chunked PyTorch path (:mod:`arcface_ext.chunked`), not the fused op; ``sample_rate``
    (partial FC) and the other options are :class:`CombinedMarginLoss`'s;
    :class:`arcface_ext.ShardedCurricularFaceLoss` is the same with sharded class centres.
    """

    def chunked_options(self, embeddings: Tensor, labels: Tensor) -> dict[str, Any] | None:
        t = self.t
        if self.training:
            with torch.no_grad():
                labels = labels.long()
                counted = (labels != self.ignore_index) & ~bad_labels(labels, self.num_classes, self.ignore_index)
                cosine = chunked.shard_target_cosines(embeddings.detach(), self.weight.detach(), labels,
                                                      ignore_index=self.ignore_index,
                                                      gemm_dtype=chunked.gemm_dtype(embeddings, self.weight))
                # No counted row, or a non-finite embedding or centre (an fp16 overflow, a step a
                # gradient scaler skips): t stays, rather than staying NaN ever after.
                t = chunked.moved_t(t, cosine, counted, self.momentum)
                # Stored by forward once the loss is computed: a call the loss refuses leaves t as it was.
                self._moved_t = t
        return {"curricular_t": t}

    def forward(self, embeddings: Tensor, labels: Tensor,
                return_target_cosine: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        self._moved_t = None
        out = super().forward(embeddings, labels, return_target_cosine=return_target_cosine)
        if self._moved_t is not None:
            with torch.no_grad():
                self.t.copy_(self._moved_t)
            self._moved_t = None
        return out

    def extra_repr(self) -> str:
        parts = [part for part in self._repr_parts() if not part.startswith(("m1=", "m2=", "m3="))]
        return ", ".join(parts[:2] + [f"m={self.m}", f"momentum={self.momentum}"] + parts[2:])
