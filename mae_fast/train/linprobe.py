"""`mae-fast linprobe RUN_OR_CHECKPOINT [--data FOLDER --nb-classes N]`: the official linear probe
(facebookresearch/mae main_linprobe.py) of a frozen pretrained MAE encoder.

The encoder is frozen; a BatchNorm without affine parameters normalises its features before the
linear head (trunc-normal std 0.01), trained with LARS (momentum 0.9, trust coefficient 0.001),
blr 0.1, no weight decay, lr = blr * effective batch / 256 (the official batch is 16384: use
--accum-iter), 10 warm-up epochs then half-cycle cosine, 90 epochs, RandomResizedCrop + flip only.
The cls token (after the final norm) by default, as the official probe. Without --data: the
embedded digits, pretrained beside random-init (`mae-fast probe` is the seconds-long check: a
logistic regression on the frozen features, no training loop).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from .classify import Recipe
from .classify_cli import add_common_args, parse_with_demo_defaults, run_command
from .classify_data import MEAN, STD, build_classifier
from .lars import LARS

OFFICIAL = dict(name="linprobe", global_pool="token", epochs=90, warmup_epochs=10, batch_size=512, accum_iter=1,
                blr=0.1, min_lr=0.0, weight_decay=0.0)
# the embedded default, a short demo on a CPU: its batch of 64 at the official absolute lr (0.1 * 16384 / 256)
DIGITS = dict(epochs=30, warmup_epochs=3, batch_size=64, blr=25.6)


def parse_args(argv=None):
    p = argparse.ArgumentParser("mae-fast linprobe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, OFFICIAL)
    return parse_with_demo_defaults(p, argv, DIGITS)


def train_transform(size):
    try:
        from torchvision import transforms
    except ImportError as e:
        raise SystemExit("--data needs torchvision: pip install torchvision") from e
    return transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def with_probe_head(model):
    """The official probe's model: BatchNorm1d(affine=False, eps=1e-6) before the head, everything
    but the head frozen."""
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


def make_recipe(model, args, device) -> Recipe:
    def features(imgs):
        with torch.no_grad():
            return model.forward_features(imgs)

    opt = LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return Recipe(model.head, opt, nn.CrossEntropyLoss(), features=features)


def build(args):
    def make(arch, num_classes, state):
        return with_probe_head(build_classifier(arch, args, num_classes, state, head_init_std=0.01))

    return make


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_command(args, "linprobe", build(args), make_recipe, train_transform)


if __name__ == "__main__":
    main()
