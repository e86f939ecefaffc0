import numpy as np
import pytest


@pytest.fixture
def jpeg_folder(tmp_path):
    """An ImageFolder tree of small JPEGs of both orientations, and one PNG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(30, 40), (40, 30), (36, 36), (25, 50), (50, 25)]):
        (tmp_path / f"c{k % 2}").mkdir(exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(tmp_path / f"c{k % 2}" / f"img{k}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "c0" / "img5.png")
    return tmp_path
