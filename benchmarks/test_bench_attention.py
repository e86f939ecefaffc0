"""Benchmarks (measurements, not tests): the blocks' self-attention from a fused qkv projection,
mae_fast.ops.attention against the SDPA path the blocks run by default (mae_fast.models.blocks.attend_sdpa:
head views, F.scaled_dot_product_attention, heads merged back; "eager" is torch's own choice of
backend, cuDNN on an H200) and each SDPA backend forced, forward and forward+backward (the gradient
of qkv).

Cases are MAE's attention under bf16 autocast. CUDA: ViT-B/16 at batch 256 and ViT-L/16 at 128,
encoder (49 kept patches + cls = 50 tokens, heads of 64) and decoder (197 tokens, 16 heads of 32);
median of triton.testing.do_bench. CPU: small shapes in fp32, the ops' PyTorch fallback (a harness
check, not a measurement of the kernels), 1 thread. MAE_FAST_BENCH_ATTENTION_CASES (comma-separated
names of GPU_CASES or CPU_CASES, e.g. "vit_b-encoder,vit_b-decoder") selects; an unknown name raises.

benchmark.extra_info holds the counted FLOPs (forward 4 B H N^2 d: the two products; backward
2.5x that: five products, the scores recomputed), TFLOP/s, the counted bytes (forward reads qkv and
writes the output; backward also reads the output and its gradient and writes the qkv gradient)
and the speedup over "eager" measured in the same run.

    pytest benchmarks/test_bench_attention.py --benchmark-group-by=group
"""
import contextlib
import os

import pytest
import torch

import mae_fast
from mae_fast.models import blocks

from benchmarks.common import CUDA, DEVICE, device_name

# name: (B, N, heads, d)
GPU_CASES = {"vit_b-encoder": (256, 50, 12, 64), "vit_b-decoder": (256, 197, 16, 32),
             "vit_l-encoder": (128, 50, 16, 64), "vit_l-decoder": (128, 197, 16, 32)}
CPU_CASES = {"tiny-encoder": (8, 17, 3, 32), "tiny-decoder": (8, 65, 2, 32)}


def selected_cases(names: str | None = None, cuda: bool = CUDA) -> dict:
    """The cases to measure on CUDA or a CPU: all, or those named (default
    MAE_FAST_BENCH_ATTENTION_CASES); a name of neither table raises."""
    names = os.environ.get("MAE_FAST_BENCH_ATTENTION_CASES", "") if names is None else names
    wanted = [x.strip() for x in names.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(GPU_CASES) - set(CPU_CASES))
    if unknown:
        raise ValueError(f"MAE_FAST_BENCH_ATTENTION_CASES: unknown {unknown}; known: {[*GPU_CASES, *CPU_CASES]}")
    return {k: v for k, v in (GPU_CASES if cuda else CPU_CASES).items() if not wanted or k in wanted}


CASES = selected_cases()
DTYPE = torch.bfloat16 if CUDA else torch.float32
# impl -> the SDPA backend forced (None: torch's choice); "mae_fast" is the op
BACKENDS = {"eager": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
            "cudnn": "CUDNN_ATTENTION"} if CUDA else {"eager": None}
# "eager" first: the others' speedups are over it. mae_fast_two_pass: the op with its dq kernel even
# where one key block holds the sequence (the encoder), to time what the one-pass backward saves
IMPLS = [*BACKENDS, "mae_fast"] + (["mae_fast_two_pass"] if CUDA else [])
MODES = ["fwd", "fwd_bwd"]

_RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def _summary(op_suite_env, print_op_table):
    yield
    print_op_table(f"attention benchmarks on {device_name()}, torch {torch.__version__}, {DTYPE}", _RESULTS)


def _sdpa_backend(impl):
    name = BACKENDS.get(impl)
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name))


def _fn(impl, mode, qkv, heads):
    """A no-argument callable running one forward (+ backward) of the case."""
    def f(t):
        with _sdpa_backend(impl):
            return mae_fast.ops.attention(t, heads) if impl.startswith("mae_fast") else blocks.attend_sdpa(t, heads)
    if mode == "fwd":
        f(qkv)  # a forced backend that cannot run the case raises here, before timing
        return lambda: f(qkv)
    x = qkv.detach().requires_grad_()
    grad = torch.randn_like(f(x))
    return lambda: torch.autograd.grad(f(x), x, grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_bench(benchmark, median_op_seconds, bench_record, monkeypatch, name, impl, mode):
    B, N, H, d = CASES[name]
    if impl == "mae_fast_two_pass":
        if mode == "fwd":
            pytest.skip("mae_fast_two_pass differs from mae_fast in the backward only")
        from mae_fast.kernels import attention

        monkeypatch.setattr(attention, "ONE_PASS_BWD", False)
    case = f"attention-{name}-{mode}-B{B}-N{N}-H{H}-d{d}"
    qkv = torch.randn(B, N, 3 * H * d, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)).to(DTYPE)
    try:
        fn = _fn(impl, mode, qkv, H)
    except RuntimeError as e:  # a forced backend that does not take this shape / dtype / GPU
        bench_record.skip(case, impl, f"SDPA backend {BACKENDS[impl]} unavailable here: {str(e).splitlines()[0][:200]}")
    flops = 4 * B * H * N * N * d * (3.5 if mode == "fwd_bwd" else 1.0)
    es = DTYPE.itemsize
    nbytes = B * N * H * d * es * (4 + (8 if mode == "fwd_bwd" else 0))
    benchmark.group = case
    sec = median_op_seconds(benchmark, fn)
    _RESULTS[(case, impl)] = (sec, nbytes)
    benchmark.extra_info.update(
        device=device_name(), flops=flops, tflops=flops / sec / 1e12, bytes=nbytes, gbps=nbytes / sec / 1e9,
        median_s=sec, timer="triton.testing.do_bench median" if CUDA else "pytest-benchmark median")
    eager = _RESULTS.get((case, "eager"))
    if eager is not None and impl != "eager":
        benchmark.extra_info["speedup_vs_eager"] = eager[0] / sec
