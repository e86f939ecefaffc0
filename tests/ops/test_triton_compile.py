"""Every Triton kernel, compiled for the GPUs we target (sm_90: H100/H200, sm_80: A100) on this
GPU-less machine, as the ops launch it.

The interpreter proves what the kernels compute, but it runs Python, not the compiler: a type or
constexpr error, a layout the backend rejects, or a block size that spills registers would first
show on a GPU. Here the public ops run on CPU with every kernel launch recorded instead of
executed (the recorded arguments are the real ones: dtypes, int widths, constexprs, num_warps);
each distinct launch is then compiled ahead of time to a cubin through Triton's own pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas), and ptxas's resource report is checked for spills.

It runs in a subprocess with TRITON_INTERPRET=0: once the interpreter has run in a process, Triton's
builtins no longer compile there.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_fast import ops

ARCHS = (90, 80)
TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
              torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
              torch.bool: "i1"}


class Launch:
    """One recorded kernel launch, reduced to what its compilation depends on."""

    def __init__(self, fn, args, kwargs):
        self.fn, self.name = fn, fn.__name__
        params = list(inspect.signature(fn.fn).parameters)
        bound = dict(zip(params, args))
        self.options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update(kwargs)
        self.signature, self.constexprs = {}, {}
        for i, (p, param) in enumerate(zip(params, fn.params)):
            v = bound[p]
            if param.is_constexpr or v is None:
                self.signature[p] = "constexpr"
                self.constexprs[(i,)] = v
            elif isinstance(v, torch.Tensor):
                self.signature[p] = "*" + TYPE_NAMES[v.dtype]
            elif isinstance(v, bool):
                self.signature[p] = "i1"
            elif isinstance(v, int):
                self.signature[p] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                self.signature[p] = "fp32"
            else:
                raise TypeError(f"{self.name}: argument {p} of unexpected type {type(v).__name__}")

    def key(self):
        return (self.name, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        ptrs = ",".join(t[1:] for t in self.signature.values() if t.startswith("*"))
        params = list(self.signature)
        consts = " ".join(f"{params[i[0]]}={v}" for i, v in self.constexprs.items() if v is not None)
        return f"{self.name}[{ptrs}] {consts} warps={self.options.get('num_warps', 4)}"

    def compile(self, arch: int):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        src = ASTSource(fn=self.fn, signature=self.signature, constexprs=self.constexprs)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(self.options))


class Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(Launch(self.fn, args, dict(kwargs)))


# (B, C, H, W, patch, kept, removed): the model configs, then the odd shapes of docs/design.md
CONFIGS = [
    (2, 3, 224, 224, 16, 49, 147),  # ViT-B/16, ViT-L/16: also compiled for sm_80
    (2, 3, 224, 224, 14, 64, 192),  # ViT-H/14
    (2, 3, 32, 32, 4, 16, 48),      # the tiny preset
    (1, 13, 10, 6, 2, 3, 12),
    (2, 4, 12, 8, (4, 2), 5, 7),
]
# (images, activations): fp32, bf16 autocast (fp32 images, bf16 pred), pure bf16, pure fp16
MIXES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float16)]
SPILL_LIMIT_BYTES = 32  # ptxas parks a value or two on the stack at no cost; an oversized block spills KBs


def _workload(configs):
    """The ops as the models call them, forward and backward; the odd shapes in two dtype mixes."""
    for B, C, H, W, p, K, M in configs:
        ph, pw = p if isinstance(p, tuple) else (p, p)
        L, P = (H // ph) * (W // pw), ph * pw * C
        ids = torch.rand(B, L).argsort(1)
        mask = torch.zeros(B, L).scatter_(1, ids[:, K:], 1.0)
        for img_dt, act_dt in MIXES if H == 224 or H == 32 else MIXES[:2]:
            for norm_pix in (False, True):
                imgs = torch.randn(B, C, H, W, dtype=img_dt, requires_grad=True)
                ops.patchify_gather(imgs, ids[:, :K], p, norm_pix=norm_pix).sum().backward()
                pred = torch.randn(B, L, P, dtype=act_dt, requires_grad=True)
                ops.masked_mse_loss(pred, imgs.detach(), p, mask=mask, norm_pix=norm_pix).backward()
                pred = torch.randn(B, M, P, dtype=act_dt, requires_grad=True)
                ops.masked_mse_loss(pred, imgs.detach(), p, ids=ids[:, K:], norm_pix=norm_pix).backward()
            ops.patchify(imgs, p).sum().backward()
            ops.unpatchify(torch.randn(B, L, P, dtype=act_dt), p, (H, W))


# widths of the fused add + LayerNorm: tiny preset, decoders, ViT-B/L/H, and an odd one
NORM_WIDTHS = [7, 64, 96, 512, 768, 1024, 1280]


def _norm_workload(widths):
    """add_layer_norm as the blocks call it: (x, delta, out) dtypes of fp32, bf16 autocast (fp32
    stream, bf16 delta and out), pure bf16 and pure fp16; both gradients, and the normed one only."""
    mixes = [(torch.float32, torch.float32, None), (torch.float32, torch.bfloat16, torch.bfloat16),
             (torch.bfloat16, torch.bfloat16, None), (torch.float16, torch.float16, None)]
    for D in widths:
        for x_dt, d_dt, out_dt in mixes:
            x = torch.randn(2, 50, D, dtype=x_dt, requires_grad=True)
            delta = torch.randn(2, 50, D, dtype=d_dt, requires_grad=True)
            w, b = torch.randn(D, requires_grad=True), torch.randn(D, requires_grad=True)
            res, normed = ops.add_layer_norm(x, delta, w, b, 1e-6, out_dtype=out_dt)
            (res.float().sum() + normed.float().sum()).backward()
            ops.add_layer_norm(x, delta, w, None, 1e-6, out_dtype=out_dt)[1].float().sum().backward()


# (N, heads, d) of the blocks' attention: ViT-B/16 encoder and the MAE decoder, then ViT-L/16 and
# ViT-H/14 encoders, the ViT-H decoder, the tiny preset, an odd head dim and the largest one
ATTN_VIT_B = [(50, 12, 64), (197, 16, 32)]
ATTN_OTHERS = [(50, 16, 64), (65, 16, 80), (257, 16, 32), (17, 2, 16), (5, 2, 24), (9, 1, 128)]


def _attention_workload(shapes):
    """attention forward and backward in bf16 (autocast's), fp16 and fp32."""
    for N, H, d in shapes:
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            qkv = torch.randn(2, N, 3 * H * d, dtype=dt, requires_grad=True)
            ops.attention(qkv, H).float().sum().backward()


def _ptxas_report(ptx: str, arch: int, tmp: Path) -> dict:
    """ptxas -v on the kernel's PTX: registers and spill bytes."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"  # the one Triton ran
    (tmp / "k.ptx").write_text(ptx)
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    out = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", str(tmp / "k.ptx"), "-o", str(tmp / "k.cubin")],
                         capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_bytes=num(r"(\d+) bytes spill stores")
                + num(r"(\d+) bytes spill loads"), ptxas=text.strip())


def _record_and_compile(archs, tmp: Path) -> dict:
    """In a process that never interpreted Triton: record the workload's launches, compile each."""
    import triton

    import mae_fast.kernels

    log, kernels = [], set()
    mods = {m.name: importlib.import_module(f"mae_fast.kernels.{m.name}")
            for m in pkgutil.iter_modules(mae_fast.kernels.__path__)}
    for mod in mods.values():
        for attr, fn in list(vars(mod).items()):
            if isinstance(fn, triton.runtime.JITFunction) and attr.endswith("_kernel"):
                kernels.add(attr)
                setattr(mod, attr, Recorder(fn, log))
    for name, m in list(sys.modules.items()):  # route CPU tensors to the (recording) kernels
        if name.startswith("mae_fast.ops.") and hasattr(m, "triton_kernels"):
            m.triton_kernels = lambda kname, t, *also: None if t.dtype == torch.float64 else mods[kname]
    _workload(CONFIGS[:1])
    _norm_workload([768])
    _attention_workload(ATTN_VIT_B)
    first = {lc.key() for lc in log}  # ViT-B/16's launches: compiled for every arch, the rest for the first
    _workload(CONFIGS[1:])
    _norm_workload([D for D in NORM_WIDTHS if D != 768])
    _attention_workload(ATTN_OTHERS)
    unique = {}
    for launch in log:
        unique.setdefault(launch.key(), launch)
    results = []
    for launch in unique.values():
        for arch in archs if launch.key() in first else archs[:1]:
            row = dict(kernel=launch.name, launch=launch.describe(), arch=arch)
            try:
                compiled = launch.compile(arch)
                row.update(_ptxas_report(compiled.asm["ptx"], arch, tmp), cubin_bytes=len(compiled.asm["cubin"]),
                           shared=compiled.metadata.shared)
            except Exception as e:  # noqa: BLE001 -- collected, so one run names every broken launch
                row["error"] = f"{type(e).__name__}: {str(e).strip()[:1500]}"
            results.append(row)
    return dict(kernels=sorted(kernels), launched=sorted({lc.name for lc in unique.values()}), results=results)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("aot")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__, str(tmp), *map(str, ARCHS)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"the compile subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((tmp / "results.json").read_text())


def test_every_kernel_is_launched(compiled):
    """The workload reaches every @triton.jit kernel of kernels/: none escapes the compile check."""
    assert compiled["kernels"], "no Triton kernels found under kernels/"
    missing = sorted(set(compiled["kernels"]) - set(compiled["launched"]))
    assert not missing, f"kernels never launched by the workload: {missing}"


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_kernels_compile(compiled, arch, capsys):
    """Each distinct launch compiles to a cubin for `arch` (sm_80: the ViT-B/16 launches), and ptxas
    reports no more than a token register spill."""
    rows = [r for r in compiled["results"] if r["arch"] == arch]
    assert rows
    with capsys.disabled():
        print(f"\nsm_{arch}: {len(rows)} kernel variants (registers, spill bytes, shared memory bytes)")
        for r in sorted(rows, key=lambda r: r["launch"]):
            if "error" not in r:
                print(f"  {r['regs']:4d} regs {r['spill_bytes']:5d} spill {r['shared']:6d} smem  {r['launch']}")
    errors = [f"{r['launch']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, f"{len(errors)} of {len(rows)} launches do not compile for sm_{arch}:\n" + "\n".join(errors)
    spills = [f"{r['launch']}: {r['ptxas']}" for r in rows if r["spill_bytes"] > SPILL_LIMIT_BYTES]
    assert not spills, f"register spills over {SPILL_LIMIT_BYTES} bytes:\n" + "\n".join(spills)


if __name__ == "__main__":  # the subprocess of the `compiled` fixture: results.json in argv[1]
    out_dir = Path(sys.argv[1])
    result = _record_and_compile([int(a) for a in sys.argv[2:]], out_dir)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
