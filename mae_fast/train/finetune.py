"""`mae-fast finetune RUN_OR_CHECKPOINT [--data FOLDER --nb-classes N]`: end-to-end fine-tuning of a
pretrained MAE encoder with the official recipe (facebookresearch/mae main_finetune.py).

AdamW with layer-wise lr decay (0.65 for 12 blocks, ViT-B; 0.75 deeper, ViT-L/H), weight decay
0.05, drop path 0.1, mixup 0.8 / cutmix 1.0 with label smoothing 0.1, RandAugment
rand-m9-mstd0.5-inc1 and random erasing 0.25 (timm's, as the official recipe), lr = blr * effective
batch / 256 with blr 5e-4, 5 warm-up epochs then half-cycle cosine per iteration; top-1 / top-5 on
val/ every epoch; the last and the best checkpoints. Global average pooling with fc_norm by
default (--global-pool token: the cls token). Without --data: the embedded digits, pretrained
beside random-init, with a shorter schedule.
"""
from __future__ import annotations

import argparse

import torch

from ..models.classifier import VisionTransformer
from .classify import Recipe
from .classify_cli import add_common_args, parse_with_demo_defaults, run_command
from .classify_data import MEAN, STD, build_classifier
from .lr_decay import param_groups_lrd

OFFICIAL = dict(name="finetune", global_pool="avg", epochs=100, warmup_epochs=5, batch_size=64, accum_iter=1,
                blr=5e-4, min_lr=1e-6, weight_decay=0.05)
DIGITS = dict(epochs=15, warmup_epochs=1, blr=4e-3)  # the embedded default: a short demo on a CPU


def _timm():
    try:
        import timm.data
    except ImportError as e:
        raise SystemExit("mae-fast finetune needs timm (the official recipe's RandAugment, random erasing and "
                         "mixup / cutmix): pip install timm, or pip install 'mae_fast[finetune]'") from e
    return timm.data


def parse_args(argv=None):
    p = argparse.ArgumentParser("mae-fast finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, OFFICIAL)
    p.add_argument("--layer-decay", type=float, default=None, help="default: 0.65 for 12 blocks or fewer, else 0.75")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('none': off)")
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--clip-grad", type=float, default=None)
    args = parse_with_demo_defaults(p, argv, DIGITS)
    for name in ("drop_path", "smoothing", "reprob"):
        if not 0 <= getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for name in ("mixup", "cutmix", "clip_grad", "layer_decay"):
        value = getattr(args, name)
        if value is not None and not (value >= 0 and value < float("inf")):
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        raise SystemExit(f"--batch-size must be even with mixup / cutmix (they pair samples), got {args.batch_size}")
    return args


def train_transform(args):
    def make(size):
        return _timm().create_transform(size, is_training=True, color_jitter=None, interpolation="bicubic",
                                         auto_augment=None if args.aa == "none" else args.aa, re_prob=args.reprob,
                                         re_mode="pixel", re_count=1, mean=MEAN, std=STD)

    return make


def soft_target_cross_entropy(logits, targets):
    return torch.sum(-targets * logits.log_softmax(dim=-1), dim=-1).mean()


def make_recipe(model: VisionTransformer, args, device) -> Recipe:
    decay = args.layer_decay if args.layer_decay is not None else (0.65 if len(model.blocks) <= 12 else 0.75)
    groups = param_groups_lrd(model, args.weight_decay, model.no_weight_decay(), decay)
    opt = torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")
    if args.mixup or args.cutmix:
        mixup = _timm().Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=1.0, switch_prob=0.5,
                              mode="batch", label_smoothing=args.smoothing, num_classes=model.num_classes)
        return Recipe(model, opt, soft_target_cross_entropy, batch=mixup, clip_grad=args.clip_grad)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    return Recipe(model, opt, ce, clip_grad=args.clip_grad)


def main(argv=None) -> dict:
    args = parse_args(argv)

    def build(arch, num_classes, state):
        return build_classifier(arch, args, num_classes, state, head_init_std=2e-5, drop_path=args.drop_path)

    return run_command(args, "finetune", build, make_recipe, train_transform(args))


if __name__ == "__main__":
    main()
