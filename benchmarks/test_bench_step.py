"""Benchmarks (measurements, not tests): the full MAE training step -- forward, backward and the
AdamW step -- of mae_fast.MaskedAutoencoderViT (official API) and mae_fast.MAE (seed API) against
the peers, all measured in the same run on identical weights and noise.

Providers (a case's speedups are computed by benchmarks/report.py from the same run):
  mae_fast             the fast model as the training CLI runs it (official: return_pred=False)
  mae_fast_pred        official API only: the drop-in call forward(imgs, ratio, noise) -> (loss, pred, mask)
  mae_fast_compiled    torch.compile(mae_fast model)
  mae_fast_graphed     CUDA only: torch.compile(mae_fast model, mode="reduce-overhead"), i.e. with CUDA
                       graphs; measured last, so a tight time budget drops it first
  mae_fast_triton_attn[_compiled|_graphed]
                       the same with the blocks on mae_fast.ops.attention (set_attention_backend
                       "triton"; the others run "sdpa")
  mae_fast[_triton_attn]_fused
                       eager, with each residual add fused into the next LayerNorm's kernel
                       (set_fused_add_norm(True); the others run without: an eager step is
                       host-bound on an H200, and the kernel's autograd.Function costs host time,
                       benchmarks/host_overhead.py)
                       These opt-in providers (official API) run only when named in
                       MAE_FAST_BENCH_PROVIDERS.
  reference            mae_fast.testing.reference, eager, explicit softmax attention (the oracle)
  reference_compiled   torch.compile(reference model)
  hf                   transformers' ViTMAEForPreTraining, attn_implementation="sdpa", same config
                       and weights (mae_fast.io.hf.to_hf) -- official API only
  vit_pytorch          vit_pytorch.MAE(encoder=vit_pytorch.ViT) with the same weights -- seed API
                       only; it draws its own noise (no noise argument), which changes no cost
Peers that are not installed or fail are skipped with the reason printed and recorded.

Cases. CUDA: ViT-B/16 and ViT-L/16 (official) at 224x224, mask 0.75, batch 256 (ViT-L 128), and a
ViT-B-sized seed model, under bf16 autocast, fused AdamW. CPU: the `tiny` preset (32x32, patch 4)
and a seed model of the same size, batch 64, fp32, 1 thread (a shared 2-core box). --bench-quick:
depth-1 models, batch 8, 3 rounds, one compiled provider (CI keeps the harness alive).

Per case and provider (benchmark.extra_info, then benchmarks/results/results.csv):
  images_per_s      batch / median step time; each pytest-benchmark round is one step (+ a CUDA
                    sync); warm-up steps (compilation included) are excluded
  peak_mem_mb       CUDA: torch.cuda.max_memory_allocated from the first step on (reset before
                    it; weights + AdamW state included): a CUDA graph's replays allocate nothing,
                    so only its capture, in the warm-up steps, shows the memory it holds.
                    CPU: bytes alive at the step start (weights, AdamW state, inputs) + the peak of the profiler's allocation trace over one
                    step (torch.profiler profile_memory; library-internal scratch is not seen)
  tflops, mfu       counted model FLOPs (benchmarks/flops.py, the same numerator for every
                    provider of a case) / median time, over the matmul ceiling measured in this
                    run (CUDA: bf16 8192^3 matmul, triton.testing.do_bench median; CPU: fp32)
  first_step_s      the first step (compilation for the compiled providers)
  loss0             the first step's loss (same weights and noise: equal across providers)
The ceilings are rows of case "ceiling (<dtype>)": matmul_tflops and copy_gbps (a large
device-to-device copy, counted read + write bytes: the bandwidth bound of the memory-bound ops).

    pytest benchmarks/test_bench_step.py                    # then: python -m benchmarks.report
    MAE_FAST_BENCH_CASES=official-vit_b16 MAE_FAST_BENCH_ROUNDS=20 pytest benchmarks/test_bench_step.py
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mae_fast  # noqa: E402
from mae_fast.testing import reference as R  # noqa: E402

from benchmarks.common import CUDA, DEVICE, device_name  # noqa: E402
from benchmarks.flops import official_step_flops, seed_step_flops  # noqa: E402

CPU_THREADS = int(os.environ.get("MAE_FAST_BENCH_THREADS", "1"))


@dataclass(frozen=True)
class Case:
    name: str
    api: str          # "official" | "seed"
    batch: int
    img: int
    patch: int
    dim: int
    depth: int
    heads: int
    dec_dim: int
    dec_depth: int
    dec_heads: int
    dim_head: int = 64      # seed API
    dec_dim_head: int = 64  # seed API
    mask_ratio: float = 0.75

    @property
    def num_patches(self) -> int:
        return (self.img // self.patch) ** 2


def _official(name, batch, img, patch, dim, depth, heads, dec_dim=512, dec_depth=8, dec_heads=16):
    return Case(name, "official", batch, img, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads)


def _seed(name, batch, img, patch, dim, depth, heads, dim_head, dec_dim, dec_depth, dec_heads, dec_dim_head):
    return Case(name, "seed", batch, img, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, dim_head,
                dec_dim_head)


GPU_CASES = [
    _official("official-vit_b16", 256, 224, 16, 768, 12, 12),
    _official("official-vit_l16", 128, 224, 16, 1024, 24, 16),
    # the seed API at ViT-B size: same encoder, the official decoder (512 wide, 8 deep, 16 heads of 32)
    _seed("seed-vit_b16", 256, 224, 16, 768, 12, 12, 64, 512, 8, 16, 32),
]
CPU_CASES = [  # the `tiny` preset of mae_fast.models.presets, and a seed model of the same size
    _official("official-tiny", 64, 32, 4, 96, 4, 3, 64, 2, 2),
    _seed("seed-tiny", 64, 32, 4, 96, 4, 3, 32, 64, 2, 2, 32),
]
QUICK_CASES = [
    _official("official-micro", 8, 32, 8, 64, 1, 2, 32, 1, 2),
    _seed("seed-micro", 8, 32, 8, 64, 1, 2, 32, 32, 1, 2, 16),
]
PROVIDERS = {
    "official": ["mae_fast", "mae_fast_pred", "reference", "hf", "mae_fast_compiled", "reference_compiled"]
    + (["mae_fast_graphed"] if CUDA else []),
    "seed": ["mae_fast", "reference", "vit_pytorch", "mae_fast_compiled", "reference_compiled"],
}
TRITON_ATTN = "_triton_attn"  # provider infix: the blocks on mae_fast.ops.attention
OPT_IN = {"official": [f"mae_fast{TRITON_ATTN}{sfx}" for sfx in ("", "_compiled", "_graphed", "_fused")]
          + ["mae_fast_fused"], "seed": []}
OURS = ("mae_fast", "mae_fast_pred", "mae_fast_compiled", "mae_fast_graphed", *OPT_IN["official"])
COMPILE_MODES = {"_compiled": "default", "_graphed": "reduce-overhead"}  # provider suffix -> torch.compile mode


def compile_mode(provider: str):
    """The torch.compile mode of a provider, None for an eager one."""
    return next((mode for suffix, mode in COMPILE_MODES.items() if provider.endswith(suffix)), None)

QUICK_COMPILED = ("official-micro", "mae_fast_compiled")  # the one compile quick mode pays for


def _selected(quick: bool):
    cases = QUICK_CASES if quick else (GPU_CASES if CUDA else CPU_CASES)
    only = {c for c in os.environ.get("MAE_FAST_BENCH_CASES", "").split(",") if c}
    if only:
        cases = [c for c in cases if c.name in only]
    providers = {p for p in os.environ.get("MAE_FAST_BENCH_PROVIDERS", "").split(",") if p}
    known = {p for api in PROVIDERS for p in PROVIDERS[api] + OPT_IN[api]}
    if providers - known:  # a typo would silently drop a provider from a (scarce) GPU run
        raise ValueError(f"MAE_FAST_BENCH_PROVIDERS: unknown {sorted(providers - known)}; known: {sorted(known)}")
    names = {c.name for c in GPU_CASES + CPU_CASES + QUICK_CASES}
    if only - names:
        raise ValueError(f"MAE_FAST_BENCH_CASES: unknown {sorted(only - names)}; known: {sorted(names)}")
    pairs = [(c, p) for c in cases for p in PROVIDERS[c.api] + (OPT_IN[c.api] if providers else [])
             if not providers or p in providers]
    # the first case whole, CUDA graphs included (its compiled peers decide the 1.3x target, and
    # graphs are its best chance at the img/s target), then the eager providers of the other cases,
    # then their (slow to compile) compiled ones, their graphs last: under a time budget the tail
    # that gets skipped is the compiled providers of the last cases
    def order(cp):
        case, provider = cp
        if case is cases[0]:
            return 0
        return 1 + (compile_mode(provider) is not None) + provider.endswith("_graphed")
    return sorted(pairs, key=order)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and "provider" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--bench-quick", default=False) \
            or os.environ.get("MAE_FAST_BENCH_QUICK") == "1"  # as conftest.is_quick
        pairs = _selected(quick)
        metafunc.parametrize(("case", "provider"), pairs, ids=[f"{c.name}-{p}" for c, p in pairs])


def _rounds(quick: bool) -> tuple[int, int]:
    """(warm-up steps, measured steps)."""
    if quick:
        return 1, 3
    # CUDA: 10 warm-up steps (cuDNN plans, allocator growth, clocks); the first H200 run saw one
    # eager provider 25% slower than a near-identical one measured right after it, cause unknown
    warm, rounds = (10, 30) if CUDA else (3, 20)
    return (int(os.environ.get("MAE_FAST_BENCH_WARMUP", warm)), int(os.environ.get("MAE_FAST_BENCH_ROUNDS", rounds)))


# ----------------------------------------------------------------------------- setup / summary

_RESULTS: dict[tuple[str, str], dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _setup_and_summary(request):
    old_interp, threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "0"  # CPU: the ops' vectorised fallbacks, not the interpreter
        torch.set_num_threads(CPU_THREADS)
    yield
    used_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    if old_interp is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old_interp
    if not _RESULTS:
        return
    lines = ["", f"training-step benchmarks on {device_name()}, torch {torch.__version__}"
             + ("" if CUDA else f", {used_threads} thread(s)"),
             f"{'case':20s} {'provider':19s} {'img/s':>10s} {'ms/step':>9s} {'peak MB':>9s} {'MFU':>7s} "
             f"{'vs reference':>13s} {'vs ref_compiled':>16s} {'vs ref, interleaved':>20s}"]

    def ratio(m, case, peer, provider, key="images_per_s"):
        mine, other = m.get(key), _RESULTS.get((case, peer), {}).get(key)
        return f"{mine / other:.2f}x" if mine and other and provider != peer else ""

    for (case, provider), m in _RESULTS.items():
        mfu = m.get("mfu")
        lines.append(f"{case:20s} {provider:19s} {m.get('images_per_s', float('nan')):10.1f} "
                     f"{m.get('median_s', float('nan')) * 1e3:9.2f} {m.get('peak_mem_mb', float('nan')):9.1f} "
                     f"{'' if mfu is None else f'{mfu:6.1%}':>7s} {ratio(m, case, 'reference', provider):>13s} "
                     f"{ratio(m, case, 'reference_compiled', provider):>16s} "
                     f"{ratio(m, case, 'reference', provider, 'images_per_s_interleaved'):>20s}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with (capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()):
        print("\n".join(lines))



def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ----------------------------------------------------------------------------- ceilings

_CEILING: dict[str, float] = {}


@pytest.fixture(scope="module")
def ceiling(bench_record, bench_quick):
    """Measured once per run: the matmul ceiling (FLOP/s) of the step's dtype and the copy bandwidth."""
    if not _CEILING:
        if CUDA:
            import triton.testing

            n, dtype = 8192, torch.bfloat16
            a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
            ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
            flops = 2 * n**3 / (ms * 1e-3)
            del a, b
            src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
            gbps = 2 * src.numel() / (ms * 1e-3) / 1e9
            del src, dst
            torch.cuda.empty_cache()
            label = "bf16"
        else:
            n, dtype = (256, torch.float32) if bench_quick else (1024, torch.float32)
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            flops = 2 * n**3 / _time_cpu(lambda: a @ b, 3 if bench_quick else 10)
            src = torch.empty(1 << (24 if bench_quick else 28), dtype=torch.uint8)
            dst = torch.empty_like(src)
            gbps = 2 * src.numel() / _time_cpu(lambda: dst.copy_(src), 3 if bench_quick else 10) / 1e9
            label = f"fp32, {torch.get_num_threads()} thread(s)"
        _CEILING.update(flops=flops, gbps=gbps, label=label)
        case = f"ceiling ({label})"
        bench_record.row(case, "torch.matmul", "matmul_tflops", flops / 1e12)
        bench_record.row(case, "copy_", "copy_gbps", gbps)
    return _CEILING


