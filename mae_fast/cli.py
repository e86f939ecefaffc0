"""`mae-fast`: pretrain, finetune, linprobe, probe, visualize, export."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

USAGE = """mae-fast <command> [options]

commands:
  pretrain                 pretrain an MAE (default: a tiny model on the embedded sample photos)
  finetune RUN_OR_CHECKPOINT [--data DIR]   fine-tune the encoder, the official recipe (default: digits, vs random init)
  linprobe RUN_OR_CHECKPOINT [--data DIR]   linear probe of the frozen encoder, the official recipe (default: digits)
  probe CHECKPOINT         quick check: logistic regression on frozen features of the digits, vs random init
  visualize CHECKPOINT IMAGE...   reconstruction pictures for your own images
  export CHECKPOINT --to timm|hf  the encoder for timm's ViT or transformers' ViTMAE, with its architecture

`mae-fast <command> --help` for the options of each."""

OFFICIAL_NAMES = {"mae_vit_base_patch16": "base", "mae_vit_large_patch16": "large", "mae_vit_huge_patch14": "huge"}


def resolve_checkpoint(path: str) -> str:
    """The checkpoint file a command reads: path itself, or a run directory's newest checkpoint."""
    from .train.run_dir import checkpoints_in

    if os.path.isdir(path):
        found = checkpoints_in(path)
        if not found:
            raise SystemExit(f"no checkpoint-*.pth in {path}")
        return found[-1]
    return path


def model_from_checkpoint(path: str):
    """Rebuilds the model a training checkpoint was made with and loads its weights. A run
    directory means its newest checkpoint."""
    from .io.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
    from .models.presets import PRESETS, build_model

    path = resolve_checkpoint(path)
    try:
        ckpt = read_checkpoint(path)
    except (OSError, CheckpointError) as e:
        raise SystemExit(f"checkpoint: {e}") from e
    args = ckpt.get("args") or {}
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    preset = OFFICIAL_NAMES.get(args.get("model"), args.get("model"))
    if preset is None:
        raise SystemExit(f"{path}: no 'args' with the model preset inside; it was not written by "
                         "mae-fast pretrain or the official main_pretrain.py")
    if preset not in PRESETS:
        raise SystemExit(f"{path}: its args name the model {preset!r}; expected one of "
                         f"{', '.join(PRESETS)} or {', '.join(OFFICIAL_NAMES)}")
    try:
        model = build_model(preset, args.get("img_size") or args.get("input_size"), in_chans=args.get("in_chans") or 3,
                            norm_pix_loss=bool(args.get("norm_pix_loss", True)))
        report = load_checkpoint(model, ckpt, strict=False)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"{path}: does not fit the model its args describe (--model {preset}): {e}") from e
    if report.missing_keys and any(not k.startswith(("decoder", "mask_token")) for k in report.missing_keys):
        raise SystemExit(f"{path}: encoder weights missing: {report.missing_keys[:5]}")
    return model, preset, args, path


def cmd_probe(argv):
    p = argparse.ArgumentParser("mae-fast probe", description="Quick check: a logistic regression on the frozen "
                                "encoder's features of scikit-learn's digits, beside a random-init encoder.")
    p.add_argument("checkpoint", help="a checkpoint of mae-fast pretrain, or a run folder (its newest checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random-init encoder and the train/test split (default: 0)")
    a = p.parse_args(argv)
    from .models.presets import build_model
    from .train.probe import probe_accuracy

    model, preset, _, _ = model_from_checkpoint(a.checkpoint)
    torch.manual_seed(a.seed)
    random_model = build_model(preset, tuple(model.img_size), in_chans=model.in_chans,
                               norm_pix_loss=model.norm_pix_loss)
    acc, base = probe_accuracy(model, a.seed), probe_accuracy(random_model, a.seed)
    print(f"linear probe on digits ({preset}, {'x'.join(map(str, model.img_size))}px):")
    print(f"  pretrained encoder  {acc:.1%}")
    print(f"  random-init encoder {base:.1%}")
    return {"pretrained": acc, "random": base}


