"""Benchmarks (measurements, not tests): the full MAE training step -- forward, backward and the
AdamW step -- of mae_fast.MaskedAutoencoderViT (official API) and mae_fast.MAE (vit-pytorch API)
against the peers, all measured in the same run on identical weights and noise. The cases, the
providers and the step itself are benchmarks/steps.py's; a case's speedups are computed by
benchmarks/report.py from the rows of one run. Peers that are not installed or fail are skipped
with the reason printed and recorded.

CPU runs take 1 thread (MAE_FAST_BENCH_THREADS): on a small shared machine, OpenMP spinning makes
multi-thread medians noise. --bench-quick: depth-1 models, batch 8, 3 rounds, one compiled
provider (CI keeps the harness alive).

Per case and provider (benchmark.extra_info, then benchmarks/results/results.csv):
  images_per_s      batch / median step time; each pytest-benchmark round is one step (+ a CUDA
                    sync); warm-up steps (compilation included) are excluded
  peak_mem_mb       in MiB. CUDA: torch.cuda.max_memory_allocated from the first step on (reset
                    before it; weights + AdamW state included): a CUDA graph's replays allocate
                    nothing, so only its capture, in the warm-up steps, shows the memory it holds.
                    CPU: bytes alive at the step start (weights, AdamW state, inputs) + the peak of
                    the profiler's allocation trace over one step (torch.profiler profile_memory;
                    library-internal scratch is not seen)
  tflops, mfu       counted model FLOPs (benchmarks/flops.py, the same numerator for every
                    provider of a case) / median time, over the matmul ceiling measured in this
                    run (CUDA: bf16 8192^3 matmul, triton.testing.do_bench median; CPU: fp32)
  first_step_s      the first step (compilation for the compiled providers)
  loss0             the first step's loss (same weights and noise: equal across providers)
The ceilings are rows of case "ceiling (<dtype>)": matmul_tflops and copy_gbps (a large
device-to-device copy, counted read + write bytes: the bandwidth bound of the memory-bound ops).

    pytest benchmarks/test_bench_step.py                    # then: python -m benchmarks.report
    MAE_FAST_BENCH_CASES=official-vit_b16 MAE_FAST_BENCH_ROUNDS=20 pytest benchmarks/test_bench_step.py
"""
from __future__ import annotations

import contextlib
import gc
import os
import time

import pytest
import torch

from benchmarks import steps as S
from benchmarks.common import CUDA, device_name

CPU_THREADS = int(os.environ.get("MAE_FAST_BENCH_THREADS", "1"))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and "provider" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--bench-quick", default=False) \
            or os.environ.get("MAE_FAST_BENCH_QUICK") == "1"  # as conftest.is_quick
        pairs = S.selected(quick)
        metafunc.parametrize(("case", "provider"), pairs, ids=[f"{c.name}-{p}" for c, p in pairs])


def _rounds(quick: bool) -> tuple[int, int]:
    """(warm-up steps, measured steps)."""
    if quick:
        return 1, 3
    # CUDA: 10 warm-up steps (cuDNN plans, allocator growth, clocks)
    warm, rounds = (10, 30) if CUDA else (3, 20)
    return (int(os.environ.get("MAE_FAST_BENCH_WARMUP", warm)), int(os.environ.get("MAE_FAST_BENCH_ROUNDS", rounds)))


# ----------------------------------------------------------------------------- setup / summary

