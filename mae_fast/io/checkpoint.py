"""Loading MAE checkpoints into a model (save_checkpoint and the safe readers live in files.py).

`load_checkpoint` reads the official facebookresearch/mae format ({'model': state_dict}, possibly
with optimizer / epoch / scaler / args), plain state dicts, `.safetensors` files and Hugging Face
ViTMAE state dicts (converted on the fly, see mae_fast/io/hf.py), through the safe readers of
mae_fast/io/files.py.

Encoder-only checkpoints (the released `mae_pretrain_vit_*.pth`) load with the decoder keys
reported missing. The fixed position tables (`pos_embed`, `decoder_pos_embed`, shape
(1, extra + h*w, D)) are resized with bicubic interpolation on the h x w grid, extra (cls) rows
kept, when the checkpoint was trained at another resolution; non-square grids are supported.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import pair_arg
from .files import CheckpointError, read_checkpoint, read_state_dict, save_checkpoint
from .hf_keys import POS_TABLE_KEYS, detect_key_format, official_state_dict_from_hf

__all__ = ["LoadReport", "CheckpointError", "load_checkpoint", "save_checkpoint", "read_checkpoint",
           "read_state_dict", "interpolate_pos_table", "compact_keys", "POS_TABLE_KEYS"]

@dataclass
class LoadReport:
    """What `load_checkpoint` did. `missing`: model keys the checkpoint lacks (left as initialised);
    `unexpected`: checkpoint keys the model lacks (ignored); `interpolated`: keys resized to the
    model's grid, as {key: (checkpoint_shape, model_shape)}; `converted_from`: 'hf-4.x' / 'hf-5.x'
    when the checkpoint held Hugging Face ViTMAE names, else None."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    converted_from: str | None = None
    source: str | None = None

    # The names torch's load_state_dict result uses, for code that expects them.
    @property
    def missing_keys(self) -> list[str]:
        return self.missing

    @property
    def unexpected_keys(self) -> list[str]:
        return self.unexpected

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        parts = [f"loaded {self.source or 'state dict'}"]
        if self.converted_from:
            parts.append(f"converted from {self.converted_from} names")
        if self.interpolated:
            parts.append("interpolated " + ", ".join(
                f"{k} {tuple(a)} -> {tuple(b)}" for k, (a, b) in self.interpolated.items()))
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {compact_keys(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {compact_keys(self.unexpected)}")
        return "; ".join(parts)


# ----------------------------------------------------------------------------- position tables

def _factor_grid(n: int, aspect: float | None) -> tuple[int, int] | None:
    """(h, w) with h*w == n: square if possible, else the factorisation closest to aspect h/w."""
    s = math.isqrt(n)
    if s * s == n:
        return (s, s)
    if aspect is None:
        return None
    pairs = [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    exact = [p for p in pairs if p[0] * 1.0 / p[1] == aspect]
    return exact[0] if exact else None


def interpolate_pos_table(table: torch.Tensor, new_grid, num_extra: int = 1, old_grid=None) -> torch.Tensor:
    """Resize a (1, num_extra + h*w, D) position table to new_grid (h', w') with bicubic interpolation
    (align_corners=False) on the 2-D grid; the first num_extra rows (cls) are kept as they are.
    Rows are in row-major token order i*w + j, as everywhere in MAE."""
    if table.dim() == 2:
        table = table.unsqueeze(0)
    if table.dim() != 3:
        raise ValueError(f"position table must be (1, N, D), got {tuple(table.shape)}")
    n_old, dim = table.shape[1] - num_extra, table.shape[2]
    if old_grid is None:
        old_grid = _factor_grid(n_old, None)
        if old_grid is None:
            raise ValueError(f"cannot tell the grid of a position table with {n_old} patch rows; pass old_grid")
    gh, gw = old_grid
    if gh * gw != n_old:
        raise ValueError(f"grid {old_grid} does not match a table with {n_old} patch rows")
    nh, nw = new_grid
    extra, body = table[:, :num_extra], table[:, num_extra:]
    if (gh, gw) == (nh, nw):
        return table.clone()
    dtype = body.dtype
    grid = body.reshape(table.shape[0], gh, gw, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    body = grid.permute(0, 2, 3, 1).reshape(table.shape[0], nh * nw, dim).to(dtype)
    return torch.cat([extra, body], dim=1)


def _model_grid(model: nn.Module) -> tuple[int, int] | None:
    grid = getattr(model, "grid", None)
    if grid is not None:
        return tuple(int(g) for g in grid)
    img, p = getattr(model, "img_size", None), getattr(model, "patch_size", None)
    if img is not None and p is not None:
        img, p = pair_arg(img, "img_size"), pair_arg(p, "patch_size")
        return (img[0] // p[0], img[1] // p[1])
    return None


# ----------------------------------------------------------------------------- loading

def compact_keys(keys, limit: int = 12) -> str:
    """'decoder_blocks.[0-7].* (96 keys), decoder_embed.{bias,weight}, mask_token' style summary."""
    groups: dict[str, list] = {}
    order: list[str] = []
    for k in keys:
        m = re.match(r"^(.*?)\.(\d+)\.(.+)$", k)
        if m:
            g = (m.group(1) + ".#", int(m.group(2)), k)
        else:
            head, _, tail = k.rpartition(".")
            g = (head if head else k, tail if head else None, k)
        if g[0] not in groups:
            groups[g[0]] = []
            order.append(g[0])
        groups[g[0]].append(g)
    out = []
    for name in order:
        items = groups[name]
        if name.endswith(".#"):
            idx = sorted({i for _, i, _ in items})
            rng = f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 \
                else ",".join(map(str, idx))
            out.append(f"{name[:-2]}.[{rng}].* ({len(items)} keys)")
        elif items[0][1] is None:
            out.append(name)
        else:
            tails = sorted({t for _, t, _ in items})
            out.append(f"{name}.{tails[0]}" if len(tails) == 1 else f"{name}.{{{','.join(tails)}}}")
    if len(out) > limit:
        out = out[:limit] + [f"... ({len(out) - limit} more groups)"]
    return ", ".join(out)


def _looks_like_hf(sd: Mapping) -> bool:
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.", "decoder.decoder_"))
               for k in sd)


def load_checkpoint(model: nn.Module, path_or_state, *, strict: bool = False,
                    checkpoint_grid: tuple[int, int] | None = None,
                    interpolate: bool | None = None) -> LoadReport:
    """Load a checkpoint into an official-layout MaskedAutoencoderViT (reference or fast model).

    path_or_state: a file path ({'model': sd} .pth, plain state dict, .safetensors) or an in-memory
    dict of either kind. Hugging Face ViTMAE key names (transformers 4.x or 5.x) are converted.
    Position tables of another grid are interpolated to the model's grid; the checkpoint's grid is
    taken as square, else the factorisation with the model's aspect ratio, else `checkpoint_grid`.
    Other shape mismatches raise ValueError naming the key and both shapes.

    strict=False: missing / unexpected keys are reported (a warning and the returned LoadReport);
    strict=True: they raise a RuntimeError instead. interpolate (default: not strict) allows the
    position-table resize; when off, a table of another grid is a shape mismatch (ValueError), as
    it should be when resuming a run. Returns a LoadReport."""
    if interpolate is None:
        interpolate = not strict
    if not isinstance(path_or_state, (Mapping, str, os.PathLike)):
        raise TypeError(f"path_or_state: expected a checkpoint path or a state dict, got {type(path_or_state).__name__}")
    source = None if isinstance(path_or_state, Mapping) else os.fspath(path_or_state)
    sd = read_state_dict(path_or_state)
    report = LoadReport(source=source)

    if _looks_like_hf(sd):
        report.converted_from = "hf-" + detect_key_format(sd)
        sd = official_state_dict_from_hf(sd)

    model_sd = model.state_dict()
    grid = _model_grid(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key not in model_sd:
            report.unexpected.append(key)
            continue
        target = model_sd[key]
        if tuple(value.shape) == tuple(target.shape):
            out[key] = value
            continue
        is_table = key.rpartition(".")[2] in POS_TABLE_KEYS and value.dim() == 3 and target.dim() == 3
        if interpolate and is_table and value.shape[0] == target.shape[0] and value.shape[2] == target.shape[2] \
                and grid:
            num_extra = target.shape[1] - grid[0] * grid[1]
            n_old = value.shape[1] - num_extra
            if num_extra >= 0 and n_old > 0:
                old_grid = checkpoint_grid or _factor_grid(n_old, grid[0] / grid[1])
                if old_grid is None or old_grid[0] * old_grid[1] != n_old:
                    raise ValueError(
                        f"{key}: cannot tell the checkpoint's patch grid from {n_old} position rows "
                        f"(checkpoint {tuple(value.shape)}, model {tuple(target.shape)}, model grid {grid}); "
                        f"pass checkpoint_grid=(h, w)")
                out[key] = interpolate_pos_table(value, grid, num_extra, old_grid)
                report.interpolated[key] = (tuple(value.shape), tuple(target.shape))
                continue
        raise ValueError(f"shape mismatch for {key!r}: checkpoint has {tuple(value.shape)}, "
                         f"model expects {tuple(target.shape)}")
    report.missing = [k for k in model_sd if k not in out]

    if strict and (report.missing or report.unexpected):
        raise RuntimeError(f"strict load of {source or 'state dict'} failed: "
                           f"missing {len(report.missing)} [{compact_keys(report.missing)}], "
                           f"unexpected {len(report.unexpected)} [{compact_keys(report.unexpected)}]")
    model.load_state_dict(out, strict=False)
    if report.missing or report.unexpected:
        warnings.warn(str(report), stacklevel=2)
    return report


