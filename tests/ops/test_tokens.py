"""gather_tokens / unshuffle_tokens (mae_fast.ops.tokens): parity with the eager oracle forward and
backward, gradcheck, opcheck, torch.compile, determinism, poisoned outputs, bad inputs, and the
PyTorch fallback. CUDA-only checks carry the gpu marker."""
import os
import subprocess
import sys

import pytest
import torch

from mae_fast import ops
from mae_fast.testing import reference as ref
from mae_fast.ops import tokens as tok

LOW = (torch.float16, torch.bfloat16)
DIMS = (1, 7, 64, 512, 1000)


def make_ids(B, L, K, dtype=torch.int64, device="cpu"):
    return torch.rand(B, L, device=device).argsort(dim=1)[:, :K].to(dtype)


def assert_low(out, ref64, same, dtype, atol):
    """2x rule for a result rounded once to `dtype`: allows that rounding (eps * |ref|) on top."""
    out, same = out.double(), same.double()
    err, base = (out - ref64).abs(), (same - ref64).abs()
    bound = 2 * base + torch.finfo(dtype).eps * ref64.abs() + atol
    bad = err > bound
    assert not bad.any(), f"max excess {(err - bound).max().item()} at {bad.nonzero()[:3].tolist()}"


def unshuffle_case(dtype, D, P, pos_mode, ids_dtype, K, *, B=2, L=13, aux_dtype=None, device="cpu"):
    """Runs ours and the reference (float64 and same-dtype) forward and backward on random data.
    pos_mode: None, '2d', '3d' (requires grad) or '3d_frozen'."""
    aux_dtype = aux_dtype or dtype
    vis = torch.randn(B, P + K, D, device=device).to(dtype)
    ids = make_ids(B, L, K, ids_dtype, device)
    mask = torch.randn(1, 1, D, device=device).to(aux_dtype)
    pos = None
    if pos_mode is not None:
        pos = torch.randn(P + L, D, device=device).to(aux_dtype)
        if pos_mode.startswith("3d"):
            pos = pos[None]
    pos_grad = pos is not None and pos_mode != "3d_frozen"
    grad = torch.randn(B, P + L, D, device=device).to(dtype)

    def run(fn, v, m, p, cast=None):
        v = v.detach().clone().requires_grad_(True)
        m = m.detach().clone().requires_grad_(True)
        if p is not None:
            p = p.detach().clone().requires_grad_(pos_grad)
        out = fn(v, m, p)
        leaves = [v, m] + ([p] if pos_grad else [])
        g = grad if cast is None else grad.to(cast)
        grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
        return out, grads

    ours = run(lambda v, m, p: ops.unshuffle_tokens(v, ids, L, m, p, num_prefix=P), vis, mask, pos)
    c64 = (lambda t: None if t is None else t.double())
    r64 = run(lambda v, m, p: ref.unshuffle_tokens(v, ids, L, m, p, P), c64(vis), c64(mask), c64(pos), torch.float64)
    cs = (lambda t: None if t is None else t.to(dtype))
    same = run(lambda v, m, p: ref.unshuffle_tokens(v, ids, L, m, p, P), vis, cs(mask), cs(pos))
    return ours, r64, same


def check_unshuffle(dtype, ours, r64, same):
    (out, grads), (o64, g64), (osame, gsame) = ours, r64, same
    assert out.dtype == dtype and out.shape == o64.shape
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(out.double(), o64, rtol=1e-6, atol=1e-6)
        for g, gr in zip(grads, g64):
            torch.testing.assert_close(g.double(), gr, rtol=1e-5, atol=1e-5)
    else:
        assert_low(out, o64, osame, dtype, atol=1e-6)
        # d visible is a copy of grad rows: exact
        assert torch.equal(grads[0], gsame[0])
        for g, gr, gs in zip(grads[1:], g64[1:], gsame[1:]):
            assert_low(g, gr, gs.to(g.dtype), g.dtype if g.dtype in LOW else dtype, atol=1e-3)
    for g, gr in zip(grads, g64):
        assert g.shape == gr.shape


