"""Backbones by name: ``get_model("r50", embedding_size=512, image_size=112)``.

iResNets ``r18`` ... ``r200``, the demo's ``small``, MobileFaceNet ``mbf``, and arcface_torch's Vision
Transformers under its names: ``vit_t``, ``vit_t_dp005_mask0``, ``vit_s``, ``vit_s_dp005_mask_0``,
``vit_b``, ``vit_b_dp005_mask_005``, ``vit_l_dp005_mask_005``, ``vit_h``."""

from __future__ import annotations

from functools import partial

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


__all__ = ["NETWORKS", "VIT_CONFIGS", "IBasicBlock", "IResNet", "MobileFaceNet", "VisionTransformer", "get_model",
           "iresnet", "mbf", "mobilefacenet", "small", "vit"]
