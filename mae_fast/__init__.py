"""mae_fast: fast Masked Autoencoder pretraining on NVIDIA GPUs.

Layers, each importing only from those before it: ops (the fused ops), io (checkpoint files and
Hugging Face / timm key names), models (the two model APIs and the fine-tuning classifier on the
fused ops), train (pretraining, fine-tuning, probing, data, pictures), then the CLI and `info`.
Importing this package never initialises CUDA and never fails for want of the compiled extension or
of Triton; `python -m mae_fast.info` says what is available.
"""
from . import ops
from .io.checkpoint import load_checkpoint, save_checkpoint
from .models import (MAE, MaskedAutoencoderViT, ViT, attention_backend, fused_add_norm, mae_vit_base_patch16,
                     mae_vit_huge_patch14, mae_vit_large_patch16, set_attention_backend, set_fused_add_norm)
from .models.classifier import VisionTransformer, vit_base_patch16, vit_huge_patch14, vit_large_patch16
from .train.lars import LARS
from .train.lr_decay import param_groups_lrd

__version__ = "0.1.0"
__all__ = ["MAE", "ViT", "MaskedAutoencoderViT", "mae_vit_base_patch16", "mae_vit_large_patch16",
           "mae_vit_huge_patch14", "load_checkpoint", "save_checkpoint", "set_attention_backend",
           "set_fused_add_norm", "fused_add_norm", "attention_backend", "ops", "__version__",
           "VisionTransformer", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14", "param_groups_lrd",
           "LARS"]
