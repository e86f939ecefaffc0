"""`mae-fast pretrain` (also `python -m mae_fast.pretrain`): MAE pretraining with the official recipe.

AdamW (0.9, 0.95), weight decay 0.05 on all but 1-D parameters and biases, lr = blr * eff_batch /
256, linear warmup then half-cycle cosine per iteration, accum_iter, RandomResizedCrop + flip.
Runs offline on the embedded sample photos by default; `--data DIR` for an ImageFolder tree, read as
8-bit RGB, or with `--in-chans N` as stored (grayscale, multi-channel TIFF, 16-bit kept), normalised
with `--mean/--std`, `--norm auto` or ImageNet's statistics (saved in the checkpoint's args);
`--input-size H W` for non-square crops; `--init` starts from released or earlier weights. The
same command under `torchrun --nproc_per_node N` trains with DistributedDataParallel.

Every sample's crop and mask noise is a pure function of (seed, epoch, index), so a resumed run,
or a run on N processes with the same global batch, sees exactly the same data and masks.

Exit status: 0 when the run reaches its end or --max-steps; 128 + the signal number (130 for
SIGINT, 143 for SIGTERM) when a signal stops it after its checkpoint is saved; 1 with a one-line
message when it diverges (a non-finite loss in fp32/bf16, MAX_SKIPPED_IN_A_ROW skipped fp16
optimizer steps in a row) or refuses its input (2 where argparse refuses a flag).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from .. import data as mdata
from ..data import gpu as gpu_data
from ..models.presets import build_model
from .distributed import pick_device, reduce_step, setup_distributed
from .init_weights import load_init
from .loader import (DataWait, Unreadable, bottleneck_message, build_loader, channel_mismatch_message,
                     epoch_order, run_batches, shutdown)
from .pretrain_args import parse_args
from .recipe import lr_at, param_groups
from .run_dir import (Run, check_output_dir, checkpoints_in, kept_checkpoint_note, load_resume, lock_output_dir,
                      remove_interrupted_saves, start_afresh, unlock_output_dir)

# fp16: the GradScaler halves its scale at every skipped optimizer step, so a few skips while it
# settles are normal. 16 in a row have lowered it by 2**16 (the initial 65536 down to 1): the
# overflow is no longer the scaler's to fix, the run has diverged.
MAX_SKIPPED_IN_A_ROW = 16


class MaskedCrops(torch.utils.data.Dataset):
    """(epoch, i) -> (crop, mask noise, files found unreadable meanwhile, (epoch, i)). Crop and noise
    come from per-sample generators. The crop is the uint8 image, or with the GPU backend what its
    workers hand over (encoded_source). The unreadable files go to the main process, which warns
    once for each whichever worker met it."""

    def __init__(self, crops: mdata.PretrainCrops, num_patches: int, backend: str = "cpu"):
        self.crops, self.num_patches, self.backend = crops, num_patches, backend
        crops.warn_unreadable = False

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, key):
        epoch, i = key
        known = len(self.crops.unreadable)
        img = self.crops[key] if self.backend == "cpu" else gpu_data.encoded_source(self.crops, i)
        gen = torch.Generator().manual_seed((self.crops.seed * 7_919 + epoch) * 104_729 + i)
        return img, torch.rand(self.num_patches, generator=gen), list(self.crops.unreadable.items())[known:], key


def build_dataset(args, model, world):
    """The run's MaskedCrops; resolves --norm auto into args.mean/args.std (measured on the data)."""
    size = tuple(model.img_size) if model.img_size[0] != model.img_size[1] else model.img_size[0]
    if args.data is None:
        images = mdata.sample_photos()
        length = args.samples_per_epoch or 2048
        names = mdata.sample_photo_names()
    else:
        try:
            images = mdata.image_folder(args.data)  # file paths: decoded by the loader's workers
        except (OSError, ValueError) as e:
            raise SystemExit(f"--data: {e}") from e
        length = args.samples_per_epoch or len(images)
        names = [os.path.relpath(path, args.data) for path in images]
    # saved with the args: a resume refuses other data (the data order and step count depend on it)
    args.data_source = {"path": os.path.abspath(args.data) if args.data else None, **mdata.fingerprint(names)}
    if length < args.batch_size * world:
        raise SystemExit(f"--samples-per-epoch ({length}) must be at least one global batch "
                         f"({args.batch_size} x {world} processes)")
    crops = mdata.PretrainCrops(images, size, length, args.seed, in_chans=args.in_chans)
    dataset = MaskedCrops(crops, model.num_patches, args.data_backend)
    try:
        crops.source(0)  # a folder of unreadable files fails here, not inside the loader at the first step
        if args.norm == "auto":  # reads a sample of the files: their channel counts are checked too
            args.mean, args.std = mdata.channel_stats(crops, seed=args.seed)
    except mdata.ChannelMismatch as e:
        raise SystemExit(channel_mismatch_error(args, e)) from None
    except ValueError as e:
        Unreadable().report(crops.unreadable.items())
        raise SystemExit(f"--data {args.data}: {e}") from e
    return dataset


def channel_mismatch_error(args, error) -> str:
    hint = " (omit --in-chans to read every image as RGB)" if args.in_chans == 3 else ""
    return f"--in-chans {args.in_chans}: {channel_mismatch_message(error)}{hint}"


