"""Per-channel statistics of a data set, for data unlike ImageNet (`mae-fast pretrain --norm auto`)."""
from __future__ import annotations

import math

import torch

from .images import to_unit_float

STATS_SAMPLE = 512  # images read: enough for a mean and std to about a percent of a typical spread
STATS_PIXELS = 65_536  # pixels used per image (a strided subsample of larger images)


def channel_stats(crops, max_images: int = STATS_SAMPLE, seed: int = 0) -> tuple[list[float], list[float]]:
    """(mean, std) per channel of x in [0, 1] (uint8 / 255, uint16 / 65535) over a fixed-seed
    sample of up to max_images of crops.images (a PretrainCrops), each decoded whole as the crops
    read it; the pixels of all sampled images weigh alike. Deterministic: the same files give the
    same numbers. Unreadable files are skipped as the crops skip them."""
    n = len(crops.images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].tolist()
    total = total_sq = None
    count = 0
    seen = set()
    for index in sorted(order):
        k, img = crops.source(index)
        if k in seen:  # an unreadable file's stand-in, already counted
            continue
        seen.add(k)
        stride = max(1, math.ceil(math.sqrt(img.shape[-2] * img.shape[-1] / STATS_PIXELS)))
        x = to_unit_float(img[:, ::stride, ::stride]).double().flatten(1)
        if total is None:
            total, total_sq = torch.zeros(x.shape[0], dtype=torch.float64), torch.zeros(x.shape[0], dtype=torch.float64)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(max(v, 1e-6), 6) for v in std.tolist()]
