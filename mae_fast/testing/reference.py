"""The eager oracle: plain PyTorch for every fused op and for both model APIs.

Every parity test compares against this file and every benchmark uses it as its baseline, so it
favours being obviously right over being fast. Conventions follow facebookresearch/mae
(models_mae.py) and lucidrains/vit-pytorch (mae.py); see docs/design.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mae_fast.kernels import NORM_PIX_EPS
from mae_fast.ops._common import IMAGENET_MEAN, IMAGENET_STD, pair_arg


# ----------------------------------------------------------------------------- pixels

def normalize_pixels(imgs: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float64) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> (u8 / 255 - mean[c]) / std[c] in dtype: normalise, then compute in
    float, which the in-kernel normalisation of uint8 images must match."""
    if imgs.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels takes uint8 images, got {imgs.dtype}")
    mean = torch.tensor(mean, dtype=torch.float64, device=imgs.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float64, device=imgs.device).view(-1, 1, 1)
    return ((imgs.double() / 255 - mean) / std).to(dtype)


# ----------------------------------------------------------------------------- patches

def patchify(imgs: torch.Tensor, patch_size) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, ph*pw*C); token i*w + j, features in (p, q, c) order."""
    ph, pw = pair_arg(patch_size, "patch_size")
    B, C, H, W = imgs.shape
    h, w = H // ph, W // pw
    x = imgs.reshape(B, C, h, ph, w, pw)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, ph * pw * C)


def unpatchify(x: torch.Tensor, patch_size, image_size) -> torch.Tensor:
    """(B, h*w, ph*pw*C) -> (B, C, H, W), the inverse of patchify."""
    ph, pw = pair_arg(patch_size, "patch_size")
    H, W = pair_arg(image_size, "image_size")
    B, L, P = x.shape
    h, w, C = H // ph, W // pw, P // (ph * pw)
    x = x.reshape(B, h, w, ph, pw, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, C, H, W)


def norm_pix(target: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """Per-patch normalisation of the official norm_pix_loss: unbiased variance, eps inside sqrt."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """out[b, k] = x[b, ids[b, k]]."""
    return torch.gather(x, 1, ids.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify_gather(imgs, ids, patch_size, norm_pix_target: bool = False):
    """Rows ids[b, k] of patchify(imgs)[b], optionally per-patch normalised."""
    rows = gather_tokens(patchify(imgs, patch_size), ids)
    return norm_pix(rows) if norm_pix_target else rows


def masked_mse_loss(pred, imgs, patch_size, *, mask=None, ids=None, norm_pix_target: bool = False):
    """Official loss (mask given): mean per-patch MSE over removed patches.
    vit-pytorch loss (ids given): F.mse_loss over the rows of the removed patches ids."""
    if (mask is None) == (ids is None):
        raise ValueError("pass exactly one of mask or ids")
    target = patchify(imgs, patch_size)
    if norm_pix_target:
        target = norm_pix(target)
    if mask is not None:
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()
    return F.mse_loss(pred, gather_tokens(target, ids))


def unshuffle_tokens(visible, ids_keep, num_patches: int, mask_token, pos=None, num_prefix: int = 0):
    """Decoder input: visible rows back in their slots, mask_token elsewhere, plus pos.

    visible (B, num_prefix + K, D) -> (B, num_prefix + num_patches, D). The first num_prefix
    rows (the cls token) pass through unchanged.
    """
    B, _, D = visible.shape
    prefix, body = visible[:, :num_prefix], visible[:, num_prefix:]
    out = mask_token.reshape(1, 1, D).to(visible.dtype).expand(B, num_patches, D)
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, D)
    out = torch.scatter(out, 1, index, body)
    out = torch.cat([prefix, out], dim=1)
    if pos is not None:
        out = out + pos.reshape(1, num_prefix + num_patches, D)
    return out


# ----------------------------------------------------------------------------- masking

def random_masking(batch: int, num_patches: int, mask_ratio: float, noise=None, device=None):
    """Official masking: keep the first len_keep of argsort(noise).

    Returns ids_keep (B, len_keep), mask (B, L) float with 1 = removed, ids_restore (B, L)."""
    len_keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def vit_pytorch_masking(batch: int, num_patches: int, masking_ratio: float, noise=None, device=None):
    """vit-pytorch masking: the FIRST num_masked of argsort(noise) are masked.

    Returns (masked_indices, unmasked_indices)."""
    num_masked = int(masking_ratio * num_patches)
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    rand_indices = noise.argsort(dim=-1)
    return rand_indices[:, :num_masked], rand_indices[:, num_masked:]


# ----------------------------------------------------------------------------- positions

def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def pos_embed_2d(embed_dim: int, grid_size, cls_token: bool = False) -> torch.Tensor:
    """The official 2-D sin-cos table, built in float64 and returned in float32.

    Row i*w + j (+1 with a cls row of zeros); first half of the channels encodes the column j,
    second half the row i, each half [sin | cos]."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for the 2-D sin-cos table, got {embed_dim}")
    gh, gw = pair_arg(grid_size, "grid_size")
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


# ----------------------------------------------------------------------------- official model

