"""forward_intermediates (timm's conventions, checked against timm on the same weights) and the
attention maps: probabilities that reproduce the blocks' SDPA output, off the default path."""
from functools import partial

import pytest
import torch
from torch import nn

import mae_fast

timm = pytest.importorskip("timm")

OFFICIAL = dict(img_size=(16, 24), patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=4,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6))
VP_VIT = dict(image_size=(16, 24), patch_size=4, num_classes=0, dim=32, depth=3, heads=4, mlp_dim=64, dim_head=8)


def official_and_timm():
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(**OFFICIAL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases, norms and tables
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=(16, 24), patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    result = vit.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    return model, vit.eval()


@pytest.mark.parametrize("kw", [
    dict(), dict(indices=2), dict(indices=[0, -1], norm=True), dict(indices=[2, 0], output_fmt="NLC"),
    dict(indices=1, return_prefix_tokens=True), dict(indices=[1], stop_early=True),
    dict(indices=[0, 2], intermediates_only=True, output_fmt="NLC", return_prefix_tokens=True),
])
def test_forward_intermediates_matches_timm(kw):
    model, vit = official_and_timm()
    imgs = torch.randn(2, 3, 16, 24)
    ours, theirs = model.forward_intermediates(imgs, **kw), vit.forward_intermediates(imgs, **kw)
    if not kw.get("intermediates_only"):
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
        ours, theirs = ours[1], theirs[1]
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b) if isinstance(a, tuple) else ((a, b),):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    if kw.get("output_fmt", "NCHW") == "NCHW" and not kw.get("return_prefix_tokens"):
        assert ours[0].shape == (2, 32, 4, 6)


def test_last_intermediate_is_forward_features():
    model, _ = official_and_timm()
    imgs = torch.randn(2, 3, 16, 24)
    final, (last,) = model.forward_intermediates(imgs, indices=1, norm=True, output_fmt="NLC")
    features = model.forward_features(imgs)
    torch.testing.assert_close(final, features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last, features[:, 1:], rtol=1e-5, atol=1e-6)
    # another resolution, through the interpolated table
    big = torch.randn(2, 3, 20, 28)
    final, (last,) = model.forward_intermediates(big, indices=1, interpolate_pos_encoding=True)
    assert last.shape == (2, 32, 5, 7)
    torch.testing.assert_close(final, model.forward_features(big, interpolate_pos_encoding=True))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pytorch_vit_intermediates(pool):
    torch.manual_seed(0)
    vit = mae_fast.ViT(**VP_VIT, pool=pool).eval()
    imgs = torch.randn(2, 3, 16, 24)
    final, inter = vit.forward_intermediates(imgs, output_fmt="NLC", return_prefix_tokens=True)
    torch.testing.assert_close(final, vit(imgs))  # num_classes=0: ViT returns the transformer's tokens
    x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.to_patch_embedding(imgs)], dim=1) + vit.pos_embedding
    for i, (attn, ff) in enumerate(vit.transformer.layers):  # vit-pytorch's loop, by hand
        x = attn(x) + x
        x = ff(x) + x
        if pool == "cls":
            torch.testing.assert_close(inter[i][0], x[:, 1:])
            torch.testing.assert_close(inter[i][1], x[:, :1])
        else:  # no prefix token: plain tensors, as timm's models without one
            torch.testing.assert_close(inter[i], x)
    (grid,) = vit.forward_intermediates(imgs, indices=[-1], intermediates_only=True)
    assert grid.shape == (2, 32, 4, 6)
    maps = vit.get_attention_maps(imgs, indices=[0])
    assert maps[0].shape == (2, 4, 24 + (pool == "cls"), 24 + (pool == "cls"))
    attn = vit.transformer.layers[0][0]
    h = attn.norm(vit._embed(imgs))
    v = attn.to_qkv(h).view(2, -1, 3, 4, 8)[:, :, 2].transpose(1, 2)
    torch.testing.assert_close(attn.to_out((maps[0] @ v).transpose(1, 2).reshape(2, -1, 32)), attn(vit._embed(imgs)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [0, 2])
def test_attention_maps_are_the_probabilities_sdpa_uses(block):
    model, _ = official_and_timm()
    imgs = torch.randn(2, 3, 16, 24)
    (probs,) = model.get_attention_maps(imgs, indices=[block])
    N = 1 + 24
    assert probs.shape == (2, 4, N, N) and probs.dtype == torch.float32 and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, N))
    # the block's input: the previous block's output (cls + patch tokens), or the embedded image
    if block:
        _, [(patches, cls)] = model.forward_intermediates(imgs, indices=[block - 1], output_fmt="NLC",
                                                         return_prefix_tokens=True)
        x = torch.cat([cls, patches], dim=1)
    else:
        x = model._feature_stack(imgs, False).tokens
    blk = model.blocks[block]
    h = blk.norm1(x)
    v = blk.attn.qkv(h).view(2, N, 3, 4, 8)[:, :, 2].transpose(1, 2)  # (B, heads, N, d)
    recomputed = blk.attn.proj((probs @ v).transpose(1, 2).reshape(2, N, 32))
    torch.testing.assert_close(recomputed, blk.attn(h), rtol=1e-5, atol=1e-6)  # blk.attn runs SDPA
    assert len(model.get_attention_maps(imgs)) == 3 and len(model.get_attention_maps(imgs, indices=2)) == 2


def test_default_paths_run_no_explicit_softmax(monkeypatch):
    """The training forward, its backward and the features run SDPA (or the fused kernels): no
    softmax is called from Python; only get_attention_maps calls one."""
    calls = []

    def counting(real):
        def f(*args, **kwargs):
            calls.append(real)
            return real(*args, **kwargs)
        return f

    for owner, name in ((torch, "softmax"), (torch.Tensor, "softmax"), (torch.nn.functional, "softmax")):
        monkeypatch.setattr(owner, name, counting(getattr(owner, name)))
    model, _ = official_and_timm()
    vp = mae_fast.MAE(encoder=mae_fast.ViT(**VP_VIT), decoder_dim=16, decoder_heads=2, decoder_dim_head=8)
    imgs = torch.randn(2, 3, 16, 24)
    model(imgs)[0].backward()
    vp(imgs).backward()
    model.forward_intermediates(imgs)
    model.forward_features(imgs)
    assert calls == []
    model.get_attention_maps(imgs, indices=1)
    assert len(calls) == 1


def test_bad_arguments_are_named():
    model, _ = official_and_timm()
    imgs = torch.randn(2, 3, 16, 24)
    with pytest.raises(ValueError, match=r"indices as an int takes the last n blocks: n must be in \[1, 3\], got 4"):
        model.forward_intermediates(imgs, indices=4)
    with pytest.raises(ValueError, match=r"indices \[3\] out of range for 3 blocks \(-3 to 2\)"):
        model.get_attention_maps(imgs, indices=[0, 3])
    with pytest.raises(TypeError, match=r"indices must be None, an int or a non-empty sequence of ints, got \[\]"):
        model.forward_intermediates(imgs, indices=[])
    with pytest.raises(ValueError, match=r"output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(imgs, output_fmt="NHWC")
    with pytest.raises(ValueError, match=r"imgs must be \(batch, 3, 16, 24\)"):
        model.forward_intermediates(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="interpolate_pos_encoding: this ViT takes its own image_size only"):
        mae_fast.ViT(**VP_VIT).forward_intermediates(imgs, interpolate_pos_encoding=True)
