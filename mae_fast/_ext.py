"""Loads the compiled extension mae_fast._C when it exists; never raises.

Importing it registers the C++/CUDA kernels with the dispatcher. Loading the shared library does
not initialise CUDA. When it is missing or fails to load, every op runs its PyTorch fallback and
`python -m mae_fast.info` tells why.
"""
from __future__ import annotations

import importlib
import json
import os

_BUILD_INFO = os.path.join(os.path.dirname(__file__), "_build_info.json")


def build_info() -> dict:
    """What setup.py recorded: mode, backends, cuda_archs, torch, reason."""
    try:
        with open(_BUILD_INFO) as f:
            return json.load(f)
    except OSError:
        return {"mode": "unknown", "backends": [], "cuda_archs": "",
                "reason": "no build record (package not installed through setup.py)"}


def _load():
    try:
        import torch  # noqa: F401 -- loads libc10/libtorch, which mae_fast._C links against

        importlib.import_module("mae_fast._C")
        return True, ""
    except ImportError as e:
        info = build_info()
        reason = info.get("reason") or "extension not built"
        if info.get("backends"):  # it was built but cannot be loaded here
            reason = f"built for torch {info.get('torch')} but failed to load: {e}"
        return False, reason


AVAILABLE, UNAVAILABLE_REASON = _load()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the extension registered a kernel for mae_fast::<op> on 'cpu' or 'cuda'."""
    if not AVAILABLE:
        return False
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mae_fast::{op}", key)
