"""Shared by the Triton op tests: the odd shapes of docs/design.md, input layouts, the dispatch paths,
and the NaN allocators that poison every buffer the kernels allocate, so that an element left
unwritten fails (the fixtures are in tests/ops/conftest.py)."""
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# B, C, H, W, patch_size: batch 1, C in {1, 3, 4, 13}, H != W, patch 2..16, rectangular patch,
# L not a power of two.
SHAPES = [
    (1, 3, 8, 12, 4),
    (2, 1, 6, 10, 2),
    (2, 4, 12, 8, (4, 2)),
    (1, 13, 10, 6, 2),
    (2, 3, 32, 48, 16),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _nan_empty(*args, **kwargs):
    t = torch.empty(*args, **kwargs)
    return t.fill_(math.nan) if t.is_floating_point() else t.fill_(-12345)


def _nan_empty_like(t, **kwargs):
    out = torch.empty_like(t, **kwargs)
    return out.fill_(math.nan) if out.is_floating_point() else out.fill_(-12345)


def take_path(name, monkeypatch):
    """Sets up dispatch path `name` ('triton' or 'torch') for one test; returns it."""
    if name == "triton":
        if not INTERPRET:
            pytest.skip("the interpreted-Triton path needs TRITON_INTERPRET=1")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return name


def runs_kernels(path, t, *also) -> bool:
    """Whether an op on CPU tensor t (with `also`: its other tensors and result dtypes) runs the
    interpreted kernels on `path`: on 'triton', unless the interpreter would compute a dtype wrongly
    (bfloat16), which takes the fallback. Such cases check the fallback on CPU; the GPU tests check
    the kernels in bfloat16."""
    from mae_fast.ops._common import interpreted_wrongly

    return path == "triton" and not interpreted_wrongly(t, *also)


def runs_without_sync(fn, n=3):
    """n results of fn() on CUDA, the last under torch's sync debug mode "error" (a host sync
    there raises); the first calls compile the kernels."""
    outs = [fn() for _ in range(n - 1)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs.append(fn())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return outs


def pair(p):
    return tuple(p) if isinstance(p, tuple) else (p, p)


def make_imgs(B, C, H, W, layout="contiguous", dtype=torch.float32, device="cpu"):
    if layout == "contiguous":
        return torch.randn(B, C, H, W, dtype=dtype, device=device)
    if layout == "channels_last":
        return torch.randn(B, C, H, W, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    if layout == "strided":  # a view that is neither contiguous nor dense
        big = torch.randn(B, C + 1, H + 2, 2 * W, dtype=dtype, device=device)
        x = big[:, 1:, 1:H + 1, ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x
    raise ValueError(layout)


class OpLog(TorchDispatchMode):
    """Records every op dispatched while active (ops: the OpOverloads, in order)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))
