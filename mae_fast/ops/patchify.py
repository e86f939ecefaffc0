"""patchify, unpatchify and the fused patchify + gather (+ per-patch norm-pix) of MAE.

Ops (torch.library custom ops, each with a fake implementation; the first three with autograd):
  mae_fast::patchify(imgs, ph, pw)                             -> (B, L, P)
  mae_fast::unpatchify(x, ph, pw, H, W)                        -> (B, C, H, W)
  mae_fast::patchify_gather(imgs, ids, ph, pw, norm_pix, validate, affine?)  -> (B, K, P)
  mae_fast::patchify_gather_backward(grad, imgs, ids?, ph, pw, norm_pix) -> like imgs
with P = ph * pw * C, L = (H / ph) * (W / pw), features in (p, q, c) order (docs/design.md).
affine: for uint8 images, the (2, C) fp32 per-channel scale and shift (_common.pixel_affine) that
normalise the pixels as they are read; the rows are then fp32, and imgs gets no gradient.

Dispatch (mae_fast/ops/_common.py): the Triton kernels of mae_fast.kernels.patchify on CUDA, and on
CPU under TRITON_INTERPRET (but not for bfloat16); a vectorised PyTorch fallback otherwise and always
for float64. Eager calls whose kernels run skip torch.library's dispatch (_common.run_eagerly).

Validation: shapes, dtypes and devices are checked in the public functions (no tensor values, so
torch.compile traces them without graph breaks). Index ranges are value checks: on CPU they always
run, eagerly, inside the op before any kernel; on CUDA only with validate=True (a host sync).
Without it, out-of-range ids still never touch memory outside the tensors: the forward writes
NaN rows for them and the backward drops them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import (NORM_PIX_EPS, affine_rows_torch, backward_op, check_floating_point, check_ids,
                      check_ids_values, check_imgs, check_norm_pix, compute_dtype, eager_function, eager_impl,
                      gather_rows, normalize_rows, pair_arg, pixel_affine, refuse_double_backward, run_eagerly,
                      triton_kernels)


# ----------------------------------------------------------------------------- PyTorch fallback

def _patches_view(imgs: Tensor, ph: int, pw: int) -> Tensor:
    """(B, C, H, W) -> (B, gh, gw, ph, pw, C) view-or-copy of the patches."""
    B, C, H, W = imgs.shape
    return imgs.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 3, 5, 1)


def patchify_torch(imgs: Tensor, ph: int, pw: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Fallback patchify: a new contiguous (B, L, P) tensor (never a view of imgs)."""
    B, C, H, W = imgs.shape
    out = torch.empty((B, H // ph, W // pw, ph, pw, C), dtype=dtype or imgs.dtype, device=imgs.device)
    out.copy_(_patches_view(imgs, ph, pw))
    return out.reshape(B, (H // ph) * (W // pw), ph * pw * C)


def unpatchify_into(x: Tensor, ph: int, pw: int, out: Tensor) -> Tensor:
    """Fallback unpatchify: writes rows x (B, L, P) into out (B, C, H, W) (any strides)."""
    B, C, H, W = out.shape
    src = x.reshape(B, H // ph, W // pw, ph, pw, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
    return out.copy_(src)


def norm_pix_torch(x: Tensor, eps: float = NORM_PIX_EPS) -> Tensor:
    """(x - mean) / sqrt(var + eps), unbiased var over the last dim (the kernels' steps, finite for
    any finite row: _common.normalize_rows)."""
    return normalize_rows(x, 1, eps)[0]


def norm_pix_backward_torch(g: Tensor, x: Tensor, eps: float = NORM_PIX_EPS) -> Tensor:
    """Gradient w.r.t. x of y = (x - mean) / sqrt(var + eps), var unbiased over the last dim:
    dx = rstd * (g - mean(g) - y * sum(g * y) / (P - 1))."""
    P = x.shape[-1]
    y, _, rstd = normalize_rows(x, 1, eps)
    return rstd * (g - g.mean(dim=-1, keepdim=True) - y * (g * y).sum(dim=-1, keepdim=True) / (P - 1))


def patchify_gather_torch(imgs: Tensor, ids: Tensor, ph: int, pw: int, norm_pix: bool,
                          affine: Optional[Tensor] = None) -> Tensor:
    """Fallback forward: computes in fp32 (fp64 for fp64), returns imgs.dtype (fp32 for uint8
    images, normalised with affine)."""
    cd = compute_dtype(imgs.dtype)
    # uint8 pixels are gathered before they are widened: no float copy of the whole image
    rows = gather_rows(patchify_torch(imgs, ph, pw, None if affine is not None else cd), ids).to(cd)
    rows = affine_rows_torch(rows, affine, ph, pw)
    if norm_pix:
        rows = norm_pix_torch(rows)
    return rows.to(cd if affine is not None else imgs.dtype)


def patchify_gather_backward_torch(grad: Tensor, imgs: Tensor, ids: Optional[Tensor], ph: int, pw: int,
                                   norm_pix: bool) -> Tensor:
    """Fallback backward: image gradient (like imgs: same shape, dtype and strides)."""
    cd = compute_dtype(imgs.dtype)
    g = grad.to(cd)
    B, C, H, W = imgs.shape
    L = (H // ph) * (W // pw)
    if norm_pix:
        x = patchify_torch(imgs, ph, pw, cd)
        g = norm_pix_backward_torch(g, x if ids is None else gather_rows(x, ids))
    if ids is not None:
        g = torch.zeros((B, L, g.shape[-1]), dtype=cd, device=g.device).scatter_add_(
            1, ids.long().unsqueeze(-1).expand(-1, -1, g.shape[-1]), g)
    return unpatchify_into(g, ph, pw, torch.empty_like(imgs))


# ----------------------------------------------------------------------------- custom ops

def _eager(t: Tensor) -> bool:
    """Whether a call on t skips torch.library's dispatch (_common.run_eagerly): its kernels run."""
    return run_eagerly() and triton_kernels("patchify", t) is not None


@eager_impl("patchify")
def _patchify_impl(imgs, ph, pw):
    k = triton_kernels("patchify", imgs)
    if k is not None:
        return k.patchify_fwd(imgs, ph, pw)
    return patchify_torch(imgs, ph, pw)


@torch.library.custom_op("mae_fast::patchify", mutates_args=())
def _patchify_op(imgs: Tensor, ph: int, pw: int) -> Tensor:
    return _patchify_impl(imgs, ph, pw)


@_patchify_op.register_fake
def _(imgs, ph, pw):
    B, C, H, W = imgs.shape
    return imgs.new_empty((B, (H // ph) * (W // pw), ph * pw * C))


def _patchify_setup(ctx, inputs, output):
    _, ctx.ph, ctx.pw = inputs
    ctx.image_size = tuple(inputs[0].shape[2:])


def _patchify_backward(ctx, grad):
    return backward_op(ctx, "unpatchify")(grad, ctx.ph, ctx.pw, *ctx.image_size), None, None


_patchify_op.register_autograd(_patchify_backward, setup_context=_patchify_setup)


@eager_impl("unpatchify")
def _unpatchify_impl(x, ph, pw, H, W):
    k = triton_kernels("patchify", x)
    if k is not None:
        return k.unpatchify_fwd(x, ph, pw, H, W)
    B, L, P = x.shape
    return unpatchify_into(x, ph, pw, x.new_empty((B, P // (ph * pw), H, W)))


@torch.library.custom_op("mae_fast::unpatchify", mutates_args=())
def _unpatchify_op(x: Tensor, ph: int, pw: int, H: int, W: int) -> Tensor:
    return _unpatchify_impl(x, ph, pw, H, W)


@_unpatchify_op.register_fake
def _(x, ph, pw, H, W):
    B, L, P = x.shape
    return x.new_empty((B, P // (ph * pw), H, W))


def _unpatchify_setup(ctx, inputs, output):
    _, ctx.ph, ctx.pw, _, _ = inputs


def _unpatchify_backward(ctx, grad):
    return backward_op(ctx, "patchify")(grad, ctx.ph, ctx.pw), None, None, None, None


_unpatchify_op.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup)


@eager_impl("patchify_gather")
def _patchify_gather_impl(imgs, ids, ph, pw, norm_pix, validate, affine=None):
    check_ids_values(ids, (imgs.shape[2] // ph) * (imgs.shape[3] // pw), validate)
    k = triton_kernels("patchify", imgs)
    if k is not None:
        return k.patchify_gather_fwd(imgs, ids, ph, pw, norm_pix, affine=affine)
    return patchify_gather_torch(imgs, ids, ph, pw, norm_pix, affine)


@torch.library.custom_op("mae_fast::patchify_gather", mutates_args=())
def _patchify_gather_op(imgs: Tensor, ids: Tensor, ph: int, pw: int, norm_pix: bool, validate: bool,
                        affine: Optional[Tensor] = None) -> Tensor:
    return _patchify_gather_impl(imgs, ids, ph, pw, norm_pix, validate, affine)


@_patchify_gather_op.register_fake
def _(imgs, ids, ph, pw, norm_pix, validate, affine=None):
    B, C, H, W = imgs.shape
    dtype = torch.float32 if affine is not None else imgs.dtype
    return imgs.new_empty((B, ids.shape[1], ph * pw * C), dtype=dtype)


def _patchify_gather_setup(ctx, inputs, output):
    imgs, ids, ctx.ph, ctx.pw, ctx.norm_pix = inputs[:5]
    ctx.save_for_backward(imgs, ids)


def _patchify_gather_backward(ctx, grad):
    imgs, ids = ctx.saved_tensors
    gi = None
    if ctx.needs_input_grad[0]:  # never for uint8 images
        gi = backward_op(ctx, "patchify_gather_backward")(grad, imgs, ids, ctx.ph, ctx.pw, ctx.norm_pix)
    return gi, None, None, None, None, None, None


_patchify_gather_op.register_autograd(_patchify_gather_backward, setup_context=_patchify_gather_setup)


def inverse_ids(ids: Tensor, L: int) -> Tensor:
    """(B, K) patch ids -> (B, L) int32: inv[b, ids[b, k]] = k, -1 for patches not in ids.
    Out-of-range ids are dropped (they land in spare columns that are cut off)."""
    B, K = ids.shape
    inv = torch.full((B, L + 2), -1, dtype=torch.int32, device=ids.device)
    # column 1 + l is patch l: ids clamped to [-1, L] and shifted by one put out-of-range ones in 0 or L + 1
    idx = (ids.clamp(-1, L) + 1).long()
    src = torch.arange(K, dtype=torch.int32, device=ids.device).expand(B, K)
    return inv.scatter_(1, idx, src)[:, 1:L + 1]


@eager_impl("patchify_gather_backward")
def _patchify_gather_backward_impl(grad, imgs, ids, ph, pw, norm_pix):
    k = triton_kernels("patchify", imgs, grad)
    if k is not None:
        L = (imgs.shape[2] // ph) * (imgs.shape[3] // pw)
        inv = None if ids is None else inverse_ids(ids, L)
        return k.patchify_gather_bwd(grad, imgs, inv, ph, pw, norm_pix)
    return patchify_gather_backward_torch(grad, imgs, ids, ph, pw, norm_pix)


@torch.library.custom_op("mae_fast::patchify_gather_backward", mutates_args=())
def _patchify_gather_backward_op(grad: Tensor, imgs: Tensor, ids: Optional[Tensor], ph: int, pw: int,
                                 norm_pix: bool) -> Tensor:
    """Image gradient of patchify_gather (ids given, rows (B, K, P)) or of patchify + norm-pix
    (ids None, rows (B, L, P)). Requires ids distinct within a row (Triton path)."""
    return _patchify_gather_backward_impl(grad, imgs, ids, ph, pw, norm_pix)


@_patchify_gather_backward_op.register_fake
def _(grad, imgs, ids, ph, pw, norm_pix):
    return torch.empty_like(imgs)


refuse_double_backward("patchify_gather_backward", "mae_fast.ops.patchify_gather (and of masked_mse_loss "
                       "with respect to imgs)")

_PatchifyEager = eager_function("patchify", _patchify_setup, _patchify_backward)
_UnpatchifyEager = eager_function("unpatchify", _unpatchify_setup, _unpatchify_backward)
_PatchifyGatherEager = eager_function("patchify_gather", _patchify_gather_setup, _patchify_gather_backward)


# ----------------------------------------------------------------------------- public API

def patchify(imgs: Tensor, patch_size) -> Tensor:
    """(B, C, H, W) -> (B, L, ph*pw*C): patch i*gw + j, features in (p, q, c) order.

    patch_size: int or (ph, pw). Differentiable (its backward is unpatchify)."""
    ph, pw = check_imgs(imgs, patch_size)
    op = _PatchifyEager.apply if _eager(imgs) else torch.ops.mae_fast.patchify
    return op(imgs, ph, pw)


def unpatchify(x: Tensor, patch_size, image_size) -> Tensor:
    """(B, L, ph*pw*C) -> (B, C, H, W), the inverse of patchify; image_size = (H, W) or an int.
    Differentiable (its backward is patchify). The result is contiguous."""
    ph, pw = pair_arg(patch_size, "patch_size")
    H, W = pair_arg(image_size, "image_size")
    check_floating_point(x, "x")
    if H % ph or W % pw:
        raise ValueError(f"image_size {(H, W)} must be multiples of patch_size {(ph, pw)}")
    L = (H // ph) * (W // pw)
    if x.dim() != 3 or x.shape[1] != L or x.shape[2] % (ph * pw) or x.shape[2] == 0:
        raise ValueError(f"x must have shape (B, L={L}, ph*pw*C) with ph*pw={ph * pw}, got {tuple(x.shape)}")
    op = _UnpatchifyEager.apply if _eager(x) else torch.ops.mae_fast.unpatchify
    return op(x, ph, pw, H, W)


def patchify_gather(imgs: Tensor, ids: Tensor, patch_size, *, norm_pix: bool = False,
                    validate: bool = False, mean=None, std=None) -> Tensor:
    """Fused patchify + gather (+ per-patch normalisation): (B, K, ph*pw*C).

    Row k of image b is patch ids[b, k] of imgs[b] ((p, q, c) features). With norm_pix each row
    is (x - mean) / sqrt(var + 1e-6), mean and unbiased var over the row (the official
    norm_pix_loss target). The image is read once, in its own strides (channels_last, sliced,
    ... inputs are not copied); arithmetic in fp32; the result has imgs.dtype.

    uint8 imgs (8-bit pixels) are normalised per channel as they are read, x = (u8 / 255 - mean[c])
    / std[c] (mean and std: C floats, default ImageNet's), before norm-pix; the result is fp32 and
    no float copy of the image is made. They get no gradient. mean and std apply to uint8 images
    only: float images are taken as normalised already (passing mean or std with them is an error).

    ids: (B, K) int32/int64 with 1 <= K <= L (an empty selection, K = 0, is refused, as by
    gather_tokens and unshuffle_tokens), values in [0, L), DISTINCT within a row (a subset of a
    permutation, as in every MAE; the backward relies on it). CPU ids are checked eagerly;
    CUDA ids only with validate=True (a host sync). Unvalidated out-of-range ids on CUDA give NaN
    rows, never stray memory accesses; unvalidated repeated ids on CUDA give a correct forward but
    a backward that keeps the gradient of only one of the repeats. Backward gives the image
    gradient (row gradients scattered back, through norm-pix); a gradient of that gradient is not
    supported (NotImplementedError). Norm-pix rows are finite for any finite patch, however large.
    """
    ph, pw = check_imgs(imgs, patch_size, uint8=True)
    L = (imgs.shape[2] // ph) * (imgs.shape[3] // pw)
    check_ids(ids, imgs, L)
    check_norm_pix(norm_pix, ph * pw * imgs.shape[1])
    affine = pixel_affine(imgs, mean, std)
    op = _PatchifyGatherEager.apply if _eager(imgs) else torch.ops.mae_fast.patchify_gather
    return op(imgs, ids, ph, pw, bool(norm_pix), bool(validate), affine)


__all__ = ["patchify", "unpatchify", "patchify_gather"]
