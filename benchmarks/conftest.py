"""Shared benchmark plumbing: the quick mode, the time budget, and the long-format results file.

Options (pytest benchmarks/ ...):
  --bench-quick          CI mode: tiny shapes and few rounds, so the harness never rots
                         (also MAE_FAST_BENCH_QUICK=1). Results then go to a temporary file
                         unless --bench-results is given.
  --bench-results PATH   the long-format CSV the session appends to
                         (default benchmarks/results/results.csv); "none" writes nothing.

At the end of the session every pytest-benchmark result of the session (all files) becomes rows
of case, provider, metric, value, device, torch, triton, commit, date: the median (s) and every
numeric benchmark.extra_info entry, plus the rows and skip reasons recorded through the
`bench_record` fixture. All rows of one session share the date (the session start, UTC), which is
how benchmarks/report.py finds the rows measured in the same run.

Environment: MAE_FAST_COMMIT names the commit where the tree has no .git (a copied tree);
MAE_FAST_BENCH_DATE sets the run id (date column) so that several pytest sessions form one run;
MAE_FAST_BENCH_DEADLINE (unix time) or MAE_FAST_BENCH_BUDGET_S (seconds from the session start)
bounds the step suite, which skips what would not fit, with the reason.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import importlib
import math
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

try:
    importlib.import_module("pytest_benchmark")
    # MAE_FAST_BENCH_SHIM=1 (with -p no:benchmark) exercises the stand-in where the plugin is installed
    HAVE_PYTEST_BENCHMARK = os.environ.get("MAE_FAST_BENCH_SHIM") != "1"
except ImportError:  # e.g. a bare GPU image: a minimal stand-in keeps the suites and the results file
    HAVE_PYTEST_BENCHMARK = False

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "results.csv"
COLUMNS = ["case", "provider", "metric", "value", "device", "torch", "triton", "commit", "date"]
_SESSION_START = time.time()


def pytest_addoption(parser):
    group = parser.getgroup("mae_fast benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="tiny shapes and few rounds (CI); results to a temporary file unless --bench-results")
    group.addoption("--bench-results", default=None,
                    help=f"long-format results CSV to append to (default {DEFAULT_RESULTS}); 'none' to skip")


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_quick(config) -> bool:
    return bool(config.getoption("--bench-quick", default=False)) or os.environ.get("MAE_FAST_BENCH_QUICK") == "1"


@pytest.fixture(scope="session")
def bench_quick(request) -> bool:
    """True in --bench-quick mode: benchmark files shrink their shapes and rounds."""
    return is_quick(request.config)


# ----------------------------------------------------------------------------- provenance

def device_label() -> str:
    """The device the session measures on, as it goes into the results file."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def commit_label() -> str:
    env = os.environ.get("MAE_FAST_COMMIT")
    if env:  # a full sha is shortened as git's below, so that one commit reads the same in every row
        return env[:12] if re.fullmatch(r"[0-9a-f]{13,40}", env) else env
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "mae_fast", "kernels", "csrc", "benchmarks"],
                               cwd=ROOT, timeout=10).returncode
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> tuple[str, str]:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return torch.__version__, tv


# ----------------------------------------------------------------------------- recorder

class Recorder:
    """Rows that are not pytest-benchmark stats (ceilings, memory, skip reasons), and the deadline."""

    def __init__(self, config):
        self.config = config
        self.rows: list[tuple[str, str, str, object]] = []
        self.start = _SESSION_START
        deadline = os.environ.get("MAE_FAST_BENCH_DEADLINE")
        budget = os.environ.get("MAE_FAST_BENCH_BUDGET_S")
        self.deadline = float(deadline) if deadline else (_SESSION_START + float(budget) if budget else math.inf)

    def row(self, case: str, provider: str, metric: str, value) -> None:
        self.rows.append((case, provider, metric, value))

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def skip(self, case: str, provider: str, reason: str):
        """Records why a provider was not measured, prints it, and skips the test."""
        self.row(case, provider, "skipped", reason)
        print(f"\n[bench] skip {case} / {provider}: {reason}")
        pytest.skip(reason)


_RECORDER_KEY = pytest.StashKey[Recorder]()


def _recorder(config) -> Recorder:
    if _RECORDER_KEY not in config.stash:
        config.stash[_RECORDER_KEY] = Recorder(config)
    return config.stash[_RECORDER_KEY]


@pytest.fixture(scope="session")
def bench_record(request) -> Recorder:
    return _recorder(request.config)


# ----------------------------------------------------------------------------- pytest-benchmark stand-in

_SHIM_RESULTS: list = []


class _ShimStats:
    def __init__(self, times):
        xs = sorted(times)
        n = len(xs)
        self.median = xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
        self.rounds = n
        self.min, self.max = xs[0], xs[-1]
        quartiles = statistics.quantiles(xs, n=4) if n > 1 else [xs[0]] * 3
        self.iqr = quartiles[2] - quartiles[0]


