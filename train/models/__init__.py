"""Backbones by name: ``get_model("r50", embedding_size=512, image_size=112)``.

iResNets ``r18`` ... ``r200``, the demo's ``small``, MobileFaceNet ``mbf``, and arcface_torch's Vision
Transformers under its names: ``vit_t``, ``vit_t_dp005_mask0``, ``vit_s``, ``vit_s_dp005_mask_0``,
``vit_b``, ``vit_b_dp005_mask_005``, ``vit_l_dp005_mask_005``, ``vit_h``."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, iresnet
from .mobilefacenet import MobileFaceNet, mbf, mobilefacenet
from .small import small
from .vit import VIT_CONFIGS, VisionTransformer, vit

_BUILDERS = {name: partial(iresnet, name) for name in IRESNET_LAYERS}
_BUILDERS["small"] = small
_BUILDERS["mbf"] = mbf
_BUILDERS.update({name: partial(vit, name) for name in VIT_CONFIGS})

NETWORKS = tuple(_BUILDERS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build backbone ``name`` (one of :data:`NETWORKS`); ``kwargs`` go to :class:`IResNet`,
    :class:`MobileFaceNet` or :class:`VisionTransformer`: ``embedding_size``, ``dropout``,
    ``image_size``, ``gradient_checkpointing``, ``amp``, ..."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NETWORKS)}") from None
    return builder(**kwargs)


def multiply_adds(name: str, image_size: int = 112, **kwargs) -> int:
    """Multiply-adds of backbone ``name``'s forward pass on one ``image_size`` image (``kwargs`` as for
    :func:`get_model`): its convolutions, linear layers and attention products, as torch's
    FlopCounterMode counts them (two FLOPs a multiply-add). Built and run on the meta device: no
    memory, no data, milliseconds. BatchNorm, activations and additions are not counted, as ptflops
    (arcface_torch's flops.py) does not count them in ResNets either."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = get_model(name, image_size=image_size, **kwargs)
    x = torch.zeros(1, 3, image_size, image_size, device="meta")
    # forward_trunk/forward_head: the amp="none" forward, which autocast on meta does not allow as model(x);
    # on meta scaled_dot_product_attention decomposes into the two products the counter knows.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval().forward_head(model.forward_trunk(x))
    return counter.get_total_flops() // 2


__all__ = ["NETWORKS", "VIT_CONFIGS", "IBasicBlock", "IResNet", "MobileFaceNet", "VisionTransformer", "get_model",
           "iresnet", "mbf", "mobilefacenet", "multiply_adds", "small", "vit"]
