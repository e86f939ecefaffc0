"""mae_fast.MaskedAutoencoderViT: the official MAE (facebookresearch/mae models_mae.py) on the
fused ops, with the same constructor, state-dict keys, init and forward -> (loss, pred, mask).

The hot path embeds only the visible patches (gathered straight from the image), assembles the
decoder input in one scatter, and computes the loss with targets made on the fly.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..io import hf
from ..ops._common import pair_arg
from .blocks import Block, check_images, run_blocks
from .masking import random_masking
from .pos_embed import pos_embed_2d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(*, img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim,
                 decoder_depth, decoder_num_heads, norm_pix_loss) -> None:
    """Constructor arguments of MaskedAutoencoderViT; errors name the argument and what it must be."""
    if not _is_int(patch_size) or patch_size < 1:
        raise (ValueError if _is_int(patch_size) else TypeError)(
            f"patch_size must be a positive int (square patches, as the official model), got {patch_size!r}")
    size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if len(size) != 2 or not all(_is_int(v) for v in size):
        raise TypeError(f"img_size must be an int or a pair of ints (H, W), got {img_size!r}")
    if min(size) < 1 or size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"img_size {size} must be positive and divisible by patch_size {patch_size}")
    for name, value, low in (("in_chans", in_chans, 1), ("embed_dim", embed_dim, 1), ("depth", depth, 0),
                             ("num_heads", num_heads, 1), ("decoder_embed_dim", decoder_embed_dim, 1),
                             ("decoder_depth", decoder_depth, 0), ("decoder_num_heads", decoder_num_heads, 1)):
        if not _is_int(value) or value < low:
            raise (ValueError if _is_int(value) else TypeError)(f"{name} must be an int >= {low}, got {value!r}")
    for dim_name, dim, heads_name, heads in (("embed_dim", embed_dim, "num_heads", num_heads),
                                             ("decoder_embed_dim", decoder_embed_dim, "decoder_num_heads",
                                              decoder_num_heads)):
        if dim % heads:
            raise ValueError(f"{dim_name} ({dim}) must be divisible by {heads_name} ({heads})")
        if dim % 4:
            raise ValueError(f"{dim_name} must be a multiple of 4 for the 2-D sin-cos table, got {dim}")
    if norm_pix_loss and patch_size * patch_size * in_chans < 2:
        raise ValueError("norm_pix_loss needs at least 2 values per patch (patch_size**2 * in_chans >= 2) "
                         "for the unbiased per-patch variance; got patch_size=1, in_chans=1")


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: its keys (proj = Conv2d) and attributes, and images (B, C, H, W) in,
    tokens (B, L, D) out. The model itself calls it on gathered patches (B, K, p*p*C) in (p, q, c)
    order, as a linear map: only the visible patches are ever embedded."""

    def __init__(self, patch_size, in_chans, embed_dim, img_size=(224, 224)):
        super().__init__()
        self.img_size, self.patch_size = tuple(img_size), (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def linear_weight(self) -> torch.Tensor:
        """The conv weight flattened in the (p, q, c) order of our patches (the conv's is c, p, q)."""
        w = self.proj.weight
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)

    def forward(self, x):
        if x.dim() == 4:  # images, as timm's
            return self.proj(x).flatten(2).transpose(1, 2)
        return F.linear(x, self.linear_weight(), self.proj.bias)


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        check_config(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                     depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                     decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss)
        self.img_size, self.patch_size, self.in_chans = pair_arg(img_size, "img_size"), int(patch_size), in_chans
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.norm_pix_loss = norm_pix_loss
        self.default_mask_ratio = 0.75

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, self.img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, norm_layer) for _ in range(depth))
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer) for _ in range(decoder_depth))
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        """The official init: frozen sin-cos tables, xavier-uniform on Linear and the flattened
        patch conv, N(0, 0.02) cls and mask tokens, LayerNorm (1, 0)."""
        with torch.no_grad():
            self.pos_embed.copy_(pos_embed_2d(self.pos_embed.shape[-1], self.grid, cls_token=True)[None])
            self.decoder_pos_embed.copy_(
                pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid, cls_token=True)[None])
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ checks

    def check_input(self, imgs) -> None:
        (H, W), C = self.img_size, self.in_chans
        check_images(imgs, "imgs", C, lambda h, w: (h, w) == (H, W),
                     f"(batch, {C}, {H}, {W}) for this model (img_size={self.img_size}, in_chans={C})")

    # ------------------------------------------------------------------ fast path

    def _encode(self, imgs, mask_ratio, noise, allow_zero=False):
        m = random_masking(imgs.shape[0], self.num_patches, mask_ratio, noise, device=imgs.device,
                           allow_zero=allow_zero)
        return self._encode_patches(imgs, m.ids_keep), m

    def _overrides(self, *names) -> bool:
        """Whether a subclass replaced one of these official methods (the forward then composes them)."""
        return any(getattr(type(self), n) is not getattr(MaskedAutoencoderViT, n) for n in names)

    def _encode_patches(self, imgs, ids):
        """Encoder output (B, 1 + K, D) for patches ids (B, K): only those are ever embedded."""
        x = self.patch_embed(ops.patchify_gather(imgs, ids, self.patch_size))
        x = x + self.pos_embed[0, 1:][ids]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        return run_blocks(self.blocks, x, self.norm)

    def forward_features(self, imgs):
        """Encoder tokens of the whole image, unmasked: (B, 1 + L, D), as a fine-tuned ViT sees it."""
        self.check_input(imgs)
        ids = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        return self._encode_patches(imgs, ids)

    def _decode(self, latent, ids_keep):
        """Decoder blocks' output (B, 1 + L, Dd), before decoder_norm."""
        x = self.decoder_embed(latent)
        # the official decoder adds the (fp32) position table, which promotes under autocast
        x = x.to(torch.promote_types(x.dtype, self.decoder_pos_embed.dtype))
        x = ops.unshuffle_tokens(x, ids_keep, self.num_patches, self.mask_token, self.decoder_pos_embed,
                                 num_prefix=1)
        return run_blocks(self.decoder_blocks, x)

    def forward(self, imgs, mask_ratio=None, noise=None, *, return_pred: bool = True):
        """Returns (loss, pred, mask) as the official model; mask_ratio defaults to 0.75 (or the
        Hugging Face config's). With return_pred=False, pred is None and the prediction head runs
        on the removed patches only: the same loss for less work."""
        self.check_input(imgs)
        mask_ratio = self.default_mask_ratio if mask_ratio is None else mask_ratio
        if self._overrides("forward_encoder", "forward_decoder", "forward_loss", "random_masking", "patchify"):
            # a subclass's methods, composed as the official forward does (no fast path)
            latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, *(() if noise is None else (noise,)))
            pred = self.forward_decoder(latent, ids_restore)
            return self.forward_loss(imgs, pred, mask), pred, mask
        latent, m = self._encode(imgs, mask_ratio, noise)
        x = self._decode(latent, m.ids_keep)
        if return_pred:
            pred = self.decoder_pred(self.decoder_norm(x[:, 1:]))
            loss = ops.masked_mse_loss(pred, imgs, self.patch_size, mask=m.mask, norm_pix=self.norm_pix_loss)
            return loss, pred, m.mask
        # every sample removes the same count, so the mean over removed rows is the official loss
        rows = ops.gather_tokens(x, m.ids_removed + 1)
        pred_removed = self.decoder_pred(self.decoder_norm(rows))
        loss = ops.masked_mse_loss(pred_removed, imgs, self.patch_size, ids=m.ids_removed, norm_pix=self.norm_pix_loss)
        return loss, None, m.mask

    # ------------------------------------------------------------------ official methods, for drop-in use

    def patchify(self, imgs):
        return ops.patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        return ops.unpatchify(x, self.patch_size, self.img_size)

    def random_masking(self, x, mask_ratio, noise=None):
        m = random_masking(x.shape[0], x.shape[1], mask_ratio, noise, device=x.device, allow_zero=True)
        return ops.gather_tokens(x, m.ids_keep), m.mask, m.ids_restore

    def forward_encoder(self, x, mask_ratio, noise=None):
        """mask_ratio 0 runs the encoder on every patch (as the official code: features)."""
        self.check_input(x)
        if self._overrides("random_masking", "patchify"):  # a subclass's: the official composition
            t = self.patch_embed(self.patchify(x)) + self.pos_embed[:, 1:]
            t, mask, ids_restore = self.random_masking(t, mask_ratio, *(() if noise is None else (noise,)))
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
            return run_blocks(self.blocks, torch.cat([cls.to(t.dtype), t], dim=1), self.norm), mask, ids_restore
        latent, m = self._encode(x, mask_ratio, noise, allow_zero=True)
        return latent, m.mask, m.ids_restore

    def forward_decoder(self, x, ids_restore):
        ids_keep = torch.argsort(ids_restore, dim=1)[:, : x.shape[1] - 1]
        x = self._decode(x, ids_keep)
        return self.decoder_pred(self.decoder_norm(x[:, 1:]))

    def forward_loss(self, imgs, pred, mask):
        if not (mask.is_floating_point() or mask.dtype == torch.bool):
            mask = mask.float()  # the official arithmetic takes any dtype
        if self._overrides("patchify"):  # a subclass's patch layout: the official eager loss
            target = self.patchify(imgs)
            if self.norm_pix_loss:
                mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1.0e-6) ** 0.5
            return (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
        return ops.masked_mse_loss(pred, imgs, self.patch_size, mask=mask, norm_pix=self.norm_pix_loss)

    # ------------------------------------------------------------------ Hugging Face

    @classmethod
    def from_hf(cls, model_or_path):
        """Builds the equivalent model from a transformers ViTMAEForPreTraining (or a local
        save_pretrained directory); the config's mask_ratio becomes default_mask_ratio."""
        return hf.from_hf(cls, model_or_path)

    def to_hf(self, mask_ratio=None):
        """A transformers ViTMAEForPreTraining with these weights (needs transformers)."""
        return hf.to_hf(self, mask_ratio=mask_ratio)


def _factory(embed_dim, depth, num_heads, patch_size):
    def make(**kwargs):
        cfg = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                   decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4,
                   norm_layer=partial(nn.LayerNorm, eps=1e-6))
        cfg.update(kwargs)
        return MaskedAutoencoderViT(**cfg)

    return make


mae_vit_base_patch16 = _factory(768, 12, 12, 16)
mae_vit_large_patch16 = _factory(1024, 24, 16, 16)
mae_vit_huge_patch14 = _factory(1280, 32, 16, 14)
# the official file's names of the same models
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14
