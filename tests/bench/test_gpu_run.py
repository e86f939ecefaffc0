"""benchmarks/gpu_run.sh and benchmarks/gpu_run.py: the dry run of both calls passes here and a
wrong name fails it; the run stops after `info` where there is no GPU; the GPU-test runner records
each outcome, stops at its deadline and names what it did not run, and a second call runs the rest."""
import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import gpu_run as G

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAE_FAST_") and k != "OUT"}
    env.update(PYTHON=sys.executable, **extra)
    return env


def _script(*args, timeout=120, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("call, stages", [
    (1, ["build", "info", "attention", "step-vit_b16", "profile", "step-vit_l16", "gpu-tests", "report"]),
    (2, ["build", "info", "gpu-tests", "ops", "ops-compiled", "report"]),
])
def test_dry_run_of_each_call_passes_and_prints_the_plan(call, stages):
    r = _script("--call", str(call), "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.rstrip().endswith("dry run: OK")
    plan = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in stages]
    assert plan == stages  # every stage, in the order it runs
    assert f"budget {520 if call == 1 else 250}s" in out
    if call == 1:
        assert "official-vit_b16/mae_fast_graphed" in out and "official-vit_l16/mae_fast_graphed" in out
        assert "profile: official-vit_b16: mae_fast_graphed, mae_fast" in out
        assert "vit_b-encoder (256, 50, 12, 64), vit_b-decoder (256, 197, 16, 32)" in out


def test_dry_run_fails_on_a_wrong_provider_name():
    r = _script("--call", "1", "--dry-run", MAE_FAST_GPU_VIT_B_PROVIDERS="mae_fast,mae_fast_graphd")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ERROR: MAE_FAST_BENCH_PROVIDERS: unknown ['mae_fast_graphd']" in r.stdout
    assert r.stdout.rstrip().endswith("dry run: FAILED (above: what to fix)")


def test_dry_run_names_every_wrong_name_at_once():
    wrong = {
        "MAE_FAST_GPU_PROFILE_PROVIDERS": ("mae_fast_graphed,vit_pytorch", "profile: --providers: ['vit_pytorch']"),
        "MAE_FAST_GPU_VIT_L_PROVIDERS": ("vit_pytorch", "official-vit_l16 x providers vit_pytorch select nothing"),
        "MAE_FAST_BENCH_ATTENTION_CASES": ("vit_h-encoder", "ATTENTION_CASES: unknown ['vit_h-encoder']"),
        "MAE_FAST_GPU_STAGES": ("info,step-vit_b", "MAE_FAST_GPU_STAGES: unknown ['step-vit_b']"),
        "MAE_FAST_GPU_TEST_JOBS": ("eight", "MAE_FAST_GPU_TEST_JOBS='eight'"),
        "MAE_FAST_GPU_VIT_PROVIDERS": ("mae_fast", "MAE_FAST_GPU_VIT_PROVIDERS is set, but nothing reads it"),
        "MAE_FAST_BENCH_PROVIDERS": ("mae_fast", "MAE_FAST_BENCH_PROVIDERS is set"),
    }
    r = _script("--call", "1", "--dry-run", **{k: v for k, (v, _) in wrong.items()})
    assert r.returncode == 1, r.stdout + r.stderr
    for knob, (_, message) in wrong.items():
        assert message in r.stdout, knob
    assert "Traceback" not in r.stdout + r.stderr


def test_dry_run_of_call_2_checks_the_op_suites():
    r = _script("--call", "2", "--dry-run", MAE_FAST_GPU_OPS="tokens,add_norm")
    assert r.returncode == 1 and "op suite add_norm: no file benchmarks/test_bench_add_norm.py" in r.stdout


def test_usage():
    assert _script("--call", "3").returncode == 2 and _script("--calls", "1").returncode == 2
    r = _script("--help")
    assert r.returncode == 0 and "--call 1" in r.stdout and "MAE_FAST_GPU_BUDGET_S" in r.stdout
    assert "shellcheck" not in r.stdout


def test_without_a_gpu_the_run_stops_after_info_and_still_prints_its_summary(tmp_path):
    res, out = tmp_path / "res", tmp_path / "out"
    out.mkdir()
    r = _script("--call", "1", timeout=300, MAE_FAST_GPU_STAGES="info,attention,report", MAE_FAST_RESULTS_DIR=str(res),
                OUT=str(out), MAE_FAST_COMMIT="0123456789abcdef0123")
    if r.returncode == 0:
        pytest.skip("this machine has a GPU with every kernel: the run did not stop")
    assert r.returncode == 3, r.stdout + r.stderr
    summary = r.stdout[r.stdout.rindex("=============== mae_fast GPU run, call 1"):]
    assert "info           FAILED" in summary and "attention      not run: the run stopped after info" in summary
    assert "build          left out (MAE_FAST_GPU_STAGES)" in summary
    assert "STOPPED" in summary and "0123456789abcdef0123" in summary
    assert "STOP: torch sees no CUDA device" in (res / "logs" / "call1-info.log").read_text()
    assert {"gpu_call1.tgz", "summary-call1.txt"} <= {p.name for p in out.iterdir()}
    assert (res / "run_id").read_text().strip() in summary


# ----------------------------------------------------------------------------- the GPU-test runner

FAKE_TESTS = """
import os
import time

import pytest

gpu = pytest.mark.gpu


@gpu
def test_pass():
    pass


@gpu
def test_fail():
    assert 1 == 2, "boom"


@gpu
def test_skip():
    pytest.skip("not here")


@gpu
def test_slow():
    if os.environ.get("FAKE_SLOW") == "1":
        time.sleep(300)


@gpu
def test_after_slow():
    pass


@gpu
@pytest.mark.parametrize("i", [0, 1])
def test_param(i):
    pass


@gpu
@pytest.mark.parametrize("s", ["x/y::z [1]"])  # an id that a command line would not parse
def test_odd_id(s):
    pass


def test_not_gpu():  # not collected
    pass
"""


def _fake_project(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(textwrap.dedent(FAKE_TESTS))
    return tmp_path


def _runner(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", "tests", "--res", str(tmp_path / "res"),
                           "--jobs", "2", "--per-test-s", "0", *args, "tests"], cwd=tmp_path,
                          env=_env(PYTHONPATH=str(ROOT), **env), capture_output=True, text=True, timeout=200)


def test_runner_stops_at_its_deadline_names_what_did_not_run_and_a_second_call_runs_the_rest(tmp_path):
    _fake_project(tmp_path)
    r = _runner(tmp_path, "--call", "1", "--budget-s", "15", FAKE_SLOW="1")
    assert r.returncode == 1, r.stdout + r.stderr  # test_fail failed
    text = (tmp_path / "res" / "gpu_tests.txt").read_text()
    assert text in r.stdout
    # dealt round-robin to 2 processes: [pass, skip, after_slow, param[1]] and [fail, slow, param[0], odd_id]
    base = "tests/test_fake.py::"
    assert "8 collected" in text and "3 passed, 1 failed, 0 error, 1 skipped" in text, text
    assert f"FAILED  {base}test_fail  -- AssertionError: boom" in text
    not_run = [f"{base}test_slow", f"{base}test_param[0]", f"{base}test_odd_id[x/y::z [1]]"]
    assert text.split("not run:\n")[1].splitlines() == [f"  {n}" for n in not_run]
    assert "3 not run (the time budget)" in text

    r = _runner(tmp_path, "--call", "2", "--budget-s", "60", "--rest")
    assert r.returncode == 0, r.stdout + r.stderr  # nothing failed in this call
    text = (tmp_path / "res" / "gpu_tests.txt").read_text()
    assert "call 2: 3 run" in text and "6 passed, 1 failed, 0 error, 1 skipped" in text and "0 not run" in text
    assert "not run:" not in text and f"FAILED  {base}test_fail" in text  # the run's failures stay named


def test_runner_reports_collection_errors(tmp_path):
    _fake_project(tmp_path)
    (tmp_path / "tests" / "test_broken.py").write_text("import no_such_module_here\n")
    r = _runner(tmp_path, "--call", "1", "--budget-s", "60")
    assert r.returncode == 1
    text = (tmp_path / "res" / "gpu_tests.txt").read_text()
    assert "1 collection errors" in text and "tests/test_broken.py" in text and "no_such_module_here" in text
    assert "0 not run" in text


def test_priority_order_and_dealing():
    ids = ["tests/zz/test_new.py::a", "tests/ops/test_tokens.py::t", "tests/ops/test_extension.py::e",
           "tests/ops/test_add_layer_norm.py::x", "tests/ops/test_add_layer_norm.py::y"]
    groups = G.deal(ids, 2)
    assert groups == [
        ["tests/ops/test_extension.py::e", "tests/ops/test_add_layer_norm.py::y", "tests/zz/test_new.py::a"],
        ["tests/ops/test_add_layer_norm.py::x", "tests/ops/test_tokens.py::t"]]
    assert G.deal([], 4) == [] and len(G.deal(ids, 16)) == len(ids)
    assert all((ROOT / p).is_file() for p in G.PRIORITY)


def test_outcomes_keep_the_worst_phase(tmp_path):
    log = tmp_path / "a.tsv"
    log.write_text("t::a\tpassed\t1.00\t\nt::a\terror\t0.50\tteardown broke\nt::b\tskipped\t0.00\twhy\n")
    assert G.outcomes([log]) == {"t::a": ("error", 1.5, "teardown broke"), "t::b": ("skipped", 0.0, "why")}


def test_summary_reads_the_run(tmp_path):
    res = tmp_path
    (res / "run_id").write_text("2026-01-01T00:00:00Z\n")
    (res / "gpu_tests.txt").write_text("GPU tests (pytest -m gpu), run so far: 3 collected; 2 passed, 1 failed\n\n"
                                       "failed:\n  FAILED  tests/x.py::t  -- boom\n")
    rows = [("official-vit_b16", "mae_fast_graphed", "images_per_s", "6100"),
            ("official-vit_b16", "mae_fast_graphed", "median_s", "0.042"),
            ("official-vit_b16", "mae_fast_graphed", "peak_mem_mb", "13000"),
            ("attention-vit_b-encoder-fwd-B256-N50-H12-d64", "eager", "median_s", "0.0002"),
            ("attention-vit_b-encoder-fwd-B256-N50-H12-d64", "eager", "gbps", "100"),
            ("attention-vit_b-encoder-fwd-B256-N50-H12-d64", "mae_fast", "median_s", "0.0001"),
            ("attention-vit_b-encoder-fwd-B256-N50-H12-d64", "mae_fast", "gbps", "200")]
    with open(res / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "provider", "metric", "value", "device", "torch", "triton", "commit", "date"])
        for row in rows:
            w.writerow([*row, "NVIDIA H200", "2.11", "3.6", "abc", "2026-01-01T00:00:00Z"])
        w.writerow(["official-vit_b16", "mae_fast", "images_per_s", "1", "NVIDIA H200", "2.11", "3.6", "old",
                    "2025-01-01T00:00:00Z"])  # another run: not this one's
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", "summary", "--res", str(res)], cwd=ROOT,
                       env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "2 passed, 1 failed" in out and "FAILED  tests/x.py::t" in out
    assert "attention-vit_b-encoder-fwd-B256-N50-H12-d64: mae_fast 100.0 (2.00x), eager 200.0" in out
    assert "mae_fast_graphed" in out and "6100.0" in out and "ViT-B/16 >= 6,000" in out
    assert "not measured" not in out and " old " not in out
