"""Host time of one eager training step, measured on CPU at a width where the arithmetic is
negligible: a GPU-free measure of what a host-bound GPU step waits on (it times Python, dispatch
and autograd, not kernels).

An eager ViT-B/16 step of mae_fast on an H200 is host-bound: its kernels keep the GPU busy about
half of the step (docs/benchmarks.md, "Where a step's time goes"), so its host time sets the speed.
Here each provider runs a ViT-L-deep model (24 + 8 blocks, width 64, batch 2) in fp32 on one
thread, on 64 px images (16 patches: 5 encoder and 17 decoder tokens, so that attention's N^2
arithmetic is negligible too; at 224 px the CPU attention arithmetic of the SDPA and explicit-softmax
rows would weigh in). `mae_fast (fused)` takes the fused add + LayerNorm path as on CUDA with
set_fused_add_norm(True), its kernels replaced by the allocations they would make
(`torch.library`: through the custom op's dispatch, which eager calls do not take; `own attention`:
the blocks' attention on mae_fast.ops.attention, also with no-op kernels). Providers run
round-robin, one step each per round, so the load of a shared machine hits them alike; the medians
are reported.

    python -m benchmarks.host_overhead [--rounds 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import steps as S  # noqa: E402
from mae_fast.models import blocks  # noqa: E402

CASE = S.official_case("host-vit_l-depth", 2, 64, 16, 64, 24, 2, 32, 8, 2)


def _no_op_kernels():
    """The add_layer_norm launchers' outputs, allocated and never computed."""
    e = torch.empty

    def fwd(x, delta, w, b, eps, res_dtype, out_dtype):
        lead = x.shape[:-1]
        return e(x.shape, dtype=res_dtype), e(x.shape, dtype=out_dtype), e(lead), e(lead)

    def bwd(g_res, g_n, res, w, has_bias, mean, rstd, x_dtype, delta_dtype):
        gd = None if delta_dtype == x_dtype else e(res.shape, dtype=delta_dtype)
        D = res.shape[-1]
        return e(res.shape, dtype=x_dtype), gd, e(D), e(D) if has_bias else None

    return types.SimpleNamespace(MAX_D=1 << 16, add_layer_norm_fwd=fwd, add_layer_norm_bwd=bwd)


def _no_op_attention():
    """The attention launchers' outputs, allocated and never computed."""
    e = torch.empty

    def fwd(qkv, heads):
        B, N, width = qkv.shape
        return e(B, N, width // 3, dtype=qkv.dtype), e(B * heads, N)

    def bwd(grad_out, qkv, out, lse, heads):
        return e(qkv.shape, dtype=qkv.dtype)

    return types.SimpleNamespace(MAX_HEAD_DIM=128, attention_fwd=fwd, attention_bwd=bwd)


def _fused_path(via_dispatcher: bool = False, attention: bool = False, add_norm: bool = True):
    """The blocks and the op take the kernel path, with no-op kernels; via_dispatcher: through the
    torch.library custom op instead of _AddLayerNormEager (what the dispatch costs); attention: the
    blocks' attention too (mae_fast.ops.attention, for the mae_fast_triton_attn provider);
    add_norm=False: the attention only."""
    k = _no_op_kernels()
    aln = sys.modules["mae_fast.ops.add_layer_norm"]
    patches = [mock.patch.object(blocks, "triton_kernels", lambda name, t: k),
               mock.patch.object(aln, "_kernels", lambda t, res_dtype, *also: k)] if add_norm else []
    if via_dispatcher:
        op = types.SimpleNamespace(apply=torch.ops.mae_fast.add_layer_norm)
        patches.append(mock.patch.object(aln, "_AddLayerNormEager", op))
    if attention:
        ka = _no_op_attention()
        patches += [mock.patch.object(blocks, "_attention_kernels", lambda qkv, heads: ka),
                    mock.patch.object(sys.modules["mae_fast.ops.attention"], "kernels_for", lambda qkv, heads: ka)]
    return patches


def measure(rounds: int, case=CASE, warmup: int = 3) -> dict:
    """{label: median host seconds per step}, providers interleaved."""
    torch.manual_seed(0)
    steps = {}
    for label, provider, fused in [("reference", "reference", None), ("hf", "hf", None),
                                   ("mae_fast (plain ops)", "mae_fast", None),
                                   ("mae_fast (fused)", "mae_fast_fused", {}),
                                   ("mae_fast (fused, torch.library)", "mae_fast_fused", dict(via_dispatcher=True)),
                                   ("mae_fast (fused, own attention)", "mae_fast_triton_attn_fused",
                                    dict(attention=True)),
                                   ("mae_fast (plain ops, own attention)", "mae_fast_triton_attn",
                                    dict(attention=True, add_norm=False))]:
        try:
            _, _, _, step, _ = S.make_step(case, provider)
        except S.PeerUnavailable as e:
            print(f"[host] {label} skipped: {e}")
            continue
        steps[label] = (step, [] if fused is None else _fused_path(**fused))
    times = {label: [] for label in steps}
    for r in range(warmup + rounds):
        for label, (step, patches) in steps.items():
            for p in patches:
                p.start()
            try:
                t = time.perf_counter()
                step()
                if r >= warmup:
                    times[label].append(time.perf_counter() - t)
            finally:
                for p in patches:
                    p.stop()
    return {label: statistics.median(ts) for label, ts in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(args.rounds)
    base = res.get("reference")
    c = CASE
    print(f"host time per eager step: {c.depth}+{c.dec_depth} blocks, width {c.dim}, batch {c.batch}, fp32, "
          f"1 thread, torch {torch.__version__}, {args.rounds} interleaved rounds")
    for label, t in res.items():
        print(f"{label:36s} {t * 1e3:8.2f} ms" + (f"   {t / base:.2f}x the reference" if base else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
