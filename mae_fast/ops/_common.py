"""What the ops share: dispatch to the compiled extension and the Triton kernels, dtype sets,
constants and argument checks.

Dispatch: CUDA tensors run the Triton kernels (mae_fast.kernels) and the extension's CUDA kernels;
CPU tensors run the extension's C++ kernels, and for the Triton ops the very same Triton kernels
when TRITON_INTERPRET was on (1, true, yes, on or y, as Triton reads it) before import, a vectorised
PyTorch fallback otherwise. float64 always takes the fallback (exact, used by gradcheck), and so do
CPU calls that involve bfloat16, which the interpreter computes wrongly. Nothing here initialises
CUDA, and a missing extension or Triton only means fallbacks: `python -m mae_fast.info` says why.

Checks look at shapes, dtypes and devices only (no tensor values), so torch.compile traces them
without graph breaks; every error names the argument and what it must be.
"""
from __future__ import annotations

import importlib
import json
import operator
import os
from typing import Optional

import torch
from torch import Tensor

from mae_fast.kernels import NORM_PIX_EPS  # noqa: F401 -- the official norm_pix_loss eps, shared with the kernels

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT_NAMES = "float32, float16, bfloat16 or float64"
INDEX_DTYPES = (torch.int32, torch.int64)

# Device types whose index and mask values every call checks: reading them there is no sync. Other
# devices check only with validate=True (a host sync on CUDA).
VALUE_CHECKED_DEVICES = frozenset({"cpu"})


def checks_values(t: Tensor, validate: bool) -> bool:
    """Whether a call with tensor t checks index or mask values (see VALUE_CHECKED_DEVICES)."""
    return validate or t.device.type in VALUE_CHECKED_DEVICES

# ----------------------------------------------------------------------------- the compiled extension

_BUILD_INFO = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_build_info.json")


def build_info() -> dict:
    """What setup.py recorded: mode, backends, cuda_archs, torch, reason."""
    try:
        with open(_BUILD_INFO) as f:
            return json.load(f)
    except OSError:
        return {"mode": "unknown", "backends": [], "cuda_archs": "",
                "reason": "no build record (package not installed through setup.py)"}


def _load_extension():
    """Imports mae_fast._C, which registers its C++/CUDA kernels (loading it initialises no CUDA)."""
    try:
        importlib.import_module("mae_fast._C")
        return True, ""
    except ImportError as e:
        info = build_info()
        reason = info.get("reason") or "extension not built"
        if info.get("backends"):  # it was built but cannot be loaded here
            reason = f"built for torch {info.get('torch')} but failed to load: {e}"
        return False, reason


EXTENSION_AVAILABLE, EXTENSION_UNAVAILABLE_REASON = _load_extension()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the extension registered a kernel for mae_fast::<op> on 'cpu' or 'cuda'."""
    if not EXTENSION_AVAILABLE:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mae_fast::{op}", key)


# ----------------------------------------------------------------------------- the Triton kernels

_KERNEL_MODULES: dict = {}


def load_kernels(name: str):
    """mae_fast.kernels.<name>, imported on first use; None when Triton is unavailable."""
    if name not in _KERNEL_MODULES:
        try:
            _KERNEL_MODULES[name] = importlib.import_module(f"mae_fast.kernels.{name}")
        except ImportError:
            _KERNEL_MODULES[name] = None
    return _KERNEL_MODULES[name]


def is_interpreted(mod) -> bool:
    """Whether a kernel module's kernels were decorated under TRITON_INTERPRET (on)."""
    kernel = next(v for k, v in vars(mod).items() if k.endswith("_kernel"))
    return type(kernel).__name__ == "InterpretedFunction"


# The values of TRITON_INTERPRET that Triton reads as on (triton.knobs, any case); any other is off.
TRITON_ON = ("1", "true", "yes", "on", "y")

# Dtypes the interpreter computes wrongly, without a word: its bfloat16 tl.dot and arithmetic are not
# bfloat16's, and it rounds fp32 -> bfloat16 by truncation. CPU calls with them take the fallback.
INTERPRETER_WRONG = (torch.bfloat16,)


