"""vit-pytorch's ViT (its API and state-dict keys) on SDPA and the fused patchify op."""
from __future__ import annotations

from functools import partial
from itertools import islice

import torch
from torch import nn

from .. import ops
from ..ops._common import pair_arg
from .blocks import attend, check_images, has_hooks, run_prenorm


class Patchify(nn.Module):
    """(B, C, H, W) -> (B, L, ph*pw*C) in (p1 p2 c) order; vit-pytorch's Rearrange, parameter-free."""

    def __init__(self, patch_size):
        super().__init__()
        self.patch_size = pair_arg(patch_size, "patch_size")

    def forward(self, img):
        return ops.patchify(img, self.patch_size)


class Attention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)  # on the attention probabilities, as in vit-pytorch
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x):
        return attention_forward(self, x)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Transformer(nn.Module):
    """vit-pytorch's Transformer: pre-norm blocks, then a final LayerNorm."""

    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, dropout), FeedForward(dim, mlp_dim, dropout)])
            for _ in range(depth))

    def forward(self, x):
        return transformer_forward(self, x)


def attention_forward(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """vit-pytorch Attention semantics on SDPA; works on vit_pytorch's own modules too."""
    return _attend_normed(attn, attn.norm(x))


def _attend_normed(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """attention_forward after its LayerNorm."""
    p = attn.dropout.p if attn.training else 0.0
    return attn.to_out(attend(attn.to_qkv(h), attn.heads, p))


def transformer_forward(transformer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs a vit-pytorch-shaped Transformer (ours or vit_pytorch's) with SDPA attention, so a
    vit_pytorch.ViT encoder handed to mae_fast.MAE gets the fast path while training in place.
    With set_fused_add_norm(True), each residual add is fused with the LayerNorm after it
    (Attention.norm, FeedForward.net[0], the final norm), as in the official model's blocks."""
    fusable = all(not has_hooks(attn) and not has_hooks(ff) and isinstance(getattr(ff, "net", None), nn.Sequential)
                  and isinstance(ff.net[0], nn.LayerNorm) for attn, ff in transformer.layers)
    if not fusable:  # hooked (FSDP, taps) or differently built sub-layers: call them as modules
        for attn, ff in transformer.layers:
            x = attn(x) + x
            x = ff(x) + x
        return transformer.norm(x)
    sublayers = (pair for attn, ff in transformer.layers
                 for pair in ((attn.norm, partial(_attend_normed, attn)), (ff.net[0], partial(_after_norm, ff.net))))
    return run_prenorm(x, sublayers, transformer.norm)


def _after_norm(net: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """A FeedForward's layers after its LayerNorm."""
    for layer in islice(net, 1, None):
        h = layer(h)
    return h


class ViT(nn.Module):
    """vit-pytorch's ViT: same constructor, module tree and state-dict keys (2-D pos_embedding of
    L + cls rows). pool='cls' adds pos rows to [cls, patches] in order, as vit-pytorch does."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, pool="cls",
                 channels=3, dim_head=64, dropout=0.0, emb_dropout=0.0):
        super().__init__()
        (H, W), (ph, pw) = pair_arg(image_size, "image_size"), pair_arg(patch_size, "patch_size")
        if H % ph or W % pw:
            raise ValueError(f"image_size {(H, W)} must be divisible by patch_size {(ph, pw)}")
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.image_size, self.patch_size, self.channels = (H, W), (ph, pw), channels
        num_patches, patch_dim = (H // ph) * (W // pw), channels * ph * pw
        num_cls = 1 if pool == "cls" else 0
        self.to_patch_embedding = nn.Sequential(
            Patchify((ph, pw)), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.cls_token = nn.Parameter(torch.randn(num_cls, dim))
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + num_cls, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes) if num_classes > 0 else None

    def check_input(self, img) -> None:
        (H, W), C = self.image_size, self.channels
        check_images(img, "img", C, lambda h, w: (h, w) == (H, W),
                     f"(batch, {C}, {H}, {W}) for this ViT (image_size={self.image_size}, channels={C})")

    def forward(self, img):
        self.check_input(img)
        x = self.to_patch_embedding(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.dropout(x + self.pos_embedding[: x.shape[1]])
        x = self.transformer(x)
        if self.mlp_head is None:
            return x
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))
