"""iResNet face-recognition backbones (ArcFace paper, insightface ``arcface_torch``).

Parameter names follow insightface's ``iresnet.py``, so its released ``backbone.pth``
files load with ``load_state_dict`` as they are.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

# Blocks per stage; every stage starts with a stride-2 block: 112 -> 56 -> 28 -> 14 -> 7.
IRESNET_LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
    "r2060": (3, 128, 896, 3),  # arcface_torch's iresnet2060: 1,030 blocks, 2,060 convolutions in them
}
# What arcface_torch's iresnet2060 does in training, always: layer2 and layer3 recomputed in the backward pass
# in 20 and 100 segments (torch's checkpoint_sequential), layer1 and layer4 kept. Here the default of
# ``gradient_checkpointing`` for r2060, with these segments.
IRESNET_CHECKPOINT_SEGMENTS = {"r2060": (0, 20, 100, 0)}

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN-conv3x3-BN-PReLU-conv3x3(stride)-BN plus the (optionally projected) shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + identity


def _feature_side(side: int, num_halvings: int) -> int:
    # A 3x3 stride-2 conv with padding 1 maps n -> ceil(n / 2).
    for _ in range(num_halvings):
        side = (side + 1) // 2
    return side


class FaceBackbone(nn.Module):
    """What every backbone here shares: the convolutional trunk (``forward_trunk``) runs under
    autocast to ``self.amp``, the embedding head (``forward_head``) in fp32, as insightface runs
    them; and one ``repr`` of the settings."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp_dtype = AMP_DTYPES[self.amp]
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            x = self.forward_trunk(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.forward_head(x.float())

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, feature_map={self.feature_map_size}x{self.feature_map_size}, "
            f"embedding_size={self.embedding_size}, amp={self.amp}, "
            f"gradient_checkpointing={self.gradient_checkpointing}"
        )


class IResNet(FaceBackbone):
    """Stem, four stages of :class:`IBasicBlock`, and the BN-Dropout-FC-BN embedding head.

    Args:
        layers: blocks per stage.
        widths: channels per stage (64, 128, 256, 512 for the paper's networks).
        embedding_size: size of the output embedding.
        dropout: dropout probability in the head (``1 - keep_prob``).
        image_size: input side in pixels (square); sets the FC layer's input size.
        stem_width: channels of the stem conv (defaults to ``widths[0]``).
        stem_stride: stride of the stem conv (1 in the paper; 2 halves the cost of small nets).
        gradient_checkpointing: recompute blocks in the backward pass to save memory: every block, each
            alone, without ``checkpoint_segments``; with them, all but each stage's last segment and the
            stages given 0 (BatchNorm running statistics then see each batch twice in the recomputed blocks).
        checkpoint_segments: with ``gradient_checkpointing``, the segments each stage is recomputed in, as
            ``torch.utils.checkpoint.checkpoint_sequential`` splits it (its last segment is kept, not
            recomputed); 0 keeps a stage. None (the default): each block is its own segment.
        amp: ``"none"``, ``"fp16"`` or ``"bf16"``: autocast the convolutional trunk to this
            dtype; the FC and the last BN always run in fp32, as in insightface.
        zero_init_residual: start each residual branch at zero (last BN scale 0).
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        embedding_size: int = 512,
        dropout: float = 0.0,
        image_size: int = 112,
        stem_width: int | None = None,
        stem_stride: int = 1,
        gradient_checkpointing: bool = False,
        amp: str = "none",
        zero_init_residual: bool = False,
        checkpoint_segments: Sequence[int] | None = None,
    ):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"expected 4 stages, got layers={tuple(layers)} widths={tuple(widths)}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if checkpoint_segments is not None and (
                len(checkpoint_segments) != 4 or not all(0 <= s <= n for s, n in zip(checkpoint_segments, layers))):
            raise ValueError(f"checkpoint_segments must give 0 to the stage's blocks for each of the 4 stages, got "
                             f"{tuple(checkpoint_segments)} for layers={tuple(layers)}")
        stem_width = stem_width or widths[0]
        self.image_size = image_size
        self.embedding_size = embedding_size
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_segments = None if checkpoint_segments is None else tuple(checkpoint_segments)
        self.amp = amp

        self.conv1 = nn.Conv2d(3, stem_width, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width, eps=1e-5)
        self.prelu = nn.PReLU(stem_width)
        inplanes = stem_width
        stages = []
        for num_blocks, planes in zip(layers, widths):
            blocks = [IBasicBlock(inplanes, planes, stride=2)]
            blocks += [IBasicBlock(planes, planes) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        side = _feature_side(image_size, 4 + (stem_stride == 2))
        self.feature_map_size = side
        self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(inplanes * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        # The paper's fixed-scale BN on the embedding: the scale stays 1, only the shift learns.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn3.weight, 0)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional trunk up to the flattened, dropped-out feature map."""
        x = self.prelu(self.bn1(self.conv1(x)))
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        segments = self.checkpoint_segments or (None,) * 4
        for stage, stage_segments in zip((self.layer1, self.layer2, self.layer3, self.layer4), segments):
            if not checkpointing or stage_segments == 0:
                x = stage(x)
            elif stage_segments is None:
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = checkpoint_sequential(stage, stage_segments, x, use_reentrant=False)
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        return self.dropout(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(x))

    def extra_repr(self) -> str:
        segments = "" if self.checkpoint_segments is None else f", checkpoint_segments={self.checkpoint_segments}"
        return super().extra_repr() + segments


def iresnet(name: str, **kwargs) -> IResNet:
    """The paper's iResNet ``name`` (``r18`` ... ``r200``), or arcface_torch's ``r2060``; ``kwargs`` go to
    :class:`IResNet` and win over r2060's defaults, arcface_torch's checkpointing in training
    (``gradient_checkpointing`` on, :data:`IRESNET_CHECKPOINT_SEGMENTS`)."""
    try:
        layers = IRESNET_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown iResNet {name!r}; expected one of {sorted(IRESNET_LAYERS)}") from None
    if name in IRESNET_CHECKPOINT_SEGMENTS:
        kwargs.setdefault("gradient_checkpointing", True)
        kwargs.setdefault("checkpoint_segments", IRESNET_CHECKPOINT_SEGMENTS[name])
    return IResNet(layers, **kwargs)
