"""The official 2-D sin-cos position table (facebookresearch/mae util/pos_embed.py)."""
from __future__ import annotations

import torch


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