# ----------------------------------------------------------------------------- gather_tokens

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_gather_parity(dtype, D, ids_dtype):
    B, L = 3, 11
    for K in (1, 6, L - 1):
        x = torch.randn(B, L, D).to(dtype).requires_grad_(True)
        ids = make_ids(B, L, K, ids_dtype)
        out = ops.gather_tokens(x, ids)
        expect = ref.gather_tokens(x, ids)
        assert torch.equal(out, expect)
        g = torch.randn_like(out)
        assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(expect, x, g)[0])


def test_gather_batch_one_noncontiguous():
    x = torch.randn(9, 1, 20)[..., ::2].transpose(0, 1)  # (1, 9, 10), non-contiguous
    ids = make_ids(1, 9, 8).t().contiguous().t()  # (1, 8) column-major
    x.requires_grad_(True)
    out = ops.gather_tokens(x, ids)
    assert torch.equal(out, ref.gather_tokens(x, ids))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, torch.autograd.grad(ref.gather_tokens(x, ids).sum(), x)[0])


# ----------------------------------------------------------------------------- unshuffle_tokens

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("P", [0, 1])
@pytest.mark.parametrize("pos_mode", [None, "2d", "3d", "3d_frozen"])
def test_unshuffle_parity(dtype, D, P, pos_mode):
    ids_dtype = torch.int32 if (D + P) % 2 else torch.int64
    K = 1 + (D * 7 + P * 5) % 12  # 1 .. L - 1 over the grid
    check_unshuffle(dtype, *unshuffle_case(dtype, D, P, pos_mode, ids_dtype, K))


@pytest.mark.parametrize("K", [1, 2, 6, 12])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_unshuffle_every_K(K, ids_dtype):
    check_unshuffle(torch.float32, *unshuffle_case(torch.float32, 33, 1, "3d", ids_dtype, K))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("pos_mode", ["2d", "3d_frozen"])
def test_unshuffle_fp32_params_low_precision_tokens(dtype, pos_mode):
    """fp32 mask_token/pos (parameters under autocast) with low-precision tokens: output in the
    tokens' dtype, gradients in the parameters' dtype."""
    ours, r64, same = unshuffle_case(dtype, 64, 1, pos_mode, torch.int64, 5, aux_dtype=torch.float32)
    (out, grads), (o64, g64) = ours, r64
    assert out.dtype == dtype and grads[1].dtype == torch.float32
    assert_low(out, o64, same[0], dtype, atol=1e-6)
    torch.testing.assert_close(grads[1].double(), g64[1], rtol=1e-5, atol=1e-5)  # fp32 sums of exact rows
    if pos_mode == "2d":
        assert grads[2].dtype == torch.float32
        torch.testing.assert_close(grads[2].double(), g64[2], rtol=1e-5, atol=1e-5)


def test_unshuffle_batch_one_and_mask_shapes():
    for shape in [(16,), (1, 16), (1, 1, 16)]:
        vis = torch.randn(1, 4, 16)
        ids = make_ids(1, 7, 3)
        m = torch.randn(shape, requires_grad=True)
        out = ops.unshuffle_tokens(vis, ids, 7, m, num_prefix=1)
        torch.testing.assert_close(out, ref.unshuffle_tokens(vis, ids, 7, m, None, 1))
        (g,) = torch.autograd.grad(out.sum(), m)
        assert g.shape == m.shape


def test_unshuffle_noncontiguous_inputs():
    B, L, P, K, D = 3, 10, 1, 4, 24
    vis = torch.randn(D, B, P + K).permute(1, 2, 0)  # (B, P + K, D) non-contiguous
    ids = make_ids(B, L, K * 2)[:, ::2]  # strided
    mask = torch.randn(2 * D)[::2]
    pos = torch.randn(D, P + L).t()
    assert not (vis.is_contiguous() or ids.is_contiguous() or mask.is_contiguous() or pos.is_contiguous())
    out = ops.unshuffle_tokens(vis, ids, L, mask, pos, num_prefix=P)
    torch.testing.assert_close(out, ref.unshuffle_tokens(vis, ids, L, mask, pos, P))
    pos_e = torch.randn(1, 1, D).expand(1, P + L, D)  # stride-0 pos
    out = ops.unshuffle_tokens(vis, ids, L, mask, pos_e, num_prefix=P)
    torch.testing.assert_close(out, ref.unshuffle_tokens(vis, ids, L, mask, pos_e, P))


