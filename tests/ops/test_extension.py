"""The compiled extension mae_fast._C: it loads, registers its kernels for every low-level op, its
CPU kernels agree with the PyTorch fallback, and the bodies of its CUDA kernels (run on the CPU
through tests/cuda_emulation.cpp, since CI has no GPU) agree with both."""
import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

from mae_fast.ops import _common
from mae_fast.testing import reference as ref
from mae_fast.ops import tokens as tok

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, beside cuda_emulation.cpp
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
TOKEN_OPS = tok.OPS
KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def make_ids(B, L, K, dtype=torch.int64):
    return torch.rand(B, L).argsort(dim=1)[:, :K].to(dtype).contiguous()  # raw pointers below


needs_ext = pytest.mark.skipif(not _common.EXTENSION_AVAILABLE, reason=f"extension unavailable: {_common.EXTENSION_UNAVAILABLE_REASON}")


def test_extension_loads_and_registers_token_kernels():
    info = _common.build_info()
    if not info.get("backends"):
        pytest.skip(f"built without the extension: {info.get('reason')}")
    assert _common.EXTENSION_AVAILABLE, _common.EXTENSION_UNAVAILABLE_REASON
    for op in TOKEN_OPS:
        assert _common.has_kernel(op, "cpu"), op
        assert _common.has_kernel(op, "cuda") == ("cuda" in info["backends"]), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mae_fast::{op}", "Meta")  # the fake


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 64, 100])
def test_cpu_kernels_equal_fallback(dtype, D):
    assert _common.has_kernel("tokens_unshuffle", "cpu")
    F, op = tok.FALLBACKS, torch.ops.mae_fast
    B, L, P, K = 4, 15, 1, 6
    x = torch.randn(B, L, D).to(dtype)
    ids = make_ids(B, L, K, torch.int32 if D % 2 else torch.int64)
    assert torch.equal(op.tokens_gather(x, ids), F["tokens_gather"](x, ids))
    inv = op.tokens_invert(ids, L)
    assert torch.equal(inv, F["tokens_invert"](ids, L))
    vis = torch.randn(B, P + K, D).to(dtype)
    for m in (None, torch.randn(D), torch.randn(D).to(dtype)):
        for pos in (None, torch.randn(P + L, D), torch.randn(P + L, D).to(dtype)):
            assert torch.equal(op.tokens_unshuffle(vis, inv, m, pos, P), F["tokens_unshuffle"](vis, inv, m, pos, P))
    g = torch.randn(B, P + L, D).to(dtype)
    for need_mask in (False, True):
        for need_pos in (False, True):
            got = op.tokens_unshuffle_bwd(g, inv, P, K, need_mask, need_pos)
            want = F["tokens_unshuffle_bwd"](g, inv, P, K, need_mask, need_pos)
            assert torch.equal(got[0], want[0])
            for a, b in zip(got[1:], want[1:]):
                assert a.shape == b.shape and a.dtype == b.dtype
                torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float64 else 1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CUDA bodies on the CPU

@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")):
        pytest.skip("needs a C++ compiler and the CUDA headers")
    so = tmp_path_factory.mktemp("emu") / "cuda_emulation.so"
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", f"-I{CUDA_INCLUDE}", f"-I{CSRC}",
                    os.path.join(HERE, "cuda_emulation.cpp"), "-o", str(so)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(so))
    lib.emu_last_error.restype = ctypes.c_char_p
    return lib


def P_(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def I_(*vals):
    return [ctypes.c_int64(int(v)) for v in vals]


def emu_check(lib, rc):
    assert rc == 0, lib.emu_last_error().decode()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 8, 64, 1000])
def test_emulated_cuda_gather(emu, dtype, D):
    B, L, K = 3, 13, 5
    x = torch.randn(B, L, D).to(dtype)
    row_bytes = D * x.element_size()
    for ids_dtype in (torch.int32, torch.int64):
        ids = make_ids(B, L, K, ids_dtype)
        want = ref.gather_tokens(x, ids)
        for unit in (16, 8, 4, 2, 1):
            if row_bytes % unit:
                continue
            out = torch.full_like(want, float("nan"))
            emu_check(emu, emu.emu_gather(unit, int(ids_dtype == torch.int64), P_(x), P_(ids), P_(out),
                                          *I_(B, L, K, row_bytes)))
            assert torch.equal(out, want), unit


