"""The pixel statistics with which the pretraining models normalise uint8 images.

A model given uint8 images (B, C, H, W) hands them, with its pixel_mean and pixel_std, to the fused
ops that read the image (patchify_gather, masked_mse_loss), which normalise each pixel as
(u8 / 255 - mean[c]) / std[c] as they load it: no float copy of the batch is made, and the host
sends a quarter of the bytes to the device. Float images are taken as normalised already, as
always. The statistics are plain attributes, not parameters or buffers: the state dict (and so
every checkpoint's keys) stays the official one.
"""
from __future__ import annotations

import torch

from ..ops._common import IMAGENET_MEAN, IMAGENET_STD, pixel_affine, pixel_stats_arg


class PixelStats:
    """pixel_mean / pixel_std (C floats each, of x = u8 / 255) for a model of `channels` channels."""

    def _init_pixel_stats(self, mean, std, channels: int) -> None:
        self._pixel_channels = channels
        self.pixel_mean = self.pixel_std = None
        if mean is not None or std is not None or channels == 3:  # ImageNet's: for 3 channels only
            self.set_pixel_stats(IMAGENET_MEAN if mean is None else mean, IMAGENET_STD if std is None else std)

    def set_pixel_stats(self, mean, std) -> None:
        """The per-channel mean and std (of pixels scaled to [0, 1]) that uint8 images are normalised
        with: C floats each (a list, tuple or 1-D tensor), std > 0. Not saved in the state dict."""
        C = self._pixel_channels
        self.pixel_mean = pixel_stats_arg(mean, "mean", C)
        self.pixel_std = pixel_stats_arg(std, "std", C, positive=True)

    def _pixel_stats(self, imgs: torch.Tensor):
        """(mean, std) for the fused ops: the model's for uint8 images, (None, None) for float ones."""
        if imgs.dtype != torch.uint8:
            return None, None
        if self.pixel_mean is None:
            raise ValueError(f"uint8 images need the pixel statistics of this model's {self._pixel_channels} channels "
                             "(ImageNet's are the default for 3): pass pixel_mean= and pixel_std= to the "
                             "constructor or call set_pixel_stats(mean, std)")
        return self.pixel_mean, self.pixel_std

    def normalize_images(self, imgs: torch.Tensor) -> torch.Tensor:
        """uint8 images as the fused ops see them: a new float32 (B, C, H, W) image, (u8 / 255 - mean)
        / std (the same arithmetic as the kernels). Float images are returned as they are. Only the
        paths that need the whole float image call it (a subclass's own patchify or loss)."""
        mean, std = self._pixel_stats(imgs)
        if mean is None:
            return imgs
        a = pixel_affine(imgs, mean, std).view(2, -1, 1, 1)
        return torch.addcmul(a[1], imgs.float(), a[0])
