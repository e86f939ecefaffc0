"""Triton kernels for multi-head self-attention read straight from a fused qkv projection.

Tensors in, tensors out: no validation here (mae_fast/ops/attention.py does it).

    qkv (B, N, 3 * H * d), unit last stride: q, k, v of head h at columns [part * H * d + h * d, ... + d)
    out (B, N, H * d) = softmax(q k^T * d ** -0.5) v per head, written in the layout the output
        projection reads (no transpose copy)
    lse (B * H, N) fp32: the row log2-sum-exp of the scaled scores, saved for the backward

The forward is FlashAttention-2's loop (online softmax over key blocks, fp32 statistics and
accumulator, p rounded to the value dtype for the second product). The backward recomputes p from
lse and writes dq, dk, dv into one (B, N, 3 * H * d) gradient of qkv, the layout of the qkv
Linear's output: the split into heads costs no copy either way. Two kernels: the dq kernel, which
also computes delta = rowsum(dout * out) (one program per query block, so each row once), then
the dk/dv kernel (one program per key block, looping over the query blocks). Where one key block
holds the whole sequence (the MAE encoder's 50 tokens), the dk/dv program sees every key: it
computes delta and dq as well, and the dq kernel is skipped (5 products per block instead of 7,
one exp2 instead of two). No atomics: the gradient is deterministic.

MAE's sequences are short (50 tokens in the encoder, 197 in the decoder): every program loops over
a few blocks only, so the grid (query or key blocks x B * H) is what fills the GPU.
fp32 inputs take IEEE fp32 products (not TF32), so fp32 results meet fp32 tolerances.
"""
import functools

import torch
import triton
import triton.language as tl

from . import cdiv, next_power_of_2, on_tensor_device, within_int32

# Allocator of every buffer the kernels write (a module attribute so tests can NaN-poison it).
empty = torch.empty

# Head dims up to this run here (the row block and its accumulator must fit one program).
MAX_HEAD_DIM = 128

_LOG2E = 1.4426950408889634

# The backward takes one pass (no dq kernel) where one key block holds the sequence and d <= 64;
# tests set it False to run the two-kernel backward at those lengths too.
ONE_PASS_BWD = True


@functools.lru_cache(maxsize=256)  # a few shapes per run; computed on every launch otherwise
def _config(N, d, dtype):
    """(BLOCK_M, BLOCK_N, D_PAD, num_warps): square blocks, no longer than the sequence needs and at
    least 16 (the smallest tl.dot), 8 warps from d = 64 up. 16-bit inputs take tensor-core blocks
    of 64 (32 past d = 64); fp32 inputs (IEEE products on FMA units) 32 (16 past d = 16): larger
    ones run out of registers (ptxas, tests/test_triton_compile.py)."""
    d_pad = max(16, next_power_of_2(int(d)))
    cap = (64 if d_pad <= 64 else 32) if dtype != torch.float32 else (32 if d_pad <= 16 else 16)
    block = max(16, min(cap, next_power_of_2(int(N))))
    return block, block, d_pad, 4 if d_pad <= 32 else 8


