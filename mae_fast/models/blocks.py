"""Transformer building blocks on F.scaled_dot_product_attention (flash / cuDNN on CUDA), or on
mae_fast's own attention kernels (mae_fast.ops.attention) with set_attention_backend("triton").

The fused qkv projection is viewed as (B, N, 3, heads, d) and permuted, never copied: SDPA takes
q, k, v with a unit last stride, and the flash kernel's output transposes back to (B, N, D) as a
view.

Stacks of pre-norm blocks, of either API, run through one residual-stream runner, `run_prenorm`.
With set_fused_add_norm(True), every residual add is fused with the LayerNorm that reads its result
(mae_fast.ops.add_layer_norm), one memory pass instead of add, norm and autocast's cast. The
state-dict keys stay timm's. With `checkpoint=True` the runner checkpoints the activations of each block
(torch.utils.checkpoint): a block keeps only its input for backward and recomputes the rest there.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as mm
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..ops._common import load_kernels, triton_kernels
from ..ops.add_layer_norm import add_layer_norm
from ..ops.attention import kernels_for as _attention_kernels
from ..ops.attention import attention as fused_attention

ATTENTION_BACKENDS = ("sdpa", "triton")


def _check_backend(name, source: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, ATTENTION_BACKENDS))}, got {name!r}")
    return name


def _set(name: str) -> str:
    if name == "triton":  # import the kernels now: under torch.compile attend may not import them
        load_kernels("attention")
    return name


def _check_flag(value: str, source: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"{source} must be '0' or '1', got {value!r}")
    return value == "1"


def _from_env(var: str, default: str, parse):
    """(setting, None), or (None, the error) for a bad value. The error is raised where the setting
    is used, so that `import mae_fast`, `mae-fast --help` and `python -m mae_fast.info` still work."""
    try:
        return parse(os.environ.get(var, default), var), None
    except ValueError as e:
        return None, str(e)


_attention_backend, _attention_env_error = _from_env("MAE_FAST_ATTENTION", "sdpa",
                                                     lambda v, var: _set(_check_backend(v, var)))
_fused_add_norm, _fused_add_norm_env_error = _from_env("MAE_FAST_FUSED_ADD_NORM", "0", _check_flag)


def set_fused_add_norm(enabled: bool) -> None:
    """Whether eager blocks fuse each residual add with the LayerNorm after it (one Triton kernel,
    mae_fast.ops.add_layer_norm, where it runs: CUDA, or the Triton interpreter). Off by default:
    eager ViT steps are host-bound, and the fused op's Python autograd.Function and Triton launch
    cost more host time than torch's add and layer_norm; it saves GPU time, so turn it on where the
    GPU is the bottleneck (docs/benchmarks.md has the measurements). Under torch.compile it never
    runs: inductor fuses add and norm itself. MAE_FAST_FUSED_ADD_NORM=1 sets the initial
    value. Global, read at each call."""
    global _fused_add_norm, _fused_add_norm_env_error
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _fused_add_norm, _fused_add_norm_env_error = enabled, None


def fused_add_norm() -> bool:
    if _fused_add_norm_env_error:
        raise ValueError(_fused_add_norm_env_error)
    return _fused_add_norm


def set_attention_backend(name: str) -> None:
    """Which attention the blocks run: "sdpa" (the default: F.scaled_dot_product_attention, cuDNN or
    flash on CUDA) or "triton" (mae_fast.ops.attention: no head split/merge copies in either
    direction; where its kernels run, i.e. CUDA or the Triton interpreter, without dropout; SDPA
    elsewhere). The environment variable MAE_FAST_ATTENTION sets the initial value. Global, read
    at each call (torch.compile guards on it and recompiles after a change)."""
    global _attention_backend, _attention_env_error
    _attention_backend, _attention_env_error = _set(_check_backend(name, "name")), None


def attention_backend() -> str:
    if _attention_env_error:
        raise ValueError(_attention_env_error)
    return _attention_backend


class _SplitHeads(torch.autograd.Function):
    """The views of split_heads, with a backward that writes the three head gradients straight into
    one (B, N, 3, heads, d) buffer: one pass. Autograd's own backward of the three selects
    zero-fills a full-size gradient per select, sums the three and then makes the permuted sum
    contiguous for the qkv Linear: several times the memory traffic. Bitwise the same gradient."""

    @staticmethod
    def forward(ctx, qkv, heads):
        return _head_views(qkv, heads)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        B, H, N, d = gq.shape
        grad = gq.new_empty(B, N, 3, H, d)
        for i, g in enumerate((gq, gk, gv)):
            grad[:, :, i].copy_(g.transpose(1, 2))
        return grad.view(B, N, 3 * H * d), None


def _head_views(qkv: torch.Tensor, heads: int):
    B, N, three_inner = qkv.shape
    x = qkv.view(B, N, 3, heads, three_inner // (3 * heads)).permute(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]


def split_heads(qkv: torch.Tensor, heads: int):
    """(B, N, 3 * heads * d) -> three (B, heads, N, d) views. Under torch.compile the plain views:
    inductor fuses their backward itself, and dynamo cannot lift the symbolic sizes of dynamic
    shapes into an autograd.Function."""
    if torch.compiler.is_compiling():
        return _head_views(qkv, heads)
    return _SplitHeads.apply(qkv, heads)


def attend(qkv: torch.Tensor, heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head self-attention of a fused qkv projection: (B, N, 3*inner) -> (B, N, inner)."""
    if attention_backend() == "triton" and not dropout_p and _attention_kernels(qkv, heads) is not None:
        return fused_attention(qkv, heads)
    return attend_sdpa(qkv, heads, dropout_p)


