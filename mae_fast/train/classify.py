"""The training loop that fine-tuning and linear probing share, on the pretraining CLI's machinery:
the run folder's lock, atomic checkpoints (the last ones and checkpoint-best.pth), exact resume,
torchrun DDP, bf16 / fp16 autocast, --compile, metrics.jsonl, a progress bar and a PNG of the loss
and accuracy curves.

A recipe (finetune.py, linprobe.py) hands over the model and a `Recipe`: what trains, the
optimizer, the batch transform (mixup) and the loss. Every random draw of a step (drop path,
mixup) is seeded from (seed, epoch, batch, rank), and every sample's augmentation from (seed,
epoch, index): a run resumed from any checkpoint continues bitwise as the uninterrupted run (CPU).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..io.checkpoint import save_checkpoint
from .distributed import pick_device, reduce_step, setup_distributed
from .recipe import lr_at
from .run_dir import (Run, check_output_dir, checkpoints_in, kept_checkpoint_note, load_resume, lock_output_dir,
                      remove_interrupted_saves, start_afresh, unlock_output_dir)


@dataclass
class Recipe:
    trainable: torch.nn.Module                # what the optimizer trains (DDP wraps it, --compile compiles it)
    optimizer: torch.optim.Optimizer          # groups may carry "lr_scale" (layer decay)
    loss: Callable                            # (logits, targets) -> scalar
    features: Callable | None = None          # imgs -> trainable's input (a frozen encoder); None: imgs
    batch: Callable | None = None             # (imgs, labels) -> (imgs, targets), e.g. mixup
    clip_grad: float | None = None


def seed_step(seed: int, epoch: int, batch: int, rank: int) -> None:
    s = ((seed * 1_009 + epoch) * 1_000_003 + batch) * 131 + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int, batch: int) -> list[int]:
    """This rank's indices of an epoch (whole global batches), a seeded permutation split rank::world."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000 + epoch)).tolist()
    return perm[:(n // (batch * world)) * batch * world][rank::world]


@torch.no_grad()
def evaluate(model, features, val_set, batch_size, device, amp_dtype, rank, world, num_workers=0) -> dict:
    """Top-1, top-5 (%) and cross-entropy on val_set, each rank a rank::world share, summed."""
    was = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world)),
                                         batch_size=batch_size, num_workers=num_workers)
    for imgs, labels in loader:
        imgs, labels = imgs.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model.head(features(imgs)) if features else model(imgs)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(),
                             torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"),
                             torch.tensor(len(labels), device=device)]).double()
    if world > 1:
        dist.all_reduce(sums)
    model.train(was)
    top1, top5, loss, n = sums.tolist()
    return {"acc1": 100 * top1 / max(n, 1), "acc5": 100 * top5 / max(n, 1), "val_loss": loss / max(n, 1)}


class ClassifierRun(Run):
    """Run's metrics and checkpoints, plus the evaluations, the best checkpoint and the curves."""

    def __init__(self, *a, evals=None, **kw):
        super().__init__(*a, **kw)
        self.evals = evals or []
        self.best = max((e["acc1"] for e in self.evals), default=-1.0)

    def log_eval(self, row: dict) -> bool:
        """Logs an evaluation; True when it is the best so far (checkpoint-best.pth was written)."""
        self.evals.append(row)
        better = row["acc1"] > self.best
        self.best = max(self.best, row["acc1"])
        if not self.main:
            return better
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key in ("acc1", "acc5", "val_loss"):
                self.tb.add_scalar(f"val/{key}", row[key], row["step"])
        if better:
            save_checkpoint(os.path.join(self.args.output_dir, "checkpoint-best.pth"),
                            {"model": self.model.state_dict(), "args": vars(self.args), "epoch": row["epoch"],
                             "acc1": row["acc1"]})
        return better

    def checkpoint(self, epoch, nxt, step):
        if not self.main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                 "scaler": self.scaler.state_dict(), "args": vars(self.args), "next": nxt,
                 "history": self.history, "evals": self.evals}
        self.last_checkpoint = os.path.join(self.args.output_dir, f"checkpoint-{step}.pth")
        save_checkpoint(self.last_checkpoint, state)
        for old in checkpoints_in(self.args.output_dir)[:-self.args.keep_last]:
            os.remove(old)

    def pictures(self, title: str):
        if self.main:
            from .pictures import training_curves

            self.last_picture = training_curves(self.history, self.evals, os.path.join(self.args.output_dir,
                                                                                      "curves.png"), title)


