"""Bundled data, nothing downloaded: the sample photos inside scikit-image's wheel and
scikit-learn's 8x8 digits (the linear probe's set)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .images import decode_with_pil
from .normalize import normalize

SAMPLE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                 "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                 "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
                 "retina.jpg", "rocket.jpg", "text.png")


def _skimage_data_root() -> str:
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the embedded demo data needs scikit-image: pip install scikit-image "
                          "(or pass --data DIR with an ImageFolder tree)") from e
    return os.path.dirname(skimage.data.__file__)


def sample_photo_names() -> list[str]:
    """The SAMPLE_PHOTOS this scikit-image ships (older versions lack some)."""
    root = _skimage_data_root()
    return [name for name in SAMPLE_PHOTOS if os.path.exists(os.path.join(root, name))]


def sample_photos() -> list[torch.Tensor]:
    """The photos bundled with scikit-image, each a uint8 RGB tensor (3, H, W)."""
    root = _skimage_data_root()
    # PIL: libpng would print a warning about some of these files' colour profiles
    return [decode_with_pil(os.path.join(root, name)) for name in sample_photo_names()]


def digits(size, channels: int = 3):
    """scikit-learn's bundled 8x8 digits, upsampled to size S (or (H, W)): (images, labels)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the linear probe needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size) if isinstance(size, int) else tuple(size), mode="bilinear", align_corners=False)
    x = x.expand(-1, channels, -1, -1)
    if channels == 3:
        x = normalize(x)
    return x.contiguous(), torch.from_numpy(d.target).long()
