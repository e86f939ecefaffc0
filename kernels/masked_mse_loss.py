"""Triton kernels for the masked-only MSE loss of MAE and its backward.

Tensors in, tensors out: no validation here (mae_fast/ops/masked_mse_loss.py does it).

The targets are never materialised: each program re-cuts its patches from the image (through the
image strides, (p, q, c) feature order, optional per-patch norm-pix with unbiased variance) and
compares them with pred rows in fp32 (uint8 images normalised per channel on load, as by
patchify_gather).

Two row modes:
  HAS_MASK  pred (B, L, P), row l is patch l, weight mask[b, l]; rows with weight 0 are not read.
            loss = sum_{b,l} mask * sum_f (pred - t)^2 / (P * sum mask)   (official MAE)
  ids       pred (B, M, P), row m is patch ids[b, m], weight 1.
            loss = sum (pred - t)^2 / (B * M * P)                          (F.mse_loss, vit-pytorch MAE)

Determinism: the forward writes one partial sum (and one mask partial) per program into a buffer,
then a single-program kernel adds them in a fixed order; no float atomics. A patch id outside
[0, L) never reads outside a tensor: its row contributes NaN (loss and gradient).
"""
import torch
import triton
import triton.language as tl

from . import NORM_PIX_EPS, cdiv, on_tensor_device, within_int32
from .patchify import _batch_and_row_block, _block_config, _load_patches, _patch_offsets
from .stats import normalize_rows

# Allocator of every buffer the kernels write (a module attribute so tests can NaN-poison it).
empty = torch.empty