def interpreter_on() -> bool:
    """Whether TRITON_INTERPRET is on, read as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in TRITON_ON


def interpreted_wrongly(t: Tensor, *also) -> bool:
    """Whether the interpreter would run a kernel for CPU tensor t and get a dtype of t or of `also`
    (tensors or dtypes the kernel reads or writes; None skipped) wrong."""
    if t.device.type != "cpu" or not interpreter_on():
        return False
    dtypes = {t.dtype, *(a.dtype if isinstance(a, Tensor) else a for a in also if a is not None)}
    return not dtypes.isdisjoint(INTERPRETER_WRONG)


def triton_kernels(name: str, t: Tensor, *also):
    """The kernel module to run for tensor t, or None for the PyTorch fallback. also: the op's other
    tensors and result dtypes, which on CPU decide whether the interpreter computes them right."""
    if t.dtype == torch.float64:
        return None
    if t.device.type == "cuda":
        return load_kernels(name)
    if t.device.type == "cpu" and interpreter_on() and not interpreted_wrongly(t, *also):
        mod = load_kernels(name)
        if mod is not None and is_interpreted(mod):
            return mod
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic and accumulation dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Rows whose largest magnitude passes 2**48 are scaled by 2**-80 (a power of two: exact) before
# their sums: unscaled, the squares of values past ~2**64 overflow fp32 to inf and the normalised
# row would come out as 0 or NaN where the exact one is finite. Rows of up to 2**24 values then
# stay below 2**128 throughout; other rows are computed unscaled. kernels/stats.py does the same.
SCALE_ABOVE, SCALE = 2.0 ** 48, 2.0 ** -80


def normalize_rows(x: Tensor, ddof: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) over the last dim of x: y = (x - mean) * rstd, rstd = 1 / sqrt(var + eps),
    var = sum((x - mean)**2) / (n - ddof); two-pass, in x's dtype. mean and rstd keep the last dim
    (size 1). Finite wherever the exact values are: rows past 2**48 are scaled first, and a
    constant row gets y = 0 and rstd = 1 / sqrt(eps) however large its values."""
    big = x.abs().amax(dim=-1, keepdim=True) > SCALE_ABOVE
    s = torch.where(big, SCALE, 1.0).to(x.dtype)
    u = x * s
    mean = u.mean(dim=-1, keepdim=True)
    d = u - mean
    var = (d * d).sum(dim=-1, keepdim=True) / (x.shape[-1] - ddof)
    flat = var == 0  # eps * s * s underflows for a scaled row: 1 / sqrt(eps) is its exact rstd
    r = torch.where(flat, eps, var + eps * s * s).rsqrt()
    return d * r, mean / s, torch.where(flat, r, r * s)


def refuse_double_backward(backward_op: str, what: str) -> None:
    """Registers as the autograd of mae_fast::<backward_op> a refusal naming `what`: the fused
    backward kernels are not differentiable, and without it a gradient of a gradient fails with
    torch's "no autograd formula" (or, past a kernel, is silently disconnected)."""
    def refuse(ctx, *grads):
        raise NotImplementedError(f"double backward of {what} is not supported: its gradient comes from "
                                  "fused kernels that are not differentiable themselves")

    torch.library.register_autograd(f"mae_fast::{backward_op}", refuse, setup_context=_no_context)


def _no_context(ctx, inputs, output) -> None:
    pass


# ----------------------------------------------------------------------------- eager calls

# A custom op's call through torch.library (default filling, alias checks, a Python autograd layer
# and two redispatches per direction) costs more host time than the eager torch ops a fused op
# replaces, and an eager GPU step whose host runs behind its GPU waits on every microsecond of it
# (benchmarks/op_host_overhead.py measures it). So eager calls whose kernels run take an
# autograd.Function that calls the op's implementation, setup_context and backward directly; under
# torch.compile and functorch transforms, and on the fallback paths (where dispatch modes such as
# benchmarks/step_traffic.py see the one op), the custom op runs. Both run the same functions.

_IMPLS: dict = {}  # "<op>" -> the Python implementation of mae_fast::<op>


def eager_impl(name: str):
    """Decorator: fn is the implementation of mae_fast::<name>, which eager backwards call directly."""
    def register(fn):
        _IMPLS[name] = fn
        return fn
    return register


