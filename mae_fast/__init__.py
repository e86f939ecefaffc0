"""mae_fast: fast Masked Autoencoder pretraining on NVIDIA GPUs.

Importing this package never initialises CUDA and never fails for want of the compiled
extension or of Triton; `python -m mae_fast.info` says what is available.
"""
from . import _ext, ops, reference
from .checkpoint import load_checkpoint, save_checkpoint
from .layers import attention_backend, fused_add_norm, set_attention_backend, set_fused_add_norm
from .mae import MAE
from .models_mae import MaskedAutoencoderViT, mae_vit_base_patch16, mae_vit_huge_patch14, mae_vit_large_patch16
from .vit import ViT

__version__ = "0.1.0"
__all__ = ["MAE", "ViT", "MaskedAutoencoderViT", "mae_vit_base_patch16", "mae_vit_large_patch16",
           "mae_vit_huge_patch14", "load_checkpoint", "save_checkpoint", "set_attention_backend",
           "set_fused_add_norm", "fused_add_norm",
           "attention_backend", "ops", "reference", "__version__"]
