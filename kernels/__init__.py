"""Triton kernels (installed as mae_fast.kernels): @triton.jit kernels and their launchers only.

Tensors in, tensors out; validation, autograd and dispatch live in mae_fast/ops/."""
import functools

import torch

NORM_PIX_EPS = 1e-6  # the official norm_pix_loss: (t - mean) / sqrt(var + 1e-6)


def on_tensor_device(launcher):
    """Runs a launcher on the device of its first tensor argument. Triton launches on the current
    CUDA device and its stream, which need not be the tensors' (a model on cuda:1 with cuda:0
    current); torch's own ops switch devices the same way."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        for t in args:  # the first tensor (a loop: a generator costs microseconds per launch)
            if isinstance(t, torch.Tensor):
                break
        if t.is_cuda and t.get_device() != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)
    return run


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints, as triton.cdiv, without the argument unwrapping that wraps triton's on
    every call: the launchers run on the host for every launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (as triton.next_power_of_2, without its wrapper)."""
    return 1 << (n - 1).bit_length()


def fits_int32(t) -> bool:
    """Whether every element's offset inside one batch sample of t is below 2**31: the kernels
    index inside a sample in 32 bits (only the batch offset is 64-bit), which a batch-innermost
    layout (a sequence-first tensor transposed) passes at large batches."""
    if t.numel() < 2**31 and t.is_contiguous():  # the common case, without the sum over strides
        return True
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) < 2**31


def within_int32(t):
    """t, or a contiguous copy where it does not fit_int32."""
    return t if fits_int32(t) else t.contiguous()
