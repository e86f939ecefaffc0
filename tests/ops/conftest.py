"""Fixtures of the op tests."""
import pytest
from _triton_ops import _nan_empty, _nan_empty_like, take_path


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Both CPU dispatch paths of an op: 'triton' (its kernels under the interpreter; skipped
    without TRITON_INTERPRET=1) and 'torch' (the PyTorch fallback: the ops read the variable at
    call time). A module may define its own (tests/ops/test_attention.py)."""
    return take_path(request.param, monkeypatch)


@pytest.fixture
def poison(monkeypatch):
    """Every output the patchify and loss launchers allocate starts as NaN (modules use it with
    pytestmark = pytest.mark.usefixtures("poison")), so an element a kernel leaves unwritten fails."""
    pytest.importorskip("triton")
    from mae_fast.kernels import masked_mse_loss as kl
    from mae_fast.kernels import patchify as kp

    monkeypatch.setattr(kl, "empty", _nan_empty)
    monkeypatch.setattr(kp, "empty", _nan_empty)
    monkeypatch.setattr(kp, "empty_like", _nan_empty_like)
