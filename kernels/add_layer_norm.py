"""Triton kernels for the fused residual add + LayerNorm of a pre-norm transformer block.

Tensors in, tensors out: no validation here (mae_fast/ops/add_layer_norm.py does it).

    residual = x + delta                      (fp32 arithmetic, stored in residual's dtype)
    normed   = LayerNorm(residual as stored)  (fp32, biased variance; stored in normed's dtype)

Inputs are rows of D: (rows, D) with a row stride and unit column stride, or contiguous (..., D)
tensors (rows = numel / D, no reshape needed); every output is contiguous, shaped like the input.
The statistics come from the ROUNDED stored residual, so normed equals eager layer_norm of the
residual tensor the caller gets back; kernels/stats.py computes them, finite for any finite
residual (a plain fp32 variance overflows past ~2**64, where F.layer_norm gives NaN). Loads are
converted to fp32 before any arithmetic. Row offsets are int64: rows * D may pass 2**31.

Backward: total = grad_residual + LN'(grad_normed), recomputing xhat from the saved residual,
mean and rstd. grad_weight / grad_bias are deterministic: each program sums its own contiguous
run of rows into one row of a (programs, D) fp32 buffer, which the caller reduces in a fixed
order. No atomics.
"""
import functools

import torch
import triton
import triton.language as tl

from . import cdiv, next_power_of_2, on_tensor_device
from .stats import normalize_rows

# Allocator of every buffer the kernels write (a module attribute so tests can NaN-poison it).
empty = torch.empty

# Above this the whole row no longer fits one program's registers: the ops fall back to PyTorch.
MAX_D = 65536


