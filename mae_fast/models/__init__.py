"""The models: the official API (MaskedAutoencoderViT and its factories), the vit-pytorch API
(ViT, MAE), the transformer blocks they run on, masking, position tables and the CLI's presets."""
from .blocks import attention_backend, fused_add_norm, set_attention_backend, set_fused_add_norm
from .mae import MAE
from .official import MaskedAutoencoderViT, mae_vit_base_patch16, mae_vit_huge_patch14, mae_vit_large_patch16
from .vit import ViT

__all__ = ["MAE", "ViT", "MaskedAutoencoderViT", "mae_vit_base_patch16", "mae_vit_large_patch16",
           "mae_vit_huge_patch14", "set_attention_backend", "attention_backend", "set_fused_add_norm",
           "fused_add_norm"]
