"""Counted matmul FLOPs of one MAE training step (forward + backward), for MFU.

Only matrix multiplies are counted (Linear layers, the patch embedding, attention's QK^T and AV),
2 FLOPs per multiply-add, as torch.utils.flop_counter does. Norms, GELU, softmax, the loss and the
optimizer are left out (they are memory-bound and small next to the matmuls).

What a step does (the useful work of MAE, whatever an implementation wastes):
  - patch embedding on the VISIBLE patches only (K = len_keep of L),
  - encoder blocks on the visible tokens (+ the cls token in the official model),
  - encoder -> decoder projection, decoder blocks on ALL tokens (+ cls in the official model),
  - prediction head: on all L patches by default (the official model's pred), or on the removed
    patches only (pred_rows="removed": mae_fast's return_pred=False and the vit-pytorch API's
    to_pixels).
Backward = 2x forward (input gradient + weight gradient per matmul, dQ/dK/dV/dP for attention),
except where an input needs no gradient: the official patch embedding reads raw pixels, so its
backward is the weight gradient alone (1x). The vit-pytorch API embeds LayerNorm(patches), whose
weights need that input gradient, so its embedding backward is the full 2x.

Attention FLOPs do not depend on the number of heads: QK^T and AV are each 2 * B * N * N * inner.
Recomputation (flash attention's backward, activation checkpointing) is not counted: these are
model FLOPs, the same numerator for every provider of a case, so MFU ratios equal speed ratios.

    from benchmarks.flops import official_step_flops, vit_pytorch_step_flops
    f = official_step_flops(model, batch=256, mask_ratio=0.75)   # f.total, f.forward, f.parts
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["StepFlops", "linear_flops", "attention_flops", "transformer_flops", "mae_step_flops",
           "official_step_flops", "vit_pytorch_step_flops", "model_step_flops"]


@dataclass(frozen=True)
class StepFlops:
    forward: int
    backward: int
    parts: dict = field(default_factory=dict)  # name -> forward FLOPs

    @property
    def total(self) -> int:
        return self.forward + self.backward


def linear_flops(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def attention_flops(batch: int, tokens: int, inner: int) -> int:
    """QK^T and AV for all heads: 2 matmuls of 2 * B * N * N * inner."""
    return 2 * (2 * batch * tokens * tokens * inner)


def transformer_flops(batch: int, tokens: int, dim: int, inner: int, mlp: int, depth: int,
                      out_proj: bool = True) -> int:
    """Forward matmul FLOPs of `depth` pre-norm blocks: qkv, attention, out-projection, 2-layer MLP."""
    rows = batch * tokens
    block = (linear_flops(rows, dim, 3 * inner) + attention_flops(batch, tokens, inner)
             + (linear_flops(rows, inner, dim) if out_proj else 0)
             + linear_flops(rows, dim, mlp) + linear_flops(rows, mlp, dim))
    return depth * block


def _rows(spec, *, all_rows: int, removed: int, visible: int) -> int:
    if isinstance(spec, int) and not isinstance(spec, bool):
        return spec
    table = {"all": all_rows, "removed": removed, "visible": visible}
    if spec not in table:
        raise ValueError(f"rows must be an int or one of {sorted(table)}, got {spec!r}")
    return table[spec]


def mae_step_flops(*, batch: int, num_patches: int, len_keep: int, patch_dim: int,
                   enc_dim: int, enc_inner: int, enc_mlp: int, enc_depth: int,
                   dec_dim: int, dec_inner: int, dec_mlp: int, dec_depth: int,
                   prefix: int = 1, bridge: bool = True, enc_out_proj: bool = True, dec_out_proj: bool = True,
                   embed_rows="visible", pred_rows="all", embed_input_grad: bool = False) -> StepFlops:
    """The general count. prefix: cls tokens in front of both sequences (1 official, 0 vit-pytorch).
    embed_rows / pred_rows: "visible", "removed", "all" (per sample) or an int per sample."""
    B, L, K = batch, num_patches, len_keep
    M = L - K
    n_embed = _rows(embed_rows, all_rows=L, removed=M, visible=K)
    n_pred = _rows(pred_rows, all_rows=L, removed=M, visible=K)
    parts = {
        "patch_embed": linear_flops(B * n_embed, patch_dim, enc_dim),
        "encoder": transformer_flops(B, K + prefix, enc_dim, enc_inner, enc_mlp, enc_depth, enc_out_proj),
        "enc_to_dec": linear_flops(B * (K + prefix), enc_dim, dec_dim) if bridge else 0,
        "decoder": transformer_flops(B, L + prefix, dec_dim, dec_inner, dec_mlp, dec_depth, dec_out_proj),
        "pred": linear_flops(B * n_pred, dec_dim, patch_dim),
    }
    forward = sum(parts.values())
    embed_bwd = parts["patch_embed"] * (2 if embed_input_grad else 1)
    backward = 2 * (forward - parts["patch_embed"]) + embed_bwd
    return StepFlops(forward, backward, parts)


def official_step_flops(model, batch: int, mask_ratio: float = 0.75, *, pred_rows="all",
                        embed_rows="visible") -> StepFlops:
    """For a model with the official layout (mae_fast.MaskedAutoencoderViT, reference.MaskedAutoencoderViT)."""
    L = model.pos_embed.shape[1] - 1
    K = int(L * (1 - mask_ratio))
    w = model.patch_embed.proj.weight  # (D, C, p, p)
    D, patch_dim = w.shape[0], w[0].numel()
    enc, dec = list(model.blocks), list(model.decoder_blocks)
    Dd = model.decoder_embed.out_features
    return mae_step_flops(
        batch=batch, num_patches=L, len_keep=K, patch_dim=patch_dim,
        enc_dim=D, enc_inner=D, enc_mlp=enc[0].mlp.fc1.out_features if enc else 0, enc_depth=len(enc),
        dec_dim=Dd, dec_inner=Dd, dec_mlp=dec[0].mlp.fc1.out_features if dec else 0, dec_depth=len(dec),
        prefix=1, bridge=True, embed_rows=embed_rows, pred_rows=pred_rows, embed_input_grad=False)


def _vit_pytorch_transformer(t):
    layers = list(t.layers)
    if not layers:
        return 0, 0, True, 0
    attn, ff = layers[0]
    inner = attn.to_qkv.out_features // 3
    out_proj = type(attn.to_out).__name__ != "Identity"  # heads == 1 and dim_head == dim: no projection
    return inner, ff.net[1].out_features, out_proj, len(layers)


def vit_pytorch_step_flops(model, batch: int, *, embed_rows="visible", pred_rows="removed") -> StepFlops:
    """For a vit-pytorch-API MAE (mae_fast.MAE, reference.MAE, vit_pytorch.MAE): no cls token in the
    sequences, head on the removed patches only; the embedding sees LayerNorm(patches)."""
    enc = model.encoder
    embed = enc.to_patch_embedding[2]  # Patchify, LayerNorm, Linear, LayerNorm
    patch_dim, D = embed.in_features, embed.out_features
    num_pos = enc.pos_embedding.shape[-2]
    L = num_pos - (1 if getattr(enc, "pool", "mean") == "cls" else 0)
    M = int(model.masking_ratio * L)
    Dd = model.decoder_dim
    e_inner, e_mlp, e_proj, e_depth = _vit_pytorch_transformer(enc.transformer)
    d_inner, d_mlp, d_proj, d_depth = _vit_pytorch_transformer(model.decoder)
    return mae_step_flops(
        batch=batch, num_patches=L, len_keep=L - M, patch_dim=patch_dim,
        enc_dim=D, enc_inner=e_inner, enc_mlp=e_mlp, enc_depth=e_depth,
        dec_dim=Dd, dec_inner=d_inner, dec_mlp=d_mlp, dec_depth=d_depth,
        prefix=0, bridge=D != Dd, enc_out_proj=e_proj, dec_out_proj=d_proj,
        embed_rows=embed_rows, pred_rows=pred_rows, embed_input_grad=True)


def model_step_flops(model, batch: int, mask_ratio: float = 0.75, **kw) -> StepFlops:
    """Dispatches on the layout: official (has blocks/decoder_blocks) or vit-pytorch
    (has encoder.transformer)."""
    if hasattr(model, "decoder_blocks"):
        return official_step_flops(model, batch, mask_ratio, **kw)
    return vit_pytorch_step_flops(model, batch, **kw)
