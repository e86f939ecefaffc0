"""A run's folder: its checkpoints (atomic, pruned, resumable), metrics.jsonl, TensorBoard log and
pictures. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os
import re

import torch

from ..io.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint


def check_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--output-dir {path!r} is not writable: {e}") from e


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pth")
# save_checkpoint's temp file: what a save killed before its rename leaves behind
CHECKPOINT_TEMP = re.compile(r"\.checkpoint-\d+\.pth\..+\.tmp")


def remove_interrupted_saves(run_dir: str) -> list[str]:
    """Deletes the temp files of checkpoint saves that never finished (a kill mid-save); returns them."""
    stale = [os.path.join(run_dir, f) for f in os.listdir(run_dir) if CHECKPOINT_TEMP.fullmatch(f)]
    for path in stale:
        os.remove(path)
    return stale


def step_of(checkpoint: str) -> int:
    return int(CHECKPOINT_NAME.fullmatch(os.path.basename(checkpoint)).group(1))


def checkpoints_in(run_dir: str) -> list[str]:
    """The run's checkpoint-<step>.pth files, oldest first. Other files (a user's checkpoint-best.pth,
    the hidden temp files of an interrupted save) are never picked."""
    names = [f for f in os.listdir(run_dir) if CHECKPOINT_NAME.fullmatch(f)] if os.path.isdir(run_dir) else []
    return sorted((os.path.join(run_dir, f) for f in names), key=step_of)


# What a resume must keep: the data order, the step count and the schedule depend on them. --epochs
# may grow (training on; the cosine schedule then stretches to the new end), with a note.
RESUME_FLAGS = ("model", "img_size", "samples_per_epoch", "warmup_epochs", "batch_size",
                "accum_iter", "blr", "lr", "min_lr", "mask_ratio", "norm_pix_loss", "seed")


def start_afresh(run_dir: str, overwrite: bool) -> None:
    """A fresh run must not mix with an earlier one in the same folder: its checkpoint pruning would
    delete the new run's checkpoints (it keeps the highest steps) and --resume auto would pick the
    old run's. With overwrite, the earlier run's checkpoints and metrics go."""
    old = checkpoints_in(run_dir)
    if old and not overwrite:
        raise SystemExit(f"--output-dir {run_dir} holds the checkpoints of an earlier run ({os.path.basename(old[-1])}): "
                         "continue it with --resume auto, or start afresh with --overwrite or another --output-dir")
    for path in old + [os.path.join(run_dir, "metrics.jsonl")]:
        if os.path.exists(path):
            os.remove(path)


def load_resume(path, model, optimizer, scaler, args, world) -> dict:
    try:
        ckpt = read_checkpoint(path)
    except (OSError, CheckpointError) as e:
        raise SystemExit(f"--resume: {e}") from e
    if "next" not in ckpt or "optimizer" not in ckpt:
        raise SystemExit(f"--resume: {path} is not a mae-fast training checkpoint (no optimizer/position)")
    saved = ckpt.get("args") or {}
    saved = saved if isinstance(saved, dict) else vars(saved)
    for name in RESUME_FLAGS:
        if name in saved and saved[name] != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"--resume: the run in {path} used {flag} {saved[name]}, this command {getattr(args, name)}; "
                             f"resume with the run's {flag} (the data order, step count and schedule depend on it)")
    if ckpt["next"]["epoch"] >= args.epochs:
        raise SystemExit(f"--resume: the run in {path} has finished its {ckpt['next']['epoch']} epochs; "
                         "pass a larger --epochs to train on")
    if saved.get("epochs", args.epochs) != args.epochs:
        print(f"--epochs {args.epochs} (the run used {saved['epochs']}): the lr schedule now ends at epoch {args.epochs}")
    if saved.get("world_size", world) != world:
        raise SystemExit(f"--resume: the run in {path} ran on {saved['world_size']} processes, this one on {world}; "
                         "the per-process batches and the data order depend on it")
    named = CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    later = [c for c in checkpoints_in(args.output_dir) if step_of(c) > step_of(path)] if named else []
    if later:
        raise SystemExit(f"--resume: {args.output_dir} holds later checkpoints than {path} ({os.path.basename(later[-1])}): "
                         "move them away to roll back (the run would prune its own checkpoints in their favour)")
    try:
        load_checkpoint(model, ckpt, strict=True)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"--resume: {path} does not fit --model {model_name(ckpt)} as configured: {e}") from e
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt


def model_name(ckpt) -> str:
    args = ckpt.get("args") or {}
    return (args if isinstance(args, dict) else vars(args)).get("model", "?")


class Run:
    """Rank 0's side effects: metrics file, checkpoints, pictures."""

    def __init__(self, args, model, optimizer, scaler, history, main_process):
        self.args, self.model, self.optimizer, self.scaler = args, model, optimizer, scaler
        self.history, self.main = history, main_process
        self.last_checkpoint, self.last_picture = None, None
        self.metrics = os.path.join(args.output_dir, "metrics.jsonl")
        self.tb = None
        if main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(args.output_dir)
            except ImportError:
                pass

    def log(self, **row):
        if not self.main:
            return
        if math.isfinite(row["loss"]):  # fp16 steps the scaler skipped are in metrics.jsonl only
            self.history.append([row["step"], row["loss"]])
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key in ("loss", "lr", "images_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def drop_metrics_after(self, step):
        """A run killed after its last checkpoint logged steps that the resumed run logs again (and a
        kill mid-write can leave a cut line): keep the rows up to the checkpoint's step only, so
        metrics.jsonl holds every step once."""
        if not self.main or not os.path.exists(self.metrics):
            return
        with open(self.metrics) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            tmp = self.metrics + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.metrics)

    def checkpoint(self, epoch, nxt, step):
        if not self.main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                 "scaler": self.scaler.state_dict(), "args": vars(self.args), "next": nxt,
                 "history": self.history}
        path = os.path.join(self.args.output_dir, f"checkpoint-{step}.pth")
        save_checkpoint(path, state)
        self.last_checkpoint = path
        for old in checkpoints_in(self.args.output_dir)[:-self.args.keep_last]:
            os.remove(old)

    def pictures(self, dataset, device, amp_dtype):
        from .pictures import loss_curve, reconstruction_grid

        imgs = torch.stack([dataset.crops[i] for i in range(min(6, len(dataset)))]).to(device)
        self.last_picture = reconstruction_grid(self.model, imgs, os.path.join(self.args.output_dir, "reconstruction.png"),
                                                mask_ratio=self.args.mask_ratio, seed=self.args.seed, amp_dtype=amp_dtype)
        loss_curve(self.history, os.path.join(self.args.output_dir, "loss.png"))

    def summary(self, interrupted=False) -> dict:
        return {"output_dir": self.args.output_dir, "checkpoint": self.last_checkpoint,
                "reconstruction": self.last_picture, "final_loss": self.history[-1][1] if self.history else None,
                "interrupted": interrupted}