def _time_cpu(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return _median(ts)


# ----------------------------------------------------------------------------- models

_STATE: dict[str, dict] = {}  # the initial weights of the current case (one case kept at a time)


def _official_kwargs(c: Case) -> dict:
    return dict(img_size=c.img, patch_size=c.patch, in_chans=3, embed_dim=c.dim, depth=c.depth, num_heads=c.heads,
                decoder_embed_dim=c.dec_dim, decoder_depth=c.dec_depth, decoder_num_heads=c.dec_heads, mlp_ratio=4.0,
                norm_pix_loss=True)


def _seed_model(lib, c: Case):
    enc = lib.ViT(image_size=c.img, patch_size=c.patch, num_classes=0, dim=c.dim, depth=c.depth, heads=c.heads,
                  mlp_dim=4 * c.dim, dim_head=c.dim_head, pool="mean", channels=3)
    return lib.MAE(encoder=enc, decoder_dim=c.dec_dim, masking_ratio=c.mask_ratio, decoder_depth=c.dec_depth,
                   decoder_heads=c.dec_heads, decoder_dim_head=c.dec_dim_head)


def _fast_model(c: Case):
    return mae_fast.MaskedAutoencoderViT(**_official_kwargs(c)) if c.api == "official" else _seed_model(mae_fast, c)


def _initial_state(c: Case) -> dict:
    if c.name not in _STATE:
        _STATE.clear()
        gc.collect()
        torch.manual_seed(0)
        with torch.device(DEVICE):  # initialised where it runs (ViT-L on a CPU takes seconds), kept
            # on the host so that it is not part of any provider's peak device memory
            _STATE[c.name] = {k: v.detach().to("cpu", copy=True) for k, v in _fast_model(c).state_dict().items()}
    return _STATE[c.name]


def _inputs(c: Case):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    imgs = torch.randn(c.batch, 3, c.img, c.img, device=DEVICE, generator=g)
    noise = torch.rand(c.batch, c.num_patches, device=DEVICE, generator=g)
    return imgs, noise


class PeerUnavailable(Exception):
    pass


def _build(c: Case, provider: str):
    """(module whose parameters train, loss function of (imgs, noise), model FLOPs of one step)."""
    mode = compile_mode(provider)
    base = next((provider.removesuffix(sfx) for sfx in COMPILE_MODES if provider.endswith(sfx)), provider)
    base = base.replace(TRITON_ATTN, "").removesuffix("_fused")
    state = _initial_state(c)
    with torch.device(DEVICE):
        if c.api == "official":
            if base in ("mae_fast", "mae_fast_pred", "hf"):
                model = mae_fast.MaskedAutoencoderViT(**_official_kwargs(c))
            else:
                model = R.MaskedAutoencoderViT(**_official_kwargs(c))
        elif base == "vit_pytorch":
            try:
                import vit_pytorch
            except ImportError as e:
                raise PeerUnavailable(f"vit-pytorch is not installed ({e})") from None
            model = _seed_model(vit_pytorch, c)
        else:
            model = _seed_model(mae_fast if base == "mae_fast" else R, c)
    model.load_state_dict(state)
    model.train()
    flops_model = model
    if base == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise PeerUnavailable(f"transformers is not installed ({e})") from None
        from mae_fast.io.hf import to_hf

        with torch.device(DEVICE):  # the HF model initialises where it runs, then takes our weights
            model = to_hf(model, attn_implementation="sdpa").to(DEVICE).train()
    net = torch.compile(model, mode=mode) if mode else model
    ratio = c.mask_ratio
    if c.api == "official":
        flops = official_step_flops(flops_model, c.batch, ratio)
        if base == "mae_fast":
            def loss_fn(imgs, noise):
                return net(imgs, ratio, noise, return_pred=False)[0]
        elif base == "hf":
            def loss_fn(imgs, noise):
                return net(pixel_values=imgs, noise=noise).loss
        else:  # mae_fast_pred, reference
            def loss_fn(imgs, noise):
                return net(imgs, ratio, noise)[0]
    else:
        flops = seed_step_flops(flops_model, c.batch)
        if base == "vit_pytorch":
            def loss_fn(imgs, noise):
                return net(imgs)
        else:
            def loss_fn(imgs, noise):
                return net(imgs, noise)
    return model, loss_fn, flops


def _adamw(model, batch):
    """The official recipe's optimizer: AdamW betas (0.9, 0.95), wd 0.05 except 1-D params and biases,
    lr = 1.5e-4 * batch / 256; fused where torch has it for the device."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and p.numel():
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [dict(params=decay, weight_decay=0.05), dict(params=no_decay, weight_decay=0.0)]
    kw = dict(lr=1.5e-4 * batch / 256, betas=(0.9, 0.95))
    try:
        return torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, **kw), "default"


def _amp():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()


# ----------------------------------------------------------------------------- memory

def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def _cpu_step_peak_bytes(step) -> int:
    """Peak of the running sum of allocations (and frees) the profiler records during one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs = []
    alloc_tag = torch._C._profiler._EventType.Allocation

    def walk(node):
        if node.tag == alloc_tag:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not allocs:
        raise RuntimeError("the profiler recorded no allocations")
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return peak


# ----------------------------------------------------------------------------- the benchmark

def _cleanup(compiled: bool):
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if CUDA:
        torch.cuda.empty_cache()


def _make_step(case: Case, provider: str):
    """(model, optimizer, its kind, step(), FLOPs); step.inputs = (imgs, noise)."""
    model, loss_fn, flops = _build(case, provider)
    opt, opt_kind = _adamw(model, case.batch)
    imgs, noise = _inputs(case)
    # set per step, whatever MAE_FAST_ATTENTION / MAE_FAST_FUSED_ADD_NORM say
    attention = "triton" if TRITON_ATTN in provider else "sdpa"
    fused = provider.endswith("_fused")

    def step():
        before = mae_fast.attention_backend(), mae_fast.fused_add_norm()
        mae_fast.set_attention_backend(attention)
        mae_fast.set_fused_add_norm(fused)
        try:
            with _amp():
                loss = loss_fn(imgs, noise)
            loss.backward()
        finally:
            mae_fast.set_attention_backend(before[0])
            mae_fast.set_fused_add_norm(before[1])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step.inputs = (imgs, noise)
    return model, opt, opt_kind, step, flops


def _say(request, msg: str) -> None:
    """Progress past pytest's capture: a device log shows how far a run got if it is cut short."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with (capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()):
        print(msg, flush=True)


def ops_path() -> str:
    """Which implementation mae_fast's ops run on this device: on CUDA a broken install (no
    mae_fast.kernels, no _C) silently runs the PyTorch fallbacks, and its numbers are then not
    mae_fast's kernels. Recorded with every mae_fast row (metric ops_path) and flagged by report.py."""
    from mae_fast.info import missing_cuda_kernels

    if not CUDA:
        return "cpu"
    missing = missing_cuda_kernels()
    return f"PyTorch fallbacks: no {', '.join(missing)}" if missing else "compiled kernels"