def test_unshuffle_matches_official_decoder_input():
    """The official decoder: cat([x[:, 1:], mask_tokens]) + gather by ids_restore, cls prepended,
    + decoder_pos_embed, equals unshuffle_tokens with ids_keep = ids_shuffle[:, :K]."""
    B, L, D = 4, 16, 32
    ids_keep, _, ids_restore = ref.random_masking(B, L, 0.75)
    K = ids_keep.shape[1]
    x = torch.randn(B, 1 + K, D)
    mask_token = torch.randn(1, 1, D)
    pos = torch.randn(1, 1 + L, D)
    x_ = torch.cat([x[:, 1:], mask_token.repeat(B, L - K, 1)], dim=1)
    x_ = ref.gather_tokens(x_, ids_restore)
    official = torch.cat([x[:, :1], x_], dim=1) + pos
    torch.testing.assert_close(ops.unshuffle_tokens(x, ids_keep, L, mask_token, pos, num_prefix=1), official)


def test_unshuffle_keep_all_patches():
    """K = num_patches (no mask row): mask_token gets a zero gradient."""
    vis = torch.randn(2, 6, 8)
    ids = make_ids(2, 6, 6)
    m = torch.randn(8, requires_grad=True)
    out = ops.unshuffle_tokens(vis, ids, 6, m)
    torch.testing.assert_close(out, ref.unshuffle_tokens(vis, ids, 6, m))
    assert torch.equal(torch.autograd.grad(out.sum(), m)[0], torch.zeros(8))


# ----------------------------------------------------------------------------- gradcheck, opcheck, compile

def test_gradcheck_float64():
    B, L, P, K, D = 2, 7, 1, 3, 5
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    ids = make_ids(B, L, K, torch.int32)
    assert torch.autograd.gradcheck(lambda x: ops.gather_tokens(x, ids), (x,))
    assert torch.autograd.gradgradcheck(lambda x: ops.gather_tokens(x, ids), (x,))
    vis = torch.randn(B, P + K, D, dtype=torch.float64, requires_grad=True)
    m = torch.randn(1, 1, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(P + L, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, m, p: ops.unshuffle_tokens(v, ids, L, m, p, num_prefix=P), (vis, m, pos))
    assert torch.autograd.gradcheck(lambda v, m: ops.unshuffle_tokens(v, ids, L, m, num_prefix=P), (vis, m))
    # the second derivative runs through tokens_unshuffle_bwd's own autograd (its adjoint)
    assert torch.autograd.gradgradcheck(lambda v, m, p: ops.unshuffle_tokens(v, ids, L, m, p, num_prefix=P),
                                        (vis, m, pos))
    assert torch.autograd.gradgradcheck(lambda v, m: ops.unshuffle_tokens(v, ids, L, m, num_prefix=P), (vis, m))


def _sample_args():
    B, L, P, K, D = 2, 9, 1, 4, 6
    ids = make_ids(B, L, K)
    inv = torch.ops.mae_fast.tokens_invert(ids, L)
    return B, L, P, K, D, ids, inv


def test_opcheck_low_level_ops():
    B, L, P, K, D, ids, inv = _sample_args()
    x = torch.randn(B, L, D, requires_grad=True)
    torch.library.opcheck(torch.ops.mae_fast.tokens_gather.default, (x, ids.int(), False))
    torch.library.opcheck(torch.ops.mae_fast.tokens_invert.default, (ids, L, False))
    vis = torch.randn(B, P + K, D, requires_grad=True)
    m = torch.randn(D, requires_grad=True)
    pos = torch.randn(P + L, D, requires_grad=True)
    torch.library.opcheck(torch.ops.mae_fast.tokens_unshuffle.default, (vis, inv, m, pos, P))
    torch.library.opcheck(torch.ops.mae_fast.tokens_unshuffle.default, (vis, inv, m.bfloat16(), None, P))
    torch.library.opcheck(torch.ops.mae_fast.tokens_unshuffle.default, (vis.detach().bfloat16(), inv, None, pos.detach(), P))
    g = torch.randn(B, P + L, D)
    for need_mask in (False, True):
        for need_pos in (False, True):
            torch.library.opcheck(torch.ops.mae_fast.tokens_unshuffle_bwd.default, (g, inv, P, K, need_mask, need_pos))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    B, L, P, K, D = 2, 9, 1, 4, 8
    ids = make_ids(B, L, K)
    x = torch.randn(B, L, D, requires_grad=True)
    m = torch.randn(1, 1, D, requires_grad=True)
    pos = torch.randn(1, P + L, D, requires_grad=True)

    def f(x, m, pos):
        vis = ops.gather_tokens(x, ids) * 2.0
        vis = torch.cat([x[:, :P], vis], dim=1)
        return ops.unshuffle_tokens(vis, ids, L, m, pos, num_prefix=P).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    want = f(x, m, pos)
    got = compiled(x, m, pos)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (x, m, pos)), torch.autograd.grad(want, (x, m, pos)))