def test_emulated_cuda_index_checks(emu):
    B, L, K = 2, 10, 4
    x, out = torch.randn(B, L, 8), torch.empty(B, K, 8)
    inv = torch.empty(B, L, dtype=torch.int32)
    ids = make_ids(B, L, K)
    assert emu.emu_invert(1, P_(ids), P_(inv), *I_(B, K, L)) == 0
    assert torch.equal(inv, torch.ops.mae_fast.tokens_invert(ids, L))
    oob, dup = ids.clone(), ids.clone()
    oob[1, 2] = L
    dup[1, 3] = dup[1, 1]
    assert emu.emu_gather(16, 1, P_(x), P_(oob), P_(out), *I_(B, L, K, 32)) == 1
    assert b"ids out of range" in emu.emu_last_error()
    assert emu.emu_invert(1, P_(oob), P_(inv), *I_(B, K, L)) == 1
    assert b"ids_keep or gather_tokens' ids out of range" in emu.emu_last_error()
    assert emu.emu_invert(1, P_(dup), P_(inv), *I_(B, K, L)) == 1
    assert b"duplicate" in emu.emu_last_error()
    neg = ids.int()
    neg[0, 0] = -1
    assert emu.emu_invert(0, P_(neg), P_(inv), *I_(B, K, L)) == 1
    # an inv that tokens_invert cannot have made: a slot below -1 is an error, not a mask row
    inv = torch.ops.mae_fast.tokens_invert(ids, L)
    inv[1, 0] = -2
    vis, g = torch.randn(B, K, 8), torch.randn(B, L, 8)
    out, gvis = torch.empty(B, L, 8), torch.empty(B, K, 8)
    assert emu.emu_unshuffle_fwd(0, 1, 0, P_(vis), P_(inv), P_(None), P_(None), P_(out), *I_(B, 0, K, L, 8)) == 1
    assert b"inv value outside [-1," in emu.emu_last_error()
    assert emu.emu_unshuffle_bwd(0, 0, P_(g), P_(inv), P_(gvis), P_(None), P_(None), *I_(B, 0, K, L, 8, B, 1), 0, 0) == 1
    assert b"inv value outside [-1," in emu.emu_last_error()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 16, 40])
@pytest.mark.parametrize("P", [0, 1])
def test_emulated_cuda_unshuffle_forward(emu, dtype, D, P):
    B, L, K = 3, 11, 4
    vis = torch.randn(B, P + K, D).to(dtype)
    ids = make_ids(B, L, K)
    inv = torch.ops.mae_fast.tokens_invert(ids, L)
    V = 16 // vis.element_size()
    aux_dtypes = [dtype] if dtype in (torch.float32, torch.float64) else [dtype, torch.float32]
    for aux in aux_dtypes:
        for m in (None, torch.randn(D).to(aux)):
            for pos in (None, torch.randn(P + L, D).to(aux)):
                want = torch.ops.mae_fast.tokens_unshuffle(vis, inv, m, pos, P)  # the CPU kernel
                for vec in ([0, 1] if D % V == 0 else [0]):
                    out = torch.full_like(want, float("nan"))
                    emu_check(emu, emu.emu_unshuffle_fwd(KIND[dtype], int(aux == dtype), vec, P_(vis), P_(inv), P_(m),
                                                         P_(pos), P_(out), *I_(B, P, K, L, D)))
                    assert torch.equal(out, want), (aux, m is None, pos is None, vec)


