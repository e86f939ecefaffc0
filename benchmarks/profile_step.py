"""Where a training step's time goes: torch.profiler over a few steps of a benchmark case, kernels
grouped into categories (matmul, attention, layer norm, elementwise, optimizer, mae_fast's ops...).

On CUDA it also gives the GPU-busy fraction (kernel time / wall time): near 100% means launch
overhead is hidden and CUDA graphs cannot help; lower means the host is the bottleneck. On CPU the
categories are aten ops' self time (a smoke run: the harness stays alive in CI).

Then, without torch.profiler, where the host's time goes: the time step() takes to return after a
sync (the host's share of a step, unless the launch queue fills), and cProfile's functions by own
time (--host-steps; a C++ op's own time there is its dispatch and launch, or a wait on the GPU).

CUDA-graph providers (mae_fast_graphed) are profiled first, before any other profiler session of
the process has started and ended: a session that ended before a CUDA graph was captured can leave
that graph's kernels untraced (CUPTI). Where no kernel of the profiled steps was recorded, the
report says so instead of showing empty categories.

    python -m benchmarks.profile_step --case official-vit_b16 --providers mae_fast,reference --out prof.md
    python -m benchmarks.profile_step --case official-vit_b16 --providers mae_fast_graphed,mae_fast --dry-run
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import steps as S  # noqa: E402
from benchmarks.common import device_name  # noqa: E402

# first match wins; matched against the lower-cased kernel (CUDA) or aten op (CPU) name
CATEGORIES = [
    ("mae_fast ops", r"patchify|masked_mse|unshuffle|gather_tokens|add_layer_norm|mae_fast"),
    ("attention", r"flash|fmha|attention|sdpa|softmax|mha"),
    ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|cublas|aten::(mm|addmm|bmm|baddbmm)\b"),
    ("layer norm", r"layer_norm|layernorm"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("inductor fused", r"^triton_"),
    ("copy / cast", r"copy|cast|to_copy|contiguous|fill|zero|cat"),
    ("reduction", r"reduce|sum|mean"),
    ("elementwise", r"elementwise|vectorized|gelu|add|mul|div|sub|pow|sqrt|where"),
]


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, pat in CATEGORIES if re.search(pat, low)), "other")


def profile_provider(case, provider: str, steps: int, warmup: int, host_steps: int = 0) -> dict:
    """Profiles `steps` training steps after `warmup`; returns per-step times by kernel / op name,
    and with host_steps, host_profile's report of that many more."""
    from torch.profiler import ProfilerActivity, profile

    model, opt, _, step, _ = S.make_step(case, provider)
    for _ in range(warmup):
        step()
    S.sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if S.CUDA else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        S.sync()
        wall = (time.perf_counter() - t0) / steps
    times, launches = defaultdict(float), 0
    if S.CUDA:  # device-side events only (kernels, memcpy/memset): the aten ops above them also
        # report their kernels' time as their own, so counting both would count it twice
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CPU:
                times[e.name] += e.time_range.elapsed_us() * 1e-6 / steps
                launches += 1
    else:
        for e in prof.key_averages():
            if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                times[e.key] += e.self_cpu_time_total * 1e-6 / steps
    host = host_profile(step, host_steps) if host_steps else None
    del model, opt, step
    S.cleanup(S.compile_mode(provider) is not None)
    return dict(wall=wall, times=dict(times), launches=launches / steps, host=host)


def host_profile(step, steps: int, top: int = 12) -> dict:
    """{return_s: median time for step() to return after a sync, functions: the top functions by
    cProfile own time, (name, s per step, calls per step)} over `steps` steps."""
    import cProfile
    import pstats
    import statistics

    returns = []
    for _ in range(steps):
        S.sync()
        t = time.perf_counter()
        step()
        returns.append(time.perf_counter() - t)
    S.sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    S.sync()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return dict(return_s=statistics.median(returns),
                functions=[(f"{Path(f).name}:{line}({name})" if line else name, own / steps, calls / steps)
                           for (f, line, name), (_, calls, own, _, _) in rows])