def attend_sdpa(qkv: torch.Tensor, heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    """attend on F.scaled_dot_product_attention, whatever the backend setting."""
    q, k, v = split_heads(qkv, heads)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    B, _, N, d = out.shape
    return out.transpose(1, 2).reshape(B, N, heads * d)


def attention_probs(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The attention probabilities of a fused qkv projection, (B, heads, N, N) in float32, by an
    explicit softmax(q k^T / sqrt(d)): for looking at, never on the training path (which runs
    SDPA or the fused kernels and never forms this matrix)."""
    q, k, _ = _head_views(qkv, heads)
    scores = q.float() @ k.float().transpose(-2, -1)
    return (scores * q.shape[-1] ** -0.5).softmax(dim=-1)


class Attention(nn.Module):
    """timm's Attention (qkv, proj keys) on SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(attend(self.qkv(x), self.num_heads))

    def attention_map(self, x):
        """The attention probabilities (B, heads, N, N) of normed tokens x (attention_probs)."""
        return attention_probs(self.qkv(x), self.num_heads)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm ViT block (the official MAE's), with the same state-dict keys."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def sublayers(self):
        """(norm, f) pairs of the residual stream: x + attn(norm1(x)), then x + mlp(norm2(x))."""
        return (self.norm1, self.attn), (self.norm2, self.mlp)

    def forward(self, x):
        return run_prenorm(x, self.sublayers())


def has_hooks(m: nn.Module) -> bool:
    """Whether calling m runs more than m.forward: its own or global module hooks (FSDP's unshard,
    a feature extractor's tap, a full backward hook)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or mm._global_forward_hooks or mm._global_forward_pre_hooks or mm._global_backward_hooks
                or mm._global_backward_pre_hooks)


def _fuses(x: torch.Tensor, norm: nn.Module) -> bool:
    """The fused add + LayerNorm runs when set_fused_add_norm(True), where it is a Triton kernel
    (CUDA; CPU under the interpreter), and not while torch.compile traces: inductor fuses add and
    norm itself, with their neighbours. A norm with hooks is called as a module, so its hooks run."""
    return (fused_add_norm() and type(norm) is nn.LayerNorm and norm.weight is not None
            and len(norm.normalized_shape) == 1 and not has_hooks(norm) and not torch.compiler.is_compiling()
            and triton_kernels("add_layer_norm", x) is not None)


def add_norm(x: torch.Tensor, delta, norm: nn.Module, feeds_linear: bool = True):
    """(x + delta, norm(x + delta)); delta None: (x, norm(x)). With feeds_linear, under autocast the
    normed output comes in the autocast dtype, the cast the next Linear would make anyway."""
    if delta is None or not _fuses(x, norm):
        x = x if delta is None else x + delta
        return x, norm(x)
    out_dtype = None
    if feeds_linear and torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    return add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps, out_dtype=out_dtype)


def run_prenorm(x: torch.Tensor, sublayers, final_norm: nn.Module = None) -> torch.Tensor:
    """The residual stream of pre-norm sublayers: for each (norm, f) in turn, x = x + f(norm(x));
    then final_norm (if given). Each residual add is computed together with the norm that reads
    its result (add_norm), across blocks too, so it can be fused."""
    pending = None  # the last sublayer's output, not yet added to x
    for norm, f in sublayers:
        x, h = add_norm(x, pending, norm)
        pending = f(h)
    if final_norm is not None:
        return add_norm(x, pending, final_norm, feeds_linear=False)[1]
    return x if pending is None else x + pending


def run_checkpointed(blocks, x: torch.Tensor, final_norm: nn.Module = None) -> torch.Tensor:
    """x through each of blocks (callables x -> x) with its activations checkpointed, then final_norm
    (if given). Non-reentrant torch.utils.checkpoint: it traces under torch.compile, and the
    recomputation replays the forward's RNG state (dropout). Without autograd, a plain loop."""
    for blk in blocks:
        x = _checkpoint(blk, x, use_reentrant=False) if torch.is_grad_enabled() else blk(x)
    return x if final_norm is None else final_norm(x)


def run_blocks(blocks, x: torch.Tensor, final_norm: nn.Module = None, *, checkpoint: bool = False) -> torch.Tensor:
    """x through pre-norm Blocks, then final_norm (if given), as `blk(x)` in turn computes. Blocks
    that are wrapped (activation checkpointing), hooked (FSDP) or given their own forward are called
    as modules, and fuse inside themselves only. checkpoint=True: activation checkpointing of each
    block (run_checkpointed); residual adds then fuse within a block only."""
    if checkpoint:
        return run_checkpointed(blocks, x, final_norm)
    if all(type(blk) is Block and not has_hooks(blk) and "forward" not in vars(blk) for blk in blocks):
        return run_prenorm(x, (pair for blk in blocks for pair in blk.sublayers()), final_norm)
    for blk in blocks:
        x = blk(x)
    return x if final_norm is None else final_norm(x)


def check_images(imgs, name: str, channels: int, fits, expected: str, uint8: bool = False) -> None:
    """The models' input check: a floating (B, channels, H, W) tensor whose (H, W) `fits` (or, with
    uint8=True, a uint8 one: 8-bit pixels the model normalises itself); the error says the argument
    `name` must be `expected`."""
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or imgs.shape[1] != channels or not fits(*imgs.shape[2:]):
        got = tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__
        raise ValueError(f"{name} must be {expected}; got {got}")
    if not imgs.is_floating_point() and not (uint8 and imgs.dtype == torch.uint8):
        raise TypeError(f"{name} must be a floating-point tensor{' or uint8 pixels' if uint8 else ''}, "
                        f"got {imgs.dtype}")
