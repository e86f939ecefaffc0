"""Per-channel normalisation. The pipeline hands out uint8 images (float32 in [0, 1] for 16-bit
data); they are normalised on the device they train on, so the host never makes (nor copies) a
float image of 8-bit data."""
from __future__ import annotations

from typing import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official recipe's statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalize_batch(imgs: torch.Tensor, mean: Sequence[float] | torch.Tensor = IMAGENET_MEAN,
                    std: Sequence[float] | torch.Tensor = IMAGENET_STD) -> torch.Tensor:
    """Images (B, C, H, W) -> float32 (x - mean) / std, on the images' device, with x in [0, 1]:
    uint8 images divided by 255, float32 images (16-bit data) taken as they are. mean and std hold
    C values (statistics of x); pass them as tensors already on that device to avoid a copy per call."""
    if imgs.dim() != 4 or imgs.dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"normalize_batch: expected uint8 or float32 images (B, C, H, W), got {imgs.dtype} "
                         f"{tuple(imgs.shape)}")
    mean = torch.as_tensor(mean, dtype=torch.float32, device=imgs.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=imgs.device).view(-1, 1, 1)
    if mean.shape[0] != imgs.shape[1] or std.shape[0] != imgs.shape[1]:
        raise ValueError(f"normalize_batch: mean and std need one value per channel ({imgs.shape[1]}), "
                         f"got {mean.shape[0]} and {std.shape[0]}")
    if imgs.dtype == torch.uint8:
        return imgs.float().div_(255.0).sub_(mean).div_(std)  # one float allocation
    return (imgs - mean).div_(std)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (..., 3, H, W) -> ImageNet-normalised."""
    return (img - MEAN.to(img.device)) / STD.to(img.device)


def denormalize(img: torch.Tensor, mean: Sequence[float] | torch.Tensor | None = None,
                std: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of normalize (of normalize_batch with mean and std), clamped to [0, 1] (for pictures)."""
    mean = MEAN if mean is None else torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = STD if std is None else torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (img * std.to(img.device) + mean.to(img.device)).clamp(0, 1)
