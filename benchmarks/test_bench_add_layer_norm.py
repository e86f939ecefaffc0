"""Benchmarks (measurements, not tests): the fused residual add + LayerNorm against eager PyTorch
(`r = x + delta; n = F.layer_norm(r, ...).to(out_dtype)`, reference.add_layer_norm) and
torch.compile of it, forward and forward+backward.

Cases are the pre-norm blocks of ViT-B MAE under bf16 autocast: the residual stream x is fp32,
the branch output delta bf16, the normed result bf16 (it feeds the next Linear); weight and bias
fp32.
CUDA: encoder rows 256 * 50 (49 kept patches + cls), D 768; decoder rows 256 * 197, D 512; data
already on the device; median of triton.testing.do_bench (no per-call sync), pytest-benchmark
rounds synchronise. CPU: small shapes, the PyTorch fallback (TRITON_INTERPRET is switched off
here), 1 thread; the compiled baseline only with MAE_FAST_BENCH_COMPILE_ALL=1 (~10 s per compile).

benchmark.extra_info holds the counted bytes (the minimum traffic: forward reads x and delta and
writes residual, normed and the fp32 row statistics; backward reads both output gradients, the
residual and the statistics and writes the x and delta gradients; the (D,) parameters are
negligible), the achieved GB/s and the speedup over eager measured in the same run. A summary
table is printed at the end of the module.

    pytest benchmarks/test_bench_add_layer_norm.py --benchmark-group-by=group
"""

import pytest
import torch

import mae_fast
from mae_fast.testing import reference as R

from benchmarks.common import CPU_COMPILE_ALL, CUDA, DEVICE, device_name

# name: (rows, D); x fp32, delta bf16, normed bf16
CASES = {"encoder": (256 * 50, 768), "decoder": (256 * 197, 512)} if CUDA else \
    {"encoder": (8 * 50, 96), "decoder": (8 * 65, 64)}
X_DTYPE, DELTA_DTYPE, OUT_DTYPE = torch.float32, torch.bfloat16, torch.bfloat16
EPS = 1e-6
IMPLS = ["mae_fast", "eager", "compiled"]
MODES = ["fwd", "fwd_bwd"]

_RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def _summary(op_suite_env, print_op_table):
    yield
    print_op_table(f"add_layer_norm benchmarks on {device_name()}, torch {torch.__version__}, "
                   f"x {X_DTYPE}, delta {DELTA_DTYPE}, normed {OUT_DTYPE}", _RESULTS)


def _inputs(rows, D):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, generator=g)
    x, delta = randn(rows, D).to(X_DTYPE), randn(rows, D).to(DELTA_DTYPE)
    w, b = randn(D) * 0.5 + 1, randn(D)
    res_es = torch.promote_types(X_DTYPE, DELTA_DTYPE).itemsize
    x_es, d_es, o_es = X_DTYPE.itemsize, DELTA_DTYPE.itemsize, OUT_DTYPE.itemsize
    return dict(x=x, delta=delta, w=w, b=b,
                fwd_bytes=rows * (D * (x_es + d_es + res_es + o_es) + 8),
                bwd_bytes=rows * (D * (res_es + o_es + res_es + x_es + d_es) + 8))


def _fn(impl, mode, x):
    """A no-argument callable running one forward (+ backward) of the case."""
    def f_mae(a, d, w, b):
        return mae_fast.ops.add_layer_norm(a, d, w, b, eps=EPS, out_dtype=OUT_DTYPE)

    def f_ref(a, d, w, b):
        return R.add_layer_norm(a, d, w, b, EPS, OUT_DTYPE)
    f = {"mae_fast": f_mae, "eager": f_ref, "compiled": None}[impl]
    if impl == "compiled":
        f = torch.compile(f_ref, fullgraph=True, dynamic=False)
    args = (x["x"], x["delta"], x["w"], x["b"])
    if mode == "fwd":
        return lambda: f(*args)
    args = tuple(t.detach().requires_grad_() for t in args)
    r0, n0 = f(*args)
    grads = (torch.randn_like(r0), torch.randn_like(n0))
    return lambda: torch.autograd.grad(f(*args), args, grads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_bench(benchmark, median_op_seconds, bench_record, name, impl, mode):
    rows, D = CASES[name]
    case = f"add_layer_norm-{name}-{mode}-rows{rows}-D{D}"
    if not CUDA and impl == "compiled" and not CPU_COMPILE_ALL:
        bench_record.skip(case, impl, "compiled baseline on CPU only with MAE_FAST_BENCH_COMPILE_ALL=1")
    x = _inputs(rows, D)
    fn = _fn(impl, mode, x)
    nbytes = x["fwd_bytes"] + (x["bwd_bytes"] if mode == "fwd_bwd" else 0)
    benchmark.group = case
    sec = median_op_seconds(benchmark, fn)
    _RESULTS[(case, impl)] = (sec, nbytes)
    benchmark.extra_info.update(
        device=device_name(), rows=rows, D=D, bytes=nbytes, median_s=sec, gbps=nbytes / sec / 1e9,
        timer="triton.testing.do_bench median" if CUDA else "pytest-benchmark median")
    eager = _RESULTS.get((case, "eager"))
    if eager is not None and impl != "eager":
        benchmark.extra_info["speedup_vs_eager"] = eager[0] / sec
