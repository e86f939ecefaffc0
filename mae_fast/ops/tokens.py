"""Token shuffle and unshuffle: the gather of the visible tokens and the decoder-input scatter.

Public functions::

    gather_tokens(x, ids, *, validate=False)           # (B, K, D): out[b, k] = x[b, ids[b, k]]
    unshuffle_tokens(visible, ids_keep, num_patches, mask_token, pos=None, *, num_prefix=0,
                     validate=False)                    # (B, num_prefix + num_patches, D)

They run four low-level ops declared here (schemas in Python, as torchao does; the compiled
extension mae_fast._C only registers CPU and CUDA kernels for them, csrc/tokens_*):

    mae_fast::tokens_gather(x, ids, validate)               out[b, k] = x[b, ids[b, k]]
    mae_fast::tokens_invert(ids, num_rows, validate)        inv (B, num_rows) int32: inv[b, ids[b, k]] = k, else -1
    mae_fast::tokens_unshuffle(visible, inv, mask_token?, pos?, num_prefix)
    mae_fast::tokens_unshuffle_bwd(grad_out, inv, num_prefix, num_keep, need_mask, need_pos)
        -> (grad_visible, grad_mask_token (D) or (0,), grad_pos (num_prefix + N, D) or (0, D)),
           the two sums in float32 (float64 for float64 grads)

The unshuffle writes every output row once (a pull through inv: no zeros tensor, no scatter), and
its backward is one pass over grad_out: the gather of the visible rows, the batch sum for pos and
the sum of the removed rows for mask_token, in a fixed order (bit-identical run to run; no float
atomics). gather_tokens' backward is the unshuffle of the gradient with a zero mask token.

Indices must be in range and unique per row (they are a prefix of a permutation in MAE). CPU
kernels always check and raise IndexError / ValueError naming the argument; CUDA kernels check in
the kernel (a device-side assert: loud, but it poisons the CUDA context), and validate=True checks
on the host first (one synchronisation). On CUDA, gather_tokens' forward checks the range only; a
duplicate is caught by its backward. The PyTorch fallback below checks CUDA indices only with
validate=True (the checks would synchronise): without it, a duplicate loses a row silently.

Eager calls (not under torch.compile) call these ops below their Python autograd kernels, inside
autograd.Functions of their own (mae_fast/ops/_common.py, "eager calls"): the same kernels and
backwards, less host time per call.

Without the compiled extension (MAE_FAST_BUILD_EXT=none, a failed build, a CPU-only build for
CUDA tensors) the same low-level ops run a vectorised PyTorch fallback registered below; `python -m
mae_fast.info` says why the extension is missing.
"""
from __future__ import annotations

import torch

from ._common import (INDEX_DTYPES, backward_op, below_autograd, check_device, check_float, check_tensor, compute_dtype,
                      eager_function, eager_impl, gather_rows, has_kernel, int_arg, run_eagerly)

__all__ = ["gather_tokens", "unshuffle_tokens"]

_lib = torch.library.Library("mae_fast", "FRAGMENT")  # kept alive: it owns the registrations
_lib.define("tokens_gather(Tensor x, Tensor ids, bool validate=False) -> Tensor")
_lib.define("tokens_invert(Tensor ids, SymInt num_rows, bool validate=False) -> Tensor")
_lib.define("tokens_unshuffle(Tensor visible, Tensor inv, Tensor? mask_token, Tensor? pos, int num_prefix) -> Tensor")
_lib.define("tokens_unshuffle_bwd(Tensor grad_out, Tensor inv, int num_prefix, SymInt num_keep, bool need_mask, "
            "bool need_pos) -> (Tensor, Tensor, Tensor)")

OPS = ("tokens_gather", "tokens_invert", "tokens_unshuffle", "tokens_unshuffle_bwd")


# ----------------------------------------------------------------------------- PyTorch fallback

def _check_ids_data(ids: torch.Tensor, num_rows: int, name: str) -> None:
    """Range and per-row uniqueness of index data, the errors of the C++ kernels (syncs on CUDA)."""
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= num_rows)
    if bool(bad.any()):
        b, k = (int(v) for v in bad.nonzero()[0])
        raise IndexError(f"{name}[{b}, {k}] = {int(ids[b, k])} is out of range: indices must be in [0, {num_rows})")
    srt = ids.sort(dim=1).values
    dup = srt[:, 1:] == srt[:, :-1]
    if bool(dup.any()):
        b, k = (int(v) for v in dup.nonzero()[0])
        raise ValueError(f"{name} row {b} holds {int(srt[b, k])} twice: indices must be unique per row")


