"""Triton kernels for patchify, unpatchify and the fused patchify + gather (+ norm-pix).

Tensors in, tensors out: no validation here (mae_fast/ops/ does it).

Conventions (official MAE, docs/design.md): imgs (B, C, H, W) are cut into a grid of
gh x gw patches of ph x pw pixels; patch l = i * gw + j; feature f of a patch row is
(pi * pw + qj) * C + c, i.e. (p, q, c) order, so P = ph * pw * C.

Every kernel reads the image through its strides (contiguous, channels_last, sliced or expanded
all work, nothing is copied), loads each element once, and computes in fp32 whatever the storage
dtype (load, then .to(tl.float32) before any arithmetic). uint8 images (read by the gather and
the loss, never differentiated) are normalised per channel right after the load (_load_patches),
so no float copy of them exists. Norm-pix statistics come from kernels/stats.py, finite for any
finite patch.

Index safety: a patch id outside [0, L) never reads or writes outside a tensor. The gather writes
a row of NaN for it (so bad ids are loud even without validation); the scatter drops it.
"""
import functools

import torch
import triton
import triton.language as tl

from . import NORM_PIX_EPS, cdiv, fits_int32, next_power_of_2, on_tensor_device, within_int32
from .stats import normalize_rows


# Output allocators, module attributes so that tests can poison them (NaN-fill) and catch any
# element a kernel fails to write.
empty = torch.empty
empty_like = torch.empty_like


