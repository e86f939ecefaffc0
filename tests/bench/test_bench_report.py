"""benchmarks/report.py on a synthetic long-format results file: run selection, same-run speedups,
targets, the chart, and the CLI (CPU, no benchmark is run)."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "mae_fast_bench_report", Path(__file__).resolve().parents[2] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = report
_spec.loader.exec_module(report)

COLUMNS = ["case", "provider", "metric", "value", "device", "torch", "triton", "commit", "date"]


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for row in rows:
            w.writerow(row)


def _run(device, date, values, extra=()):
    rows = []
    for (case, provider), metrics in values.items():
        for metric, value in metrics.items():
            rows.append([case, provider, metric, value, device, "2.11", "3.6", "abc123", date])
    return rows + [[*e, device, "2.11", "3.6", "abc123", date] for e in extra]


@pytest.fixture
def results(tmp_path):
    gpu = "NVIDIA H200"
    old = _run(gpu, "2026-01-01T00:00:00Z", {("official-vit_b16", "mae_fast"): {"images_per_s": 1.0}})
    new = _run(gpu, "2026-02-01T00:00:00Z", {
        ("official-vit_b16", "mae_fast"): {"images_per_s": 6600, "median_s": 256 / 6600, "peak_mem_mb": 900,
                                           "mfu": 0.5, "batch": 256},
        ("official-vit_b16", "reference"): {"images_per_s": 2200, "median_s": 256 / 2200, "peak_mem_mb": 1000,
                                            "batch": 256},
        ("official-vit_b16", "reference_compiled"): {"images_per_s": 6000, "peak_mem_mb": 800},
        ("ceiling (bf16)", "torch.matmul"): {"matmul_tflops": 790},
        ("ceiling (bf16)", "copy_"): {"copy_gbps": 4300},
        ("loss_mask-fwd-bfloat16", "mae_fast"): {"median_s": 1e-5, "gbps": 2150},
        ("loss_mask-fwd-bfloat16", "eager"): {"median_s": 4e-5, "gbps": 537.5},
    }, extra=[("official-vit_b16", "hf", "skipped", "transformers is not installed (No module named x)")])
    cpu = _run("CPU Test (2 cores)", "2026-02-01T00:00:00Z", {
        ("official-tiny", "mae_fast"): {"images_per_s": 90, "images_per_s_interleaved": 110, "peak_mem_mb": 70},
        ("official-tiny", "reference"): {"images_per_s": 100, "images_per_s_interleaved": 100, "peak_mem_mb": 80},
    })
    path = tmp_path / "results.csv"
    _write(path, old + new + cpu)
    return path


def test_latest_run_per_device_and_ratios(results):
    runs = report.latest_per_device(report.load_runs(results))
    assert len(runs) == 2
    gpu = next(r for r in runs if r["meta"]["device"] == "NVIDIA H200")
    assert gpu["meta"]["date"] == "2026-02-01T00:00:00Z"
    assert gpu["skipped"][("official-vit_b16", "hf")].startswith("transformers is not installed")
    md = report.markdown(gpu)
    assert "| **mae_fast** | 6,600.0 |" in md and "| 3.00x | 1.10x |" in md  # vs reference, vs compiled
    assert "skipped hf: transformers is not installed" in md
    assert "| loss_mask-fwd-bfloat16 | mae_fast | 10.0 | 2,150.0 | 50% | 4.00x |" in md  # % of copy, vs eager


def test_targets(results):
    runs = {r["meta"]["device"]: r for r in report.latest_per_device(report.load_runs(results))}
    rows = {(label, case, p): (measured, target) for label, case, p, measured, target, _ in
            report.target_rows(runs["NVIDIA H200"])}
    assert rows[("ViT-B/16 >= 6,000 img/s on an H200", "official-vit_b16", "mae_fast")] == (6600, 6000)
    measured, _ = rows[(">= 1.3x torch.compile(reference) (vs reference_compiled)", "official-vit_b16", "mae_fast")]
    assert measured == pytest.approx(1.1)
    assert rows[("peak memory <= the reference's", "official-vit_b16", "mae_fast")][0] == pytest.approx(0.9)
    assert rows[("ViT-L/16 >= 2,900 img/s on an H200", "official-vit_l16", "mae_fast")][0] is None
    cpu = {(label, case): m for label, case, p, m, _, _ in report.target_rows(runs["CPU Test (2 cores)"])}
    assert cpu[("CPU tiny: no slower than the eager reference", "official-tiny")] == pytest.approx(0.9)
    assert cpu[("CPU tiny: no slower than the eager reference (interleaved)", "official-tiny")] == pytest.approx(1.1)
    assert "MISSED" in report.summary(runs["CPU Test (2 cores)"])


def test_cli_writes_markdown_and_chart(results, tmp_path):
    pytest.importorskip("matplotlib")
    md, png = tmp_path / "cpu.md", tmp_path / "cpu.png"
    assert report.main(["--csv", str(results), "--device", "CPU", "--md", str(md), "--png", str(png)]) == 0
    assert md.read_text().startswith("# mae_fast benchmarks: CPU Test (2 cores)")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.main(["--csv", str(results), "--md", str(md)]) == 2  # one file, two devices
    assert report.main(["--csv", str(tmp_path / "missing.csv")]) == 1
    assert report.main(["--csv", str(results), "--summary"]) == 0
    assert report.main(["--csv", str(results), "--device", "H200", "--run", "2026-01", "--md", str(md)]) == 0
    assert "run 2026-01-01T00:00:00Z" in md.read_text()  # an older run, picked by its id


def test_gpu_report_appends_the_profile_of_its_run(results, tmp_path):
    prof = tmp_path / "gpu_logs" / "profile.md"
    prof.parent.mkdir()
    prof.write_text("### Profile: official-vit_b16\n\n**mae_fast**: 90 ms/step wall (GPU busy 51%)\n")
    gpu_md, cpu_md = tmp_path / "gpu.md", tmp_path / "cpu.md"
    for device, md in (("H200", gpu_md), ("CPU", cpu_md)):  # the default: <outdir>/gpu_logs/profile.md
        assert report.main(["--csv", str(results), "--device", device, "--md", str(md), "--png", str(tmp_path / "x.png"),
                            "--outdir", str(tmp_path)]) == 0
    assert "## Where a step's time goes" in gpu_md.read_text() and "GPU busy 51%" in gpu_md.read_text()
    assert "GPU busy" not in cpu_md.read_text()  # a CPU run's table does not take a GPU profile


def test_fallback_runs_are_flagged(results, tmp_path):
    runs = {r["meta"]["device"]: r for r in report.latest_per_device(report.load_runs(results))}
    assert "WARNING" not in report.markdown(runs["NVIDIA H200"]) + report.summary(runs["NVIDIA H200"])
    why = "PyTorch fallbacks: no mae_fast.kernels.patchify"
    path = tmp_path / "fallback.csv"
    _write(path, _run("NVIDIA H200", "2026-03-01T00:00:00Z", {("official-vit_b16", "mae_fast"): {"images_per_s": 5}},
                      extra=[("official-vit_b16", "mae_fast", "ops_path", why)]))
    run = report.latest_per_device(report.load_runs(path))[0]
    for text in (report.markdown(run), report.summary(run)):
        assert "ran the PyTorch fallbacks of its ops, not its kernels" in text and why in text


def test_bench_step_records_the_ops_path_on_cpu():
    from benchmarks import steps

    assert steps.ops_path() == "cpu"
