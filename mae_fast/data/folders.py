"""Image folders: the files of an ImageFolder tree (or a flat folder) and a cheap identity of them."""
from __future__ import annotations

import hashlib
import os

from .images import IMAGE_EXTENSIONS


def image_folder(root: str) -> list[str]:
    """Image files under root (an ImageFolder tree or a flat folder), sorted for reproducibility."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root!r} is not a directory")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    return files


def fingerprint(names: list[str]) -> dict:
    """A cheap identity of a data set: its file count and a hash of its sorted relative file names
    (no file is read), so a resume can tell other data from the same folder moved elsewhere."""
    digest = hashlib.sha256("\n".join(sorted(n.replace(os.sep, "/") for n in names)).encode()).hexdigest()
    return {"files": len(names), "names_sha256": digest[:16]}
