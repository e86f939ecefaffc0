"""Named model presets for the CLI: a tiny CPU demo model up to the official ViT-H/14."""
from __future__ import annotations

from functools import partial

from torch import nn

from .official import MaskedAutoencoderViT

_OFFICIAL_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

PRESETS = {
    # name: (default image size, constructor kwargs)
    "tiny": (32, dict(patch_size=4, embed_dim=96, depth=4, num_heads=3,
                      decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2)),
    "small": (64, dict(patch_size=8, embed_dim=384, depth=12, num_heads=6,
                       decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)),
    "base": (224, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_OFFICIAL_DECODER)),
    "large": (224, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_OFFICIAL_DECODER)),
    "huge": (224, dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_OFFICIAL_DECODER)),
}


def build_model(name: str, img_size: int | tuple[int, int] | None = None, in_chans: int = 3,
                norm_pix_loss: bool = True):
    """The preset's MaskedAutoencoderViT; img_size S or (H, W) (default: the preset's), in_chans channels."""
    if name not in PRESETS:
        raise ValueError(f"--model must be one of {', '.join(PRESETS)}, got {name!r}")
    default_size, kwargs = PRESETS[name]
    return MaskedAutoencoderViT(img_size=img_size or default_size, in_chans=in_chans, mlp_ratio=4.0,
                                norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=norm_pix_loss, **kwargs)
