"""`mae-fast`: pretrain, probe, visualize, export."""
from __future__ import annotations

import argparse
import os
import sys

import torch

USAGE = """mae-fast <command> [options]

commands:
  pretrain                 pretrain an MAE (default: a tiny model on the embedded sample photos)
  probe CHECKPOINT         linear probe of the frozen encoder on the embedded digits, vs random init
  visualize CHECKPOINT IMAGE...   reconstruction pictures for your own images
  export CHECKPOINT --to timm|hf  an encoder state dict for timm's ViT or transformers' ViTMAE

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
        model = build_model(preset, args.get("img_size") or args.get("input_size"),
                            norm_pix_loss=bool(args.get("norm_pix_loss", True)))
        report = load_checkpoint(model, ckpt, strict=False)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"{path}: does not fit the model its args describe (--model {preset}): {e}") from e
    if report.missing_keys and any(not k.startswith(("decoder", "mask_token")) for k in report.missing_keys):
        raise SystemExit(f"{path}: encoder weights missing: {report.missing_keys[:5]}")
    return model, preset, args, path


def cmd_probe(argv):
    p = argparse.ArgumentParser("mae-fast probe", description="Linear probe on scikit-learn's digits.")
    p.add_argument("checkpoint")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from .models.presets import build_model
    from .train.probe import probe_accuracy

    model, preset, _, _ = model_from_checkpoint(a.checkpoint)
    torch.manual_seed(a.seed)
    random_model = build_model(preset, model.img_size[0], norm_pix_loss=model.norm_pix_loss)
    acc, base = probe_accuracy(model, a.seed), probe_accuracy(random_model, a.seed)
    print(f"linear probe on digits ({preset}, {model.img_size[0]}px):")
    print(f"  pretrained encoder  {acc:.1%}")
    print(f"  random-init encoder {base:.1%}")
    return {"pretrained": acc, "random": base}


def cmd_visualize(argv):
    p = argparse.ArgumentParser("mae-fast visualize", description="Reconstruction pictures for your images.")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="reconstructions.png")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not 0 < a.mask_ratio < 1:
        p.error(f"--mask-ratio must be in (0, 1), got {a.mask_ratio}")
    missing = [path for path in a.images if not os.path.isfile(path)]
    if missing:
        p.error(f"image not found: {missing[0]}")
    import torch.nn.functional as F

    from .models.masking import len_keep_for
    from .train import data as mdata
    from .train.pictures import picture_path, reconstruction_grid

    if os.path.isdir(a.out):
        raise SystemExit(f"--out {a.out!r} is a directory; expected a picture file such as "
                         f"{os.path.join(a.out, 'reconstructions.png')}")
    try:
        picture_path(a.out)
    except ValueError as e:
        raise SystemExit(f"--out {a.out!r}: {e}") from e
    model, _, _, _ = model_from_checkpoint(a.checkpoint)
    try:  # the patch count comes with the checkpoint: checked before any image is read
        len_keep_for(model.num_patches, a.mask_ratio)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--mask-ratio {a.mask_ratio}: {e}") from None
    size = model.img_size[0]
    batch = []
    for path in a.images:
        try:
            img = mdata.load_image(path)
        except Exception as e:  # noqa: BLE001 -- PIL raises many types for broken files
            raise SystemExit(f"cannot read image {path}: {e}") from e
        side = min(img.shape[1:])  # centre square crop, then resize
        top, left = (img.shape[1] - side) // 2, (img.shape[2] - side) // 2
        img = img[:, top:top + side, left:left + side].unsqueeze(0)
        batch.append(mdata.normalize(F.interpolate(img, size=(size, size), mode="bicubic", antialias=True)[0]))
    out = reconstruction_grid(model, torch.stack(batch), a.out, a.mask_ratio, a.seed)
    print(f"reconstructions: {out}")
    return out


def cmd_export(argv):
    p = argparse.ArgumentParser("mae-fast export", description="Export the encoder for timm or transformers.")
    p.add_argument("checkpoint")
    p.add_argument("--to", required=True, choices=["timm", "hf"])
    p.add_argument("--out", default=None, help="default: encoder-<to>.pth beside the checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out file that is no export of mae-fast (never a training checkpoint)")
    a = p.parse_args(argv)
    from .io.checkpoint import save_checkpoint
    from .io.timm import encoder_state_dict

    path = resolve_checkpoint(a.checkpoint)
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(path)), f"encoder-{a.to}.pth")  # in a run folder
    check_export_target(out, path, a.force)
    model, _, _, path = model_from_checkpoint(path)
    sd = encoder_state_dict(model, a.to)
    try:
        save_checkpoint(out, sd, metadata={"export": a.to})
    except OSError as e:
        raise SystemExit(f"--out {out!r}: cannot write it: {e}") from e
    print(f"{a.to} encoder state dict ({len(sd)} tensors): {out}")
    return out


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
