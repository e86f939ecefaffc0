"""Own data as stored: grayscale and multi-channel images, 8- and 16-bit PNG and TIFF at their real
bit depth, channel counts checked, non-square crops, per-channel statistics."""
import numpy as np
import pytest
import torch

from mae_fast import data

tifffile = pytest.importorskip("tifffile")


def gray16(tmp_path, name="g16.png", shape=(20, 30), seed=0):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / name)
    return tmp_path / name, arr


def test_16_bit_grayscale_png_keeps_its_16_bits(tmp_path):
    path, arr = gray16(tmp_path)
    img = data.decode_image(path, channels=1)
    assert img.dtype == torch.uint16 and img.shape == (1, 20, 30)
    assert np.array_equal(img[0].numpy(), arr)
    assert data.decode_image(path).dtype == torch.uint8  # the default RGB mode: 8-bit RGB, as before
    unit = data.load_image(path, channels=1)
    assert unit.dtype == torch.float32 and torch.equal(unit[0], torch.from_numpy(arr.astype(np.float32)) / 65535)


def test_8_bit_grayscale_stays_uint8_with_one_channel(tmp_path):
    from PIL import Image

    arr = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    for name in ("g8.png", "g8.tif", "g8.bmp"):
        Image.fromarray(arr).save(tmp_path / name)
        img = data.decode_image(tmp_path / name, channels=1)
        assert img.dtype == torch.uint8 and torch.equal(img[0], torch.from_numpy(arr)), name


@pytest.mark.parametrize("layout", ["planar", "pages", "interleaved"])
def test_multi_channel_tiff_reads_every_channel(tmp_path, layout):
    arr = np.random.default_rng(2).integers(0, 65536, (5, 12, 18), dtype=np.uint16)
    path = tmp_path / "five.tif"
    if layout == "planar":
        tifffile.imwrite(path, arr)
    elif layout == "pages":
        with tifffile.TiffWriter(path) as tif:
            for page in arr:
                tif.write(page, contiguous=True)
    else:
        tifffile.imwrite(path, np.moveaxis(arr, 0, -1), photometric="minisblack", planarconfig="contig")
    img = data.decode_image(path, channels=5)
    assert img.dtype == torch.uint16 and np.array_equal(img.numpy(), arr)


def test_a_file_with_another_channel_count_names_itself_and_both_counts(tmp_path):
    path, _ = gray16(tmp_path)
    with pytest.raises(data.ChannelMismatch, match=rf"^{path} has 1 channel; expected 3$"):
        data.decode_image(path, channels=3)
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((5, 8, 8), np.uint8))
    with pytest.raises(data.ChannelMismatch, match=r"five.tif has 5 channels; expected 1$"):
        data.decode_image(tmp_path / "five.tif", channels=1)
    ds = data.pretrain_dataset(tmp_path, 8, in_chans=1)  # never skipped as unreadable: the data is wrong
    with pytest.raises(data.ChannelMismatch):
        [ds[i] for i in range(len(ds))]


def test_float_samples_are_refused_by_name(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"f.tif: float32 samples; expected 8- or 16-bit unsigned integers"):
        data.decode_image(tmp_path / "f.tif", channels=1)


def test_16_bit_crops_are_float_in_0_1_with_more_than_8_bits(tmp_path):
    gray16(tmp_path)
    ds = data.pretrain_dataset(tmp_path, (8, 12), in_chans=1)
    crop = ds[0]
    assert crop.dtype == torch.float32 and crop.shape == (1, 8, 12)
    assert 0 <= crop.min() and crop.max() <= 1
    assert not torch.allclose(crop * 255, (crop * 255).round(), atol=1e-3)  # not 8-bit values
    # the same crop as a float resize of the 16-bit image
    img = data.decode_image(tmp_path / "g16.png", channels=1)
    p = ds.params(0, 0, 20, 30)
    ref = data.resized_crop(img.to(torch.float32) / 65535, p, (8, 12))
    torch.testing.assert_close(crop, ref, rtol=0, atol=1e-6)


def test_pretrain_dataset_keeps_its_signature_and_takes_non_square_sizes(jpeg_folder):
    square = data.pretrain_dataset(jpeg_folder, 24, seed=0)
    assert square[0].shape == (3, 24, 24) and square[0].dtype == torch.uint8
    wide = data.pretrain_dataset(jpeg_folder, (16, 24), seed=0, in_chans=3)
    assert wide[0].shape == (3, 16, 24) and wide[0].dtype == torch.uint8
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        data.pretrain_dataset(jpeg_folder, (16, 0))


def test_channel_stats_are_the_pixel_mean_and_std_of_the_sample(tmp_path):
    arrays = [gray16(tmp_path, f"{k}.png", (10 + k, 14), seed=k)[1] for k in range(3)]
    mean, std = data.channel_stats(data.pretrain_dataset(tmp_path, 8, in_chans=1))
    pixels = np.concatenate([a.ravel() / 65535 for a in arrays])
    assert mean == pytest.approx([pixels.mean()], abs=1e-6) and std == pytest.approx([pixels.std()], abs=1e-6)
    again = data.channel_stats(data.pretrain_dataset(tmp_path, 8, in_chans=1))
    assert again == (mean, std)
    few = data.channel_stats(data.pretrain_dataset(tmp_path, 8, in_chans=1), max_images=1)
    assert few != (mean, std)  # a sample of one image


def test_normalize_batch_takes_float_crops_and_checks_the_channel_count():
    imgs = torch.rand(2, 5, 4, 4)
    mean, std = [0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]
    out = data.normalize_batch(imgs, mean, std)
    ref = (imgs - torch.tensor(mean).view(5, 1, 1)) / torch.tensor(std).view(5, 1, 1)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(data.denormalize(out, mean, std), imgs)
    u8 = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(data.normalize_batch(u8, [0.5], [0.25]), (u8.float() / 255 - 0.5) / 0.25)
    with pytest.raises(ValueError, match=r"one value per channel \(5\), got 3 and 3"):
        data.normalize_batch(imgs, data.IMAGENET_MEAN, data.IMAGENET_STD)