def emulated_backward(emu, g, inv, P, K, need_mask, need_pos, nsplit, vec, chunk=32):
    """The host logic of tokens_cuda_host.cpp's backward around the emulated kernel bodies."""
    B, S, D = g.shape
    N = inv.shape[1]
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    f64 = int(acc == torch.float64)
    bsplit = math.ceil(B / nsplit)
    nsplit = math.ceil(B / bsplit)
    gvis = torch.full((B, P + K, D), float("nan"), dtype=g.dtype)
    ppart = torch.full((nsplit, S, D), float("nan"), dtype=acc) if need_pos else None
    mpart = torch.full((nsplit * N, D), float("nan"), dtype=acc) if need_mask else None
    emu_check(emu, emu.emu_unshuffle_bwd(KIND[g.dtype], vec, P_(g), P_(inv), P_(gvis), P_(ppart), P_(mpart),
                                         *I_(B, P, K, N, D, bsplit, nsplit), int(need_pos), int(need_mask)))
    gpos = gmask = None
    if need_pos:
        gpos = torch.full((S, D), float("nan"), dtype=acc)
        emu_check(emu, emu.emu_column_sum(f64, P_(ppart), P_(gpos), *I_(nsplit, S * D, nsplit)))
    if need_mask:
        R = nsplit * N
        G = math.ceil(R / chunk)
        mid = torch.full((G, D), float("nan"), dtype=acc)
        emu_check(emu, emu.emu_column_sum(f64, P_(mpart), P_(mid), *I_(R, D, chunk)))
        gmask = torch.full((D,), float("nan"), dtype=acc)
        emu_check(emu, emu.emu_column_sum(f64, P_(mid), P_(gmask), *I_(G, D, G)))
    return gvis, gmask, gpos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 16])
@pytest.mark.parametrize("P", [0, 1])
def test_emulated_cuda_unshuffle_backward(emu, dtype, D, P):
    B, L, K = 7, 10, 3
    g = torch.randn(B, P + L, D).to(dtype)
    inv = torch.ops.mae_fast.tokens_invert(make_ids(B, L, K), L)
    V = 16 // g.element_size()
    for need_mask, need_pos in ((True, True), (True, False), (False, True)):
        want = torch.ops.mae_fast.tokens_unshuffle_bwd(g, inv, P, K, need_mask, need_pos)  # the CPU kernel
        for nsplit in (1, 2, 3, 7):
            for vec in ([0, 1] if D % V == 0 else [0]):
                for chunk in (32, 4):
                    gvis, gmask, gpos = emulated_backward(emu, g, inv, P, K, need_mask, need_pos, nsplit, vec, chunk)
                    assert torch.equal(gvis, want[0])
                    if need_mask:
                        torch.testing.assert_close(gmask, want[1], rtol=1e-5, atol=1e-5)
                    if need_pos:
                        torch.testing.assert_close(gpos, want[2], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_runs_the_compiled_kernels_not_the_fallbacks():
    """On CUDA every op must reach its Triton kernels and the extension's CUDA kernels: a broken
    install (no mae_fast.kernels, no _C) would otherwise pass every parity test on the fallbacks."""
    from mae_fast.info import missing_cuda_kernels
    from mae_fast.ops._common import triton_kernels

    assert _common.EXTENSION_AVAILABLE, _common.EXTENSION_UNAVAILABLE_REASON
    assert missing_cuda_kernels() == []
    assert triton_kernels("patchify", torch.zeros(1, device="cuda")) is not None  # the dispatch itself


def test_missing_cuda_kernels_names_what_a_cuda_run_would_lack(monkeypatch):
    from mae_fast import info

    if "cuda" in _common.build_info().get("backends", []):
        assert info.missing_cuda_kernels() == []
    monkeypatch.setattr(_common, "has_kernel", lambda op, device: False)
    monkeypatch.setattr(_common, "load_kernels", lambda name: None if name == "add_layer_norm" else object())
    assert info.missing_cuda_kernels() == ["mae_fast.kernels.add_layer_norm"] + [
        f"mae_fast::{op} CUDA kernel" for op in TOKEN_OPS]
    assert "missing mae_fast.kernels.add_layer_norm" in info.collect()["CUDA kernels"]
