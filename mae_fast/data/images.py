"""Decoding image files to tensors (C, H, W).

Two modes. RGB (channels=None, the default): every file becomes 8-bit RGB, uint8 (3, H, W), as the
official recipe's loader makes it; torchvision.io decodes JPEG, PNG, GIF and WebP straight to
uint8 (libjpeg-turbo, libpng), with grayscale, palette and alpha converted to RGB by the decoder;
PIL reads the formats it cannot (BMP, TIFF, ...). No float image is made on the way.

As stored (channels=N): the file's own channels at its own bit depth, uint8 for 8-bit data and
uint16 for 16-bit data (PNG through torchvision.io; TIFF, multi-page or multi-channel, through
tifffile; other formats through PIL). A file with another channel count than N raises
ChannelMismatch.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
TIFF_EXTENSIONS = (".tif", ".tiff")


class ChannelMismatch(ValueError):
    """An image file whose channel count differs from the one asked for: a data error, not an
    unreadable file to skip."""


def decode_image(path: str | os.PathLike, channels: int | None = None) -> torch.Tensor:
    """The image file at path: uint8 RGB (3, H, W) when channels is None; else the file as stored,
    (channels, H, W) uint8 or uint16, ChannelMismatch when it has another channel count."""
    path = os.fspath(path)
    if channels is not None:
        img = decode_as_stored(path)
        if img.shape[0] != channels:
            raise ChannelMismatch(f"{path} has {img.shape[0]} channel{'s' * (img.shape[0] != 1)}; "
                                  f"expected {channels}")
        return img
    if path.lower().endswith(TORCHVISION_EXTENSIONS):
        try:
            img = _torchvision_decode(path, rgb=True)
        except RuntimeError:  # a file torchvision's decoders refuse (a CMYK PNG, an odd GIF): PIL may still read it
            return decode_with_pil(path)
        if img.dtype != torch.uint8:  # 16-bit PNG
            from torchvision.transforms.v2.functional import to_dtype

            img = to_dtype(img, torch.uint8, scale=True)
        return img
    return decode_with_pil(path)


def _torchvision_decode(path: str, rgb: bool) -> torch.Tensor:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        img = tv_decode(path, mode=ImageReadMode.RGB if rgb else ImageReadMode.UNCHANGED)
    return img[0] if img.dim() == 4 else img  # an animated GIF: its first frame


def decode_as_stored(path: str) -> torch.Tensor:
    """The file's own channels (C, H, W) at its bit depth: uint8 or uint16."""
    lower = path.lower()
    if lower.endswith(TIFF_EXTENSIONS):
        return decode_tiff(path)
    if lower.endswith(TORCHVISION_EXTENSIONS):
        try:
            return _torchvision_decode(path, rgb=False)
        except RuntimeError:
            pass
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "1":  # bilevel: one 8-bit channel
            im = im.convert("L")
        elif im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):  # palettes and colour models: RGB(A)
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        return _from_array(np.array(im), path)  # a copy: asarray gives a read-only view


def decode_tiff(path: str) -> torch.Tensor:
    """A TIFF's first series: one page (H, W), samples (H, W, S), or pages / planes (C, H, W) as channels."""
    try:
        import tifffile
    except ImportError as e:
        raise ImportError("reading TIFF files as stored needs tifffile: pip install tifffile") from e
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr, axes = series.asarray(), series.axes
    if arr.ndim == 3 and axes.endswith("S"):  # interleaved samples: channels last
        arr = np.moveaxis(arr, -1, 0)
    return _from_array(arr if arr.ndim != 2 else arr[None], path, channels_first=True)


def _from_array(arr: np.ndarray, path: str, channels_first: bool = False) -> torch.Tensor:
    if arr.dtype == np.int32 and arr.max(initial=0) < 65536 and arr.min(initial=0) >= 0:  # PIL's 16-bit "I" mode
        arr = arr.astype(np.uint16)
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        arr = arr.astype(f"=u{arr.dtype.itemsize}", copy=False)  # byte order: the machine's
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: {arr.dtype} samples; expected 8- or 16-bit unsigned integers")
    if arr.ndim == 2:
        arr = arr[None] if channels_first else arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: {arr.ndim}-D image data {arr.shape}; expected (H, W) or (H, W) channels")
    return torch.from_numpy(np.ascontiguousarray(arr if channels_first else np.moveaxis(arr, -1, 0)))


def decode_with_pil(path: str) -> torch.Tensor:
    """decode_image through PIL alone (every format PIL reads; slower for JPEG and PNG)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def to_unit_float(img: torch.Tensor) -> torch.Tensor:
    """A uint8 or uint16 image as float32 in [0, 1] (16-bit values are exact in float32)."""
    if img.dtype == torch.uint8:
        return img.float() / 255.0
    if img.dtype == torch.uint16:
        return img.to(torch.float32) / 65535.0
    if img.is_floating_point():
        return img.float()
    raise ValueError(f"expected a uint8, uint16 or float image, got {img.dtype}")


def load_image(path: str | os.PathLike, channels: int | None = None) -> torch.Tensor:
    """The image file at path as a float tensor (C, H, W) in [0, 1] (for single pictures);
    channels as decode_image."""
    return to_unit_float(decode_image(path, channels))