class _ShimBenchmark:
    """What the suites use of pytest-benchmark's fixture (pedantic, __call__, group, extra_info,
    stats.stats.median), timed with time.perf_counter, for machines without the plugin."""

    has_error = False

    def __init__(self, node):
        self.name, self.group, self.extra_info = node.name, None, {}
        callspec = getattr(node, "callspec", None)
        self.params = dict(callspec.params) if callspec else {}
        self.stats = None  # after a run: .stats.median, .median (pytest-benchmark's Metadata and Stats)

    def __bool__(self):
        return self.stats is not None

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        kwargs = kwargs or {}
        for _ in range(warmup_rounds):
            target(*args, **kwargs)
        times, result = [], None
        for _ in range(rounds):
            if setup is not None:
                setup()
            t = time.perf_counter()
            for _ in range(iterations):
                result = target(*args, **kwargs)
            times.append((time.perf_counter() - t) / iterations)
        stats = _ShimStats(times)
        self.stats = type("Metadata", (), {"stats": stats, "median": stats.median, "rounds": stats.rounds})()
        _SHIM_RESULTS.append(self)
        return result

    def __call__(self, fn, *args, **kwargs):
        return self.pedantic(fn, args, kwargs, rounds=5, warmup_rounds=1)


if not HAVE_PYTEST_BENCHMARK:
    @pytest.fixture
    def benchmark(request):
        return _ShimBenchmark(request.node)


# ----------------------------------------------------------------------------- results file

def _results_path(config) -> Path | None:
    opt = config.getoption("--bench-results", default=None)
    if opt is not None:
        return None if opt.lower() == "none" else Path(opt)
    if is_quick(config):
        return Path(tempfile.gettempdir()) / "mae_fast_bench_quick.csv"
    return DEFAULT_RESULTS


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _benchmark_rows(config):
    bs = getattr(config, "_benchmarksession", None)
    for bench in [*(getattr(bs, "benchmarks", None) or []), *_SHIM_RESULTS]:
        if not bench or bench.has_error:
            continue
        extra, params = bench.extra_info or {}, bench.params or {}
        case = extra.get("case") or bench.group or bench.name
        provider = extra.get("provider") or params.get("impl") or params.get("provider") or bench.name
        metrics = {k: v for k, v in extra.items() if _numeric(v)}
        metrics.setdefault("median_s", bench.stats.median)
        metrics.setdefault("rounds", bench.stats.rounds)
        for metric, value in metrics.items():
            yield case, provider, metric, value


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    rows = list(_benchmark_rows(config))
    if _RECORDER_KEY in config.stash:
        rows += config.stash[_RECORDER_KEY].rows
    path = _results_path(config)
    if not rows or path is None:
        return
    torch_v, triton_v = versions()
    date = os.environ.get("MAE_FAST_BENCH_DATE") or \
        _dt.datetime.fromtimestamp(_SESSION_START, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = [device_label(), torch_v, triton_v, commit_label(), date]
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for case, provider, metric, value in rows:
            value = f"{value:.6g}" if isinstance(value, float) else value
            w.writerow([case, provider, metric, value, *common])
    tr = config.pluginmanager.get_plugin("terminalreporter")
    msg = f"[bench] {len(rows)} result rows appended to {path}"
    if tr is not None:
        tr.write_line(msg)
    else:
        print(msg)


@pytest.fixture
def median_op_seconds():
    """measure(benchmark, fn) -> median seconds of one call after warm-up (compilation,
    autotuning, allocator): triton.testing.do_bench on CUDA, plus synchronised pytest-benchmark
    rounds for its table; pytest-benchmark rounds on CPU."""

    def measure(benchmark, fn):
        for _ in range(3):
            fn()
        if not torch.cuda.is_available():
            benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)
            return benchmark.stats.stats.median
        import triton.testing

        torch.cuda.synchronize()
        sec = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3

        def synchronised():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(synchronised, rounds=50, iterations=1, warmup_rounds=2)
        return sec

    return measure


@pytest.fixture(scope="module")
def op_suite_env():
    """The op suites' CPU setting, restored after the module: the ops' vectorised PyTorch fallbacks
    (not the slow Triton interpreter) on one thread (on a small shared machine, OpenMP spinning
    makes multi-thread medians noise). CUDA runs are left as they are."""
    old, threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "0"
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(scope="module")
def print_op_table(request):
    """show(title, results) prints {(case, impl): (seconds, bytes)} as a table past pytest's
    capture: median, counted GB/s and the speedup over the same case's eager row."""

    def show(title, results):
        if not results:
            return
        width = max(len(case) for case, _ in results) + 2
        lines = ["", title, f"{'case':{width}s} {'impl':9s} {'median us':>10s} {'GB/s':>8s} {'vs eager':>9s}"]
        for (case, impl), (sec, nbytes) in sorted(results.items()):
            eager = results.get((case, "eager"), (None,))[0]
            speed = f"{eager / sec:8.2f}x" if eager else ""
            lines.append(f"{case:{width}s} {impl:9s} {sec * 1e6:10.1f} {nbytes / sec / 1e9:8.1f} {speed:>9s}")
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            print("\n".join(lines))

    return show
