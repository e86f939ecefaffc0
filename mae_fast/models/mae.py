"""mae_fast.MAE: the vit-pytorch API (lucidrains' MAE) on the fused ops.

Same constructor, forward, masks and state-dict keys as vit_pytorch.MAE; the encoder (a
mae_fast.ViT or a vit_pytorch.ViT) is trained in place. Fixed defects of vit-pytorch's code: pool='cls' takes pos
rows 1..L of the 2-D pos_embedding, and the decoder input follows the activation dtype (autocast).
img may be uint8 pixels: the fused ops normalise them with pixel_mean / pixel_std (pixels.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .blocks import check_images
from .features import grad_checkpointing_arg
from .masking import check_noise, check_ratio
from .pixels import PixelStats
from .vit import Transformer, transformer_forward


class MAE(PixelStats, nn.Module):
    """vit-pytorch's MAE. img: float (B, C, H, W), normalised, or uint8 pixels, normalised inside the
    fused ops with pixel_mean / pixel_std (C floats each, of u8 / 255; default ImageNet's for 3
    channels; set_pixel_stats changes them; not in the state dict)."""

    def __init__(self, *, encoder, decoder_dim, masking_ratio=0.75, decoder_depth=1, decoder_heads=8,
                 decoder_dim_head=64, norm_pix_loss=False, pixel_mean=None, pixel_std=None):
        super().__init__()
        check_ratio(masking_ratio, "masking_ratio")
        missing = [a for a in ("patch_size", "to_patch_embedding", "pos_embedding", "transformer", "pool")
                   if not hasattr(encoder, a)]
        if not isinstance(encoder, nn.Module) or missing:
            raise TypeError(f"encoder must be a mae_fast.ViT or a vit_pytorch.ViT, got {type(encoder).__name__}"
                            + (f" (no {', '.join(missing)})" if isinstance(encoder, nn.Module) else ""))
        if not isinstance(decoder_dim, int) or isinstance(decoder_dim, bool) or decoder_dim < 1:
            raise ValueError(f"decoder_dim must be an int >= 1, got {decoder_dim!r}")
        self.masking_ratio, self.norm_pix_loss = masking_ratio, norm_pix_loss
        self.encoder = encoder
        self.patch_size = tuple(encoder.patch_size)
        # shares the encoder's modules, as vit-pytorch's MAE (same state-dict keys; to_patch has none)
        self.to_patch = encoder.to_patch_embedding[0]
        self.patch_to_emb = nn.Sequential(*encoder.to_patch_embedding[1:])
        num_pos, encoder_dim = encoder.pos_embedding.shape[-2:]
        patch_dim = encoder.to_patch_embedding[2].weight.shape[-1]
        self.num_cls = 1 if encoder.pool == "cls" else 0
        self.num_patches = num_pos - self.num_cls
        self.channels = patch_dim // (self.patch_size[0] * self.patch_size[1])
        self._init_pixel_stats(pixel_mean, pixel_std, self.channels)
        self.decoder_dim = decoder_dim
        self.enc_to_dec = nn.Linear(encoder_dim, decoder_dim) if encoder_dim != decoder_dim else nn.Identity()
        self.mask_token = nn.Parameter(torch.randn(decoder_dim))
        self.decoder = Transformer(decoder_dim, decoder_depth, decoder_heads, decoder_dim_head, decoder_dim * 4)
        self.decoder_pos_emb = nn.Embedding(num_pos, decoder_dim)
        self.to_pixels = nn.Linear(decoder_dim, patch_dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the encoder's and the decoder's layers (timm's name)."""
        self.encoder.transformer.grad_checkpointing = self.decoder.grad_checkpointing = grad_checkpointing_arg(enable)

    def check_input(self, img: torch.Tensor) -> None:
        (ph, pw), L, C = self.patch_size, self.num_patches, self.channels
        expected = getattr(self.encoder, "image_size", None)  # vit_pytorch's ViT does not keep it

        def fits(H, W):
            if expected:
                return (H, W) == tuple(expected)
            return H % ph == 0 and W % pw == 0 and (H // ph) * (W // pw) == L

        size = f"{expected[0]}x{expected[1]}" if expected else f"{L} patches of {ph}x{pw}"
        check_images(img, "img", C, fits, f"(batch, {C}, H, W) with {size}", uint8=True)

    def forward(self, img: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(img)
        B, L = img.shape[0], self.num_patches
        num_masked = int(self.masking_ratio * L)
        if not 0 < num_masked < L:
            raise ValueError(f"masking_ratio {self.masking_ratio} masks {num_masked} of {L} patches; "
                             "at least one patch must be masked and one visible")
        if noise is None:
            noise = torch.rand(B, L, device=img.device)
        check_noise(noise, B, L, img.device)
        rand_indices = noise.argsort(dim=-1)
        masked, unmasked = rand_indices[:, :num_masked], rand_indices[:, num_masked:]

        # embed the visible patches only, gathered straight from the image (uint8 pixels normalised there)
        mean, std = self._pixel_stats(img)
        tokens = self.patch_to_emb(ops.patchify_gather(img, unmasked, self.patch_size, mean=mean, std=std))
        tokens = tokens + self.encoder.pos_embedding[self.num_cls:][unmasked].to(tokens.dtype)
        encoded = transformer_forward(self.encoder.transformer, tokens)

        # decoder input in one pass: visible tokens to their slots, mask token elsewhere, + positions
        decoder_tokens = ops.unshuffle_tokens(self.enc_to_dec(encoded), unmasked, L, self.mask_token,
                                              self.decoder_pos_emb.weight[:L])
        decoded = self.decoder(decoder_tokens)
        pred = self.to_pixels(ops.gather_tokens(decoded, masked))
        return ops.masked_mse_loss(pred, img, self.patch_size, ids=masked, norm_pix=self.norm_pix_loss,
                                   mean=mean, std=std)
