"""Fuzzed parity of every public op and both model forwards against the eager oracle, mae_fast/testing/reference.py.

Hypothesis draws shapes (batch 1..3, channels 1..13, rectangular grids, int and (ph, pw) patches,
K from 1 to L), dtypes (fp32 and fp16 here; bf16 only on a GPU), layouts (contiguous,
channels_last, sliced and transposed views), index dtypes and mask ratios, and runs each example on
both CPU dispatch paths: the Triton kernels under the interpreter (TRITON_INTERPRET=1) and the
PyTorch fallback (TRITON_INTERPRET=0; the ops read the variable at call time). Forward and backward
are checked with the tolerances of docs/design.md: fp32 against a float64 reference at
rtol ~1e-5, fp16 by the 2x rule |out - ref64| <= 2 |torch_fp16 - ref64| + atol; pure data movement
(patchify, unpatchify, gathers) must be exact. Kernel outputs are NaN-poisoned before they are
written, so an element left unwritten fails.

Profiles (tests/_hypothesis.py): "ci" (default: few derandomized examples, the whole file well under
3 minutes on 2 cores) and "dev" (HYPOTHESIS_PROFILE=dev, many random examples).
"""
import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given, strategies as st

import mae_fast
from mae_fast import ops
from mae_fast.testing import reference as R
from mae_fast.ops import tokens as tok

from _hypothesis import FUZZ, scaled
from _triton_ops import _nan_empty, _nan_empty_like


# ----------------------------------------------------------------------------- dispatch path + poison


@contextlib.contextmanager
def dispatch(path: str):
    """Runs the ops on one CPU path: 'triton' (interpreted kernels, outputs NaN-poisoned) or
    'fallback'. A context manager, not a fixture: hypothesis reruns the body per example."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if path == "triton" else "0"
    try:
        with contextlib.ExitStack() as stack:
            if path == "triton":
                from mae_fast.kernels import add_layer_norm as ka
                from mae_fast.kernels import masked_mse_loss as kl
                from mae_fast.kernels import patchify as kp
                for mod in (kp, kl, ka):
                    for name, fn in (("empty", _nan_empty), ("empty_like", _nan_empty_like)):
                        if hasattr(mod, name):
                            stack.enter_context(mock.patch.object(mod, name, fn))
            yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _triton_available():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from mae_fast.ops._common import triton_kernels
    return triton_kernels("patchify", torch.empty(1)) is not None


PATHS = ["triton", "fallback"] if _triton_available() else ["fallback"]

# ----------------------------------------------------------------------------- strategies

LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed"]
patch_sizes = st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4)))
channels = st.sampled_from([1, 2, 3, 4, 13])
paths = st.sampled_from(PATHS)
layouts = st.sampled_from(LAYOUTS)
float_dtypes = st.sampled_from([torch.float32, torch.float16])
index_dtypes = st.sampled_from([torch.int32, torch.int64])
seeds = st.integers(0, 2**31 - 1)


def pair(p):
    return tuple(p) if isinstance(p, tuple) else (p, p)


@st.composite
def image_specs(draw, max_grid=3):
    """(B, C, H, W, patch) with H = gh * ph, W = gw * pw (H != W allowed, L not a power of two)."""
    patch = draw(patch_sizes)
    ph, pw = pair(patch)
    gh, gw = draw(st.integers(1, max_grid)), draw(st.integers(1, max_grid))
    return draw(st.integers(1, 3)), draw(channels), gh * ph, gw * pw, patch


def make_imgs(gen, B, C, H, W, layout, dtype):
    """A (B, C, H, W) tensor of the layout; values from gen (never zeros)."""
    if layout == "contiguous":
        x = torch.randn(B, C, H, W, generator=gen)
    elif layout == "channels_last":
        x = torch.randn(B, C, H, W, generator=gen).to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(B, C + 1, H + 2, 2 * W, generator=gen)[:, 1:, 1:H + 1, ::2]
    else:  # transposed: H and W strides swapped
        x = torch.randn(B, C, W, H, generator=gen).transpose(2, 3)
    return x.to(dtype)


def make_rows(gen, B, L, D, layout, dtype):
    """A (B, L, D) token tensor: contiguous, sliced (stride 2 in D, offset) or transposed (D-major)."""
    if layout in ("contiguous", "channels_last"):
        x = torch.randn(B, L, D, generator=gen)
    elif layout == "sliced":
        x = torch.randn(B, L + 1, 2 * D, generator=gen)[:, 1:, ::2]
    else:
        x = torch.randn(B, D, L, generator=gen).transpose(1, 2)
    return x.to(dtype)


def make_ids(gen, B, L, K, dtype):
    """(B, K) distinct patch ids per row (a prefix of a random permutation)."""
    return torch.rand(B, L, generator=gen).argsort(dim=1)[:, :K].to(dtype)


# ----------------------------------------------------------------------------- tolerances (docs/design.md)

def check_fp32(out, ref64, rtol=1e-5, atol=1e-5, what=""):
    assert out.dtype == torch.float32, what
    assert not out.isnan().any(), f"{what}: NaN (an unwritten poisoned element?)"
    torch.testing.assert_close(out.double(), ref64.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_2x(out, ref64, low, atol, what=""):
    """flash-attention's rule: |out - ref64| <= 2 |torch_same_dtype - ref64| + atol."""
    assert out.dtype == low.dtype, what
    assert not out.isnan().any(), f"{what}: NaN (an unwritten poisoned element?)"
    err = (out.double() - ref64.double()).abs()
    bound = 2 * (low.double() - ref64.double()).abs() + atol
    assert (err <= bound).all(), f"{what}: max excess {(err - bound).max().item():.3g}"


