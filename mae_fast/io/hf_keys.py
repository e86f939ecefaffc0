"""State-dict names: the official MAE layout <-> Hugging Face transformers' ViTMAEForPreTraining.

Official (facebookresearch/mae) names <-> transformers names, for both generations of the latter:

  official                      transformers 4.x                                  transformers 5.x
  cls_token                     vit.embeddings.cls_token                          (same as 4.x)
  pos_embed                     vit.embeddings.position_embeddings                (same)
  patch_embed.proj.*            vit.embeddings.patch_embeddings.projection.*     (same)
  blocks.i.norm1.*              vit.encoder.layer.i.layernorm_before.*           vit.layers.i.layernorm_before.*
  blocks.i.attn.qkv.*  (fused)  ...attention.attention.{query,key,value}.*       ...attention.{q,k,v}_proj.*
  blocks.i.attn.proj.*          ...attention.output.dense.*                      ...attention.o_proj.*
  blocks.i.norm2.*              ...layernorm_after.*                             ...layernorm_after.*
  blocks.i.mlp.fc1.*            ...intermediate.dense.*                          ...mlp.fc1.*
  blocks.i.mlp.fc2.*            ...output.dense.*                                ...mlp.fc2.*
  norm.*                        vit.layernorm.*                                  (same)
  decoder_embed.*, mask_token, decoder_pos_embed, decoder_norm.*, decoder_pred.*
                                decoder.<same name>                              (same)
  decoder_blocks.i.*            decoder.decoder_layers.i.<layer names as above>

The official fused qkv weight (3D, D) / bias (3D,) is the concatenation of q, k, v rows
[0:D], [D:2D], [2D:3D]. Both position tables are parameters with requires_grad=False in both
libraries and are carried in the state dicts, so they are converted like any other weight.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["official_state_dict_from_hf", "hf_state_dict_from_official", "detect_key_format", "KEY_FORMATS",
           "POS_TABLE_KEYS"]

KEY_FORMATS = ("4.x", "5.x")

# Per-layer names, official suffix -> HF suffix (qkv handled separately).
_LAYER_NAMES = {
    "4.x": {
        "norm1": "layernorm_before",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
    "5.x": {
        "norm1": "layernorm_before",
        "attn.proj": "attention.o_proj",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
}
_QKV_NAMES = {
    "4.x": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "5.x": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
}
_ENCODER_LAYER_PREFIX = {"4.x": "vit.encoder.layer.", "5.x": "vit.layers."}
_DECODER_LAYER_PREFIX = "decoder.decoder_layers."

# Whole-model keys outside the blocks (the module prefix of each, with .weight/.bias or as a tensor).
_GLOBAL_NAMES = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
    "norm": "vit.layernorm",
    "decoder_embed": "decoder.decoder_embed",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",
}
# The fixed sin-cos position tables (frozen parameters, carried in both state dicts).
POS_TABLE_KEYS = ("pos_embed", "decoder_pos_embed")


def _normalise_format(key_format) -> str:
    if key_format is None:
        return _installed_key_format()
    s = str(key_format).strip().lower().lstrip("v")
    if s in ("4", "4.x") or s.startswith("4."):
        return "4.x"
    if s in ("5", "5.x") or s.startswith("5."):
        return "5.x"
    raise ValueError(f"key_format must be '4.x' or '5.x' (or a transformers version), got {key_format!r}")


def _installed_key_format() -> str:
    try:
        import transformers
    except ImportError:
        return "5.x"
    major = int(transformers.__version__.split(".")[0])
    return "4.x" if major < 5 else "5.x"


# ----------------------------------------------------------------------------- state dicts

# transformers 5.x save_pretrained writes legacy (4.x) names, and renames the decoder's
# 'decoder_layers.' by mistake to 'decoder_encoder.layer.' (its own from_pretrained reverses it).
_SAVED_BY_5X_DECODER = "decoder.decoder_encoder.layer."


def _undo_5x_save_names(sd: Mapping) -> dict:
    return {(_DECODER_LAYER_PREFIX + k[len(_SAVED_BY_5X_DECODER):] if k.startswith(_SAVED_BY_5X_DECODER) else k): v
            for k, v in sd.items()}


def detect_key_format(hf_state_dict: Mapping) -> str:
    """'4.x' or '5.x' from the attention key names ('5.x' when there are no transformer layers).
    Files written by transformers 5.x save_pretrained carry 4.x names and count as '4.x'."""
    keys = list(_undo_5x_save_names(hf_state_dict))
    has4 = any(re.search(r"(^|\.)(encoder\.layer|decoder_layers)\.\d+\.attention\.attention\.", k) for k in keys)
    has5 = any(re.search(r"(^|\.)(layers|decoder_layers)\.\d+\.attention\.(q|k|v|o)_proj\.", k) for k in keys)
    if has4 and has5:
        raise ValueError("the state dict mixes transformers 4.x ('attention.attention.query') and 5.x "
                         "('attention.q_proj') key names")
    return "4.x" if has4 else "5.x"


def _with_vit_prefix(sd: Mapping) -> dict:
    """ViTMAEModel (the encoder alone) has no 'vit.' prefix; add it so one mapping serves both."""
    if any(k.startswith("vit.") for k in sd):
        return dict(sd)
    if any(k.startswith(("embeddings.", "encoder.layer.", "layers.", "layernorm.")) for k in sd):
        return {(k if k.startswith("decoder.") else "vit." + k): v for k, v in sd.items()}
    return dict(sd)


def _hf_names_for(official_key: str, fmt: str):
    """HF key(s) of one official key: a str, or a 3-tuple (q, k, v) for a fused qkv tensor."""
    m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", official_key)
    if m:
        stack, i, mod, kind = m.groups()
        prefix = (_ENCODER_LAYER_PREFIX[fmt] if stack == "blocks" else _DECODER_LAYER_PREFIX) + i + "."
        if mod == "attn.qkv":
            return tuple(f"{prefix}{n}.{kind}" for n in _QKV_NAMES[fmt])
        if mod in _LAYER_NAMES[fmt]:
            return f"{prefix}{_LAYER_NAMES[fmt][mod]}.{kind}"
        return None
    if official_key in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[official_key]
    head, _, kind = official_key.rpartition(".")
    if kind in ("weight", "bias") and head in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[head]}.{kind}"
    return None


def _official_names_for_hf(keys, fmt: str) -> dict:
    """{official_key: hf name or (q, k, v) names} for every official key the HF keys imply."""
    out = {}
    for off, hf in _GLOBAL_NAMES.items():
        for k in (hf, hf + ".weight", hf + ".bias"):
            if k in keys:
                out[off + k[len(hf):]] = k
    inv_layer = {v: k for k, v in _LAYER_NAMES[fmt].items()}
    qkv = _QKV_NAMES[fmt]
    for stack, prefix in (("blocks", _ENCODER_LAYER_PREFIX[fmt]), ("decoder_blocks", _DECODER_LAYER_PREFIX)):
        pat = re.compile("^" + re.escape(prefix) + r"(\d+)\.(.+)\.(weight|bias)$")
        for k in keys:
            m = pat.match(k)
            if not m:
                continue
            i, mod, kind = m.groups()
            if mod in inv_layer:
                out[f"{stack}.{i}.{inv_layer[mod]}.{kind}"] = k
            elif mod in qkv:
                out[f"{stack}.{i}.attn.qkv.{kind}"] = tuple(f"{prefix}{i}.{n}.{kind}" for n in qkv)
    return out


def official_state_dict_from_hf(hf_state_dict: Mapping) -> dict:
    """Official-layout state dict from a ViTMAEForPreTraining (or ViTMAEModel) state dict with
    transformers 4.x or 5.x key names (detected from the keys), or from a file written by 5.x
    save_pretrained (4.x names, decoder layers as 'decoder.decoder_encoder.layer.i'). q, k, v are
    fused into qkv.

    Every HF key must map to an official one (else ValueError listing the strays); an incomplete
    q/k/v triple is an error. Keys absent from the input (e.g. the decoder of an encoder-only
    ViTMAEModel) are simply absent from the output."""
    fmt = detect_key_format(hf_state_dict)
    sd = _with_vit_prefix(_undo_5x_save_names(hf_state_dict))
    names = _official_names_for_hf(set(sd), fmt)
    out, used = {}, set()
    for off, hf in sorted(names.items(), key=lambda kv: _official_sort_key(kv[0])):
        if isinstance(hf, tuple):
            absent = [k for k in hf if k not in sd]
            if absent:
                raise ValueError(f"{off}: the q/k/v triple is incomplete, missing {absent}")
            parts = [sd[k] for k in hf]
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) != 1:
                raise ValueError(f"{off}: q, k, v shapes differ: {[tuple(p.shape) for p in parts]}")
            out[off] = torch.cat(parts, dim=0)
            used.update(hf)
        else:
            out[off] = sd[hf]
            used.add(hf)
    stray = sorted(k for k in sd if k not in used)
    if stray:
        raise ValueError(f"unrecognised ViTMAE keys for transformers {fmt} names: {stray[:10]}"
                         + (f" ... ({len(stray)} in all)" if len(stray) > 10 else ""))
    return out


def hf_state_dict_from_official(state_dict: Mapping, key_format: str | None = None) -> dict:
    """ViTMAEForPreTraining state dict (key names of transformers `key_format`, default: the
    installed version, else 5.x) from an official-layout state dict; qkv is split into q, k, v."""
    fmt = _normalise_format(key_format)
    out = {}
    unknown = []
    for key, value in state_dict.items():
        hf = _hf_names_for(key, fmt)
        if hf is None:
            unknown.append(key)
        elif isinstance(hf, tuple):
            if value.shape[0] % 3:
                raise ValueError(f"{key}: fused qkv has {value.shape[0]} rows, not a multiple of 3")
            for name, part in zip(hf, value.chunk(3, dim=0)):
                out[name] = part.clone()
        else:
            out[hf] = value
    if unknown:
        raise ValueError(f"keys that are not part of the official MaskedAutoencoderViT: {unknown[:10]}")
    return out


def _official_sort_key(k: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]
