"""Bytes in and out of every op of one training step, counted on CPU and scaled to a GPU batch:
a GPU-free measure of memory traffic for changes that move data (it counts bytes; it times nothing).

Every op that makes or writes a tensor counts its tensor inputs and outputs (views and allocations
count nothing, copy_/fill_ do not read their destination; a mae_fast op counts as one op, its
fallback's internals not at all -- what its kernel reads and writes). The step runs under bf16
autocast at two batch sizes; per op, the difference gives the bytes per image, scaled to --batch,
plus a batch-independent part (weights, optimizer).
--fused counts the residual add + LayerNorm as the fused op, as it runs on CUDA with
set_fused_add_norm(True); --attention triton the blocks' attention as mae_fast.ops.attention
(set_attention_backend("triton") on CUDA).

    python -m benchmarks.step_traffic --preset base --batch 256 --fused [--attention triton]
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mae_fast.models import blocks  # noqa: E402
from mae_fast.models.presets import PRESETS, build_model  # noqa: E402

VIEWS = {"view", "_unsafe_view", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "select", "slice",
         "detach", "alias", "as_strided", "unbind", "split", "split_with_sizes", "chunk"}
ALLOCS = {"empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided"}  # touch no memory
OVERWRITES = {"copy_", "fill_", "zero_"}


def _bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class OpBytes(TorchDispatchMode):
    """{op name: [calls, bytes in + out]} of the ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = collections.defaultdict(lambda: [0, 0])
        self._inside = 0  # > 0 inside a mae_fast op: its fallback's ops are not counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside:
            return func(*args, **kwargs)
        ours = func.namespace == "mae_fast"
        self._inside += ours
        try:
            out = func(*args, **kwargs)
        finally:
            self._inside -= ours
        name = func.overloadpacket.__name__
        if name in VIEWS or name in ALLOCS:
            return out
        reads = (args[1:], kwargs) if name in OVERWRITES else (args, kwargs)  # their destination is not read
        moved = _bytes(reads) + _bytes(out)
        if moved:
            row = self.ops[f"{func.namespace}.{name}"]
            row[0] += 1
            row[1] += moved
        return out


def count(preset: str, batch: int, fused: bool, attention: str = "sdpa") -> dict:
    """{op: (calls, bytes at `batch`)} of one training step, from steps at batch 2 and 4."""
    torch.manual_seed(0)
    model = build_model(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    size = PRESETS[preset][0]

    def step(b):
        imgs = torch.randn(b, 3, size, size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(imgs, mask_ratio=0.75, return_pred=False)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fuses(x, norm):  # as blocks._fuses on CUDA with set_fused_add_norm(True) (fused), or not
        return fused and type(norm) is torch.nn.LayerNorm and not torch.compiler.is_compiling()

    counted = {}
    # the fused op's fallback: it runs as the custom op, one op to the mode (where the interpreter
    # would run the kernels, an eager call would go around the dispatcher, and its internals be seen)
    aln = sys.modules["mae_fast.ops.add_layer_norm"]
    attn = sys.modules["mae_fast.ops.attention"]
    before = blocks.attention_backend()
    blocks.set_attention_backend(attention)
    # the blocks take the attention op as where its kernels run; it runs its fallback as one op
    with mock.patch.object(blocks, "_fuses", fuses), mock.patch.object(aln, "_kernels", lambda t, res_dtype, *also: None), \
            mock.patch.object(blocks, "_attention_kernels", lambda qkv, heads: attention == "triton"), \
            mock.patch.object(attn, "kernels_for", lambda qkv, heads: None):
        try:
            for b in (2, 4):
                step(b)  # optimizer state exists before the counted step
                with OpBytes() as mode:
                    step(b)
                counted[b] = mode.ops
        finally:
            blocks.set_attention_backend(before)
    out = {}
    for op in set(counted[2]) | set(counted[4]):
        (_, b2), (n4, b4) = counted[2].get(op, (0, 0)), counted[4].get(op, (0, 0))
        per_image = (b4 - b2) / 2
        out[op] = (n4, (b2 - 2 * per_image) + per_image * batch)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--fused", action="store_true",
                    help="count the fused add + LayerNorm op, as on CUDA with set_fused_add_norm(True)")
    ap.add_argument("--attention", default="sdpa", choices=list(blocks.ATTENTION_BACKENDS),
                    help="the blocks' attention: SDPA, or mae_fast.ops.attention as one op")
    ap.add_argument("--gbps", type=float, default=4244.0, help="bandwidth for the ms column (H200 copy, measured)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    ops = count(args.preset, args.batch, args.fused, args.attention)
    total = sum(b for _, b in ops.values())
    print(f"{args.preset}, batch {args.batch}, bf16 autocast, {'fused' if args.fused else 'unfused'} add + norm, "
          f"{args.attention} attention")
    for op, (n, b) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{op:60s} {n:5d} calls {b / 1e9:8.2f} GB {b / args.gbps / 1e6:7.2f} ms")
    print(f"total: {total / 1e9:.1f} GB per step ({total / args.gbps / 1e6:.1f} ms at {args.gbps:g} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
