"""Encoder features of the whole, unmasked image, for downstream heads and for looking at: the
chosen blocks' outputs (forward_intermediates, timm's name, arguments and shapes) and their
attention maps (get_attention_maps). Both are off the training path: forward never runs them, and
the attention maps' explicit softmax runs only here."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, NamedTuple

import torch
from torch import nn

from .blocks import run_blocks


class FeatureStack(NamedTuple):
    """An encoder as these features see it (each model builds its own in _feature_stack)."""
    tokens: torch.Tensor  # (B, num_prefix + h*w, D): the first block's input
    blocks: Sequence[Callable]  # x -> x, one per block
    attention: Callable  # (block index, the block's input) -> (B, heads, N, N) probabilities
    norm: nn.Module  # the encoder's final norm
    num_prefix: int  # cls tokens before the patch tokens
    grid: tuple[int, int]  # (h, w) patches
    checkpoint: bool  # activation checkpointing of the blocks


def take_indices(num_blocks: int, indices) -> list[int]:
    """timm's block selection: None all blocks, an int n the last n, a sequence of ints those blocks
    (negative ones from the end). Returned sorted, each once."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices as an int takes the last n blocks: n must be in [1, {num_blocks}], "
                             f"got {indices}")
        return list(range(num_blocks - indices, num_blocks))
    if not isinstance(indices, Sequence) or not indices \
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise TypeError(f"indices must be None, an int or a non-empty sequence of ints, got {indices!r}")
    bad = [i for i in indices if not -num_blocks <= i < num_blocks]
    if bad:
        raise ValueError(f"indices {bad} out of range for {num_blocks} blocks (-{num_blocks} to {num_blocks - 1})")
    return sorted({i % num_blocks for i in indices})


def grad_checkpointing_arg(enable) -> bool:
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool, got {type(enable).__name__}")
    return enable


class EncoderFeatures:
    """forward_intermediates and get_attention_maps for a model with _feature_stack(imgs,
    interpolate_pos_encoding) -> FeatureStack."""

    def forward_intermediates(self, imgs, indices=None, return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              *, interpolate_pos_encoding=False):
        """The outputs of the chosen blocks (indices: None all, an int the last n, or a list), in
        block order, on the whole unmasked image; norm=True passes each through the final norm.
        output_fmt "NCHW": (B, D, h, w) patch tokens (cls removed); "NLC": (B, h*w, D).
        return_prefix_tokens: each item is (patch tokens, cls tokens (B, 1, D)) where there is a cls token.
        Returns (final normed tokens (B, 1 + h*w, D), intermediates), or only the intermediates;
        stop_early skips the blocks after the last chosen one (the final tokens then come from it)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        s = self._feature_stack(imgs, interpolate_pos_encoding)
        take = take_indices(len(s.blocks), indices)
        x, out = s.tokens, []
        for i, blk in enumerate(s.blocks[: take[-1] + 1] if stop_early else s.blocks):
            x = run_blocks([blk], x, checkpoint=s.checkpoint)
            if i in take:
                out.append(s.norm(x) if norm else x)
        prefix = [y[:, : s.num_prefix] for y in out]
        out = [y[:, s.num_prefix:] for y in out]
        if output_fmt == "NCHW":
            (h, w), B = s.grid, x.shape[0]
            out = [y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in out]
        if return_prefix_tokens and s.num_prefix:
            out = list(zip(out, prefix))
        return out if intermediates_only else (s.norm(x), out)

    def get_attention_maps(self, imgs, indices=None, *, interpolate_pos_encoding=False) -> list[torch.Tensor]:
        """The attention probabilities of the chosen blocks (indices as forward_intermediates), in
        block order: (B, heads, N, N) float32 with N = 1 + h*w tokens (cls first; rows sum to 1),
        on the whole unmasked image. Computed by an explicit softmax for these blocks only."""
        s = self._feature_stack(imgs, interpolate_pos_encoding)
        take = take_indices(len(s.blocks), indices)
        x, maps = s.tokens, []
        for i in range(take[-1] + 1):
            if i in take:
                maps.append(s.attention(i, x))
            if i < take[-1]:
                x = run_blocks([s.blocks[i]], x, checkpoint=s.checkpoint)
        return maps
