"""What fine-tuning and linear probing read: the pretrained encoder (a run folder or checkpoint of
mae-fast, an official `.pth`, a timm export, a Hugging Face ViTMAE folder) and the labelled images
(an ImageFolder tree with train/ and val/, or scikit-learn's bundled digits).

Every sample's augmentation is a pure function of (seed, epoch, index): a resumed run, or a run on
N processes, sees exactly the images it would have seen.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import re

import numpy as np
import torch
import torch.nn.functional as F

from ..io.checkpoint import CheckpointError, read_checkpoint, read_state_dict
from ..io.hf_keys import official_state_dict_from_hf
from ..models.classifier import VisionTransformer
from ..models.presets import PRESETS
from ..ops._common import pair_arg
from .run_dir import checkpoints_in

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as the official recipes


# ----------------------------------------------------------------------------- the pretrained encoder

def _block_count(sd) -> int:
    ids = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def encoder_arch(sd: dict, saved_args: dict | None = None) -> dict:
    """VisionTransformer kwargs of the encoder in a state dict of official / timm names. The head
    count is not in the weights: the run's preset names it, else a preset of the same shape
    does, else embed_dim / 64 (the width of a head in every official model)."""
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if any(k not in sd for k in needed):
        raise ValueError("it holds no ViT encoder of the official / timm layout (expected the keys "
                         f"{', '.join(needed)}; found {', '.join(list(sd)[:4])}, ...)")
    dim, (_, in_chans, patch, _) = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape
    depth, rows = _block_count(sd), sd["pos_embed"].shape[1] - 1
    hw = tuple((saved_args or {}).get("input_size") or ())  # a non-square pretraining crop (H, W)
    if len(hw) != 2 or (hw[0] // patch) * (hw[1] // patch) != rows:
        hw = (math.isqrt(rows) * patch,) * 2
    preset = PRESETS.get((saved_args or {}).get("model"), (None, None))[1]
    same = [kw for _, kw in PRESETS.values() if (kw["embed_dim"], kw["depth"], kw["patch_size"]) == (dim, depth, patch)]
    heads = (preset or (same[0] if same else {})).get("num_heads", max(dim // 64, 1))
    return dict(img_size=hw, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
                num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim)


def read_encoder(path: str) -> tuple[dict, dict, str]:
    """(state dict in official / timm names, encoder_arch, the file read) of a pretrained encoder.
    SystemExit with one line for anything unusable."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):  # Hugging Face ViTMAE
        from ..io.timm import encoder_state_dict
        from ..models.official import MaskedAutoencoderViT

        try:
            sd = encoder_state_dict(MaskedAutoencoderViT.from_hf(path), "timm")
        except (ImportError, OSError, ValueError, TypeError) as e:
            raise SystemExit(f"{path}: cannot read it as a Hugging Face ViTMAE folder: {e}") from e
        saved, source = {}, path
    else:
        source = path
        if os.path.isdir(path):
            found = checkpoints_in(path)
            if not found:
                raise SystemExit(f"{path}: no checkpoint-*.pth (a pretraining run folder), no config.json (a Hugging "
                                 "Face folder); expected one of those, or a checkpoint file")
            source = found[-1]
        try:
            ckpt = read_checkpoint(source)
            sd = dict(read_state_dict(ckpt))
        except (OSError, CheckpointError, ValueError) as e:
            raise SystemExit(f"{source}: {e}") from e
        if any(k.startswith(("vit.", "embeddings.")) for k in sd):
            sd = official_state_dict_from_hf(sd)
        saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else vars(ckpt["args"]) \
            if hasattr(ckpt.get("args"), "__dict__") else {}
    try:
        return sd, encoder_arch(sd, saved), source
    except ValueError as e:
        raise SystemExit(f"{source}: {e}") from e


def build_classifier(arch: dict, args, num_classes: int, state: dict | None, head_init_std: float,
                     drop_path: float = 0.0) -> VisionTransformer:
    """The classifier of the encoder's shape at --input-size; state None: a random-init encoder."""
    kwargs = dict(arch, img_size=args.input_size or arch["img_size"])
    try:
        model = VisionTransformer(num_classes=num_classes, global_pool=args.global_pool, drop_path_rate=drop_path,
                                  **kwargs)
        if state is None:
            model.init_head(head_init_std)
        else:
            report = model.load_pretrained(state, head_init_std)
            if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
                print(report)
    except ValueError as e:
        raise SystemExit(f"{args.pretrained}: {e}") from e
    return model


# ----------------------------------------------------------------------------- labelled images

class SeededSamples(torch.utils.data.Dataset):
    """A dataset whose random transforms (torch, numpy and `random` draws) are seeded per sample from
    (seed, epoch, index), the caller's random state left as it was."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.classes, self.source = getattr(dataset, "classes", None), getattr(dataset, "source", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        s = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])


class Digits(torch.utils.data.Dataset):
    """scikit-learn's bundled 8x8 digits, upsampled to size (an int or (H, W)), normalised as photos: a fixed
    60 / 40 train / val split. No per-image augmentation (mixup / cutmix, batch-level, still run)."""

    def __init__(self, split: str, size, channels: int = 3):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise SystemExit("the embedded digits need scikit-learn: pip install scikit-learn "
                             "(or pass --data with train/ and val/ ImageFolder trees)") from e
        d = load_digits()
        x = F.interpolate(torch.from_numpy(d.images).float().unsqueeze(1) / 16.0, size=pair_arg(size, "size"),
                          mode="bilinear", align_corners=False).expand(-1, channels, -1, -1)
        if channels == 3:
            x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        n_train = int(0.6 * len(x))
        keep = perm[:n_train] if split == "train" else perm[n_train:]
        self.images, self.labels = x[keep].contiguous(), torch.from_numpy(d.target).long()[keep]
        self.classes = [str(c) for c in range(10)]
        self.source = {"path": None, "files": len(d.target), "names_sha256": "sklearn-digits"}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def eval_transform(size: int):
    """Resize to size / 0.875 (256 for 224) and centre-crop size, bicubic: the official evaluation."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(int(size / 0.875) if size <= 224 else size,
                                                 interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def image_folders(root: str, train_transform, size: int):
    """(train, val) ImageFolder datasets of root/train and root/val; SystemExit with one line for a
    tree without classes or with differing class lists."""
    try:
        from torchvision import datasets
    except ImportError as e:
        raise SystemExit("--data needs torchvision: pip install torchvision") from e
    out = []
    for split, transform in (("train", train_transform), ("val", eval_transform(size))):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise SystemExit(f"--data {root}: expected {split}/ inside it, an ImageFolder tree (one sub-folder "
                             "of images per class)")
        try:
            ds = datasets.ImageFolder(path, transform=transform)
        except (FileNotFoundError, OSError) as e:
            raise SystemExit(f"--data {path}: {e}; expected one sub-folder of images per class") from e
        names = sorted(os.path.relpath(p, path).replace(os.sep, "/") for p, _ in ds.samples)
        ds.source = {"path": os.path.abspath(path), "files": len(names),
                     "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]}
        out.append(ds)
    if out[0].classes != out[1].classes:
        raise SystemExit(f"--data {root}: train/ has the classes {out[0].classes[:5]}..., val/ {out[1].classes[:5]}...; "
                         "expected the same class folders in both")
    return out[0], out[1]
