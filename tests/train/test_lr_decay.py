"""Layer-wise lr decay groups, the LARS step, and mixup / cutmix targets, against the official
recipes' arithmetic (written out here from their descriptions)."""
import numpy as np
import pytest
import torch

import mae_fast
from mae_fast.train.classify import seed_step


def official_layer_id(name, num_layers):
    """BEiT's / the official rule: 0 for the embedding, i + 1 for block i, num_layers after."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_layer_decay_groups_follow_the_official_formula_for_vit_b(pool):
    with torch.device("meta"):
        model = mae_fast.vit_base_patch16(num_classes=1000, global_pool=pool)
    model.blocks[3].attn.qkv.bias.requires_grad_(False)  # frozen parameters are left out
    no_wd = model.no_weight_decay()
    groups = mae_fast.param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=no_wd, layer_decay=0.65)
    where = {id(p): g for g in groups for p in g["params"]}
    num_layers = 13
    seen = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in where, name
            continue
        seen += 1
        g = where[id(p)]
        assert g["lr_scale"] == pytest.approx(0.65 ** (num_layers - official_layer_id(name, num_layers))), name
        assert g["weight_decay"] == (0.0 if p.ndim == 1 or name in no_wd else 0.05), name
    assert seen == sum(len(g["params"]) for g in groups)
    # one group per (layer, decay or not): embedding 0 (decay: patch conv; none: tokens, bias), 12
    # blocks, and the head layer (decay: head weight; none: norm and biases)
    assert len(groups) == 2 * 14
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.65 ** 13)


def official_lars_step(p, grad, mu, lr, wd, momentum, trust):
    dp = grad.clone()
    if p.ndim > 1:
        dp = dp + wd * p
        pn, un = p.norm(), dp.norm()
        q = trust * pn / un if (pn > 0 and un > 0) else torch.tensor(1.0, dtype=p.dtype)
        dp = dp * q
    mu = mu * momentum + dp
    return p - lr * mu, mu


def test_lars_steps_match_the_official_arithmetic():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    zero = torch.zeros(3, 4, dtype=torch.float64)  # the norm-0 branch: plain SGD with momentum
    params = [torch.nn.Parameter(t.clone()) for t in (weight, bias, zero)]
    opt = mae_fast.LARS(params, lr=0.3, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    expected = [(t.clone(), torch.zeros_like(t)) for t in (weight, bias, zero)]
    for _ in range(3):  # momentum carries over
        grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (weight, bias, zero)]
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
        expected = [official_lars_step(p, grad, mu, 0.3, 0.1, 0.9, 0.001) for (p, mu), grad in zip(expected, grads)]
        for p, (want, _) in zip(params, expected):
            torch.testing.assert_close(p.data, want, rtol=1e-12, atol=1e-14)


def test_lars_refuses_negative_settings():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        mae_fast.LARS([torch.nn.Parameter(torch.ones(2))], lr=-1.0)


def test_mixup_cutmix_targets_sum_to_one_and_repeat_under_a_seed():
    pytest.importorskip("timm")
    from argparse import Namespace

    from mae_fast.train import finetune

    model = mae_fast.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=7)
    args = Namespace(layer_decay=None, weight_decay=0.05, lr=1e-3, mixup=0.8, cutmix=1.0, smoothing=0.1, clip_grad=None)
    recipe = finetune.make_recipe(model, args, torch.device("cpu"))
    imgs, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 7, (8,))
    outs = []
    for batch in (0, 1, 0, 1, 2, 3):  # mixup or cutmix, and its lambda, drawn per step
        seed_step(5, 0, batch, 0)
        mixed, targets = recipe.batch(imgs.clone(), labels.clone())
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert targets.min() >= 0.1 / 7 * (1 - 1e-6)  # label smoothing spreads 0.1 over the classes
        outs.append((mixed, targets))
    for a, b in ((0, 2), (1, 3)):
        assert torch.equal(outs[a][0], outs[b][0]) and torch.equal(outs[a][1], outs[b][1])
    assert not torch.equal(outs[0][1], outs[1][1]) or not torch.equal(outs[0][0], outs[1][0])
    assert not np.allclose(outs[0][0].numpy(), imgs.numpy())  # the images are mixed
