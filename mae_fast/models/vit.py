"""vit-pytorch's ViT (its API and state-dict keys) on SDPA and the fused patchify op, with timm's
forward_intermediates, attention maps (features.py) and set_grad_checkpointing."""
from __future__ import annotations

from functools import partial
from itertools import islice

import torch
from torch import nn

from .. import ops
from ..ops._common import pair_arg
from .blocks import attend, attention_probs, check_images, has_hooks, run_checkpointed, run_prenorm
from .features import EncoderFeatures, FeatureStack, grad_checkpointing_arg


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
        self.grad_checkpointing = False  # read by transformer_forward

    def forward(self, x):
        return transformer_forward(self, x)


def attention_forward(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """vit-pytorch Attention semantics on SDPA; works on vit_pytorch's own modules too."""
    return _attend_normed(attn, attn.norm(x))


def _attend_normed(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """attention_forward after its LayerNorm."""
    p = attn.dropout.p if attn.training else 0.0
    return attn.to_out(attend(attn.to_qkv(h), attn.heads, p))


def attention_map(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention probabilities (B, heads, N, N) of a vit-pytorch Attention on tokens x."""
    return attention_probs(attn.to_qkv(attn.norm(x)), attn.heads)


def _fusable(attn: nn.Module, ff: nn.Module) -> bool:
    return (not has_hooks(attn) and not has_hooks(ff) and isinstance(getattr(ff, "net", None), nn.Sequential)
            and isinstance(ff.net[0], nn.LayerNorm))


def _sublayers(attn: nn.Module, ff: nn.Module):
    return (attn.norm, partial(_attend_normed, attn)), (ff.net[0], partial(_after_norm, ff.net))


def _layer(attn: nn.Module, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One layer: x + attn(x), then x + ff(x). Hooked (FSDP, taps) or differently built sub-layers
    are called as modules."""
    if _fusable(attn, ff):
        return run_prenorm(x, _sublayers(attn, ff))
    x = attn(x) + x
    return ff(x) + x


def transformer_forward(transformer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs a vit-pytorch-shaped Transformer (ours or vit_pytorch's) with SDPA attention, so a
    vit_pytorch.ViT encoder handed to mae_fast.MAE gets the fast path while training in place.
    With set_fused_add_norm(True), each residual add is fused with the LayerNorm after it
    (Attention.norm, FeedForward.net[0], the final norm), as in the official model's blocks.
    A `grad_checkpointing` attribute set True checkpoints each layer's activations."""
    layers = transformer.layers
    if getattr(transformer, "grad_checkpointing", False):
        return run_checkpointed([partial(_layer, attn, ff) for attn, ff in layers], x, transformer.norm)
    if all(_fusable(attn, ff) for attn, ff in layers):  # one residual stream, fused across layers too
        return run_prenorm(x, (pair for attn, ff in layers for pair in _sublayers(attn, ff)), transformer.norm)
    for attn, ff in layers:
        x = _layer(attn, ff, x)
    return transformer.norm(x)


def _after_norm(net: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """A FeedForward's layers after its LayerNorm."""
    for layer in islice(net, 1, None):
        h = layer(h)
    return h


class ViT(EncoderFeatures, nn.Module):
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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the transformer's layers (timm's name)."""
        self.transformer.grad_checkpointing = grad_checkpointing_arg(enable)

    def _embed(self, img):
        self.check_input(img)
        x = self.to_patch_embedding(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.dropout(x + self.pos_embedding[: x.shape[1]])

    def _feature_stack(self, img, interpolate_pos_encoding) -> FeatureStack:
        if interpolate_pos_encoding is not False:
            raise ValueError("interpolate_pos_encoding: this ViT takes its own image_size only")
        layers, (H, W), (ph, pw) = self.transformer.layers, self.image_size, self.patch_size
        return FeatureStack(self._embed(img), [partial(_layer, attn, ff) for attn, ff in layers],
                            lambda i, x: attention_map(layers[i][0], x), self.transformer.norm,
                            self.cls_token.shape[0], (H // ph, W // pw), self.transformer.grad_checkpointing)

    def forward(self, img):
        x = self.transformer(self._embed(img))
        if self.mlp_head is None:
            return x
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))
