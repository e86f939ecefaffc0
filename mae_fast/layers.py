"""Transformer building blocks on F.scaled_dot_product_attention (flash / cuDNN on CUDA).

The fused qkv projection is viewed as (B, N, 3, heads, d) and permuted, never copied: SDPA takes
q, k, v with a unit last stride, and the flash kernel's output transposes back to (B, N, D) as a
view.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(qkv: torch.Tensor, heads: int):
    """(B, N, 3 * heads * d) -> three (B, heads, N, d) views."""
    B, N, three_inner = qkv.shape
    qkv = qkv.view(B, N, 3, heads, three_inner // (3 * heads)).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attend(qkv: torch.Tensor, heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head self-attention of a fused qkv projection: (B, N, 3*inner) -> (B, N, inner)."""
    q, k, v = split_heads(qkv, heads)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    B, _, N, d = out.shape
    return out.transpose(1, 2).reshape(B, N, heads * d)


class Attention(nn.Module):
    """timm's Attention (qkv, proj keys) on SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(attend(self.qkv(x), self.num_heads))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm ViT block (the official MAE's), with the same state-dict keys."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
