"""`mae-fast pretrain --init PATH`: a new run that starts from released or earlier weights.

PATH is an official `.pth` (the encoder-only `mae_pretrain_vit_*.pth` or a whole MAE), a Hugging
Face ViTMAE folder (save_pretrained: model.safetensors or pytorch_model.bin, 4.x or 5.x names), a
mae-fast checkpoint, or a mae-fast run folder (its newest checkpoint). Position tables of another
grid are interpolated (io.checkpoint.load_checkpoint); the decoder and the mask token may be
missing and then keep their fresh initialisation. Anything else that does not fit is an error:
the weights of another architecture would train a model that is neither.
"""
from __future__ import annotations

import json
import os
import warnings

from ..io.checkpoint import CheckpointError, compact_keys, load_checkpoint, read_checkpoint
from .run_dir import checkpoints_in

# keys the weights may lack: the decoder and mask token (encoder-only releases), and the fixed
# sin-cos position tables (some exports leave them out; the model's own are exact)
MAY_BE_MISSING = ("decoder_", "mask_token", "pos_embed")
# keys the model has no use for: a fine-tuned classifier's head
IGNORED = ("head.", "fc_norm.")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def init_file(path: str) -> str:
    """The weights file of --init PATH: the file itself, a run folder's newest checkpoint, or a
    Hugging Face folder's weights."""
    if not os.path.isdir(path):
        return path
    runs = checkpoints_in(path)
    if runs:
        return runs[-1]
    weights = [os.path.join(path, f) for f in HF_WEIGHTS if os.path.isfile(os.path.join(path, f))]
    if not weights:
        raise SystemExit(f"--init {path}: a folder without checkpoint-<step>.pth (a mae-fast run) or "
                         f"{' / '.join(HF_WEIGHTS)} (a Hugging Face save_pretrained folder)")
    return weights[0]


def saved_grid(file: str, ckpt, patch: int) -> tuple[int, int] | None:
    """The patch grid the weights were trained at, where a non-square one is told: by a mae-fast
    or official checkpoint's args (input_size / img_size), or a Hugging Face folder's config.json."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    args = vars(args) if hasattr(args, "__dict__") else args if isinstance(args, dict) else {}
    size = args.get("input_size") or args.get("img_size")
    config = os.path.join(os.path.dirname(file), "config.json")
    if size is None and os.path.basename(file) in HF_WEIGHTS and os.path.isfile(config):
        with open(config) as f:
            size = json.load(f).get("image_size")
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    return h // patch, w // patch


def load_init(path: str, model, preset: str) -> str:
    """Loads --init's weights into model (before the run writes anything); returns the line that
    says what was loaded. One-line SystemExit when they do not fit."""
    file = init_file(path)
    h, w = model.img_size
    fits = f"--model {preset} ({model.in_chans} channels, {h}x{w} px)"
    try:
        ckpt = read_checkpoint(file)
        with warnings.catch_warnings():  # the report below says what the loader would warn about
            warnings.simplefilter("ignore")
            grid = saved_grid(file, ckpt, model.patch_size)
            report = load_checkpoint(model, ckpt, strict=False, checkpoint_grid=grid)
    except (OSError, CheckpointError, KeyError) as e:
        raise SystemExit(f"--init {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except (ValueError, TypeError, RuntimeError) as e:
        raise SystemExit(f"--init {path}: the weights of another architecture than {fits}: "
                         f"{str(e).splitlines()[0]}") from None
    missing = [k for k in report.missing if not k.startswith(MAY_BE_MISSING)]
    unexpected = [k for k in report.unexpected if not k.startswith(IGNORED)]
    if missing or unexpected:
        parts = ([f"missing {compact_keys(missing, limit=4)}"] if missing else []) + \
                ([f"not in the model {compact_keys(unexpected, limit=4)}"] if unexpected else [])
        raise SystemExit(f"--init {path}: the weights of another architecture than {fits}: {'; '.join(parts)}")
    loaded = len(model.state_dict()) - len(report.missing)
    notes = [f"{loaded} tensors"]
    if report.converted_from:
        notes.append(f"converted from {report.converted_from} names")
    if report.interpolated:
        notes.append(f"position tables interpolated to the {h // model.patch_size}x{w // model.patch_size} grid")
    if any(k.startswith("decoder_") for k in report.missing):
        notes.append("decoder freshly initialised")
    return f"--init: loaded {file} ({', '.join(notes)})"