def attention(q, k, v):
    """Explicit softmax attention on (B, heads, N, d)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """timm's pre-norm ViT block, with the same state-dict keys."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class MaskedAutoencoderViT(nn.Module):
    """The official MAE (facebookresearch/mae models_mae.py), eagerly, with explicit attention."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = pair_arg(img_size, "img_size"), patch_size, in_chans
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        L = self.grid[0] * self.grid[1]
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(pos_embed_2d(embed_dim, self.grid, True)[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, norm_layer) for _ in range(depth))
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            pos_embed_2d(decoder_embed_dim, self.grid, True)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer) for _ in range(decoder_depth))
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        assert self.pos_embed.shape[1] == L + 1

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        B, L, D = x.shape
        ids_keep, mask, ids_restore = random_masking(B, L, mask_ratio, noise, device=x.device)
        x = gather_tokens(x, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.repeat(B, L + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = gather_tokens(x_, ids_restore)
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = masked_mse_loss(pred, imgs, self.patch_size, mask=mask, norm_pix_target=self.norm_pix_loss)
        return loss, pred, mask


# ----------------------------------------------------------------------------- vit-pytorch model

class VitPytorchAttention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0)) if project_out else nn.Identity()

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (t.reshape(B, N, self.heads, -1).transpose(1, 2) for t in self.to_qkv(self.norm(x)).chunk(3, -1))
        return self.to_out(attention(q, k, v).transpose(1, 2).reshape(B, N, -1))


class VitPytorchTransformer(nn.Module):
    """vit-pytorch's Transformer (pre-norm, final LayerNorm), same state-dict keys."""

    def __init__(self, dim, depth, heads, dim_head, mlp_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                VitPytorchAttention(dim, heads, dim_head),
                VitPytorchFeedForward(dim, mlp_dim),
            ]) for _ in range(depth))

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class VitPytorchFeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class _Patchify(nn.Module):
    def __init__(self, patch_size):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, imgs):
        return patchify(imgs, self.patch_size)


class ViT(nn.Module):
    """vit-pytorch's ViT, same constructor and state-dict keys (2-D pos_embedding)."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
                 pool="cls", channels=3, dim_head=64, dropout=0.0, emb_dropout=0.0):
        super().__init__()
        (H, W), (ph, pw) = pair_arg(image_size, "image_size"), pair_arg(patch_size, "patch_size")
        num_patches, patch_dim = (H // ph) * (W // pw), channels * ph * pw
        self.image_size, self.patch_size, self.channels = (H, W), (ph, pw), channels
        num_cls = 1 if pool == "cls" else 0
        self.to_patch_embedding = nn.Sequential(
            _Patchify((ph, pw)), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.cls_token = nn.Parameter(torch.randn(num_cls, dim))
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + num_cls, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = VitPytorchTransformer(dim, depth, heads, dim_head, mlp_dim)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes) if num_classes > 0 else None


class MAE(nn.Module):
    """The vit-pytorch MAE (mae.py) with its defects fixed: pool='cls' takes pos rows 1..L of
    the 2-D pos_embedding, and decoder tokens follow the activation dtype."""

    def __init__(self, *, encoder, decoder_dim, masking_ratio=0.75, decoder_depth=1, decoder_heads=8,
                 decoder_dim_head=64, norm_pix_loss=False):
        super().__init__()
        self.masking_ratio, self.norm_pix_loss = masking_ratio, norm_pix_loss
        self.encoder = encoder
        # shares the encoder's modules; kept so the state-dict keys match vit-pytorch's MAE
        self.patch_to_emb = nn.Sequential(*encoder.to_patch_embedding[1:])
        num_pos, encoder_dim = encoder.pos_embedding.shape[-2:]
        patch_dim = encoder.to_patch_embedding[2].weight.shape[-1]
        self.decoder_dim = decoder_dim
        self.enc_to_dec = nn.Linear(encoder_dim, decoder_dim) if encoder_dim != decoder_dim else nn.Identity()
        self.mask_token = nn.Parameter(torch.randn(decoder_dim))
        self.decoder = VitPytorchTransformer(decoder_dim, decoder_depth, decoder_heads, decoder_dim_head, decoder_dim * 4)
        self.decoder_pos_emb = nn.Embedding(num_pos, decoder_dim)
        self.to_pixels = nn.Linear(decoder_dim, patch_dim)

    def forward(self, img, noise=None):
        enc = self.encoder
        patch_size = enc.to_patch_embedding[0].patch_size
        patches = patchify(img, patch_size)
        B, L, _ = patches.shape
        tokens = self.patch_to_emb(patches)
        num_cls = enc.pos_embedding.shape[0] - L
        tokens = tokens + enc.pos_embedding[num_cls:num_cls + L].to(tokens.dtype)
        masked, unmasked = vit_pytorch_masking(B, L, self.masking_ratio, noise, device=img.device)
        encoded = enc.transformer(gather_tokens(tokens, unmasked))
        dec = self.enc_to_dec(encoded)
        dec = unshuffle_tokens(dec, unmasked, L, self.mask_token, self.decoder_pos_emb.weight[:L])
        decoded = self.decoder(dec)
        pred = self.to_pixels(gather_tokens(decoded, masked))
        return masked_mse_loss(pred, img, patch_size, ids=masked, norm_pix_target=self.norm_pix_loss)


# ----------------------------------------------------------------------------- pre-norm residual step

def add_layer_norm(x, delta, weight, bias, eps, out_dtype=None):
    """r = x + delta; n = layer_norm(r) over the last dim, cast to out_dtype (default r's dtype)."""
    r = x + delta
    n = F.layer_norm(r, (r.shape[-1],), weight, bias, eps)
    return r, n if out_dtype is None else n.to(out_dtype)


__all__ = [
    "patchify", "unpatchify", "norm_pix", "gather_tokens", "patchify_gather", "masked_mse_loss",
    "unshuffle_tokens", "random_masking", "vit_pytorch_masking", "pos_embed_2d", "attention",
    "MaskedAutoencoderViT", "ViT", "MAE", "add_layer_norm",
]
