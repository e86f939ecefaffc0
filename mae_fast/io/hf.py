"""Hugging Face transformers' ViTMAEForPreTraining <-> the official MAE: configs and whole models.

The state-dict names are converted by mae_fast/io/hf_keys.py. transformers is imported lazily: only
`to_hf`, `hf_config_from_official` and `from_hf` with a path need it.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from functools import partial

from torch import nn

from ..ops._common import pair_arg
from .files import read_state_dict
from .hf_keys import (KEY_FORMATS, POS_TABLE_KEYS, _installed_key_format, detect_key_format,
                      hf_state_dict_from_official, official_state_dict_from_hf)

__all__ = [
    "official_config_from_hf", "hf_config_from_official", "official_state_dict_from_hf",
    "hf_state_dict_from_official", "detect_key_format", "from_hf", "to_hf", "KEY_FORMATS",
]


# ----------------------------------------------------------------------------- configs

def _cfg_get(cfg, name, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def official_config_from_hf(hf_config) -> tuple[dict, float]:
    """(MaskedAutoencoderViT kwargs, mask_ratio) from a ViTMAEConfig (or its to_dict()).

    Raises ValueError for configs the official model cannot represent: an activation other than
    exact GELU, qkv_bias False, non-square patches, a decoder MLP ratio different from the
    encoder's, a head_dim other than hidden_size / heads, mask_ratio outside [0, 1)."""
    model_type = _cfg_get(hf_config, "model_type")
    if model_type not in (None, "vit_mae"):
        raise ValueError(f"expected a ViTMAE config (model_type 'vit_mae'), got model_type {model_type!r}")
    act = _cfg_get(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r} is not supported: the official MAE blocks use exact "
                         f"(erf) GELU, i.e. hidden_act='gelu'")
    if not _cfg_get(hf_config, "qkv_bias", True):
        raise ValueError("qkv_bias=False is not supported: the official MAE attention has a qkv bias")
    ph, pw = pair_arg(_cfg_get(hf_config, "patch_size", 16), "patch_size")
    if ph != pw:
        raise ValueError(f"patch_size={(ph, pw)}: the official MAE needs square patches")
    H, W = pair_arg(_cfg_get(hf_config, "image_size", 224), "image_size")
    if H % ph or W % pw:
        raise ValueError(f"image_size {(H, W)} is not divisible by patch_size {ph}")
    D = _cfg_get(hf_config, "hidden_size", 768)
    heads = _cfg_get(hf_config, "num_attention_heads", 12)
    Dd = _cfg_get(hf_config, "decoder_hidden_size", 512)
    dheads = _cfg_get(hf_config, "decoder_num_attention_heads", 16)
    for name, dim, h in (("hidden_size", D, heads), ("decoder_hidden_size", Dd, dheads)):
        if dim % h:
            raise ValueError(f"{name}={dim} is not divisible by its number of heads {h}")
    head_dim = _cfg_get(hf_config, "head_dim")
    if head_dim is not None and head_dim != D // heads:
        raise ValueError(f"head_dim={head_dim} != hidden_size / num_attention_heads = {D // heads}: "
                         f"the official attention has head_dim = embed_dim / num_heads")
    inter = _cfg_get(hf_config, "intermediate_size", 3072)
    dinter = _cfg_get(hf_config, "decoder_intermediate_size", 2048)
    mlp_ratio = inter / D
    if int(Dd * mlp_ratio) != dinter or int(D * mlp_ratio) != inter:
        raise ValueError(
            f"intermediate_size/hidden_size = {inter}/{D} and decoder_intermediate_size/decoder_hidden_size = "
            f"{dinter}/{Dd} differ: the official MAE uses one mlp_ratio for encoder and decoder")
    if float(mlp_ratio).is_integer():
        mlp_ratio = float(int(mlp_ratio))
    mask_ratio = float(_cfg_get(hf_config, "mask_ratio", 0.75))
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1)")
    drops = {n: _cfg_get(hf_config, n, 0.0) for n in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    if any(drops.values()):
        warnings.warn(f"{drops}: the official MAE has no dropout; the weights convert exactly but "
                      f"training will differ", stacklevel=2)
    kwargs = dict(
        img_size=H if H == W else (H, W),
        patch_size=ph,
        in_chans=_cfg_get(hf_config, "num_channels", 3),
        embed_dim=D,
        depth=_cfg_get(hf_config, "num_hidden_layers", 12),
        num_heads=heads,
        decoder_embed_dim=Dd,
        decoder_depth=_cfg_get(hf_config, "decoder_num_hidden_layers", 8),
        decoder_num_heads=dheads,
        mlp_ratio=mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=float(_cfg_get(hf_config, "layer_norm_eps", 1e-12))),
        norm_pix_loss=bool(_cfg_get(hf_config, "norm_pix_loss", False)),
    )
    return kwargs, mask_ratio


