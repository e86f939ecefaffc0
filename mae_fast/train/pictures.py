"""Pictures: reconstruction grids and the loss curve (matplotlib, headless)."""
from __future__ import annotations

import os

import torch

from .. import data as mdata
from ..ops._common import NORM_PIX_EPS

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def picture_path(path) -> str:
    """The file a picture goes to: path, with '.png' added when it has no extension (what
    matplotlib would write, named here so that callers report the real file). ValueError when
    matplotlib cannot write the extension."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1]
    if not ext:
        return path + ".png"
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if ext[1:].lower() not in formats:
        raise ValueError(f"matplotlib cannot write {ext!r} pictures; expected a name ending in "
                         f"{', '.join('.' + f for f in sorted(formats))} (or none, for .png)")
    return path


def display(img: torch.Tensor) -> tuple:
    """(array, imshow kwargs) of an image (C, H, W) in [0, 1]: RGB for 3 channels, else the first
    channel in gray."""
    if img.shape[0] == 3:
        return img.permute(1, 2, 0).numpy(), {}
    return img[0].numpy(), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}


@torch.no_grad()
def reconstruct(model, imgs, mask_ratio=0.75, seed=0, amp_dtype=None, stats=None):
    """(original, masked, reconstruction, pasted) image batches in [0, 1]. With norm_pix_loss the
    predictions are per-patch normalised, so they are shown with each true patch's mean and std.
    stats: the (mean, std) imgs were normalised with (default ImageNet's)."""
    was_training = model.training
    model.eval()
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    with torch.autocast(imgs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        _, pred, mask = model(imgs, mask_ratio, noise)
    model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs)
        pred = pred * (target.var(-1, keepdim=True) + NORM_PIX_EPS) ** 0.5 + target.mean(-1, keepdim=True)
    recon = model.unpatchify(pred)
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).to(imgs.dtype))
    out = (imgs, imgs * (1 - pixel_mask), recon, imgs * (1 - pixel_mask) + recon * pixel_mask)
    return tuple(mdata.denormalize(x.float(), *(stats or (None, None))).cpu() for x in out)


def reconstruction_grid(model, imgs, path, mask_ratio=0.75, seed=0, amp_dtype=None, stats=None) -> str:
    """Saves one row per image: original | masked | reconstruction | reconstruction + visible.
    Returns the file written (see picture_path)."""
    path = picture_path(path)
    columns = reconstruct(model, imgs, mask_ratio, seed, amp_dtype, stats)
    plt = _pyplot()
    rows = imgs.shape[0]
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2 * rows), squeeze=False)
    for r in range(rows):
        for c, title in enumerate(COLUMNS):
            ax = axes[r][c]
            array, kwargs = display(columns[c][r])
            ax.imshow(array, interpolation="nearest", **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(f"MAE reconstructions, mask ratio {mask_ratio}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_curve(history, path) -> str:
    """history: [(step, loss), ...]. Returns the file written (see picture_path)."""
    path = picture_path(path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("MAE pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_curves(history, evals, path, title: str = "fine-tuning") -> str:
    """Two panels: the training loss per step (and the validation loss per epoch), and the
    validation top-1 / top-5 per epoch. history: [(step, loss), ...]; evals: dicts with step,
    acc1, acc5, val_loss. Returns the file written (see picture_path)."""
    path = picture_path(path)
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    if history:
        steps, losses = zip(*history)
        loss_ax.plot(steps, losses, linewidth=1, label="train")
    if evals:
        steps = [e["step"] for e in evals]
        loss_ax.plot(steps, [e["val_loss"] for e in evals], marker="o", markersize=3, label="val")
        acc_ax.plot(steps, [e["acc1"] for e in evals], marker="o", markersize=3, label="top-1")
        acc_ax.plot(steps, [e["acc5"] for e in evals], marker="o", markersize=3, label="top-5")
    for ax, label in ((loss_ax, "loss"), (acc_ax, "val accuracy (%)")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
