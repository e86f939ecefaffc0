"""mae_fast.ops.masked_mse_loss (official mask= and vit-pytorch ids= forms) against the eager reference.

CPU tensors run the Triton kernels of mae_fast.kernels.masked_mse_loss under the interpreter
(the conftest sets TRITON_INTERPRET=1 without a GPU); the PyTorch fallback is tested with it off;
float64 (gradcheck) always takes the fallback. Every buffer the kernels write (partial sums, loss,
gradient) is NaN-poisoned first.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import mae_fast
from mae_fast.testing import reference as R

P_ops = importlib.import_module("mae_fast.ops._common")
from _triton_ops import INTERPRET, LAYOUTS, SHAPES, make_imgs, pair

pytestmark = pytest.mark.usefixtures("poison")  # tests/ops/conftest.py


def make_pred(B, R_, P, layout, dtype=torch.float32, device="cpu"):
    if layout == "strided":  # feature stride != 1
        return torch.randn(B, P, R_, dtype=dtype, device=device).transpose(1, 2)
    return torch.randn(B, R_, P, dtype=dtype, device=device)


def dims(shape):
    B, C, H, W, patch = shape
    ph, pw = pair(patch)
    return B, (H // ph) * (W // pw), ph * pw * C


def make_mask(B, L, ratio, device="cpu"):
    """Official masking with the given ratio; at least one removed patch."""
    _, mask, _ = R.random_masking(B, L, ratio, device=device)
    mask[:, 0] = 1.0
    return mask


def make_removed_ids(B, L, ratio, device="cpu", dtype=torch.int64):
    M = min(L, max(1, int(round(ratio * L))))
    return torch.rand(B, L, device=device).argsort(dim=-1)[:, :M].to(dtype)


def assert_2x_rule(out, ref64, torch_low, atol):
    assert not out.isnan().any()
    err = (out.double() - ref64).abs()
    bound = 2 * (torch_low.double() - ref64).abs() + atol
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


def run(pred, imgs, patch, mode_arg, norm_pix, imgs_grad=False):
    """Our loss and the float64 reference, forward and backward; returns both (loss, grads)."""
    p = pred.detach().clone().requires_grad_()
    x = imgs.detach().clone().requires_grad_(imgs_grad)
    loss = mae_fast.ops.masked_mse_loss(p, x, patch, norm_pix=norm_pix, **mode_arg)
    loss.backward()
    p64 = pred.detach().double().requires_grad_()
    x64 = imgs.detach().double().requires_grad_(imgs_grad)
    arg64 = {k: (v.double() if k == "mask" else v) for k, v in mode_arg.items()}
    ref = R.masked_mse_loss(p64, x64, patch, norm_pix_target=norm_pix, **arg64)
    ref.backward()
    return (loss, p.grad, x.grad), (ref, p64.grad, x64.grad)


# ----------------------------------------------------------------------------- parity, fp32

@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("ratio", [0.1, 0.75, 0.95])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_official_mask_loss_matches_reference(shape, layout, ratio, norm_pix):
    B, L, P = dims(shape)
    imgs = make_imgs(*shape[:4], layout)
    pred = make_pred(B, L, P, layout)
    mask = make_mask(B, L, ratio)
    if layout == "strided":
        mask = mask.t().contiguous().t()  # a transposed (B, L) mask
    (loss, gp, _), (ref, gp64, _) = run(pred, imgs, shape[4], {"mask": mask}, norm_pix)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert gp.shape == pred.shape and not gp.isnan().any()
    torch.testing.assert_close(gp.double(), gp64, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("ratio", [0.1, 0.75, 1.0])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vit_pytorch_ids_loss_matches_reference(shape, layout, ratio, norm_pix):
    B, L, P = dims(shape)
    imgs = make_imgs(*shape[:4], layout)
    ids = make_removed_ids(B, L, ratio, dtype=torch.int32 if ratio == 0.75 else torch.int64)
    if layout == "strided":
        ids = ids.t().contiguous().t()  # transposed (B, M) ids
    pred = make_pred(B, ids.shape[1], P, layout)
    (loss, gp, _), (ref, gp64, _) = run(pred, imgs, shape[4], {"ids": ids}, norm_pix)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert not gp.isnan().any()
    torch.testing.assert_close(gp.double(), gp64, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mode", ["mask", "ids"])
def test_image_gradient_when_imgs_requires_grad(mode, norm_pix):
    shape = (2, 3, 8, 12, (4, 2))
    B, L, P = dims(shape)
    imgs = make_imgs(*shape[:4], "channels_last")
    arg = {"mask": make_mask(B, L, 0.5)} if mode == "mask" else {"ids": make_removed_ids(B, L, 0.5)}
    pred = torch.randn(B, L if mode == "mask" else arg["ids"].shape[1], P)
    (loss, gp, gx), (ref, gp64, gx64) = run(pred, imgs, shape[4], arg, norm_pix, imgs_grad=True)
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-5, atol=1e-6)


def test_mask_weights_and_bool_mask():
    """Non-binary weights multiply per patch like the reference; a bool mask acts as 0/1."""
    shape = (2, 3, 8, 12, 4)
    B, L, P = dims(shape)
    imgs, pred = make_imgs(*shape[:4]), torch.randn(B, L, P)
    w = torch.rand(B, L)
    (loss, gp, _), (ref, gp64, _) = run(pred, imgs, 4, {"mask": w}, True)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp.double(), gp64, rtol=1e-5, atol=1e-7)
    b = w > 0.5
    b[0, 0] = True
    out = mae_fast.ops.masked_mse_loss(pred, imgs, 4, mask=b)
    torch.testing.assert_close(out, R.masked_mse_loss(pred, imgs, 4, mask=b.float()))


# ----------------------------------------------------------------------------- parity, fp16 (2x rule) and dtypes

@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mode", ["mask", "ids"])
def test_fp16_two_x_rule(mode, norm_pix):
    shape = (2, 3, 16, 24, 4)
    B, L, P = dims(shape)
    imgs = make_imgs(*shape[:4], "channels_last", dtype=torch.float16)
    if mode == "mask":
        arg, arg16 = {"mask": make_mask(B, L, 0.75)}, None
        arg16 = {"mask": arg["mask"].half()}
    else:
        arg = arg16 = {"ids": make_removed_ids(B, L, 0.75)}
    R_ = L if mode == "mask" else arg["ids"].shape[1]
    pred = (torch.randn(B, R_, P) * 0.5).half()
    p = pred.clone().requires_grad_()
    loss = mae_fast.ops.masked_mse_loss(p, imgs, 4, norm_pix=norm_pix, **arg16)
    loss.backward()
    assert loss.dtype == torch.float16 and p.grad.dtype == torch.float16
    p64 = pred.double().requires_grad_()
    ref = R.masked_mse_loss(p64, imgs.double(), 4, norm_pix_target=norm_pix,
                            **{k: (v.double() if k == "mask" else v) for k, v in arg.items()})
    ref.backward()
    p16 = pred.clone().requires_grad_()
    low = R.masked_mse_loss(p16, imgs, 4, norm_pix_target=norm_pix, **arg16)
    low.backward()
    assert_2x_rule(loss.reshape(1), ref.detach().reshape(1), low.detach().reshape(1), atol=1e-3)
    assert_2x_rule(p.grad, p64.grad, p16.grad, atol=1e-5)


def test_mixed_dtypes_follow_the_reference():
    """fp16 pred (autocast decoder) with fp32 images and mask: the loss comes out fp32 as in the
    reference; the pred gradient is fp16."""
    imgs = make_imgs(2, 3, 8, 12)
    mask = make_mask(2, 6, 0.75)
    pred = torch.randn(2, 6, 48).half().requires_grad_()
    loss = mae_fast.ops.masked_mse_loss(pred, imgs, 4, mask=mask, norm_pix=True)
    ref = R.masked_mse_loss(pred.detach().float(), imgs, 4, mask=mask, norm_pix_target=True)
    assert loss.dtype == R.masked_mse_loss(pred.detach(), imgs, 4, mask=mask).dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert pred.grad.dtype == torch.float16


# ----------------------------------------------------------------------------- fallback (no Triton)

@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mode", ["mask", "ids"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fallback_matches_reference(monkeypatch, layout, mode, norm_pix):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    shape = (2, 4, 12, 8, (4, 2))
    B, L, P = dims(shape)
    imgs = make_imgs(*shape[:4], layout)
    assert P_ops.triton_kernels("masked_mse_loss", imgs) is None
    arg = {"mask": make_mask(B, L, 0.75)} if mode == "mask" else {"ids": make_removed_ids(B, L, 0.75)}
    pred = make_pred(B, L if mode == "mask" else arg["ids"].shape[1], P, layout)
    (loss, gp, gx), (ref, gp64, gx64) = run(pred, imgs, shape[4], arg, norm_pix, imgs_grad=True)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp.double(), gp64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_gradcheck_float64(norm_pix):
    imgs = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float64)
    pred = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, x: mae_fast.ops.masked_mse_loss(p, x, 2, mask=mask, norm_pix=norm_pix), (pred, imgs))
    ids = torch.tensor([[5, 0, 2], [1, 4, 3]])
    pred_m = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, x: mae_fast.ops.masked_mse_loss(p, x, 2, ids=ids, norm_pix=norm_pix), (pred_m, imgs))


# ----------------------------------------------------------------------------- edge values, on both paths

def mode_arg_with_patch0(mode, B, L):
    """A mask or removed ids (half of the patches) that always hold patch 0."""
    if mode == "mask":
        return {"mask": make_mask(B, L, 0.5)}
    order = torch.rand(B, L)
    order[:, 0] = -1.0
    return {"ids": order.argsort(dim=-1)[:, :L // 2]}


@pytest.mark.parametrize("scale", [1e30, 1e37])
@pytest.mark.parametrize("mode", ["mask", "ids"])
def test_norm_pix_of_huge_images_matches_float64(path, mode, scale):
    """Patches whose squares overflow fp32 (the reference's fp32 variance is inf there, its targets
    0 and its loss wrong): the loss and pred's gradient match float64, and so does imgs' gradient
    while it stays above fp32's normal range. Patch 0 of image 0 is constant (2**100, an exact mean):
    its target is 0."""
    shape = (2, 3, 8, 12, 4)
    B, L, P = dims(shape)
    imgs = make_imgs(*shape[:4]) * scale
    imgs[0, :, :4, :4] = 2.0 ** 100
    arg = mode_arg_with_patch0(mode, B, L)
    pred = torch.randn(B, L if mode == "mask" else arg["ids"].shape[1], P)
    imgs_grad = scale < 1e35
    (loss, gp, gx), (ref, gp64, gx64) = run(pred, imgs, 4, arg, True, imgs_grad=imgs_grad)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(gp.double(), gp64, rtol=1e-5, atol=1e-7)
    if imgs_grad:
        assert torch.isfinite(gx).all()
        torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5 * gx64.abs().max().item())


@pytest.mark.parametrize("norm_pix", [False, True])
def test_non_finite_values_in_kept_rows_are_not_read(path, norm_pix):
    """Kept rows (mask 0) are not read by the kernels, nor by the fallback: NaN / inf in their pred
    rows and image patches change neither the loss nor pred's gradient (0 on kept rows); with ids, a
    NaN patch outside ids is not read either."""
    B, L, P = dims((2, 3, 8, 12, 4))
    imgs, pred = make_imgs(2, 3, 8, 12), torch.randn(B, L, P)
    mask = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]])
    bad_pred, bad_imgs = pred.clone(), imgs.clone()
    bad_pred[0, 1], bad_pred[1, 4, :3] = math.nan, math.inf  # kept rows
    bad_imgs[0, :, :4, 4:8], bad_imgs[1, 0, 4:, 8:] = math.nan, -math.inf  # kept patches 1 and 5
    clean_loss, clean_grad = _loss_and_grad(pred, imgs, mask=mask, norm_pix=norm_pix)
    loss, grad = _loss_and_grad(bad_pred, bad_imgs, mask=mask, norm_pix=norm_pix)
    assert torch.isfinite(loss) and torch.equal(loss, clean_loss)
    assert torch.equal(grad, clean_grad) and not grad[mask == 0].any()
    ids = torch.tensor([[0, 2], [1, 2]])  # not patch 1 (image 0) nor 5 (image 1)
    clean_loss, clean_grad = _loss_and_grad(pred[:, :2], imgs, ids=ids, norm_pix=norm_pix)
    loss, grad = _loss_and_grad(pred[:, :2], bad_imgs, ids=ids, norm_pix=norm_pix)
    assert torch.equal(loss, clean_loss) and torch.equal(grad, clean_grad)


def _loss_and_grad(pred, imgs, **kw):
    p = pred.clone().requires_grad_()
    loss = mae_fast.ops.masked_mse_loss(p, imgs, 4, **kw)
    loss.backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize("wrt", ["pred", "imgs"])
def test_double_backward_is_refused(path, wrt):
    """A gradient of the gradient names the op (imgs': through patchify_gather's backward) rather
    than an internal backward op."""
    pred, imgs = torch.randn(2, 6, 48, requires_grad=True), make_imgs(2, 3, 8, 12).requires_grad_()
    loss = mae_fast.ops.masked_mse_loss(pred, imgs, 4, mask=make_mask(2, 6, 0.5), norm_pix=True)
    (g,) = torch.autograd.grad(loss, pred if wrt == "pred" else imgs, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"double backward of mae_fast\.ops\..*masked_mse_loss.* is not supported"):
        g.sum().backward()


# ----------------------------------------------------------------------------- torch.library / compile / determinism

def test_opcheck():
    shape = (2, 3, 8, 12, (4, 2))
    B, L, P = dims(shape)
    imgs = make_imgs(*shape[:4], "channels_last")
    mask = make_mask(B, L, 0.75)
    ids = make_removed_ids(B, L, 0.5)
    M = ids.shape[1]
    cases = [
        (torch.ops.mae_fast.masked_mse_loss.default,
         (torch.randn(B, L, P, requires_grad=True), imgs.clone().requires_grad_(), mask, None, 4, 2, True, False)),
        (torch.ops.mae_fast.masked_mse_loss.default,
         (torch.randn(B, M, P, requires_grad=True), imgs, None, ids.int(), 4, 2, False, True)),
        (torch.ops.mae_fast.masked_mse_loss_backward.default,
         (torch.tensor(0.5), torch.randn(B, L, P), imgs, mask, None, mask.sum() * P, 4, 2, True)),
        (torch.ops.mae_fast.masked_mse_loss_backward.default,
         (torch.tensor(0.5), torch.randn(B, M, P), imgs, None, ids, torch.tensor(float(B * M * P)), 4, 2, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("mode", ["mask", "ids"])
def test_torch_compile_fullgraph(mode):
    shape = (2, 3, 8, 12, 4)
    B, L, P = dims(shape)
    imgs = make_imgs(*shape[:4])
    arg = {"mask": make_mask(B, L, 0.75)} if mode == "mask" else {"ids": make_removed_ids(B, L, 0.75)}
    pred = torch.randn(B, L if mode == "mask" else arg["ids"].shape[1], P)

    def f(p, x):
        return mae_fast.ops.masked_mse_loss(p * 1.5, x, 4, norm_pix=True, **arg)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    l1, l2 = compiled(p1, imgs), f(p2, imgs)
    torch.testing.assert_close(l1, l2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(p1.grad, p2.grad)


def test_deterministic():
    shape = (2, 3, 32, 48, 16)
    B, L, P = dims(shape)
    imgs = make_imgs(*shape[:4], "channels_last")
    mask = make_mask(B, L, 0.75)
    pred = torch.randn(B, L, P)
    runs = []
    for _ in range(2):
        p = pred.clone().requires_grad_()
        loss = mae_fast.ops.masked_mse_loss(p, imgs, 16, mask=mask, norm_pix=True)
        loss.backward()
        runs.append((loss, p.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ----------------------------------------------------------------------------- bad input

def _imgs():
    return torch.randn(2, 3, 8, 12)


def _loss(pred=None, imgs=None, patch=4, **kw):
    pred = torch.randn(2, 6, 48) if pred is None else pred
    return mae_fast.ops.masked_mse_loss(pred, _imgs() if imgs is None else imgs, patch, **kw)


_MASK = torch.ones(2, 6)
_IDS = torch.tensor([[0, 1], [2, 3]])
BAD = [
    ("both mask and ids", lambda: _loss(mask=_MASK, ids=_IDS), ValueError, r"exactly one of mask.*both"),
    ("neither", lambda: _loss(), ValueError, r"exactly one of mask.*neither"),
    ("H not a multiple", lambda: _loss(imgs=torch.randn(2, 3, 9, 12), mask=_MASK), ValueError, r"height H=9"),
    ("W not a multiple", lambda: _loss(imgs=torch.randn(2, 3, 8, 13), mask=_MASK), ValueError, r"width W=13"),
    ("pred last dim", lambda: _loss(pred=torch.randn(2, 6, 47), mask=_MASK), ValueError, r"ph\*pw\*C = 4\*4\*3 = 48"),
    ("pred 2-D", lambda: _loss(pred=torch.randn(2, 288), mask=_MASK), ValueError, r"pred must be 3-D"),
    ("pred rows vs mask", lambda: _loss(pred=torch.randn(2, 5, 48), mask=_MASK), ValueError, r"pred must have shape \(B=2, L=6"),
    ("pred rows vs ids", lambda: _loss(pred=torch.randn(2, 3, 48), ids=_IDS), ValueError, r"pred must have shape \(B=2, M=2"),
    ("pred int", lambda: _loss(pred=torch.zeros(2, 6, 48, dtype=torch.long), mask=_MASK), TypeError, r"pred .*floating"),
    ("mask shape", lambda: _loss(mask=torch.ones(2, 5)), ValueError, r"mask must have shape \(B=2, L=6\)"),
    ("mask batch", lambda: _loss(mask=torch.ones(1, 6)), ValueError, r"mask must have shape \(B=2, L=6\)"),
    ("mask int", lambda: _loss(mask=torch.ones(2, 6, dtype=torch.long)), TypeError, r"mask must be a float"),
    ("all-zero mask", lambda: _loss(mask=torch.zeros(2, 6)), ValueError, r"all-zero mask"),
    ("ids float", lambda: _loss(pred=torch.randn(2, 2, 48), ids=_IDS.float()), TypeError, r"ids .*int32 or int64"),
    ("ids shape", lambda: _loss(pred=torch.randn(2, 2, 48), ids=_IDS[:1]), ValueError, r"ids must have shape \(B=2"),
    ("ids = L", lambda: _loss(pred=torch.randn(2, 2, 48), ids=torch.tensor([[0, 6], [1, 2]])), ValueError, r"\[0, L=6\)"),
    ("ids < 0", lambda: _loss(pred=torch.randn(2, 2, 48), ids=torch.tensor([[0, 1], [-1, 2]])), ValueError, r"\[0, L=6\)"),
    ("ids repeated, validate", lambda: _loss(pred=torch.randn(2, 2, 48), ids=torch.tensor([[0, 0], [1, 2]]), validate=True),
     ValueError, r"distinct"),
    ("ids repeated, CPU", lambda: _loss(pred=torch.randn(2, 2, 48), ids=torch.tensor([[0, 0], [1, 2]])),
     ValueError, r"ids must be distinct"),
    ("NaN mask", lambda: _loss(mask=torch.full((2, 6), math.nan)), ValueError, r"mask must be finite"),
    ("negative mask", lambda: _loss(mask=torch.tensor([[1.0, -1, 0, 0, 0, 0]] * 2)), ValueError, r"non-negative"),
    ("empty batch", lambda: _loss(pred=torch.randn(0, 6, 48), imgs=torch.randn(0, 3, 8, 12), mask=torch.ones(0, 6)),
     ValueError, r"empty batch \(B=0\)"),
    ("norm_pix P=1", lambda: _loss(pred=torch.randn(2, 4, 1), imgs=torch.randn(2, 1, 2, 2), patch=1, mask=torch.ones(2, 4),
                                   norm_pix=True), ValueError, r"norm_pix needs ph\*pw\*C >= 2"),
    ("patch_size", lambda: _loss(patch="4", mask=_MASK), TypeError, r"patch_size"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_out_of_range_ids_give_nan_without_stray_access():
    """What unvalidated CUDA ids do, shown on the kernels: NaN loss and NaN rows of gradient."""
    if not INTERPRET:
        pytest.skip("needs the interpreter on CPU")
    from mae_fast.kernels import masked_mse_loss as kl

    imgs = make_imgs(2, 3, 8, 12)
    ids = torch.tensor([[0, (1 << 32) + 1], [2, 3]])  # wraps to 1 in int32
    pred = torch.randn(2, 2, 48)
    loss, denom = kl.masked_mse_loss_fwd(pred, imgs, None, ids, 4, 4)
    assert loss.isnan() and denom == 2 * 2 * 48
    g = kl.masked_mse_loss_bwd(torch.tensor(1.0), denom, pred, imgs, None, ids, 4, 4)
    assert g[0, 1].isnan().all() and not g[0, 0].isnan().any() and not g[1].isnan().any()
    zero = kl.masked_mse_loss_fwd(torch.randn(2, 6, 48), imgs, torch.zeros(2, 6), None, 4, 4)[0]
    assert zero.isnan()  # all-zero mask without validation: 0 / 0 like the reference


def test_torch_compile_inductor_fullgraph():
    """Both ops inside one inductor-compiled graph, forward and backward (CPU)."""
    imgs = make_imgs(2, 3, 8, 12, "channels_last")
    mask = make_mask(2, 6, 0.75)
    keep = torch.tensor([[0, 1], [2, 3]])

    def f(p, x):
        rows = mae_fast.ops.patchify_gather(x, keep, 4, norm_pix=True)
        return mae_fast.ops.masked_mse_loss(p * 1.5, x, 4, mask=mask, norm_pix=True) + rows.square().mean()

    compiled = torch.compile(f, fullgraph=True)
    pred = torch.randn(2, 6, 48)
    (p1, x1), (p2, x2) = [(pred.clone().requires_grad_(), imgs.clone().requires_grad_()) for _ in range(2)]
    l1, l2 = compiled(p1, x1), f(p2, x2)
    torch.testing.assert_close(l1, l2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(p1.grad, p2.grad)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_vit_pytorch_loss_equals_f_mse_loss_of_gathered_rows():
    imgs = make_imgs(2, 3, 8, 12)
    ids = make_removed_ids(2, 6, 0.75)
    pred = torch.randn(2, ids.shape[1], 48)
    target = mae_fast.ops.patchify_gather(imgs, ids, 4, norm_pix=True)
    torch.testing.assert_close(mae_fast.ops.masked_mse_loss(pred, imgs, 4, ids=ids, norm_pix=True),
                               F.mse_loss(pred, target), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- GPU (compiled kernels)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mode", ["mask", "ids"])
def test_gpu_vit_b16_loss(mode, norm_pix, dtype):
    B, C, H, W, patch = 64, 3, 224, 224, 16
    L, P = 196, 768
    imgs = make_imgs(B, C, H, W, "channels_last", dtype=dtype, device="cuda")
    if mode == "mask":
        arg = {"mask": make_mask(B, L, 0.75, device="cuda")}
        arg_low = arg
    else:
        arg = arg_low = {"ids": make_removed_ids(B, L, 0.75, device="cuda")}
    pred = torch.randn(B, L if mode == "mask" else 147, P, device="cuda").to(dtype)
    p = pred.clone().requires_grad_()
    loss = mae_fast.ops.masked_mse_loss(p, imgs, patch, norm_pix=norm_pix, **arg)
    loss.backward()
    p64 = pred.double().requires_grad_()
    ref = R.masked_mse_loss(p64, imgs.double(), patch, norm_pix_target=norm_pix,
                            **{k: (v.double() if k == "mask" else v) for k, v in arg.items()})
    ref.backward()
    if dtype == torch.float32:
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-9)
    else:
        pl = pred.clone().requires_grad_()
        low = R.masked_mse_loss(pl, imgs, patch, norm_pix_target=norm_pix, **arg_low)
        low.backward()
        assert_2x_rule(loss.double().reshape(1), ref.detach().reshape(1), low.detach().reshape(1), atol=1e-3)
        assert_2x_rule(p.grad, p64.grad, pl.grad, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["mask", "ids"])
def test_gpu_batch_past_a_grid_dimension(mode):
    """B = 70,000 > 65,535 (the limit of a CUDA grid's second dimension): every image counts."""
    B, L, P = 70_000, 4, 4
    imgs = make_imgs(B, 1, 4, 4, device="cuda")
    arg = {"mask": make_mask(B, L, 0.5, device="cuda")} if mode == "mask" else \
        {"ids": make_removed_ids(B, L, 0.5, device="cuda")}
    p = torch.randn(B, L if mode == "mask" else 2, P, device="cuda", requires_grad=True)
    loss = mae_fast.ops.masked_mse_loss(p, imgs, 2, norm_pix=True, **arg)
    loss.backward()
    p64 = p.detach().double().requires_grad_()
    ref = R.masked_mse_loss(p64, imgs.double(), 2, norm_pix_target=True,
                            **{k: (v.double() if k == "mask" else v) for k, v in arg.items()})
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.gpu
def test_gpu_deterministic_no_sync_and_validate():
    B, L, P = 32, 196, 768
    imgs = make_imgs(B, 3, 224, 224, device="cuda")
    mask = make_mask(B, L, 0.75, device="cuda")
    pred = torch.randn(B, L, P, device="cuda")
    runs = []
    for i in range(3):
        p = pred.clone().requires_grad_()
        if i == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = mae_fast.ops.masked_mse_loss(p, imgs, 16, mask=mask, norm_pix=True)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        runs.append((loss, p.grad))
    assert all(torch.equal(runs[0][0], r[0]) and torch.equal(runs[0][1], r[1]) for r in runs[1:])
    with pytest.raises(ValueError, match="all-zero mask"):
        mae_fast.ops.masked_mse_loss(pred, imgs, 16, mask=torch.zeros_like(mask), validate=True)
    assert mae_fast.ops.masked_mse_loss(pred, imgs, 16, mask=torch.zeros_like(mask)).isnan()
    ids = torch.full((B, 2), L, device="cuda")
    with pytest.raises(ValueError, match=r"\[0, L=196\)"):
        mae_fast.ops.masked_mse_loss(pred[:, :2], imgs, 16, ids=ids, validate=True)