def check(out, ref64, low, dtype, rtol=1e-5, atol=1e-5, atol16=1e-3, what=""):
    """fp32: rtol/atol against float64; where that fails only because the quantity is ill-conditioned
    in fp32 (e.g. the norm-pix gradient of a 2-value patch, a difference of near-equal terms), the
    eager fp32 reference must be as far off: the 2x rule against it, as for the low precisions.
    fp16: the 2x rule against the eager fp16 reference."""
    if dtype == torch.float32:
        try:
            check_fp32(out, ref64, rtol, atol, what)
        except AssertionError:
            check_2x(out, ref64, low, atol, what)
    else:
        check_2x(out, ref64, low, atol16 * max(1.0, ref64.abs().max().item()), what)


def norm_pix_scale(imgs, patch, row_grad):
    """The size of the terms the norm-pix backward adds up: max rstd * max |row gradient|. Its
    result (the image gradient) can be far smaller (for P = 2 it is a difference of near-equal
    terms), so its absolute error is judged against this scale, not against its own size."""
    rows = R.patchify(imgs.detach().double(), patch)
    rstd = (rows.var(dim=-1) + R.NORM_PIX_EPS).rsqrt().max().item()
    return rstd * row_grad.detach().double().abs().max().item()


def check_loss_and_grads(loss, pred, imgs, patch, dtype, norm_pix, imgs_grad, ref_kw, low_kw):
    """The op's loss and its pred (and image) gradients against R.masked_mse_loss in float64 and
    in dtype (ref_kw / low_kw: the mask or ids each reference takes)."""
    p64, i64 = leaf(pred, torch.float64), leaf(imgs, torch.float64)
    ref = R.masked_mse_loss(p64, i64, patch, norm_pix_target=norm_pix, **ref_kw)
    ref.backward()
    plow, ilow = leaf(pred), leaf(imgs)
    low = R.masked_mse_loss(plow, ilow, patch, norm_pix_target=norm_pix, **low_kw)
    low.backward()
    check(loss, ref.detach(), low.detach(), dtype, rtol=1e-5, atol=1e-6, what="loss")
    check(pred.grad, p64.grad, plow.grad, dtype, rtol=1e-5, atol=1e-6, what="pred grad")
    if imgs_grad:
        scale = norm_pix_scale(imgs, patch, p64.grad) if norm_pix else p64.grad.abs().max().item()
        check(imgs.grad, i64.grad, ilow.grad, dtype, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), atol16=2e-3,
              what="image grad")


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


def same_layout_grad(gen, like):
    """A gradient with the strides of `like`'s layout family (random values)."""
    return torch.randn(like.shape, generator=gen).to(like.dtype)


# ----------------------------------------------------------------------------- patchify / unpatchify

