"""mae_fast.ops.patchify / unpatchify / patchify_gather against the eager reference.

On a CPU machine the conftest sets TRITON_INTERPRET=1, so CPU tensors run the very Triton kernels
of mae_fast.kernels.patchify (interpreted); the PyTorch fallback is tested with the interpreter
switched off, and float64 (gradcheck) always takes the fallback. Every buffer the kernels write
is NaN-poisoned first (the poison fixture), so an element left unwritten fails.
"""
import importlib

import pytest
import torch

import mae_fast
from mae_fast.testing import reference as R

P_ops = importlib.import_module("mae_fast.ops._common")

from _triton_ops import INTERPRET, LAYOUTS, SHAPES, make_imgs, pair

pytestmark = pytest.mark.usefixtures("poison")  # tests/ops/conftest.py


def num_patches(H, W, patch):
    ph, pw = pair(patch)
    return (H // ph) * (W // pw)


def make_ids(B, L, K, device="cpu", dtype=torch.int64):
    return torch.rand(B, L, device=device).argsort(dim=-1)[:, :K].to(dtype)


def k_of(L, keep):
    return {"one": 1, "some": max(1, L // 3), "all": L}[keep]


def assert_fp32_close(out, ref64, rtol=1e-5, atol=1e-5):
    assert out.dtype == torch.float32
    assert not out.isnan().any(), "NaN in output (unwritten poisoned element?)"
    torch.testing.assert_close(out.double(), ref64, rtol=rtol, atol=atol)


def assert_2x_rule(out, ref64, torch_low, atol):
    """flash-attention's rule: |out - ref64| <= 2 * |torch_same_dtype - ref64| + atol."""
    assert not out.isnan().any()
    err = (out.double() - ref64).abs()
    bound = 2 * (torch_low.double() - ref64).abs() + atol
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


# ----------------------------------------------------------------------------- the kernel path is tested

def test_cpu_tests_run_the_triton_kernels():
    if not INTERPRET:
        pytest.skip("TRITON_INTERPRET is not 1")
    assert P_ops.triton_kernels("patchify", torch.empty(1)) is not None
    assert P_ops.triton_kernels("masked_mse_loss", torch.empty(1)) is not None
    assert P_ops.triton_kernels("patchify", torch.empty(1, dtype=torch.float64)) is None


# ----------------------------------------------------------------------------- parity, fp32

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_patchify_unpatchify_match_reference(shape, layout):
    B, C, H, W, patch = shape
    imgs = make_imgs(B, C, H, W, layout).requires_grad_()
    out = mae_fast.ops.patchify(imgs, patch)
    assert out.shape == (B, num_patches(H, W, patch), pair(patch)[0] * pair(patch)[1] * C)
    assert torch.equal(out, R.patchify(imgs.detach(), patch))
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(imgs.grad, R.unpatchify(g, patch, (H, W)))

    x = out.detach().clone().requires_grad_()
    img = mae_fast.ops.unpatchify(x, patch, (H, W))
    assert torch.equal(img, imgs.detach())
    gi = make_imgs(B, C, H, W, layout)
    img.backward(gi)
    assert torch.equal(x.grad, R.patchify(gi, patch))


def test_unpatchify_reads_non_contiguous_rows():
    x = torch.randn(2, 48, 6).transpose(1, 2)  # (2, 6, 48), feature stride 6
    assert not x.is_contiguous()
    out = mae_fast.ops.unpatchify(x, 4, (8, 12))
    assert torch.equal(out, R.unpatchify(x, 4, (8, 12)))


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("keep", ["one", "some", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_patchify_gather_matches_reference(shape, layout, keep, norm_pix):
    B, C, H, W, patch = shape
    L = num_patches(H, W, patch)
    imgs = make_imgs(B, C, H, W, layout).requires_grad_()
    ids = make_ids(B, L, k_of(L, keep), dtype=torch.int32 if keep == "some" else torch.int64)
    out = mae_fast.ops.patchify_gather(imgs, ids, patch, norm_pix=norm_pix)

    x64 = imgs.detach().double().requires_grad_()
    ref = R.patchify_gather(x64, ids, patch, norm_pix_target=norm_pix)
    assert_fp32_close(out, ref.detach())
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    assert imgs.grad.shape == imgs.shape
    assert_fp32_close(imgs.grad, x64.grad, atol=1e-4 if norm_pix else 1e-6)


def test_patchify_gather_big_patch():
    """p = 32 (P = 3072 here): the largest patch size of the spec, one row per program."""
    imgs = make_imgs(1, 3, 64, 32, "channels_last").requires_grad_()
    ids = torch.tensor([[1, 0]])
    out = mae_fast.ops.patchify_gather(imgs, ids, 32, norm_pix=True)
    x64 = imgs.detach().double().requires_grad_()
    ref = R.patchify_gather(x64, ids, 32, norm_pix_target=True)
    assert_fp32_close(out, ref.detach())
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    assert_fp32_close(imgs.grad, x64.grad, atol=1e-4)


# ----------------------------------------------------------------------------- parity, fp16 (2x rule)

@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_patchify_gather_fp16_two_x_rule(layout, norm_pix):
    B, C, H, W, patch = 2, 3, 8, 12, 4
    imgs = make_imgs(B, C, H, W, layout, dtype=torch.float16).requires_grad_()
    ids = make_ids(B, 6, 4)
    out = mae_fast.ops.patchify_gather(imgs, ids, patch, norm_pix=norm_pix)
    assert out.dtype == torch.float16

    x64 = imgs.detach().double().requires_grad_()
    ref = R.patchify_gather(x64, ids, patch, norm_pix_target=norm_pix)
    x16 = imgs.detach().clone().requires_grad_()
    low = R.patchify_gather(x16, ids, patch, norm_pix_target=norm_pix)
    assert_2x_rule(out, ref.detach(), low.detach(), atol=1e-3)

    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    low.backward(g)
    assert imgs.grad.dtype == torch.float16
    assert_2x_rule(imgs.grad, x64.grad, x16.grad, atol=1e-3)


# ----------------------------------------------------------------------------- edge values, on both paths

@pytest.mark.parametrize("scale", [1e30, 1e37])
def test_norm_pix_of_huge_patches_matches_float64(path, scale):
    """Patches whose squares overflow fp32 (the reference's fp32 variance is inf there: all-zero
    rows) normalise as in float64, forward and backward; a constant patch (2**100, an exact mean)
    gives a zero row and the gradient of rstd = 1 / sqrt(eps)."""
    B, C, H, W, patch = 2, 3, 8, 12, 4
    imgs = make_imgs(B, C, H, W) * scale
    imgs[1, :, 4:, :4] = 2.0 ** 100  # patch 3 of image 1
    ids = torch.tensor([[0, 4, 2], [3, 1, 5]])
    assert not R.patchify_gather(imgs, ids, patch, norm_pix_target=True)[0].any()
    x, x64 = imgs.clone().requires_grad_(), imgs.double().requires_grad_()
    out = mae_fast.ops.patchify_gather(x, ids, patch, norm_pix=True)
    ref = R.patchify_gather(x64, ids, patch, norm_pix_target=True)
    assert_fp32_close(out, ref.detach())
    assert not out[1, 0].any()
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    gx, gx64 = x.grad[1, :, 4:, :4], x64.grad[1, :, 4:, :4]  # the constant patch: O(1 / sqrt(eps))
    assert_fp32_close(gx, gx64, atol=1e-3)
    if scale < 1e35:  # the others are O(1 / scale): fp32 normal numbers while scale < ~1e35
        assert_fp32_close(x.grad[0] * scale, x64.grad[0] * scale)


def test_double_backward_is_refused(path):
    x = make_imgs(2, 3, 8, 12).requires_grad_()
    out = mae_fast.ops.patchify_gather(x, torch.tensor([[0, 4], [3, 1]]), 4, norm_pix=True)
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"double backward of mae_fast.ops.patchify_gather .*is not supported"):
        g.sum().backward()


# ----------------------------------------------------------------------------- fallback (no Triton)

@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fallback_matches_reference(monkeypatch, layout, norm_pix):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    B, C, H, W, patch = 2, 3, 8, 12, (4, 2)
    imgs = make_imgs(B, C, H, W, layout)
    assert P_ops.triton_kernels("patchify", imgs) is None
    L = num_patches(H, W, patch)
    ids = make_ids(B, L, 5)
    x = imgs.clone().requires_grad_()
    out = mae_fast.ops.patchify_gather(x, ids, patch, norm_pix=norm_pix)
    x64 = imgs.double().requires_grad_()
    ref = R.patchify_gather(x64, ids, patch, norm_pix_target=norm_pix)
    assert_fp32_close(out, ref.detach())
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    assert_fp32_close(x.grad, x64.grad, atol=1e-4)
    assert x.grad.stride() == torch.empty_like(imgs).stride()

    assert torch.equal(mae_fast.ops.patchify(imgs, patch), R.patchify(imgs, patch))
    p = R.patchify(imgs, patch)
    assert torch.equal(mae_fast.ops.unpatchify(p, patch, (H, W)), imgs)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_gradcheck_float64(norm_pix):
    """float64 always runs the PyTorch fallback, whose backward formulas this checks; the Triton
    backward is checked against the reference's autograd above."""
    imgs = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[5, 0, 2], [1, 4, 3]])
    assert torch.autograd.gradcheck(lambda x: mae_fast.ops.patchify_gather(x, ids, 2, norm_pix=norm_pix), (imgs,))
    assert torch.autograd.gradcheck(lambda x: mae_fast.ops.patchify(x, (2, 3)), (imgs,))
    rows = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mae_fast.ops.unpatchify(x, 2, (4, 6)), (rows,))


# ----------------------------------------------------------------------------- torch.library / compile

def test_opcheck():
    B, C, H, W, ph, pw = 2, 3, 8, 12, 4, 2
    imgs = make_imgs(B, C, H, W, "channels_last")
    ids = make_ids(B, 12, 5)
    rows = torch.randn(B, 12, ph * pw * C)
    cases = [
        (torch.ops.mae_fast.patchify.default, (imgs.clone().requires_grad_(), ph, pw)),
        (torch.ops.mae_fast.unpatchify.default, (rows.clone().requires_grad_(), ph, pw, H, W)),
        (torch.ops.mae_fast.patchify_gather.default, (imgs.clone().requires_grad_(), ids, ph, pw, True, False)),
        (torch.ops.mae_fast.patchify_gather.default, (imgs, ids.int(), ph, pw, False, True)),
        (torch.ops.mae_fast.patchify_gather_backward.default, (torch.randn(B, 5, ph * pw * C), imgs, ids, ph, pw, True)),
        (torch.ops.mae_fast.patchify_gather_backward.default, (rows, imgs, None, ph, pw, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    B, C, H, W, patch = 2, 3, 8, 12, 4
    imgs = make_imgs(B, C, H, W)
    ids = make_ids(B, 6, 4)

    def f(x, ids):
        rows = mae_fast.ops.patchify_gather(x, ids, patch, norm_pix=True)
        full = mae_fast.ops.patchify(x, patch)
        back = mae_fast.ops.unpatchify(full * 2, patch, (H, W))
        return rows.square().sum() + back.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x1 = imgs.clone().requires_grad_()
    x2 = imgs.clone().requires_grad_()
    out1, out2 = compiled(x1, ids), f(x2, ids)
    torch.testing.assert_close(out1, out2)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_deterministic():
    imgs = make_imgs(2, 4, 12, 8, "channels_last")
    ids = make_ids(2, 12, 7)
    g = torch.randn(2, 7, 32)
    runs = []
    for _ in range(2):
        x = imgs.clone().requires_grad_()
        out = mae_fast.ops.patchify_gather(x, ids, (4, 2), norm_pix=True)
        out.backward(g)
        runs.append((out, x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ----------------------------------------------------------------------------- bad input

def _imgs():
    return torch.randn(2, 3, 8, 12)


BAD = [
    ("H not a multiple", lambda: mae_fast.ops.patchify_gather(torch.randn(2, 3, 10, 12), torch.zeros(2, 1, dtype=torch.long), 4),
     ValueError, r"height H=10 .*multiple of patch_size ph=4"),
    ("W not a multiple", lambda: mae_fast.ops.patchify(torch.randn(2, 3, 8, 10), (4, 4)),
     ValueError, r"width W=10 .*multiple of patch_size pw=4"),
    ("ids float", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.zeros(2, 1), 4), TypeError, r"ids .*int32 or int64"),
    ("ids int16", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.zeros(2, 1, dtype=torch.int16), 4),
     TypeError, r"ids .*int32 or int64"),
    ("ids 1-D", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.zeros(2, dtype=torch.long), 4),
     ValueError, r"ids must have shape \(B=2, K\)"),
    ("ids wrong batch", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.zeros(3, 1, dtype=torch.long), 4),
     ValueError, r"ids must have shape \(B=2, K\)"),
    ("ids K > L", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.zeros(2, 7, dtype=torch.long), 4),
     ValueError, r"1 <= K <= L=6"),
    ("ids K = 0", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.zeros(2, 0, dtype=torch.long), 4),
     ValueError, r"1 <= K <= L=6"),
    ("ids = L", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.tensor([[0], [6]]), 4), ValueError, r"ids .*\[0, L=6\)"),
    ("ids < 0", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.tensor([[-1], [2]], dtype=torch.int32), 4),
     ValueError, r"ids .*\[0, L=6\)"),
    ("ids repeated, validate", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.tensor([[1, 1], [2, 3]]), 4, validate=True),
     ValueError, r"distinct"),
    ("ids repeated, CPU", lambda: mae_fast.ops.patchify_gather(_imgs(), torch.tensor([[1, 1], [2, 3]]), 4),
     ValueError, r"ids must be distinct"),
    ("norm_pix P=1", lambda: mae_fast.ops.patchify_gather(torch.randn(2, 1, 2, 2), torch.tensor([[0], [3]]), 1, norm_pix=True),
     ValueError, r"norm_pix needs ph\*pw\*C >= 2"),
    ("patch_size float", lambda: mae_fast.ops.patchify(_imgs(), 4.0), TypeError, r"patch_size"),
    ("patch_size triple", lambda: mae_fast.ops.patchify(_imgs(), (4, 4, 4)), TypeError, r"patch_size"),
    ("patch_size 0", lambda: mae_fast.ops.patchify(_imgs(), 0), ValueError, r"patch_size"),
    ("imgs 3-D", lambda: mae_fast.ops.patchify(torch.randn(3, 8, 12), 4), ValueError, r"imgs must be 4-D"),
    ("imgs int", lambda: mae_fast.ops.patchify(torch.zeros(2, 3, 8, 12, dtype=torch.long), 4), TypeError, r"imgs .*floating"),
    ("unpatchify bad L", lambda: mae_fast.ops.unpatchify(torch.randn(2, 5, 48), 4, (8, 12)), ValueError, r"L=6"),
    ("unpatchify bad P", lambda: mae_fast.ops.unpatchify(torch.randn(2, 6, 47), 4, (8, 12)), ValueError, r"ph\*pw=16"),
    ("unpatchify image_size", lambda: mae_fast.ops.unpatchify(torch.randn(2, 6, 48), 4, (8, 13)), ValueError, r"image_size"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_out_of_range_ids_never_touch_memory_outside():
    """What unvalidated CUDA ids do, shown on the kernels directly: NaN rows, dropped gradients."""
    pytest.importorskip("triton")
    if not INTERPRET:
        pytest.skip("needs the interpreter on CPU")
    from mae_fast.kernels import patchify as kp

    imgs = make_imgs(2, 3, 8, 12)
    ids = torch.tensor([[0, 6, 5], [-3, 1, (1 << 32) + 2]])  # the last wraps to 2 in int32
    out = kp.patchify_gather_fwd(imgs, ids, 4, 4, norm_pix=True)
    bad = (ids < 0) | (ids >= 6)
    assert out[bad].isnan().all() and not out[~bad].isnan().any()
    g = torch.randn_like(out)
    gi = kp.patchify_gather_bwd(g, imgs, importlib.import_module("mae_fast.ops.patchify").inverse_ids(ids, 6), 4, 4)
    ref = R.unpatchify(torch.zeros(2, 6, 48).index_put_((torch.tensor([0, 0, 1]), torch.tensor([0, 5, 1])),
                                                         g[~bad]), 4, (8, 12))
    assert torch.equal(gi, ref)


# ----------------------------------------------------------------------------- GPU (compiled kernels)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_gpu_vit_b16_patchify_gather(dtype, norm_pix):
    B, C, H, W, patch = 64, 3, 224, 224, 16
    imgs = make_imgs(B, C, H, W, "channels_last", dtype=dtype, device="cuda").requires_grad_()
    ids = make_ids(B, 196, 49, device="cuda")
    out = mae_fast.ops.patchify_gather(imgs, ids, patch, norm_pix=norm_pix)
    x64 = imgs.detach().double().requires_grad_()
    ref = R.patchify_gather(x64, ids, patch, norm_pix_target=norm_pix)
    xl = imgs.detach().clone().requires_grad_()
    low = R.patchify_gather(xl, ids, patch, norm_pix_target=norm_pix)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    low.backward(g)
    if dtype == torch.float32:
        assert_fp32_close(out, ref.detach())
        assert_fp32_close(imgs.grad, x64.grad, atol=1e-4)
    else:
        assert_2x_rule(out, ref.detach(), low.detach(), atol=1e-2)
        assert_2x_rule(imgs.grad, x64.grad, xl.grad, atol=1e-2)
    p = mae_fast.ops.patchify(imgs.detach(), patch)
    assert torch.equal(p, R.patchify(imgs.detach(), patch))
    assert torch.equal(mae_fast.ops.unpatchify(p, patch, (H, W)), imgs.detach())


@pytest.mark.skipif(not INTERPRET, reason="the kernel modules import only with Triton (TRITON_INTERPRET=1 on CPU)")
def test_launch_grids_fit_cuda_limits(monkeypatch):
    """The grids of patchify, unpatchify and the loss stay within CUDA's limits (axis 0 < 2**31,
    axes 1 and 2 <= 65,535) at 4096 x 4096 px in 2 px patches: 4M patch rows, 65,536 row blocks.
    The kernels are recorded, not run (the interpreter knows no grid limit)."""
    kp = importlib.import_module("mae_fast.kernels.patchify")
    kl = importlib.import_module("mae_fast.kernels.masked_mse_loss")
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    for mod in (kp, kl):
        for name in [n for n in vars(mod) if n.endswith("_kernel")]:
            monkeypatch.setattr(mod, name, Recorder())
    imgs = torch.zeros(1, 1, 4096, 4096)
    x = kp.patchify_fwd(imgs, 2, 2)
    kp.unpatchify_fwd(x, 2, 2, 4096, 4096)
    mask = torch.ones(1, x.shape[1])
    kl.masked_mse_loss_fwd(x, imgs, mask, None, 2, 2)
    kl.masked_mse_loss_bwd(torch.ones(()), torch.ones(()), x, imgs, mask, None, 2, 2)
    assert len(grids) == 5 and max(g[0] for g in grids) > 65_535
    assert all(g[0] < 2**31 and all(d <= 65_535 for d in g[1:]) for g in grids), grids


@pytest.mark.gpu
def test_gpu_rows_past_a_grid_dimension():
    """4096 x 4096 px in 2 px patches: 65,536 blocks of patch rows, past a CUDA grid's second axis."""
    imgs = make_imgs(1, 1, 4096, 4096, device="cuda")
    p = mae_fast.ops.patchify(imgs, 2)
    assert torch.equal(p, R.patchify(imgs, 2))
    assert torch.equal(mae_fast.ops.unpatchify(p, 2, (4096, 4096)), imgs)
    mask = torch.ones(1, p.shape[1], device="cuda")
    loss = mae_fast.ops.masked_mse_loss((p + 1).requires_grad_(), imgs, 2, mask=mask)  # every element off by 1
    torch.testing.assert_close(loss, torch.ones((), device="cuda"))


@pytest.mark.gpu
def test_gpu_batch_past_a_grid_dimension():
    """B = 70,000 > 65,535 (the limit of a CUDA grid's second dimension): every image is gathered."""
    B = 70_000
    imgs = make_imgs(B, 1, 4, 4, device="cuda").requires_grad_()
    ids = make_ids(B, 4, 2, device="cuda")
    out = mae_fast.ops.patchify_gather(imgs, ids, 2, norm_pix=True)
    x64 = imgs.detach().double().requires_grad_()
    ref = R.patchify_gather(x64, ids, 2, norm_pix_target=True)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    assert_fp32_close(out, ref.detach())
    assert_fp32_close(imgs.grad, x64.grad, atol=1e-4)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_validate():
    imgs = make_imgs(8, 3, 64, 48, device="cuda").requires_grad_()
    ids = make_ids(8, 12, 4, device="cuda")
    mae_fast.ops.patchify_gather(imgs, ids, 16, norm_pix=True).sum().backward()  # warm-up (compile)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mae_fast.ops.patchify_gather(imgs, ids, 16, norm_pix=True).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad = ids.clone()
    bad[0, 0] = 12
    out = mae_fast.ops.patchify_gather(imgs.detach(), bad, 16)  # no validation: NaN row, no fault
    assert out[0, 0].isnan().all() and not out[1:].isnan().any()
    with pytest.raises(ValueError, match=r"\[0, L=12\)"):
        mae_fast.ops.patchify_gather(imgs, bad, 16, validate=True)


# ----------------------------------------------------------------------------- random shapes (hypothesis)

try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @settings(max_examples=25, deadline=None)
    @given(B=st.integers(1, 2), C=st.integers(1, 5), gh=st.integers(1, 4), gw=st.integers(1, 4),
           ph=st.integers(2, 6), pw=st.integers(2, 6), frac=st.floats(0.0, 1.0), norm_pix=st.booleans(),
           channels_last=st.booleans())
    def test_patchify_gather_random_shapes(B, C, gh, gw, ph, pw, frac, norm_pix, channels_last):
        L = gh * gw
        imgs = make_imgs(B, C, gh * ph, gw * pw, "channels_last" if channels_last else "contiguous")
        ids = make_ids(B, L, max(1, round(frac * L)))
        out = mae_fast.ops.patchify_gather(imgs, ids, (ph, pw), norm_pix=norm_pix)
        ref = R.patchify_gather(imgs.double(), ids, (ph, pw), norm_pix_target=norm_pix)
        assert_fp32_close(out, ref, atol=1e-4)
        full = mae_fast.ops.patchify(imgs, (ph, pw))
        assert torch.equal(full, R.patchify(imgs, (ph, pw)))
        assert torch.equal(mae_fast.ops.unpatchify(full, (ph, pw), (gh * ph, gw * pw)), imgs)
