"""benchmarks/profile_step.py: the kernel categories, and a one-step smoke run on CPU."""
import pytest

from benchmarks import profile_step


@pytest.mark.parametrize("name, cat", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "layer norm"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("_masked_mse_loss_bwd_kernel", "mae_fast ops"),
    ("void mae_fast::unshuffle_tokens_kernel<float>", "mae_fast ops"),
    ("triton_poi_fused_add_clone_0", "inductor fused"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("aten::addmm", "matmul"),
    ("aten::native_layer_norm_backward", "layer norm"),
])
def test_category(name, cat):
    assert profile_step.category(name) == cat


def test_profile_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "prof.md"
    assert profile_step.main(["--case", "official-micro", "--providers", "mae_fast,reference", "--steps", "1",
                              "--warmup", "1", "--host-steps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "**mae_fast**" in text and "**reference**" in text
    assert "| matmul |" in text  # both models spend time in matmuls
    assert text.count("host: step() returns") == 2
    assert "(linear)" in text or "addmm" in text  # on CPU the host's top own time is the matmuls'
    assert text.strip() in capsys.readouterr().out


def test_unknown_provider_is_refused():
    with pytest.raises(SystemExit):
        profile_step.main(["--case", "official-micro", "--providers", "hf_typo"])


def test_cuda_graph_providers_are_profiled_first_and_need_cuda():
    case, order = profile_step.check_args("official-vit_b16", ["mae_fast", "mae_fast_graphed"], cuda=True)
    assert case.name == "official-vit_b16" and order == ["mae_fast_graphed", "mae_fast"]
    with pytest.raises(ValueError, match=r"\['mae_fast_graphed'\] need CUDA"):
        profile_step.check_args("official-micro", ["mae_fast_graphed"], cuda=False)
    with pytest.raises(ValueError, match="not among"):
        profile_step.check_args("vit_pytorch-micro", ["hf"], cuda=True)
    _, order = profile_step.check_args("official-micro", ["mae_fast_triton_attn_fused"], cuda=False)  # opt-in
    assert order == ["mae_fast_triton_attn_fused"]


def test_dry_run_checks_for_a_cuda_run(capsys, tmp_path):
    out = tmp_path / "prof.md"
    assert profile_step.main(["--case", "official-vit_b16", "--providers", "mae_fast,mae_fast_graphed", "--dry-run",
                              "--out", str(out)]) == 0
    assert "profile official-vit_b16: mae_fast_graphed, mae_fast" in capsys.readouterr().out
    assert not out.exists()


def test_a_step_with_no_kernel_recorded_says_so(monkeypatch):
    monkeypatch.setattr(profile_step.S, "CUDA", True)
    case = profile_step.S.ALL_CASES["official-micro"]
    text = profile_step.render(case, {"mae_fast_graphed": dict(wall=0.05, times={}, launches=0, host=None)})
    assert "no kernel was recorded in the profiled steps (the profiler traced none of the CUDA graph's kernels)" in text
    assert "| category |" not in text