def test_step(benchmark, case, provider, bench_record, bench_quick, ceiling, request):
    name = case.name
    if provider in OURS:
        bench_record.row(name, provider, "ops_path", ops_path())
    benchmark.group = f"step-{name}"
    compiled = compile_mode(provider) is not None
    if bench_quick and compiled and (name, provider) != QUICK_COMPILED:
        bench_record.skip(name, provider, "quick mode compiles one provider only "
                                          f"({QUICK_COMPILED[1]} on {QUICK_COMPILED[0]})")
    need = (90 if CUDA else 120) if compiled else (30 if CUDA else 30)
    left = bench_record.seconds_left()
    if left < need:
        bench_record.skip(name, provider, f"time budget: {max(left, 0):.0f} s left, a {provider} case needs ~{need} s")
    peer = provider not in OURS and provider != "reference"  # an error there is the peer's, not ours
    try:
        model, opt, opt_kind, step, flops = _make_step(case, provider)
    except PeerUnavailable as e:
        bench_record.skip(name, provider, str(e))
    imgs, noise = step.inputs

    warmup, rounds = _rounds(bench_quick)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        loss0 = step().item()
    except Exception as e:  # noqa: BLE001 -- a peer's failure is recorded, ours fails the test
        if not peer:
            raise
        del model, opt
        _cleanup(compiled)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        bench_record.skip(name, provider, f"{provider} fails on this case: {type(e).__name__}: {first[:200]}")
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    _sync()
    gc.collect()

    def run():
        step()
        _sync()

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    metrics = dict(loss0=loss0, first_step_s=first_step_s, batch=case.batch, step_flops=flops.total)
    if CUDA:
        metrics["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        static = _tensor_bytes([*model.parameters(), *model.buffers(), imgs, noise,
                                *(v for s in opt.state.values() for v in s.values())])
        try:
            metrics["peak_mem_mb"] = (static + _cpu_step_peak_bytes(step)) / 2**20
        except Exception as e:  # noqa: BLE001 -- a private profiler API; say why the number is missing
            bench_record.row(name, provider, "peak_mem_unavailable", f"{type(e).__name__}: {e}")
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        metrics.update(median_s=median, iqr_s=benchmark.stats.stats.iqr, images_per_s=case.batch / median,
                       tflops=flops.total / median / 1e12,
                       mfu=flops.total / median / ceiling["flops"])
    benchmark.extra_info.update(case=name, provider=provider, device=device_name(), optimizer=f"AdamW ({opt_kind})",
                                dtype="bf16 autocast" if CUDA else "fp32", ceiling=ceiling["label"], **metrics)
    _RESULTS[(name, provider)] = metrics
    _say(request, f"\n[bench] {name} / {provider}: {metrics.get('images_per_s', float('nan')):,.1f} images/s, "
                  f"peak {metrics.get('peak_mem_mb', float('nan')):,.0f} MB, first step {first_step_s:.1f} s, "
                  f"{bench_record.seconds_left():.0f} s of budget left")
    del model, opt, step
    _cleanup(compiled)


