"""uint8 images into patchify_gather and masked_mse_loss: the pixels are normalised per channel inside
the kernels, and must match normalise-then-float on the reference (float64), forward and backward.

Where: 'triton' (the kernels, interpreted on CPU; needs TRITON_INTERPRET=1), 'torch' (the PyTorch
fallback) and 'cuda' (the compiled kernels; marked gpu). Every buffer the kernels allocate is
NaN-poisoned first, so an element left unwritten fails.
"""
import pytest
import torch

from mae_fast import ops
from mae_fast.ops import _common
from mae_fast.testing import reference as R

from _triton_ops import pair, runs_without_sync, take_path

pytestmark = pytest.mark.usefixtures("poison")  # tests/ops/conftest.py

# B, C, H, W, patch: 1, 3 and 5 channels, H != W, a rectangular patch, L not a power of two
SHAPES = [(1, 1, 6, 10, 2), (2, 3, 8, 12, 4), (2, 5, 12, 8, (4, 2))]
LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.fixture(params=["triton", "torch", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch):
    """The device of one run: 'cpu' on the interpreted kernels or the fallback, or 'cuda'."""
    if request.param == "cuda":
        return "cuda"
    take_path(request.param, monkeypatch)
    return "cpu"


def stats(C):
    """Per-channel statistics unlike ImageNet's (and unlike each other), so a channel mix-up fails."""
    return tuple(0.3 + 0.07 * c for c in range(C)), tuple(0.15 + 0.05 * c for c in range(C))


def make_u8(B, C, H, W, layout="contiguous", device="cpu"):
    if layout == "strided":  # a view that is neither contiguous nor dense
        big = torch.randint(0, 256, (B, C + 1, H + 2, 2 * W), dtype=torch.uint8, device=device)
        return big[:, 1:, 1:H + 1, ::2]
    u = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device=device)
    return u.to(memory_format=torch.channels_last) if layout == "channels_last" else u