def train(args, model: torch.nn.Module, make_recipe: Callable, train_set, val_set, title: str) -> dict:
    """Trains `model` with the recipe make_recipe(model, args, device) builds; returns the summary:
    output_dir, checkpoint, best (top-1 %), last (the final evaluation), curves."""
    rank, world, local_rank = setup_distributed()
    main = rank == 0
    with contextlib.ExitStack() as cleanup:
        if world > 1:
            cleanup.callback(dist.destroy_process_group)
        device = pick_device(args.device, local_rank)
        steps_per_epoch = len(epoch_order(len(train_set), args.seed, 0, rank, world, args.batch_size)) // args.batch_size
        if steps_per_epoch < args.accum_iter:
            raise SystemExit(f"{len(train_set)} training images make {steps_per_epoch} steps of --batch-size "
                             f"{args.batch_size} x {world} processes, fewer than --accum-iter {args.accum_iter}")
        if main:
            check_output_dir(args.output_dir)
            cleanup.callback(unlock_output_dir, lock_output_dir(args.output_dir), args.output_dir)
            remove_interrupted_saves(args.output_dir)
        resume = checkpoints_in(args.output_dir)[-1:] if args.resume == "auto" else [args.resume] if args.resume else []
        if main and not resume:
            start_afresh(args.output_dir, args.overwrite)
        args.world_size, args.data_source = world, train_set.source
        if args.lr is None:
            args.lr = args.blr * args.batch_size * args.accum_iter * world / 256
        precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        model.to(device)
        recipe = make_recipe(model, args, device)
        opt = recipe.optimizer
        start_epoch, start_batch, history, evals = 0, 0, [], []
        if resume:
            ckpt = load_resume(resume[0], model, opt, scaler, args, world)
            start_epoch, start_batch = ckpt["next"]["epoch"], ckpt["next"]["batch"]
            history, evals = list(ckpt.get("history", [])), list(ckpt.get("evals", []))
        step = start_epoch * steps_per_epoch + start_batch
        net = recipe.trainable
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        features = recipe.features
        if args.compile:
            net = torch.compile(net, mode=args.compile)
            features = features and torch.compile(features, mode=args.compile)
        run = ClassifierRun(args, model, opt, scaler, history, main, evals=evals)
        if run.tb is not None:
            cleanup.callback(run.tb.close)
        if resume:
            run.drop_metrics_after(step)
        bar = None
        if main and not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch * args.epochs, initial=step, unit="step", dynamic_ncols=True, desc=title)
            cleanup.callback(bar.close)
        last = evals[-1] if evals else None
        for epoch in range(start_epoch, args.epochs):
            train_set.set_epoch(epoch)
            order = epoch_order(len(train_set), args.seed, epoch, rank, world, args.batch_size)
            first = start_batch if epoch == start_epoch else 0
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, order[first * args.batch_size:]),
                                                 batch_size=args.batch_size, num_workers=args.num_workers, drop_last=True)
            model.train()
            opt.zero_grad(set_to_none=True)
            tic = fetched = time.perf_counter()
            for b, (imgs, labels) in enumerate(loader, start=first):
                data_wait = time.perf_counter() - fetched  # seconds this step waited for its batch
                seed_step(args.seed, epoch, b, rank)
                if b % args.accum_iter == 0:
                    lr = lr_at(epoch + b / steps_per_epoch, args)
                    for group in opt.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                imgs, targets = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if recipe.batch is not None:
                    imgs, targets = recipe.batch(imgs, targets)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    x = imgs if features is None else features(imgs)
                    loss = recipe.loss(net(x).float(), targets)
                loss_value, _ = reduce_step(loss.detach(), 0, world)
                if not math.isfinite(loss_value):
                    raise SystemExit(f"loss is {loss_value} at step {step} (epoch {epoch}, batch {b}); stopping. "
                                     + kept_checkpoint_note(args.output_dir))
                scaler.scale(loss / args.accum_iter).backward()
                at_end = b + 1 == steps_per_epoch
                if (b + 1) % args.accum_iter == 0:
                    if recipe.clip_grad:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(recipe.trainable.parameters(), recipe.clip_grad)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                step += 1
                images_per_s = (b + 1 - first) * args.batch_size * world / max(time.perf_counter() - tic, 1e-9)
                run.log(step=step, epoch=epoch, loss=loss_value, lr=lr, images_per_s=images_per_s, data_wait=data_wait)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                window_end = at_end or (b + 1) % args.accum_iter == 0
                if window_end and args.max_steps and step >= args.max_steps and not at_end:
                    run.checkpoint(epoch, {"epoch": epoch, "batch": b + 1}, step)
                    return summary(run, last)
                fetched = time.perf_counter()
            last = evaluate(model, recipe.features, val_set, args.batch_size, device, amp_dtype, rank, world,
                            args.num_workers)
            last = {"epoch": epoch, "step": step, **last}
            run.log_eval(last)
            if bar is not None:
                bar.write(f"{title} epoch {epoch}: top-1 {last['acc1']:.2f}%  top-5 {last['acc5']:.2f}%  "
                          f"val loss {last['val_loss']:.4f}")
            run.checkpoint(epoch, {"epoch": epoch + 1, "batch": 0}, step)
            run.pictures(title)
            if args.max_steps and step >= args.max_steps:
                break
        return summary(run, last)


def summary(run: ClassifierRun, last) -> dict:
    return {"output_dir": run.args.output_dir, "checkpoint": run.last_checkpoint, "best": run.best if run.evals else None,
            "last": last, "curves": run.last_picture}
