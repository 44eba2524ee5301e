"""Vision Transformers for face embeddings, as insightface's ``arcface_torch`` builds them for its
WebFace42M models (``vit_t`` ... ``vit_h``): 9x9 patches, no class token, pre-norm blocks with a
ReLU6 MLP, and an embedding head over every token (flatten, Linear-BN-Linear-BN); in training,
stochastic depth and, for some configurations, random patch masking.

Parameter names and shapes follow ``arcface_torch/backbones/vit.py`` (checked against its source,
not against a released file), so that its ViT weights load with ``load_state_dict`` as they are.

Where this differs from insightface's code (the weights are not affected):

- attention is :func:`torch.nn.functional.scaled_dot_product_attention` in the trunk's autocast
  dtype (its fused kernels keep the softmax in fp32); insightface computes ``softmax(QK^T)V``
  with autocast off, in fp32, and forces fp16 autocast on the qkv, projection and MLP layers
  whatever its ``fp16`` setting. Here ``amp`` decides for the whole trunk.
- insightface's forward calls ``random_masking`` without the configured ratio, so its default,
  0.1, is what every configuration with masking actually masks (``vit_b_dp005_mask_005`` and
  ``vit_l_dp005_mask_005`` included); here the configured ``mask_ratio`` is used.
- ``dropout`` (the trainer's ``--keep-prob``) drops the flattened tokens before the head, as the
  other backbones drop before their embedding layer; insightface's ViT ignores it. Its in-block
  dropout rates (``drop_rate``, ``attn_drop_rate``) are 0 in every configuration and not offered.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .iresnet import AMP_DTYPES, FaceBackbone


class ViTConfig(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int
    drop_path_rate: float
    mask_ratio: float
    gradient_checkpointing: bool  # insightface's ``using_checkpoint``: the default when not given


# arcface_torch's ``backbones/__init__.py``: every one has 9x9 patches, an MLP 4x as wide as the
# tokens, no qkv bias and LayerNorm. The ``_dp005_mask...`` ones are its WebFace42M settings.
VIT_CONFIGS = {
    "vit_t": ViTConfig(256, 12, 8, 0.1, 0.1, False),
    "vit_t_dp005_mask0": ViTConfig(256, 12, 8, 0.05, 0.0, False),
    "vit_s": ViTConfig(512, 12, 8, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": ViTConfig(512, 12, 8, 0.05, 0.0, False),
    "vit_b": ViTConfig(512, 24, 8, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": ViTConfig(512, 24, 8, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": ViTConfig(768, 24, 8, 0.05, 0.05, True),
    "vit_h": ViTConfig(1024, 48, 8, 0.1, 0.0, True),
}

PATCH_SIZE = 9  # 112 px -> a 12x12 grid covering 108 px: the last 4 rows and columns are not seen
NORMS = ("ln", "bn")


class PatchEmbed(nn.Module):
    """A ``patch_size``-strided conv: one ``embed_dim`` token per patch, in row-major order."""

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenBatchNorm(nn.Module):
    """insightface's ``norm_layer="bn"``: BatchNorm1d with one channel per token position
    (statistics over the batch and the embedding dimension). Wrapped, for its ``.bn.`` keys."""

    def __init__(self, num_tokens: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def make_norm(kind: str, dim: int, num_tokens: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "ln" else TokenBatchNorm(num_tokens)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection (laid out ``[3][heads][head_dim]``, as
    insightface's), scaled dot-product attention with the usual ``head_dim ** -0.5``, output
    projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, tokens, head_dim)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Linear, ReLU6 (insightface's choice, not ViT's usual GELU), Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random ``p`` of the samples and
    scale the others by ``1 / (1 - p)``; the identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, each
    branch through stochastic depth."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop_path: float = 0.0, norm: str = "ln"):
        super().__init__()
        self.norm1 = make_norm(norm, dim, num_tokens)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = make_norm(norm, dim, num_tokens)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(FaceBackbone):
    """Patch embedding plus learned position embeddings, ``depth`` blocks (:class:`Block`), a final norm,
    and the ``feature`` head: the flattened tokens through Linear (no bias) to ``embed_dim``, BN,
    Linear (no bias) to ``embedding_size``, BN (both BNs eps 2e-5, scale learned).

    In training, ``mask_ratio`` of the patch tokens (a random set per sample) skip the blocks;
    after the final norm the learned ``mask_token`` takes their places, so the head always sees
    every position. With ``mask_ratio=0`` the mask token is kept (for insightface's state dicts)
    but frozen, so that optimizers and DDP see no parameter without a gradient.

    Args:
        embed_dim, depth, num_heads: token width, number of blocks, attention heads.
        embedding_size: size of the output embedding (insightface's ``num_features``).
        dropout: dropout probability on the flattened tokens before the head (insightface: none).
        image_size: input side in pixels (square), at least ``patch_size``; the token grid is
            ``image_size // patch_size`` a side, pixels past it are not seen (4 of 112 with 9px
            patches, as in insightface).
        patch_size: side of the square patches.
        mlp_ratio: MLP width over ``embed_dim``.
        qkv_bias: a bias on the qkv projection.
        drop_path_rate: stochastic depth of the last block; it rises linearly from 0 at the first.
        mask_ratio: fraction of the patch tokens dropped in training, in [0, 1).
        norm: ``"ln"`` (LayerNorm over each token) or ``"bn"`` (BatchNorm per token position;
            needs ``mask_ratio=0``, as the number of tokens must not change).
        gradient_checkpointing: recompute each block in the backward pass to save memory.
        amp: ``"none"``, ``"fp16"`` or ``"bf16"``: autocast the patch embedding and the blocks to
            this dtype; the final norm and the head always run in fp32.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        embedding_size: int = 512,
        dropout: float = 0.0,
        image_size: int = 112,
        patch_size: int = PATCH_SIZE,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        norm: str = "ln",
        gradient_checkpointing: bool = False,
        amp: str = "none",
    ):
        super().__init__()
        if image_size < patch_size:
            raise ValueError(f"image_size {image_size} is smaller than one {patch_size}x{patch_size} patch; "
                             f"a ViT with patch_size {patch_size} needs image_size >= {patch_size}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if norm == "bn" and mask_ratio > 0:
            raise ValueError("norm='bn' normalises each token position, so it cannot drop tokens: "
                             "use mask_ratio=0 or norm='ln'")
        self.image_size = image_size
        self.embedding_size = embedding_size
        self.gradient_checkpointing = gradient_checkpointing
        self.amp = amp
        self.patch_size = patch_size
        self.feature_map_size = image_size // patch_size  # tokens a side
        self.num_patches = self.feature_map_size ** 2
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.norm_kind = norm

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # as insightface rounds them
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, self.num_patches, mlp_ratio, qkv_bias, rate, norm) for rate in rates)
        self.norm = make_norm(norm, embed_dim, self.num_patches)
        self.dropout = nn.Dropout(p=dropout)  # no parameters: insightface's keys are unaffected
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim), requires_grad=mask_ratio > 0)

        # insightface's initialisation; the patch conv and the BNs keep PyTorch's defaults.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _keep_random_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A random ``1 - mask_ratio`` of each sample's tokens, and their positions."""
        batch, tokens, dim = x.shape
        keep = int(tokens * (1 - self.mask_ratio))
        kept = torch.rand(batch, tokens, device=x.device).argsort(dim=1)[:, :keep]
        index = kept.unsqueeze(-1).expand(-1, -1, dim)
        return x.gather(1, index), index

    def _fill_masked_tokens(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The kept tokens back at their positions, the mask token everywhere else."""
        batch, _, dim = x.shape
        return self.mask_token.to(x.dtype).expand(batch, self.num_patches, dim).scatter(1, index, x)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens through the blocks and the final norm, flattened: (batch, tokens * dim)."""
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images (image_size), "
                             f"got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, index = self._keep_random_tokens(x)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        x = self.norm(x.float())  # fp32 under autocast too: no autocast list lowers a norm or a scatter
        if masking:
            x = self._fill_masked_tokens(x, index)
        return x.flatten(1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.dropout(x))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
                f"depth={len(self.blocks)}, mask_ratio={self.mask_ratio}, norm={self.norm_kind!r}")


def vit(name: str, **kwargs) -> VisionTransformer:
    """arcface_torch's ViT ``name`` (one of :data:`VIT_CONFIGS`); ``kwargs`` go to
    :class:`VisionTransformer` and win over the configuration (``gradient_checkpointing``
    defaults to insightface's ``using_checkpoint``: on for ``vit_b``, ``vit_l``, ``vit_h``)."""
    try:
        config = VIT_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown ViT {name!r}; expected one of {', '.join(VIT_CONFIGS)}") from None
    settings = config._asdict()
    settings.update(kwargs)
    return VisionTransformer(**settings)
