"""The flags and the flow that `mae-fast finetune` and `mae-fast linprobe` share: the common
flags and their checks (one-line errors, before anything is read or written), and the command
after its flags -- one run on --data, or the embedded digits, pretrained beside random-init."""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable

import torch

from .classify import train


def add_common_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    """The flags both recipes take; `defaults` holds the recipe's values."""
    p.add_argument("pretrained", help="pretraining run folder or checkpoint (mae-fast or official .pth), a timm "
                                      "encoder export, or a Hugging Face ViTMAE folder")
    p.add_argument("--data", default=None, help="folder with train/ and val/ ImageFolder trees; default: the "
                                                "embedded digits, pretrained beside random-init")
    p.add_argument("--nb-classes", type=int, default=None, help="default: the class folders found")
    p.add_argument("--input-size", type=int, default=None, help="default: the pretraining image size")
    p.add_argument("--global-pool", default=defaults["global_pool"], choices=["avg", "token"])
    for flag, kind in (("epochs", int), ("warmup_epochs", float), ("batch_size", int), ("accum_iter", int),
                       ("blr", float), ("min_lr", float), ("weight_decay", float)):
        p.add_argument("--" + flag.replace("_", "-"), type=kind, default=defaults[flag])
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--device", default="auto")
    p.add_argument("--output-dir", default=None, help="default: <the pretraining run>/" + defaults["name"])
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the newest in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="start afresh where an earlier run left checkpoints")
    p.add_argument("--keep-last", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_with_demo_defaults(p: argparse.ArgumentParser, argv, demo: dict):
    """Parses and checks the flags; without --data, `demo` replaces the recipe's defaults (flags
    given on the command line still win)."""
    if p.parse_known_args(argv)[0].data is None:
        p.set_defaults(**demo)
    args = p.parse_args(argv)
    check_common_args(args)
    return args


def check_common_args(args) -> None:
    """One-line SystemExit for a bad flag, before anything is read or written."""
    if args.nb_classes is not None and args.nb_classes < 2:
        raise SystemExit(f"--nb-classes must be >= 2, got {args.nb_classes}")
    if args.data is not None and not os.path.isdir(args.data):
        raise SystemExit(f"--data {args.data!r} is not a directory")
    if not os.path.exists(args.pretrained):
        raise SystemExit(f"{args.pretrained!r} not found: expected a run folder, a checkpoint or a Hugging Face folder")
    for name in ("epochs", "batch_size", "accum_iter", "keep_last", "input_size", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_epochs", "blr", "lr", "min_lr", "weight_decay", "num_workers"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")


def default_output_dir(args, name: str) -> str:
    src = os.path.abspath(args.pretrained)
    return os.path.join(src if os.path.isdir(src) else os.path.dirname(src), name)


def run_command(args, name: str, build: Callable, make_recipe: Callable, train_transform: Callable | None) -> dict:
    """A recipe command after its flags: --data trains one classifier; without it the embedded
    digits train two of the same shape the same way, from the pretrained encoder and from a random
    init, in <output-dir>/pretrained and <output-dir>/random-init, and print their top-1 side by
    side. build(arch, num_classes, state or None) -> model. Returns {run name: summary}."""
    from .classify_data import Digits, SeededSamples, image_folders, read_encoder

    sd, arch, _ = read_encoder(args.pretrained)
    size = (args.input_size,) * 2 if args.input_size else arch["img_size"]
    if size[0] % arch["patch_size"]:
        raise SystemExit(f"--input-size must be a multiple of the patch size {arch['patch_size']}, got {size[0]}")
    args.output_dir = args.output_dir or default_output_dir(args, name)
    if args.data is not None:
        if size[0] != size[1]:
            raise SystemExit(f"{args.pretrained} was pretrained on {size[0]} x {size[1]} crops; --data trains on "
                             "squares: pass --input-size")
        size = size[0]
        train_set, val_set = image_folders(args.data, train_transform(size), size)
        found = len(train_set.classes)
        if (args.nb_classes or found) < found:
            raise SystemExit(f"--nb-classes {args.nb_classes} is fewer than the {found} class folders in {args.data}/train")
        torch.manual_seed(args.seed)  # the head's init
        model = build(arch, args.nb_classes or found, sd)
        out = train(args, model, make_recipe, SeededSamples(train_set, args.seed), val_set, name)
        if int(os.environ.get("RANK", "0")) == 0 and out["last"]:
            print(f"{name}: top-1 {out['last']['acc1']:.2f}% (best {out['best']:.2f}%), top-5 {out['last']['acc5']:.2f}%; "
                  f"checkpoints in {out['output_dir']}")
        return {"data": out}
    if (args.nb_classes or 10) < 10:
        raise SystemExit(f"--nb-classes {args.nb_classes}: the embedded digits have 10 classes")
    train_set, val_set = Digits("train", size, arch["in_chans"]), Digits("val", size, arch["in_chans"])
    results, root = {}, args.output_dir
    for kind, state in (("pretrained", sd), ("random-init", None)):
        run_args = argparse.Namespace(**vars(args))
        run_args.output_dir = os.path.join(root, kind)
        torch.manual_seed(args.seed)  # the random init, the same in every run
        model = build(arch, args.nb_classes or 10, state)
        results[kind] = train(run_args, model, make_recipe, SeededSamples(train_set, args.seed), val_set, f"{name} {kind}")
    if int(os.environ.get("RANK", "0")) == 0 and all(r["last"] for r in results.values()):
        print(f"{name} on digits ({arch['depth']} blocks, width {arch['embed_dim']}, {size[0]}x{size[1]} px), val top-1 "
              f"after {args.epochs} epochs:")
        for kind, r in results.items():
            print(f"  {kind + ' encoder':<22}{r['last']['acc1']:6.2f}%  (best {r['best']:.2f}%)")
        print(f"runs: {root}")
    return results
