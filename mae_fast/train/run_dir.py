"""A run's folder: its checkpoints (atomic, pruned, resumable), metrics.jsonl, TensorBoard log and
pictures. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os
import re

import torch

from ..data import IMAGENET_MEAN, IMAGENET_STD, normalize_batch, to_unit_float
from ..io.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from ..models.presets import PRESETS

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there do not lock their folder
    fcntl = None


def check_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")  # per process: two runs may start at once
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--output-dir {path!r} is not writable: {e}") from e


# Held (flock) by the run that owns the folder. The kernel drops the lock when its process dies, so
# the file a killed run leaves behind blocks nobody.
LOCK_FILE = ".mae-fast-run.lock"


def lock_output_dir(path: str) -> int:
    """Makes this process the folder's one run: two runs in one folder would overwrite each other's
    checkpoints and interleave metrics.jsonl. Returns the lock's file descriptor for unlock_output_dir."""
    lock_path = os.path.join(path, LOCK_FILE)
    if fcntl is None:
        return -1
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # held by another run; anything else is the filesystem
                os.close(fd)
                raise SystemExit(f"--output-dir {path}: cannot lock {LOCK_FILE} there ({e.strerror}); "
                                 "expected a filesystem that supports flock") from None
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise SystemExit(f"--output-dir {path} is in use by another mae-fast pretrain run"
                             f"{f' (pid {holder})' if holder else ''}: wait for it to end, or use another --output-dir") from None
        # an ending run removes its lock file: if that happened between our open and our lock, we
        # hold the removed file, which nobody else sees; lock the current one instead
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def unlock_output_dir(fd: int, path: str) -> None:
    """Removes the lock file while still holding its lock (a run that opened it meanwhile sees it
    gone and retries), then releases it."""
    if fd < 0:
        return
    try:
        os.remove(os.path.join(path, LOCK_FILE))
    except FileNotFoundError:
        pass
    os.close(fd)


def kept_checkpoint_note(run_dir: str) -> str:
    """What a stopped run leaves to resume from, for its error message."""
    found = checkpoints_in(run_dir)
    if found:
        return f"The last good checkpoint, {found[-1]}, is kept; --resume auto continues from it."
    return f"No checkpoint has been saved in {run_dir} yet: there is none to resume from."


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
RESUME_FLAGS = ("model", "img_size", "input_size", "in_chans", "mean", "std", "samples_per_epoch",
                "warmup_epochs", "batch_size", "accum_iter", "blr", "lr", "min_lr", "mask_ratio", "norm_pix_loss",
                "seed")


def start_afresh(run_dir: str, overwrite: bool) -> None:
    """A fresh run must not mix with an earlier one in the same folder: its checkpoint pruning would
    delete the new run's checkpoints (it keeps the highest steps) and --resume auto would pick the
    old run's. With overwrite, the earlier run's checkpoints go. A fresh run owns fresh metrics:
    the metrics.jsonl and TensorBoard logs of an earlier run (one killed before its first
    checkpoint, or one overwritten) go too."""
    old = checkpoints_in(run_dir)
    if old and not overwrite:
        raise SystemExit(f"--output-dir {run_dir} holds the checkpoints of an earlier run ({os.path.basename(old[-1])}): "
                         "continue it with --resume auto, or start afresh with --overwrite or another --output-dir")
    logs = [os.path.join(run_dir, f) for f in os.listdir(run_dir)
            if f == "metrics.jsonl" or f.startswith("events.out.tfevents.")]
    for path in old + logs:
        os.remove(path)


def load_resume(path, model, optimizer, scaler, args, world) -> dict:
    try:
        ckpt = read_checkpoint(path)
    except (OSError, CheckpointError) as e:
        raise SystemExit(f"--resume: {e}") from e
    if "next" not in ckpt or "optimizer" not in ckpt:
        raise SystemExit(f"--resume: {path} is not a mae-fast training checkpoint (no optimizer/position)")
    saved = ckpt.get("args") or {}
    if not isinstance(saved, dict):
        if not hasattr(saved, "__dict__"):
            raise SystemExit(f"--resume: {path} holds args of type {type(saved).__name__}, not the flags of a run")
        saved = vars(saved)
    if "model" in saved and saved["model"] not in PRESETS:
        raise SystemExit(f"--resume: the run in {path} names --model {saved['model']!r}, which is not a preset of "
                         f"mae-fast pretrain ({', '.join(PRESETS)}); it cannot be resumed here")
    for name in RESUME_FLAGS:
        if name in saved and saved[name] != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"--resume: the run in {path} used {flag} {saved[name]}, this command {getattr(args, name)}; "
                             f"resume with the run's {flag} (the data order, step count and schedule depend on it)")
    check_data_source(path, saved.get("data_source"), getattr(args, "data_source", None))
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


def describe_data(source: dict) -> str:
    where = source.get("path") or "(the embedded sample photos)"
    return f"{where} ({source.get('files')} files, names sha256 {source.get('names_sha256')})"


def check_data_source(path, saved, current) -> None:
    """A resume on other data would switch data mid-run, its step count and data order with it.
    The file names decide (a folder moved or copied whole resumes, with a note); checkpoints
    without a data source (official ones, older ones) are not checked."""
    if not isinstance(saved, dict) or current is None:
        return
    same = {k: saved.get(k) for k in ("files", "names_sha256")} == {k: current[k] for k in ("files", "names_sha256")}
    if not same:
        raise SystemExit(f"--resume: the run in {path} trained on --data {describe_data(saved)}, this command on "
                         f"--data {describe_data(current)}; resume with the run's --data (the data order and step "
                         "count depend on it)")
    if saved.get("path") != current["path"]:
        print(f"--data {current['path']}: the run used {saved.get('path')}; the same file names, so resuming")


def pixel_stats(ckpt_args) -> tuple[list[float], list[float]]:
    """(mean, std) per channel that the run's model saw its pixels (in [0, 1]) normalised with: the
    checkpoint's args (--mean/--std, --norm auto), else ImageNet's (runs made before the flags, and
    the official checkpoints, which are RGB). Every command that feeds the model uses these."""
    args = ckpt_args if isinstance(ckpt_args, dict) else {} if ckpt_args is None else vars(ckpt_args)
    if args.get("mean") is not None and args.get("std") is not None:
        return list(args["mean"]), list(args["std"])
    channels = args.get("in_chans") or 3
    if channels != 3:
        raise ValueError(f"the checkpoint's args have in_chans {channels} but no mean/std: no statistics to "
                         "normalise its images with")
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


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
            for key in ("loss", "lr", "images_per_s", "data_wait"):
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

        stats = self.args.mean, self.args.std
        crops = torch.stack([to_unit_float(dataset.crops[i]) for i in range(min(6, len(dataset)))])
        imgs = normalize_batch(crops.to(device), *stats)
        self.last_picture = reconstruction_grid(self.model, imgs, os.path.join(self.args.output_dir, "reconstruction.png"),
                                                mask_ratio=self.args.mask_ratio, seed=self.args.seed, amp_dtype=amp_dtype,
                                                stats=stats)
        loss_curve(self.history, os.path.join(self.args.output_dir, "loss.png"))

    def summary(self, signal_number=0) -> dict:
        """signal_number: the signal that stopped the run (0: it ran to its end or --max-steps)."""
        return {"output_dir": self.args.output_dir, "checkpoint": self.last_checkpoint,
                "reconstruction": self.last_picture, "final_loss": self.history[-1][1] if self.history else None,
                "interrupted": bool(signal_number), "signal": int(signal_number)}
