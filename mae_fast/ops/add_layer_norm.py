"""Fused residual add + LayerNorm of a pre-norm transformer block: one memory pass for
`h = x + delta; n = LayerNorm(h)` (and the autocast cast of n before the next Linear).

Ops (torch.library custom ops with fake implementations):
  mae_fast::add_layer_norm(x, delta, weight, bias?, eps, out_dtype?) -> (residual, normed, mean, rstd)
      with autograd (x, delta, weight, bias)
  mae_fast::add_layer_norm_backward(grad_residual?, grad_normed, residual, weight, bias?, mean, rstd,
                                    x_dtype, delta_dtype) -> (grad_x, grad_delta, grad_weight, grad_bias)

mean and rstd (x.shape[:-1], fp32; fp64 on the float64 path) are saved for the backward, which
recomputes xhat from the stored residual. grad_delta is a (0,) tensor when delta has x's dtype
(grad_x serves both: a custom op may not return one tensor twice), grad_bias is (0,) without bias.
Eager calls whose kernels run skip torch.library's dispatch (_common.run_eagerly).
Dispatch as every Triton op (mae_fast/ops/_common.py): Triton on CUDA, Triton interpreted on CPU with
TRITON_INTERPRET on, a PyTorch fallback otherwise, always for a float64 residual and for D > MAX_D,
and on CPU where any of x, delta or the normed result is bfloat16.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import (FLOAT_DTYPES, FLOAT_NAMES, backward_op, check_device, check_float, compute_dtype, eager_function,
                      eager_impl, normalize_rows, refuse_double_backward, run_eagerly, triton_kernels)


def _rows(t: Tensor) -> Tensor:
    """t (..., D) as the kernels read rows: t itself where contiguous (no call on the common path),
    else (rows, D) with unit column stride (a view where the strides allow, else a copy)."""
    if t.is_contiguous() and t.dim() > 0:
        return t
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _dense(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _kernels(t: Tensor, res_dtype: torch.dtype, *also):
    """The kernel module for rows t of a res_dtype residual, or None for the fallback; also: the
    op's other tensors and dtypes (on CPU, the interpreter must compute them right)."""
    k = triton_kernels("add_layer_norm", t, res_dtype, *also)
    return k if k is not None and res_dtype != torch.float64 and t.shape[-1] <= k.MAX_D else None


def _empty0(t: Tensor) -> Tensor:
    return t.new_empty((0,))


# ----------------------------------------------------------------------------- PyTorch fallback

def add_layer_norm_torch(x, delta, weight, bias, eps, out_dtype):
    """Fallback forward: the kernels' two-pass arithmetic in fp32 (fp64 for a float64 residual).
    (Not native_layer_norm: its one-pass CPU moments leave x - mean != 0 at D = 1.)"""
    res_dtype = torch.promote_types(x.dtype, delta.dtype)
    cd = compute_dtype(res_dtype)
    res = (x.to(cd) + delta.to(cd)).to(res_dtype).contiguous()
    xhat, mean, rstd = normalize_rows(res.to(cd), 0, eps)
    y = xhat * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    return res, y.to(out_dtype).contiguous(), mean.squeeze(-1), rstd.squeeze(-1)


def add_layer_norm_backward_torch(grad_res, grad_normed, residual, weight, bias, mean, rstd, x_dtype, delta_dtype):
    cd = mean.dtype
    D = residual.shape[-1]
    rstd = rstd.unsqueeze(-1)
    xhat = (residual.to(cd) - mean.unsqueeze(-1)) * rstd
    g = grad_normed.to(cd)
    wg = g * weight.to(cd)
    t = (wg - xhat * (xhat * wg).mean(dim=-1, keepdim=True) - wg.mean(dim=-1, keepdim=True)) * rstd
    if grad_res is not None:
        t = t + grad_res.to(cd)
    gw = (g * xhat).reshape(-1, D).sum(0).to(weight.dtype)
    gb = g.reshape(-1, D).sum(0).to(bias.dtype) if bias is not None else None
    gd = t.to(delta_dtype).contiguous() if delta_dtype != x_dtype else None
    return t.to(x_dtype).contiguous(), gd, gw, gb


# ----------------------------------------------------------------------------- custom ops

@eager_impl("add_layer_norm")
def _forward_impl(x, delta, weight, bias, eps, out_dtype):
    res_dtype = torch.promote_types(x.dtype, delta.dtype)
    k = _kernels(x, res_dtype, delta, out_dtype)
    if k is None:
        return add_layer_norm_torch(x, delta, weight, bias, eps, out_dtype or res_dtype)
    rows = _rows(x)
    res, out, mean, rstd = k.add_layer_norm_fwd(rows, _rows(delta), _dense(weight), _dense(bias), eps, res_dtype,
                                                out_dtype or res_dtype)
    if rows is not x:  # x was reshaped to (rows, D)
        lead = x.shape[:-1]
        return res.view(x.shape), out.view(x.shape), mean.view(lead), rstd.view(lead)
    return res, out, mean, rstd


