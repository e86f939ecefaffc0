"""The masked-only MSE loss of MAE, with targets cut from the image on the fly.

Ops (torch.library custom ops with fake implementations):
  mae_fast::masked_mse_loss(pred, imgs, mask?, ids?, ph, pw, norm_pix, validate, affine?) -> (loss, denom)
      with autograd (pred gradient; image gradient too when imgs requires grad)
  mae_fast::masked_mse_loss_backward(grad, pred, imgs, mask?, ids?, denom, ph, pw, norm_pix, affine?) -> grad_pred

denom is the fp32 normaliser (P * mask.sum() or B * M * P), returned so the backward needs no
second reduction. affine: for uint8 images, the per-channel scale and shift that normalise the
pixels as the targets are cut (_common.pixel_affine), as in patchify_gather. Dispatch as every
Triton op (mae_fast/ops/_common.py): Triton on CUDA, Triton interpreted on CPU with TRITON_INTERPRET
on, a vectorised PyTorch fallback otherwise (and always for float64, and on CPU for bfloat16). Eager
calls whose kernels run skip torch.library's dispatch (_common.run_eagerly).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import (FLOAT_DTYPES, FLOAT_NAMES, affine_rows_torch, backward_op, check_device, check_floating_point,
                      check_ids, check_ids_values, check_imgs, check_norm_pix, check_tensor, checks_values,
                      compute_dtype, eager_function, eager_impl, gather_rows, pixel_affine, refuse_double_backward,
                      run_eagerly, triton_kernels)
from .patchify import norm_pix_torch, patchify_torch


def _loss_dtype(pred: Tensor, imgs: Tensor, mask: Optional[Tensor]) -> torch.dtype:
    """The dtype the eager reference returns: pred, imgs (and mask) promoted; uint8 images count as
    the float32 images they are normalised to (so an fp16 pred still gets an fp32 loss)."""
    dt = torch.promote_types(pred.dtype, torch.float32 if imgs.dtype == torch.uint8 else imgs.dtype)
    return torch.promote_types(dt, mask.dtype) if mask is not None else dt


def _check_mask_values(mask: Tensor, validate: bool) -> None:
    if not checks_values(mask, validate):
        return
    if not bool(torch.isfinite(mask).all()):
        raise ValueError("mask must be finite (1 = removed, 0 = kept); got NaN or inf")
    if bool((mask < 0).any()):
        raise ValueError("mask must be non-negative (weights >= 0; 1 = removed, 0 = kept)")
    if not bool((mask != 0).any()):
        raise ValueError("mask must mark at least one removed patch (1 = removed); got an all-zero mask, "
                         "the loss would be 0 / 0")


# ----------------------------------------------------------------------------- PyTorch fallback

def _targets_torch(imgs, mask, ids, ph, pw, norm_pix, cd, affine):
    t = patchify_torch(imgs, ph, pw, cd)
    if ids is not None:
        t = gather_rows(t, ids)
    t = affine_rows_torch(t, affine, ph, pw)
    return norm_pix_torch(t) if norm_pix else t


def masked_mse_loss_torch(pred, imgs, mask, ids, ph, pw, norm_pix, affine=None):
    """Fallback forward in fp32 (fp64 for fp64): returns (loss, denom)."""
    cd = compute_dtype(torch.promote_types(pred.dtype, imgs.dtype))
    d = pred.to(cd) - _targets_torch(imgs, mask, ids, ph, pw, norm_pix, cd, affine)
    se = (d * d).sum(dim=-1)
    P = pred.shape[-1]
    if mask is not None:
        w = mask.to(cd)
        denom = w.sum() * P
        total = torch.where(w != 0, se * w, 0).sum()  # kept rows are not read: 0, even where se is NaN
    else:
        denom = se.new_full((), float(se.numel() * P))  # a fill kernel: torch.tensor would copy from the host
        total = se.sum()
    return (total / denom).to(_loss_dtype(pred, imgs, mask)), denom.to(torch.float32)


def masked_mse_loss_backward_torch(grad, pred, imgs, mask, ids, denom, ph, pw, norm_pix, affine=None):
    cd = compute_dtype(torch.promote_types(pred.dtype, imgs.dtype))
    d = pred.to(cd) - _targets_torch(imgs, mask, ids, ph, pw, norm_pix, cd, affine)
    coef = 2 * grad.to(cd) / denom.to(cd)
    if mask is None:
        return (coef * d).to(pred.dtype).contiguous()
    w = mask.to(cd).unsqueeze(-1)
    return torch.where(w != 0, coef * w * d, 0).to(pred.dtype).contiguous()  # kept rows are not read: 0


# ----------------------------------------------------------------------------- custom ops

def _kernels(pred: Tensor, imgs: Tensor, *also):
    """The kernel module for a loss of pred against imgs, or None for the fallback (float64 images too)."""
    k = triton_kernels("masked_mse_loss", pred, imgs, *also)
    return k if k is not None and imgs.dtype != torch.float64 else None


@eager_impl("masked_mse_loss")
def _masked_mse_loss_impl(pred, imgs, mask, ids, ph, pw, norm_pix, validate, affine=None):
    if mask is not None:
        _check_mask_values(mask, validate)
    else:
        check_ids_values(ids, (imgs.shape[2] // ph) * (imgs.shape[3] // pw), validate)
    loss_dtype = _loss_dtype(pred, imgs, mask)
    k = _kernels(pred, imgs, mask, loss_dtype)
    if k is not None:
        return k.masked_mse_loss_fwd(pred, imgs, mask, ids, ph, pw, norm_pix, loss_dtype, affine)
    return masked_mse_loss_torch(pred, imgs, mask, ids, ph, pw, norm_pix, affine)


@torch.library.custom_op("mae_fast::masked_mse_loss", mutates_args=())
def _masked_mse_loss_op(pred: Tensor, imgs: Tensor, mask: Optional[Tensor], ids: Optional[Tensor],
                        ph: int, pw: int, norm_pix: bool, validate: bool,
                        affine: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _masked_mse_loss_impl(pred, imgs, mask, ids, ph, pw, norm_pix, validate, affine)


@_masked_mse_loss_op.register_fake
def _(pred, imgs, mask, ids, ph, pw, norm_pix, validate, affine=None):
    return (pred.new_empty((), dtype=_loss_dtype(pred, imgs, mask)),
            pred.new_empty((), dtype=torch.float32))


@eager_impl("masked_mse_loss_backward")
def _masked_mse_loss_backward_impl(grad, pred, imgs, mask, ids, denom, ph, pw, norm_pix, affine=None):
    k = _kernels(pred, imgs, mask, grad)
    if k is not None:
        return k.masked_mse_loss_bwd(grad, denom, pred, imgs, mask, ids, ph, pw, norm_pix, affine)
    return masked_mse_loss_backward_torch(grad, pred, imgs, mask, ids, denom, ph, pw, norm_pix, affine)


@torch.library.custom_op("mae_fast::masked_mse_loss_backward", mutates_args=())
def _masked_mse_loss_backward_op(grad: Tensor, pred: Tensor, imgs: Tensor, mask: Optional[Tensor],
                                 ids: Optional[Tensor], denom: Tensor, ph: int, pw: int,
                                 norm_pix: bool, affine: Optional[Tensor] = None) -> Tensor:
    return _masked_mse_loss_backward_impl(grad, pred, imgs, mask, ids, denom, ph, pw, norm_pix, affine)


@_masked_mse_loss_backward_op.register_fake
def _(grad, pred, imgs, mask, ids, denom, ph, pw, norm_pix, affine=None):
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)


refuse_double_backward("masked_mse_loss_backward", "mae_fast.ops.masked_mse_loss")


def _setup(ctx, inputs, output):
    pred, imgs, mask, ids, ctx.ph, ctx.pw, ctx.norm_pix, _ = inputs[:8]
    affine = inputs[8] if len(inputs) > 8 else None
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros are made for denom's (unused) gradient
    ctx.save_for_backward(pred, imgs, mask, ids, output[1], affine)


def _backward(ctx, grad, _grad_denom):
    if grad is None:  # no gradient reached the loss (grads are not materialised as zeros)
        return (None,) * 9
    pred, imgs, mask, ids, denom, affine = ctx.saved_tensors
    gp = gi = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        gp = backward_op(ctx, "masked_mse_loss_backward")(grad, pred, imgs, mask, ids, denom,
                                                          ctx.ph, ctx.pw, ctx.norm_pix, affine)
    if ctx.needs_input_grad[1]:  # float images only (uint8 ones carry no gradient)
        # d loss / d target rows = -gp; back to image layout (through norm-pix) like patchify_gather.
        gi = backward_op(ctx, "patchify_gather_backward")(-gp.to(imgs.dtype), imgs, ids, ctx.ph, ctx.pw,
                                                          ctx.norm_pix)
    return (gp if ctx.needs_input_grad[0] else None), gi, None, None, None, None, None, None, None


_masked_mse_loss_op.register_autograd(_backward, setup_context=_setup)
_MaskedMSELossEager = eager_function("masked_mse_loss", _setup, _backward)


# ----------------------------------------------------------------------------- public API

def _check_args(pred, imgs, patch_size, mask, ids, norm_pix):
    """The public function's argument checks; returns (ph, pw, mask as a float tensor or None)."""
    ph, pw = check_imgs(imgs, patch_size, uint8=True)
    B, C, H, W = imgs.shape
    L, P = (H // ph) * (W // pw), ph * pw * C
    check_floating_point(pred, "pred")
    if pred.dim() != 3:
        raise ValueError(f"pred must be 3-D (B, rows, P), got shape {tuple(pred.shape)}")
    if pred.shape[2] != P:
        raise ValueError(f"pred's last dim must be ph*pw*C = {ph}*{pw}*{C} = {P}, got {pred.shape[2]}")
    check_device(pred, "pred", imgs, "imgs")
    check_norm_pix(norm_pix, P)
    if B == 0:
        raise ValueError("imgs has an empty batch (B=0): the loss would be 0 / 0")
    if (mask is None) == (ids is None):
        raise ValueError("pass exactly one of mask= (official loss) or ids= (vit-pytorch loss), got "
                         + ("both" if mask is not None else "neither"))
    if mask is not None:
        check_tensor(mask, "mask")
        if mask.dtype not in (*FLOAT_DTYPES, torch.bool):
            raise TypeError(f"mask must be a float ({FLOAT_NAMES}) or bool tensor, 1 = removed, got {mask.dtype}")
        if tuple(mask.shape) != (B, L):
            raise ValueError(f"mask must have shape (B={B}, L={L}), got {tuple(mask.shape)}")
        check_device(mask, "mask", imgs, "imgs")
        if tuple(pred.shape[:2]) != (B, L):
            raise ValueError(f"with mask, pred must have shape (B={B}, L={L}, P={P}), got {tuple(pred.shape)}")
        if mask.dtype == torch.bool:
            mask = mask.to(torch.promote_types(pred.dtype, imgs.dtype))
    else:
        check_ids(ids, imgs, L)
        if tuple(pred.shape[:2]) != (B, ids.shape[1]):
            raise ValueError(f"with ids, pred must have shape (B={B}, M={ids.shape[1]}, P={P}), "
                             f"got {tuple(pred.shape)}")
    return ph, pw, mask


def masked_mse_loss(pred: Tensor, imgs: Tensor, patch_size, *, mask: Optional[Tensor] = None,
                    ids: Optional[Tensor] = None, norm_pix: bool = False, validate: bool = False,
                    mean=None, std=None) -> Tensor:
    """MAE reconstruction loss over the removed patches only; targets computed from imgs on the fly.

    Pass exactly one of
      mask (B, L) float (or bool), 1 = removed, with pred (B, L, P): the official loss
          sum_{b,l} mask * mean_f (pred - t)^2 / mask.sum()
      ids (B, M) int32/int64 removed patch indices, with pred (B, M, P): the vit-pytorch loss
          F.mse_loss(pred, target rows ids)
    where P = ph*pw*C, t = patchify(imgs) ((p, q, c) order), and with norm_pix each target row is
    (t - mean) / sqrt(var + 1e-6), unbiased var (norm_pix_loss), finite for any finite patch
    however large (where the reference's fp32 variance overflows). No (B, L, P) target tensor is
    made; arithmetic is fp32; the reduction is deterministic (no float atomics) and syncs nothing.
    The result has the dtype the eager reference gives (pred, imgs and mask dtypes promoted).

    uint8 imgs (8-bit pixels) are normalised per channel as the targets are cut, t = (u8 / 255 -
    mean[c]) / std[c] (mean and std: C floats, default ImageNet's), before norm-pix, as in
    patchify_gather; they get no gradient. mean and std apply to uint8 images only.

    Backward: the pred gradient in one fused pass that recomputes the targets (and, if imgs
    requires grad, the image gradient). mask is a constant (no gradient); ids as in patchify_gather.
    A gradient of the gradient (double backward) is not supported: NotImplementedError.

    Value checks (CPU inputs: always; CUDA: only with validate=True, which syncs the host): ids in
    [0, L) and distinct per row; mask finite, non-negative and not all zero. An all-zero mask on
    CUDA without validate gives nan (0 / 0), like the reference; out-of-range ids give nan.
    Kept rows (mask 0) are never read, by the kernels and the fallback alike: non-finite pred or
    image values there reach neither the loss nor pred's gradient, which is 0 on them (the
    reference would propagate a NaN through 0 * NaN). With ids, patches not in ids are not read
    either. (imgs' own gradient, where asked for with mask and norm_pix, is non-finite on a
    non-finite patch, kept or not: every patch's normalisation is differentiated.)
    """
    ph, pw, mask = _check_args(pred, imgs, patch_size, mask, ids, norm_pix)
    affine = pixel_affine(imgs, mean, std)
    eager = run_eagerly() and _kernels(pred, imgs, mask) is not None
    op = _MaskedMSELossEager.apply if eager else torch.ops.mae_fast.masked_mse_loss
    loss, _ = op(pred, imgs, mask, ids, ph, pw, bool(norm_pix), bool(validate), affine)
    return loss


__all__ = ["masked_mse_loss"]
