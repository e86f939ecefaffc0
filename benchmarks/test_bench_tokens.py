"""Benchmarks (measurements, not tests): the token shuffle (gather_tokens) and the decoder-input
unshuffle (unshuffle_tokens) against the eager ways of the vit-pytorch and the official code and
torch.compile of those, forward and forward+backward.

  unshuffle_official  cls prefix, fp32 frozen pos table (1, 1 + L, D), fp32 mask_token (1, 1, D);
                      eager = cat([x[:, 1:], mask tokens]) + gather by ids_restore + cat cls + pos
                      (reference.MaskedAutoencoderViT.forward_decoder)
  unshuffle_vit_pytorch
                      no prefix, learnable fp32 pos (L, D) (its gradient is computed), mask_token (D,);
                      eager = torch.zeros + two index_put writes of (tokens + pos rows) and
                      (mask tokens + pos rows) (vit_pytorch/mae.py)
  gather              x (B, L, D) -> (B, K, D) rows ids_keep; eager = torch.gather (reference)

The eager baselines cast the fp32 parameters to the activation dtype first, so every
implementation returns the activation dtype (the official code would otherwise promote to fp32).

CUDA: B=256, L=196 (224/16), K=49 (mask ratio 0.75), D=512 bf16 (the MAE decoder), D=1024 bf16 and
fp32 (ViT-L width); data already on the device; median of triton.testing.do_bench (no per-call
sync), pytest-benchmark rounds synchronise. CPU: small shapes, 1 thread; the compiled baselines
only with MAE_FAST_BENCH_COMPILE_ALL=1 (each compile costs seconds on a small CPU).

benchmark.extra_info holds the counted bytes (the minimum traffic: rows read and written once,
index tensors, the pos table and its gradient where computed), the achieved GB/s and the speedup
over the eager baseline measured in the same run. A summary table is printed at the end.

    pytest benchmarks/test_bench_tokens.py --benchmark-group-by=group
"""

import pytest
import torch

import mae_fast
from mae_fast.testing import reference as R

from benchmarks.common import CPU_COMPILE_ALL, CUDA, DEVICE, device_name

L, RATIO = 196, 0.75
CASES = ([(256, 512, torch.bfloat16), (256, 1024, torch.bfloat16), (256, 1024, torch.float32)] if CUDA
         else [(8, 64, torch.float32), (8, 256, torch.bfloat16)])
IMPLS = ["mae_fast", "eager", "compiled"]
OPS = ["unshuffle_official", "unshuffle_vit_pytorch", "gather"]
MODES = ["fwd", "fwd_bwd"]

_RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def _summary(op_suite_env, print_op_table):
    yield
    print_op_table(f"token benchmarks on {device_name()}, torch {torch.__version__}, L={L}, K={int(L * (1 - RATIO))}",
                   _RESULTS)