# ----------------------------------------------------------------------------- determinism, poison

def test_backward_bitwise_deterministic_across_runs_and_threads():
    B, L, P, K, D = 32, 49, 1, 12, 96
    vis = torch.randn(B, P + K, D, requires_grad=True)
    m = torch.randn(D, requires_grad=True)
    pos = torch.randn(P + L, D, requires_grad=True)
    ids = make_ids(B, L, K)
    grad = torch.randn(B, P + L, D)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out = ops.unshuffle_tokens(vis, ids, L, m, pos, num_prefix=P)
            results.append(torch.autograd.grad(out, (vis, m, pos), grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.fixture
def poisoned_empty():
    """torch.empty (and at::empty in the C++ kernels) returns NaN-filled memory: an output element
    a kernel forgets to write stays NaN."""
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fallback", [False, True])
def test_every_output_element_written(poisoned_empty, dtype, fallback):
    B, L, P, K, D = 3, 10, 1, 4, 12
    x = torch.randn(B, L, D).to(dtype)
    ids = make_ids(B, L, K)
    vis = torch.randn(B, P + K, D).to(dtype)
    m, pos, g = torch.randn(D), torch.randn(P + L, D), torch.randn(B, P + L, D).to(dtype)
    if fallback:
        F = tok.FALLBACKS
        inv = F["tokens_invert"](ids, L)
        outs = [F["tokens_gather"](x, ids), F["tokens_unshuffle"](vis, inv, m, pos, P),
                F["tokens_unshuffle"](g[:, :K], inv, None, None, 0), *F["tokens_unshuffle_bwd"](g, inv, P, K, True, True)]
    else:
        inv = torch.ops.mae_fast.tokens_invert(ids, L)
        outs = [torch.ops.mae_fast.tokens_gather(x, ids), torch.ops.mae_fast.tokens_unshuffle(vis, inv, m, pos, P),
                torch.ops.mae_fast.tokens_unshuffle(g[:, :K], inv, None, None, 0),
                *torch.ops.mae_fast.tokens_unshuffle_bwd(g, inv, P, K, True, True)]
    assert (inv >= -1).all() and (inv < K).all()
    for o in outs:
        assert not o.isnan().any()


# ----------------------------------------------------------------------------- bad inputs

def _bad_ids():
    ids = make_ids(2, 10, 4)
    oob, neg, dup = ids.clone(), ids.clone(), ids.clone()
    oob[1, 2] = 10
    neg[0, 0] = -1
    dup[1, 3] = dup[1, 0]
    return [(oob, IndexError), (neg, IndexError), (dup, ValueError)]


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("path", ["kernel", "fallback"])
def test_bad_index_values(validate, path):
    x = torch.randn(2, 10, 8, requires_grad=True)
    vis = torch.randn(2, 5, 8)
    m = torch.randn(8)
    for ids, err in _bad_ids():
        if path == "kernel":
            with pytest.raises(err, match="ids"):
                ops.gather_tokens(x, ids, validate=validate)
            with pytest.raises(err, match="ids_keep"):
                ops.unshuffle_tokens(vis, ids, 10, m, num_prefix=1, validate=validate)
        else:
            with pytest.raises(err, match="ids"):
                tok.FALLBACKS["tokens_gather"](x, ids, validate)
            with pytest.raises(err, match="ids_keep"):
                tok.FALLBACKS["tokens_invert"](ids, 10, validate)


def test_bad_inv_rejected_by_low_level_ops():
    B, L, P, K, D, ids, inv = _sample_args()
    vis = torch.randn(B, P + K, D)
    bad = inv.clone()
    bad[0, bad[0].argmax()] = K  # out of range
    with pytest.raises(IndexError, match="inv"):
        torch.ops.mae_fast.tokens_unshuffle(vis, bad, None, None, P)
    bad = inv.clone()
    bad[1][bad[1] == 0] = -1  # visible row 0 has no slot: its output would go unwritten
    with pytest.raises(ValueError, match="inv"):
        torch.ops.mae_fast.tokens_unshuffle_bwd(torch.randn(B, P + L, D), bad, P, K, True, True)


def test_bad_shapes_and_dtypes():
    B, L, P, K, D = 2, 10, 1, 4, 8
    x = torch.randn(B, L, D)
    vis = torch.randn(B, P + K, D)
    ids = make_ids(B, L, K)
    m = torch.randn(D)
    cases = [
        (lambda: ops.gather_tokens(x[0], ids), ValueError, "x must have shape"),
        (lambda: ops.gather_tokens(x, ids.float()), TypeError, "ids must be int32 or int64"),
        (lambda: ops.gather_tokens(x, ids[:1]), ValueError, r"ids must have shape \(2, K\)"),
        (lambda: ops.gather_tokens(x, ids.to("meta")), ValueError, "ids must be on cpu like x, got meta"),
        (lambda: ops.gather_tokens(x.numpy(), ids), TypeError, "x must be a torch.Tensor"),
        (lambda: ops.unshuffle_tokens(vis.int(), ids, L, m, num_prefix=P), TypeError, "visible must be float"),
        (lambda: ops.unshuffle_tokens(vis[0], ids, L, m, num_prefix=P), ValueError, "visible must have shape"),
        (lambda: ops.unshuffle_tokens(vis, ids, L, m), ValueError, r"ids_keep must have shape \(2, 5\)"),
        (lambda: ops.unshuffle_tokens(vis, ids.short(), L, m, num_prefix=P), TypeError, "ids_keep must be int32"),
        (lambda: ops.unshuffle_tokens(vis, ids, 3, m, num_prefix=P), ValueError, "num_patches must be >= K = 4"),
        (lambda: ops.unshuffle_tokens(vis, ids, 10.0, m, num_prefix=P), TypeError, "num_patches must be an int"),
        (lambda: ops.unshuffle_tokens(vis, ids, L, m, num_prefix=-1), ValueError, "num_prefix must be in"),
        (lambda: ops.unshuffle_tokens(vis, ids, L, m, num_prefix=True), TypeError, "num_prefix must be an int"),
        (lambda: ops.unshuffle_tokens(vis, ids, L, torch.randn(D + 1), num_prefix=P), ValueError,
         r"mask_token must have shape \(8,\)"),
        (lambda: ops.unshuffle_tokens(vis, ids, L, torch.randn(2, D), num_prefix=P), ValueError, "mask_token must have"),
        (lambda: ops.unshuffle_tokens(vis, ids, L, m.long(), num_prefix=P), TypeError, "mask_token must be float"),
        (lambda: ops.unshuffle_tokens(vis, ids, L, m, torch.randn(L, D), num_prefix=P), ValueError,
         r"pos must have shape \(num_prefix \+ num_patches, D\) = \(11, 8\)"),
        (lambda: ops.unshuffle_tokens(vis, ids, L, m, torch.randn(2, P + L, D), num_prefix=P), ValueError, "pos must"),
        (lambda: ops.unshuffle_tokens(vis, ids, L, m.to("meta"), num_prefix=P), ValueError, "mask_token must be on cpu like visible, got meta"),
    ]
    for fn, err, msg in cases:
        with pytest.raises(err, match=msg):
            fn()


# ----------------------------------------------------------------------------- PyTorch fallback

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fallback_matches_reference(dtype):
    B, L, P, K, D = 3, 12, 1, 5, 10
    F = tok.FALLBACKS
    x = torch.randn(B, L, D).to(dtype)
    ids = make_ids(B, L, K, torch.int32)
    assert torch.equal(F["tokens_gather"](x, ids), ref.gather_tokens(x, ids))
    inv = F["tokens_invert"](ids, L)
    vis, m, pos = torch.randn(B, P + K, D).to(dtype), torch.randn(D), torch.randn(P + L, D)
    out = F["tokens_unshuffle"](vis, inv, m, pos, P)
    expect = ref.unshuffle_tokens(vis.double(), ids, L, m.double(), pos.double(), P)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expect, rtol=torch.finfo(dtype).eps, atol=1e-6)
    g = torch.randn(B, P + L, D).to(dtype)
    gvis, gm, gp = F["tokens_unshuffle_bwd"](g, inv, P, K, True, True)
    v64 = vis.double().requires_grad_(True)
    m64, p64 = m.double().requires_grad_(True), pos.double().requires_grad_(True)
    r = torch.autograd.grad(ref.unshuffle_tokens(v64, ids, L, m64, p64, P), (v64, m64, p64), g.double())
    assert torch.equal(gvis.double(), r[0])
    torch.testing.assert_close(gm.double(), r[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gp.double(), r[2], rtol=1e-5, atol=1e-5)


def test_public_ops_without_extension_subprocess():
    """With mae_fast._C unavailable the public ops and their backward run on the fallback."""
    code = r"""
import sys, importlib.abc, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == 'mae_fast._C':
            raise ImportError('blocked for the test')
sys.meta_path.insert(0, Block())
import mae_fast
from mae_fast import ops
from mae_fast.ops import _common
from mae_fast.testing import reference as ref
assert not _common.EXTENSION_AVAILABLE and not _common.has_kernel('tokens_unshuffle', 'cpu')
ids = torch.rand(2, 9).argsort(1)[:, :4]
vis = torch.randn(2, 5, 6, requires_grad=True); m = torch.randn(6, requires_grad=True)
pos = torch.randn(10, 6, requires_grad=True)
out = ops.unshuffle_tokens(vis, ids, 9, m, pos, num_prefix=1)
want = ref.unshuffle_tokens(vis, ids, 9, m, pos, 1)
torch.testing.assert_close(out, want)
g = torch.randn_like(out)
for a, b in zip(torch.autograd.grad(out, (vis, m, pos), g), torch.autograd.grad(want, (vis, m, pos), g)):
    torch.testing.assert_close(a, b)
x = torch.randn(2, 9, 6, requires_grad=True)
assert torch.equal(torch.autograd.grad(ops.gather_tokens(x, ids).sum(), x)[0],
                   torch.autograd.grad(ref.gather_tokens(x, ids).sum(), x)[0])
try:
    ops.gather_tokens(x, ids + 20)
except IndexError as e:
    assert 'ids' in str(e)
else:
    raise AssertionError('no error')
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


# ----------------------------------------------------------------------------- CUDA (gpu marker)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("P", [0, 1])
def test_cuda_unshuffle_parity(dtype, D, P):
    for pos_mode, aux in (("3d", None), ("2d", torch.float32), (None, None), ("3d_frozen", torch.float32)):
        for K in (1, 7, 12):
            ours, r64, same = unshuffle_case(dtype, D, P, pos_mode, torch.int32 if K % 2 else torch.int64, K,
                                             aux_dtype=aux, device="cuda")
            if aux is None:
                check_unshuffle(dtype, ours, r64, same)
            else:
                assert_low(ours[0], r64[0], same[0], dtype, atol=1e-6)
                torch.testing.assert_close(ours[1][1].double(), r64[1][1], rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", DIMS)
def test_cuda_gather_parity(dtype, D):
    for ids_dtype in (torch.int32, torch.int64):
        x = torch.randn(3, 17, D, device="cuda").to(dtype).requires_grad_(True)
        ids = make_ids(3, 17, 9, ids_dtype, "cuda")
        out = ops.gather_tokens(x, ids)
        assert torch.equal(out, ref.gather_tokens(x, ids))
        g = torch.randn_like(out)
        assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref.gather_tokens(x, ids), x, g)[0])


@pytest.mark.gpu
def test_cuda_misaligned_views_and_large_batch():
    """Odd storage offsets (no 16-byte vectors) and a batch large enough to split the reduction."""
    B, L, P, K, D = 256, 196, 1, 49, 512
    base = torch.randn(B * (P + K) * D + 3, device="cuda", dtype=torch.bfloat16)
    vis = base[3:].view(B, P + K, D).requires_grad_(True)  # 6-byte offset
    ids = make_ids(B, L, K, device="cuda")
    m = torch.randn(D, device="cuda", requires_grad=True)
    pos = torch.randn(1, P + L, D, device="cuda", requires_grad=True)
    out = ops.unshuffle_tokens(vis, ids, L, m, pos, num_prefix=P)
    inv = torch.ops.mae_fast.tokens_invert(ids, L)
    want = tok.FALLBACKS["tokens_unshuffle"](vis.detach(), inv, m.detach(), pos.detach().reshape(P + L, D), P)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (vis, m, pos), g)
    fb = tok.FALLBACKS["tokens_unshuffle_bwd"](g, inv, P, K, True, True)
    assert torch.equal(grads[0], fb[0])
    torch.testing.assert_close(grads[1], fb[1], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grads[2].reshape(P + L, D), fb[2], rtol=1e-5, atol=1e-4)
    again = torch.autograd.grad(ops.unshuffle_tokens(vis, ids, L, m, pos, num_prefix=P), (vis, m, pos), g)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_validate_raises_on_host():
    x = torch.randn(2, 10, 8, device="cuda")
    vis = torch.randn(2, 5, 8, device="cuda")
    m = torch.randn(8, device="cuda")
    for ids, err in _bad_ids():
        ids = ids.cuda()
        with pytest.raises(err, match="ids"):
            ops.gather_tokens(x, ids, validate=True)
        with pytest.raises(err, match="ids_keep"):
            ops.unshuffle_tokens(vis, ids, 10, m, num_prefix=1, validate=True)


@pytest.mark.gpu
@pytest.mark.parametrize("what", ["gather_oob", "unshuffle_oob", "unshuffle_dup"])
def test_cuda_device_side_check_fails_loudly(what):
    code = f"""
import torch, mae_fast
ids = torch.rand(2, 10, device='cuda').argsort(1)[:, :4]
what = {what!r}
if what == 'unshuffle_dup':
    ids[1, 3] = ids[1, 0]
else:
    ids[1, 2] = 1000
if what == 'gather_oob':
    mae_fast.ops.gather_tokens(torch.randn(2, 10, 8, device='cuda'), ids)
else:
    mae_fast.ops.unshuffle_tokens(torch.randn(2, 4, 8, device='cuda'), ids, 10, torch.randn(8, device='cuda'))
torch.cuda.synchronize()
print('no error')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no error" not in out.stdout
    assert "device-side assert" in out.stderr or "mae_fast" in out.stderr, out.stderr[-2000:]