@triton.jit
def _load_rows(pred_ptr, img_ptr, w_ptr, ids_ptr, aff_ptr, b, rows, R, L, GW, P,
               s_pb, s_pr, s_pp, s_ib, s_ic, s_ih, s_iw, s_wb, s_wl, s_db, s_dk, eps,
               C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
               HAS_MASK: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr, BLOCK_P: tl.constexpr):
    """Returns (diff = pred - target on active rows else 0, weight per row, row_ok, bad id per row)."""
    row_ok = rows < R
    if HAS_MASK:
        w = tl.load(w_ptr + b * s_wb + rows * s_wl, mask=row_ok, other=0.0).to(tl.float32)
        pidx = rows
        bad = rows < 0
        active = row_ok & (w != 0.0)
    else:
        pidx = tl.load(ids_ptr + b * s_db + rows * s_dk, mask=row_ok, other=0)
        valid = (pidx >= 0) & (pidx < L)  # compared in the ids dtype: no int64 wrap-around
        bad = row_ok & (~valid)
        pidx = tl.where(valid, pidx, 0).to(tl.int32)
        active = row_ok & valid
        w = tl.where(row_ok, 1.0, 0.0)
    f = tl.arange(0, BLOCK_P)
    f_ok = f < P
    m = active[:, None] & f_ok[None, :]
    off_r = (pidx // GW) * (PH * s_ih) + (pidx % GW) * (PW * s_iw)
    off_f = _patch_offsets(f, C, PW, s_ic, s_ih, s_iw)
    t = _load_patches(img_ptr + b * s_ib, aff_ptr, off_r[:, None] + off_f[None, :], m, f, C, AFFINE)
    if NORM:
        t, _, _ = normalize_rows(t, m, P, P - 1, eps)
    p = tl.load(pred_ptr + b * s_pb + rows[:, None] * s_pr + f[None, :] * s_pp, mask=m, other=0.0).to(tl.float32)
    diff = tl.where(m, p - t, 0.0)
    return diff, w, row_ok, bad


@triton.jit
def _masked_mse_loss_fwd_kernel(
    pred_ptr, img_ptr, w_ptr, ids_ptr, aff_ptr, part_ptr, wpart_ptr,
    R, L, GW, P,
    s_pb, s_pr, s_pp,
    s_ib, s_ic, s_ih, s_iw,
    s_wb, s_wl,
    s_db, s_dk,
    eps,
    C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_MASK: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (B * n_r,), n_r = cdiv(R, BLOCK_R): part[b * n_r + r] = sum over its rows of w * sum_f diff^2
    (and wpart = sum of w with HAS_MASK)."""
    b, pid_r = _batch_and_row_block(R, BLOCK_R)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    diff, w, row_ok, bad = _load_rows(
        pred_ptr, img_ptr, w_ptr, ids_ptr, aff_ptr, b, rows, R, L, GW, P,
        s_pb, s_pr, s_pp, s_ib, s_ic, s_ih, s_iw, s_wb, s_wl, s_db, s_dk, eps,
        C, PH, PW, HAS_MASK, NORM, AFFINE, BLOCK_P)
    se = tl.sum(diff * diff, axis=1)
    se = tl.where(bad, float("nan"), se)
    slot = tl.program_id(0)  # = b * n_r + pid_r
    tl.store(part_ptr + slot, tl.sum(w * se, axis=0))
    if HAS_MASK:
        tl.store(wpart_ptr + slot, tl.sum(w, axis=0))


@triton.jit
def _masked_mse_loss_finalize_kernel(part_ptr, wpart_ptr, loss_ptr, denom_ptr, N, count, P,
                                     HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """One program: fixed-order sum of the partials; loss = total / denom.
    denom = P * sum(mask) (HAS_MASK) or count = B * M * P."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    wacc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, N, BLOCK):
        o = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + o, mask=o < N, other=0.0)
        if HAS_MASK:
            wacc += tl.load(wpart_ptr + o, mask=o < N, other=0.0)
    total = tl.sum(acc, axis=0)
    if HAS_MASK:
        denom = tl.sum(wacc, axis=0) * P
    else:
        denom = count
    tl.store(loss_ptr, (total / denom).to(loss_ptr.dtype.element_ty))
    tl.store(denom_ptr, denom)


@triton.jit
def _masked_mse_loss_bwd_kernel(
    gloss_ptr, denom_ptr, pred_ptr, img_ptr, w_ptr, ids_ptr, aff_ptr, gpred_ptr,
    R, L, GW, P,
    s_pb, s_pr, s_pp,
    s_ib, s_ic, s_ih, s_iw,
    s_wb, s_wl,
    s_db, s_dk,
    eps,
    C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_MASK: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """gpred[b, r, :] = 2 * gloss / denom * w_r * (pred - target); every element written
    (zeros for weight-0 rows). gpred is contiguous (B, R, P). Grid (B * cdiv(R, BLOCK_R),)."""
    b, pid_r = _batch_and_row_block(R, BLOCK_R)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    diff, w, row_ok, bad = _load_rows(
        pred_ptr, img_ptr, w_ptr, ids_ptr, aff_ptr, b, rows, R, L, GW, P,
        s_pb, s_pr, s_pp, s_ib, s_ic, s_ih, s_iw, s_wb, s_wl, s_db, s_dk, eps,
        C, PH, PW, HAS_MASK, NORM, AFFINE, BLOCK_P)
    coef = 2.0 * tl.load(gloss_ptr).to(tl.float32) / tl.load(denom_ptr)
    scale = tl.where(bad, float("nan"), coef * w)
    g = diff * scale[:, None]
    f = tl.arange(0, BLOCK_P)
    out = gpred_ptr + b * R * P + rows[:, None] * P + f[None, :]
    tl.store(out, g.to(gpred_ptr.dtype.element_ty), mask=row_ok[:, None] & (f < P)[None, :])


# ----------------------------------------------------------------------------- launchers

def _launch_args(pred, imgs, mask, ids, ph, pw, affine):
    B, C, H, W = imgs.shape
    gh, gw = H // ph, W // pw
    L, P = gh * gw, ph * pw * C
    R = pred.shape[1]
    if mask is not None:
        w_arg, s_w, ids_arg, s_d = mask, mask.stride(), pred, (0, 0)
    else:
        w_arg, s_w, ids_arg, s_d = pred, (0, 0), ids, ids.stride()
    block_r, block_p, num_warps = _block_config(P, R)
    return dict(B=B, C=C, L=L, P=P, R=R, gw=gw, w=w_arg, s_w=s_w, ids=ids_arg, s_d=s_d,
                affine=pred if affine is None else affine,
                block_r=block_r, block_p=block_p, num_warps=num_warps)


@on_tensor_device
def masked_mse_loss_fwd(pred, imgs, mask, ids, ph, pw, norm_pix=False, out_dtype=None, affine=None):
    """Returns (loss 0-dim in out_dtype (default pred.dtype), denom 0-dim fp32).
    Exactly one of mask (B, L) / ids (B, M) is given; affine ((2, C) fp32 scale, shift) normalises
    uint8 images per channel."""
    pred, imgs = within_int32(pred), within_int32(imgs)
    a = _launch_args(pred, imgs, mask, ids, ph, pw, affine)
    n_r = cdiv(a["R"], a["block_r"])
    n = n_r * a["B"]
    part = empty(n, device=pred.device, dtype=torch.float32)
    wpart = empty(n, device=pred.device, dtype=torch.float32) if mask is not None else part
    if n:  # (an empty batch leaves no partials: the loss is 0 / 0 = nan, as in the reference)
        _masked_mse_loss_fwd_kernel[(n,)](
            pred, imgs, a["w"], a["ids"], a["affine"], part, wpart, a["R"], a["L"], a["gw"], a["P"],
            *pred.stride(), *imgs.stride(), *a["s_w"], *a["s_d"], NORM_PIX_EPS,
            C=a["C"], PH=ph, PW=pw, HAS_MASK=mask is not None, NORM=bool(norm_pix), AFFINE=affine is not None,
            BLOCK_R=a["block_r"], BLOCK_P=a["block_p"], num_warps=a["num_warps"])
    loss = empty((), device=pred.device, dtype=out_dtype or pred.dtype)
    denom = empty((), device=pred.device, dtype=torch.float32)
    count = float(a["B"] * a["R"] * a["P"])
    _masked_mse_loss_finalize_kernel[(1,)](part, wpart, loss, denom, n, count, a["P"],
                                           HAS_MASK=mask is not None, BLOCK=1024, num_warps=4)
    return loss, denom


@on_tensor_device
def masked_mse_loss_bwd(grad_loss, denom, pred, imgs, mask, ids, ph, pw, norm_pix=False, affine=None):
    """Gradient w.r.t. pred, contiguous (B, R, P) in pred.dtype; one pass, targets recomputed."""
    pred, imgs = within_int32(pred), within_int32(imgs)
    a = _launch_args(pred, imgs, mask, ids, ph, pw, affine)
    gpred = empty(pred.shape, device=pred.device, dtype=pred.dtype)
    if gpred.numel() == 0:
        return gpred
    n_r = cdiv(a["R"], a["block_r"])
    _masked_mse_loss_bwd_kernel[(a["B"] * n_r,)](
        grad_loss, denom, pred, imgs, a["w"], a["ids"], a["affine"], gpred, a["R"], a["L"], a["gw"], a["P"],
        *pred.stride(), *imgs.stride(), *a["s_w"], *a["s_d"], NORM_PIX_EPS,
        C=a["C"], PH=ph, PW=pw, HAS_MASK=mask is not None, NORM=bool(norm_pix), AFFINE=affine is not None,
        BLOCK_R=a["block_r"], BLOCK_P=a["block_p"], num_warps=a["num_warps"])
    return gpred
