"""Processes and devices: torchrun's environment, the device flag, and the per-step all_reduce."""
from __future__ import annotations

import os

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


def reduce_step(loss: torch.Tensor, signalled: bool, world: int) -> tuple[float, bool]:
    """The mean loss over the processes and whether any of them was signalled, in one all_reduce:
    every rank then stops at the same step (a rank leaving alone would hang the others)."""
    if world == 1:
        return loss.item(), signalled
    both = torch.stack([loss.float(), torch.tensor(float(signalled), device=loss.device)])
    dist.all_reduce(both)
    mean_loss, flags = both.tolist()
    return mean_loss / world, flags > 0
