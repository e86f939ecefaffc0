"""Packaging: lean import, the extension and its report, the installed layout, the kernels' launch plumbing."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import mae_fast
from mae_fast.ops import _common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_does_not_initialise_cuda_or_import_triton():
    out = run_python("import sys, torch, mae_fast; print(torch.cuda.is_initialized(), 'triton' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_import_and_ops_work_without_extension_and_triton():
    code = """
import sys, importlib.abc, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == 'mae_fast._C' or name == 'triton' or name.startswith('triton.'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
import mae_fast
from mae_fast.ops import _common
from mae_fast.testing import reference as ref
assert not _common.EXTENSION_AVAILABLE and _common.EXTENSION_UNAVAILABLE_REASON
imgs = torch.randn(2, 3, 8, 8)
ids = torch.rand(2, 4).argsort(-1)[:, :3]
assert torch.allclose(mae_fast.ops.patchify_gather(imgs, ids, 4), ref.patchify_gather(imgs, ids, 4))
x = torch.randn(2, 4, 5)
assert torch.equal(mae_fast.ops.gather_tokens(x, ids), ref.gather_tokens(x, ids))
print('ok')
"""
    assert run_python(code, TRITON_INTERPRET="0").strip().endswith("ok")


def test_extension_loads_with_the_recorded_backends():
    info = _common.build_info()
    if info.get("backends"):
        assert _common.EXTENSION_AVAILABLE, _common.EXTENSION_UNAVAILABLE_REASON
        assert "cpu" in info["backends"]
    if info.get("mode") == "auto" and torch.version.cuda and shutil.which("nvcc") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        assert info["backends"] == ["cpu", "cuda"], info
        assert "8.0" in info["cuda_archs"] and "9.0" in info["cuda_archs"]


def test_info_reports_versions_and_extension():
    env = {k: v for k, v in os.environ.items() if k not in ("MAE_FAST_ATTENTION", "MAE_FAST_FUSED_ADD_NORM")}
    out = subprocess.run([sys.executable, "-m", "mae_fast.info"], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert torch.__version__ in out
    assert "extension" in out and "Triton interpreter" in out and "GPU" in out
    env.update(MAE_FAST_ATTENTION="triton", MAE_FAST_FUSED_ADD_NORM="1")
    settings = subprocess.run([sys.executable, "-m", "mae_fast.info"], capture_output=True, text=True, check=True,
                              env=env).stdout
    assert "attention sdpa (MAE_FAST_ATTENTION), fused add + LayerNorm off" in out
    assert "attention triton (MAE_FAST_ATTENTION), fused add + LayerNorm on" in settings
    if _common.EXTENSION_AVAILABLE:
        assert "loaded (backends: cpu" in out
    else:
        assert "not available:" in out


def test_wheel_installs_kernels_as_subpackage_only(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.so", "__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], cwd=src, check=True, env={**os.environ, "MAE_FAST_BUILD_EXT": "none"},
                   capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"mae_fast"}, tops
    assert "mae_fast/kernels/__init__.py" in names and "mae_fast/testing/reference.py" in names
    for layer in ("ops", "io", "models", "train"):
        assert f"mae_fast/{layer}/__init__.py" in names, layer
    assert "mae_fast/_build_info.json" in names


def test_version():
    assert mae_fast.__version__.count(".") == 2


def test_every_launcher_runs_on_its_tensors_device():
    """Each public launcher of mae_fast.kernels is wrapped in on_tensor_device: Triton launches on
    the current CUDA device, not the tensors'."""
    pytest.importorskip("triton")
    import importlib
    import inspect
    import pkgutil

    import mae_fast.kernels as K

    launchers = []
    for m in pkgutil.iter_modules(K.__path__):
        mod = importlib.import_module(f"mae_fast.kernels.{m.name}")
        launchers += [(mod.__name__, name, fn) for name, fn in vars(mod).items()
                      if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == mod.__name__]
    assert len(launchers) >= 10
    unwrapped = [f"{mod}.{name}" for mod, name, fn in launchers if getattr(fn, "__wrapped__", None) is None]
    assert not unwrapped, f"launchers without on_tensor_device: {unwrapped}"


@pytest.mark.gpu
def test_gpu_ops_run_on_their_tensors_device():
    """Every kernel path on cuda:1 while cuda:0 is current gives what it gives on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    ids = torch.rand(2, 64).argsort(1)
    qkv, x, d = torch.randn(2, 17, 3 * 64), torch.randn(2, 17, 64), torch.randn(2, 17, 64)
    w, b = torch.randn(64), torch.randn(64)

    def run(dev):
        t = [v.to(dev).requires_grad_(v.is_floating_point()) for v in (imgs, qkv, x, d)]
        out = [mae_fast.ops.patchify_gather(t[0], ids[:, :16].to(dev), 4, norm_pix=True),
               mae_fast.ops.masked_mse_loss(torch.randn(2, 48, 48, device=dev), t[0], 4, ids=ids[:, 16:].to(dev)),
               mae_fast.ops.attention(t[1], 4), *mae_fast.ops.add_layer_norm(t[2], t[3], w.to(dev), b.to(dev), 1e-6)]
        sum(o.float().sum() for o in out).backward()
        torch.cuda.synchronize(dev)
        return [o.detach().cpu() for o in out] + [v.grad.cpu() for v in t]

    torch.cuda.set_device(0)
    for a, b_ in zip(run("cuda:0"), run("cuda:1")):
        torch.testing.assert_close(a, b_)


def test_kernels_copy_layouts_whose_in_sample_offsets_pass_int32():
    """The launchers pass within_int32(t): a batch-innermost layout whose in-sample offsets pass
    2**31 becomes contiguous (checked on meta tensors: shapes and strides, no memory)."""
    pytest.importorskip("triton")
    from mae_fast.kernels import fits_int32, within_int32

    seq_first = torch.empty(197, 4096, 3072, device="meta").transpose(0, 1)  # row stride 4096 * 3072
    assert not fits_int32(seq_first) and within_int32(seq_first).is_contiguous()
    small = torch.empty(197, 8, 3072, device="meta").transpose(0, 1)
    assert fits_int32(small) and within_int32(small) is small
    huge_batch = torch.empty(70_000, 197, 3072, device="meta")  # only the batch offset passes 2**31: fine
    assert fits_int32(huge_batch)


def test_old_module_paths_still_import():
    """The paths users may have imported before the package was split into layers."""
    from mae_fast.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
    from mae_fast.models_mae import MaskedAutoencoderViT, mae_vit_base_patch16_dec512d8b
    from mae_fast.pretrain import main

    assert MaskedAutoencoderViT is mae_fast.MaskedAutoencoderViT and load_checkpoint is mae_fast.load_checkpoint
    assert save_checkpoint is mae_fast.save_checkpoint and callable(read_checkpoint) and callable(main)
    assert issubclass(CheckpointError, RuntimeError) and mae_vit_base_patch16_dec512d8b is mae_fast.mae_vit_base_patch16

