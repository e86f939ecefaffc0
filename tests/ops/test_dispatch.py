"""How the Triton ops choose kernels or fallbacks on CPU (mae_fast/ops/_common.py): TRITON_INTERPRET
read as Triton reads it, and bfloat16 kept away from the interpreter, which computes it wrongly."""
import importlib
import os

import pytest
import torch
from _triton_ops import INTERPRET

import mae_fast
from mae_fast import info
from mae_fast.testing import reference as R

C = importlib.import_module("mae_fast.ops._common")

ON = ["1", "true", "True", "YES", "on", "y"]
OFF = ["0", "false", "no", "off", "", "2", "t", " 1", "enabled"]


@pytest.mark.parametrize("value", ON + OFF)
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value):
    """Triton decorates the kernels interpreted for TRITON_INTERPRET=true as for 1: the ops, `python
    -m mae_fast.info` and Triton agree on every value (info names the values that turn it on)."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    on = value in ON
    assert C.interpreter_on() == on
    line = info.collect()["Triton interpreter"]
    assert line.startswith("on" if on else "off"), line
    if not on and value.lower() not in ("", "0", "false", "no", "off"):
        assert "not a value Triton reads as on (1, true, yes, on, y, any case)" in line
    try:
        from triton._C.libtriton import getenv_bool
    except ImportError:
        getenv_bool = None
    if getenv_bool is not None:
        assert getenv_bool("TRITON_INTERPRET", False) == on
    if INTERPRET:  # the kernels were decorated interpreted: the ops run them exactly when it is on
        assert (C.triton_kernels("patchify", torch.empty(1)) is not None) == on


# ----------------------------------------------------------------------------- bfloat16 on CPU

@pytest.fixture
def no_kernel_runs(monkeypatch):
    """Every launcher of the Triton kernel modules raises: a call that reaches one fails."""
    for name in ("patchify", "masked_mse_loss", "add_layer_norm", "attention"):
        mod = C.load_kernels(name)
        if mod is None:
            continue
        for attr in list(vars(mod)):
            if attr.endswith(("_fwd", "_bwd")):
                monkeypatch.setattr(mod, attr, _refuse(f"{name}.{attr}"))


def _refuse(launcher):
    def run(*args, **kwargs):
        raise AssertionError(f"the interpreter ran {launcher} on bfloat16")
    return run


def _layer_norm_of_bf16_residual(x, delta, w, b):
    """add_layer_norm's definition: LayerNorm of the residual as stored in bf16; the gradient passes
    straight through that rounding (a no-op in bf16 itself)."""
    r = x + delta
    stored = r + (r.bfloat16().to(r.dtype) - r).detach()
    return r, R.add_layer_norm(stored, torch.zeros_like(r), w, b, 1e-5)[1]


IDS = torch.tensor([[0, 4, 2], [3, 1, 5]])
MASK = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]])

# op: (input shapes, ours, reference), each returning a tuple of outputs
OPS = {
    "patchify_gather": ([(2, 3, 8, 12)],
                        lambda x: (mae_fast.ops.patchify_gather(x, IDS, 4, norm_pix=True),),
                        lambda x: (R.patchify_gather(x, IDS, 4, norm_pix_target=True),)),
    "masked_mse_loss": ([(2, 6, 48), (2, 3, 8, 12)],
                        lambda p, x: (mae_fast.ops.masked_mse_loss(p, x, 4, mask=MASK.to(p.dtype), norm_pix=True),),
                        lambda p, x: (R.masked_mse_loss(p, x, 4, mask=MASK.to(p.dtype), norm_pix_target=True),)),
    "add_layer_norm": ([(2, 5, 96), (2, 5, 96), (96,), (96,)],
                       lambda x, d, w, b: mae_fast.ops.add_layer_norm(x, d, w, b),
                       lambda x, d, w, b: _layer_norm_of_bf16_residual(x, d, w, b)),
    "attention": ([(2, 37, 3 * 2 * 16)],
                  lambda qkv: (mae_fast.ops.attention(qkv, 2),),
                  lambda qkv: (R.attention(*qkv.view(2, 37, 3, 2, 16).permute(2, 0, 3, 1, 4))
                               .transpose(1, 2).reshape(2, 37, 32),)),
}


def _run(fn, inputs, dtype, grads):
    """Outputs and input gradients of fn on leaf copies of inputs in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    outs = fn(*leaves)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [o.detach() for o in outs] + [t.grad for t in leaves]


@pytest.mark.parametrize("op", list(OPS))
def test_bf16_on_cpu_takes_the_fallback_and_is_right(path, no_kernel_runs, op):
    """The interpreter computes bf16 wrongly (its bf16 tl.dot puts attention outputs near 8e8 for a
    true 2; it rounds fp32 -> bf16 by truncation): on either CPU path bf16 runs no kernel, and every
    output and gradient keeps the 2x rule against float64, |out - ref64| <= 2 |eager bf16 - ref64|
    plus one bf16 ulp of ref64 (a rounding flip between two fp32 computations) and atol."""
    shapes, ours, ref = OPS[op]
    inputs = [torch.randn(s).bfloat16() for s in shapes]  # what float64 sees is what bf16 sees
    grads = [torch.randn_like(o) for o in ours(*inputs)]
    got = _run(ours, inputs, torch.bfloat16, grads)
    low = _run(ref, inputs, torch.bfloat16, grads)
    want = _run(ref, inputs, torch.float64, grads)
    for i, (a, lo, w) in enumerate(zip(got, low, want)):
        assert a.dtype == lo.dtype and torch.isfinite(a).all(), i
        err, bound = (a.double() - w).abs(), 2 * (lo.double() - w).abs() + 2.0 ** -7 * w.abs() + 1e-3
        assert (err <= bound).all(), f"result {i}: max excess {(err - bound).max().item()}"


def test_bf16_dispatch_looks_at_every_dtype():
    """A CPU call takes the fallback where any tensor or result dtype it names is bf16 (autocast's
    fp32 residual with a bf16 branch output and normed result), only while the interpreter is on."""
    x = torch.randn(2, 8)
    if INTERPRET:
        assert C.triton_kernels("add_layer_norm", x) is not None
    assert C.triton_kernels("add_layer_norm", x, x.bfloat16()) is None
    assert C.triton_kernels("masked_mse_loss", x, None, torch.bfloat16) is None
    assert C.interpreted_wrongly(x, torch.float16, None) is False
    assert C.interpreted_wrongly(x, torch.bfloat16) is (os.environ.get("TRITON_INTERPRET") == "1")
