"""The official 2-D sin-cos position table (facebookresearch/mae util/pos_embed.py), and its
interpolation to another patch grid at call time (Hugging Face ViTMAE's interpolate_pos_encoding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pos_embed_2d(embed_dim: int, grid: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """(gh * gw (+1), embed_dim) float32, built in float64. Row i * gw + j is patch (i, j); the
    first half of the channels encodes the column j, the second half the row i, each half
    [sin | cos] with omega_k = 1 / 10000 ** (k / (embed_dim / 4)); the cls row is zeros."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for the 2-D sin-cos table, got {embed_dim}")
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    col = torch.arange(gw, dtype=torch.float64).repeat(gh)[:, None] * omega
    row = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)[:, None] * omega
    table = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table])
    return table.float()


def check_interpolation(value) -> None:
    """interpolate_pos_encoding: False, True or "hf"."""
    if value is not False and value is not True and value != "hf":
        raise ValueError(f"interpolate_pos_encoding must be False, True or 'hf', got {value!r}")


def resize_pos_table(table: torch.Tensor, grid, new_grid, flattened: bool = False) -> torch.Tensor:
    """A (1, 1 + gh*gw, D) table (cls row first, then row-major patches) for the patch grid new_grid:
    the cls row as it is, the patch rows resized with bicubic interpolation (align_corners=False) on
    the 2-D grid, as Hugging Face ViTMAE's encoder does. flattened=True resizes the patch rows as one
    1-D sequence of gh*gw instead, as Hugging Face ViTMAE's decoder does (it ignores the grid's rows).
    The table itself on its own grid."""
    (gh, gw), (nh, nw) = grid, new_grid
    if (gh, gw) == (nh, nw):
        return table
    D = table.shape[-1]
    body = table[:, 1:].reshape(1, gh, gw, D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    if flattened:
        body = body.reshape(1, D, 1, gh * gw)
    body = F.interpolate(body, size=(1, nh * nw) if flattened else (nh, nw), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], body.flatten(2).transpose(1, 2)], dim=1)
