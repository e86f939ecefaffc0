"""The architecture beside exported encoder weights, so that they load without mae-fast's presets:
timm's config (the model name, its model_args and the pretrained_cfg with the pixel statistics)
and a Hugging Face folder (config.json, model.safetensors and preprocessor_config.json) that
`ViTMAEModel.from_pretrained(folder)` loads."""
from __future__ import annotations

import json
import os

from .checkpoint import save_checkpoint
from .hf import hf_config_from_official, official_kwargs_of

# timm's name for the model of each (patch size, width); model_args set every size anyway
TIMM_NAMES = {(8, 384): "vit_small_patch8_224", (16, 768): "vit_base_patch16_224",
              (16, 1024): "vit_large_patch16_224", (14, 1280): "vit_huge_patch14_224"}
TIMM_DEFAULT_NAME = "vit_base_patch16_224"
TIMM_LAYER_NORM_EPS = 1e-6  # timm's VisionTransformer's; the official MAE's too
EXPORTED_BY = "mae-fast"


def timm_config(model, mean, std) -> dict:
    """timm's config.json for model's encoder: `timm.create_model(c["architecture"], **c["model_args"])`
    builds the VisionTransformer (num_classes=0, cls-token pooling through `norm`) that loads the
    `--to timm` weights strictly; pretrained_cfg carries the input size and the pixel statistics."""
    kw = official_kwargs_of(model)
    if kw["layer_norm_eps"] != TIMM_LAYER_NORM_EPS:
        raise ValueError(f"the model's LayerNorm eps is {kw['layer_norm_eps']}; timm's VisionTransformer uses "
                         f"{TIMM_LAYER_NORM_EPS}")
    (h, w), channels = kw["img_size"], kw["in_chans"]
    model_args = dict(img_size=h if h == w else [h, w], patch_size=kw["patch_size"], in_chans=channels,
                      embed_dim=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"],
                      mlp_ratio=kw["mlp_ratio"], num_classes=0)
    return {"architecture": TIMM_NAMES.get((kw["patch_size"], kw["embed_dim"]), TIMM_DEFAULT_NAME),
            "model_args": model_args, "num_classes": 0, "num_features": kw["embed_dim"], "global_pool": "token",
            "pretrained_cfg": {"input_size": [channels, h, w], "mean": list(mean), "std": list(std),
                               "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0},
            "exported_by": EXPORTED_BY}


def write_timm_config(path: str, model, mean, std) -> None:
    with open(path, "w") as f:
        json.dump(timm_config(model, mean, std), f, indent=2)
        f.write("\n")


def write_hf_folder(folder: str, model, state_dict, mean, std) -> None:
    """config.json (a ViTMAEConfig), model.safetensors (ViTMAEModel's keys) and
    preprocessor_config.json (a ViTImageProcessor with the pixel statistics, for 8-bit images)."""
    config = hf_config_from_official(model)  # refuses what transformers' ViTMAE cannot hold (non-square)
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_checkpoint(os.path.join(folder, "model.safetensors"), state_dict, metadata={"export": "hf"})
    h, w = model.img_size
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
                 "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(mean), "image_std": list(std)}
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(processor, f, indent=2)
        f.write("\n")
