"""Small Vision Transformers (the plain attention baseline).

Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), in the pre-norm form of DeiT (Touvron et al. 2021):

    patches  conv with kernel = stride = patch_size -> (N, T, dim) tokens, T = (input_size / patch_size)**2
    tokens   prepend a learned class token, add a learned position embedding -> (N, T + 1, dim)
    blocks   depth x [x + attn(LN(x)); x + MLP(LN(x))], multi-head self-attention, GELU MLP of ratio 4
    head     LN -> class token -> linear

``vit_tiny`` (dim 192, depth 6, 3 heads, 2.7M params) and ``vit_small`` (dim 384, depth 8, 6 heads, 14M params) are
shallower than DeiT-Ti/S (depth 12) because MedMNIST datasets are small (hundreds to ~100k images) and a ViT trained
from scratch on them is data-starved already. The default patch size keeps the token count small: 4 px at 28 px
(49 tokens), 8 px at 64 px (64), 16 px at 128 px (64) and 224 px (196).

Opacus: attention is written with ``nn.Linear`` (qkv, proj), not ``nn.MultiheadAttention``, so the standard Linear
per-sample gradient rule applies; the class token and position embedding live in their own small module
(:class:`TokenEmbedding`) that holds parameters and no children, so a per-sample gradient rule can be registered for
it (until then Opacus falls back to functorch for that one module).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import register_backbone


def default_patch_size(input_size: int) -> int:
    """4 px for inputs up to 32 px (28 -> 49 tokens), 8 px up to 64 px, 16 px above (128 -> 64, 224 -> 196)."""
    if input_size <= 32:
        return 4
    if input_size <= 64:
        return 8
    return 16


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch_size`` patches, each projected linearly to ``dim`` (a strided Conv2d)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, dim, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, dim)


class TokenEmbedding(nn.Module):
    """Prepends the learned class token and adds the learned position embedding (parameters only, no children)."""

    def __init__(self, num_patches: int, dim: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (N, 1, dim)
        return torch.cat((cls, x), dim=1) + self.pos_embed  # (N, T + 1, dim)

    def per_sample_gradients(self, inputs, grad_output: torch.Tensor) -> dict:
        """Exact per-sample gradients (see :mod:`eqlightning.nn.persample`): the class token and the position
        embedding are added per sample, so their gradients are slices of the output gradient."""
        result, g = {}, grad_output  # (N, T + 1, dim)
        if self.cls_token.requires_grad:
            result[self.cls_token] = g[:, :1].unsqueeze(1).to(self.cls_token.dtype)  # (N, 1, 1, dim)
        if self.pos_embed.requires_grad:
            result[self.pos_embed] = g.unsqueeze(1).to(self.pos_embed.dtype)  # (N, 1, T + 1, dim)
        return result


class Attention(nn.Module):
    """Multi-head self-attention from a fused qkv Linear and an output Linear."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, N, h, T, d/h)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                             dropout_p=self.dropout if self.training else 0.0)  # (N, h, T, d/h)
        out = out.transpose(1, 2).reshape(n, t, d)  # (N, T, dim)
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))  # (N, T, dim)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (N, T, dim)
        return x + self.mlp(self.norm2(x))  # (N, T, dim)


class VisionTransformer(nn.Module):
    """A plain ViT; build it through ``create_backbone('vit_tiny', ...)`` or ``'vit_small'``."""

    group = None  # plain: the logits are not invariant to any group

    def __init__(self, in_channels: int, num_classes: int, input_size: int = 28, dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp_ratio: float = 4.0, dropout: float = 0.0, patch_size: int | None = None):
        super().__init__()
        patch_size = default_patch_size(input_size) if patch_size is None else patch_size
        if patch_size < 1 or input_size % patch_size != 0:
            divisors = [p for p in range(2, input_size // 2 + 1) if input_size % p == 0]
            raise ValueError(f"ViT input_size={input_size} is not divisible by patch_size={patch_size}: pass a "
                             f"patch_size dividing {input_size} (one of {divisors}) or resize the images to a "
                             f"multiple of {patch_size}")
        if dim % heads != 0:
            raise ValueError(f"ViT dim={dim} is not divisible by heads={heads}: choose heads dividing dim "
                             f"(e.g. dim={heads * 64} for {heads} heads of 64)")
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size
        self.patch_size, self.dim, self.num_patches = patch_size, dim, (input_size // patch_size) ** 2
        self.patch_embed = PatchEmbedding(in_channels, dim, patch_size)
        self.tokens = TokenEmbedding(self.num_patches, dim)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.num_features = dim
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final class-token features ``(N, dim)``."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"this ViT was built for {self.input_size}x{self.input_size} inputs (its position "
                             f"embedding has {self.num_patches} patches) but got {tuple(x.shape[-2:])}: build it "
                             f"with input_size={x.shape[-1]} or resize the images")
        x = self.pos_drop(self.tokens(self.patch_embed(x)))  # (N, T + 1, dim)
        x = self.norm(self.blocks(x))  # (N, T + 1, dim)
        return x[:, 0]  # (N, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (N, num_classes)


_OPTIONS = """Options: input_size (28; must be divisible by patch_size), patch_size (default from input_size: 4 at
    28 px, 8 at 64, 16 at 128 and 224), dim, depth, heads (must divide dim), mlp_ratio (4.0), dropout (0.0)."""


@register_backbone("vit_tiny", equivariant=False)
def vit_tiny(*, in_channels: int, num_classes: int, input_size: int = 28, dim: int = 192, depth: int = 6,
             heads: int = 3, mlp_ratio: float = 4.0, dropout: float = 0.0,
             patch_size: int | None = None) -> VisionTransformer:
    """Small ViT: dim 192, depth 6, 3 heads (DeiT-Ti width at half its depth; 2.7M params), pre-norm, class token."""
    return VisionTransformer(in_channels, num_classes, input_size, dim, depth, heads, mlp_ratio, dropout, patch_size)


@register_backbone("vit_small", equivariant=False)
def vit_small(*, in_channels: int, num_classes: int, input_size: int = 28, dim: int = 384, depth: int = 8,
              heads: int = 6, mlp_ratio: float = 4.0, dropout: float = 0.0,
              patch_size: int | None = None) -> VisionTransformer:
    """ViT: dim 384, depth 8, 6 heads (DeiT-S width, 8 of its 12 blocks; 14M params), pre-norm, class token."""
    return VisionTransformer(in_channels, num_classes, input_size, dim, depth, heads, mlp_ratio, dropout, patch_size)


for _fn in (vit_tiny, vit_small):
    _fn.__doc__ += "\n\n    " + _OPTIONS