@triton.jit
def _program(qkv_ptr, H, N, s_qb, HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (batch * head, batch, offsets of its BLOCK rows, head columns, their mask,
    the head's q base pointer). The grid is 1-D, the blocks of one head consecutive (its k and v
    stay in L2): a grid's second dimension stops at 65,535, which B * H passes at batch 4,096
    with 16 heads."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK)
    bh = pid // n_blocks
    b = (bh // H).to(tl.int64)
    cols = tl.arange(0, D_PAD)
    base = qkv_ptr + b * s_qb + (bh % H) * HEAD_D
    return bh, b, (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK), cols, cols < HEAD_D, base


@triton.jit
def _attn_fwd_kernel(
    qkv_ptr, o_ptr, lse_ptr,
    H, N, s_qb, s_qn, s_ob, s_on, qk_scale,
    HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (B * H * cdiv(N, BLOCK_M),): query rows [i * BLOCK_M, ...) of one (batch, head)."""
    bh, b, rows, cols, col_ok, base = _program(qkv_ptr, H, N, s_qb, HEAD_D, D_PAD, BLOCK_M)
    inner = H * HEAD_D
    row_ok = rows < N
    q = tl.load(base + rows[:, None] * s_qn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        kv_mask = key_ok[:, None] & col_ok[None, :]
        k = tl.load(base + inner + keys[:, None] * s_qn + cols[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(base + 2 * inner + keys[:, None] * s_qn + cols[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_off = o_ptr + b * s_ob + (bh % H) * HEAD_D + rows[:, None] * s_on + cols[None, :]
    tl.store(o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    qkv_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    H, N, s_qb, s_qn, s_ob, s_on, s_gb, s_gn, s_db, s_dn, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (B * H * cdiv(N, BLOCK_M),): dq of query rows [i * BLOCK_M, ...), and their delta."""
    bh, b, rows, cols, col_ok, base = _program(qkv_ptr, H, N, s_qb, HEAD_D, D_PAD, BLOCK_M)
    h = bh % H
    inner = H * HEAD_D
    row_ok = rows < N
    m = row_ok[:, None] & col_ok[None, :]
    q = tl.load(base + rows[:, None] * s_qn + cols[None, :], mask=m, other=0.0)
    o = tl.load(o_ptr + b * s_ob + h * HEAD_D + rows[:, None] * s_on + cols[None, :], mask=m, other=0.0)
    do = tl.load(do_ptr + b * s_gb + h * HEAD_D + rows[:, None] * s_gn + cols[None, :], mask=m, other=0.0)
    stat = bh.to(tl.int64) * N + rows
    lse = tl.load(lse_ptr + stat, mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + stat, delta, mask=row_ok)
    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        kv_mask = key_ok[:, None] & col_ok[None, :]
        k = tl.load(base + inner + keys[:, None] * s_qn + cols[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * inner + keys[:, None] * s_qn + cols[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # masked: a padded key's score is 0, and exp2(0 - lse) overflows where every real score is
        # below -127 (log2 units); inf * (k = 0) would be NaN
        p = tl.where(key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    g_off = dqkv_ptr + b * s_db + h * HEAD_D + rows[:, None] * s_dn + cols[None, :]
    tl.store(g_off, (dq * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=m)


@triton.jit
def _attn_bwd_dkv_kernel(
    qkv_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    H, N, s_qb, s_qn, s_ob, s_on, s_gb, s_gn, s_db, s_dn, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, WITH_DQ: tl.constexpr,
):
    """Grid (B * H * cdiv(N, BLOCK_N),): dk and dv of key rows [i * BLOCK_N, ...). Padded key rows
    (k = v = 0) may accumulate inf (exp2(0 - lse)); each key row is its own, and they are not stored.
    WITH_DQ (N <= BLOCK_N: this program holds every key): delta from out and dout, and each query
    block's dq, padded keys masked out of p as in the dq kernel. Otherwise delta comes from it."""
    bh, b, keys, cols, col_ok, base = _program(qkv_ptr, H, N, s_qb, HEAD_D, D_PAD, BLOCK_N)
    h = bh % H
    inner = H * HEAD_D
    key_ok = keys < N
    kv_mask = key_ok[:, None] & col_ok[None, :]
    k = tl.load(base + inner + keys[:, None] * s_qn + cols[None, :], mask=kv_mask, other=0.0)
    v = tl.load(base + 2 * inner + keys[:, None] * s_qn + cols[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        m = row_ok[:, None] & col_ok[None, :]
        q = tl.load(base + rows[:, None] * s_qn + cols[None, :], mask=m, other=0.0)
        do = tl.load(do_ptr + b * s_gb + h * HEAD_D + rows[:, None] * s_gn + cols[None, :], mask=m, other=0.0)
        stat = bh.to(tl.int64) * N + rows
        lse = tl.load(lse_ptr + stat, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])  # padded rows: q = lse = 0, so p = 1, and do = delta = 0: they add 0
        if WITH_DQ:
            o = tl.load(o_ptr + b * s_ob + h * HEAD_D + rows[:, None] * s_on + cols[None, :], mask=m, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
            p = tl.where(key_ok[None, :], p, 0.0)
        else:
            delta = tl.load(delta_ptr + stat, mask=row_ok, other=0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
        if WITH_DQ:
            dq = tl.dot(ds, k, input_precision=PRECISION) * sm_scale
            tl.store(dqkv_ptr + b * s_db + h * HEAD_D + rows[:, None] * s_dn + cols[None, :],
                     dq.to(dqkv_ptr.dtype.element_ty), mask=m)
    g_off = dqkv_ptr + b * s_db + h * HEAD_D + keys[:, None] * s_dn + cols[None, :]
    tl.store(g_off + inner, (dk * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(g_off + 2 * inner, dv.to(dqkv_ptr.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------- launchers

def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


@on_tensor_device
def attention_fwd(qkv, heads):
    """qkv (B, N, 3 * heads * d) with unit last stride. Returns (out (B, N, heads * d) contiguous in
    qkv's dtype, lse (B * heads, N) fp32)."""
    qkv = within_int32(qkv)
    B, N, three_inner = qkv.shape
    d = three_inner // (3 * heads)
    out = empty((B, N, heads * d), device=qkv.device, dtype=qkv.dtype)
    lse = empty((B * heads, N), device=qkv.device, dtype=torch.float32)
    if B * N == 0:
        return out, lse
    bm, bn, d_pad, warps = _config(N, d, qkv.dtype)
    sm_scale = d ** -0.5
    _attn_fwd_kernel[(B * heads * cdiv(N, bm),)](
        qkv, out, lse, heads, N, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), sm_scale * _LOG2E,
        HEAD_D=d, D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, PRECISION=_precision(qkv.dtype), num_warps=warps)
    return out, lse


@on_tensor_device
def attention_bwd(grad_out, qkv, out, lse, heads):
    """grad_out (B, N, heads * d) with unit last stride; qkv, out, lse as attention_fwd gave them.
    Returns the gradient of qkv, (B, N, 3 * heads * d) contiguous in qkv's dtype."""
    grad_out, qkv = within_int32(grad_out), within_int32(qkv)
    B, N, three_inner = qkv.shape
    d = three_inner // (3 * heads)
    dqkv = empty((B, N, three_inner), device=qkv.device, dtype=qkv.dtype)
    if B * N == 0:
        return dqkv
    bm, bn, d_pad, warps = _config(N, d, qkv.dtype)
    one_pass = ONE_PASS_BWD and N <= bn and d_pad <= 64
    if one_pass and d_pad == 64:
        bm = max(16, bn // 2)  # 64 x 64 spills with the dq work added (ptxas, tests/test_triton_compile.py)
    delta = lse if one_pass else empty((B * heads, N), device=qkv.device, dtype=torch.float32)  # unused if one_pass
    sm_scale = d ** -0.5
    meta = dict(HEAD_D=d, D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, PRECISION=_precision(qkv.dtype), num_warps=warps)
    args = (qkv, out, grad_out, lse, delta, dqkv, heads, N, qkv.stride(0), qkv.stride(1), out.stride(0),
            out.stride(1), grad_out.stride(0), grad_out.stride(1), dqkv.stride(0), dqkv.stride(1),
            sm_scale * _LOG2E, sm_scale)
    if not one_pass:
        _attn_bwd_dq_kernel[(B * heads * cdiv(N, bm),)](*args, **meta)
    _attn_bwd_dkv_kernel[(B * heads * cdiv(N, bn),)](*args, WITH_DQ=one_pass, **meta)
    return dqkv