_RESULTS: dict[tuple[str, str], dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _setup_and_summary(request):
    old_interp, threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "0"  # CPU: the ops' vectorised fallbacks, not the interpreter
        torch.set_num_threads(CPU_THREADS)
    yield
    used_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    if old_interp is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old_interp
    if not _RESULTS:
        return
    lines = ["", f"training-step benchmarks on {device_name()}, torch {torch.__version__}"
             + ("" if CUDA else f", {used_threads} thread(s)"),
             f"{'case':20s} {'provider':19s} {'img/s':>10s} {'ms/step':>9s} {'peak MiB':>9s} {'MFU':>7s} "
             f"{'vs reference':>13s} {'vs ref_compiled':>16s} {'vs ref, interleaved':>20s}"]

    def ratio(m, case, peer, provider, key="images_per_s"):
        mine, other = m.get(key), _RESULTS.get((case, peer), {}).get(key)
        return f"{mine / other:.2f}x" if mine and other and provider != peer else ""

    for (case, provider), m in _RESULTS.items():
        mfu = m.get("mfu")
        lines.append(f"{case:20s} {provider:19s} {m.get('images_per_s', float('nan')):10.1f} "
                     f"{m.get('median_s', float('nan')) * 1e3:9.2f} {m.get('peak_mem_mb', float('nan')):9.1f} "
                     f"{'' if mfu is None else f'{mfu:6.1%}':>7s} {ratio(m, case, 'reference', provider):>13s} "
                     f"{ratio(m, case, 'reference_compiled', provider):>16s} "
                     f"{ratio(m, case, 'reference', provider, 'images_per_s_interleaved'):>20s}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with (capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()):
        print("\n".join(lines))


# ----------------------------------------------------------------------------- ceilings

_CEILING: dict[str, float] = {}


@pytest.fixture(scope="module")
def ceiling(bench_record, bench_quick):
    """Measured once per run: the matmul ceiling (FLOP/s) of the step's dtype and the copy bandwidth."""
    if not _CEILING:
        if CUDA:
            import triton.testing

            n, dtype = 8192, torch.bfloat16
            a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
            ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
            flops = 2 * n**3 / (ms * 1e-3)
            del a, b
            src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
            gbps = 2 * src.numel() / (ms * 1e-3) / 1e9
            del src, dst
            torch.cuda.empty_cache()
            label = "bf16"
        else:
            n, dtype = (256, torch.float32) if bench_quick else (1024, torch.float32)
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            flops = 2 * n**3 / _time_cpu(lambda: a @ b, 3 if bench_quick else 10)
            src = torch.empty(1 << (24 if bench_quick else 28), dtype=torch.uint8)
            dst = torch.empty_like(src)
            gbps = 2 * src.numel() / _time_cpu(lambda: dst.copy_(src), 3 if bench_quick else 10) / 1e9
            label = f"fp32, {torch.get_num_threads()} thread(s)"
        _CEILING.update(flops=flops, gbps=gbps, label=label)
        case = f"ceiling ({label})"
        bench_record.row(case, "torch.matmul", "matmul_tflops", flops / 1e12)
        bench_record.row(case, "copy_", "copy_gbps", gbps)
    return _CEILING


def _time_cpu(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return S.median(ts)


# ----------------------------------------------------------------------------- memory

def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def _cpu_step_peak_bytes(step) -> int:
    """Peak of the running sum of allocations (and frees) the profiler records during one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs = []
    alloc_tag = torch._C._profiler._EventType.Allocation

    def walk(node):
        if node.tag == alloc_tag:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not allocs:
        raise RuntimeError("the profiler recorded no allocations")
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return peak


# ----------------------------------------------------------------------------- the benchmark

def _say(request, msg: str) -> None:
    """Progress past pytest's capture: a device log shows how far a run got if it is cut short."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with (capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()):
        print(msg, flush=True)


def test_step(benchmark, case, provider, bench_record, bench_quick, ceiling, request):
    name = case.name
    if provider in S.OURS:
        bench_record.row(name, provider, "ops_path", S.ops_path())
    benchmark.group = f"step-{name}"
    compiled = S.compile_mode(provider) is not None
    if bench_quick and compiled and (name, provider) != S.QUICK_COMPILED:
        bench_record.skip(name, provider, "quick mode compiles one provider only "
                                          f"({S.QUICK_COMPILED[1]} on {S.QUICK_COMPILED[0]})")
    need = (90 if CUDA else 120) if compiled else (30 if CUDA else 30)
    left = bench_record.seconds_left()
    if left < need:
        bench_record.skip(name, provider, f"time budget: {max(left, 0):.0f} s left, a {provider} case needs ~{need} s")
    peer = provider not in S.OURS and provider != "reference"  # an error there is the peer's, not ours
    try:
        model, opt, opt_kind, step, flops = S.make_step(case, provider)
    except S.PeerUnavailable as e:
        bench_record.skip(name, provider, str(e))
    imgs, noise = step.inputs

    warmup, rounds = _rounds(bench_quick)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        loss0 = step().item()
    except Exception as e:  # noqa: BLE001 -- a peer's failure is recorded, ours fails the test
        if not peer:
            raise
        model = opt = step = None  # freed before the cleanup
        S.cleanup(compiled)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        bench_record.skip(name, provider, f"{provider} fails on this case: {type(e).__name__}: {first[:200]}")
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    S.sync()
    gc.collect()

    def run():
        step()
        S.sync()

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    metrics = dict(loss0=loss0, first_step_s=first_step_s, batch=case.batch, step_flops=flops.total)
    if CUDA:
        metrics["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        static = _tensor_bytes([*model.parameters(), *model.buffers(), imgs, noise,
                                *(v for s in opt.state.values() for v in s.values())])
        try:
            metrics["peak_mem_mb"] = (static + _cpu_step_peak_bytes(step)) / 2**20
        except Exception as e:  # noqa: BLE001 -- a private profiler API; say why the number is missing
            bench_record.row(name, provider, "peak_mem_unavailable", f"{type(e).__name__}: {e}")
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        metrics.update(median_s=median, iqr_s=benchmark.stats.stats.iqr, images_per_s=case.batch / median,
                       tflops=flops.total / median / 1e12,
                       mfu=flops.total / median / ceiling["flops"])
    benchmark.extra_info.update(case=name, provider=provider, device=device_name(), optimizer=f"AdamW ({opt_kind})",
                                dtype="bf16 autocast" if CUDA else "fp32", ceiling=ceiling["label"], **metrics)
    _RESULTS[(name, provider)] = metrics
    _say(request, f"\n[bench] {name} / {provider}: {metrics.get('images_per_s', float('nan')):,.1f} images/s, "
                  f"peak {metrics.get('peak_mem_mb', float('nan')):,.0f} MiB, first step {first_step_s:.1f} s, "
                  f"{bench_record.seconds_left():.0f} s of budget left")
    model = opt = step = None  # freed before the cleanup (run() holds step)
    S.cleanup(compiled)


@pytest.mark.parametrize("case_name", [c.name for c in S.CPU_CASES + S.QUICK_CASES])
def test_step_interleaved(case_name, bench_record, bench_quick):
    """CPU only: the eager providers of a case measured round-robin, one step each per round, so that
    the load of a shared box hits all of them alike; rows images_per_s_interleaved / median_s_interleaved.
    (The per-provider medians of test_step run one provider after another: a load change between
    them moves their ratio.)"""
    if CUDA:
        pytest.skip("CPU only: a GPU run has the device to itself; test_step's medians are the measurement")
    cases = {c.name: c for c, _ in S.selected(bench_quick)}
    if case_name not in cases:
        pytest.skip(f"{case_name} is not selected in this mode")
    case = cases[case_name]
    steps = {}
    for provider in S.PROVIDERS[case.api]:
        if S.compile_mode(provider) is not None:
            continue
        try:
            steps[provider] = S.make_step(case, provider)[3]
            steps[provider]()
        except S.PeerUnavailable as e:
            print(f"\n[bench] interleaved {case_name}: {provider} left out ({e})")
        except Exception as e:  # noqa: BLE001 -- a failing peer is left out (test_step records why)
            if provider in S.OURS or provider == "reference":
                raise
            steps.pop(provider, None)
            print(f"\n[bench] interleaved {case_name}: {provider} left out ({type(e).__name__})")
    warmup, rounds = _rounds(bench_quick)
    times = {p: [] for p in steps}
    for r in range(warmup + rounds):
        order = list(steps)
        order = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first
        for p in order:
            t = time.perf_counter()
            steps[p]()
            if r >= warmup:
                times[p].append(time.perf_counter() - t)
    for p, ts in times.items():
        med = S.median(ts)
        bench_record.row(case_name, p, "median_s_interleaved", med)
        bench_record.row(case_name, p, "images_per_s_interleaved", case.batch / med)
        _RESULTS.setdefault((case_name, p), {})["images_per_s_interleaved"] = case.batch / med
    steps.clear()
    S.cleanup(False)