def _num_heads_of(block: nn.Module, what: str) -> int:
    for mod in [block, *block.modules()]:
        for attr in ("num_heads", "heads", "n_heads", "num_attention_heads"):
            v = getattr(mod, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    raise ValueError(f"cannot find the number of attention heads of {what} (no 'num_heads' attribute)")


def _layernorm_eps(model: nn.Module) -> float:
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if not eps:
        norm = getattr(model, "norm", None)
        if norm is not None and hasattr(norm, "eps"):
            return float(norm.eps)
        raise ValueError("cannot find the LayerNorm eps of the model")
    if len(eps) > 1:
        raise ValueError(f"the model's LayerNorms use different eps {sorted(eps)}; ViTMAEConfig has one layer_norm_eps")
    return float(eps.pop())


def official_kwargs_of(model: nn.Module) -> dict:
    """The MaskedAutoencoderViT constructor kwargs that rebuild `model` (from its shapes/attributes)."""
    sd = model.state_dict()
    try:
        D = sd["pos_embed"].shape[-1]
        Dd = sd["decoder_pos_embed"].shape[-1]
    except KeyError as e:
        raise ValueError(f"not an official-layout MaskedAutoencoderViT: no {e} in its state dict") from None
    depth = len(model.blocks)
    ddepth = len(model.decoder_blocks)
    if depth:
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    elif ddepth:
        hidden = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] * D // Dd
    else:
        hidden = 4 * D
    patch = pair_arg(model.patch_size, "patch_size")
    if patch[0] != patch[1]:
        raise ValueError(f"patch_size {patch} is not square")
    return dict(
        img_size=pair_arg(model.img_size, "img_size"), patch_size=int(patch[0]), in_chans=int(model.in_chans),
        embed_dim=int(D), depth=depth,
        num_heads=_num_heads_of(model.blocks[0], "blocks[0]") if depth else 1,
        decoder_embed_dim=int(Dd), decoder_depth=ddepth,
        decoder_num_heads=_num_heads_of(model.decoder_blocks[0], "decoder_blocks[0]") if ddepth else 1,
        mlp_ratio=hidden / D, layer_norm_eps=_layernorm_eps(model),
        norm_pix_loss=bool(model.norm_pix_loss),
    )


def hf_config_from_official(model: nn.Module, mask_ratio: float | None = 0.75):
    """A transformers ViTMAEConfig equivalent to an official-layout MaskedAutoencoderViT.
    mask_ratio None: the model's `default_mask_ratio` if set, else 0.75."""
    ViTMAEConfig = _import_transformers().ViTMAEConfig
    kw = official_kwargs_of(model)
    H, W = kw["img_size"]
    if H != W:
        raise ValueError(f"img_size {(H, W)} is not square: transformers' ViTMAEForPreTraining only "
                         f"supports square images")
    if mask_ratio is None:
        mask_ratio = getattr(model, "default_mask_ratio", None)
        mask_ratio = 0.75 if mask_ratio is None else mask_ratio
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1)")
    D, Dd, r = kw["embed_dim"], kw["decoder_embed_dim"], kw["mlp_ratio"]
    return ViTMAEConfig(
        hidden_size=D, num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
        intermediate_size=int(D * r), hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=kw["layer_norm_eps"], image_size=H,
        patch_size=kw["patch_size"], num_channels=kw["in_chans"], qkv_bias=True,
        decoder_num_attention_heads=kw["decoder_num_heads"], decoder_hidden_size=Dd,
        decoder_num_hidden_layers=kw["decoder_depth"], decoder_intermediate_size=int(Dd * r),
        mask_ratio=float(mask_ratio), norm_pix_loss=kw["norm_pix_loss"],
    )


