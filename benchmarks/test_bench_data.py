"""Benchmarks (measurements, not tests): the data pipeline's images/s on a JPEG folder that the
suite generates (ImageNet-like 500x375 and 375x500 photos-to-be, quality 90; nothing downloaded).

CPU, one worker (1 thread, in this process): decode + RandomResizedCrop(224, scale 0.2-1) + flip
of mae_fast.data (uint8 all the way; normalisation happens on the device) against the
torchvision ImageFolder pipeline (PIL open, RandomResizedCrop, flip, ToTensor, Normalize), in the
same run; the ratio goes to the results file. CUDA: the GPU backend (nvJPEG batch decode, crop and
resize on the GPU) in images/s, batches of 256.

    pytest benchmarks/test_bench_data.py [--bench-quick]
"""
import numpy as np
import pytest
import torch

from mae_fast import data
from mae_fast.data import gpu

SIZE = 224
_RESULTS = {}


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory, bench_quick):
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    count = 8 if bench_quick else 200
    for k in range(count):
        h, w = (375, 500) if k % 2 else (500, 375)
        # smooth gradients plus noise: JPEG sizes closer to photos' than pure noise gives
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (k + 1)) % 256, (yy * 3) % 256, ((xx + yy) * 2) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        (root / f"c{k % 4}").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / f"c{k % 4}" / f"{k}.jpg", quality=90)
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread(bench_record):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if {"mae_fast", "torchvision_pil"} <= set(_RESULTS):
        ratio = _RESULTS["mae_fast"] / _RESULTS["torchvision_pil"]
        bench_record.row("data_cpu_1worker", "mae_fast", "speedup_vs_torchvision_pil", ratio)
        print(f"\ndata pipeline, 1 worker: mae_fast {_RESULTS['mae_fast']:.0f} img/s, torchvision PIL "
              f"{_RESULTS['torchvision_pil']:.0f} img/s: {ratio:.2f}x")


def _torchvision_pil_pipeline(folder):
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    return datasets.ImageFolder(str(folder), transform=tf)


@pytest.mark.parametrize("pipeline", ["mae_fast", "torchvision_pil"])
def test_cpu_pipeline_one_worker(benchmark, bench_quick, jpeg_folder, pipeline):
    ds = data.pretrain_dataset(jpeg_folder, SIZE) if pipeline == "mae_fast" else _torchvision_pil_pipeline(jpeg_folder)
    benchmark.group = "data_cpu_1worker"

    def epoch():
        for i in range(len(ds)):
            ds[i]

    benchmark.pedantic(epoch, rounds=3 if bench_quick else 5, warmup_rounds=1)
    images_per_s = len(ds) / benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = images_per_s
    _RESULTS[pipeline] = images_per_s


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU backend needs a CUDA GPU")
def test_gpu_backend(benchmark, bench_quick, jpeg_folder):
    ds = data.pretrain_dataset(jpeg_folder, SIZE)
    batch = min(len(ds), 256)
    keys = [(0, i) for i in range(batch)]
    sources = [gpu.encoded_source(ds, i) for _, i in keys]  # the workers' part: reading the files

    def run():
        gpu.crop_batch(sources, keys, ds, "cuda")
        torch.cuda.synchronize()

    benchmark.group = "data_gpu_backend"
    benchmark.pedantic(run, rounds=3 if bench_quick else 10, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