@torch.library.custom_op("mae_fast::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: Tensor, delta: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                       out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(x, delta, weight, bias, eps, out_dtype)


@_add_layer_norm_op.register_fake
def _(x, delta, weight, bias, eps, out_dtype):
    res_dtype = torch.promote_types(x.dtype, delta.dtype)
    stats = x.new_empty(x.shape[:-1], dtype=compute_dtype(res_dtype))
    return (x.new_empty(x.shape, dtype=res_dtype), x.new_empty(x.shape, dtype=out_dtype or res_dtype),
            stats, torch.empty_like(stats))


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


@eager_impl("add_layer_norm_backward")
def _backward_impl(grad_residual, grad_normed, residual, weight, bias, mean, rstd, x_dtype, delta_dtype):
    """(grad_x, grad_delta, grad_weight, grad_bias); grad_delta is None where delta has x's dtype
    (grad_x serves both), grad_bias None without bias."""
    k = _kernels(residual, residual.dtype, x_dtype, delta_dtype, grad_normed)
    if k is None:
        return add_layer_norm_backward_torch(grad_residual, grad_normed, residual, weight, bias, mean, rstd,
                                             x_dtype, delta_dtype)
    # residual, mean and rstd are contiguous as the forward made them, unless a compiled graph passes
    # another layout
    gx, gd, gw, gb = k.add_layer_norm_bwd(None if grad_residual is None else _rows(grad_residual),
                                          _rows(grad_normed), _dense(residual), _dense(weight), bias is not None,
                                          _dense(mean), _dense(rstd), x_dtype, delta_dtype)
    return gx, gd, _cast(gw, weight.dtype), None if gb is None else _cast(gb, bias.dtype)


@torch.library.custom_op("mae_fast::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(grad_residual: Optional[Tensor], grad_normed: Tensor, residual: Tensor,
                                weight: Tensor, bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                                x_dtype: torch.dtype, delta_dtype: torch.dtype
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gx, gd, gw, gb = _backward_impl(grad_residual, grad_normed, residual, weight, bias, mean, rstd, x_dtype,
                                    delta_dtype)
    # a custom op returns tensors: (0,) for the ones not computed
    return gx, _empty0(residual) if gd is None else gd, gw, _empty0(weight) if gb is None else gb


@_add_layer_norm_backward_op.register_fake
def _(grad_residual, grad_normed, residual, weight, bias, mean, rstd, x_dtype, delta_dtype):
    shape = residual.shape
    gd = residual.new_empty(shape, dtype=delta_dtype) if delta_dtype != x_dtype else _empty0(residual)
    gb = bias.new_empty(bias.shape) if bias is not None else _empty0(weight)
    return residual.new_empty(shape, dtype=x_dtype), gd, weight.new_empty(weight.shape), gb


def _setup(ctx, inputs, output):
    x, delta, weight, bias, _, _ = inputs
    residual, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work on zeros
    ctx.dtypes = (x.dtype, delta.dtype)
    ctx.save_for_backward(residual, weight, bias, mean, rstd)


def _backward(ctx, grad_res, grad_normed, _grad_mean, _grad_rstd):
    residual, weight, bias, mean, rstd = ctx.saved_tensors
    x_dtype, delta_dtype = ctx.dtypes
    if grad_normed is None:  # only the residual stream carries a gradient: the add's backward
        if grad_res is None:
            return None, None, None, None, None, None
        return _cast(grad_res, x_dtype), _cast(grad_res, delta_dtype), None, None, None, None
    gx, gd, gw, gb = backward_op(ctx, "add_layer_norm_backward")(grad_res, grad_normed, residual, weight, bias,
                                                                 mean, rstd, x_dtype, delta_dtype)
    return (gx, gx if delta_dtype == x_dtype else gd, gw, gb if bias is not None else None, None, None)


_add_layer_norm_op.register_autograd(_backward, setup_context=_setup)
refuse_double_backward("add_layer_norm_backward", "mae_fast.ops.add_layer_norm")
_AddLayerNormEager = eager_function("add_layer_norm", _setup, _backward)


# ----------------------------------------------------------------------------- public API

def _check_args(x, delta, weight, bias, eps, out_dtype) -> None:
    """add_layer_norm's argument checks."""
    others = {"delta": delta, "weight": weight} | ({} if bias is None else {"bias": bias})
    check_float(x, "x")
    for name, t in others.items():
        check_float(t, name)
    if x.dim() == 0 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    D = x.shape[-1]
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape (D,) = ({D},) (x's last dim), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must have shape (D,) = ({D},) (x's last dim), got {tuple(bias.shape)}")
    for name, t in others.items():
        check_device(t, name, x, "x")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a finite float > 0, got {eps}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None or one of {FLOAT_NAMES}, got {out_dtype!r}")


def add_layer_norm(x: Tensor, delta: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Fused `residual = x + delta; normed = layer_norm(residual, (D,), weight, bias, eps)`.

    x, delta: (..., D), same shape, any float dtypes. residual has
    torch.promote_types(x.dtype, delta.dtype) (the sum is taken in fp32 and rounded once, as eager
    does); normed is the LayerNorm (biased variance, fp32 arithmetic) of that ROUNDED residual,
    stored in out_dtype (default: residual's dtype), so it equals eager `F.layer_norm(residual,
    ...).to(out_dtype)`. Under bf16 autocast pass out_dtype=torch.bfloat16: the result is what
    autocast's fp32 layer_norm followed by the next Linear's cast would give, in one pass.

    Inputs are read in place when their last dim is contiguous and the leading dims flatten to
    one row stride (slices along the leading dims included); otherwise they are copied first.
    Both results are new contiguous tensors. Differentiable in x, delta, weight and bias (either
    output may be unused); grad_weight / grad_bias are reduced deterministically (no atomics). A
    gradient of a gradient (double backward) is not supported: NotImplementedError. normed is finite
    for any finite residual, where F.layer_norm's fp32 variance overflows (values past ~2**64) and
    gives NaN.
    """
    _check_args(x, delta, weight, bias, eps, out_dtype)
    res_dtype = torch.promote_types(x.dtype, delta.dtype)
    eager = run_eagerly() and _kernels(x, res_dtype, delta, out_dtype) is not None
    op = _AddLayerNormEager.apply if eager else torch.ops.mae_fast.add_layer_norm
    res, normed, _, _ = op(x, delta, weight, bias, float(eps), out_dtype)
    return res, normed


__all__ = ["add_layer_norm"]
