"""`mae-fast pretrain`'s flags: parsing and every check made before anything is written."""
from __future__ import annotations

import argparse
import math
import os

from .. import data as mdata
from ..data import gpu as gpu_data
from ..models.masking import len_keep_for
from ..models.presets import PRESETS
from .help_formatter import DefaultsHelpFormatter
from .loader import default_num_workers

DESCRIPTION = "`mae-fast pretrain` (also `python -m mae_fast.pretrain`): MAE pretraining with the official recipe."


def parse_args(argv=None):
    p = argparse.ArgumentParser("mae-fast pretrain", description=DESCRIPTION,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(PRESETS), help="model preset")
    p.add_argument("--img-size", type=int, default=None, metavar="S",
                   help="square crops of S x S pixels (default: the preset's size: "
                        + ", ".join(f"{name} {size}" for name, (size, _) in PRESETS.items()) + ")")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="crops of H x W pixels (non-square); instead of --img-size")
    p.add_argument("--in-chans", type=int, default=None, metavar="N",
                   help="channels of the images, read as stored (1: grayscale; N: multi-channel TIFF), 8- or "
                        "16-bit (default: every image converted to 8-bit RGB)")
    p.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="per-channel mean of the pixels in [0, 1] (default: ImageNet's for RGB data)")
    p.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                   help="per-channel std of the pixels in [0, 1], with --mean")
    p.add_argument("--norm", default=None, choices=["imagenet", "auto"],
                   help=f"auto: --mean/--std measured on up to {mdata.stats.STATS_SAMPLE} images of --data "
                        "(default: imagenet for RGB data; other --in-chans need auto or --mean/--std)")
    p.add_argument("--data", default=None, help="ImageFolder tree (default: the embedded sample photos)")
    p.add_argument("--samples-per-epoch", type=int, default=None,
                   help="crops drawn per epoch (default: 2048 for the embedded photos, else one per image)")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from these weights: an official .pth, a Hugging Face ViTMAE folder or a "
                        "mae-fast checkpoint or run folder; position tables are interpolated and the decoder "
                        "may be missing (default: random init)")
    p.add_argument("--epochs", type=int, default=12, help="epochs of the run")
    p.add_argument("--warmup-epochs", type=float, default=2, help="epochs of linear lr warmup")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--accum-iter", type=int, default=1, help="steps of gradient accumulation per optimizer step")
    p.add_argument("--blr", type=float, default=1.5e-4, help="lr = blr * effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: from --blr)")
    p.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--clip-grad", type=float, default=None, metavar="MAX_NORM",
                   help="clip the gradients' global norm to MAX_NORM (default: no clipping)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches removed")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="per-patch normalised targets")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the model, in this mode (reduce-overhead: CUDA graphs on GPU; default: eager)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the encoder and decoder blocks' activations in the backward: less memory "
                        "(ViT-L/H at high resolution) for one more forward of the blocks")
    p.add_argument("--device", default="auto", help="auto: CUDA (this process's local rank) if present, else CPU")
    p.add_argument("--output-dir", default="runs/mae-demo", help="the run folder")
    p.add_argument("--resume", default=None,
                   help="checkpoint path, or 'auto' for the newest in --output-dir (default: a fresh start)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output-dir that holds an earlier run: deletes its checkpoints and metrics")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--vis-every", type=int, default=4, help="epochs between reconstruction pictures")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps, at the end of an --accum-iter window (default: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the crops, the masks and the data order")
    p.add_argument("--num-workers", type=int, default=None,
                   help=f"DataLoader worker processes (0: load in the main process) (default: the CPUs available "
                        f"to this process / the processes on this node: {default_num_workers()} here)")
    p.add_argument("--data-backend", default="cpu", choices=["cpu", "gpu"],
                   help="where images are decoded and cropped: cpu (DataLoader workers) or gpu (JPEG batches "
                        "decoded with nvJPEG on the training GPU; workers only read the files)")
    p.add_argument("--log-every", type=int, default=20, metavar="N",
                   help="steps between progress lines when stdout is not a terminal (a terminal gets a progress bar)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    args = p.parse_args(argv)
    if args.data is not None and not os.path.isdir(args.data):
        p.error(f"--data {args.data!r} is not a directory")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume: checkpoint not found: {args.resume!r} (or pass 'auto' for the newest in --output-dir)")
    if args.init is not None and args.resume is not None:
        p.error("--init starts a new run from weights; --resume continues a run: pass one of them")
    if args.init is not None and not os.path.exists(args.init):
        p.error(f"--init {args.init!r}: no such file or folder")
    for name in ("epochs", "batch_size", "accum_iter", "keep_last", "vis_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    # 0 must not mean "the default" (they are read with `or`); a silently ignored limit is a bug
    for name in ("samples_per_epoch", "max_steps", "img_size", "in_chans"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_epochs", "blr", "lr", "min_lr", "weight_decay", "num_workers"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.clip_grad is not None and not (math.isfinite(args.clip_grad) and args.clip_grad > 0):
        p.error(f"--clip-grad must be a finite number > 0, got {args.clip_grad}")
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    if args.in_chans is not None and args.data is None:
        p.error(f"--in-chans {args.in_chans} reads your files as stored: pass --data DIR (the embedded photos are RGB)")
    if args.data_backend == "gpu":
        if args.in_chans is not None:
            p.error("--data-backend gpu decodes JPEGs to RGB; use --data-backend cpu with --in-chans")
        try:
            gpu_data.check_cuda(None if args.device == "auto" else args.device)
        except (ValueError, RuntimeError) as e:
            p.error(str(e))
    check_pixel_stats(p, args)
    default_size, preset = PRESETS[args.model]
    patch = preset["patch_size"]
    if args.img_size is not None and args.input_size is not None:
        p.error("--img-size S is the square --input-size S S: pass one of them")
    if args.input_size is not None:
        if min(args.input_size) < 1 or any(v % patch for v in args.input_size):
            p.error(f"--input-size must be two multiples of the patch size {patch} of --model {args.model}, "
                    f"got {' '.join(map(str, args.input_size))}")
        if args.input_size[0] == args.input_size[1]:  # saved as the square --img-size: one name for one run
            args.img_size, args.input_size = args.input_size[0], None
    if args.img_size is not None and args.img_size % patch:
        p.error(f"--img-size must be a multiple of the patch size {patch} of --model {args.model}, got {args.img_size}")
    # the model checks the ratio only at its first forward, after the output folder exists
    h, w = crop_size(args)
    try:
        len_keep_for((h // patch) * (w // patch), args.mask_ratio)
    except ValueError as e:
        p.error(f"--mask-ratio {args.mask_ratio}: {e} (--model {args.model} at {h}x{w} px)")
    return args


def crop_size(args) -> tuple[int, int]:
    """(H, W) of the run's crops: --input-size, --img-size or the preset's."""
    if args.input_size is not None:
        return tuple(args.input_size)
    size = args.img_size or PRESETS[args.model][0]
    return size, size


def check_pixel_stats(p, args) -> None:
    """--mean/--std, --norm: one value per channel, or a way to get them. Sets args.mean and
    args.std except for --norm auto, which the data set resolves (build_dataset)."""
    channels = args.in_chans or 3
    if (args.mean is None) != (args.std is None):
        p.error("--mean and --std go together: pass both, one value per channel each")
    if args.mean is not None:
        if args.norm is not None:
            p.error(f"--norm {args.norm} and --mean/--std both set the statistics: pass one of them")
        for name in ("mean", "std"):
            values = getattr(args, name)
            if len(values) != channels:
                p.error(f"--{name} needs one value per channel: {channels} (--in-chans {channels}), got "
                        f"{len(values)}: {' '.join(map(str, values))}")
            if not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
                p.error(f"--{name} values must be finite{' and > 0' if name == 'std' else ''}, got "
                        f"{' '.join(map(str, values))}")
        return
    if args.norm == "auto":
        return
    if channels != 3:
        p.error(f"--in-chans {channels}: ImageNet's statistics are for 3 channels; pass --norm auto (measured on "
                f"--data) or --mean and --std, {channels} values each")
    args.mean, args.std = list(mdata.IMAGENET_MEAN), list(mdata.IMAGENET_STD)
    args.norm = args.norm or "imagenet"
