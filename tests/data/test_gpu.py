"""The GPU backend: the workers' side and the shared crop parameters on CPU; nvJPEG's crops
against the CPU backend's on a GPU."""
import os

import pytest
import torch

from mae_fast import data
from mae_fast.data import gpu


def test_workers_hand_over_jpeg_bytes_and_decoded_images_of_other_formats(jpeg_folder):
    ds = data.pretrain_dataset(jpeg_folder, 16)
    files = data.image_folder(jpeg_folder)
    for i, path in enumerate(files):
        src = gpu.encoded_source(ds, i)
        if path.endswith(".jpg"):
            with open(path, "rb") as f:
                assert src.dim() == 1 and src.numpy().tobytes() == f.read()
        else:
            assert torch.equal(src, data.decode_image(path))


def test_crop_batch_cuts_the_cpu_backends_crops(jpeg_folder):
    """On the CPU device the batch decoder is libjpeg as on the CPU backend: the crops are equal,
    so the two backends share the crop parameters exactly."""
    ds = data.pretrain_dataset(jpeg_folder, 16, seed=3)
    keys = [(2, i) for i in range(len(ds))]
    out = gpu.crop_batch([gpu.encoded_source(ds, i) for _, i in keys], keys, ds, device="cpu")
    assert out.dtype == torch.uint8 and out.shape == (len(ds), 3, 16, 16)
    assert torch.equal(out, torch.stack([ds[key] for key in keys]))


def test_a_broken_jpeg_takes_the_next_readable_image_as_on_the_cpu_backend(jpeg_folder):
    path = data.image_folder(jpeg_folder)[1]
    with open(path, "r+b") as f:
        f.truncate(40)  # JPEG magic, then nothing
    ds = data.pretrain_dataset(jpeg_folder, 16)
    with pytest.warns(UserWarning, match="skipped unreadable image file"):
        out = gpu.crop_batch([gpu.encoded_source(ds, 1)], [(0, 1)], ds, device="cpu")
    assert torch.equal(out[0], ds[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_without_cuda_the_backend_refuses_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="--data-backend gpu .* has none; use --data-backend cpu"):
        gpu.check_cuda()
    from mae_fast.train import pretrain

    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        pretrain.main(["--data-backend", "gpu", "--output-dir", str(out), "--quiet"])
    assert not os.path.exists(out)  # refused before anything is written


@pytest.mark.gpu
def test_gpu_crops_match_the_cpu_crops_within_interpolation_tolerance(jpeg_folder):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ds = data.pretrain_dataset(jpeg_folder, 24, seed=1)
    keys = [(0, i) for i in range(len(ds))]
    out = gpu.crop_batch([gpu.encoded_source(ds, i) for _, i in keys], keys, ds, device="cuda")
    ref = torch.stack([ds[key] for key in keys])
    assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == ref.shape
    diff = (out.cpu().float() - ref.float()).abs()
    # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a few levels; the crop is the same
    assert diff.mean() < 3 and diff.max() < 64, (diff.mean(), diff.max())
    # a crop of another place would differ by far more than that
    other = torch.stack([ds[1, i] for _, i in keys])
    assert (other.float() - ref.float()).abs().mean() > 3 * diff.mean()
