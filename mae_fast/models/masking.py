"""Random masking as the official MAE draws it (argsort of uniform noise), without extra passes."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Masking(NamedTuple):
    ids_keep: torch.Tensor     # (B, len_keep) visible patches, in shuffled order (contiguous)
    ids_removed: torch.Tensor  # (B, L - len_keep) removed patches, in shuffled order
    mask: torch.Tensor         # (B, L) float, 0 = keep, 1 = removed, original patch order
    ids_restore: torch.Tensor  # (B, L) argsort of the shuffle


def check_noise(noise, batch: int, num_patches: int, device=None) -> None:
    """noise: a floating (batch, num_patches) tensor, on `device` (the images') when given."""
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (batch, num_patches):
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a (batch, num_patches) = ({batch}, {num_patches}) tensor, got {got}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    want = None if device is None else torch.device(device)
    if want is not None and (noise.device.type != want.type or want.index not in (None, noise.device.index)):
        raise ValueError(f"noise must be on {want} like the images, got {noise.device}")


def check_ratio(ratio, name: str, allow_zero: bool = False) -> None:
    """A masking ratio: a real number in (0, 1), or [0, 1) with allow_zero (a 0-d tensor is
    accepted); errors name the argument."""
    interval = "[0, 1)" if allow_zero else "(0, 1)"
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, torch.Tensor)) \
            or (isinstance(ratio, torch.Tensor) and (ratio.numel() != 1 or ratio.is_complex())):
        raise TypeError(f"{name} must be a float in {interval}, got {ratio!r}")
    if not (0 <= float(ratio) if allow_zero else 0 < float(ratio)) or not float(ratio) < 1:
        raise ValueError(f"{name} must be in {interval}, got {ratio}")


def len_keep_for(num_patches: int, mask_ratio: float, allow_zero: bool = False) -> int:
    """int(L * (1 - mask_ratio)) as the official code, refusing ratios that leave no visible patch,
    or (unless allow_zero: the encoder on every patch, as features) no removed one."""
    check_ratio(mask_ratio, "mask_ratio", allow_zero)
    len_keep = int(num_patches * (1 - mask_ratio))
    if not 0 < len_keep <= num_patches - (0 if allow_zero else 1):
        raise ValueError(f"mask_ratio {mask_ratio} keeps {len_keep} of {num_patches} patches; "
                         "at least one patch must stay visible" + ("" if allow_zero else " and one be removed"))
    return len_keep


def random_masking(batch: int, num_patches: int, mask_ratio: float, noise=None, device=None,
                   allow_zero: bool = False) -> Masking:
    """Official semantics: keep the first len_keep of argsort(noise). allow_zero: mask_ratio 0
    keeps every patch (the official forward_encoder(imgs, 0.0), for features)."""
    len_keep = len_keep_for(num_patches, mask_ratio, allow_zero)
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    check_noise(noise, batch, num_patches, device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= len_keep).float()
    # ids_keep contiguous: the token ops read contiguous ids, and would each copy a strided slice
    return Masking(ids_shuffle[:, :len_keep].contiguous(), ids_shuffle[:, len_keep:], mask, ids_restore)