def _gather_fallback(x, ids, validate=False):
    if validate or x.device.type == "cpu":
        _check_ids_data(ids, x.shape[1], "ids")
    return gather_rows(x, ids)


def _invert_fallback(ids, num_rows, validate=False):
    if validate or ids.device.type == "cpu":
        _check_ids_data(ids, num_rows, "ids_keep")
    B, K = ids.shape
    inv = torch.full((B, num_rows), -1, dtype=torch.int32, device=ids.device)
    ks = torch.arange(K, dtype=torch.int32, device=ids.device).expand(B, K)
    return inv.scatter_(1, ids.long(), ks)


def _unshuffle_fallback(visible, inv, mask_token, pos, num_prefix):
    B, _, D = visible.shape
    P, acc = num_prefix, compute_dtype(visible.dtype)
    K = visible.shape[1] - P
    fill = visible.new_zeros(D, dtype=acc) if mask_token is None else mask_token.reshape(D).to(acc)
    # Row K of `rows` is the mask token: removed slots (inv = -1) pull it.
    rows = torch.cat([visible[:, P:].to(acc), fill.expand(B, 1, D)], dim=1)
    idx = torch.where(inv >= 0, inv, K).long()
    body = torch.gather(rows, 1, idx.unsqueeze(-1).expand(-1, -1, D))
    out = torch.cat([visible[:, :P].to(acc), body], dim=1)
    if pos is not None:
        out = out + pos.to(acc)
    return out.to(visible.dtype)


def _unshuffle_bwd_fallback(grad_out, inv, num_prefix, num_keep, need_mask, need_pos):
    B, S, D = grad_out.shape
    P, K, acc = num_prefix, num_keep, compute_dtype(grad_out.dtype)
    body = grad_out[:, P:]
    kept = inv >= 0
    # Slots of the visible rows k = 0..K-1, in k order (removed slots sort last).
    slots = torch.argsort(torch.where(kept, inv, K), dim=1, stable=True)[:, :K]
    gvis = torch.cat([grad_out[:, :P], torch.gather(body, 1, slots.unsqueeze(-1).expand(-1, -1, D))], dim=1)
    if need_mask:
        gmask = torch.where(kept.unsqueeze(-1), 0, body.to(acc)).sum(dim=(0, 1))
    else:
        gmask = grad_out.new_empty(0, dtype=acc)
    gpos = grad_out.to(acc).sum(0) if need_pos else grad_out.new_empty(0, D, dtype=acc)
    return gvis.contiguous(), gmask, gpos


FALLBACKS = {
    "tokens_gather": _gather_fallback,
    "tokens_invert": _invert_fallback,
    "tokens_unshuffle": _unshuffle_fallback,
    "tokens_unshuffle_bwd": _unshuffle_bwd_fallback,
}

for _op, _fn in FALLBACKS.items():
    for _device, _key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if not has_kernel(_op, _device):
            _lib.impl(_op, _fn, _key)


# ----------------------------------------------------------------------------- fake (meta) kernels

@torch.library.register_fake("mae_fast::tokens_gather")
def _gather_fake(x, ids, validate=False):
    return x.new_empty(ids.shape[0], ids.shape[1], x.shape[2])


@torch.library.register_fake("mae_fast::tokens_invert")
def _invert_fake(ids, num_rows, validate=False):
    return ids.new_empty(ids.shape[0], num_rows, dtype=torch.int32)


@torch.library.register_fake("mae_fast::tokens_unshuffle")
def _unshuffle_fake(visible, inv, mask_token, pos, num_prefix):
    return visible.new_empty(visible.shape[0], num_prefix + inv.shape[1], visible.shape[2])


@torch.library.register_fake("mae_fast::tokens_unshuffle_bwd")
def _unshuffle_bwd_fake(grad_out, inv, num_prefix, num_keep, need_mask, need_pos):
    B, S, D = grad_out.shape
    acc = compute_dtype(grad_out.dtype)
    return (grad_out.new_empty(B, num_prefix + num_keep, D),
            grad_out.new_empty(D if need_mask else 0, dtype=acc),
            grad_out.new_empty(S if need_pos else 0, D, dtype=acc))


