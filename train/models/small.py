"""A narrow iResNet for the demo: the paper's block and head at a fraction of the cost,
so that it trains in minutes on two CPU cores at any input size."""

from __future__ import annotations

from .iresnet import IResNet


def small(**kwargs) -> IResNet:
    """One block per stage, 16/32/64/128 channels and a stride-2 stem.

    The stride-2 stem is the one departure from the paper's layout: it quarters the
    cost of the full-resolution stage, which dominates a narrow network. At 64x64 input
    the head sees a 2x2x128 map; at 112x112 a 4x4x128 one.
    """
    kwargs.setdefault("stem_stride", 2)
    return IResNet(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), **kwargs)
