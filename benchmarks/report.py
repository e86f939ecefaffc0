"""Turns benchmarks/results/results.csv (long format, appended by `pytest benchmarks/`) into a
markdown report per device and a PNG bar chart of training-step images/s per provider.

    python -m benchmarks.report                       # every device's latest run
    python benchmarks/report.py --device CPU --md benchmarks/results/cpu.md --png benchmarks/results/cpu.png
    python -m benchmarks.report --csv /tmp/mae_fast_bench_quick.csv --md - --png /tmp/quick.png

A run is the set of rows sharing (device, date): speedups are ratios of rows of one run only,
never across runs or devices. The performance targets (targets_for) are noted where they apply,
with the measured value, the target and their ratio. Without --md/--png, each run goes to
benchmarks/results/<device slug>.md and .png; --md - prints the markdown only.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CSV = RESULTS / "results.csv"

OPT_IN = ["mae_fast_triton_attn", "mae_fast_triton_attn_compiled", "mae_fast_triton_attn_graphed",
          "mae_fast_triton_attn_fused", "mae_fast_fused"]  # benchmarks/steps.py's opt-in providers
OURS = ["mae_fast", "mae_fast_pred", "mae_fast_compiled", "mae_fast_graphed", *OPT_IN]
PEERS = ["reference", "reference_compiled", "hf", "vit_pytorch"]
PROVIDER_ORDER = OURS + PEERS
PROVIDER_NOTES = {
    "mae_fast": "mae_fast as the training CLI runs it (official API: return_pred=False)",
    "mae_fast_pred": "the drop-in call forward(imgs, ratio, noise) returning pred for all patches",
    "mae_fast_compiled": "torch.compile(mae_fast model)",
    "mae_fast_graphed": "torch.compile(mae_fast model, mode='reduce-overhead'): CUDA graphs",
    "mae_fast_triton_attn": "mae_fast with its own attention kernels (set_attention_backend('triton'))",
    "mae_fast_triton_attn_compiled": "torch.compile of mae_fast_triton_attn",
    "mae_fast_triton_attn_graphed": "torch.compile(mode='reduce-overhead') of mae_fast_triton_attn",
    "mae_fast_fused": "mae_fast, eager, each residual add fused into the next LayerNorm's kernel "
                      "(set_fused_add_norm(True))",
    "mae_fast_triton_attn_fused": "mae_fast_fused with its own attention kernels",
    "reference": "mae_fast.testing.reference, eager, explicit softmax attention",
    "reference_compiled": "torch.compile(reference)",
    "hf": "transformers ViTMAEForPreTraining, sdpa attention, same weights",
    "vit_pytorch": "vit_pytorch.MAE, same weights (draws its own noise)",
}


# ----------------------------------------------------------------------------- targets

def targets_for(device: str):
    """[(label, case, provider, kind, peer, target, higher_is_better)]; kind: images_per_s |
    speedup (provider / peer images/s) | speedup_interleaved (the same from the round-robin
    measurement) | memory (provider / peer peak memory)."""
    out = []
    if "H200" in device:
        for p in ("mae_fast", "mae_fast_compiled", "mae_fast_graphed", *OPT_IN):
            out += [
                ("ViT-B/16 >= 6,000 img/s on an H200", "official-vit_b16", p, "images_per_s", None, 6000, True),
                ("ViT-L/16 >= 2,900 img/s on an H200", "official-vit_l16", p, "images_per_s", None, 2900, True),
            ]
            for case in ("official-vit_b16", "official-vit_l16"):
                out += [
                    (">= 1.3x torch.compile(reference)", case, p, "speedup", "reference_compiled", 1.3, True),
                    (">= 2x transformers ViTMAE", case, p, "speedup", "hf", 2.0, True),
                    ("peak memory <= the reference's", case, p, "memory", "reference", 1.0, False),
                ]
    if device.startswith("CPU"):
        for case in ("official-tiny", "vit_pytorch-tiny"):
            out += [
                ("CPU tiny: no slower than the eager reference", case, "mae_fast", "speedup", "reference", 1.0, True),
                ("CPU tiny: no slower than the eager reference (interleaved)", case, "mae_fast",
                 "speedup_interleaved", "reference", 1.0, True),
                ("CPU tiny: lower peak memory than the reference", case, "mae_fast", "memory", "reference", 1.0,
                 False),
            ]
    return out


# ----------------------------------------------------------------------------- loading

def _float(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def load_runs(path: Path):
    """{(device, date): run} with run = dict(meta=..., metrics={(case, provider): {metric: value}},
    skipped={(case, provider): reason}, text={(case, provider, metric): text})."""
    runs = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["device"], row["date"])
            run = runs.setdefault(key, dict(meta=dict(device=row["device"], date=row["date"], torch=row["torch"],
                                                      triton=row["triton"], commit=row["commit"]),
                                            metrics=defaultdict(dict), skipped={}, text={}))
            cp = (row["case"], row["provider"])
            value = _float(row["value"])
            if row["metric"] == "skipped":
                run["skipped"][cp] = row["value"]
            elif value is None:
                run["text"][(*cp, row["metric"])] = row["value"]
            else:
                run["metrics"][cp][row["metric"]] = value
    return runs


def latest_per_device(runs, device_filter=None):
    best = {}
    for (device, date), run in runs.items():
        if device_filter and device_filter.lower() not in device.lower():
            continue
        if device not in best or date > best[device][0]:
            best[device] = (date, run)
    return [run for _, run in best.values()]


def step_cases(run):
    cases = []
    for (case, _), m in run["metrics"].items():
        if "images_per_s" in m and case not in cases:
            cases.append(case)
    ops = {c for (c, _), m in run["metrics"].items() if "gbps" in m}  # the op suites' cases
    for (case, _) in run["skipped"]:
        if case not in cases and case not in ops and not case.startswith("ceiling"):
            cases.append(case)
    return cases


def _providers(run, case):
    present = {p for (c, p) in run["metrics"] if c == case and "images_per_s" in run["metrics"][(c, p)]}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


# ----------------------------------------------------------------------------- markdown

def markdown(run, profile: str = "") -> str:
    """The run's tables; profile: benchmarks/profile_step.py's markdown of the same run, appended."""
    meta, M = run["meta"], run["metrics"]
    cpu = meta["device"].startswith("CPU")
    lines = [f"# mae_fast benchmarks: {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit `{meta['commit']}`, run {meta['date']} "
             "(all rows of one `pytest benchmarks/` session; speedups compare rows of this run only).", ""]
    warning = fallback_warning(run)
    lines += [*warning, ""] if warning else []
    if cpu:
        lines += ["**CPU run.** Only the ratios between providers mean something here; absolute CPU times "
                  "and MFU say nothing about GPU performance. fp32, single thread.", ""]
    ceil = {k: v for k, v in M.items() if k[0].startswith("ceiling")}
    for (case, _), m in sorted(ceil.items()):
        if "matmul_tflops" in m:
            lines.append(f"Matmul ceiling ({case.removeprefix('ceiling ')[1:-1]}): "
                         f"{m['matmul_tflops']:.3g} TFLOP/s (measured in this run; the MFU denominator).")
        if "copy_gbps" in m:
            lines.append(f"Copy bandwidth: {m['copy_gbps']:.4g} GB/s (read + write bytes of a large copy).")
    copy_gbps = next((m["copy_gbps"] for (c, _), m in ceil.items() if "copy_gbps" in m), None)
    if ceil:
        lines.append("")

    cases = step_cases(run)
    if cases:
        lines += ["## Training step (forward + backward + AdamW step)", ""]
        for case in cases:
            provs = _providers(run, case)
            peers = [p for p in PROVIDER_ORDER if p in provs and p in PEERS]
            batch = next((M[(case, p)].get("batch") for p in provs if "batch" in M[(case, p)]), None)
            ilv = "reference" in provs and any("images_per_s_interleaved" in M[(case, p)] for p in provs)
            lines += [f"### {case}" + (f" (batch {int(batch)})" if batch else ""), "",
                      "| provider | images/s | ms/step | peak MiB | TFLOP/s | MFU | "
                      + " | ".join(f"vs {p}" for p in peers) + (" | vs reference, interleaved" if ilv else "") + " |",
                      "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(peers) + ilv)]
            for p in provs:
                m = M[(case, p)]
                cells = [f"**{p}**" if p in OURS else p, _fmt(m.get("images_per_s"), ",.1f"),
                         _fmt(m.get("median_s") and m["median_s"] * 1e3, ".2f"), _fmt(m.get("peak_mem_mb"), ",.1f"),
                         _fmt(m.get("tflops"), ".3g"), _fmt(m.get("mfu") and 100 * m["mfu"], ".1f") + "%"]
                for q in peers:
                    r = M[(case, q)].get("images_per_s")
                    cells.append("" if q == p or not r else f"{m['images_per_s'] / r:.2f}x")
                if ilv:
                    a, b = m.get("images_per_s_interleaved"), M[(case, "reference")].get("images_per_s_interleaved")
                    cells.append(f"{a / b:.2f}x" if a and b and p != "reference" else "")
                lines.append("| " + " | ".join(cells) + " |")
            skipped = [(p, why) for (c, p), why in run["skipped"].items() if c == case]
            if skipped:
                lines.append("")
                lines += [f"- skipped {p}: {why}" for p, why in skipped]
            lines.append("")
        measured = {p for case in cases for p in _providers(run, case)}
        lines += ["Providers: " + "; ".join(f"`{p}` {PROVIDER_NOTES[p]}" for p in PROVIDER_ORDER if p in measured)
                  + ".",
                  "images/s = batch / median step (warm-up excluded); MFU = counted model FLOPs "
                  "(benchmarks/flops.py, the same for every provider of a case) / time / the matmul ceiling; "
                  + ("peak memory = torch.cuda.max_memory_allocated from the first step on (a CUDA graph's "
                     "capture included: its replays allocate nothing)."
                     if not cpu else "peak memory = tensors alive at the step start + the peak of the "
                     "profiler's allocation trace over one step. \"interleaved\": the eager providers measured "
                     "again round-robin, one step each per round, so that the load of a shared machine hits "
                     "them alike (the per-provider medians run one after another)."), ""]

    tgt = target_rows(run)
    if tgt:
        lines += ["## Targets", "", "| target | case | provider | measured | target | measured/target | met |",
                  "|---|---|---|---:|---:|---:|:---:|"]
        for label, case, p, measured, target, hib in tgt:
            if measured is None:
                lines.append(f"| {label} | {case} | {p} | not measured |  {target:g} | | |")
                continue
            ok = measured >= target if hib else measured <= target
            lines.append(f"| {label} | {case} | {p} | {measured:,.3g} | {'>=' if hib else '<='} {target:g} | "
                         f"{measured / target:.2f} | {'yes' if ok else '**no**'} |")
        lines += ["", "speedup = images/s ratio; memory = peak-memory ratio (provider / peer).", ""]

    ops = op_rows(run)
    if ops:
        flops = any("tflops" in m for _, _, m in ops)  # the attention suite counts FLOPs
        lines += ["## Fused ops (benchmarks/test_bench_*.py but the step)", "",
                  "| case | impl | median us | GB/s (counted bytes) |" + (" % of copy |" if copy_gbps else "")
                  + (" TFLOP/s (counted) |" if flops else "") + " vs eager |",
                  "|---|---|---:|---:|" + ("---:|" if copy_gbps else "") + ("---:|" if flops else "") + "---:|"]
        for case, p, m in ops:
            gbps = m.get("gbps")
            eager = run["metrics"].get((case, "eager"), {}).get("median_s")
            speedup = eager / m["median_s"] if eager and m.get("median_s") and p != "eager" else None
            row = [case, p, _fmt(m.get("median_s") and m["median_s"] * 1e6, ",.1f"), _fmt(gbps, ",.1f")]
            if copy_gbps:
                row.append(_fmt(gbps and 100 * gbps / copy_gbps, ".0f") + ("%" if gbps else ""))
            if flops:
                row.append(_fmt(m.get("tflops"), ".3g"))
            row.append(_fmt(speedup, ".2f") + ("x" if speedup else ""))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if copy_gbps:
            lines += ["% of copy: achieved GB/s over the large-copy bandwidth measured in this run"
                      + ("; small CPU shapes stay in cache, so it can exceed 100%." if cpu else "."), ""]
    if profile:
        lines += ["## Where a step's time goes (benchmarks/profile_step.py, same run)", "", profile.strip(), ""]
    return "\n".join(lines)


def target_rows(run):
    M = run["metrics"]
    out = []
    for label, case, p, kind, peer, target, hib in targets_for(run["meta"]["device"]):
        mine = M.get((case, p), {})
        if p in OPT_IN and not mine:  # run only when asked for: no "not measured" rows for them
            continue
        other = M.get((case, peer), {}) if peer else {}
        if kind == "images_per_s":
            measured = mine.get("images_per_s")
        elif kind.startswith("speedup"):
            key = "images_per_s_interleaved" if kind.endswith("interleaved") else "images_per_s"
            a, b = mine.get(key), other.get(key)
            measured = a / b if a and b else None
        else:
            a, b = mine.get("peak_mem_mb"), other.get("peak_mem_mb")
            measured = a / b if a and b else None
        shown = f"{label} (vs {peer})" if peer and peer not in label and kind != "memory" else label
        out.append((shown, case, p, measured, target, hib))
    return out


def op_rows(run):
    rows = []
    for (case, p), m in run["metrics"].items():
        if "images_per_s" in m or case.startswith("ceiling") or "gbps" not in m:
            continue
        rows.append((case, p, m))
    order = {"mae_fast": 0, "eager": 1, "compiled": 2}
    return sorted(rows, key=lambda r: (r[0], order.get(r[1], 9), r[1]))


def fallback_warning(run) -> list[str]:
    """A warning line when mae_fast's rows of this run ran the PyTorch fallbacks of its ops."""
    why = sorted({v for (_, _, metric), v in run["text"].items() if metric == "ops_path" and v.startswith("PyTorch")})
    return [f"**WARNING: the mae_fast rows of this run ran the PyTorch fallbacks of its ops, not its kernels** "
            f"({'; '.join(why)})."] if why else []


