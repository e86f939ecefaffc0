"""Benchmarks (measurements, not tests): the fused patchify_gather and masked MSE loss against
the eager reference and torch.compile(reference), forward and forward+backward.

CUDA: ViT-B/16 shapes (224x224, batch 256, mask ratio 0.75: K = 49 kept, M = 147 removed, P = 768),
fp32 and bf16, data already on the device; each pytest-benchmark round synchronises, and the
median of triton.testing.do_bench (no per-call sync) is recorded too and used for the bandwidth.
CPU: small shapes, the PyTorch fallback (TRITON_INTERPRET is switched off here), fp32, 1 thread.

test_bench_image_input: the model's two reads of the image, the gather of the visible rows and the
loss over the removed ones (forward + backward), on uint8 pixels normalised inside the kernels,
against a float32 image normalised already (data on the device as float), and against uint8
normalised into a float copy first (mae_fast.data.normalize_batch, then the float path).

benchmark.extra_info holds the counted bytes (the minimum traffic of the op: the rows it must
read and write, mask/ids included, nothing for the targets it computes on the fly), the achieved
GB/s, and the speedup over the eager reference measured in the same run. A summary table is
printed at the end of the module.

    pytest benchmarks/test_bench_patchify_loss.py --benchmark-group-by=group
"""

import pytest
import torch

import mae_fast
from mae_fast.data import normalize_batch
from mae_fast.testing import reference as R

from benchmarks.common import CPU_COMPILE_ALL, CUDA, DEVICE, device_name

# B, C, H, W, patch, mask ratio
SHAPE = (256, 3, 224, 224, 16, 0.75) if CUDA else (8, 3, 64, 96, 16, 0.75)
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
IMPLS = ["mae_fast", "eager", "compiled"]
OPS = ["patchify_gather", "loss_mask", "loss_ids"]
MODES = ["fwd", "fwd_bwd"]

_RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def _summary(op_suite_env, print_op_table):
    yield
    print_op_table(f"patchify/loss benchmarks on {device_name()}, torch {torch.__version__}, shape {SHAPE}", _RESULTS)



