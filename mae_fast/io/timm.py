"""Encoder state dicts for other libraries: timm's VisionTransformer and transformers' ViTMAEModel."""
from __future__ import annotations

import torch

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def encoder_state_dict(model, to: str) -> dict[str, torch.Tensor]:
    """to='timm': the official encoder keys, which timm's VisionTransformer(num_classes=0) loads
    as they are. to='hf': transformers' ViTMAEModel keys (the `vit.` part of ViTMAEForPreTraining)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    if to == "timm":
        return sd
    if to == "hf":
        from .hf_keys import hf_state_dict_from_official

        return {k[len("vit."):]: v for k, v in hf_state_dict_from_official(sd).items() if k.startswith("vit.")}
    raise ValueError(f"to must be 'timm' or 'hf', got {to!r}")
