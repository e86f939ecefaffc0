"""The training-step harness: the cases, the providers (mae_fast and its peers) and the step
builder that the step benchmark (test_bench_step.py) and the profilers (profile_step.py,
host_overhead.py) share, so that all of them run the same step.

A step is forward + backward + AdamW step of one provider on one case, on identical weights and
noise for every provider of a case.

Providers:
  mae_fast             the fast model as the training CLI runs it (official: return_pred=False)
  mae_fast_pred        official API only: the drop-in call forward(imgs, ratio, noise) -> (loss, pred, mask)
  mae_fast_compiled    torch.compile(mae_fast model)
  mae_fast_graphed     CUDA only: torch.compile(mae_fast model, mode="reduce-overhead"), i.e. with CUDA
                       graphs; last of the default providers, so a tight time budget drops it first
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
  vit_pytorch          vit_pytorch.MAE(encoder=vit_pytorch.ViT) with the same weights -- vit-pytorch
                       API only; it draws its own noise (no noise argument), which changes no cost

Cases. CUDA: ViT-B/16 and ViT-L/16 (official API) at 224x224, mask 0.75, batch 256 (ViT-L 128),
and a ViT-B-sized vit-pytorch-API model, under bf16 autocast, fused AdamW. CPU: the `tiny` preset
(32x32, patch 4) and a vit-pytorch-API model of the same size, batch 64, fp32. Quick mode: depth-1
models, batch 8. MAE_FAST_BENCH_CASES and MAE_FAST_BENCH_PROVIDERS (comma-separated) select; named
providers are measured in the order named (the opt-in ones included), an unknown name raises.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
from dataclasses import dataclass

import torch

import mae_fast
from mae_fast.testing import reference as R

from benchmarks.common import CUDA, DEVICE
from benchmarks.flops import official_step_flops, vit_pytorch_step_flops

OFFICIAL, VIT_PYTORCH = "official", "vit-pytorch"  # the two APIs


@dataclass(frozen=True)
class Case:
    name: str
    api: str          # OFFICIAL | VIT_PYTORCH
    batch: int
    img: int
    patch: int
    dim: int
    depth: int
    heads: int
    dec_dim: int
    dec_depth: int
    dec_heads: int
    dim_head: int = 64      # vit-pytorch API
    dec_dim_head: int = 64  # vit-pytorch API
    mask_ratio: float = 0.75

    @property
    def num_patches(self) -> int:
        return (self.img // self.patch) ** 2


def official_case(name, batch, img, patch, dim, depth, heads, dec_dim=512, dec_depth=8, dec_heads=16):
    return Case(name, OFFICIAL, batch, img, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads)


def vit_pytorch_case(name, batch, img, patch, dim, depth, heads, dim_head, dec_dim, dec_depth, dec_heads,
                     dec_dim_head):
    return Case(name, VIT_PYTORCH, batch, img, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, dim_head,
                dec_dim_head)


GPU_CASES = [
    official_case("official-vit_b16", 256, 224, 16, 768, 12, 12),
    official_case("official-vit_l16", 128, 224, 16, 1024, 24, 16),
    # ViT-B size: the same encoder, the official decoder (512 wide, 8 deep, 16 heads of 32)
    vit_pytorch_case("vit_pytorch-vit_b16", 256, 224, 16, 768, 12, 12, 64, 512, 8, 16, 32),
]
CPU_CASES = [  # the `tiny` preset of mae_fast.models.presets, and a vit-pytorch-API model of its size
    official_case("official-tiny", 64, 32, 4, 96, 4, 3, 64, 2, 2),
    vit_pytorch_case("vit_pytorch-tiny", 64, 32, 4, 96, 4, 3, 32, 64, 2, 2, 32),
]
QUICK_CASES = [
    official_case("official-micro", 8, 32, 8, 64, 1, 2, 32, 1, 2),
    vit_pytorch_case("vit_pytorch-micro", 8, 32, 8, 64, 1, 2, 32, 32, 1, 2, 16),
]
ALL_CASES = {c.name: c for c in GPU_CASES + CPU_CASES + QUICK_CASES}

PROVIDERS = {
    OFFICIAL: ["mae_fast", "mae_fast_pred", "reference", "hf", "mae_fast_compiled", "reference_compiled"]
    + (["mae_fast_graphed"] if CUDA else []),
    VIT_PYTORCH: ["mae_fast", "reference", "vit_pytorch", "mae_fast_compiled", "reference_compiled"],
}
CUDA_ONLY = {OFFICIAL: ["mae_fast_graphed"], VIT_PYTORCH: []}  # in PROVIDERS where CUDA is
TRITON_ATTN = "_triton_attn"  # provider infix: the blocks on mae_fast.ops.attention
OPT_IN = {OFFICIAL: [f"mae_fast{TRITON_ATTN}{sfx}" for sfx in ("", "_compiled", "_graphed", "_fused")]
          + ["mae_fast_fused"], VIT_PYTORCH: []}
OURS = ("mae_fast", "mae_fast_pred", "mae_fast_compiled", "mae_fast_graphed", *OPT_IN[OFFICIAL])
COMPILE_MODES = {"_compiled": "default", "_graphed": "reduce-overhead"}  # provider suffix -> torch.compile mode
QUICK_COMPILED = ("official-micro", "mae_fast_compiled")  # the one compile quick mode pays for


def compile_mode(provider: str):
    """The torch.compile mode of a provider, None for an eager one."""
    return next((mode for suffix, mode in COMPILE_MODES.items() if provider.endswith(suffix)), None)


def providers_of(api: str, cuda: bool | None = None) -> list[str]:
    """The providers an API runs by default on CUDA (cuda=True) or a CPU (False; default: this machine)."""
    cuda = CUDA if cuda is None else cuda
    names = [p for p in PROVIDERS[api] if cuda or p not in CUDA_ONLY[api]]
    return names + [p for p in CUDA_ONLY[api] if cuda and p not in names]


def known_providers() -> set[str]:
    """Every provider name, whatever the device."""
    return {p for api in PROVIDERS for p in PROVIDERS[api] + CUDA_ONLY[api] + OPT_IN[api]}


def _names(value: str | None, var: str) -> list[str]:
    value = os.environ.get(var, "") if value is None else value
    return list(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))


def selected(quick: bool, cuda: bool | None = None, cases: str | None = None, providers: str | None = None):
    """[(case, provider)] to measure, in the order to measure them, on CUDA or a CPU (default: this
    machine). cases / providers: comma-separated names, default MAE_FAST_BENCH_CASES /
    MAE_FAST_BENCH_PROVIDERS; named providers are measured in the order named. An unknown name raises."""
    cuda = CUDA if cuda is None else cuda
    only = _names(cases, "MAE_FAST_BENCH_CASES")
    named = _names(providers, "MAE_FAST_BENCH_PROVIDERS")
    known = known_providers()
    if set(named) - known:  # a typo would silently drop a provider from a GPU run
        raise ValueError(f"MAE_FAST_BENCH_PROVIDERS: unknown {sorted(set(named) - known)}; known: {sorted(known)}")
    if set(only) - set(ALL_CASES):
        raise ValueError(f"MAE_FAST_BENCH_CASES: unknown {sorted(set(only) - set(ALL_CASES))}; "
                         f"known: {sorted(ALL_CASES)}")
    cases = QUICK_CASES if quick else (GPU_CASES if cuda else CPU_CASES)
    if only:
        cases = [c for c in cases if c.name in only]
    pairs = []
    for c in cases:
        default = providers_of(c.api, cuda)
        allowed = default + OPT_IN[c.api]
        pairs += [(c, p) for p in (named or default) if p in allowed]

    # the first case whole, CUDA graphs included, then the eager providers of the other cases, then
    # their (slow to compile) compiled ones, their graphs last: under a time budget the tail that
    # gets skipped is the compiled providers of the last cases
    def order(cp):
        case, provider = cp
        if case is cases[0]:
            return 0
        return 1 + (compile_mode(provider) is not None) + provider.endswith("_graphed")
    return sorted(pairs, key=order)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ----------------------------------------------------------------------------- models

_STATE: dict[str, dict] = {}  # the initial weights of the current case (one case kept at a time)


def official_kwargs(c: Case) -> dict:
    return dict(img_size=c.img, patch_size=c.patch, in_chans=3, embed_dim=c.dim, depth=c.depth, num_heads=c.heads,
                decoder_embed_dim=c.dec_dim, decoder_depth=c.dec_depth, decoder_num_heads=c.dec_heads, mlp_ratio=4.0,
                norm_pix_loss=True)


def vit_pytorch_model(lib, c: Case):
    """MAE(encoder=ViT(...)) of the case from `lib`: mae_fast, the reference or vit_pytorch."""
    enc = lib.ViT(image_size=c.img, patch_size=c.patch, num_classes=0, dim=c.dim, depth=c.depth, heads=c.heads,
                  mlp_dim=4 * c.dim, dim_head=c.dim_head, pool="mean", channels=3)
    return lib.MAE(encoder=enc, decoder_dim=c.dec_dim, masking_ratio=c.mask_ratio, decoder_depth=c.dec_depth,
                   decoder_heads=c.dec_heads, decoder_dim_head=c.dec_dim_head)


def fast_model(c: Case):
    return mae_fast.MaskedAutoencoderViT(**official_kwargs(c)) if c.api == OFFICIAL else vit_pytorch_model(mae_fast, c)


def initial_state(c: Case) -> dict:
    if c.name not in _STATE:
        _STATE.clear()
        gc.collect()
        torch.manual_seed(0)
        with torch.device(DEVICE):  # initialised where it runs (ViT-L on a CPU takes seconds), kept
            # on the host so that it is not part of any provider's peak device memory
            _STATE[c.name] = {k: v.detach().to("cpu", copy=True) for k, v in fast_model(c).state_dict().items()}
    return _STATE[c.name]


def inputs(c: Case):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    imgs = torch.randn(c.batch, 3, c.img, c.img, device=DEVICE, generator=g)
    noise = torch.rand(c.batch, c.num_patches, device=DEVICE, generator=g)
    return imgs, noise


class PeerUnavailable(Exception):
    pass


def build(c: Case, provider: str):
    """(module whose parameters train, loss function of (imgs, noise), model FLOPs of one step)."""
    mode = compile_mode(provider)
    base = next((provider.removesuffix(sfx) for sfx in COMPILE_MODES if provider.endswith(sfx)), provider)
    base = base.replace(TRITON_ATTN, "").removesuffix("_fused")
    state = initial_state(c)
    with torch.device(DEVICE):
        if c.api == OFFICIAL:
            if base in ("mae_fast", "mae_fast_pred", "hf"):
                model = mae_fast.MaskedAutoencoderViT(**official_kwargs(c))
            else:
                model = R.MaskedAutoencoderViT(**official_kwargs(c))
        elif base == "vit_pytorch":
            try:
                import vit_pytorch
            except ImportError as e:
                raise PeerUnavailable(f"vit-pytorch is not installed ({e})") from None
            model = vit_pytorch_model(vit_pytorch, c)
        else:
            model = vit_pytorch_model(mae_fast if base == "mae_fast" else R, c)
    model.load_state_dict(state)
    model.train()
    flops_model = model
    if base == "hf":
        try:
            importlib.import_module("transformers")
        except ImportError as e:
            raise PeerUnavailable(f"transformers is not installed ({e})") from None
        from mae_fast.io.hf import to_hf

        with torch.device(DEVICE):  # the HF model initialises where it runs, then takes our weights
            model = to_hf(model, attn_implementation="sdpa").to(DEVICE).train()
    net = torch.compile(model, mode=mode) if mode else model
    ratio = c.mask_ratio
    if c.api == OFFICIAL:
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
        flops = vit_pytorch_step_flops(flops_model, c.batch)
        if base == "vit_pytorch":
            def loss_fn(imgs, noise):
                return net(imgs)
        else:
            def loss_fn(imgs, noise):
                return net(imgs, noise)
    return model, loss_fn, flops


def adamw(model, batch):
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


def amp():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()


def make_step(case: Case, provider: str):
    """(model, optimizer, its kind, step(), FLOPs); step.inputs = (imgs, noise)."""
    model, loss_fn, flops = build(case, provider)
    opt, opt_kind = adamw(model, case.batch)
    imgs, noise = inputs(case)
    # set per step, whatever MAE_FAST_ATTENTION / MAE_FAST_FUSED_ADD_NORM say
    attention = "triton" if TRITON_ATTN in provider else "sdpa"
    fused = provider.endswith("_fused")

    def step():
        before = mae_fast.attention_backend(), mae_fast.fused_add_norm()
        mae_fast.set_attention_backend(attention)
        mae_fast.set_fused_add_norm(fused)
        try:
            with amp():
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


def cleanup(compiled: bool):
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if CUDA:
        torch.cuda.empty_cache()


def ops_path() -> str:
    """Which implementation mae_fast's ops run on this device: on CUDA a broken install (no
    mae_fast.kernels, no _C) silently runs the PyTorch fallbacks, and its numbers are then not
    mae_fast's kernels. Recorded with every mae_fast row (metric ops_path) and flagged by report.py."""
    from mae_fast.info import missing_cuda_kernels

    if not CUDA:
        return "cpu"
    missing = missing_cuda_kernels()
    return f"PyTorch fallbacks: no {', '.join(missing)}" if missing else "compiled kernels"
