"""Build mae_fast: a pure-Python package plus one optional compiled extension, mae_fast._C.

The extension holds the C++ CPU kernels (csrc/*.cpp) and, where torch has CUDA and nvcc and
cudart are found, the CUDA kernels (csrc/*.cu) -- with or without a GPU on the build machine.

Environment switches:
  MAE_FAST_BUILD_EXT   auto (default): CUDA if possible, else CPU; a failed build only warns
                       cpu: C++ CPU sources only; cuda: CPU + CUDA, failing loudly if impossible
                       none: no extension (the token ops then run their PyTorch fallbacks)
  TORCH_CUDA_ARCH_LIST CUDA targets, default "8.0;9.0+PTX"
  CUDA_HOME            CUDA toolkit root, default: the one holding nvcc (/usr/local/cuda)

Install with `pip install . --no-build-isolation` so the build sees the torch you run with.
"""
import glob
import json
import os
import shutil
import sysconfig
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("MAE_FAST_BUILD_EXT", "auto").strip().lower()
BUILD_INFO = os.path.join("mae_fast", "_build_info.json")
MODES = ("auto", "cpu", "cuda", "none")
if MODE not in MODES:
    raise SystemExit(f"MAE_FAST_BUILD_EXT must be one of {MODES}, got {MODE!r}")


def write_build_info(info, *dirs):
    for d in dirs:
        path = os.path.join(d, BUILD_INFO)
        if os.path.isdir(os.path.dirname(path)):
            with open(path, "w") as f:
                json.dump(info, f, indent=1)


def find_cuda_home():
    """(cuda_home, None) when a usable toolkit is found, else (None, why not)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        nvcc = "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else shutil.which("nvcc")
        if nvcc is None:
            return None, "nvcc not found (set CUDA_HOME)"
        # /usr/local/bin/nvcc may be a shim: resolve to the real toolkit.
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return None, f"no bin/nvcc under CUDA_HOME={home}"
    if not glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
        return None, f"no libcudart under CUDA_HOME={home}"
    return home, None


def extension_plan():
    """Returns (ext_modules, cmdclass, info); info is what `python -m mae_fast.info` reports."""
    info = {"mode": MODE, "backends": [], "cuda_archs": "", "reason": ""}
    if MODE == "none":
        info["reason"] = "disabled at build time (MAE_FAST_BUILD_EXT=none)"
        return [], {}, info
    try:
        import torch
    except ImportError:
        if MODE != "auto":
            raise
        info["reason"] = "torch was not importable at build time (install with --no-build-isolation)"
        return [], {}, info

    cuda_home, why_not = (None, "torch is a CPU-only build") if torch.version.cuda is None else find_cuda_home()
    use_cuda = MODE == "cuda" or (MODE == "auto" and cuda_home is not None)
    if use_cuda and cuda_home is None:
        raise SystemExit(f"MAE_FAST_BUILD_EXT=cuda but CUDA cannot be built: {why_not}")
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import time
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": ["-O3"]}
    if use_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        # pip's CUDA wheels keep headers (cublas_v2.h, cusparse.h) that torch's headers include.
        include_dirs += glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*", "include"))
        extra["cxx"].append("-DMAE_FAST_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DMAE_FAST_WITH_CUDA", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
        info["backends"] = ["cpu", "cuda"]
        info["cuda_archs"] = os.environ["TORCH_CUDA_ARCH_LIST"]
    else:
        ext_cls = cpp_extension.CppExtension
        info["backends"] = ["cpu"]
        info["reason"] = f"built without CUDA: {why_not}" if MODE == "auto" else "CPU-only build requested"
    info["torch"] = torch.__version__

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """In auto mode a failed compile leaves a working pure-Python install, with the reason."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 -- any compiler/linker failure
                if MODE != "auto":
                    raise
                warnings.warn(f"mae_fast: extension build failed, installing without it: {e}")
                failed = dict(info, backends=[], cuda_archs="", reason=f"extension build failed: {e}")
                write_build_info(failed, ROOT, self.build_lib)

    ext = ext_cls("mae_fast._C", sources, include_dirs=include_dirs, extra_compile_args=extra)
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}, info


ext_modules, cmdclass, build_info = extension_plan()
write_build_info(build_info, ROOT)

setup(
    name="mae_fast",
    version="0.1.0",
    description="Fast Masked Autoencoder pretraining: fused Triton kernels, a CUDA scatter, drop-in models",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["mae_fast", "mae_fast.ops", "mae_fast.models", "mae_fast.io", "mae_fast.train", "mae_fast.testing",
              "mae_fast.kernels"],
    package_dir={"mae_fast": "mae_fast", "mae_fast.kernels": "kernels"},
    package_data={"mae_fast": ["_build_info.json"]},
    install_requires=["torch>=2.5", "torchvision>=0.20", "triton; platform_system == 'Linux'", "einops", "numpy", "tqdm"],
    extras_require={
        "demo": ["scikit-image", "scikit-learn", "matplotlib", "pillow"],  # the CLI's embedded data and pictures
        "hf": ["transformers", "safetensors"],
        "tiff": ["tifffile"],  # pretrain --in-chans on TIFF files (multi-page, multi-channel, 16-bit)
        # mae-fast finetune: timm for the official recipe's RandAugment, random erasing and mixup /
        # cutmix; scikit-learn for the embedded digits, matplotlib for the curves
        "finetune": ["timm", "scikit-learn", "matplotlib"],
        "vit-pytorch": ["vit-pytorch"],  # the parity tests against lucidrains' MAE
    },
    entry_points={"console_scripts": ["mae-fast=mae_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