def case(shape, device, layout="contiguous"):
    B, C, H, W, patch = shape
    ph, pw = pair(patch)
    L, P = (H // ph) * (W // pw), ph * pw * C
    return make_u8(B, C, H, W, layout, device), L, P


def assert_fp32_close(out, ref64, rtol=1e-5, atol=1e-5):
    assert out.dtype == torch.float32 and not out.isnan().any(), "NaN: an unwritten (poisoned) element?"
    torch.testing.assert_close(out.double(), ref64, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_patchify_gather_uint8_matches_normalise_then_float(shape, norm_pix, layout, device):
    u, L, P = case(shape, device, layout)
    mean, std = stats(u.shape[1])
    ids = torch.rand(u.shape[0], L, device=device).argsort(dim=-1)[:, : max(1, L // 3)]
    out = ops.patchify_gather(u, ids, shape[4], norm_pix=norm_pix, mean=mean, std=std)
    x64 = R.normalize_pixels(u, mean, std)
    assert_fp32_close(out, R.patchify_gather(x64, ids, shape[4], norm_pix_target=norm_pix))
    assert not out.requires_grad
    # backward: the gradient reaches the weights that read the rows (d/dw sum(rows * w) = rows)
    w = torch.randn(out.shape, device=device, requires_grad=True)
    (out * w).sum().backward()
    assert_fp32_close(w.grad, R.patchify_gather(x64, ids, shape[4], norm_pix_target=norm_pix))


@pytest.mark.parametrize("form", ["mask", "ids"])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_masked_mse_loss_uint8_matches_normalise_then_float(shape, norm_pix, form, device):
    u, L, P = case(shape, device, "channels_last" if form == "mask" else "contiguous")
    B = u.shape[0]
    mean, std = stats(u.shape[1])
    noise = torch.rand(B, L, device=device).argsort(dim=-1)
    removed = noise[:, L // 3:]
    if form == "mask":
        kw = dict(mask=torch.zeros(B, L, device=device).scatter_(1, removed, 1.0))
        pred = torch.randn(B, L, P, device=device, requires_grad=True)
    else:
        kw = dict(ids=removed)
        pred = torch.randn(B, removed.shape[1], P, device=device, requires_grad=True)
    loss = ops.masked_mse_loss(pred, u, shape[4], norm_pix=norm_pix, mean=mean, std=std, **kw)
    p64 = pred.detach().double().requires_grad_()
    kw64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    ref = R.masked_mse_loss(p64, R.normalize_pixels(u, mean, std), shape[4], norm_pix_target=norm_pix, **kw64)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    assert_fp32_close(pred.grad, p64.grad, atol=1e-7)


def test_default_statistics_are_imagenets(device):
    u, L, _ = case((2, 3, 8, 12, 4), device)
    ids = torch.rand(2, L, device=device).argsort(dim=-1)[:, :3]
    out = ops.patchify_gather(u, ids, 4)
    assert_fp32_close(out, R.patchify_gather(R.normalize_pixels(u), ids, 4))
    loss = ops.masked_mse_loss(torch.zeros(2, 3, 48, device=device), u, 4, ids=ids, norm_pix=True)
    ref = R.masked_mse_loss(torch.zeros(2, 3, 48, dtype=torch.float64, device=device), R.normalize_pixels(u), 4,
                            ids=ids, norm_pix_target=True)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_float_images_keep_their_behaviour_and_refuse_statistics():
    x = torch.randn(2, 3, 8, 12)
    ids = torch.tensor([[0, 3], [5, 1]])
    assert torch.equal(ops.patchify_gather(x, ids, 4), R.patchify_gather(x, ids, 4))
    with pytest.raises(ValueError, match="mean and std apply to uint8 images only"):
        ops.masked_mse_loss(torch.randn(2, 2, 48), x, 4, ids=ids, std=(0.2, 0.2, 0.2))


def test_statistics_tensor_is_cached_per_device_and_values():
    """The common call makes no new tensor (no host-to-device copy): the (2, C) scale/shift of the
    same statistics on the same device is one cached tensor; other statistics get their own."""
    u = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    a = _common.pixel_affine(u, None, None)
    assert _common.pixel_affine(u, None, None) is a
    assert _common.pixel_affine(u, [0.485, 0.456, 0.406], torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)) is a
    b = _common.pixel_affine(u, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert b is not a
    torch.testing.assert_close(b, torch.tensor([[1 / 63.75] * 3, [-2.0] * 3]))


@pytest.mark.parametrize("pred_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_loss_of_uint8_images_is_float32_like_that_of_float32_images(pred_dtype):
    """uint8 images stand for the float32 images they are normalised to: a half-precision pred
    gets an fp32 loss, as with float32 images (an fp16 loss would overflow a GradScaler's scale)."""
    u = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    pred = torch.randn(2, 4, 48).to(pred_dtype)
    mask = torch.ones(2, 4)
    f = R.normalize_pixels(u, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), dtype=torch.float32)
    assert ops.masked_mse_loss(pred, u, 4, mask=mask).dtype == ops.masked_mse_loss(pred, f, 4, mask=mask).dtype == torch.float32


def test_opcheck_with_uint8_images():
    u = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8)
    affine = _common.pixel_affine(u, None, None)
    ids = torch.rand(2, 6).argsort(dim=-1)
    pred = torch.randn(2, 6, 48, requires_grad=True)
    mask = torch.zeros(2, 6).scatter_(1, ids[:, 2:], 1.0)
    denom = torch.tensor(4 * 48.0 * 2)
    for op, args in [
        (torch.ops.mae_fast.patchify_gather.default, (u, ids[:, :2], 4, 4, True, False, affine)),
        (torch.ops.mae_fast.masked_mse_loss.default, (pred, u, mask, None, 4, 4, True, False, affine)),
        (torch.ops.mae_fast.masked_mse_loss.default,
         (pred[:, 2:].detach().requires_grad_(), u, None, ids[:, 2:], 4, 4, False, False, affine)),
        (torch.ops.mae_fast.masked_mse_loss_backward.default,
         (torch.tensor(1.0), pred.detach(), u, mask, None, denom, 4, 4, True, affine)),
    ]:
        torch.library.opcheck(op, args)


def test_compiles_fullgraph_with_uint8_images():
    u = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8)
    ids = torch.rand(2, 6).argsort(dim=-1)
    w = torch.randn(48, 48, requires_grad=True)
    mean, std = stats(3)

    def step(u, w):
        rows = ops.patchify_gather(u, ids[:, :2], 4, norm_pix=True, mean=mean, std=std)
        return ops.masked_mse_loss(rows @ w, u, 4, ids=ids[:, :2], norm_pix=True, mean=mean, std=std)

    eager = step(u, w)
    (g_eager,) = torch.autograd.grad(eager, w)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(u, w)
    (g_compiled,) = torch.autograd.grad(compiled, w)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.gpu
def test_gpu_uint8_ops_never_sync_the_host():
    u = torch.randint(0, 256, (4, 3, 32, 48), dtype=torch.uint8, device="cuda")
    ids = torch.rand(4, 24, device="cuda").argsort(dim=-1)
    w = torch.randn(192, 192, device="cuda", requires_grad=True)

    def step():
        rows = ops.patchify_gather(u, ids[:, :6], 8, norm_pix=True)
        loss = ops.masked_mse_loss(rows @ w, u, 8, ids=ids[:, :6], norm_pix=True)
        loss.backward()
        return loss.detach()

    losses = runs_without_sync(step)
    assert torch.isfinite(losses[-1])