def _inputs(op, dtype):
    B, C, H, W, p, ratio = SHAPE
    L, P = (H // p) * (W // p), p * p * C
    g = torch.Generator(device=DEVICE).manual_seed(0)
    imgs = torch.randn(B, C, H, W, device=DEVICE, dtype=torch.float32, generator=g).to(dtype)
    ids_keep, mask, _ = R.random_masking(B, L, ratio, device=DEVICE)
    removed = torch.rand(B, L, device=DEVICE).argsort(dim=-1)[:, :int(ratio * L)]
    es = imgs.element_size()
    if op == "patchify_gather":
        K = ids_keep.shape[1]
        return dict(imgs=imgs, ids=ids_keep, P=P, p=p, rows=K,
                    fwd_bytes=B * K * P * 2 * es + ids_keep.numel() * 8,
                    # grad rows + image patches (norm-pix recompute) read, whole image gradient written
                    bwd_bytes=B * K * P * 2 * es + imgs.numel() * es + ids_keep.numel() * 8)
    if op == "loss_mask":
        pred = torch.randn(B, L, P, device=DEVICE, generator=g).to(dtype)
        removed_rows = int(ratio * L)
        return dict(imgs=imgs, pred=pred, mask=mask, P=P, p=p,
                    fwd_bytes=B * removed_rows * P * 2 * es + mask.numel() * 4,
                    bwd_bytes=B * removed_rows * P * 2 * es + mask.numel() * 4 + pred.numel() * es)
    M = removed.shape[1]
    pred = torch.randn(B, M, P, device=DEVICE, generator=g).to(dtype)
    return dict(imgs=imgs, pred=pred, ids=removed, P=P, p=p,
                fwd_bytes=B * M * P * 2 * es + removed.numel() * 8,
                bwd_bytes=B * M * P * 3 * es + removed.numel() * 8)


def _fn(op, impl, mode, x):
    """A no-argument callable running one forward (+ backward) of the case."""
    p = x["p"]
    if op == "patchify_gather":
        def f_mae(imgs):
            return mae_fast.ops.patchify_gather(imgs, x["ids"], p, norm_pix=True)

        def f_ref(imgs):
            return R.patchify_gather(imgs, x["ids"], p, norm_pix_target=True)
        arg = x["imgs"]
    else:
        kw = {"mask": x["mask"]} if op == "loss_mask" else {"ids": x["ids"]}
        norm = op == "loss_mask"  # the official loss with norm_pix_loss; the vit-pytorch loss without

        def f_mae(pred):
            return mae_fast.ops.masked_mse_loss(pred, x["imgs"], p, norm_pix=norm, **kw)

        def f_ref(pred):
            return R.masked_mse_loss(pred, x["imgs"], p, norm_pix_target=norm, **kw)
        arg = x["pred"]
    f = {"mae_fast": f_mae, "eager": f_ref, "compiled": None}[impl]
    if impl == "compiled":
        f = torch.compile(f_ref, fullgraph=True, dynamic=False)
    if mode == "fwd":
        return lambda: f(arg)
    arg = arg.detach().requires_grad_()
    out0 = f(arg)
    grad_out = torch.randn_like(out0)
    return lambda: torch.autograd.grad(f(arg), arg, grad_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, median_op_seconds, op, impl, mode, dtype):
    if not CUDA and impl == "compiled" and not CPU_COMPILE_ALL and not (op == "loss_mask" and mode == "fwd_bwd"):
        pytest.skip("compiled baseline on CPU only for loss_mask fwd_bwd (MAE_FAST_BENCH_COMPILE_ALL=1 for all)")
    x = _inputs(op, dtype)
    fn = _fn(op, impl, mode, x)
    nbytes = x["fwd_bytes"] + (x["bwd_bytes"] if mode == "fwd_bwd" else 0)
    case = f"{op}-{mode}-{str(dtype).split('.')[-1]}"
    benchmark.group = case
    sec = median_op_seconds(benchmark, fn)
    _RESULTS[(case, impl)] = (sec, nbytes)
    benchmark.extra_info.update(
        device=device_name(), shape=list(SHAPE), bytes=nbytes, median_s=sec, gbps=nbytes / sec / 1e9,
        timer="triton.testing.do_bench median" if CUDA else "pytest-benchmark median")
    eager = _RESULTS.get((case, "eager"))
    if eager is not None and impl != "eager":
        benchmark.extra_info["speedup_vs_eager"] = eager[0] / sec


IMAGE_INPUTS = ["uint8", "float32", "norm+f32"]


@pytest.mark.parametrize("image_input", IMAGE_INPUTS)
def test_bench_image_input(benchmark, median_op_seconds, image_input):
    B, C, H, W, p, ratio = SHAPE
    L, P = (H // p) * (W // p), p * p * C
    K = int(L * (1 - ratio))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    u8 = torch.randint(0, 256, (B, C, H, W), device=DEVICE, dtype=torch.uint8, generator=g)
    ids = torch.rand(B, L, device=DEVICE, generator=g).argsort(dim=-1)
    keep, removed = ids[:, :K].contiguous(), ids[:, K:]
    pred = torch.randn(B, L - K, P, device=DEVICE, generator=g).requires_grad_()
    mean, std = (torch.tensor(v, device=DEVICE) for v in (mae_fast.ops._common.IMAGENET_MEAN,
                                                          mae_fast.ops._common.IMAGENET_STD))
    prepared = normalize_batch(u8, mean, std)
    image = {"uint8": lambda: u8, "float32": lambda: prepared, "norm+f32": lambda: normalize_batch(u8, mean, std)}

    def step():
        imgs = image[image_input]()
        rows = mae_fast.ops.patchify_gather(imgs, keep, p, norm_pix=False)
        loss = mae_fast.ops.masked_mse_loss(pred, imgs, p, ids=removed, norm_pix=True)
        return rows, torch.autograd.grad(loss, pred)

    es = 1 if image_input == "uint8" else 4
    # image rows read (gather, loss forward, loss backward), rows written, pred read twice, its gradient written
    nbytes = B * P * (K + 2 * (L - K)) * es + B * K * P * 4 + 3 * pred.numel() * 4 + ids.numel() * 8
    if image_input == "norm+f32":
        nbytes += u8.numel() * (1 + 4)  # the float copy: uint8 read, float32 written
    case = "gather+loss-fwd_bwd-image_input"
    benchmark.group = case
    sec = median_op_seconds(benchmark, step)
    _RESULTS[(case, image_input)] = (sec, nbytes)
    benchmark.extra_info.update(device=device_name(), shape=list(SHAPE), bytes=nbytes, median_s=sec,
                                gbps=nbytes / sec / 1e9, image_input=image_input,
                                timer="triton.testing.do_bench median" if CUDA else "pytest-benchmark median")
