"""The step benchmark's plan (benchmarks/steps.py): compile modes of the providers, and the order
the GPU run measures them in (under a time budget the tail is what gets dropped)."""
import sys

import pytest

from benchmarks import steps as S


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
    plan = [(c.name, p) for c, p in S.selected(quick=False)]
    first = S.GPU_CASES[0].name
    assert plan[:len(official)] == [(first, p) for p in official]  # ViT-B/16 whole, graphs last of it
    rest = plan[len(official):]
    assert first not in {c for c, _ in rest}
    kinds = [0 if S.compile_mode(p) is None else 2 if p.endswith("_graphed") else 1 for _, p in rest]
    assert kinds == sorted(kinds) and kinds[0] == 0 and kinds[-1] == 2  # eager, then compiled, then graphs
    assert {c for c, p in rest if p.endswith("_graphed")} == {c.name for c in S.GPU_CASES[1:] if c.api == "official"}


def test_triton_attention_providers_run_only_when_named(monkeypatch):
    monkeypatch.delenv("MAE_FAST_BENCH_CASES", raising=False)
    monkeypatch.delenv("MAE_FAST_BENCH_PROVIDERS", raising=False)
    assert not any(S.TRITON_ATTN in p for _, p in S.selected(quick=True))
    monkeypatch.setenv("MAE_FAST_BENCH_PROVIDERS", "mae_fast,mae_fast_triton_attn_graphed")
    plan = [(c.api, p) for c, p in S.selected(quick=True)]
    assert ("official", "mae_fast_triton_attn_graphed") in plan and ("vit-pytorch", "mae_fast") in plan
    assert S.compile_mode("mae_fast_triton_attn_graphed") == "reduce-overhead"


def test_triton_attention_provider_steps_on_the_op(monkeypatch):
    """The provider's step runs the blocks on mae_fast.ops.attention (kernels or, here without the
    interpreter, its fallback forced through the op), the plain provider on SDPA, and both leave the
    session's setting as it was."""
    import importlib

    import mae_fast

    A = importlib.import_module("mae_fast.ops.attention")
    L = importlib.import_module("mae_fast.models.blocks")
    calls = []
    monkeypatch.setattr(L, "_attention_kernels", lambda qkv, heads: True)  # where the kernels would run
    monkeypatch.setattr(L, "fused_attention", lambda qkv, heads: calls.append(heads) or A.attention(qkv, heads))
    case = S.QUICK_CASES[0]
    for provider, expect in (("mae_fast", 0), ("mae_fast_triton_attn", case.depth + case.dec_depth)):
        calls.clear()
        S.make_step(case, provider)[3]()
        assert len(calls) == expect, provider
        assert mae_fast.attention_backend() == "sdpa"


def test_only_the_fused_provider_steps_with_the_fused_add_norm(monkeypatch):
    """Each provider sets the switch for its step, whatever the session's setting, and restores it."""
    import mae_fast
    from test_host_overhead import H, count_launches

    calls = count_launches(monkeypatch, "_no_op_kernels", "add_layer_norm_fwd")
    case = S.QUICK_CASES[0]
    monkeypatch.setattr(sys.modules["mae_fast.models.blocks"], "_fused_add_norm", True)
    for provider in ("mae_fast", "mae_fast_fused"):
        step = S.make_step(case, provider)[3]
        patches = H._fused_path()  # the kernel path, as on CUDA, with no-op kernels
        for p in patches:
            p.start()
        try:
            calls.clear()
            step()
        finally:
            for p in patches:
                p.stop()
        assert (len(calls) > 0) == (provider == "mae_fast_fused"), provider
        assert mae_fast.fused_add_norm()


def test_unknown_provider_or_case_names_the_variable(monkeypatch):
    monkeypatch.setenv("MAE_FAST_BENCH_PROVIDERS", "mae_fast,mae_fast_unfused")
    with pytest.raises(ValueError, match=r"MAE_FAST_BENCH_PROVIDERS: unknown \['mae_fast_unfused'\]"):
        S.selected(quick=True)
    monkeypatch.delenv("MAE_FAST_BENCH_PROVIDERS")
    monkeypatch.setenv("MAE_FAST_BENCH_CASES", "official-vit_b16,vit_b")
    with pytest.raises(ValueError, match=r"MAE_FAST_BENCH_CASES: unknown \['vit_b'\]"):
        S.selected(quick=True)


def test_named_providers_run_in_the_order_named_and_the_cuda_plan_is_known_on_a_cpu(monkeypatch):
    monkeypatch.delenv("MAE_FAST_BENCH_CASES", raising=False)
    monkeypatch.delenv("MAE_FAST_BENCH_PROVIDERS", raising=False)
    plan = S.selected(False, cuda=True, cases="official-vit_b16",
                      providers="mae_fast,hf,mae_fast_compiled,mae_fast_graphed,reference_compiled")
    assert [p for _, p in plan] == ["mae_fast", "hf", "mae_fast_compiled", "mae_fast_graphed", "reference_compiled"]
    assert [(c.name, p) for c, p in S.selected(False, cuda=True, cases="official-vit_l16",
                                               providers="mae_fast_graphed")] == [("official-vit_l16",
                                                                                   "mae_fast_graphed")]
    # CUDA graphs are a CUDA provider: known by name everywhere, run on CUDA only
    assert "mae_fast_graphed" in S.providers_of("official", cuda=True)
    assert "mae_fast_graphed" not in S.providers_of("official", cuda=False)
    assert S.selected(True, cuda=False, providers="mae_fast_graphed") == []
    with pytest.raises(ValueError, match=r"MAE_FAST_BENCH_PROVIDERS: unknown \['mae_fast_graphd'\]"):
        S.selected(False, cuda=True, providers="mae_fast_graphd")


def test_attention_suite_case_selection(monkeypatch):
    from benchmarks import test_bench_attention as A

    assert A.selected_cases("vit_b-encoder,vit_b-decoder", cuda=True) == {
        "vit_b-encoder": (256, 50, 12, 64), "vit_b-decoder": (256, 197, 16, 32)}  # the MAE shapes
    assert A.selected_cases("", cuda=True) == A.GPU_CASES
    assert A.selected_cases("vit_b-encoder", cuda=False) == {}  # a GPU case: none on a CPU
    with pytest.raises(ValueError, match=r"MAE_FAST_BENCH_ATTENTION_CASES: unknown \['vit_h-encoder'\]"):
        A.selected_cases("vit_b-encoder,vit_h-encoder")
    monkeypatch.setenv("MAE_FAST_BENCH_ATTENTION_CASES", "tiny-decoder")
    assert A.selected_cases(cuda=False) == {"tiny-decoder": A.CPU_CASES["tiny-decoder"]}
