"""benchmarks/step_traffic.py on the tiny preset: it counts what it says (CPU, no timing)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import step_traffic as T  # noqa: E402


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


def test_cli_prints_the_total(capsys):
    assert T.main(["--preset", "tiny", "--batch", "16", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny, batch 16") and "total:" in out and len(out.splitlines()) == 5
