"""Public fused ops. Each is a torch.library custom op under mae_fast:: with a fake (meta)
implementation and autograd, so it works with torch.compile(fullgraph=True)."""
from .add_layer_norm import add_layer_norm
from .attention import attention
from .masked_mse_loss import masked_mse_loss
from .patchify import patchify, patchify_gather, unpatchify
from .tokens import gather_tokens, unshuffle_tokens

__all__ = ["patchify", "unpatchify", "patchify_gather", "masked_mse_loss", "gather_tokens", "unshuffle_tokens",
           "add_layer_norm", "attention"]