# ----------------------------------------------------------------------------- autograd

def _gather_setup(ctx, inputs, output):
    x, ids, _ = inputs
    ctx.save_for_backward(ids)
    ctx.num_rows = x.shape[1]


def _gather_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    inv = backward_op(ctx, "tokens_invert")(ids, ctx.num_rows, False)
    return backward_op(ctx, "tokens_unshuffle")(grad, inv, None, None, 0), None, None


def _unshuffle_setup(ctx, inputs, output):
    visible, inv, mask_token, pos, num_prefix = inputs
    ctx.save_for_backward(inv)
    ctx.num_prefix = num_prefix
    ctx.num_keep = visible.shape[1] - num_prefix
    ctx.mask_dtype = None if mask_token is None else mask_token.dtype
    ctx.pos_dtype = None if pos is None else pos.dtype


def _unshuffle_backward(ctx, grad):
    (inv,) = ctx.saved_tensors
    need_mask = ctx.mask_dtype is not None and ctx.needs_input_grad[2]
    need_pos = ctx.pos_dtype is not None and ctx.needs_input_grad[3]
    gvis, gmask, gpos = backward_op(ctx, "tokens_unshuffle_bwd")(grad, inv, ctx.num_prefix, ctx.num_keep,
                                                                 need_mask, need_pos)
    return (gvis, None, gmask.to(ctx.mask_dtype) if need_mask else None,
            gpos.to(ctx.pos_dtype) if need_pos else None, None)


def _unshuffle_bwd_setup(ctx, inputs, output):
    _, inv, num_prefix, _, need_mask, need_pos = inputs
    ctx.save_for_backward(inv)
    ctx.num_prefix, ctx.need_mask, ctx.need_pos = num_prefix, need_mask, need_pos


def _unshuffle_bwd_backward(ctx, g_vis, g_mask, g_pos):
    """Double backward. tokens_unshuffle_bwd is linear in grad_out, and its adjoint is the
    unshuffle of the incoming gradients: visible rows back to their slots, g_mask on the removed
    ones, g_pos on every row."""
    (inv,) = ctx.saved_tensors
    grad = torch.ops.mae_fast.tokens_unshuffle(g_vis, inv, g_mask if ctx.need_mask else None,
                                               g_pos if ctx.need_pos else None, ctx.num_prefix)
    return grad, None, None, None, None, None


