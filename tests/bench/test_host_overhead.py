"""benchmarks/host_overhead.py on a tiny model: each row takes the path it names (CPU, no timing
claims)."""
from benchmarks import host_overhead as H
from benchmarks import steps as S

TINY = S.official_case("tiny-host", 2, 32, 8, 32, 2, 2, 32, 1, 2)


def count_launches(monkeypatch, factory: str, launcher: str) -> list:
    """The calls of `launcher` of the no-op kernels host_overhead's `factory` makes, from now on."""
    calls = []
    real = getattr(H, factory)

    def counting():
        k = real()
        fn = getattr(k, launcher)
        setattr(k, launcher, lambda *a: calls.append(1) or fn(*a))
        return k

    monkeypatch.setattr(H, factory, counting)
    return calls


def test_rows_take_the_paths_they_name(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the plain row runs plain ops, not interpreted kernels
    calls = count_launches(monkeypatch, "_no_op_kernels", "add_layer_norm_fwd")
    attn_calls = count_launches(monkeypatch, "_no_op_attention", "attention_fwd")
    per_step = 2 * 2 + 2 * 1 - 1  # 2 per block (depth 2 + 1), the encoder's final norm in; the decoder's first has no add
    res = H.measure(rounds=1, case=TINY, warmup=0)
    assert {"reference", "mae_fast (plain ops)", "mae_fast (fused)", "mae_fast (fused, torch.library)",
            "mae_fast (fused, own attention)", "mae_fast (plain ops, own attention)"} <= set(res)
    assert all(t > 0 for t in res.values())
    assert len(calls) == 3 * per_step  # the three fused rows, one step each; the plain row none
    assert len(attn_calls) == 2 * (2 + 1)  # the two own-attention rows: one per block