def summary(run) -> str:
    """A short fixed-width table: step images/s, speedups, memory, MFU, then the targets."""
    meta, M = run["meta"], run["metrics"]
    lines = [f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['commit']} | {meta['date']}",
             *fallback_warning(run),
             f"{'case':18s} {'provider':19s} {'img/s':>9s} {'vs ref':>7s} {'vs ref_c':>8s} {'vs hf/vp':>8s} "
             f"{'peak MiB':>9s} {'MFU':>6s}"]
    for case in step_cases(run):
        for p in _providers(run, case):
            m = M[(case, p)]
            ips = m["images_per_s"]

            def vs(*peers):
                for q in peers:
                    r = M.get((case, q), {}).get("images_per_s")
                    if r and q != p:
                        return f"{ips / r:.2f}x"
                return "-"
            lines.append(f"{case:18s} {p:19s} {ips:9.1f} {vs('reference'):>7s} {vs('reference_compiled'):>8s} "
                         f"{vs('hf', 'vit_pytorch'):>8s} {m.get('peak_mem_mb', float('nan')):9.1f} "
                         f"{100 * m.get('mfu', float('nan')):5.1f}%")
        for (c, p), why in run["skipped"].items():
            if c == case:
                lines.append(f"{case:18s} {p:19s} skipped: {why[:90]}")
    for label, case, p, measured, target, hib in target_rows(run):
        if measured is None:
            lines.append(f"target {label} [{case} {p}]: not measured")
        else:
            ok = measured >= target if hib else measured <= target
            lines.append(f"target {label} [{case} {p}]: {measured:,.3g} vs {target:g} "
                         f"({measured / target:.2f} of target) {'MET' if ok else 'MISSED'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- chart

def chart(run, path: Path) -> bool:
    cases = [c for c in step_cases(run) if _providers(run, c)]
    if not cases:
        return False
    try:
        import matplotlib
    except ImportError as e:
        print(f"[report] no chart: matplotlib is not installed ({e})", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = run["metrics"]
    fig, axes = plt.subplots(len(cases), 1, figsize=(8, 1.2 + 0.45 * max(len(_providers(run, c)) for c in cases)
                                                     * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        provs = _providers(run, case)[::-1]
        vals = [M[(case, p)]["images_per_s"] for p in provs]
        colors = ["#1f77b4" if p in OURS else "#a0a0a0" for p in provs]
        bars = ax.barh(provs, vals, color=colors)
        ref = M.get((case, "reference"), {}).get("images_per_s")
        for bar, v, p in zip(bars, vals, provs):
            note = f"{v:,.0f}" + (f"  ({v / ref:.2f}x ref)" if ref and p != "reference" else "")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + note, va="center", fontsize=8)
        ax.set_xlim(0, max(vals) * 1.45)
        batch = M[(case, provs[0])].get("batch")
        ax.set_title(f"{case}" + (f", batch {int(batch)}" if batch else ""), fontsize=10, loc="left")
        ax.set_xlabel("images / s (training step)", fontsize=8)
        ax.tick_params(labelsize=8)
    meta = run["meta"]
    fig.suptitle(f"{meta['device']}\ntorch {meta['torch']}, commit {meta['commit']}, {meta['date']}"
                 + ("\nCPU: compare ratios only" if meta["device"].startswith("CPU") else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI

def slug(device: str) -> str:
    if device.startswith("CPU"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") or "device"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--device", default=None, help="only devices whose label contains this (case-insensitive)")
    ap.add_argument("--md", default=None, help="markdown output ('-' for stdout only); default results/<device>.md")
    ap.add_argument("--png", default=None, help="chart output; default results/<device>.png")
    ap.add_argument("--outdir", type=Path, default=RESULTS, help="where the default <device>.md/.png go")
    ap.add_argument("--summary", action="store_true", help="print a short text table only (writes nothing)")
    ap.add_argument("--run", default=None, help="the run whose id (date) starts with this, instead of the latest")
    ap.add_argument("--profile", type=Path, default=None,
                    help="profile_step markdown of the same run to append; default <outdir>/gpu_logs/profile.md "
                         "where it exists (gpu_run.sh writes its logs there; they are not committed)")
    args = ap.parse_args(argv)
    if not args.csv.exists():
        print(f"no results file at {args.csv}: run `pytest benchmarks/` first", file=sys.stderr)
        return 1
    runs = load_runs(args.csv)
    if args.run:
        runs = {key: run for key, run in runs.items() if key[1].startswith(args.run)}
    runs = latest_per_device(runs, args.device)
    if not runs:
        print(f"no runs in {args.csv}" + (f" for device {args.device!r}" if args.device else ""), file=sys.stderr)
        return 1
    if (args.md not in (None, "-") or args.png) and len(runs) > 1:
        print("--md/--png name one file: pick one device with --device", file=sys.stderr)
        return 2
    if args.summary:
        for run in runs:
            print(summary(run))
        return 0
    profile = args.profile or args.outdir / "gpu_logs" / "profile.md"
    profile = profile.read_text() if profile.is_file() else ""
    for run in runs:
        md = markdown(run, "" if run["meta"]["device"].startswith("CPU") else profile)
        print(md)
        name = slug(run["meta"]["device"])
        if args.md != "-":
            md_path = Path(args.md) if args.md else args.outdir / f"{name}.md"
            md_path.parent.mkdir(parents=True, exist_ok=True)
            md_path.write_text(md + "\n")
            print(f"[report] wrote {md_path}", file=sys.stderr)
        png_path = Path(args.png) if args.png else (None if args.md == "-" else args.outdir / f"{name}.png")
        if png_path is not None and chart(run, png_path):
            print(f"[report] wrote {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
