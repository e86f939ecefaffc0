"""The pretraining dataset: augmented uint8 crops, each a pure function of (seed, epoch, index)."""
from __future__ import annotations

import os
import warnings

import torch

from .crops import RATIO, SCALE, CropParams, crop_params, resized_crop
from .folders import image_folder
from .images import ChannelMismatch, decode_image


class PretrainCrops(torch.utils.data.Dataset):
    """`length` augmented crops an epoch from a list of images: uint8 (C, H, W) tensors, or file
    paths decoded when a crop needs them (in the DataLoader's workers), so that a folder of any
    size trains without being held in memory. image_size: S (square crops) or (H, W).

    in_chans None: files are read as 8-bit RGB (images.decode_image). in_chans N: files are read as
    stored, and one with another channel count raises images.ChannelMismatch (never skipped); items
    of 16-bit files are float32 in [0, 1] (crops.resized_crop), those of 8-bit files uint8.

    Item i of epoch e is a uint8 tensor (C, H, W) of image_size cut from image i % len(images)
    (each image once an epoch when length is the number of images; the loader's order shuffles),
    a pure function of (seed, e, i): a resumed or sharded run sees exactly the crops it would have
    seen. The index is i (in the epoch of set_epoch) or an (epoch, i) pair, which a loader with
    persistent workers passes, since set_epoch in the main process does not reach the workers'
    copies. An unreadable file is skipped (one warning) for the next readable one."""

    def __init__(self, images: list, image_size: int | tuple[int, int], length: int | None = None, seed: int = 0,
                 scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO, *,
                 in_chans: int | None = None):
        if not images:
            raise ValueError("images: expected at least one image or file path, got none")
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be >= 1 (or a pair (H, W) of them), got {image_size}")
        if in_chans is not None and in_chans < 1:
            raise ValueError(f"in_chans must be >= 1 (or None for RGB), got {in_chans}")
        self.images, self.seed, self.in_chans = images, seed, in_chans
        self.image_size = size if size[0] != size[1] else size[0]  # an int for square crops, as before
        self.length = len(images) if length is None else length
        self.scale, self.ratio, self.epoch = scale, ratio, 0
        self.unreadable: dict[str, str] = {}  # path -> the decoder's error, in the order met
        self.warn_unreadable = True  # a trainer that reports skips itself (once over all workers) turns it off

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.length

    def source(self, index: int) -> tuple[int, torch.Tensor]:
        """(k, image): the image item index crops, images[k] with k = index % len(images), or the
        next readable one."""
        n = len(self.images)
        for step in range(n):
            k = (index + step) % n
            item = self.images[k]
            if isinstance(item, torch.Tensor):
                if self.in_chans is not None and item.shape[0] != self.in_chans:
                    raise ChannelMismatch(f"image {k} in memory has {item.shape[0]} channels; expected {self.in_chans}")
                return k, item
            if item in self.unreadable:
                continue
            try:
                return k, decode_image(item, self.in_chans)
            except ChannelMismatch:
                raise  # the data does not fit the model: never skipped
            except Exception as e:  # noqa: BLE001 -- the decoders raise many types for broken files
                self.unreadable[item] = str(e)
                if self.warn_unreadable:
                    warnings.warn(f"skipped unreadable image file {item}: {e}")
        raise ValueError(f"none of the {n} image files can be read (each one's error is in the warnings above)")

    def params(self, epoch: int, index: int, height: int, width: int) -> CropParams:
        return crop_params(self.seed, epoch, index, height, width, self.scale, self.ratio)

    def __getitem__(self, index) -> torch.Tensor:
        epoch, i = index if isinstance(index, tuple) else (self.epoch, index)
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} crops an epoch")
        _, img = self.source(i)
        return resized_crop(img, self.params(epoch, i, img.shape[-2], img.shape[-1]), self.image_size)


def pretrain_dataset(root: str | os.PathLike | None, image_size: int | tuple[int, int], *, seed: int = 0,
                     length: int | None = None, scale: tuple[float, float] = SCALE,
                     ratio: tuple[float, float] = RATIO, in_chans: int | None = None) -> PretrainCrops:
    """The MAE pretraining data of root (an ImageFolder tree or a flat folder of images; None: the
    photos bundled with scikit-image): a map-style dataset with set_epoch(epoch) whose item i is a
    uint8 tensor (3, image_size, image_size), a pure function of (seed, epoch, i). image_size: S
    or (H, W). length: crops an epoch (default: one per image; 2048 for the bundled photos).
    in_chans N: the files as stored, N channels each, 16-bit ones as float32 items in [0, 1]
    (see PretrainCrops)."""
    if root is None:
        from .samples import sample_photos

        return PretrainCrops(sample_photos(), image_size, length or 2048, seed, scale, ratio, in_chans=in_chans)
    return PretrainCrops(image_folder(os.fspath(root)), image_size, length, seed, scale, ratio, in_chans=in_chans)
