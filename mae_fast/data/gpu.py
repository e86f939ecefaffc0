"""The GPU backend: JPEG files decoded on the GPU in batches (nvJPEG, through
torchvision.io.decode_jpeg(..., device="cuda")), cut with the CPU backend's crop parameters
(crops.crop_params, the same (seed, epoch, index) function) and resized on the GPU.

The DataLoader's workers only read the files' bytes (encoded_source); the main process decodes a
batch at once (crop_batch). Files of other formats, images held in memory and JPEGs nvJPEG refuses
take the CPU decoder, so every item has the same crop as on the CPU backend.
"""
from __future__ import annotations

import warnings

import torch

from .crops import resized_crop
from .dataset import PretrainCrops

JPEG_MAGIC = b"\xff\xd8\xff"


def check_cuda(device: torch.device | str | None = None) -> None:
    """ValueError (one line) unless device (default: the machine) can run the GPU backend."""
    if not torch.cuda.is_available():
        raise ValueError("--data-backend gpu decodes JPEGs on a CUDA GPU, and this machine has none; "
                         "use --data-backend cpu")
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"--data-backend gpu decodes on the CUDA device the model trains on, not on {device}; "
                         "use --data-backend cpu or a CUDA --device")


def encoded_source(crops: PretrainCrops, index: int) -> torch.Tensor:
    """Worker side: what item index crops, as its JPEG file's bytes (1-D uint8) for the GPU to
    decode, or else as the decoded uint8 image (3, H, W) (other formats, images in memory, and the
    next readable image when the file cannot be read)."""
    item = crops.images[index % len(crops.images)]
    if isinstance(item, str) and item not in crops.unreadable:
        try:
            with open(item, "rb") as f:
                data = f.read()
        except OSError:
            data = b""  # source() below reports it and takes the next readable image
        if data.startswith(JPEG_MAGIC):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return crops.source(index)[1]


def _decode_jpegs(data: list[torch.Tensor], device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one file nvJPEG refuses fails the whole batch: find it
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def crop_batch(sources: list[torch.Tensor], keys: list[tuple[int, int]], crops: PretrainCrops,
               device: torch.device | str = "cuda") -> torch.Tensor:
    """The uint8 crops (B, 3, H, W) on device of items keys ((epoch, index) pairs), from their
    encoded_source()s: JPEG bytes decoded together on the GPU, the rest copied there."""
    jpegs = [k for k, s in enumerate(sources) if s.dim() == 1]
    images: list[torch.Tensor | None] = list(sources)
    for k, img in zip(jpegs, _decode_jpegs([sources[k] for k in jpegs], device) if jpegs else []):
        images[k] = img
    size = crops.image_size
    h, w = size if isinstance(size, tuple) else (size, size)
    out = torch.empty(len(sources), 3, h, w, dtype=torch.uint8, device=device)
    for k, (img, (epoch, index)) in enumerate(zip(images, keys)):
        if img is None or img.dim() == 1:  # a JPEG nvJPEG cannot decode: the CPU decoder's image, or the next readable
            img = crops.source(index)[1]
        img = img.to(device, non_blocking=True)
        out[k] = resized_crop(img, crops.params(epoch, index, img.shape[-2], img.shape[-1]), size)
    return out