@scaled(2)
@given(spec=image_specs(), layout=layouts, dtype=float_dtypes, path=paths, seed=seeds)
def test_patchify_unpatchify(spec, layout, dtype, path, seed):
    """Pure data movement: exact in every dtype, forward and backward, both directions."""
    B, C, H, W, patch = spec
    gen = torch.Generator().manual_seed(seed)
    imgs = make_imgs(gen, B, C, H, W, layout, dtype).requires_grad_()
    with dispatch(path):
        out = ops.patchify(imgs, patch)
        assert torch.equal(out, R.patchify(imgs.detach(), patch))
        g = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(g)
        assert torch.equal(imgs.grad, R.unpatchify(g, patch, (H, W)))

        x = make_rows(gen, B, out.shape[1], out.shape[2], layout, dtype).requires_grad_()
        img = ops.unpatchify(x, patch, (H, W))
        assert torch.equal(img, R.unpatchify(x.detach(), patch, (H, W)))
        gi = make_imgs(gen, B, C, H, W, layout, dtype)
        img.backward(gi)
        assert torch.equal(x.grad, R.patchify(gi, patch))


# ----------------------------------------------------------------------------- patchify_gather

@FUZZ
@given(spec=image_specs(), layout=layouts, dtype=float_dtypes, path=paths, seed=seeds, ids_dtype=index_dtypes,
       keep=st.floats(0.0, 1.0), norm_pix=st.booleans())
@example(spec=(1, 13, 10, 6, 2), layout="sliced", dtype=torch.float32, path=PATHS[0], seed=1, ids_dtype=torch.int32,
         keep=0.5, norm_pix=True)
@example(spec=(2, 3, 16, 48, 16), layout="channels_last", dtype=torch.float16, path=PATHS[0], seed=2,
         ids_dtype=torch.int64, keep=1.0, norm_pix=True)
@example(spec=(3, 4, 12, 8, (4, 2)), layout="transposed", dtype=torch.float32, path=PATHS[-1], seed=3,
         ids_dtype=torch.int64, keep=0.0, norm_pix=False)
