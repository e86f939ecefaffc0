"""mae_fast.data: uint8 crops that are pure functions of (seed, epoch, index), the official
RandomResizedCrop statistics, every 8-bit format decoded to RGB, unreadable files skipped."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mae_fast import data


def test_item_is_uint8_of_the_crop_size(jpeg_folder):
    ds = data.pretrain_dataset(jpeg_folder, 24, seed=0)
    assert len(ds) == 6
    for i in range(len(ds)):
        assert ds[i].dtype == torch.uint8 and ds[i].shape == (3, 24, 24)


def test_items_are_pure_functions_of_seed_epoch_and_index(jpeg_folder):
    a, b = data.pretrain_dataset(jpeg_folder, 24), data.pretrain_dataset(jpeg_folder, 24)
    b[3], b[0]  # another history changes nothing
    assert all(torch.equal(a[i], b[i]) for i in range(len(a)))
    a.set_epoch(1)
    assert not all(torch.equal(a[i], b[i]) for i in range(len(a)))  # other crops in another epoch
    assert all(torch.equal(a[i], b[1, i]) for i in range(len(a)))  # an (epoch, i) index, as the trainer's workers get
    other_seed = data.pretrain_dataset(jpeg_folder, 24, seed=1)
    assert not all(torch.equal(other_seed[i], b[i]) for i in range(len(b)))
    with pytest.raises(IndexError):
        a[len(a)]


def test_crop_parameters_follow_random_resized_crop_statistics():
    H, W = 375, 500
    params = [data.crop_params(0, e, i, H, W) for e in range(2) for i in range(500)]
    areas = [p.height * p.width / (H * W) for p in params]
    ratios = [p.width / p.height for p in params]
    for p in params:
        assert 0 <= p.top <= H - p.height and 0 <= p.left <= W - p.width
    # rounding the sides to pixels moves area and ratio by about a pixel's worth
    assert min(areas) >= 0.2 - 0.01 and max(areas) <= 1.0
    assert min(ratios) >= 3 / 4 - 0.01 and max(ratios) <= 4 / 3 + 0.01
    assert max(areas) > 0.9 and min(areas) < 0.25  # the whole range is drawn
    assert math.log(max(ratios)) > 0.25 and math.log(min(ratios)) < -0.25
    assert 0.4 < np.mean([p.flip for p in params]) < 0.6
    assert data.crop_params(3, 4, 5, H, W) == data.crop_params(3, 4, 5, H, W)


def test_a_long_thin_image_falls_back_to_the_centre_crop():
    p = data.crop_params(0, 0, 0, 10, 400)  # no 3/4..4/3 crop of >= 20% of the area fits
    assert (p.top, p.left, p.height, p.width) == (0, 195, 10, 10)


def test_uint8_resize_matches_the_float_bicubic_resize():
    img = (torch.rand(3, 60, 80) * 255).round().to(torch.uint8)
    p = data.CropParams(5, 7, 40, 50, False)
    ours = data.resized_crop(img, p, 16)
    crop = img[None, :, 5:45, 7:57].float()
    ref = F.interpolate(crop, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 255)
    assert ours.dtype == torch.uint8 and (ours.float() - ref).abs().max() <= 1.5
    flipped = data.resized_crop(img, p._replace(flip=True), 16)
    assert torch.equal(flipped, ours.flip(-1))


@pytest.mark.parametrize("name,mode", [("gray.jpg", "L"), ("cmyk.jpg", "CMYK"), ("rgba.png", "RGBA"),
                                       ("palette.png", "P"), ("gray_alpha.png", "LA"), ("gray.png", "L"),
                                       ("rgb.bmp", "RGB"), ("cmyk.tif", "CMYK"), ("palette.gif", "P"),
                                       ("rgb.webp", "RGB")])
def test_every_8_bit_format_decodes_to_rgb(tmp_path, name, mode):
    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    path = tmp_path / name
    rgb.convert(mode).save(path, **({"lossless": True} if name.endswith(".webp") else {}))
    img = data.decode_image(path)
    assert img.dtype == torch.uint8 and img.shape == (3, 20, 30)
    with Image.open(path) as im:
        expected = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(img, expected)


def test_unreadable_file_is_skipped_with_one_warning(jpeg_folder):
    (jpeg_folder / "c0" / "img0.jpg").write_bytes(b"not an image")
    ds = data.pretrain_dataset(jpeg_folder, 16)
    broken = data.image_folder(jpeg_folder).index(str(jpeg_folder / "c0" / "img0.jpg"))
    with pytest.warns(UserWarning, match=r"skipped unreadable image file .*img0\.jpg") as record:
        for _ in range(3):
            img = ds[broken]
    assert len(record) == 1
    assert torch.equal(ds.source(broken)[1], data.decode_image(data.image_folder(jpeg_folder)[broken + 1]))
    assert img.shape == (3, 16, 16)


def test_no_readable_file_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    ds = data.pretrain_dataset(tmp_path, 16)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="none of the 1 image files can be read"):
        warnings.simplefilter("ignore")
        ds[0]


def test_files_are_decoded_lazily_and_each_once_an_epoch(monkeypatch):
    from mae_fast.data import dataset as dataset_module

    files = [f"img{i}.png" for i in range(5)]
    loaded = []
    monkeypatch.setattr(dataset_module, "decode_image",
                        lambda path, channels=None: loaded.append(path) or torch.randint(0, 256, (3, 8, 12), dtype=torch.uint8))
    ds = data.PretrainCrops(files, 16)
    assert loaded == []  # nothing decoded up front
    assert ds[0].shape == (3, 16, 16)  # an 8 px image scaled up to the 16 px crop
    for i in range(1, 5):
        ds[i]
    assert loaded == files


def test_bad_arguments():
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.pretrain_dataset("/no/such/folder", 16)
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        data.PretrainCrops([torch.zeros(3, 4, 4, dtype=torch.uint8)], 0)


def test_normalize_batch_is_the_float_normalisation():
    imgs = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    out = data.normalize_batch(imgs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, data.normalize(imgs.float() / 255), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(data.denormalize(out), imgs.float() / 255, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expected uint8 or float32 images"):
        data.normalize_batch(imgs.double())


def test_the_data_package_imports_no_model_or_training_code():
    import ast
    import pathlib

    for path in pathlib.Path(data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("mae_fast"), (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("mae_fast") for a in node.names), path.name
