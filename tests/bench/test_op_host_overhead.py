"""benchmarks/op_host_overhead.py and what it holds the fused ops to: on the path they take on CUDA
(here: CPU tensors, kernels not launched), a forward + backward reads no tensor value on the host
(no .item(), bool(tensor), .tolist(): each a synchronisation on a GPU), skips torch.library's
dispatch, and makes a fixed number of kernel launches and torch ops."""
import contextlib
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import op_host_overhead as H  # noqa: E402

# Per fused forward + backward: (Triton launches, torch ops dispatched at most). A new op on the hot
# path must raise its bound here, for a reason.
BUDGET = {
    "patchify": (2, 2),
    "unpatchify": (2, 2),
    "patchify_gather": (2, 9),
    "masked_mse_loss (mask)": (3, 7),
    "masked_mse_loss (ids)": (3, 5),
    "gather_tokens": (0, 4),  # with the one copy of the sliced ids (the kernels read them contiguous)
    "unshuffle_tokens": (0, 6),
    "add_layer_norm": (2, 13),
    "attention": (2, 5),
}
HOST_READS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"]


@pytest.fixture(scope="module")
def calls():
    return H.calls()


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"Tensor.{name} read a tensor value on the host")
    return refuse


def run_without_host_reads(fn):
    """fn() with every Tensor method that reads values on the host raising."""
    with contextlib.ExitStack() as stack:
        for name in HOST_READS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, _refuse(name)))
        return fn()


def test_every_public_op_has_a_case():
    names = {"patchify", "unpatchify", "patchify_gather", "masked_mse_loss", "gather_tokens", "unshuffle_tokens",
             "add_layer_norm", "attention"}
    import mae_fast

    assert set(mae_fast.ops.__all__) == names
    assert {op.split(" ")[0] for op in H.cases()} == names
    assert set(BUDGET) == set(H.cases())


@pytest.mark.parametrize("op", list(BUDGET))
def test_fused_call_reads_no_tensor_value(calls, op):
    with H.kernel_path():
        grads = run_without_host_reads(calls[(op, "fused")])
    assert all(isinstance(g, torch.Tensor) for g in grads)


def test_the_host_read_guard_catches_a_value_check(calls):
    """The guard is live: with the value checks of CPU calls on, patchify_gather's ids check reads."""
    with H.kernel_path(), mock.patch.object(H._common, "VALUE_CHECKED_DEVICES", frozenset({"cpu"})):
        with pytest.raises(AssertionError, match="read a tensor value"):
            run_without_host_reads(calls[("patchify_gather", "fused")])


@pytest.mark.parametrize("op", list(BUDGET))
def test_fused_call_stays_within_its_launches_and_torch_ops(calls, op):
    launches, n_ops = H.counts(calls[(op, "fused")])
    max_launches, max_ops = BUDGET[op]
    assert launches == max_launches
    assert n_ops <= max_ops, f"{op}: {n_ops} torch ops per forward + backward, budget {max_ops}"


@pytest.mark.parametrize("op", list(BUDGET))
def test_fused_call_skips_torch_library_dispatch(calls, op):
    """Only the token ops' own kernels are dispatched as mae_fast ops (below their autograd), never the
    Triton ops' custom ops."""
    seen = []

    class Log(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with H.kernel_path(), Log():
        calls[(op, "fused")]()
    ours = [name for name in seen if name.startswith("mae_fast.")]
    assert all(name.startswith("mae_fast.tokens_") for name in ours), ours


def test_cli_prints_every_op(capsys):
    assert H.main(["--rounds", "1", "--inner", "1"]) == 0
    out = capsys.readouterr().out
    assert all(op in out for op in BUDGET)
    assert "fused/eager" in out