def test_patchify_gather(spec, layout, dtype, path, seed, ids_dtype, keep, norm_pix):
    B, C, H, W, patch = spec
    ph, pw = pair(patch)
    L, P = (H // ph) * (W // pw), ph * pw * C
    if norm_pix and P < 2:
        norm_pix = False  # unbiased variance of one value is 0/0 (NaN in the reference too)
    K = min(L, max(1, round(keep * L)))
    gen = torch.Generator().manual_seed(seed)
    imgs = make_imgs(gen, B, C, H, W, layout, dtype).requires_grad_()
    ids = make_ids(gen, B, L, K, ids_dtype)
    with dispatch(path):
        out = ops.patchify_gather(imgs, ids, patch, norm_pix=norm_pix)
        g = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(g)
    assert out.shape == (B, K, P) and out.dtype == dtype

    x64 = leaf(imgs, torch.float64)
    ref = R.patchify_gather(x64, ids, patch, norm_pix_target=norm_pix)
    ref.backward(g.double())
    xlow = leaf(imgs)
    low = R.patchify_gather(xlow, ids, patch, norm_pix_target=norm_pix)
    low.backward(g)
    if not norm_pix:  # a gather: exact
        assert torch.equal(out, low.detach()) and torch.equal(imgs.grad, xlow.grad)
    else:
        check(out, ref.detach(), low.detach(), dtype, what="norm-pix rows")
        scale = max(1.0, norm_pix_scale(imgs, patch, g))
        check(imgs.grad, x64.grad, xlow.grad, dtype, rtol=1e-4, atol=1e-5 * scale, atol16=2e-3, what="image grad")


# ----------------------------------------------------------------------------- masked_mse_loss

@FUZZ
@given(spec=image_specs(), layout=layouts, dtype=float_dtypes, path=paths, seed=seeds,
       ratio=st.floats(0.01, 0.99), norm_pix=st.booleans(), imgs_grad=st.booleans(),
       mask_kind=st.sampled_from(["float", "bool"]))
@example(spec=(1, 13, 10, 6, 2), layout="sliced", dtype=torch.float32, path=PATHS[0], seed=1, ratio=0.99,
         norm_pix=True, imgs_grad=True, mask_kind="float")
@example(spec=(2, 3, 16, 48, 16), layout="channels_last", dtype=torch.float16, path=PATHS[0], seed=2, ratio=0.01,
         norm_pix=True, imgs_grad=True, mask_kind="bool")
def test_masked_mse_loss_with_mask(spec, layout, dtype, path, seed, ratio, norm_pix, imgs_grad, mask_kind):
    B, C, H, W, patch = spec
    ph, pw = pair(patch)
    L, P = (H // ph) * (W // pw), ph * pw * C
    norm_pix = norm_pix and P >= 2
    gen = torch.Generator().manual_seed(seed)
    removed = min(L, max(1, round(ratio * L)))  # at least one removed patch (else 0 / 0)
    mask = torch.zeros(B, L)
    mask.scatter_(1, make_ids(gen, B, L, removed, torch.int64), 1.0)
    imgs = make_imgs(gen, B, C, H, W, layout, dtype).requires_grad_(imgs_grad)
    pred = make_rows(gen, B, L, P, layout, dtype).requires_grad_()
    with dispatch(path):
        # a float mask of the images' dtype (a float32 mask would promote the loss to float32, as in the
        # reference); a bool mask is taken as that dtype
        loss = ops.masked_mse_loss(pred, imgs, patch, mask=mask.bool() if mask_kind == "bool" else mask.to(dtype),
                                   norm_pix=norm_pix)
        loss.backward()

    check_loss_and_grads(loss, pred, imgs, patch, dtype, norm_pix, imgs_grad,
                         ref_kw=dict(mask=mask.double()), low_kw=dict(mask=mask.to(dtype)))


@FUZZ
@given(spec=image_specs(), layout=layouts, dtype=float_dtypes, path=paths, seed=seeds, ids_dtype=index_dtypes,
       ratio=st.floats(0.01, 1.0), norm_pix=st.booleans(), imgs_grad=st.booleans())
def test_masked_mse_loss_with_ids(spec, layout, dtype, path, seed, ids_dtype, ratio, norm_pix, imgs_grad):
    B, C, H, W, patch = spec
    ph, pw = pair(patch)
    L, P = (H // ph) * (W // pw), ph * pw * C
    norm_pix = norm_pix and P >= 2
    M = min(L, max(1, round(ratio * L)))
    gen = torch.Generator().manual_seed(seed)
    ids = make_ids(gen, B, L, M, ids_dtype)
    imgs = make_imgs(gen, B, C, H, W, layout, dtype).requires_grad_(imgs_grad)
    pred = make_rows(gen, B, M, P, layout, dtype).requires_grad_()
    with dispatch(path):
        loss = ops.masked_mse_loss(pred, imgs, patch, ids=ids, norm_pix=norm_pix)
        loss.backward()

    check_loss_and_grads(loss, pred, imgs, patch, dtype, norm_pix, imgs_grad,
                         ref_kw=dict(ids=ids), low_kw=dict(ids=ids))


# ----------------------------------------------------------------------------- token ops

@scaled(2)
@given(B=st.integers(1, 3), L=st.integers(1, 13), D=st.integers(1, 24), keep=st.floats(0, 1), layout=layouts,
       dtype=float_dtypes, ids_dtype=index_dtypes, seed=seeds, low_level=st.sampled_from(["public", "fallback"]))
def test_gather_tokens(B, L, D, keep, layout, dtype, ids_dtype, seed, low_level):
    """gather_tokens (the compiled CPU kernel) and its PyTorch fallback: exact, forward and backward.
    K = 0 reaches the low-level ops only: the public function refuses an empty selection."""
    K = min(L, max(int(low_level == "public"), round(keep * L)))
    gen = torch.Generator().manual_seed(seed)
    x = make_rows(gen, B, L, D, layout, dtype).requires_grad_()
    ids = make_ids(gen, B, L, K, ids_dtype)
    g = torch.randn(B, K, D, generator=gen).to(dtype)
    if low_level == "public":
        out = ops.gather_tokens(x, ids)
        out.backward(g)
        gx = x.grad
    else:
        out = tok.FALLBACKS["tokens_gather"](x.detach(), ids)
        inv = tok.FALLBACKS["tokens_invert"](ids, L)
        gx = tok.FALLBACKS["tokens_unshuffle"](g, inv, None, None, 0)
    xr = leaf(x)
    ref = R.gather_tokens(xr, ids)
    ref.backward(g)
    assert torch.equal(out, ref.detach())
    assert torch.equal(gx, xr.grad)


@scaled(2)
@given(B=st.integers(1, 3), N=st.integers(1, 13), D=st.integers(1, 24), keep=st.floats(0, 1),
       num_prefix=st.integers(0, 2), pos_mode=st.sampled_from(["none", "2d", "3d"]),
       mask_shape=st.sampled_from(["D", "1D", "11D"]), layout=layouts, dtype=float_dtypes,
       param_dtype=st.sampled_from(["same", "fp32"]), ids_dtype=index_dtypes, seed=seeds,
       low_level=st.sampled_from(["public", "fallback"]))
def test_unshuffle_tokens(B, N, D, keep, num_prefix, pos_mode, mask_shape, layout, dtype, param_dtype, ids_dtype,
                          seed, low_level):
    K = min(N, max(int(low_level == "public"), round(keep * N)))  # the public function refuses K = 0
    gen = torch.Generator().manual_seed(seed)
    pdt = dtype if param_dtype == "same" else torch.float32
    vis = make_rows(gen, B, num_prefix + K, D, layout, dtype).requires_grad_()
    ids = make_ids(gen, B, N, K, ids_dtype)
    mshape = {"D": (D,), "1D": (1, D), "11D": (1, 1, D)}[mask_shape]
    mt = torch.randn(mshape, generator=gen).to(pdt).requires_grad_()
    S = num_prefix + N
    pos = None if pos_mode == "none" else \
        torch.randn((S, D) if pos_mode == "2d" else (1, S, D), generator=gen).to(pdt).requires_grad_()
    g = torch.randn(B, S, D, generator=gen).to(dtype)

    # the reference in float64: the op adds in fp32 and rounds once
    v64, m64 = leaf(vis, torch.float64), leaf(mt, torch.float64)
    p64 = None if pos is None else leaf(pos, torch.float64)
    ref = R.unshuffle_tokens(v64, ids, N, m64, p64, num_prefix=num_prefix)
    ref.backward(g.double())
    vl, ml = leaf(vis), leaf(mt)
    pl = None if pos is None else leaf(pos)
    low = R.unshuffle_tokens(vl, ids, N, ml.to(dtype), None if pl is None else pl.to(dtype), num_prefix=num_prefix)
    low.backward(g)

    if low_level == "public":
        out = ops.unshuffle_tokens(vis, ids, N, mt, pos, num_prefix=num_prefix)
        out.backward(g)
        gv, gm, gp = vis.grad, mt.grad, None if pos is None else pos.grad
    else:
        inv = tok.FALLBACKS["tokens_invert"](ids, N)
        out = tok.FALLBACKS["tokens_unshuffle"](vis.detach(), inv, mt.detach().reshape(D),
                                                None if pos is None else pos.detach().reshape(S, D), num_prefix)
        gv, gm, gp = tok.FALLBACKS["tokens_unshuffle_bwd"](g, inv, num_prefix, K, True, pos is not None)
        gm = gm.reshape(mshape).to(pdt)
        gp = None if pos is None else gp.reshape(pos.shape).to(pdt)
    assert out.shape == (B, S, D) and out.dtype == dtype
    if pos is None:  # pure data movement
        assert torch.equal(out, low.detach()) and torch.equal(gv, vl.grad)
    else:
        check(out, ref.detach(), low.detach(), dtype, what="unshuffle + pos")
        assert torch.equal(gv, vl.grad)
    # parameter gradients are sums over the batch / removed rows: fp32 accumulation
    check(gm, m64.grad, ml.grad, pdt if pdt == torch.float32 else dtype, rtol=1e-5, atol=1e-5,
          what="mask_token grad")
    if pos is not None:
        check(gp, p64.grad, pl.grad, pdt if pdt == torch.float32 else dtype, rtol=1e-5, atol=1e-5, what="pos grad")


# ----------------------------------------------------------------------------- add_layer_norm

@scaled(1)
@given(B=st.integers(1, 3), N=st.integers(1, 13), D=st.integers(1, 40), layout=layouts, dtype=float_dtypes,
       mixed=st.booleans(), bias=st.booleans(), grads=st.sampled_from(["both", "residual", "normed"]),
       path=paths, seed=seeds)
def test_add_layer_norm(B, N, D, layout, dtype, mixed, bias, grads, path, seed):
    """Fused residual add + LayerNorm, forward and backward. mixed: the autocast case (an fp32
    stream, a low-precision delta and normed output); else every tensor in dtype."""
    gen = torch.Generator().manual_seed(seed)
    x_dt = torch.float32 if mixed else dtype
    x = make_rows(gen, B, N, D, layout, x_dt).requires_grad_()
    delta = make_rows(gen, B, N, D, "contiguous", dtype).requires_grad_()
    w = (torch.randn(D, generator=gen) * 0.5 + 1).requires_grad_()
    b = torch.randn(D, generator=gen).requires_grad_() if bias else None
    out_dtype = dtype if mixed else None
    g_res = torch.randn(B, N, D, generator=gen).to(torch.promote_types(x_dt, dtype)) if grads != "normed" else None
    g_n = torch.randn(B, N, D, generator=gen).to(dtype) if grads != "residual" else None
    params = [t for t in (x, delta, w, b) if t is not None]

    def run(fn, ts, cast=None):
        res, normed = fn(*ts[:3], ts[3] if bias else None, 1e-5, out_dtype)
        outs = [o for o, g in ((res, g_res), (normed, g_n)) if g is not None]
        gs = [g if cast is None else g.to(cast) for g in (g_res, g_n) if g is not None]
        torch.autograd.backward(outs, gs)
        return res.detach(), normed.detach(), [t.grad for t in ts]

    with dispatch(path):
        res, normed, got = run(ops.add_layer_norm, params)
    r64, n64, ref_grads = run(lambda *a: R.add_layer_norm(*a[:5]), [leaf(t, torch.float64) for t in params],
                              cast=torch.float64)
    rlow, nlow, low_grads = run(R.add_layer_norm, [leaf(t) for t in params])
    check(res, r64, rlow, res.dtype, what="residual")
    check(normed, n64, nlow, normed.dtype, what="normed")
    for name, g, g64, glow in zip("x delta weight bias".split(), got, ref_grads, low_grads):
        assert (g is None) == (g64 is None), name
        if g is not None:  # fp32 weight / bias grads are only as exact as the fp16 tensors they sum
            check(g, g64, glow, dtype, atol16=1e-2, what=f"grad {name}")


# ----------------------------------------------------------------------------- models

def _grads_close(fast, oracle, rtol=1e-4, atol=1e-5):
    theirs = dict(oracle.named_parameters())
    for name, p in fast.named_parameters():
        if theirs[name].grad is None:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@scaled(0.6)
@given(p=st.integers(1, 4), gh=st.integers(1, 3), gw=st.integers(1, 3), C=st.sampled_from([1, 3, 4]),
       B=st.integers(1, 3), heads=st.sampled_from([1, 2]), dim=st.sampled_from([8, 16]),
       keep_frac=st.floats(0, 1), norm_pix=st.booleans(), layout=layouts, path=paths, seed=seeds,
       return_pred=st.booleans())
def test_official_model(p, gh, gw, C, B, heads, dim, keep_frac, norm_pix, layout, path, seed, return_pred):
    L = gh * gw
    if L < 2:
        gw += 1
        L = gh * gw
    norm_pix = norm_pix and p * p * C >= 2
    len_keep = min(L - 1, max(1, round(keep_frac * L)))
    ratio = 1 - (len_keep + 0.5) / L  # int(L * (1 - ratio)) == len_keep
    torch.manual_seed(seed)
    cfg = dict(img_size=(gh * p, gw * p), patch_size=p, in_chans=C, embed_dim=dim, depth=1, num_heads=heads,
               decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=heads, norm_pix_loss=norm_pix)
    fast = mae_fast.MaskedAutoencoderViT(**cfg)
    oracle = R.MaskedAutoencoderViT(**cfg)
    oracle.load_state_dict(fast.state_dict())
    gen = torch.Generator().manual_seed(seed)
    imgs = make_imgs(gen, B, C, gh * p, gw * p, layout, torch.float32)
    noise = torch.rand(B, L, generator=gen)
    with dispatch(path):
        loss, pred, mask = fast(imgs, ratio, noise, return_pred=return_pred)
        loss.backward()
    rloss, rpred, rmask = oracle(imgs, ratio, noise)
    rloss.backward()
    assert torch.equal(mask, rmask) and int(mask[0].sum()) == L - len_keep
    if return_pred:
        torch.testing.assert_close(pred, rpred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-6)
    _grads_close(fast, oracle)


@scaled(0.6)
@given(patch=patch_sizes, gh=st.integers(1, 3), gw=st.integers(1, 3), C=st.sampled_from([1, 3]), B=st.integers(1, 3),
       pool=st.sampled_from(["cls", "mean"]), masked_frac=st.floats(0, 1), norm_pix=st.booleans(), layout=layouts,
       path=paths, seed=seeds)
def test_vit_pytorch_model(patch, gh, gw, C, B, pool, masked_frac, norm_pix, layout, path, seed):
    ph, pw = pair(patch)
    L = gh * gw
    if L < 2:
        gh += 1
        L = gh * gw
    norm_pix = norm_pix and ph * pw * C >= 2
    num_masked = min(L - 1, max(1, round(masked_frac * L)))
    ratio = (num_masked + 0.5) / L  # int(ratio * L) == num_masked
    torch.manual_seed(seed)
    vit_kw = dict(image_size=(gh * ph, gw * pw), patch_size=patch, num_classes=0, dim=16, depth=1, heads=2,
                  mlp_dim=32, dim_head=8, pool=pool, channels=C)
    mae_kw = dict(decoder_dim=8, masking_ratio=ratio, decoder_depth=1, decoder_heads=2, decoder_dim_head=4,
                  norm_pix_loss=norm_pix)
    fast = mae_fast.MAE(encoder=mae_fast.ViT(**vit_kw), **mae_kw)
    oracle = R.MAE(encoder=R.ViT(**vit_kw), **mae_kw)
    oracle.load_state_dict(fast.state_dict())
    gen = torch.Generator().manual_seed(seed)
    imgs = make_imgs(gen, B, C, gh * ph, gw * pw, layout, torch.float32)
    noise = torch.rand(B, L, generator=gen)
    with dispatch(path):
        loss = fast(imgs, noise)
        loss.backward()
    rloss = oracle(imgs, noise)
    rloss.backward()
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-6)
    _grads_close(fast, oracle)


# ----------------------------------------------------------------------------- bf16 (GPU only)

@pytest.mark.gpu
@FUZZ
@given(spec=image_specs(max_grid=4), layout=layouts, seed=seeds, keep=st.floats(0, 1), norm_pix=st.booleans(),
       ratio=st.floats(0.01, 0.99))
def test_bf16_ops_on_gpu(spec, layout, seed, keep, norm_pix, ratio):
    """bf16 (its arithmetic is wrong under the CPU interpreter, docs/design.md): the compiled kernels by the
    2x rule against a float64 reference, patchify exact."""
    B, C, H, W, patch = spec
    ph, pw = pair(patch)
    L, P = (H // ph) * (W // pw), ph * pw * C
    norm_pix = norm_pix and P >= 2
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    imgs = make_imgs(gen, B, C, H, W, layout, dt).cuda().requires_grad_()
    assert torch.equal(ops.patchify(imgs, patch), R.patchify(imgs.detach(), patch))
    K = min(L, max(1, round(keep * L)))
    ids = make_ids(gen, B, L, K, torch.int64).cuda()
    out = ops.patchify_gather(imgs, ids, patch, norm_pix=norm_pix)
    g = torch.randn(out.shape, generator=gen).to(dt).cuda()
    out.backward(g)
    x64, xl = leaf(imgs, torch.float64), leaf(imgs)
    ref, low = (R.patchify_gather(x, ids, patch, norm_pix_target=norm_pix) for x in (x64, xl))
    ref.backward(g.double())
    low.backward(g)
    check_2x(out, ref.detach(), low.detach(), 1e-2, "bf16 rows")
    check_2x(imgs.grad, x64.grad, xl.grad, 1e-2 * max(1.0, x64.grad.abs().max().item()), "bf16 image grad")

    removed = min(L, max(1, round(ratio * L)))
    mask = torch.zeros(B, L).scatter_(1, make_ids(gen, B, L, removed, torch.int64), 1.0).cuda()
    pred = torch.randn(B, L, P, generator=gen).to(dt).cuda().requires_grad_()
    loss = ops.masked_mse_loss(pred, imgs.detach(), patch, mask=mask.to(dt), norm_pix=norm_pix)
    loss.backward()
    p64, pl = leaf(pred, torch.float64), leaf(pred)
    r64 = R.masked_mse_loss(p64, imgs.detach().double(), patch, mask=mask.double(), norm_pix_target=norm_pix)
    rl = R.masked_mse_loss(pl, imgs.detach(), patch, mask=mask.to(dt), norm_pix_target=norm_pix)
    r64.backward()
    rl.backward()
    check_2x(loss, r64.detach(), rl.detach(), 1e-2, "bf16 loss")
    check_2x(pred.grad, p64.grad, pl.grad, 1e-3, "bf16 pred grad")
