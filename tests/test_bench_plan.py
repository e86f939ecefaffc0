"""benchmarks/test_bench_step.py's plan: compile modes of the providers, and the order the GPU run
measures them in (under a time budget the tail is what gets dropped)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import test_bench_step as S  # noqa: E402


def test_compile_modes():
    assert S.compile_mode("mae_fast_graphed") == "reduce-overhead"
    assert S.compile_mode("reference_compiled") == "default"
    assert S.compile_mode("mae_fast") is None and S.compile_mode("hf") is None


def test_gpu_order_measures_vit_b_whole_then_eager_then_compiled_then_graphs(monkeypatch):
    monkeypatch.setattr(S, "CUDA", True)
    official = [p for p in S.PROVIDERS["official"] if p != "mae_fast_graphed"] + ["mae_fast_graphed"]
    monkeypatch.setitem(S.PROVIDERS, "official", official)  # as a CUDA import lists them
    monkeypatch.delenv("MAE_FAST_BENCH_CASES", raising=False)
    monkeypatch.delenv("MAE_FAST_BENCH_PROVIDERS", raising=False)
    plan = [(c.name, p) for c, p in S._selected(quick=False)]
    first = S.GPU_CASES[0].name
    assert plan[:len(official)] == [(first, p) for p in official]  # ViT-B/16 whole, graphs last of it
    rest = plan[len(official):]
    assert first not in {c for c, _ in rest}
    kinds = [0 if S.compile_mode(p) is None else 2 if p.endswith("_graphed") else 1 for _, p in rest]
    assert kinds == sorted(kinds) and kinds[0] == 0 and kinds[-1] == 2  # eager, then compiled, then graphs
    assert {c for c, p in rest if p.endswith("_graphed")} == {c.name for c in S.GPU_CASES[1:] if c.api == "official"}
