"""mae_fast.data: the pretraining data, fast and deterministic, for the CLI and for your own loop.

    from mae_fast.data import normalize_batch, pretrain_dataset

    dataset = pretrain_dataset("/data/imagenet/train", 224, seed=0)
    dataset.set_epoch(epoch)             # item i: uint8 (3, 224, 224), a pure function of (seed, epoch, i)
    imgs = normalize_batch(batch.cuda(non_blocking=True))  # float32, on the device

Files are decoded straight to uint8 (torchvision.io, PIL for the other formats), the crop is cut
before it is resized, and resized on uint8: no float image is made on the CPU. With in_chans=N
files are read as stored (grayscale, multi-channel TIFF through tifffile) at their bit depth:
16-bit data comes out as float32 in [0, 1], never squashed to 8 bits; channel_stats gives the
per-channel mean and std of such data for normalize_batch. gpu.py decodes
JPEG batches on the GPU with the same crop parameters. Imports no model or training code.
"""
from .crops import RATIO, SCALE, CropParams, crop_params, resized_crop
from .dataset import PretrainCrops, pretrain_dataset
from .folders import fingerprint, image_folder
from .images import IMAGE_EXTENSIONS, ChannelMismatch, decode_image, load_image, to_unit_float
from .normalize import IMAGENET_MEAN, IMAGENET_STD, MEAN, STD, denormalize, normalize, normalize_batch
from .samples import SAMPLE_PHOTOS, digits, sample_photo_names, sample_photos
from .stats import channel_stats

__all__ = ["pretrain_dataset", "PretrainCrops", "crop_params", "CropParams", "resized_crop", "SCALE", "RATIO",
           "decode_image", "load_image", "to_unit_float", "ChannelMismatch", "IMAGE_EXTENSIONS", "image_folder", "fingerprint", "normalize_batch",
           "normalize", "denormalize", "IMAGENET_MEAN", "IMAGENET_STD", "MEAN", "STD", "sample_photos",
           "sample_photo_names", "SAMPLE_PHOTOS", "digits", "channel_stats"]
