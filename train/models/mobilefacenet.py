"""MobileFaceNet (Chen et al., 2018): a sub-million-parameter face-embedding network for phones,
in the paper's Table 1 layout (:func:`mobilefacenet`) and as insightface's ``arcface_torch``
builds its ``mbf`` (:func:`mbf`) and ``mbf_large`` (:func:`mbf_large`).

Parameter names and shapes follow ``arcface_torch/backbones/mobilefacenet.py`` (checked against
its source, not against a released file), so that its ``mbf`` and ``mbf_large`` weights load as they are.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .iresnet import AMP_DTYPES, FaceBackbone

# Runs of bottlenecks, one row each: (expanded channels, output channels, blocks, stride of the
# first block). The paper's Table 1 writes them as (t, c, n, s), expanded = t x input channels:
# (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1).
PAPER_STAGES = ((128, 64, 5, 2), (256, 128, 1, 2), (256, 128, 6, 1), (512, 128, 1, 2), (256, 128, 2, 1))
# arcface_torch's mbf (its scale=2): every output width doubled, the expanded widths kept, so each
# bottleneck expands by half the paper's t.
MBF_STAGES = ((128, 128, 5, 2), (256, 256, 1, 2), (256, 256, 6, 1), (512, 256, 1, 2), (256, 256, 2, 1))
# arcface_torch's mbf_large (its scale=4, blocks=(2, 8, 12, 4)): the output widths doubled again and the
# stride-1 runs twice as long (9 = 1 + 8, 12, 4); the expanded widths are mbf's, so the 512-wide
# bottlenecks contract to 256 rather than expand. Its stem ends in two stride-1 bottlenecks
# (:data:`MBF_LARGE_STEM`) where mbf's has a grouped 3x3 conv.
MBF_LARGE_STAGES = ((128, 256, 9, 2), (256, 512, 1, 2), (256, 512, 12, 1), (512, 512, 1, 2), (256, 512, 4, 1))
MBF_LARGE_STEM = (128, 2)  # (expanded channels, blocks)

# Stride-2 layers between the input and the last feature map: the stem and three bottlenecks.
DOWNSAMPLING = 16


class ConvBN(nn.Module):
    """Conv (no bias), BN and, unless ``linear``, a per-channel PReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, padding: int | None = None, linear: bool = False):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
                  nn.BatchNorm2d(out_channels)]
        if not linear:
            layers.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """MobileNetV2's inverted residual with PReLU: 1x1 expand, 3x3 depthwise (the stride), linear
    1x1 projection, plus the input when the block keeps its shape."""

    def __init__(self, in_channels: int, out_channels: int, expanded: int, stride: int = 1):
        super().__init__()
        self.residual = stride == 1 and in_channels == out_channels
        self.layers = nn.Sequential(
            ConvBN(in_channels, expanded),
            ConvBN(expanded, expanded, 3, stride, groups=expanded),
            ConvBN(expanded, out_channels, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStack(nn.Module):
    """Stride-1 bottlenecks of one width, all with their shortcut (insightface's ``Residual``)."""

    def __init__(self, channels: int, expanded: int, num_blocks: int):
        super().__init__()
        self.layers = nn.Sequential(*(Bottleneck(channels, channels, expanded) for _ in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDCHead(nn.Module):
    """Linear global depthwise conv (a learned weighting of each position), then the linear 1x1
    conv to the embedding (a bias-free FC on the 1x1 map) and its BN."""

    def __init__(self, channels: int, side: int, embedding_size: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBN(channels, channels, side, groups=channels, padding=0, linear=True),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        # Outside ``layers``, so that the parameter indices stay insightface's.
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gdconv, flatten, embedding, norm = self.layers
        return norm(embedding(self.dropout(flatten(gdconv(x)))))


class MobileFaceNet(FaceBackbone):
    """Stem (conv3x3 stride 2, depthwise conv3x3), bottleneck stages, conv1x1 to ``head_width``,
    and the GDC embedding head. The defaults are the paper's Table 1: 128-D, 221M multiply-adds
    at 112x112 as the paper says, and 1,003,136 parameters. The paper's "0.99M" ("less than 1
    million") fits the count without the 7,552 PReLU slopes, 995,584: a guess at how it counted.

    Args:
        stages: ``(expanded, out, blocks, stride)`` per run of bottlenecks (:data:`PAPER_STAGES`).
        stem_width: channels of the stem convs.
        stem_groups: groups of the stem's 3x3 conv after the first (``stem_width``: depthwise).
        stem_bottlenecks: ``(expanded, blocks)``: that many stride-1 bottlenecks (their shortcut
            included) in place of the stem's second 3x3 conv, as arcface_torch's ``mbf_large`` has
            (:data:`MBF_LARGE_STEM`); None (the default): the conv.
        head_width: channels of the conv1x1 before the GDConv.
        embedding_size: size of the output embedding.
        dropout: dropout probability before the embedding layer (the paper uses none).
        image_size: input side in pixels (square), a multiple of 16; the GDConv's kernel is
            ``image_size / 16``, the side of the last feature map.
        gradient_checkpointing: recompute each stem conv and bottleneck in the backward pass
            to save memory (BatchNorm running statistics then see each batch twice).
        amp: ``"none"``, ``"fp16"`` or ``"bf16"``: autocast the stem and the bottlenecks to this
            dtype; the conv1x1 and the GDC head always run in fp32, as in insightface.
    """

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int, int]] = PAPER_STAGES,
        stem_width: int = 64,
        stem_groups: int | None = None,
        stem_bottlenecks: tuple[int, int] | None = None,
        head_width: int = 512,
        embedding_size: int = 128,
        dropout: float = 0.0,
        image_size: int = 112,
        gradient_checkpointing: bool = False,
        amp: str = "none",
    ):
        super().__init__()
        if image_size <= 0 or image_size % DOWNSAMPLING:
            raise ValueError(f"MobileFaceNet needs an image_size that is a multiple of {DOWNSAMPLING} "
                             f"(its GDConv covers the image_size/{DOWNSAMPLING} final map), got {image_size}")
        if sum(stride == 2 for *_, stride in stages) != 3:
            raise ValueError(f"expected three stride-2 stages after the stem, got stages={tuple(stages)}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        self.image_size = image_size
        self.embedding_size = embedding_size
        self.feature_map_size = image_size // DOWNSAMPLING
        self.gradient_checkpointing = gradient_checkpointing
        self.amp = amp

        layers = [ConvBN(3, stem_width, 3, stride=2)]
        if stem_bottlenecks is None:
            layers.append(ConvBN(stem_width, stem_width, 3, groups=stem_groups or stem_width))
        else:
            stem_expanded, stem_blocks = stem_bottlenecks
            layers.append(ResidualStack(stem_width, stem_expanded, stem_blocks))
        channels = stem_width
        for expanded, out_channels, num_blocks, stride in stages:
            # insightface's grouping: a stride-2 block alone, then a stack of the stride-1 rest.
            if stride != 1:
                layers.append(Bottleneck(channels, out_channels, expanded, stride))
                channels, num_blocks = out_channels, num_blocks - 1
            if num_blocks:
                if channels != out_channels:
                    raise ValueError(f"a stride-1 stage cannot change the width ({channels} -> {out_channels})")
                layers.append(ResidualStack(channels, expanded, num_blocks))
        self.layers = nn.Sequential(*layers)
        self.conv_sep = ConvBN(channels, head_width)
        self.features = GDCHead(head_width, self.feature_map_size, embedding_size, dropout)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def blocks(self) -> Iterator[nn.Module]:
        """The units that gradient checkpointing recomputes: the stem's layers and each bottleneck."""
        for layer in self.layers:
            yield from layer.layers if isinstance(layer, ResidualStack) else (layer,)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and bottlenecks, up to the last (image_size/16)-sided feature map."""
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks():
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.conv_sep(x))


def mobilefacenet(**kwargs) -> MobileFaceNet:
    """The paper's MobileFaceNet (Table 1): 64-wide stem, 128-D embedding unless
    ``embedding_size`` says otherwise; ``kwargs`` go to :class:`MobileFaceNet`."""
    return MobileFaceNet(**kwargs)


def mbf(**kwargs) -> MobileFaceNet:
    """arcface_torch's ``mbf``: the paper's layout with doubled stem and output widths and a
    512-D embedding.

    As there, the stem's second 3x3 conv keeps the paper's 64 groups on its 128 channels (two
    channels a group, not depthwise). ``kwargs`` go to :class:`MobileFaceNet`.
    """
    kwargs.setdefault("embedding_size", 512)
    return MobileFaceNet(stages=MBF_STAGES, stem_width=128, stem_groups=64, **kwargs)


def mbf_large(**kwargs) -> MobileFaceNet:
    """arcface_torch's ``mbf_large`` (its ``get_mbf_large``: scale 4, blocks (2, 8, 12, 4)): a 256-wide
    stem ending in two bottlenecks, :data:`MBF_LARGE_STAGES`, and a 512-D embedding. ``kwargs`` go to
    :class:`MobileFaceNet`."""
    kwargs.setdefault("embedding_size", 512)
    return MobileFaceNet(stages=MBF_LARGE_STAGES, stem_width=256, stem_bottlenecks=MBF_LARGE_STEM, **kwargs)
