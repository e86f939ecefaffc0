"""Multi-head self-attention read straight from a fused qkv projection.

    attention(qkv, num_heads) -> (B, N, num_heads * d)

is F.scaled_dot_product_attention of the heads of qkv (B, N, 3 * num_heads * d) (scale d ** -0.5,
no mask, no dropout) with the heads merged back: what timm's Attention computes between its qkv and
proj Linears. The kernels read q, k, v where the qkv Linear wrote them and write the output and the
qkv gradient in the Linears' layouts, so neither direction copies for the head split or merge.

Ops (torch.library custom ops with fake implementations):
  mae_fast::attention(qkv, heads) -> (out, lse)           with autograd (qkv)
  mae_fast::attention_backward(grad_out, qkv, out, lse, heads) -> grad_qkv
lse (B * heads, N) fp32 (fp64 on the float64 path) is the rows' log2-sum-exp of the scaled scores,
saved for the backward; eager calls whose kernels run skip torch.library's dispatch
(_common.run_eagerly). Dispatch as every Triton op (mae_fast/ops/_common.py): Triton on CUDA, Triton
interpreted on CPU with TRITON_INTERPRET on, a PyTorch fallback otherwise, always for float64 and
head dims above kernels.attention.MAX_HEAD_DIM, and on CPU for bfloat16.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import (backward_op, check_float, compute_dtype, eager_function, eager_impl, int_arg,
                      refuse_double_backward, run_eagerly, triton_kernels)


def kernels_for(qkv: Tensor, heads: int):
    """The kernel module that runs attention(qkv, heads), or None where the fallback does (the blocks'
    "triton" backend falls back to SDPA there instead)."""
    k = triton_kernels("attention", qkv)
    return k if k is not None and qkv.shape[-1] // (3 * heads) <= k.MAX_HEAD_DIM else None


def _heads(t: Tensor, heads: int, parts: int):
    """(B, N, parts * heads * d) -> (parts, B, heads, N, d) view."""
    B, N, width = t.shape
    return t.view(B, N, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4)


def _rowwise(t: Tensor) -> Tensor:
    """t with a unit last stride (the kernels' only layout requirement)."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- PyTorch fallback

def attention_torch(qkv: Tensor, heads: int):
    """Fallback forward in fp32 (fp64 for float64): (out (B, N, heads * d) in qkv's dtype, lse)."""
    cd = compute_dtype(qkv.dtype)
    q, k, v = _heads(qkv.to(cd), heads, 3)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ v
    B, N, width = qkv.shape
    out = out.transpose(1, 2).reshape(B, N, width // 3).to(qkv.dtype)
    return out, (lse * math.log2(math.e)).reshape(B * heads, N)


def attention_backward_torch(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int) -> Tensor:
    """Fallback backward: p recomputed from lse, then the FlashAttention gradient formulas."""
    cd = lse.dtype
    q, k, v = _heads(qkv.to(cd), heads, 3)
    B, H, N, d = q.shape
    do, o = (_heads(t.to(cd), heads, 1)[0] for t in (grad_out, out))
    scale = d ** -0.5
    p = torch.exp2((q @ k.transpose(-1, -2)) * (scale * math.log2(math.e)) - lse.view(B, H, N, 1))
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (do @ v.transpose(-1, -2) - delta)
    grad = torch.stack([ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ do])
    return grad.permute(1, 3, 0, 2, 4).reshape(qkv.shape).to(qkv.dtype)


# ----------------------------------------------------------------------------- custom ops

@eager_impl("attention")
def _forward_impl(qkv, heads):
    k = kernels_for(qkv, heads)
    if k is None:
        return attention_torch(qkv, heads)
    return k.attention_fwd(_rowwise(qkv), heads)


@eager_impl("attention_backward")
def _backward_impl(grad_out, qkv, out, lse, heads):
    k = kernels_for(qkv, heads)
    if k is None:
        return attention_backward_torch(grad_out, qkv, out, lse, heads)
    return k.attention_bwd(_rowwise(grad_out), _rowwise(qkv), out, lse, heads)


@torch.library.custom_op("mae_fast::attention", mutates_args=())
def _attention_op(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    return _forward_impl(qkv, heads)


@_attention_op.register_fake
def _(qkv, heads):
    B, N, width = qkv.shape
    return (qkv.new_empty(B, N, width // 3),
            qkv.new_empty(B * heads, N, dtype=compute_dtype(qkv.dtype)))


@torch.library.custom_op("mae_fast::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int) -> Tensor:
    return _backward_impl(grad_out, qkv, out, lse, heads)


@_attention_backward_op.register_fake
def _(grad_out, qkv, out, lse, heads):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    qkv, ctx.heads = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zeros are made for lse's (unused) gradient
    ctx.save_for_backward(qkv, out, lse)


def _backward(ctx, grad_out, _grad_lse):
    if grad_out is None:  # no gradient reached out (grads are not materialised as zeros)
        return None, None
    qkv, out, lse = ctx.saved_tensors
    return backward_op(ctx, "attention_backward")(grad_out, qkv, out, lse, ctx.heads), None


_attention_op.register_autograd(_backward, setup_context=_setup)
refuse_double_backward("attention_backward", "mae_fast.ops.attention")


_AttentionEager = eager_function("attention", _setup, _backward)


# ----------------------------------------------------------------------------- public API

def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for every head of a fused qkv projection, heads merged back.

    qkv: (B, N, 3 * num_heads * d), float32/float16/bfloat16/float64, the output of timm's qkv
    Linear (columns q | k | v, each head-major). Returns (B, N, num_heads * d) in qkv's dtype, equal
    to F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1). Differentiable in
    qkv; the gradient is deterministic (no atomics). Softmax statistics and accumulation are fp32,
    the probabilities are rounded to qkv's dtype before the value product, as in FlashAttention.
    A gradient of the gradient (double backward) is not supported: NotImplementedError.
    """
    check_float(qkv, "qkv")
    heads = int_arg(num_heads, "num_heads")
    if heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {heads}")
    if qkv.dim() != 3 or qkv.shape[-1] == 0 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"qkv must have shape (B, N, 3 * num_heads * d) with d >= 1 (num_heads = {heads}), "
                         f"got {tuple(qkv.shape)}")
    if run_eagerly() and kernels_for(qkv, heads) is not None:
        return _AttentionEager.apply(qkv, heads)[0]
    return torch.ops.mae_fast.attention(qkv, heads)[0]


__all__ = ["attention"]
