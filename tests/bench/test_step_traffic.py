"""benchmarks/step_traffic.py on the tiny preset: it counts what it says (CPU, no timing)."""
from benchmarks import step_traffic as T


def test_counts_scale_with_batch_and_see_the_fused_op():
    small, big = T.count("tiny", 8, fused=True), T.count("tiny", 64, fused=True)
    assert small["mae_fast.add_layer_norm"][0] == 2 * 4 + 2 * 2 - 1  # 2 per block; the encoder's final norm in,
    # the decoder's first norm has no add before it
    fused_small, fused_big = small["mae_fast.add_layer_norm"][1], big["mae_fast.add_layer_norm"][1]
    assert 7 * fused_small < fused_big < 8 * fused_small  # activations scale 8x, the norms' weights do not
    assert all(big[op][1] >= small[op][1] > 0 for op in small)
    assert small["aten.native_layer_norm"][0] == 3  # the norms with no add before them
    unfused = T.count("tiny", 8, fused=False)
    assert "mae_fast.add_layer_norm" not in unfused and unfused["aten.native_layer_norm"][0] == 14
    assert all(not op.endswith((".view", ".permute", ".transpose")) for op in small)  # views move nothing


def test_triton_attention_counts_the_op_and_drops_the_head_copies():
    sdpa, ours = T.count("tiny", 8, fused=True), T.count("tiny", 8, fused=True, attention="triton")
    blocks = 4 + 2
    assert ours["mae_fast.attention"][0] == ours["mae_fast.attention_backward"][0] == blocks
    assert not any("scaled_dot_product" in op for op in ours) and any("scaled_dot_product" in op for op in sdpa)
    assert ours["aten.copy_"][1] < sdpa["aten.copy_"][1]  # the split's backward copies are gone
    assert sum(b for _, b in ours.values()) < sum(b for _, b in sdpa.values())


def test_cli_prints_the_total(capsys):
    assert T.main(["--preset", "tiny", "--batch", "16", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny, batch 16") and "total:" in out and len(out.splitlines()) == 5