def cmd_visualize(argv):
    from .train.help_formatter import DefaultsHelpFormatter

    p = argparse.ArgumentParser("mae-fast visualize", formatter_class=DefaultsHelpFormatter,
                                description="Reconstruction pictures (or attention maps) for your images.")
    p.add_argument("checkpoint", help="a checkpoint of mae-fast pretrain (or the official one), or a run folder "
                                      "(its newest checkpoint)")
    p.add_argument("images", nargs="+", help="image files, read as the run read its data (channels, bit depth) "
                                             "and centre-cropped to the model's input size")
    p.add_argument("--out", default=None, help="the picture file (default: reconstructions.png, or attention.png "
                                               "with --attention, in the checkpoint's folder)")
    p.add_argument("--attention", action="store_true",
                   help="draw the last block's attention of the cls token over the image, one map per head, "
                        "instead of reconstructions")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches removed")
    p.add_argument("--seed", type=int, default=0, help="seeds the masks")
    a = p.parse_args(argv)
    if not 0 < a.mask_ratio < 1:
        p.error(f"--mask-ratio must be in (0, 1), got {a.mask_ratio}")
    missing = [path for path in a.images if not os.path.isfile(path)]
    if missing:
        p.error(f"image not found: {missing[0]}")
    import torch.nn.functional as F

    from . import data as mdata
    from .models.masking import len_keep_for
    from .train.pictures import picture_path, reconstruction_grid
    from .train.run_dir import pixel_stats

    if a.out is None:  # beside the checkpoint: in its run folder
        checkpoint = resolve_checkpoint(a.checkpoint)
        a.out = os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                             "attention.png" if a.attention else "reconstructions.png")
    if os.path.isdir(a.out):
        raise SystemExit(f"--out {a.out!r} is a directory; expected a picture file such as "
                         f"{os.path.join(a.out, 'reconstructions.png')}")
    try:
        picture_path(a.out)
    except ValueError as e:
        raise SystemExit(f"--out {a.out!r}: {e}") from e
    model, _, args, path = model_from_checkpoint(a.checkpoint)
    try:  # the patch count comes with the checkpoint: checked before any image is read
        len_keep_for(model.num_patches, a.mask_ratio)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--mask-ratio {a.mask_ratio}: {e}") from None
    try:
        stats = pixel_stats(args)
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None
    (height, width), channels = model.img_size, args.get("in_chans")
    batch = []
    for image in a.images:
        try:
            img = mdata.load_image(image, channels)
        except mdata.ChannelMismatch as e:
            raise SystemExit(f"{e}, the --in-chans of the run in {path}") from None
        except Exception as e:  # noqa: BLE001 -- PIL raises many types for broken files
            raise SystemExit(f"cannot read image {image}: {e}") from e
        h, w = img.shape[1:]  # the centre crop of the model's aspect ratio, then resize
        wider = w * height >= h * width
        ch, cw = (h, max(1, round(h * width / height))) if wider else (max(1, round(w * height / width)), w)
        top, left = (h - ch) // 2, (w - cw) // 2
        img = img[:, top:top + ch, left:left + cw].unsqueeze(0)
        batch.append(F.interpolate(img, size=(height, width), mode="bicubic", antialias=True).clamp(0, 1))
    imgs = mdata.normalize_batch(torch.cat(batch), *stats)
    if a.attention:
        from .train.attention_pictures import attention_grid

        out = attention_grid(model, imgs, a.out, stats)
        print(f"attention maps: {out}")
    else:
        out = reconstruction_grid(model, imgs, a.out, a.mask_ratio, a.seed, stats=stats)
        print(f"reconstructions: {out}")
    return out


def cmd_export(argv):
    from .train.help_formatter import DefaultsHelpFormatter

    p = argparse.ArgumentParser("mae-fast export", formatter_class=DefaultsHelpFormatter,
                                description="Export the encoder for timm or transformers, with its architecture.")
    p.add_argument("checkpoint", help="a checkpoint of mae-fast pretrain (or the official one), or a run folder "
                                      "(its newest checkpoint)")
    p.add_argument("--to", required=True, choices=["timm", "hf"],
                   help="timm: a state dict and a .json beside it (timm's model name, model_args and "
                        "pretrained_cfg); hf: a folder that transformers' ViTMAEModel.from_pretrained loads")
    p.add_argument("--out", default=None, help="a file for timm, a folder for hf (default: encoder-timm.pth or "
                                               "encoder-hf, beside the checkpoint)")
    p.add_argument("--force", action="store_true",
                   help="replace existing --out files that are no export of mae-fast (never a training checkpoint)")
    a = p.parse_args(argv)
    from .io.checkpoint import save_checkpoint
    from .io.export import write_hf_folder, write_timm_config
    from .io.timm import encoder_state_dict
    from .train.run_dir import pixel_stats

    path = resolve_checkpoint(a.checkpoint)
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(path)), "encoder-timm.pth" if a.to == "timm"
                                else "encoder-hf")  # in a run folder
    if a.to == "hf":
        weights, config = check_export_folder(out, path, a.force)
    else:
        weights, config = out, os.path.splitext(out)[0] + ".json"
        check_export_target(out, path, a.force)
        check_beside(config, weights, a.force)
    model, _, args, path = model_from_checkpoint(path)
    try:
        stats = pixel_stats(args)
        sd = encoder_state_dict(model, a.to)
        if a.to == "hf":
            write_hf_folder(out, model, sd, *stats)
        else:
            save_checkpoint(out, sd, metadata={"export": a.to})
            write_timm_config(config, model, *stats)
    except OSError as e:
        raise SystemExit(f"--out {out!r}: cannot write it: {e}") from e
    except ValueError as e:
        raise SystemExit(f"{path}: cannot export --to {a.to}: {e}") from None
    print(f"{a.to} encoder ({len(sd)} tensors): {weights}, architecture: {config}")
    return out