def below_autograd(op):
    """op (an OpOverload) called past its autograd kernel, straight to its CPU or CUDA kernel."""
    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return call


def run_eagerly() -> bool:
    """Whether an op whose kernels run may skip torch.library's dispatch (see above)."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def eager_function(name: str, setup, backward) -> type:
    """mae_fast::<name> as an autograd.Function: its eager_impl, then setup(ctx, inputs, output) and
    backward(ctx, *grads) as registered with torch.library. Backwards call their ops through
    backward_op, which gives them the implementations here."""
    impl = _IMPLS[name]

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup(ctx, inputs, output)
        ctx.eager = True
        return output

    return type(f"{name}_eager", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def backward_op(ctx, name: str):
    """What a backward calls for mae_fast::<name>: in an eager Function its implementation; otherwise,
    and with create_graph=True (grad mode on: the op's own autograd then refuses or takes the
    second backward), the op."""
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
        return _IMPLS[name]
    return getattr(torch.ops.mae_fast, name)


# ----------------------------------------------------------------------------- argument checks

def pair_arg(value, name: str) -> tuple[int, int]:
    """int or (int, int) of positive ints -> (a, b); TypeError / ValueError naming `name`."""
    if type(value) is int and value >= 1:  # the common case, without building tuples to check
        return value, value
    vals = tuple(value) if isinstance(value, (tuple, list, torch.Size)) else (value, value)
    if len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(vals) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return vals


def int_arg(value, name: str) -> int:
    """An int (or an object with __index__), never a bool; TypeError naming `name`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(t, name: str) -> None:
    """A tensor of one of FLOAT_DTYPES."""
    check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be {FLOAT_NAMES}, got {t.dtype}")


def check_floating_point(t, name: str) -> None:
    """check_float, worded for tensors whose dtype follows the input's: float8 and complex tensors
    are floating point to torch, but no kernel or fallback here computes in them."""
    check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor ({FLOAT_NAMES}), got {t.dtype}")


def check_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")


def check_imgs(imgs, patch_size, name: str = "imgs", uint8: bool = False) -> tuple[int, int]:
    """Checks a (B, C, H, W) floating image (or, with uint8=True, a uint8 one) against patch_size;
    returns (ph, pw)."""
    ph, pw = pair_arg(patch_size, "patch_size")
    check_tensor(imgs, name)
    if imgs.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(imgs.shape)}")
    if not uint8:
        check_floating_point(imgs, name)
    elif imgs.dtype not in FLOAT_DTYPES and imgs.dtype != torch.uint8:
        raise TypeError(f"{name} must be a floating-point tensor ({FLOAT_NAMES}) or uint8 (8-bit pixels), "
                        f"got {imgs.dtype}")
    _, _, H, W = imgs.shape
    if H % ph:
        raise ValueError(f"{name} height H={H} must be a multiple of patch_size ph={ph}")
    if W % pw:
        raise ValueError(f"{name} width W={W} must be a multiple of patch_size pw={pw}")
    return ph, pw


def check_norm_pix(norm_pix: bool, P: int) -> None:
    if norm_pix and P < 2:
        raise ValueError(f"norm_pix needs ph*pw*C >= 2 values per patch (unbiased variance), got P={P}")


