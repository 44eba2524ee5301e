"""Backbones by name: ``get_model("r50", embedding_size=512, image_size=112)``."""

from __future__ import annotations

from functools import partial

from torch import nn

from .iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, iresnet
from .mobilefacenet import MobileFaceNet, mbf, mobilefacenet
from .small import small

_BUILDERS = {name: partial(iresnet, name) for name in IRESNET_LAYERS}
_BUILDERS["small"] = small
_BUILDERS["mbf"] = mbf

NETWORKS = tuple(_BUILDERS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build backbone ``name`` (one of :data:`NETWORKS`); ``kwargs`` go to :class:`IResNet` or
    :class:`MobileFaceNet`: ``embedding_size``, ``dropout``, ``image_size``,
    ``gradient_checkpointing``, ``amp``, ..."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NETWORKS)}") from None
    return builder(**kwargs)


__all__ = ["NETWORKS", "IBasicBlock", "IResNet", "MobileFaceNet", "get_model", "iresnet", "mbf", "mobilefacenet",
           "small"]