torch.library.register_autograd("mae_fast::tokens_gather", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("mae_fast::tokens_unshuffle", _unshuffle_backward, setup_context=_unshuffle_setup)
torch.library.register_autograd("mae_fast::tokens_unshuffle_bwd", _unshuffle_bwd_backward,
                                setup_context=_unshuffle_bwd_setup)

# Eager calls (_common.run_eagerly) call the ops past their Python autograd kernels, straight to the
# extension's (or the fallback's) CPU and CUDA kernels, inside autograd.Functions of their own.
for _op in OPS:
    eager_impl(_op)(below_autograd(getattr(torch.ops.mae_fast, _op).default))
_GatherEager = eager_function("tokens_gather", _gather_setup, _gather_backward)
_UnshuffleEager = eager_function("tokens_unshuffle", _unshuffle_setup, _unshuffle_backward)


# ----------------------------------------------------------------------------- public functions

def _check_index(ids, name, B, K, K_name):
    check_tensor(ids, name)
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != B or (K is not None and ids.shape[1] != K):
        want = f"({B}, {K})" if K is not None else f"({B}, K)"
        raise ValueError(f"{name} must have shape {want}{K_name}, got {tuple(ids.shape)}")
    if ids.shape[1] == 0:  # an empty selection: refused, as patchify_gather refuses it
        raise ValueError(f"{name} must select at least one row (K >= 1), got shape {tuple(ids.shape)}")


def gather_tokens(x: torch.Tensor, ids: torch.Tensor, *, validate: bool = False) -> torch.Tensor:
    """Rows ids of every sequence: out[b, k] = x[b, ids[b, k]], shape (B, K, D).

    ids: (B, K) int32 or int64 with K >= 1 (an empty selection is refused, as by patchify_gather),
    in [0, L) and unique per row. Differentiable in x (the backward scatters into a fresh zero
    (B, L, D) in one pass). validate=True checks ids on the host first (a synchronisation on CUDA;
    CPU always checks).
    """
    check_float(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, L, D), got {tuple(x.shape)}")
    _check_index(ids, "ids", x.shape[0], None, "")
    check_device(ids, "ids", x, "x")
    if not ids.is_contiguous():  # the kernels read contiguous ids: one copy here, not one per direction
        ids = ids.contiguous()
    op = _GatherEager.apply if run_eagerly() else torch.ops.mae_fast.tokens_gather
    return op(x, ids, bool(validate))


def _check_unshuffle_args(visible, ids_keep, num_patches, mask_token, pos, num_prefix) -> tuple[int, int]:
    """unshuffle_tokens' argument checks; returns (num_prefix, num_patches) as ints."""
    check_float(visible, "visible")
    if visible.dim() != 3:
        raise ValueError(f"visible must have shape (B, num_prefix + K, D), got {tuple(visible.shape)}")
    B, T, D = visible.shape
    P = int_arg(num_prefix, "num_prefix")
    if not 0 <= P <= T:
        raise ValueError(f"num_prefix must be in [0, visible.shape[1] = {T}], got {P}")
    K = T - P
    if K == 0:
        raise ValueError(f"visible must hold at least one token after its num_prefix = {P} rows (K >= 1), "
                         f"got shape {tuple(visible.shape)}")
    _check_index(ids_keep, "ids_keep", B, K, f" (K = visible.shape[1] - num_prefix = {T} - {P})")
    check_device(ids_keep, "ids_keep", visible, "visible")
    N = int_arg(num_patches, "num_patches")
    if not K <= N < 2**31:
        raise ValueError(f"num_patches must be >= K = {K} (the number of visible tokens) and < 2**31, got {N}")
    check_float(mask_token, "mask_token")
    if tuple(mask_token.shape) not in ((D,), (1, D), (1, 1, D)):
        raise ValueError(f"mask_token must have shape ({D},), (1, {D}) or (1, 1, {D}), got {tuple(mask_token.shape)}")
    check_device(mask_token, "mask_token", visible, "visible")
    S = P + N
    if pos is not None:
        check_float(pos, "pos")
        if tuple(pos.shape) not in ((S, D), (1, S, D)):
            raise ValueError(f"pos must have shape (num_prefix + num_patches, D) = ({S}, {D}) or (1, {S}, {D}), "
                             f"got {tuple(pos.shape)}")
        check_device(pos, "pos", visible, "visible")
    return P, N


def unshuffle_tokens(visible: torch.Tensor, ids_keep: torch.Tensor, num_patches: int, mask_token: torch.Tensor,
                     pos: torch.Tensor | None = None, *, num_prefix: int = 0, validate: bool = False) -> torch.Tensor:
    """The decoder input: visible tokens back in their slots, mask_token elsewhere, plus pos.

    visible (B, num_prefix + K, D) with K >= 1 (no visible token is refused, as an empty selection
    is by gather_tokens and patchify_gather): its first num_prefix rows (the cls token) pass through.
    ids_keep (B, K) int32/int64: slot of each visible token, in [0, num_patches), unique per row.
    mask_token: (D,), (1, D) or (1, 1, D); pos: None, (num_prefix + num_patches, D) or
    (1, num_prefix + num_patches, D), added to every row. mask_token and pos may have another float
    dtype than visible (fp32 parameters under autocast): the sum is computed in fp32 and the output
    has visible's dtype; their gradients come back in their own dtype.

    out (B, num_prefix + num_patches, D): out[b, num_prefix + ids_keep[b, k]] = visible[b, num_prefix + k].
    """
    P, N = _check_unshuffle_args(visible, ids_keep, num_patches, mask_token, pos, num_prefix)
    D = visible.shape[-1]
    if pos is not None:
        pos = pos.reshape(P + N, D)
    inv = torch.ops.mae_fast.tokens_invert(ids_keep, N, bool(validate))
    op = _UnshuffleEager.apply if run_eagerly() else torch.ops.mae_fast.tokens_unshuffle
    return op(visible, inv, mask_token.reshape(D), pos, P)
