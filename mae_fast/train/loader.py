"""The trainer's DataLoader: one loader for the whole run (its workers start once and prefetch
across epoch ends), the measure of how long each step waits for data, and the reports of
unreadable files, made once in the main process whichever worker met them."""
from __future__ import annotations

import os
import signal
import warnings

import torch

from ..data import to_unit_float


def default_num_workers() -> int:
    """The CPUs this process may run on, shared among the processes torchrun starts on this node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int, batch: int) -> list[int]:
    """This rank's sample indices for one epoch (whole global batches only), as DistributedSampler:
    a seeded permutation split rank::world, so N ranks of batch B see what one rank of N*B sees."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000 + epoch)).tolist()
    usable = (n // (batch * world)) * batch * world
    return perm[:usable][rank::world]


def run_batches(n, seed, rank, world, batch, start_epoch, start_batch, epochs):
    """The run's batches from (start_epoch, start_batch) on: lists of (epoch, index) pairs. The
    epoch travels with each index, so workers that live across epochs crop each epoch's samples."""
    for epoch in range(start_epoch, epochs):
        order = epoch_order(n, seed, epoch, rank, world, batch)
        for b in range(start_batch if epoch == start_epoch else 0, len(order) // batch):
            yield [(epoch, i) for i in order[b * batch:(b + 1) * batch]]


def collate(items):
    """A batch of MaskedCrops items: (images, noise, [(path, error) of the files found unreadable],
    [(epoch, index)]). Images are stacked, or listed where they differ in shape (the GPU backend's
    encoded files). A batch mixing 8-bit (uint8) and 16-bit (float32 in [0, 1]) crops is float32."""
    imgs, noise, skipped, keys = zip(*items)
    same = all(img.shape == imgs[0].shape for img in imgs)
    if same and len({img.dtype for img in imgs}) > 1:
        imgs = [to_unit_float(img) for img in imgs]
    return (torch.stack(imgs) if same else list(imgs)), torch.stack(noise), [s for found in skipped for s in found], list(keys)


def ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGINT and SIGTERM to the main process (a Ctrl-C reaches the whole process
    group), which finishes its step and saves a checkpoint; it then shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset, batches, num_workers: int, pin_memory: bool):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
        # the default two batches a worker in flight; one iterator spans the run, so workers persist across epochs
        prefetch_factor=2 if num_workers else None, worker_init_fn=ignore_stop_signals if num_workers else None)


def shutdown(batches) -> None:
    """Stops the loader's workers now, not when the iterator is collected (a traceback holding the
    training frame would keep them running)."""
    stop = getattr(batches, "_shutdown_workers", None)  # the multi-process iterator's own shutdown
    if stop is not None:
        stop()


class Unreadable:
    """Warns once for each unreadable file, over all workers (each holds its own copy of the dataset)."""

    def __init__(self):
        self.reported: set[str] = set()

    def report(self, skipped) -> None:
        for path, error in skipped:
            if path not in self.reported:
                self.reported.add(path)
                warnings.warn(f"skipped unreadable image file {path}: {error}")


def channel_mismatch_message(error: Exception) -> str:
    """The one-line message of a ChannelMismatch, also when a DataLoader worker raised it (the main
    process then gets it with the worker's traceback in its message, the original line last)."""
    return str(error).rstrip().splitlines()[-1].partition("ChannelMismatch: ")[2] or str(error)


class DataWait:
    """The share of step time spent waiting for the next batch, over the last `window` steps.
    bottleneck() is true once, the first time a full window after `warmup` steps (worker start-up,
    compilation) waits more than `threshold` of its time."""

    def __init__(self, warmup: int = 5, window: int = 20, threshold: float = 0.2):
        self.warmup, self.window, self.threshold = warmup, window, threshold
        self.steps, self.recent, self.warned = 0, [], False

    def add(self, wait: float, step_time: float) -> None:
        self.steps += 1
        self.recent = (self.recent + [(wait, step_time)])[-self.window:]

    @property
    def share(self) -> float:
        total = sum(t for _, t in self.recent)
        return sum(w for w, _ in self.recent) / total if total > 0 else 0.0

    def bottleneck(self) -> bool:
        if self.warned or self.steps < self.warmup + self.window or self.share <= self.threshold:
            return False
        self.warned = True
        return True


def bottleneck_message(share: float, window: int, num_workers: int) -> str:
    return (f"warning: the data loader is the bottleneck: {share:.0%} of the last {window} steps' time went to "
            f"waiting for data. Raise --num-workers (now {num_workers}; {default_num_workers()} CPUs per process "
            "here), put --data on faster storage, or decode JPEGs on the GPU with --data-backend gpu.")