@functools.lru_cache(maxsize=256)  # a few shapes per run; computed on every launch otherwise
def _block_config(P, rows):
    """(BLOCK_R, BLOCK_P, num_warps): one program holds BLOCK_R whole patch rows.

    About 4K elements per program (ViT-B/16 and ViT-L/16: P = 768 -> 4 rows of 1024 lanes,
    8 warps); small patches batch more rows, huge patches (32x32x13) take one row each."""
    block_p = next_power_of_2(max(int(P), 1))
    block_r = max(1, min(next_power_of_2(max(int(rows), 1)), 4096 // block_p, 64))
    n = block_r * block_p
    num_warps = 2 if n <= 512 else 4 if n <= 2048 else 8 if n <= 8192 else 16
    return block_r, block_p, num_warps


@triton.jit
def _patch_offsets(f, C: tl.constexpr, PW: tl.constexpr, s_c, s_h, s_w):
    """Element offset, inside a patch, of feature f = (pi * PW + qj) * C + c."""
    pi = f // (PW * C)
    rem = f % (PW * C)
    qj = rem // C
    c = rem % C
    return c * s_c + pi * s_h + qj * s_w


@triton.jit
def _batch_and_row_block(n_rows, BLOCK_R: tl.constexpr):
    """(b, r) of a flat grid of B * cdiv(n_rows, BLOCK_R) programs. One axis: CUDA caps the second
    and third at 65,535 programs, which the batch (B > 65,535) or the row blocks of large images
    (4096 x 4096 px at 16 px patches: 65,536 rows) would pass."""
    pid = tl.program_id(0)
    n_r = tl.cdiv(n_rows, BLOCK_R)
    return (pid // n_r).to(tl.int64), pid % n_r


@triton.jit
def _load_patches(img_ptr, aff_ptr, off, m, f, C: tl.constexpr, AFFINE: tl.constexpr):
    """The pixels at img_ptr + off (0 outside m) in fp32; with AFFINE (uint8 images) normalised as
    x * scale[c] + shift[c] from aff_ptr = [scale (C) | shift (C)], c = f % C, before any statistic."""
    x = tl.load(img_ptr + off, mask=m, other=0).to(tl.float32)
    if AFFINE:
        c = f % C
        scale = tl.load(aff_ptr + c)
        shift = tl.load(aff_ptr + C + c)
        x = tl.where(m, x * scale[None, :] + shift[None, :], 0.0)
    return x


@triton.jit
def _patchify_gather_fwd_kernel(
    img_ptr, ids_ptr, out_ptr, aff_ptr,
    K, L, GW, P,
    s_ib, s_ic, s_ih, s_iw,
    s_db, s_dk,
    eps,
    C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_IDS: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[b, k, :] = patch ids[b, k] (or k without ids) of img[b] (with AFFINE: uint8 pixels
    normalised per channel), optionally norm-pixed.

    Grid (B * cdiv(K, BLOCK_R),); out is contiguous (B, K, P)."""
    b, pid_r = _batch_and_row_block(K, BLOCK_R)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < K
    if HAS_IDS:
        pidx = tl.load(ids_ptr + b * s_db + rows * s_dk, mask=row_ok, other=0)
        valid = row_ok & (pidx >= 0) & (pidx < L)  # compared in the ids dtype: no int64 wrap-around
        pidx = tl.where(valid, pidx, 0).to(tl.int32)
    else:
        pidx = rows
        valid = row_ok
    f = tl.arange(0, BLOCK_P)
    f_ok = f < P
    off_f = _patch_offsets(f, C, PW, s_ic, s_ih, s_iw)
    off_r = (pidx // GW) * (PH * s_ih) + (pidx % GW) * (PW * s_iw)
    m = valid[:, None] & f_ok[None, :]
    x = _load_patches(img_ptr + b * s_ib, aff_ptr, off_r[:, None] + off_f[None, :], m, f, C, AFFINE)
    if NORM:
        x, _, _ = normalize_rows(x, m, P, P - 1, eps)
    x = tl.where(valid[:, None], x, float("nan"))
    out = out_ptr + b * K * P + rows[:, None] * P + f[None, :]
    tl.store(out, x.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & f_ok[None, :])


@triton.jit
def _patchify_gather_bwd_kernel(
    g_ptr, img_ptr, inv_ptr, out_ptr,
    K, L, GW, P,
    s_gb, s_gk, s_gp,
    s_ib, s_ic, s_ih, s_iw,
    s_ob, s_oc, s_oh, s_ow,
    s_vb, s_vl,
    eps,
    C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_INV: tl.constexpr, NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Scatter rows back to image layout; every image element is written exactly once.

    Program (r, b) owns patches l in [r * BLOCK_R, (r + 1) * BLOCK_R) of image b. The row for
    patch l is k = inv[b, l] (HAS_INV; -1 = no row, the patch gets zeros) or k = l. With NORM
    the row is the gradient w.r.t. the norm-pixed patch: the patch is re-read from img and the
    gradient taken back through (x - mean) / sqrt(var + eps), var unbiased.
    Grid (B * cdiv(L, BLOCK_R),). Also unpatchify (HAS_INV = NORM = False)."""
    b, pid_r = _batch_and_row_block(L, BLOCK_R)
    pidx = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = pidx < L
    if HAS_INV:
        k = tl.load(inv_ptr + b * s_vb + pidx * s_vl, mask=row_ok, other=-1).to(tl.int32)
        has = row_ok & (k >= 0) & (k < K)
        k = tl.where(has, k, 0)
    else:
        k = pidx
        has = row_ok
    f = tl.arange(0, BLOCK_P)
    f_ok = f < P
    m = has[:, None] & f_ok[None, :]
    g = tl.load(g_ptr + b * s_gb + k[:, None] * s_gk + f[None, :] * s_gp, mask=m, other=0.0).to(tl.float32)
    i = pidx // GW
    j = pidx % GW
    if NORM:
        off_in = (i * (PH * s_ih) + j * (PW * s_iw))[:, None] + _patch_offsets(f, C, PW, s_ic, s_ih, s_iw)[None, :]
        x = tl.load(img_ptr + b * s_ib + off_in, mask=m, other=0.0).to(tl.float32)
        y, _, rstd = normalize_rows(x, m, P, P - 1, eps)
        g_mean = tl.sum(g, axis=1) / P
        gy = tl.sum(g * y, axis=1) / (P - 1)
        g = tl.where(m, rstd[:, None] * (g - g_mean[:, None] - y * gy[:, None]), 0.0)
    off_out = (i * (PH * s_oh) + j * (PW * s_ow))[:, None] + _patch_offsets(f, C, PW, s_oc, s_oh, s_ow)[None, :]
    tl.store(out_ptr + b * s_ob + off_out, g.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & f_ok[None, :])


# ----------------------------------------------------------------------------- launchers

def _grid_dims(imgs, ph, pw):
    B, C, H, W = imgs.shape
    return B, C, H // ph, W // pw


@on_tensor_device
def patchify_gather_fwd(imgs, ids, ph, pw, norm_pix=False, out=None, affine=None):
    """(B, C, H, W) [+ ids (B, K)] -> (B, K, ph*pw*C) (all L patches when ids is None), in imgs.dtype,
    or for uint8 images with affine ((2, C) fp32: scale, shift per channel) normalised, in fp32."""
    imgs = within_int32(imgs)
    B, C, gh, gw = _grid_dims(imgs, ph, pw)
    L, P = gh * gw, ph * pw * C
    K = L if ids is None else ids.shape[1]
    if out is None:
        out = empty((B, K, P), dtype=imgs.dtype if affine is None else torch.float32, device=imgs.device)
    if B == 0 or K == 0:
        return out
    block_r, block_p, num_warps = _block_config(P, K)
    ids_arg, s_db, s_dk = (imgs, 0, 0) if ids is None else (ids, ids.stride(0), ids.stride(1))
    grid = (B * cdiv(K, block_r),)
    _patchify_gather_fwd_kernel[grid](
        imgs, ids_arg, out, out if affine is None else affine, K, L, gw, P, *imgs.stride(), s_db, s_dk,
        NORM_PIX_EPS, C=C, PH=ph, PW=pw, HAS_IDS=ids is not None, NORM=bool(norm_pix), AFFINE=affine is not None,
        BLOCK_R=block_r, BLOCK_P=block_p, num_warps=num_warps)
    return out


@on_tensor_device
def patchify_gather_bwd(grad, imgs, inv, ph, pw, norm_pix=False, out=None, image_shape=None):
    """Rows -> image layout. grad (B, K, P); inv (B, L) int (row of each patch, -1 = none) or None
    for k = l; imgs is read only with norm_pix (and gives the output's shape and strides).
    Returns out (a new tensor like imgs unless given); every element is written."""
    grad = within_int32(grad)
    if out is None:
        out = empty_like(imgs)
        if not fits_int32(out):
            out = empty(imgs.shape, dtype=imgs.dtype, device=imgs.device)
    B, C, H, W = out.shape
    gh, gw = H // ph, W // pw
    L, P = gh * gw, ph * pw * C
    K = grad.shape[1]
    if out.numel() == 0:
        return out
    block_r, block_p, num_warps = _block_config(P, L)
    img = within_int32(imgs) if (norm_pix and imgs is not None) else out
    inv_arg, s_vb, s_vl = (out, 0, 0) if inv is None else (inv, inv.stride(0), inv.stride(1))
    grid = (B * cdiv(L, block_r),)
    _patchify_gather_bwd_kernel[grid](
        grad, img, inv_arg, out, K, L, gw, P, *grad.stride(), *img.stride(), *out.stride(),
        s_vb, s_vl, NORM_PIX_EPS,
        C=C, PH=ph, PW=pw, HAS_INV=inv is not None, NORM=bool(norm_pix),
        BLOCK_R=block_r, BLOCK_P=block_p, num_warps=num_warps)
    return out


@on_tensor_device
def patchify_fwd(imgs, ph, pw):
    """(B, C, H, W) -> (B, L, ph*pw*C)."""
    return patchify_gather_fwd(imgs, None, ph, pw)


@on_tensor_device
def unpatchify_fwd(x, ph, pw, H, W, out=None):
    """(B, L, ph*pw*C) -> (B, C, H, W), contiguous unless out is given."""
    if out is None:
        out = empty((x.shape[0], x.shape[2] // (ph * pw), H, W), dtype=x.dtype, device=x.device)
    return patchify_gather_bwd(x, None, None, ph, pw, out=out)
