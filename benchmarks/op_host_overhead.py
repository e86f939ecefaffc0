"""Host time per call of each fused op's forward + backward against the eager torch ops it replaces,
measured on CPU at tiny shapes where the arithmetic is negligible: what an eager GPU step waits on
when its host runs behind (Python, argument checks, allocations, dispatch and autograd layers).

Each op takes its kernel path as on CUDA (`kernel_path()`): the Triton launchers run as they would
(strides, block sizes, allocations of every output and buffer) but their `@triton.jit` kernels
launch nothing, and the index and mask value checks that run on every CPU call (on CUDA only with
validate=True) are off. The token ops run their C++ CPU kernels, whose arithmetic at these shapes
is a few hundred element copies. The eager rows are the ops of the code each fused op replaces
(mae_fast.testing.reference, the official decoder input, SDPA on head views). Providers run
round-robin, `inner` calls each per round, so the load of a shared machine hits them alike; the
medians are reported, with the kernel launches and torch ops each fused call makes.

    python -m benchmarks.op_host_overhead [--rounds 200] [--inner 20]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mae_fast  # noqa: E402
from mae_fast.models.blocks import attend_sdpa  # noqa: E402
from mae_fast.ops import _common  # noqa: E402
from mae_fast.testing import reference as R  # noqa: E402

# The Triton ops: mae_fast.kernels.<name> and mae_fast.ops.<name>. Triton's own launch (argument
# binding, cache lookup, driver call) is not timed: the kernels are stand-ins that count launches.
TRITON_OPS = ("patchify", "masked_mse_loss", "add_layer_norm", "attention")


class NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **meta) counts a launch, runs nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **meta):
        self.launches += 1


@contextlib.contextmanager
def kernel_path():
    """Inside: the ops take their Triton path on CPU tensors (not float64) with kernels that launch
    nothing, and no CPU-only value checks. Yields {kernel name: NoLaunch}."""
    mods = {name: _common.load_kernels(name) for name in TRITON_OPS}
    if any(m is None for m in mods.values()):
        raise RuntimeError("the kernel path needs Triton (mae_fast.kernels)")
    kernels = {}
    with contextlib.ExitStack() as stack:
        for mod in mods.values():
            for attr in [a for a in vars(mod) if a.endswith("_kernel")]:
                kernels[attr] = NoLaunch()
                stack.enter_context(mock.patch.object(mod, attr, kernels[attr]))

        def triton_kernels(name, t, *also):
            return None if t.dtype == torch.float64 else mods[name]
        for name in TRITON_OPS:
            stack.enter_context(mock.patch.object(sys.modules[f"mae_fast.ops.{name}"], "triton_kernels",
                                                  triton_kernels))
        stack.enter_context(mock.patch.object(_common, "VALUE_CHECKED_DEVICES", frozenset()))
        yield kernels


# ----------------------------------------------------------------------------- the cases

# Tiny shapes: 2 images of 3 x 16 x 16 in patches of 4 (L = 16, P = 48), K = 4 kept, M = 12 removed;
# tokens of width 32; attention on 5 tokens of 2 heads of 16.
B, C, H, W, PATCH = 2, 3, 16, 16, 4
L, P, K, D = (H // PATCH) * (W // PATCH), PATCH * PATCH * C, 4, 32


def cases() -> dict:
    """{op: (leaves, fused fn, eager fn)}: fn(*leaves) -> output(s) whose backward is timed."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)
    ids_keep, mask, ids_restore = R.random_masking(B, L, 1 - K / L, noise=torch.rand(B, L, generator=g))
    removed = torch.argsort(torch.rand(B, L, generator=g), dim=1)[:, :L - K]
    imgs = randn(B, C, H, W)
    pos = R.pos_embed_2d(D, (H // PATCH, W // PATCH), cls_token=True)[None]

    def unshuffle_eager(x, m):  # the official decoder input
        mask_tokens = m.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        return torch.cat([x[:, :1, :], x_], dim=1) + pos

    ops = mae_fast.ops
    return {
        "patchify": ([imgs], lambda x: ops.patchify(x, PATCH), lambda x: R.patchify(x, PATCH)),
        "unpatchify": ([randn(B, L, P)], lambda x: ops.unpatchify(x, PATCH, H),
                       lambda x: R.unpatchify(x, PATCH, H)),
        "patchify_gather": ([imgs], lambda x: ops.patchify_gather(x, ids_keep, PATCH, norm_pix=True),
                            lambda x: R.patchify_gather(x, ids_keep, PATCH, norm_pix_target=True)),
        "masked_mse_loss (mask)": (
            [randn(B, L, P)], lambda p: ops.masked_mse_loss(p, imgs, PATCH, mask=mask, norm_pix=True),
            lambda p: R.masked_mse_loss(p, imgs, PATCH, mask=mask, norm_pix_target=True)),
        "masked_mse_loss (ids)": (
            [randn(B, L - K, P)], lambda p: ops.masked_mse_loss(p, imgs, PATCH, ids=removed),
            lambda p: R.masked_mse_loss(p, imgs, PATCH, ids=removed)),
        "gather_tokens": ([randn(B, L, D)], lambda x: ops.gather_tokens(x, ids_keep),
                          lambda x: R.gather_tokens(x, ids_keep)),
        "unshuffle_tokens": ([randn(B, 1 + K, D), 0.02 * randn(1, 1, D)],
                             lambda x, m: ops.unshuffle_tokens(x, ids_keep, L, m, pos, num_prefix=1),
                             unshuffle_eager),
        "add_layer_norm": ([randn(2, 5, D), randn(2, 5, D), randn(D), randn(D)],
                           lambda x, d, w, b: ops.add_layer_norm(x, d, w, b, 1e-6),
                           lambda x, d, w, b: R.add_layer_norm(x, d, w, b, 1e-6)),
        "attention": ([randn(2, 5, 3 * 2 * 16)], lambda qkv: ops.attention(qkv, 2),
                      lambda qkv: attend_sdpa(qkv, 2)),
    }


def fwd_bwd(fn, leaves):
    """A no-argument callable: one forward of fn on leaves and the backward to all of them."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(fn(*leaves), leaves, grads)


def calls(names=None) -> dict:
    """{(op, provider): fwd + bwd callable}; provider "fused" must run inside kernel_path()."""
    out = {}
    for op, (leaves, fused, eager) in cases().items():
        if names is None or op in names:
            with kernel_path():
                out[(op, "fused")] = fwd_bwd(fused, leaves)
            out[(op, "eager")] = fwd_bwd(eager, leaves)
    return out


class OpCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops dispatched while active (a custom op counts once: what runs inside its
    implementation is below the mode)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def counts(fn) -> tuple[int, int]:
    """(kernel launches, torch ops dispatched) of one fused call fn(), run inside kernel_path()."""
    with kernel_path() as kernels:
        fn()
        before = sum(k.launches for k in kernels.values())
        with OpCount() as mode:
            fn()
        return sum(k.launches for k in kernels.values()) - before, mode.n


def measure(rounds: int, inner: int = 20, warmup: int = 3, names=None, timer=time.thread_time) -> dict:
    """{(op, provider): median host seconds per fwd + bwd call}, providers interleaved. The default
    timer is the thread's CPU time, which a shared machine's other load leaves out."""
    fns = calls(names)
    times = {key: [] for key in fns}
    with kernel_path():  # the eager rows are unaffected by it
        for r in range(warmup + rounds):
            for key, fn in fns.items():
                t = timer()
                for _ in range(inner):
                    fn()
                if r >= warmup:
                    times[key].append((timer() - t) / inner)
    return {key: statistics.median(ts) for key, ts in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--ops", nargs="*", help="only these ops (names as in the table)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(args.rounds, args.inner, names=args.ops)
    fns = calls(args.ops)
    print(f"host time (thread CPU time) per forward + backward call on CPU, kernels not launched, 1 thread, "
          f"torch {torch.__version__}, medians of {args.rounds} interleaved rounds of {args.inner} calls")
    print(f"{'op':24s} {'fused us':>9s} {'eager us':>9s} {'fused/eager':>12s} {'launches':>9s} {'torch ops':>10s}")
    for op in dict.fromkeys(op for op, _ in res):
        fused, eager = res[(op, "fused")], res[(op, "eager")]
        launches, n_ops = counts(fns[(op, "fused")])
        print(f"{op:24s} {fused * 1e6:9.1f} {eager * 1e6:9.1f} {fused / eager:11.2f}x {launches:9d} {n_ops:10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