@pytest.mark.parametrize("case_name", [c.name for c in CPU_CASES + QUICK_CASES])
def test_step_interleaved(case_name, bench_record, bench_quick):
    """CPU only: the eager providers of a case measured round-robin, one step each per round, so that
    the load of a shared box hits all of them alike; rows images_per_s_interleaved / median_s_interleaved.
    (The per-provider medians of test_step run one provider after another: a load change between
    them moves their ratio.)"""
    if CUDA:
        pytest.skip("CPU only: a GPU run has the device to itself; test_step's medians are the measurement")
    cases = {c.name: c for c, _ in _selected(bench_quick)}
    if case_name not in cases:
        pytest.skip(f"{case_name} is not selected in this mode")
    case = cases[case_name]
    steps = {}
    for provider in PROVIDERS[case.api]:
        if compile_mode(provider) is not None:
            continue
        try:
            steps[provider] = _make_step(case, provider)[3]
            steps[provider]()
        except PeerUnavailable as e:
            print(f"\n[bench] interleaved {case_name}: {provider} left out ({e})")
        except Exception as e:  # noqa: BLE001 -- a failing peer is left out (test_step records why)
            if provider in OURS or provider == "reference":
                raise
            steps.pop(provider, None)
            print(f"\n[bench] interleaved {case_name}: {provider} left out ({type(e).__name__})")
    warmup, rounds = _rounds(bench_quick)
    times = {p: [] for p in steps}
    for r in range(warmup + rounds):
        order = list(steps)
        order = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first
        for p in order:
            t = time.perf_counter()
            steps[p]()
            if r >= warmup:
                times[p].append(time.perf_counter() - t)
    for p, ts in times.items():
        med = _median(ts)
        bench_record.row(case_name, p, "median_s_interleaved", med)
        bench_record.row(case_name, p, "images_per_s_interleaved", case.batch / med)
        _RESULTS.setdefault((case_name, p), {})["images_per_s_interleaved"] = case.batch / med
    steps.clear()
    _cleanup(False)