def _setup(op, B, D, dtype):
    """Inputs, the differentiable leaves, and the three implementations for one case."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    noise = torch.rand(B, L, device=DEVICE, generator=g)
    es = torch.empty((), dtype=dtype).element_size()
    if op == "gather":
        ids_keep, _, _ = R.random_masking(B, L, RATIO, noise=noise)
        K = ids_keep.shape[1]
        x = torch.randn(B, L, D, device=DEVICE, generator=g).to(dtype)
        fwd_bytes = 2 * B * K * D * es + ids_keep.numel() * 8
        bwd_bytes = B * K * D * es + B * L * D * es + ids_keep.numel() * 8  # grad rows read, (B, L, D) written

        def f_mae(x):
            return mae_fast.ops.gather_tokens(x, ids_keep)

        def f_eager(x):
            return R.gather_tokens(x, ids_keep)
        return [x], f_mae, f_eager, fwd_bytes, bwd_bytes

    if op == "unshuffle_official":
        ids_keep, _, ids_restore = R.random_masking(B, L, RATIO, noise=noise)
        K = ids_keep.shape[1]
        x = torch.randn(B, 1 + K, D, device=DEVICE, generator=g).to(dtype)
        mask_token = (0.02 * torch.randn(1, 1, D, device=DEVICE, generator=g))
        pos = R.pos_embed_2d(D, (14, 14), cls_token=True)[None].to(DEVICE)  # frozen fp32
        rows_in, rows_out = B * (1 + K), B * (1 + L)
        fwd_bytes = (rows_in + rows_out) * D * es + pos.numel() * 4 + ids_keep.numel() * 8 + D * 4
        bwd_bytes = (rows_out + rows_in) * D * es + ids_keep.numel() * 8 + D * 4

        def f_mae(x, m):
            return mae_fast.ops.unshuffle_tokens(x, ids_keep, L, m, pos, num_prefix=1)

        def f_eager(x, m):
            mask_tokens = m.to(x.dtype).repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
            return torch.cat([x[:, :1, :], x_], dim=1) + pos.to(x.dtype)
        return [x, mask_token], f_mae, f_eager, fwd_bytes, bwd_bytes

    # unshuffle_vit_pytorch: vit-pytorch's decoder input, masked = first num_masked of argsort(noise)
    masked, unmasked = R.vit_pytorch_masking(B, L, RATIO, noise=noise)
    K = unmasked.shape[1]
    x = torch.randn(B, K, D, device=DEVICE, generator=g).to(dtype)
    mask_token = torch.randn(D, device=DEVICE, generator=g)
    pos = torch.randn(L, D, device=DEVICE, generator=g)  # nn.Embedding weight: learnable
    batch_range = torch.arange(B, device=DEVICE)[:, None]
    fwd_bytes = (B * K + B * L) * D * es + pos.numel() * 4 + unmasked.numel() * 8 + D * 4
    bwd_bytes = (B * L + B * K) * D * es + unmasked.numel() * 8 + D * 4 + pos.numel() * 4

    def f_mae(x, m, p):
        return mae_fast.ops.unshuffle_tokens(x, unmasked, L, m, p)

    def f_eager(x, m, p):
        p = p.to(x.dtype)
        unmasked_tokens = x + p[unmasked]
        mask_tokens = m.to(x.dtype).expand(B, masked.shape[1], D) + p[masked]
        tokens = torch.zeros(B, L, D, device=x.device, dtype=x.dtype)
        tokens[batch_range, unmasked] = unmasked_tokens
        tokens[batch_range, masked] = mask_tokens
        return tokens
    return [x, mask_token, pos], f_mae, f_eager, fwd_bytes, bwd_bytes


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-D{c[1]}-{str(c[2]).split('.')[-1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, median_op_seconds, op, impl, mode, case):
    if not CUDA and impl == "compiled" and not CPU_COMPILE_ALL:
        pytest.skip("compiled baselines on CPU only with MAE_FAST_BENCH_COMPILE_ALL=1")
    B, D, dtype = case
    leaves, f_mae, f_eager, fwd_bytes, bwd_bytes = _setup(op, B, D, dtype)
    f = {"mae_fast": f_mae, "eager": f_eager,
         "compiled": torch.compile(f_eager, fullgraph=True, dynamic=False) if impl == "compiled" else None}[impl]
    if mode == "fwd":
        def fn():
            return f(*leaves)
        nbytes = fwd_bytes
    else:
        leaves = [t.detach().requires_grad_() for t in leaves]
        grad_out = torch.randn_like(f_eager(*leaves))

        def fn():
            return torch.autograd.grad(f(*leaves), leaves, grad_out)
        nbytes = fwd_bytes + bwd_bytes
    name = f"{op}-{mode}-B{B}-D{D}-{str(dtype).split('.')[-1]}"
    benchmark.group = name
    sec = median_op_seconds(benchmark, fn)
    _RESULTS[(name, impl)] = (sec, nbytes)
    benchmark.extra_info.update(device=device_name(), B=B, L=L, D=D, dtype=str(dtype), bytes=nbytes, median_s=sec,
                                gbps=nbytes / sec / 1e9,
                                timer="triton.testing.do_bench median" if CUDA else "pytest-benchmark median")
    eager = _RESULTS.get((name, "eager"))
    if eager is not None and impl != "eager":
        benchmark.extra_info["speedup_vs_eager"] = eager[0] / sec
