"""Data for the CLI: the embedded sample photos, ImageFolder trees, and the digits probe set.

Nothing is downloaded: the photos are the sample images bundled inside scikit-image's wheel and
the probe set is scikit-learn's bundled digits. Augmentation is the official recipe's
RandomResizedCrop(scale 0.2..1, ratio 3/4..4/3) + horizontal flip, done in torch.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet statistics, as the official recipe
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SAMPLE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                 "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                 "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
                 "retina.jpg", "rocket.jpg", "text.png")


def _to_tensor(pil_image) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [0, 1]."""
    arr = np.asarray(pil_image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def load_image(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return _to_tensor(im)


def sample_photos() -> list[torch.Tensor]:
    """The photos bundled with scikit-image, each (3, H, W) in [0, 1]."""
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the embedded demo data needs scikit-image: pip install scikit-image "
                          "(or pass --data DIR with an ImageFolder tree)") from e
    root = os.path.dirname(skimage.data.__file__)
    return [load_image(os.path.join(root, name)) for name in sample_photo_names()]


def sample_photo_names() -> list[str]:
    """The SAMPLE_PHOTOS this scikit-image ships (older versions lack some)."""
    import skimage.data

    root = os.path.dirname(skimage.data.__file__)
    return [name for name in SAMPLE_PHOTOS if os.path.exists(os.path.join(root, name))]


def fingerprint(names: list[str]) -> dict:
    """A cheap identity of a data set: its file count and a hash of its sorted relative file names
    (no file is read), so a resume can tell other data from the same folder moved elsewhere."""
    digest = hashlib.sha256("\n".join(sorted(n.replace(os.sep, "/") for n in names)).encode()).hexdigest()
    return {"files": len(names), "names_sha256": digest[:16]}


def image_folder(root: str) -> list[str]:
    """Image files under root (an ImageFolder tree or a flat folder), sorted for reproducibility."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data: {root!r} is not a directory")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"--data: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    return files


def random_resized_crop(img: torch.Tensor, size: int, gen: torch.Generator, scale=(0.2, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop), bicubic resize."""
    _, H, W = img.shape
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            i = int(torch.randint(0, H - h + 1, (1,), generator=gen))
            j = int(torch.randint(0, W - w + 1, (1,), generator=gen))
            break
    else:
        h = w = min(H, W)
        i, j = (H - h) // 2, (W - w) // 2
    crop = img[:, i:i + h, j:j + w].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)


class CropDataset(torch.utils.data.Dataset):
    """A fixed number of augmented crops per epoch from a list of images: decoded (3, H, W) tensors,
    or file paths, decoded when a crop needs them (in the DataLoader's workers), so that a folder
    of any size trains without being held in memory. Item i of epoch e crops image i % len(images)
    (each image once an epoch when the length is the number of images; the run's order shuffles)
    and is a pure function of (seed, e, i), so a resumed run sees exactly the crops it would have
    seen. Images smaller than the crop are scaled up, as torchvision's RandomResizedCrop does; an
    unreadable file is skipped (one warning) for the next readable one."""

    def __init__(self, images: list, size: int, length: int, seed: int = 0):
        self.images, self.size, self.length, self.seed, self.epoch = images, size, length, seed, 0
        self.unreadable: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.length

    def image(self, index: int) -> torch.Tensor:
        n = len(self.images)
        for k in range(n):
            item = self.images[(index + k) % n]
            if isinstance(item, torch.Tensor):
                return item
            if item in self.unreadable:
                continue
            try:
                return load_image(item)
            except Exception as e:  # noqa: BLE001 -- PIL raises many types for broken files
                self.unreadable.add(item)
                warnings.warn(f"skipped unreadable image file {item}: {e}")
        raise ValueError(f"none of the {n} image files can be read (each one's error is in the warnings above)")

    def __getitem__(self, index):
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        crop = random_resized_crop(self.image(index), self.size, gen)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        return normalize(crop)


def normalize(img: torch.Tensor) -> torch.Tensor:
    return (img - MEAN) / STD


def denormalize(img: torch.Tensor) -> torch.Tensor:
    return (img * STD.to(img.device) + MEAN.to(img.device)).clamp(0, 1)


def digits(size: int, channels: int = 3):
    """scikit-learn's bundled 8x8 digits, upsampled to size x size: (images, labels)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the linear probe needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, channels, -1, -1)
    if channels == 3:
        x = normalize(x)
    return x.contiguous(), torch.from_numpy(d.target).long()
