"""The official pretraining recipe's optimizer pieces (facebookresearch/mae main_pretrain.py)."""
from __future__ import annotations

import math


def param_groups(model, weight_decay):
    """The official exemptions: no decay on 1-D parameters and biases (cls/mask tokens decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(epoch: float, args) -> float:
    """Linear warmup, then half-cycle cosine down to min_lr; epoch is fractional."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