def check_export_folder(out: str, source: str, force: bool) -> tuple[str, str]:
    """(weights, config.json) of a Hugging Face export folder, after check_export_target's checks
    on what it replaces there."""
    if out.endswith((".pth", ".safetensors", ".bin")):
        raise SystemExit(f"--out {out!r}: --to hf writes a folder (config.json, model.safetensors) for "
                         "ViTMAEModel.from_pretrained; expected a folder path, such as encoder-hf")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out!r} is a file; expected a folder path for --to hf")
    weights, config = os.path.join(out, "model.safetensors"), os.path.join(out, "config.json")
    if os.path.isdir(out):
        check_export_target(weights, source, force)
        check_beside(config, weights, force)
    elif not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise SystemExit(f"--out {out!r}: the directory {os.path.dirname(os.path.abspath(out))!r} does not exist")
    return weights, config


def check_beside(config: str, weights: str, force: bool) -> None:
    """The architecture file is replaced with the weights it describes (which check_export_target
    let through), or where it is one of ours; another existing file of that name is someone else's."""
    if not os.path.exists(config) or os.path.exists(weights) or force:
        return
    try:
        with open(config) as f:
            ours = json.load(f).get("exported_by") == "mae-fast"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise SystemExit(f"--out: {config!r} exists and belongs to no export of mae-fast; expected another --out, "
                         "or --force to replace it")


def check_export_target(out: str, source: str, force: bool) -> None:
    """An export replaces only an earlier export (marked in its metadata), or with --force another
    file; never a training checkpoint, whose loss would end the run's resumes."""
    from .io.files import CheckpointError, checkpoint_metadata
    from .train.run_dir import CHECKPOINT_NAME

    if os.path.isdir(out):
        raise SystemExit(f"--out {out!r} is a directory; expected a file path such as "
                         f"{os.path.join(out, 'encoder.pth')}")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise SystemExit(f"--out {out!r}: the directory {directory!r} does not exist")
    if CHECKPOINT_NAME.fullmatch(os.path.basename(out)):  # --resume auto would pick it up
        raise SystemExit(f"--out {out!r} is named like a training checkpoint (checkpoint-<step>.pth); "
                         "expected another name, such as encoder.pth")
    if not os.path.exists(out):
        return
    if os.path.exists(source) and os.path.samefile(out, source):
        raise SystemExit(f"--out {out!r} is the checkpoint being exported; expected another path")
    try:
        meta, keys = checkpoint_metadata(out)
    except (OSError, CheckpointError):
        meta, keys = {}, []
    if "optimizer" in keys:
        raise SystemExit(f"--out {out!r} is a training checkpoint; expected another path (replacing it "
                         "would lose the run's state, so not even --force does)")
    if "export" not in meta and not force:
        raise SystemExit(f"--out {out!r} exists and is no export of mae-fast; expected a new path, "
                         "or --force to replace it")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "pretrain":
        from .train.pretrain import main as pretrain_main

        pretrain_main(rest)
    elif command == "finetune":
        from .train.finetune import main as finetune_main

        finetune_main(rest)
    elif command == "linprobe":
        from .train.linprobe import main as linprobe_main

        linprobe_main(rest)
    elif command == "probe":
        cmd_probe(rest)
    elif command == "visualize":
        cmd_visualize(rest)
    elif command == "export":
        cmd_export(rest)
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
