"""Layer-wise learning-rate decay for ViT fine-tuning (ELECTRA, BEiT; the official MAE recipe).

Layer ids: 0 for the embedding (cls_token, pos_embed, patch_embed.*), i + 1 for blocks.i, and
num_layers = len(model.blocks) + 1 for everything after the blocks (fc_norm / norm, head). A
parameter of layer id l trains at lr * layer_decay ** (num_layers - l): the head at the full lr,
the embedding at the smallest.
"""
from __future__ import annotations


def layer_id_for_vit(name: str, num_layers: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=(), layer_decay=0.75):
    """Optimizer parameter groups, one per (layer id, decay or not), each carrying "lr_scale" (the
    training loop sets group lr = lr * lr_scale) and "weight_decay": 0 for 1-D parameters (norms,
    biases) and the names in no_weight_decay_list, else weight_decay. Frozen parameters are left
    out. Groups come in the order of their first parameter in model.named_parameters()."""
    num_layers = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name in no_weight_decay_list)
        layer = layer_id_for_vit(name, num_layers)
        group = groups.setdefault((layer, decay), {"lr_scale": layer_decay ** (num_layers - layer),
                                                   "weight_decay": weight_decay if decay else 0.0, "params": []})
        group["params"].append(p)
    return list(groups.values())