def startup_line(args, model, device, precision, dataset) -> str:
    """What the run is: model, device, data, output folder."""
    params = sum(p.numel() for p in model.parameters())
    (h, w), source = model.img_size, args.data_source
    data = (f"{args.data} ({source['files']} images)" if args.data else f"the embedded photos ({source['files']})")
    stats = "ImageNet" if args.norm == "imagenet" else ("measured " if args.norm == "auto" else "") + \
        f"mean {args.mean} std {args.std}"
    return (f"mae-fast pretrain: --model {args.model} ({params / 1e6:.1f}M parameters, {h}x{w} px, "
            f"{model.in_chans} channel{'s' * (model.in_chans != 1)}, {stats}) on {device} ({precision}); "
            f"data {data}, {len(dataset)} crops an epoch; output {os.path.abspath(args.output_dir)}")


def progress_line(step, total, epoch, loss, lr, images_per_s, data_share) -> str:
    return (f"step {step}/{total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} {images_per_s:.0f} img/s "
            f"data wait {data_share:.0%}")


# ----------------------------------------------------------------------------- training

def train(args) -> dict:
    rank, world, local_rank = setup_distributed()
    main_process = rank == 0
    with contextlib.ExitStack() as cleanup:  # every exit, an error's included, releases what the run holds
        if world > 1:
            cleanup.callback(dist.destroy_process_group)
        device = pick_device(args.device, local_rank)
        torch.manual_seed(args.seed)
        model = build_model(args.model, args.input_size or args.img_size, in_chans=args.in_chans or 3,
                            norm_pix_loss=args.norm_pix_loss)
        init_note = load_init(args.init, model, args.model) if args.init else None
        model.to(device)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        dataset = build_dataset(args, model, world)  # resolves --norm auto
        model.set_pixel_stats(args.mean, args.std)  # uint8 batches are normalised inside the fused kernels
        unreadable = Unreadable()
        unreadable.report(dataset.crops.unreadable.items())
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
        if main_process:
            for line in filter(None, (init_note, startup_line(args, model, device, precision, dataset))):
                print(line, flush=True)
        bar = None
        progress_lines = main_process and not args.quiet and not sys.stdout.isatty()  # a log file: no \r bar
        if main_process and not args.quiet and not progress_lines:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
            cleanup.callback(bar.close)
        stopping = 0  # the signal that stops the run, agreed by every rank
        skipped_in_a_row, skipped_total = 0, 0
        if resume:
            run.drop_metrics_after(step)
        # one loader for the run: its workers start once, and prefetch across epoch ends
        batches = iter(build_loader(dataset, run_batches(len(dataset), args.seed, rank, world, args.batch_size,
                                                         start_epoch, start_batch, args.epochs),
                                    args.num_workers, pin_memory=device.type == "cuda"))
        cleanup.callback(shutdown, batches)
        mean = torch.tensor(args.mean, device=device)
        std = torch.tensor(args.std, device=device)
        data_wait = DataWait()
        for epoch in range(start_epoch, args.epochs):
            dataset.crops.set_epoch(epoch)  # the main process's copy: the pictures' crops
            first = start_batch if epoch == start_epoch else 0
            # a window cut short by the epoch's end is dropped, as in the official recipe (and a
            # checkpoint holds no gradients: every save falls on a window's end)
            optimizer.zero_grad(set_to_none=True)
            tic = time.perf_counter()
            for b in range(first, steps_per_epoch):
                waiting = time.perf_counter()
                try:
                    imgs, noise, bad_files, keys = next(batches)
                except mdata.ChannelMismatch as e:  # a file past the ones checked at the start
                    raise SystemExit(channel_mismatch_error(args, e)) from None
                if args.data_backend == "gpu":
                    imgs = gpu_data.crop_batch(imgs, keys, dataset.crops, device)
                    bad_files = [*bad_files, *dataset.crops.unreadable.items()]
                unreadable.report(bad_files)
                waited = time.perf_counter() - waiting
                if b % args.accum_iter == 0:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(epoch + b / steps_per_epoch, args)
                imgs, noise = imgs.to(device, non_blocking=True), noise.to(device, non_blocking=True)
                if imgs.dtype != torch.uint8:  # 16-bit data comes as float32 in [0, 1]: normalised here
                    imgs = mdata.normalize_batch(imgs, mean, std)
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
                skipped_step = False
                if (b + 1) % args.accum_iter == 0:
                    scale = scaler.get_scale() if scaler.is_enabled() else None
                    if args.clip_grad is not None:
                        scaler.unscale_(optimizer)  # the norm of the true gradients (fp16: not of the scaled ones)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    skipped_step = scale is not None and scaler.get_scale() < scale
                    optimizer.zero_grad(set_to_none=True)
                    skipped_in_a_row = skipped_in_a_row + 1 if skipped_step else 0
                    skipped_total += skipped_step
                step += 1
                now = time.perf_counter()
                data_wait.add(waited, now - waiting)
                images_per_s = (b + 1 - first) * args.batch_size * world / max(now - tic, 1e-9)
                run.log(step=step, epoch=epoch, loss=loss_value, lr=optimizer.param_groups[0]["lr"],
                        images_per_s=images_per_s, data_wait=round(waited / max(now - waiting, 1e-9), 4),
                        **({"skipped": True} if skipped_step else {}))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{images_per_s:.0f}", data=f"{data_wait.share:.0%}")
                elif progress_lines and (step % args.log_every == 0 or step == total):
                    print(progress_line(step, total, epoch, loss_value, optimizer.param_groups[0]["lr"], images_per_s,
                                        data_wait.share), flush=True)
                if main_process and data_wait.bottleneck():
                    (bar.write if bar is not None else print)(
                        bottleneck_message(data_wait.share, data_wait.window, args.num_workers))
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
