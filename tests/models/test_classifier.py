"""mae_fast.VisionTransformer against timm's VisionTransformer, drop path, and loading a pretraining
checkpoint (position-table interpolation, the missing head keys)."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mae_fast
from mae_fast.models.classifier import DropPathBlock, drop_path

CFG = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4)
MAE_CFG = dict(CFG, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def timm_vit(pool, **kw):
    timm_vt = pytest.importorskip("timm.models.vision_transformer")
    return timm_vt.VisionTransformer(**{**CFG, **kw}, num_classes=5, global_pool=pool,
                                     norm_layer=partial(nn.LayerNorm, eps=1e-6))


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_same_keys_logits_and_grads_as_timm(pool):
    ours = mae_fast.VisionTransformer(**CFG, num_classes=5, global_pool=pool).double()
    with torch.no_grad():  # weights that are not their init: every parameter matters
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs = timm_vit(pool).double()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    out, ref = ours(x), theirs(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn(out.shape, dtype=torch.float64)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-9, atol=1e-12, msg=name)


def test_fp32_logits_match_timm_and_the_official_bool_pool():
    ours = mae_fast.VisionTransformer(**CFG, num_classes=5, global_pool=True)  # the official passes a bool
    theirs = timm_vit("avg")
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_drop_path_keeps_the_expectation_and_drops_whole_samples():
    x = torch.randn(1, 5, 3).expand(40_000, -1, -1)
    out = drop_path(x, 0.3)
    kept = out.flatten(1).ne(0).all(1)
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert torch.equal(out.flatten(1).eq(0).all(1), ~kept)  # a sample is dropped whole or kept whole
    torch.testing.assert_close(out[kept], x[kept] / 0.7)
    torch.testing.assert_close(out.mean(0), x[0], rtol=0.03, atol=0.02)
    assert drop_path(x, 0.3, training=False) is x


def test_drop_path_rates_are_linear_and_only_in_training():
    m = mae_fast.VisionTransformer(**dict(CFG, depth=4), num_classes=3, drop_path_rate=0.3)
    assert [b.drop_path for b in m.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(type(b) is DropPathBlock for b in m.blocks)
    x = torch.randn(8, 3, 16, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))


def pretraining_state(img_size=16, **kw):
    return mae_fast.MaskedAutoencoderViT(**dict(MAE_CFG, img_size=img_size, **kw)).state_dict()


def official_interpolate_pos_embed(table, num_extra, new_side):
    """The official util/pos_embed.py interpolate_pos_embed, from its description: the extra (cls)
    rows kept, the patch rows resized as a square grid, bicubic, align_corners False."""
    side = int((table.shape[1] - num_extra) ** 0.5)
    extra, body = table[:, :num_extra], table[:, num_extra:]
    body = body.reshape(-1, side, side, table.shape[-1]).permute(0, 3, 1, 2)
    body = F.interpolate(body, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat([extra, body.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("pool,missing", [
    ("avg", {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}),
    ("token", {"head.weight", "head.bias"}),
])
def test_loading_a_pretraining_checkpoint_interpolates_and_reports_the_head(pool, missing):
    sd = pretraining_state()
    sd["pos_embed"] = sd["pos_embed"] + torch.randn_like(sd["pos_embed"])  # a learned-looking table
    m = mae_fast.VisionTransformer(**dict(CFG, img_size=24), num_classes=7, global_pool=pool)
    report = m.load_pretrained({"model": sd})
    assert set(report.missing) == missing
    assert report.interpolated == {"pos_embed": ((1, 17, 32), (1, 37, 32))}
    torch.testing.assert_close(m.pos_embed.data, official_interpolate_pos_embed(sd["pos_embed"], 1, 6))
    torch.testing.assert_close(m.blocks[1].mlp.fc2.weight.data, sd["blocks.1.mlp.fc2.weight"])
    if pool == "token":
        torch.testing.assert_close(m.norm.weight.data, sd["norm.weight"])
    w = m.head.weight
    assert 0 < w.std().item() < 4e-5 and w.abs().max().item() <= 4e-5 and not m.head.bias.any()


def test_loading_the_timm_export_and_a_classifier_of_other_classes():
    mae = mae_fast.MaskedAutoencoderViT(**MAE_CFG)
    from mae_fast.io.timm import encoder_state_dict

    m = mae_fast.VisionTransformer(**CFG, num_classes=4, global_pool="token")
    assert set(m.load_pretrained(encoder_state_dict(mae, "timm")).missing) == {"head.weight", "head.bias"}
    other = mae_fast.VisionTransformer(**CFG, num_classes=9, global_pool="token").state_dict()
    assert set(m.load_pretrained(other).missing) == {"head.weight", "head.bias"}  # another task's head dropped
    same = mae_fast.VisionTransformer(**CFG, num_classes=4, global_pool="token")
    assert m.load_pretrained(same.state_dict()).missing == []
    torch.testing.assert_close(m.head.weight.data, same.head.weight.data)  # a fitting head is kept


@pytest.mark.parametrize("change", [dict(depth=3), dict(embed_dim=48, num_heads=4), dict(patch_size=8)])
def test_a_checkpoint_of_another_architecture_is_refused_before_any_weight_changes(change):
    m = mae_fast.VisionTransformer(**CFG, num_classes=3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit|shape mismatch"):
        m.load_pretrained(pretraining_state(**change))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_factories_carry_the_official_shapes():
    with torch.device("meta"):
        for make, (p, d, depth, heads) in ((mae_fast.vit_base_patch16, (16, 768, 12, 12)),
                                           (mae_fast.vit_large_patch16, (16, 1024, 24, 16)),
                                           (mae_fast.vit_huge_patch14, (14, 1280, 32, 16))):
            m = make(num_classes=1000, drop_path_rate=0.1)
            assert (m.patch_size, m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (p, d, depth, heads)
            assert m.blocks[0].norm1.eps == 1e-6 and m.global_pool == "avg" and m.img_size == (224, 224)


@pytest.mark.parametrize("kw,match", [
    (dict(global_pool="max"), "global_pool must be"), (dict(img_size=18), "divisible by patch_size"),
    (dict(drop_path_rate=1.0), "drop_path_rate"), (dict(qkv_bias=False), "qkv_bias"),
    (dict(num_classes=-1), "num_classes"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        mae_fast.VisionTransformer(**{**CFG, **kw})
    with pytest.raises(ValueError, match=r"imgs must be \(batch, 3, 16, 16\)"):
        mae_fast.VisionTransformer(**CFG)(torch.randn(1, 3, 8, 8))
