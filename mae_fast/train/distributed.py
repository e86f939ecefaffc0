"""Processes and devices: torchrun's environment, the device flag, and the per-step all_reduce."""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist


def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return rank, world, local


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


def reduce_step(loss: torch.Tensor, signum: int, world: int) -> tuple[float, int]:
    """The mean loss over the processes and the signal that stops the run (0: none; SIGTERM when
    ranks heard different ones), in one all_reduce: every rank then stops at the same step (a rank
    leaving alone would hang the others) and exits with the same status."""
    if world == 1:
        return loss.item(), int(signum)
    flags = [float(signum == signal.SIGINT), float(signum == signal.SIGTERM)]
    both = torch.cat([loss.float().reshape(1), torch.tensor(flags, device=loss.device)])
    dist.all_reduce(both)
    mean_loss, sigint, sigterm = both.tolist()
    return mean_loss / world, int(signal.SIGTERM if sigterm > 0 else signal.SIGINT if sigint > 0 else 0)
