"""`mae-fast pretrain` (also `python -m mae_fast.pretrain`): MAE pretraining with the official recipe.

AdamW (0.9, 0.95), weight decay 0.05 on all but 1-D parameters and biases, lr = blr * eff_batch /
256, linear warmup then half-cycle cosine per iteration, accum_iter, RandomResizedCrop + flip.
Runs offline on the embedded sample photos by default; `--data DIR` for an ImageFolder tree. The
same command under `torchrun --nproc_per_node N` trains with DistributedDataParallel.

Every sample's crop and mask noise is a pure function of (seed, epoch, index), so a resumed run,
or a run on N processes with the same global batch, sees exactly the same data and masks.

Exit status: 0 when the run reaches its end or --max-steps; 128 + the signal number (130 for
SIGINT, 143 for SIGTERM) when a signal stops it after its checkpoint is saved; 1 with a one-line
message when it diverges (a non-finite loss in fp32/bf16, MAX_SKIPPED_IN_A_ROW skipped fp16
optimizer steps in a row) or refuses its input (2 where argparse refuses a flag).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from ..models.masking import len_keep_for
from ..models.presets import PRESETS, build_model
from . import data as mdata
from .distributed import pick_device, reduce_step, setup_distributed
from .recipe import lr_at, param_groups
from .run_dir import (Run, check_output_dir, checkpoints_in, kept_checkpoint_note, load_resume, lock_output_dir,
                      remove_interrupted_saves, start_afresh, unlock_output_dir)

# fp16: the GradScaler halves its scale at every skipped optimizer step, so a few skips while it
# settles are normal. 16 in a row have lowered it by 2**16 (the initial 65536 down to 1): the
# overflow is no longer the scaler's to fix, the run has diverged.
MAX_SKIPPED_IN_A_ROW = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser("mae-fast pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(PRESETS))
    p.add_argument("--img-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--data", default=None, help="ImageFolder tree; default: embedded sample photos")
    p.add_argument("--samples-per-epoch", type=int, default=None,
                   help="crops drawn per epoch (default: 2048 for the embedded photos, else one per image)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--warmup-epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--accum-iter", type=int, default=1)
    p.add_argument("--blr", type=float, default=1.5e-4, help="lr = blr * effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the model, in this mode (reduce-overhead: CUDA graphs on GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output-dir", default="runs/mae-demo")
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the newest in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output-dir that holds an earlier run: deletes its checkpoints and metrics")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--vis-every", type=int, default=4, help="epochs between reconstruction pictures")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps, at the end of an --accum-iter window (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.data is not None and not os.path.isdir(args.data):
        p.error(f"--data {args.data!r} is not a directory")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume: checkpoint not found: {args.resume!r} (or pass 'auto' for the newest in --output-dir)")
    for name in ("epochs", "batch_size", "accum_iter", "keep_last", "vis_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    # 0 must not mean "the default" (they are read with `or`); a silently ignored limit is a bug
    for name in ("samples_per_epoch", "max_steps", "img_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_epochs", "blr", "lr", "min_lr", "weight_decay", "num_workers"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    default_size, preset = PRESETS[args.model]
    patch = preset["patch_size"]
    if args.img_size is not None and args.img_size % patch:
        p.error(f"--img-size must be a multiple of the patch size {patch} of --model {args.model}, got {args.img_size}")
    # the model checks the ratio only at its first forward, after the output folder exists
    num_patches = ((args.img_size or default_size) // patch) ** 2
    try:
        len_keep_for(num_patches, args.mask_ratio)
    except ValueError as e:
        p.error(f"--mask-ratio {args.mask_ratio}: {e} (--model {args.model} at {args.img_size or default_size} px)")
    return args


class MaskedCrops(torch.utils.data.Dataset):
    """Crops plus their mask noise, both drawn from one per-sample generator."""

    def __init__(self, crops: mdata.CropDataset, num_patches: int):
        self.crops, self.num_patches = crops, num_patches

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed((self.crops.seed * 7_919 + self.crops.epoch) * 104_729 + i)
        return self.crops[i], torch.rand(self.num_patches, generator=gen)


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int, batch: int) -> list[int]:
    """This rank's sample indices for one epoch (whole global batches only), as DistributedSampler:
    a seeded permutation split rank::world, so N ranks of batch B see what one rank of N*B sees."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000 + epoch)).tolist()
    usable = (n // (batch * world)) * batch * world
    return perm[:usable][rank::world]


def build_dataset(args, model, world):
    size = model.img_size[0]
    if args.data is None:
        images = mdata.sample_photos()
        length = args.samples_per_epoch or 2048
        names = mdata.sample_photo_names()
    else:
        try:
            images = mdata.image_folder(args.data)  # file paths: decoded by the loader's workers
        except (OSError, ValueError) as e:
            raise SystemExit(str(e)) from e
        length = args.samples_per_epoch or len(images)
        names = [os.path.relpath(path, args.data) for path in images]
    # saved with the args: a resume refuses other data (the data order and step count depend on it)
    args.data_source = {"path": os.path.abspath(args.data) if args.data else None, **mdata.fingerprint(names)}
    if length < args.batch_size * world:
        raise SystemExit(f"--samples-per-epoch ({length}) must be at least one global batch "
                         f"({args.batch_size} x {world} processes)")
    crops = mdata.CropDataset(images, size, length, args.seed)
    try:
        crops.image(0)  # a folder of unreadable files fails here, not inside the loader at the first step
    except ValueError as e:
        raise SystemExit(f"--data {args.data}: {e}") from e
    return MaskedCrops(crops, model.num_patches)


# ----------------------------------------------------------------------------- training

def train(args) -> dict:
    rank, world, local_rank = setup_distributed()
    main_process = rank == 0
    with contextlib.ExitStack() as cleanup:  # every exit, an error's included, releases what the run holds
        if world > 1:
            cleanup.callback(dist.destroy_process_group)
        device = pick_device(args.device, local_rank)
        torch.manual_seed(args.seed)
        model = build_model(args.model, args.img_size, norm_pix_loss=args.norm_pix_loss).to(device)
        if model.img_size[0] != model.img_size[1]:
            raise SystemExit("--img-size must describe a square crop")
        dataset = build_dataset(args, model, world)
        steps_per_epoch = len(epoch_order(len(dataset), args.seed, 0, rank, world, args.batch_size)) // args.batch_size
        if args.accum_iter > steps_per_epoch:
            # each epoch drops its cut window: the optimizer would never step
            raise SystemExit(f"--accum-iter {args.accum_iter} is more than the {steps_per_epoch} steps of an epoch "
                             f"({len(dataset)} samples / (--batch-size {args.batch_size} x {world} processes)): "
                             "lower --accum-iter or raise --samples-per-epoch")
        if main_process:
            check_output_dir(args.output_dir)
            cleanup.callback(unlock_output_dir, lock_output_dir(args.output_dir), args.output_dir)
            for path in remove_interrupted_saves(args.output_dir):
                print(f"removed {path}: the temp file of a checkpoint save that was interrupted")
        resume = checkpoints_in(args.output_dir)[-1:] if args.resume == "auto" else [args.resume] if args.resume else []
        if main_process and not resume:
            if args.resume == "auto":
                print(f"--resume auto: no checkpoint in {args.output_dir}; starting afresh")
            start_afresh(args.output_dir, args.overwrite)
        eff_batch = args.batch_size * args.accum_iter * world
        args.world_size = world  # saved with the args: a resume checks it
        if args.lr is None:
            args.lr = args.blr * eff_batch / 256
        precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                                      fused=device.type == "cuda")

        start_epoch, start_batch, history = 0, 0, []
        if resume:
            ckpt = load_resume(resume[0], model, optimizer, scaler, args, world)
            start_epoch, start_batch = ckpt["next"]["epoch"], ckpt["next"]["batch"]
            history = list(ckpt.get("history", []))
            if main_process:
                print(f"resumed from {resume[0]} at epoch {start_epoch}, batch {start_batch}")
        step = start_epoch * steps_per_epoch + start_batch
        if args.max_steps and step >= args.max_steps:
            if main_process:
                print(f"--max-steps {args.max_steps}: the run is at step {step} already; nothing to do")
            return {"output_dir": args.output_dir, "checkpoint": resume[0], "reconstruction": None,
                    "final_loss": history[-1][1] if history else None, "interrupted": False, "signal": 0}

        net = model
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            net = torch.compile(net, mode=args.compile)
        elif device.type == "cuda" and main_process and not args.quiet:
            # an eager step waits on the host (docs/benchmarks.md)
            print("eager mode: add --compile reduce-overhead (CUDA graphs) for the fastest GPU steps (docs/benchmarks.md)")

        run = Run(args, model, optimizer, scaler, history, main_process)
        if run.tb is not None:
            cleanup.callback(run.tb.close)  # flushes: TensorBoard buffers scalars for up to two minutes
        # Ctrl-C and a scheduler's SIGTERM both finish the step, save a checkpoint and exit with
        # 128 + the signal number (main), so that `pretrain && probe` and a scheduler see the stop
        stop = {"signal": 0}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, lambda num, _: stop.__setitem__("signal", stop["signal"] or num))
            cleanup.callback(signal.signal, sig, previous)
        total = steps_per_epoch * args.epochs
        bar = None
        if main_process and not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
            cleanup.callback(bar.close)
        stopping = 0  # the signal that stops the run, agreed by every rank
        skipped_in_a_row, skipped_total = 0, 0
        if resume:
            run.drop_metrics_after(step)
        for epoch in range(start_epoch, args.epochs):
            dataset.crops.set_epoch(epoch)
            order = epoch_order(len(dataset), args.seed, epoch, rank, world, args.batch_size)
            first = start_batch if epoch == start_epoch else 0
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, order[first * args.batch_size:]), batch_size=args.batch_size,
                num_workers=args.num_workers, drop_last=True)
            # a window cut short by the epoch's end is dropped, as in the official recipe (and a
            # checkpoint holds no gradients: every save falls on a window's end)
            optimizer.zero_grad(set_to_none=True)
            tic = time.perf_counter()
            for b, (imgs, noise) in enumerate(loader, start=first):
                if b % args.accum_iter == 0:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(epoch + b / steps_per_epoch, args)
                imgs, noise = imgs.to(device, non_blocking=True), noise.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, _, _ = net(imgs, args.mask_ratio, noise, return_pred=False)
                loss_value, signalled = reduce_step(loss.detach(), stop["signal"], world)
                stopping = stopping or signalled
                if not math.isfinite(loss_value) and precision != "fp16":
                    raise SystemExit(f"loss is {loss_value} at step {step} (epoch {epoch}, batch {b}); stopping. "
                                     + kept_checkpoint_note(args.output_dir))
                # fp16: a non-finite loss makes non-finite gradients, so the GradScaler skips this
                # optimizer step (the whole accumulation window) and lowers its scale, as it does
                # for an overflow in the backward. The step still counts: positions, the lr schedule
                # and checkpoint names stay those of the data, so a resume stays exact.
                scaler.scale(loss / args.accum_iter).backward()
                skipped = False
                if (b + 1) % args.accum_iter == 0:
                    scale = scaler.get_scale() if scaler.is_enabled() else None
                    scaler.step(optimizer)
                    scaler.update()
                    skipped = scale is not None and scaler.get_scale() < scale
                    optimizer.zero_grad(set_to_none=True)
                    skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
                    skipped_total += skipped
                step += 1
                elapsed = time.perf_counter() - tic
                images_per_s = (b + 1 - first) * args.batch_size * world / max(elapsed, 1e-9)
                run.log(step=step, epoch=epoch, loss=loss_value, lr=optimizer.param_groups[0]["lr"],
                        images_per_s=images_per_s, **({"skipped": True} if skipped else {}))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{images_per_s:.0f}")
                if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    # no save: the scaler's skipped steps left no weights worth keeping over the last checkpoint
                    raise SystemExit(
                        f"fp16: {skipped_in_a_row} optimizer steps in a row skipped for non-finite losses or "
                        f"gradients (up to step {step}; {skipped_total} skipped in this run, last loss {loss_value}): "
                        f"the run diverged; stopping (lower --lr/--blr, or use --precision bf16). "
                        + kept_checkpoint_note(args.output_dir))
                at_end = b + 1 == steps_per_epoch
                window_end = at_end or (b + 1) % args.accum_iter == 0  # a stop waits for it: no gradients lost
                if window_end and (stopping or (args.max_steps and step >= args.max_steps)):
                    nxt = {"epoch": epoch + 1, "batch": 0} if at_end else {"epoch": epoch, "batch": b + 1}
                    run.checkpoint(epoch, nxt, step)
                    if stopping and world > 1:
                        # torchrun stops every rank once one exits non-zero: rank 0's save comes first
                        dist.barrier()
                    if stopping and main_process:
                        by = signal.Signals(stop["signal"]).name if stop["signal"] else "a signal on another rank"
                        print(f"\ninterrupted ({by}): checkpoint saved; continue with --resume auto")
                    return run.summary(signal_number=stopping)
            run.checkpoint(epoch, {"epoch": epoch + 1, "batch": 0}, step)
            if main_process and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
                run.pictures(dataset, device, amp_dtype)
        return run.summary()


def main(argv=None):
    """Trains and returns the run's summary; a run stopped by a signal raises SystemExit(128 +
    the signal number) once its checkpoint is saved, for every entry point (the console script,
    python -m, a caller of main)."""
    args = parse_args(argv)
    out = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final loss {out['final_loss']:.4f}" if out["final_loss"] is not None else "no steps run")
        print(f"checkpoint:     {out['checkpoint']}")
        if out["reconstruction"]:
            print(f"reconstruction: {out['reconstruction']}")
            print(f"loss curve:     {os.path.join(args.output_dir, 'loss.png')}")
    if out["interrupted"]:
        sys.stdout.flush()
        raise SystemExit(128 + out["signal"])
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
