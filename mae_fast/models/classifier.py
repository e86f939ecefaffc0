"""mae_fast.VisionTransformer: the classifier that MAE fine-tuning and linear probing train (the
official models_vit.py), on the same blocks as the MAE encoder, with timm's VisionTransformer
state-dict keys: timm and the official code load its weights and it loads theirs.

global_pool "avg" (the official fine-tuning's default): the patch tokens' mean, then fc_norm; the
model has no final `norm`. "token": the final `norm`, then the cls token. Stochastic depth
(drop_path_rate, linear in the block index as timm) drops whole residual branches per sample.
"""
from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

from .. import ops
from ..io.checkpoint import load_checkpoint, read_state_dict
from .blocks import Block, check_images, has_hooks, run_prenorm
from .official import PatchEmbed
from .pos_embed import pos_embed_2d

POOLS = ("avg", "token")
# what a pretraining checkpoint holds that a classifier has no use for: the decoder, and the final
# norm of the encoder where global pooling replaces it with fc_norm
PRETRAINING_ONLY = ("decoder_", "mask_token", "norm.", "fc_norm.", "head.")


def drop_path(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zeroes each sample's x with probability p and scales the kept ones by 1 / (1 - p), so the
    expectation is x (stochastic depth, as timm's drop_path)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep) if keep > 0 else x * mask


def _dropped(f, p: float, h: torch.Tensor) -> torch.Tensor:
    return drop_path(f(h), p)


class DropPathBlock(Block):
    """Block whose residual branches are dropped per sample with probability `drop_path` while
    training. A float, not a module: the state-dict keys stay Block's (timm's)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, norm_layer=nn.LayerNorm, drop_path: float = 0.0):
        super().__init__(dim, num_heads, mlp_ratio, norm_layer)
        self.drop_path = float(drop_path)

    def sublayers(self):
        pairs = super().sublayers()
        if not (self.training and self.drop_path > 0):
            return pairs
        return tuple((norm, partial(_dropped, f, self.drop_path)) for norm, f in pairs)

    def forward(self, x):
        return run_prenorm(x, self.sublayers())


def _pool_name(global_pool) -> str:
    if isinstance(global_pool, bool):  # the official models_vit.py passes a bool
        return "avg" if global_pool else "token"
    if global_pool not in POOLS:
        raise ValueError(f"global_pool must be 'avg', 'token' or a bool, got {global_pool!r}")
    return global_pool


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="avg", embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, norm_layer=None):
        super().__init__()
        size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        if len(size) != 2 or size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"img_size {img_size!r} must be divisible by patch_size {patch_size}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        if not qkv_bias:
            raise ValueError("qkv_bias must be True (the MAE encoder's attention has a qkv bias)")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be a multiple of 4 for the 2-D sin-cos table, got {embed_dim}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.global_pool = _pool_name(global_pool)
        self.img_size, self.patch_size, self.in_chans = size, int(patch_size), in_chans
        self.grid = (size[0] // patch_size, size[1] // patch_size)
        self.num_classes, self.embed_dim = num_classes, embed_dim

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.blocks = nn.ModuleList(DropPathBlock(embed_dim, num_heads, mlp_ratio, norm_layer, r) for r in rates)
        if self.global_pool == "avg":
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self):
        """The MAE encoder's init (a random-init baseline starts where pretraining starts): the
        sin-cos table, xavier-uniform Linear and flattened patch conv, N(0, 0.02) cls token; the
        head as the official fine-tuning, trunc-normal std 2e-5."""
        with torch.no_grad():
            self.pos_embed.copy_(pos_embed_2d(self.embed_dim, self.grid, cls_token=True)[None])
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.init_head()

    def init_head(self, std: float = 2e-5):
        """trunc_normal_(head.weight, std) and a zero bias: the official fine-tuning uses 2e-5, the
        linear probe 0.01."""
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self):
        """timm's names exempt from weight decay (the official fine-tuning passes them on)."""
        return {"pos_embed", "cls_token", "dist_token"}

    def check_input(self, imgs) -> None:
        (H, W), C = self.img_size, self.in_chans
        check_images(imgs, "imgs", C, lambda h, w: (h, w) == (H, W),
                     f"(batch, {C}, {H}, {W}) for this model (img_size={self.img_size}, in_chans={C})")

    def _run_blocks(self, x, final_norm=None):
        # one residual stream across the blocks (add + norm fusable at block boundaries), unless
        # a block is wrapped or hooked: then each is called as a module
        if all(type(b) is DropPathBlock and not has_hooks(b) and "forward" not in vars(b) for b in self.blocks):
            return run_prenorm(x, (pair for b in self.blocks for pair in b.sublayers()), final_norm)
        for b in self.blocks:
            x = b(x)
        return x if final_norm is None else final_norm(x)

    def forward_features(self, imgs):
        """The pooled features (B, embed_dim) that the head reads."""
        self.check_input(imgs)
        x = self.patch_embed(ops.patchify(imgs, self.patch_size)) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        if self.global_pool == "avg":
            return self.fc_norm(self._run_blocks(x)[:, 1:].mean(dim=1))
        return self._run_blocks(x, self.norm)[:, 0]

    def forward(self, imgs):
        return self.head(self.forward_features(imgs))

    def expected_missing(self) -> set[str]:
        """The keys a pretraining checkpoint lacks, as the official fine-tuning asserts them."""
        keys = {"head.weight", "head.bias"} if isinstance(self.head, nn.Linear) else set()
        return keys | ({"fc_norm.weight", "fc_norm.bias"} if self.global_pool == "avg" else set())

    def load_pretrained(self, path_or_state, head_init_std: float = 2e-5):
        """Loads an MAE encoder (a pretraining checkpoint of mae_fast or the official code, a timm
        or Hugging Face ViTMAE state dict) for fine-tuning: the position table is interpolated to
        this model's grid (bicubic, cls row kept), a head of another class count is dropped, and
        the head is re-initialised (trunc-normal, head_init_std) when the checkpoint has none.
        Returns the LoadReport; its `missing` is exactly expected_missing() for a pretraining
        checkpoint. ValueError, before any weight changes, for a checkpoint of another
        architecture (encoder keys missing or extra, or of other shapes)."""
        sd = dict(read_state_dict(path_or_state))
        own = self.state_dict()
        for k in ("head.weight", "head.bias"):
            if k in sd and (k not in own or sd[k].shape != own[k].shape):
                del sd[k]  # another task's head, as the official fine-tuning drops it
        with warnings.catch_warnings():  # the missing head is expected: the report says it
            warnings.simplefilter("ignore")
            report = load_checkpoint(_ShapeOnly(self), sd, strict=False)  # checks first: nothing loads on error
        extra_missing = set(report.missing) - self.expected_missing()
        extra = [k for k in report.unexpected if not k.startswith(PRETRAINING_ONLY)]
        if extra_missing or extra:
            raise ValueError(f"the checkpoint does not fit this {len(self.blocks)}-block, {self.embed_dim}-wide "
                             f"patch-{self.patch_size} ViT: missing {sorted(extra_missing)[:6]}, "
                             f"unexpected {extra[:6]}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = load_checkpoint(self, sd, strict=False)
        if "head.weight" in report.missing:
            self.init_head(head_init_std)
        return report


class _ShapeOnly(nn.Module):
    """A stand-in with the model's state-dict shapes and grid, to check a checkpoint against them
    without touching the model's weights."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.grid, self._shapes = model.grid, {k: v.shape for k, v in model.state_dict().items()}

    def state_dict(self, *args, **kwargs):
        return {k: torch.empty(s, device="meta") for k, s in self._shapes.items()}

    def load_state_dict(self, sd, strict=True, assign=False):
        return None


def _factory(patch_size, embed_dim, depth, num_heads, default_size=224):
    def make(**kwargs):
        cfg = dict(img_size=default_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                   num_heads=num_heads, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        cfg.update(kwargs)
        return VisionTransformer(**cfg)

    make.__doc__ = f"VisionTransformer, patch {patch_size}, width {embed_dim}, {depth} blocks, {num_heads} heads."
    return make


vit_base_patch16 = _factory(16, 768, 12, 12)
vit_large_patch16 = _factory(16, 1024, 24, 16)
vit_huge_patch14 = _factory(14, 1280, 32, 16)
vit_tiny_patch4 = _factory(4, 96, 4, 3, default_size=32)  # the encoder of the `tiny` MAE preset (CPU demos)
