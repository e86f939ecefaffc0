"""Benchmarks (measurements, not tests): the host time of each fused op's forward + backward against
the eager torch ops it replaces, on CPU tensors at tiny shapes, the kernels not launched
(benchmarks/op_host_overhead.py describes the method; `python -m benchmarks.op_host_overhead`
measures the same calls interleaved, in thread CPU time, and prints a table).

benchmark.extra_info holds the Triton launches and torch ops each fused call makes, and the
fused/eager ratio measured in the same run; a summary table is printed at the end.

    pytest benchmarks/test_bench_op_host.py --benchmark-group-by=group
"""
import contextlib

import pytest

from benchmarks import op_host_overhead as H

PROVIDERS = ["eager", "fused"]  # eager first: the fused rows' ratios are over it
_RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def _summary(op_suite_env, request):
    yield
    if not _RESULTS:
        return
    lines = ["", "host time per forward + backward call (CPU tensors, kernels not launched)",
             f"{'op':24s} {'fused us':>9s} {'eager us':>9s} {'fused/eager':>12s}"]
    for op in dict.fromkeys(op for op, _ in _RESULTS):
        fused, eager = _RESULTS.get((op, "fused")), _RESULTS.get((op, "eager"))
        if fused and eager:
            lines.append(f"{op:24s} {fused * 1e6:9.1f} {eager * 1e6:9.1f} {fused / eager:11.2f}x")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n".join(lines))


@pytest.fixture(scope="module")
def calls():
    return H.calls()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(H.cases()))
def test_bench(benchmark, bench_quick, calls, op, provider):
    fn = calls[(op, provider)]
    benchmark.group = f"host-{op}"
    rounds, inner = (5, 5) if bench_quick else (100, 20)
    with H.kernel_path():
        benchmark.pedantic(fn, rounds=rounds, iterations=inner, warmup_rounds=2)
    sec = benchmark.stats.stats.median
    _RESULTS[(op, provider)] = sec
    benchmark.extra_info.update(case=f"host-{op}", provider=provider, timer="pytest-benchmark median (wall)",
                                median_s=sec)
    if provider == "fused":
        benchmark.extra_info["launches"], benchmark.extra_info["torch_ops"] = H.counts(fn)
        eager = _RESULTS.get((op, "eager"))
        if eager:
            benchmark.extra_info["fused_over_eager"] = sec / eager