def render(case, results: dict, top: int = 8) -> str:
    unit = "kernel" if S.CUDA else "aten op (self CPU time)"
    lines = [f"### Profile: {case.name}, batch {case.batch}, {device_name()}, torch {torch.__version__}", ""]
    for provider, r in results.items():
        busy = sum(r["times"].values())
        by_cat = defaultdict(float)
        for name, t in r["times"].items():
            by_cat[category(name)] += t
        lines += [f"**{provider}**: {r['wall'] * 1e3:.2f} ms/step wall, {busy * 1e3:.2f} ms/step in {unit}s"
                  + (f" (GPU busy {busy / r['wall']:.0%}), {r['launches']:.0f} kernels/step" if S.CUDA else ""),
                  ""]
        if busy <= 0:
            lines += [f"no {unit} was recorded in the profiled steps"
                      + (" (the profiler traced none of the CUDA graph's kernels)"
                         if S.compile_mode(provider) == "reduce-overhead" else ""), ""]
        else:
            lines += ["| category | ms/step | share |", "|---|---:|---:|"]
            lines += [f"| {cat} | {t * 1e3:.2f} | {t / busy:.1%} |"
                      for cat, t in sorted(by_cat.items(), key=lambda kv: -kv[1])]
            lines += ["", f"top {top} {unit}s:", ""]
            lines += [f"- {t * 1e3:7.2f} ms  [{category(n)}] {n[:110]}"
                      for n, t in sorted(r["times"].items(), key=lambda kv: -kv[1])[:top]]
            lines.append("")
        if r.get("host"):
            h = r["host"]
            lines += [f"host: step() returns {h['return_s'] * 1e3:.2f} ms after a sync; cProfile's top functions "
                      f"by own time (ms/step, calls/step):", ""]
            lines += [f"- {t * 1e3:7.2f} ms {calls:7.0f}  {name[:110]}" for name, t, calls in h["functions"]]
            lines.append("")
    return "\n".join(lines)


def check_args(case_name: str, providers: list[str], cuda: bool | None = None):
    """(case, providers in the order to profile them: CUDA-graph ones first) for CUDA (cuda=True)
    or a CPU (False; default: this machine); ValueError names what does not fit."""
    cuda = S.CUDA if cuda is None else cuda
    if case_name not in S.ALL_CASES:
        raise ValueError(f"--case: unknown {case_name!r}; known: {sorted(S.ALL_CASES)}")
    case = S.ALL_CASES[case_name]
    if not providers:
        raise ValueError("--providers: none named")
    allowed = S.providers_of(case.api, cuda) + S.OPT_IN[case.api]
    unknown = [x for x in providers if x not in allowed]
    if unknown:
        cuda_only = [x for x in unknown if x in S.providers_of(case.api, True) + S.OPT_IN[case.api]]
        why = f"; {cuda_only} need CUDA" if cuda_only else ""
        raise ValueError(f"--providers: {unknown} not among {allowed} for the {case.api} API{why}")
    return case, sorted(providers, key=lambda x: S.compile_mode(x) != "reduce-overhead")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="official-vit_b16" if S.CUDA else "official-tiny", choices=sorted(S.ALL_CASES))
    p.add_argument("--providers", default="mae_fast,reference",
                   help="comma-separated providers of benchmarks/steps.py")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--host-steps", type=int, default=3, help="steps of the host profile (0: none)")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    p.add_argument("--dry-run", action="store_true",
                   help="check the case and providers for a CUDA run, print the plan, profile nothing")
    args = p.parse_args(argv)
    try:
        case, providers = check_args(args.case, [x for x in args.providers.split(",") if x],
                                     cuda=True if args.dry_run else None)
    except ValueError as e:
        p.error(str(e))
    if args.dry_run:
        print(f"profile {case.name}: {', '.join(providers)}, {args.warmup} warm-up + {args.steps} profiled steps"
              + (f", host profile of {args.host_steps} steps" if args.host_steps else ""))
        return 0
    from torch.profiler import ProfilerActivity, profile

    if S.compile_mode(providers[0]) != "reduce-overhead":
        # the profiler's one-time start-up would otherwise land on the first provider; not before a
        # CUDA graph's capture (see the module's docstring)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if S.CUDA else [])):
            torch.ones(8).sum()
    results = {}
    if args.out and args.out.exists():
        args.out.unlink()  # an earlier run's profile is not this one's
    old_interp = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # CPU: the ops' PyTorch fallbacks, as the step benchmark runs them
    try:
        for provider in providers:
            try:
                results[provider] = profile_provider(case, provider, args.steps, args.warmup, args.host_steps)
            except S.PeerUnavailable as e:
                print(f"{provider}: skipped ({e})")
                continue
            if args.out:  # after each provider: a run stopped by a time limit keeps what it profiled
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(render(case, results) + "\n")
    finally:
        if old_interp is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old_interp
    print(render(case, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
