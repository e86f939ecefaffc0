"""Benchmarks (measurements, not tests): one fine-tuning step -- forward, cross-entropy, backward and
the AdamW step -- of mae_fast.VisionTransformer against timm's VisionTransformer, eager and
torch.compile'd, on identical weights and inputs, 197 tokens (a 14 x 14 patch grid + cls).

Cases. CUDA: ViT-B/16 (batch 128) and ViT-L/16 (batch 64) at 224 px, bf16 autocast, fused AdamW,
drop path 0.1. CPU: the `tiny` preset's encoder (width 96, 4 blocks, patch 4) at 56 px, batch 16,
fp32, 1 thread (MAE_FAST_BENCH_THREADS); --bench-quick: batch 4, 3 rounds.

Per case and provider (benchmark.extra_info, then the results file): images_per_s (batch / median
step), first_step_s (compilation included for the compiled providers) and, for ours,
speedup_vs_timm: timm's median (same mode, same run) over ours. A table is printed at the end.

    pytest benchmarks/test_bench_finetune.py [--bench-quick]
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

import mae_fast
from benchmarks.common import CUDA, DEVICE, device_name

CPU_THREADS = int(os.environ.get("MAE_FAST_BENCH_THREADS", "1"))
PROVIDERS = ["timm", "mae_fast", "timm_compiled", "mae_fast_compiled"]  # timm first: ours divide by it
GPU_CASES = {"vit_b16": (dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, img_size=224), 128),
             "vit_l16": (dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, img_size=224), 64)}
CPU_CASES = {"tiny": (dict(patch_size=4, embed_dim=96, depth=4, num_heads=3, img_size=56), 16)}
NUM_CLASSES = 1000
_MEDIANS: dict[tuple[str, str], float] = {}


def cases(quick: bool):
    if CUDA:
        return list(GPU_CASES)
    return list(CPU_CASES)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--bench-quick", default=False) \
            or os.environ.get("MAE_FAST_BENCH_QUICK") == "1"  # as conftest.is_quick
        pairs = [(c, p) for c in cases(quick) for p in PROVIDERS]
        metafunc.parametrize(("case", "provider"), pairs, ids=[f"{c}-{p}" for c, p in pairs])


@pytest.fixture(scope="module", autouse=True)
def _setup_and_summary():
    old_interp, threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "0"  # CPU: the ops' vectorised fallbacks, not the interpreter
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(threads)
    if old_interp is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old_interp
    if _MEDIANS:
        print(f"\nfine-tuning step on {device_name()}, torch {torch.__version__} (ms; speedup = timm / ours)")
        for case in dict.fromkeys(c for c, _ in _MEDIANS):
            row = {p: _MEDIANS.get((case, p)) for p in PROVIDERS}
            cells = [f"{p} {1e3 * t:.2f}" for p, t in row.items() if t]
            for mode in ("", "_compiled"):
                ours, theirs = row.get("mae_fast" + mode), row.get("timm" + mode)
                if ours and theirs:
                    cells.append(f"speedup{mode or '_eager'} {theirs / ours:.2f}x")
            print(f"  {case}: " + ", ".join(cells))


def build(case: str, provider: str, batch: int):
    cfg = {**GPU_CASES, **CPU_CASES}[case][0]
    torch.manual_seed(0)
    ours = mae_fast.VisionTransformer(**cfg, num_classes=NUM_CLASSES, drop_path_rate=0.1 if CUDA else 0.0)
    if provider.startswith("timm"):
        from functools import partial

        vt = pytest.importorskip("timm.models.vision_transformer")
        model = vt.VisionTransformer(**cfg, num_classes=NUM_CLASSES, global_pool="avg", drop_path_rate=ours.blocks[-1].drop_path,
                                     norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
        model.load_state_dict(ours.state_dict())
    else:
        model = ours
    model.to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    net = torch.compile(model) if provider.endswith("_compiled") else model
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], generator=g).to(DEVICE)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss = F.cross_entropy(net(imgs).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()

    return step


def test_finetune_step(benchmark, bench_quick, case, provider):
    batch = 4 if bench_quick and not CUDA else {**GPU_CASES, **CPU_CASES}[case][1]
    step = build(case, provider, batch)
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    warm, rounds = (1, 3) if bench_quick else ((10, 30) if CUDA else (3, 20))
    benchmark.group = f"finetune step {case}"
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warm)
    median = benchmark.stats.stats.median
    _MEDIANS[(case, provider)] = median
    benchmark.extra_info.update(images_per_s=batch / median, first_step_s=first, batch=batch)
    theirs = _MEDIANS.get((case, provider.replace("mae_fast", "timm")))
    if provider.startswith("mae_fast") and theirs:
        benchmark.extra_info["speedup_vs_timm"] = theirs / median