# ----------------------------------------------------------------------------- models

def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("Hugging Face conversion needs the 'transformers' package: "
                          "pip install transformers") from e
    return transformers


def _load_hf(model_or_path):
    """(config, state_dict) of a ViTMAEForPreTraining instance or a local save_pretrained folder."""
    if isinstance(model_or_path, nn.Module):
        config = getattr(model_or_path, "config", None)
        if config is None:
            raise TypeError(f"{type(model_or_path).__name__} has no .config: expected a transformers "
                            f"ViTMAEForPreTraining")
        return config, model_or_path.state_dict()
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a ViTMAEForPreTraining or a local directory, got {type(model_or_path).__name__}")
    path = os.fspath(model_or_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path!r} is not a local directory saved with save_pretrained (hub downloads are not done here)")
    transformers = _import_transformers()
    config = transformers.ViTMAEConfig.from_pretrained(path, local_files_only=True)
    sd = {}
    st = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    bins = [f for f in sorted(os.listdir(path)) if f.endswith(".bin") and f.startswith("pytorch_model")]
    files = st or bins
    if not files:
        raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin weights in {path!r}")
    for f in files:
        sd.update(read_state_dict(os.path.join(path, f)))
    return config, sd


def from_hf(model_cls, model_or_path):
    """Build `model_cls(**official kwargs)` from a transformers ViTMAEForPreTraining (instance or
    local save_pretrained directory; nothing is downloaded) and load its weights strictly.

    Returns the model (on the source instance's device and dtype; from a directory: CPU, the
    model's default dtype) with `model.default_mask_ratio = config.mask_ratio`. A classmethod can wrap
    it: `from_hf = classmethod(lambda cls, m: mae_fast.io.hf.from_hf(cls, m))`."""
    config, hf_sd = _load_hf(model_or_path)
    kwargs, mask_ratio = official_config_from_hf(config)
    sd = official_state_dict_from_hf(hf_sd)
    model = model_cls(**kwargs)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    # The fixed sin-cos tables may be absent from an export; the model's own tables are then right.
    missing_real = [k for k in missing if k not in POS_TABLE_KEYS]
    if missing_real or unexpected:
        raise ValueError(f"converted weights do not fit {model_cls.__name__}: missing {missing_real[:10]}, "
                         f"unexpected {unexpected[:10]}")
    if missing:
        warnings.warn(f"{missing} not in the Hugging Face weights: kept the model's sin-cos tables", stacklevel=2)
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"shape mismatch for {k!r}: converted {tuple(v.shape)}, model {tuple(own[k].shape)}")
    zero = [k for k in POS_TABLE_KEYS if k in sd and not sd[k].any()]
    if zero:
        warnings.warn(
            f"{zero} are all zeros in the Hugging Face weights (transformers 5.x leaves the sin-cos tables "
            f"of a freshly initialised ViTMAEForPreTraining at zero; pretrained checkpoints carry them); "
            f"copied as they are", stacklevel=2)
    model.load_state_dict(sd, strict=False)
    if isinstance(model_or_path, nn.Module):  # follow the source model's device and dtype
        p = next(model_or_path.parameters(), None)
        if p is not None:
            model.to(device=p.device, dtype=p.dtype)
    model.default_mask_ratio = mask_ratio
    return model


def to_hf(model: nn.Module, mask_ratio: float | None = None, **config_overrides):
    """A transformers ViTMAEForPreTraining holding `model`'s weights (official layout in, eval mode
    untouched, fp32 copies on the model's device). mask_ratio None: model.default_mask_ratio or 0.75.
    config_overrides go to ViTMAEConfig (e.g. attn_implementation is passed to the model)."""
    transformers = _import_transformers()
    attn = config_overrides.pop("attn_implementation", None)
    config = hf_config_from_official(model, mask_ratio)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    if attn is not None:
        config._attn_implementation = attn
    hf = transformers.ViTMAEForPreTraining(config)
    sd = hf_state_dict_from_official(model.state_dict(), _installed_key_format())
    result = hf.load_state_dict(sd, strict=True)
    del result
    p = next(model.parameters(), None)
    if p is not None:
        hf.to(device=p.device, dtype=p.dtype)
    hf.train(model.training)
    return hf