@functools.lru_cache(maxsize=256)  # a few shapes per run; computed on every launch otherwise
def _block_config(D, rows):
    """(BLOCK_R, BLOCK_D, num_warps): BLOCK_R whole rows per program, ~1K elements (one row for
    D >= 1024; 16 rows of D = 64), warps as kernels/patchify.py sizes them."""
    block_d = next_power_of_2(max(int(D), 1))
    block_r = max(1, min(next_power_of_2(max(int(rows), 1)), 1024 // block_d))
    n = block_r * block_d
    num_warps = 2 if n <= 512 else 4 if n <= 2048 else 8 if n <= 8192 else 16
    return block_r, block_d, num_warps


@triton.jit
def _add_layer_norm_fwd_kernel(
    x_ptr, d_ptr, w_ptr, b_ptr, res_ptr, out_ptr, mean_ptr, rstd_ptr,
    n_rows, D, s_x, s_d, eps,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(n_rows, BLOCK_R),): rows [pid * BLOCK_R, (pid + 1) * BLOCK_R)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + rows[:, None] * s_d + cols[None, :], mask=m, other=0.0).to(tl.float32)
    r = (x + d).to(res_ptr.dtype.element_ty)
    out_off = rows[:, None] * D + cols[None, :]
    tl.store(res_ptr + out_off, r, mask=m)
    xhat, mean, rstd = normalize_rows(r.to(tl.float32), m, D, D, eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xhat * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _add_layer_norm_bwd_kernel(
    gr_ptr, gn_ptr, res_ptr, w_ptr, mean_ptr, rstd_ptr, gx_ptr, gd_ptr, gw_part_ptr, gb_part_ptr,
    n_rows, D, s_gr, s_gn, rows_per_program,
    HAS_GRES: tl.constexpr, TWO_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (programs,): program p owns rows [p * rows_per_program, (p + 1) * rows_per_program),
    BLOCK_R at a time. gx (and gd with TWO_OUT, in delta's dtype) get grad_residual + the LayerNorm
    input gradient; row p of the partial buffers gets sum(grad_normed * xhat) and sum(grad_normed)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    gw_acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    gb_acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for i in range(0, rows_per_program, BLOCK_R):
        rows = start + i + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        m = row_ok[:, None] & col_ok[None, :]
        off = rows[:, None] * D + cols[None, :]
        r = tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(gn_ptr + rows[:, None] * s_gn + cols[None, :], mask=m, other=0.0).to(tl.float32)
        xhat = tl.where(m, (r - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :]
        c1 = tl.sum(xhat * wg, axis=1) / D
        c2 = tl.sum(wg, axis=1) / D
        t = (wg - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_GRES:
            t += tl.load(gr_ptr + rows[:, None] * s_gr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(gx_ptr + off, t.to(gx_ptr.dtype.element_ty), mask=m)
        if TWO_OUT:
            tl.store(gd_ptr + off, t.to(gd_ptr.dtype.element_ty), mask=m)
        gw_acc += g * xhat
        if HAS_BIAS:
            gb_acc += g
    tl.store(gw_part_ptr + pid * D + cols, tl.sum(gw_acc, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(gb_part_ptr + pid * D + cols, tl.sum(gb_acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------- launchers

@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bwd_programs(device, n_blocks):
    """Programs of the backward: a few waves of the GPU (fewer partial rows to reduce than one
    program per row block); 4 under the interpreter. Fixed per device and shape: deterministic."""
    if device.type == "cuda":
        return min(n_blocks, 8 * _sm_count(device))
    return min(n_blocks, 4)


def _row_stride(t, D):
    """The stride between rows of t: (rows, D) with any row stride, or contiguous (..., D)."""
    return t.stride(0) if t.dim() == 2 else D


@on_tensor_device
def add_layer_norm_fwd(x, delta, weight, bias, eps, res_dtype, out_dtype):
    """x, delta: rows of D (see above), x's shape (..., D) given to the outputs; weight, bias (D,)
    contiguous (bias may be None). Returns contiguous (residual like x in res_dtype, normed like x in
    out_dtype, mean x.shape[:-1] fp32, rstd x.shape[:-1] fp32)."""
    shape = tuple(x.shape)  # torch.empty takes a tuple faster than a torch.Size
    D = shape[-1]
    n_rows = x.numel() // D
    dev = x.device
    res = empty(shape, device=dev, dtype=res_dtype)
    out = empty(shape, device=dev, dtype=out_dtype)
    mean = empty(shape[:-1], device=dev, dtype=torch.float32)
    rstd = empty(shape[:-1], device=dev, dtype=torch.float32)
    if n_rows == 0:
        return res, out, mean, rstd
    block_r, block_d, num_warps = _block_config(D, n_rows)
    _add_layer_norm_fwd_kernel[(cdiv(n_rows, block_r),)](
        x, delta, weight, weight if bias is None else bias, res, out, mean, rstd,
        n_rows, D, _row_stride(x, D), _row_stride(delta, D), float(eps),
        HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return res, out, mean, rstd


@on_tensor_device
def add_layer_norm_bwd(grad_res, grad_normed, residual, weight, has_bias, mean, rstd, x_dtype, delta_dtype):
    """grad_res (or None) and grad_normed: rows of D (see above); residual contiguous (..., D); mean,
    rstd contiguous fp32, one value per row. Returns (grad_x like residual in x_dtype, grad_delta
    like residual in delta_dtype or None when the dtypes agree (grad_x serves both), grad_weight
    (D,) fp32, grad_bias (D,) fp32 or None)."""
    shape = tuple(residual.shape)
    D = shape[-1]
    n_rows = residual.numel() // D
    dev = residual.device
    gx = empty(shape, device=dev, dtype=x_dtype)
    gd = empty(shape, device=dev, dtype=delta_dtype) if delta_dtype != x_dtype else None
    if n_rows == 0:
        gw = torch.zeros(D, device=dev, dtype=torch.float32)
        return gx, gd, gw, gw.clone() if has_bias else None
    block_r, block_d, num_warps = _block_config(D, n_rows)
    programs = _bwd_programs(dev, cdiv(n_rows, block_r))
    rows_per_program = cdiv(cdiv(n_rows, programs), block_r) * block_r
    programs = cdiv(n_rows, rows_per_program)
    gw_part = empty((programs, D), device=dev, dtype=torch.float32)
    gb_part = empty((programs, D), device=dev, dtype=torch.float32) if has_bias else None
    _add_layer_norm_bwd_kernel[(programs,)](
        grad_normed if grad_res is None else grad_res, grad_normed, residual, weight, mean, rstd,
        gx, gx if gd is None else gd, gw_part, gw_part if gb_part is None else gb_part,
        n_rows, D, 0 if grad_res is None else _row_stride(grad_res, D), _row_stride(grad_normed, D), rows_per_program,
        HAS_GRES=grad_res is not None, TWO_OUT=gd is not None, HAS_BIAS=has_bias,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return gx, gd, gw_part.sum(0), None if gb_part is None else gb_part.sum(0)
