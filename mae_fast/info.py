"""`python -m mae_fast.info`: what this installation can run, and why not where it cannot."""
from __future__ import annotations

import os
import platform


KERNEL_MODULES = ("patchify", "masked_mse_loss", "add_layer_norm", "attention")  # mae_fast.kernels.*


def missing_cuda_kernels() -> list[str]:
    """The kernels a CUDA run of this installation lacks, and so runs as PyTorch fallbacks: Triton
    kernel modules that do not import, token ops the extension has no CUDA kernel for. Empty when
    CUDA runs mae_fast's own kernels throughout. Initialises no CUDA."""
    from mae_fast.ops import _common, tokens

    missing = [f"mae_fast.kernels.{name}" for name in KERNEL_MODULES if _common.load_kernels(name) is None]
    return missing + [f"mae_fast::{op} CUDA kernel" for op in tokens.OPS if not _common.has_kernel(op, "cuda")]


def _setting(get, var: str) -> str:
    """A blocks setting and the variable that sets it, or why the variable's value is unusable."""
    try:
        return f"{get()} ({var})"
    except ValueError as e:
        return f"unusable: {e}"


def interpreter_line() -> str:
    """What TRITON_INTERPRET means for CPU tensors, read as Triton and the ops read it."""
    from mae_fast.ops._common import TRITON_ON, interpreter_on

    value = os.environ.get("TRITON_INTERPRET", "")
    if interpreter_on():
        return (f"on (TRITON_INTERPRET={value}): CPU tensors run the Triton kernels, interpreted "
                "(bfloat16 ones the PyTorch fallbacks: the interpreter computes bfloat16 wrongly)")
    if value.lower() in ("", "0", "false", "no", "off", "n"):
        return "off: CPU tensors use PyTorch fallbacks"
    return (f"off: TRITON_INTERPRET={value!r} is not a value Triton reads as on ({', '.join(TRITON_ON)}, "
            "any case); CPU tensors use PyTorch fallbacks")


def collect() -> dict:
    import torch

    from mae_fast.models import blocks
    from mae_fast.ops._common import EXTENSION_AVAILABLE, EXTENSION_UNAVAILABLE_REASON, build_info

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"unavailable ({e}); ops use their PyTorch fallbacks"
    info["Triton interpreter"] = interpreter_line()
    build = build_info()
    if EXTENSION_AVAILABLE:
        backends = ", ".join(build.get("backends", [])) or "unknown"
        archs = build.get("cuda_archs")
        info["extension"] = f"loaded (backends: {backends}" + (f"; CUDA archs {archs})" if archs else ")")
        if build.get("reason"):
            info["extension"] += f"; {build['reason']}"
    else:
        info["extension"] = f"not available: {EXTENSION_UNAVAILABLE_REASON}; ops use PyTorch fallbacks"
    missing = missing_cuda_kernels()
    info["CUDA kernels"] = "all present" if not missing else \
        f"missing {', '.join(missing)}: CUDA runs their PyTorch fallbacks"
    info["blocks"] = (f"attention {_setting(blocks.attention_backend, 'MAE_FAST_ATTENTION')}, fused add + LayerNorm "
                      + _setting(lambda: "on" if blocks.fused_add_norm() else "off", "MAE_FAST_FUSED_ADD_NORM"))
    if torch.cuda.is_available():
        info["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        info["GPU"] = "none" if torch.version.cuda else "none (torch has no CUDA)"
    return info


def main() -> None:
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
