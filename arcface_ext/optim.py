"""Drop-in replacements for torch.optim.SGD and torch.optim.AdamW that leave out the temporaries the size
of each parameter that torch's steps make: for C x D class centres (a million 512-D classes are 1.95 GB in
fp32) those temporaries, not the loss, set the training step's peak memory. Their parameters, optimizer
state and state dicts are torch's bit for bit (tests/test_optim.py), so a checkpoint of either resumes in
the other. The bundled trainer steps with them (``--optimizer sgd`` / ``adamw``).

    optimizer = arcface_ext.optim.SGD([*backbone.parameters(), *criterion.parameters()], lr=0.1,
                                      momentum=0.9, weight_decay=5e-4)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, overload

import torch
from torch.optim.adamw import adamw as adamw_update  # torch's functional AdamW

from ._checks import is_dtensor

__all__ = ["SGD", "AdamW"]


def _eager_under_compile(fn: Callable) -> Callable:
    """``fn`` run eagerly where torch.compile traces its caller, as ``torch.compiler.disable(fn)``, the wrapper made
    at the first call: the decorator imports torch._dynamo, a second of every ``import arcface_ext`` (each
    command, each process of a run) that an eager step never needs. (torch's optimizers defer it so too.)"""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


def _local(tensor):
    """A DTensor's shard on this rank (a view of it: in-place updates reach the DTensor), else the tensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _layout(tensor):
    """What must match for tensors to be stepped elementwise on this rank's shards: a DTensor's mesh,
    placements and local shape; a tensor's shape."""
    if is_dtensor(tensor):
        return tensor.device_mesh, tuple(tensor.placements), tensor.to_local().shape
    return None, None, tensor.shape


class SGD(torch.optim.SGD):
    """torch.optim.SGD that adds the weight decay to the gradients in place. torch's makes a copy of
    every gradient to add it to (``_foreach_add``, or ``grad.add`` a tensor at a time), which for C x D
    class centres is a temporary the size of the centres at the step's peak: 1.95 GB at a million 512-D
    classes in fp32. The same operation in place gives the same parameters and momentum bit for bit, so
    checkpoints of either resume alike; the state dict is torch's. The gradients hold ``grad + decay *
    param`` after the step, as a step's own copy did (with nesterov and foreach, torch adds ``momentum *
    buf`` to them in place as well); clear them before the next backward, as ``zero_grad`` does.
    ``fused=True`` steps as torch's does: under a GradScaler its kernel unscales the gradients itself
    (``grad_scale``) before it adds the decay, which, added here first, would be divided by the scale."""

    # (torch.optim.Optimizer.step's overloads: the closure's loss, or None without one)
    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _gradients_from(closure)
        folded = []
        for group in self.param_groups:
            decay, params = group["weight_decay"], [p for p in group["params"] if p.grad is not None]
            # torch's own path for what it treats otherwise: maximize negates the gradients first
            # (into a copy it reuses), a tensor decay may need a gradient, sparse gradients, fused, a
            # parameter listed twice (torch adds its decay to the gradient once for each, not twice in place).
            if (not decay or group["maximize"] or group["differentiable"] or group.get("fused")
                    or isinstance(decay, torch.Tensor) or any(p.grad.is_sparse for p in params)
                    or _repeats_a_parameter(group)):
                continue
            if group["foreach"] is False:  # as torch's a tensor at a time
                for param in params:
                    param.grad.add_(param, alpha=decay)
            else:  # as torch's foreach kernels (a GPU's default; on a CPU they add a tensor at a time)
                # One call a kind of tensor: _foreach_add_ refuses lists that mix DTensors and tensors (a
                # model whose loss alone is under FSDP2's fully_shard).
                kinds: dict[type, list[Any]] = {}
                for param in params:
                    kinds.setdefault(type(param.grad), []).append(param)
                for same in kinds.values():
                    torch._foreach_add_([p.grad for p in same], same, alpha=decay)
            folded.append((group, decay))
            group["weight_decay"] = 0.0
        try:
            _unhooked_step(torch.optim.SGD)(self)
        finally:
            for group, decay in folded:
                group["weight_decay"] = decay
        return loss


def _gradients_from(closure):
    """The closure's loss, called first (with gradients enabled) as torch's steps call it, so that the step
    reads the gradients it computes (PyTorch Lightning steps every optimizer with one: its closure runs the
    training step and its backward, then clips the gradients); None without one. torch's own step is then
    called without it: called there, after the decay was added to the gradients (or sliced tensors' were
    set aside), it would compute them again."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _repeats_a_parameter(group) -> bool:
    """Whether a parameter is listed twice in the group (torch warns that this is deprecated, and steps it
    once for each)."""
    return len({id(param) for param in group["params"]}) < len(group["params"])


def _unhooked_step(optimizer_class):
    """torch's step without the hooks a subclass's own step has run: torch wraps them around
    ``optimizer_class.step`` as well once an optimizer of that class is made (a step hook then ran twice)."""
    step = optimizer_class.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW that steps its large tensors (the C x D class centres) a slice at a time. torch's
    divides sqrt(exp_avg_sq) by the bias correction into new tensors the size of the parameter: two at once
    a tensor at a time (the CPU's default), one for every parameter under foreach (a GPU's default). For a
    million 512-D classes in fp32 that is 1.95 GB each, on top of the centres, their gradient and the two
    moments. Each slice is stepped by torch's own functional AdamW (``torch.optim.adamw.adamw``, the
    implementation torch would pick); its operations are elementwise: the parameters, moments and state
    dict are torch's bit for bit, so checkpoints of either resume alike. Tensors of a slice or less, and what
    torch treats otherwise (capturable, differentiable, fused, a tensor lr or betas, complex, sparse or
    non-contiguous tensors or moments, a group that lists a parameter twice), step in torch's own step."""

    slice_numel = 1 << 22  # 16 MiB of fp32 temporaries, two at once

    # (torch.optim.Optimizer.step's overloads: the closure's loss, or None without one)
    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _gradients_from(closure)
        sliced, fresh = self._sliced_and_fresh()
        # torch's step first, without them: a parameter without a gradient is left alone (and where
        # torch's raises, nothing has been stepped).
        grads = [param.grad for param, _ in sliced]
        for param, _ in sliced:
            param.grad = None
        try:
            _unhooked_step(torch.optim.AdamW)(self)
        finally:
            for (param, _), grad in zip(sliced, grads):
                param.grad = grad
        for param, group in sliced:
            self._sliced_step(param, group)
        for param in fresh:
            self.state[param] = self.state.pop(param)
        return loss

    # Eager under torch.compile: dynamo shows a traced step every group with capturable=True (it makes torch's
    # compiled step capturable), so traced, no tensor was sliced. Python 3.11's dynamo ran this frame eagerly;
    # 3.12's and later compile the part of the step before torch's step, which held this.
    @_eager_under_compile
    def _sliced_and_fresh(self):
        """The (parameter, group) pairs to step a slice at a time, and the parameters whose state this step
        makes, to be listed in self.state (so in the state dict, and a checkpoint) in torch's order at the end:
        after the older ones, by group, not the sliced ones last."""
        sliced = [(param, group) for group in self.param_groups if self._slices(group)
                  for param in group["params"] if self._sliceable(param)]
        fresh = [param for group in self.param_groups for param in group["params"]
                 if param.grad is not None and param not in self.state] if sliced else []
        return sliced, fresh

    @staticmethod
    def _slices(group) -> bool:
        scalars = (group["lr"], *group["betas"], group["weight_decay"], group["eps"])
        return not (group.get("capturable") or group.get("differentiable") or group.get("fused")
                    or not group.get("decoupled_weight_decay", True) or _repeats_a_parameter(group)
                    or any(isinstance(value, torch.Tensor) for value in scalars))

    def _sliceable(self, param) -> bool:
        # A DTensor (FSDP2's parameters, gradients and moments) is sliced on this rank's shard: slices of
        # the DTensor itself are new tensors (a Shard(0) tensor's flat slice is gathered), whose update
        # never reached the parameter.
        grad, local = param.grad, _local(param)
        states = [value for value in self.state.get(param, {}).values() if value.dim()]  # (not the step)
        return (grad is not None and local.numel() > self.slice_numel and not param.is_complex()
                and not grad.is_sparse and grad.dtype == param.dtype and grad.device == param.device
                # (Moments loaded as they were saved: channels_last, from a run with --channels-last.)
                and all(_layout(t) == _layout(param) and _local(t).is_contiguous() for t in (param, grad, *states)))

    # Eager under torch.compile too: this frame compiled on its own (torch's step graph-breaks in the frame that
    # calls it) took the step count of one sliced tensor for another's (one went up twice a step, the other not).
    @_eager_under_compile
    def _sliced_step(self, param, group):
        state, keys = self.state[param], ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        if not state:  # as torch's first step makes it (the step a CPU tensor of the default scalar dtype)
            scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
            for key in keys:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        flat = [_local(tensor).view(-1) for tensor in (param, param.grad, *(state[key] for key in keys))]
        for start in range(0, flat[0].numel(), self.slice_numel):
            value, grad, exp_avg, exp_avg_sq, *max_exp_avg_sq = (t[start:start + self.slice_numel] for t in flat)
            step = state["step"].clone()  # each slice's step from the same count (the update adds one)
            adamw_update(
                [value], [grad], [exp_avg], [exp_avg_sq], max_exp_avg_sq, [step], foreach=group["foreach"],
                amsgrad=group["amsgrad"], beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
        state["step"].copy_(step)
