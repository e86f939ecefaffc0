"""Attention maps of a pretrained encoder (`mae-fast visualize --attention`): where the cls token
of the last block looks, one map per head, over the patch grid of the whole (unmasked) image."""
from __future__ import annotations

import os

import torch

from .. import data as mdata
from .pictures import _pyplot, display, picture_path


@torch.no_grad()
def cls_attention(model, imgs) -> torch.Tensor:
    """(B, heads, h, w): the last block's attention of the cls token to each patch (rows of the
    softmax, so each map sums to at most 1; the rest goes to the cls token itself)."""
    was_training = model.training
    model.eval()
    maps = model.get_attention_maps(imgs, indices=[-1])[0]  # (B, heads, 1 + h*w, 1 + h*w)
    model.train(was_training)
    h, w = model.grid
    return maps[:, :, 0, 1:].float().reshape(maps.shape[0], maps.shape[1], h, w).cpu()


def attention_grid(model, imgs, path, stats=None) -> str:
    """Saves one row per image: the image, then each head's cls-token attention (each map scaled to
    its own maximum) laid over the image. Returns the file written (see pictures.picture_path)."""
    path = picture_path(path)
    maps = cls_attention(model, imgs)
    maps = maps / maps.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
    originals = mdata.denormalize(imgs.float(), *(stats or (None, None))).cpu()
    size = tuple(imgs.shape[-2:])
    plt = _pyplot()
    rows, heads = maps.shape[:2]
    fig, axes = plt.subplots(rows, heads + 1, figsize=(1.6 * (heads + 1), 1.7 * rows), squeeze=False)
    for r in range(rows):
        array, kwargs = display(originals[r])
        up = torch.nn.functional.interpolate(maps[r][None], size=size, mode="nearest")[0]
        for c in range(heads + 1):
            ax = axes[r][c]
            ax.imshow(array, interpolation="nearest", **kwargs)
            if c:
                ax.imshow(up[c - 1].numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("image" if c == 0 else f"head {c - 1}", fontsize=8)
    fig.suptitle("cls-token attention of the last block", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
