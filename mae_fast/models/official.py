"""mae_fast.MaskedAutoencoderViT: the official MAE (facebookresearch/mae models_mae.py) on the
fused ops, with the same constructor, state-dict keys, init and forward -> (loss, pred, mask).

The hot path embeds only the visible patches (gathered straight from the image), assembles the
decoder input in one scatter, and computes the loss with targets made on the fly.
interpolate_pos_encoding=True takes images of another patch-divisible size (tables resized per call);
forward_intermediates / get_attention_maps (features.py) give features and attention maps;
set_grad_checkpointing(True) checkpoints the blocks' activations. uint8 images are normalised inside
the fused ops with the model's pixel statistics (pixels.py; pixel_mean / pixel_std, set_pixel_stats).
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
from .config import check_config
from .features import EncoderFeatures, FeatureStack, grad_checkpointing_arg
from .masking import random_masking
from .pixels import PixelStats
from .pos_embed import check_interpolation, pos_embed_2d, resize_pos_table


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


class MaskedAutoencoderViT(EncoderFeatures, PixelStats, nn.Module):
    """The official model. imgs: float (B, C, H, W), normalised, or uint8 pixels, which the model
    normalises inside its fused ops with pixel_mean / pixel_std (C floats each, of u8 / 255; default
    ImageNet's for 3 channels; set_pixel_stats changes them; not in the state dict)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False, *, pixel_mean=None, pixel_std=None):
        super().__init__()
        check_config(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                     depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                     decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss)
        self.img_size, self.patch_size, self.in_chans = pair_arg(img_size, "img_size"), int(patch_size), in_chans
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.norm_pix_loss = norm_pix_loss
        self.default_mask_ratio = 0.75
        self.grad_checkpointing = False
        self._init_pixel_stats(pixel_mean, pixel_std, in_chans)

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
                     f"(batch, {C}, {H}, {W}) for this model (img_size={self.img_size}, in_chans={C})", uint8=True)

    def _pos_tables(self, imgs, interpolate_pos_encoding):
        """Checks imgs; the (encoder, decoder) position tables of their patch grid: the model's own,
        or with interpolate_pos_encoding (any patch-divisible size) the tables resized to the grid as
        Hugging Face ViTMAE's encoder does (bicubic on the 2-D grid); "hf" resizes the decoder's as
        Hugging Face ViTMAE's decoder does (bicubic along the flattened sequence), for parity."""
        check_interpolation(interpolate_pos_encoding)
        if not interpolate_pos_encoding:
            self.check_input(imgs)
            return self.pos_embed, self.decoder_pos_embed
        p, C = self.patch_size, self.in_chans
        check_images(imgs, "imgs", C, lambda h, w: h >= p and w >= p and not h % p and not w % p,
                     f"(batch, {C}, H, W) with H and W positive multiples of patch_size={p}", uint8=True)
        grid = (imgs.shape[2] // p, imgs.shape[3] // p)
        return (resize_pos_table(self.pos_embed, self.grid, grid),
                resize_pos_table(self.decoder_pos_embed, self.grid, grid, flattened=interpolate_pos_encoding == "hf"))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the encoder and decoder blocks (timm's name): each block keeps
        only its input for backward and recomputes its activations there; the same gradients."""
        self.grad_checkpointing = grad_checkpointing_arg(enable)

    def _feature_stack(self, imgs, interpolate_pos_encoding) -> FeatureStack:
        pos = self._pos_tables(imgs, interpolate_pos_encoding)[0]
        ids = torch.arange(pos.shape[1] - 1, device=imgs.device).expand(imgs.shape[0], -1)
        grid = (imgs.shape[2] // self.patch_size, imgs.shape[3] // self.patch_size)
        return FeatureStack(self._embed(imgs, ids, pos), self.blocks,
                            lambda i, x: self.blocks[i].attn.attention_map(self.blocks[i].norm1(x)),
                            self.norm, 1, grid, self.grad_checkpointing)

    # ------------------------------------------------------------------ fast path

    def _encode(self, imgs, mask_ratio, noise, pos, allow_zero=False):
        m = random_masking(imgs.shape[0], pos.shape[1] - 1, mask_ratio, noise, device=imgs.device,
                           allow_zero=allow_zero)
        return self._encode_patches(imgs, m.ids_keep, pos), m

    def _overrides(self, *names) -> bool:
        """Whether a subclass replaced one of these official methods (the forward then composes them)."""
        return any(getattr(type(self), n) is not getattr(MaskedAutoencoderViT, n) for n in names)

    def _embed(self, imgs, ids, pos):
        """The encoder's input (B, 1 + K, D) for patches ids (B, K): only those are ever embedded
        (uint8 images normalised as they are gathered)."""
        mean, std = self._pixel_stats(imgs)
        x = self.patch_embed(ops.patchify_gather(imgs, ids, self.patch_size, mean=mean, std=std))
        x = x + pos[0, 1:][ids]
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls.to(x.dtype), x], dim=1)

    def _encode_patches(self, imgs, ids, pos):
        return run_blocks(self.blocks, self._embed(imgs, ids, pos), self.norm, checkpoint=self.grad_checkpointing)

    def forward_features(self, imgs, *, interpolate_pos_encoding=False):
        """Encoder tokens of the whole image, unmasked: (B, 1 + L, D), as a fine-tuned ViT sees it."""
        pos = self._pos_tables(imgs, interpolate_pos_encoding)[0]
        ids = torch.arange(pos.shape[1] - 1, device=imgs.device).expand(imgs.shape[0], -1)
        return self._encode_patches(imgs, ids, pos)

    def _decode(self, latent, ids_keep, pos):
        """Decoder blocks' output (B, 1 + L, Dd), before decoder_norm; pos: the decoder's table."""
        x = self.decoder_embed(latent)
        # the official decoder adds the (fp32) position table, which promotes under autocast
        x = x.to(torch.promote_types(x.dtype, pos.dtype))
        x = ops.unshuffle_tokens(x, ids_keep, pos.shape[1] - 1, self.mask_token, pos, num_prefix=1)
        return run_blocks(self.decoder_blocks, x, checkpoint=self.grad_checkpointing)

    def forward(self, imgs, mask_ratio=None, noise=None, *, return_pred: bool = True, interpolate_pos_encoding=False):
        """Returns (loss, pred, mask) as the official model; mask_ratio defaults to 0.75 (or the
        Hugging Face config's). With return_pred=False, pred is None and the prediction head runs
        on the removed patches only: the same loss for less work. interpolate_pos_encoding=True
        takes images of any size divisible by the patch size (noise is then (B, h*w) of their grid)."""
        pos, dec_pos = self._pos_tables(imgs, interpolate_pos_encoding)
        mask_ratio = self.default_mask_ratio if mask_ratio is None else mask_ratio
        if self._overrides("forward_encoder", "forward_decoder", "forward_loss", "random_masking", "patchify"):
            # a subclass's methods, composed as the official forward does (no fast path; uint8 images
            # are normalised into a float copy first, which those methods may read in any way)
            imgs = self.normalize_images(imgs)
            kw = dict(interpolate_pos_encoding=interpolate_pos_encoding) if interpolate_pos_encoding else {}
            noise = () if noise is None else (noise,)
            latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, *noise, **kw)
            pred = self.forward_decoder(latent, ids_restore, **kw, **(dict(img_size=imgs.shape[2:]) if kw else {}))
            return self.forward_loss(imgs, pred, mask), pred, mask
        latent, m = self._encode(imgs, mask_ratio, noise, pos)
        x = self._decode(latent, m.ids_keep, dec_pos)
        mean, std = self._pixel_stats(imgs)
        if return_pred:
            pred = self.decoder_pred(self.decoder_norm(x[:, 1:]))
            loss = ops.masked_mse_loss(pred, imgs, self.patch_size, mask=m.mask, norm_pix=self.norm_pix_loss,
                                       mean=mean, std=std)
            return loss, pred, m.mask
        # every sample removes the same count, so the mean over removed rows is the official loss
        rows = ops.gather_tokens(x, m.ids_removed + 1)
        pred_removed = self.decoder_pred(self.decoder_norm(rows))
        loss = ops.masked_mse_loss(pred_removed, imgs, self.patch_size, ids=m.ids_removed, norm_pix=self.norm_pix_loss,
                                   mean=mean, std=std)
        return loss, None, m.mask

    # ------------------------------------------------------------------ official methods, for drop-in use

    def patchify(self, imgs):
        return ops.patchify(imgs, self.patch_size)

    def unpatchify(self, x, img_size=None):
        """img_size: (H, W) of images of another size (interpolate_pos_encoding); default the model's."""
        return ops.unpatchify(x, self.patch_size, self.img_size if img_size is None else tuple(img_size))

    def random_masking(self, x, mask_ratio, noise=None):
        m = random_masking(x.shape[0], x.shape[1], mask_ratio, noise, device=x.device, allow_zero=True)
        return ops.gather_tokens(x, m.ids_keep), m.mask, m.ids_restore

    def forward_encoder(self, x, mask_ratio, noise=None, *, interpolate_pos_encoding=False):
        """mask_ratio 0 runs the encoder on every patch (as the official code: features)."""
        pos = self._pos_tables(x, interpolate_pos_encoding)[0]
        if self._overrides("random_masking", "patchify"):  # a subclass's: the official composition
            t = self.patch_embed(self.patchify(self.normalize_images(x))) + pos[:, 1:]
            t, mask, ids_restore = self.random_masking(t, mask_ratio, *(() if noise is None else (noise,)))
            cls = (self.cls_token + pos[:, :1]).expand(t.shape[0], -1, -1)
            x = torch.cat([cls.to(t.dtype), t], dim=1)
            return run_blocks(self.blocks, x, self.norm, checkpoint=self.grad_checkpointing), mask, ids_restore
        latent, m = self._encode(x, mask_ratio, noise, pos, allow_zero=True)
        return latent, m.mask, m.ids_restore

    def forward_decoder(self, x, ids_restore, *, interpolate_pos_encoding=False, img_size=None):
        """With interpolate_pos_encoding, the decoder table is resized to the grid of img_size (H, W)
        (default: the model's grid if ids_restore has its length, else a square grid)."""
        check_interpolation(interpolate_pos_encoding)
        L, pos = ids_restore.shape[1], self.decoder_pos_embed
        if interpolate_pos_encoding:
            if img_size is not None:
                grid = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
            else:
                grid = self.grid if L == self.num_patches else (round(L ** 0.5),) * 2
            if grid[0] * grid[1] != L:
                raise ValueError(f"img_size {img_size} does not give a grid of ids_restore's {L} patches; "
                                 f"pass img_size=(H, W) of the images")
            pos = resize_pos_table(pos, self.grid, grid, flattened=interpolate_pos_encoding == "hf")
        x = self._decode(x, torch.argsort(ids_restore, dim=1)[:, : x.shape[1] - 1], pos)
        return self.decoder_pred(self.decoder_norm(x[:, 1:]))

    def forward_loss(self, imgs, pred, mask):
        if not (mask.is_floating_point() or mask.dtype == torch.bool):
            mask = mask.float()  # the official arithmetic takes any dtype
        if self._overrides("patchify"):  # a subclass's patch layout: the official eager loss
            target = self.patchify(self.normalize_images(imgs))
            if self.norm_pix_loss:
                mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1.0e-6) ** 0.5
            return (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
        mean, std = self._pixel_stats(imgs)
        return ops.masked_mse_loss(pred, imgs, self.patch_size, mask=mask, norm_pix=self.norm_pix_loss,
                                   mean=mean, std=std)

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
