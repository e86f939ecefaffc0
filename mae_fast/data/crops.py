"""The official recipe's augmentation: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3) + horizontal flip.

The crop *parameters* are a pure function of (seed, epoch, index) and the image's size, apart from
any pixel, so every backend (CPU here, GPU in gpu.py) cuts the very same crops. The crop is cut
before it is resized, and resized on uint8 (bicubic, antialiased); 16-bit images in float32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .images import to_unit_float

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


class CropParams(NamedTuple):
    top: int
    left: int
    height: int
    width: int
    flip: bool


def crop_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


def crop_params(seed: int, epoch: int, index: int, height: int, width: int,
                scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO) -> CropParams:
    """Sample index's crop of an image of height x width in epoch: torchvision's RandomResizedCrop
    sampling (10 tries, then a centre crop), then a flip with probability 0.5."""
    gen = crop_generator(seed, epoch, index)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            break
    else:
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    return CropParams(top, left, h, w, torch.rand(1, generator=gen).item() < 0.5)


def resized_crop(img: torch.Tensor, params: CropParams, size: int | tuple[int, int]) -> torch.Tensor:
    """Cut params' crop from an image (C, H, W), resize it to (C, size, size) or (C, *size) (bicubic,
    antialiased) and flip it if params say so. uint8 images are resized on uint8 (no float copy on
    the CPU) and stay uint8; uint16 (16-bit) images come out float32 in [0, 1], never squashed to 8
    bits. Images smaller than the crop are scaled up, as RandomResizedCrop does."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import horizontal_flip, resized_crop as tv_resized_crop

    out_size = [int(s) for s in size] if isinstance(size, (tuple, list)) else [size, size]
    if img.dtype == torch.uint16:  # torchvision resizes no uint16: the crop alone goes to float
        t, l, h, w = params.top, params.left, params.height, params.width
        img, params = to_unit_float(img[..., t:t + h, l:l + w]), params._replace(top=0, left=0)
    out = tv_resized_crop(img, params.top, params.left, params.height, params.width, out_size,
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
    if out.is_floating_point():
        out = out.clamp_(0, 1)  # bicubic overshoots
    return horizontal_flip(out) if params.flip else out