def check_ids(ids, imgs: Tensor, L: int, name: str = "ids") -> None:
    """Metadata checks of a (B, K) patch-index tensor (its values are checked by check_ids_values)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 or int64, got {type(ids).__name__}")
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {ids.dtype}")
    B = imgs.shape[0]
    if ids.dim() != 2 or ids.shape[0] != B or not 1 <= ids.shape[1] <= L:
        raise ValueError(f"{name} must have shape (B={B}, K) with 1 <= K <= L={L}, got {tuple(ids.shape)}")
    check_device(ids, name, imgs, "imgs")


def check_ids_values(ids: Tensor, L: int, validate: bool, name: str = "ids") -> None:
    """Range check [0, L) and distinct ids per row (the backward needs them distinct). Runs on CPU
    tensors always (no sync there) and on CUDA only when validate=True (it syncs the host)."""
    if not checks_values(ids, validate):
        return
    if ids.numel() and bool(((ids < 0) | (ids >= L)).any()):
        raise ValueError(f"{name} must be patch indices in [0, L={L}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    if ids.numel() and ids.shape[1] > 1:
        s = ids.sort(dim=1).values
        if bool((s[:, 1:] == s[:, :-1]).any()):
            raise ValueError(f"{name} must be distinct within each row (a subset of a permutation)")


def gather_rows(x: Tensor, ids: Tensor) -> Tensor:
    """out[b, k] = x[b, ids[b, k]] (the PyTorch fallbacks' gather)."""
    return torch.gather(x, 1, ids.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------- uint8 images

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official recipe's pixel statistics (of x = u8 / 255)
IMAGENET_STD = (0.229, 0.224, 0.225)

_AFFINES: dict = {}  # (mean, std, device) -> the (2, C) fp32 tensor of pixel_affine


def pixel_stats_arg(values, name: str, channels: int, positive: bool = False) -> tuple[float, ...]:
    """A sequence (or 1-D tensor) of `channels` finite floats (> 0 with positive) -> a tuple; errors
    name the argument. A tensor is read on the host (a sync on CUDA)."""
    if isinstance(values, Tensor) and values.dim() == 1:
        values = values.tolist()
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a sequence of {channels} floats (one per channel), got {values!r}") from None
    if len(vals) != channels:
        raise ValueError(f"{name} must hold one value per channel: {channels}, got {len(vals)} ({values!r})")
    bad = [v for v in vals if v != v or v in (float("inf"), float("-inf")) or (positive and v <= 0)]
    if bad:
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {vals}")
    return vals


def pixel_affine(imgs: Tensor, mean, std) -> Optional[Tensor]:
    """The in-kernel normalisation of uint8 images: a (2, C) fp32 tensor on imgs' device, rows
    scale = 1 / (255 std) and shift = -mean / std, so that u8 * scale + shift = (u8 / 255 - mean) / std
    (mean and std default to ImageNet's). None for float images, which are taken as normalised:
    mean or std with them is an error. Cached per (mean, std, device) outside torch.compile: the
    common call costs a dict lookup and no host-to-device copy."""
    if imgs.dtype != torch.uint8:
        if mean is not None or std is not None:
            raise ValueError(f"mean and std apply to uint8 images only; float images ({imgs.dtype}) are taken "
                             "as normalised already: normalise them yourself, or pass the uint8 pixels")
        return None
    C = imgs.shape[1]
    mean = IMAGENET_MEAN if mean is None else mean
    std = IMAGENET_STD if std is None else std
    if type(mean) is not tuple or type(std) is not tuple:  # lists, tensors: tuples of floats (a cache key)
        mean, std = pixel_stats_arg(mean, "mean", C), pixel_stats_arg(std, "std", C, positive=True)
    if torch.compiler.is_compiling():  # a constant of the graph
        return _affine_tensor(mean, std, C, imgs.device)
    key = (mean, std, imgs.device)
    affine = _AFFINES.get(key)
    if affine is None:
        affine = _AFFINES[key] = _affine_tensor(mean, std, C, imgs.device)
    elif affine.shape[1] != C:
        _affine_tensor(mean, std, C, imgs.device)  # raises, naming the argument
    return affine


def _affine_tensor(mean, std, C: int, device) -> Tensor:
    mean, std = pixel_stats_arg(mean, "mean", C), pixel_stats_arg(std, "std", C, positive=True)
    return torch.tensor([[1.0 / (255.0 * s) for s in std], [-m / s for m, s in zip(mean, std)]],
                        dtype=torch.float32, device=device)


def affine_rows_torch(rows: Tensor, affine: Optional[Tensor], ph: int, pw: int) -> Tensor:
    """rows (..., P) of (p, q, c)-ordered pixels, normalised with pixel_affine's (2, C) tensor in
    rows' (float) dtype: the fallbacks' copy of the kernels' arithmetic. rows itself if affine is None."""
    if affine is None:
        return rows
    a = affine.to(rows.dtype).repeat(1, ph * pw)  # feature f = (p * pw + q) * C + c has channel f % C
    return torch.addcmul(a[1], rows, a[0])
