"""Pins the eager oracle down on hand-checkable cases and invariants."""
import math

import pytest
import torch

from mae_fast.testing import reference as ref


@pytest.mark.parametrize("B,C,H,W,p", [(1, 3, 8, 8, 4), (2, 1, 6, 10, 2), (3, 13, 12, 8, (4, 2)), (2, 4, 32, 16, 16)])
def test_unpatchify_inverts_patchify(B, C, H, W, p):
    x = torch.randn(B, C, H, W)
    patches = ref.patchify(x, p)
    ph, pw = ref.pair_arg(p, "p")
    assert patches.shape == (B, (H // ph) * (W // pw), ph * pw * C)
    assert torch.equal(ref.unpatchify(patches, p, (H, W)), x)


def test_patchify_order_is_row_major_tokens_and_pqc_features():
    B, C, H, W, p = 2, 3, 4, 6, 2
    x = torch.randn(B, C, H, W)
    patches = ref.patchify(x, p)
    w = W // p
    for b, i, j, pi, qj, c in [(0, 0, 1, 1, 0, 2), (1, 1, 2, 0, 1, 1), (1, 0, 0, 1, 1, 0)]:
        assert patches[b, i * w + j, (pi * p + qj) * C + c] == x[b, c, i * p + pi, j * p + qj]


def test_pos_embed_values_at_known_positions():
    D, gh, gw = 8, 2, 3
    table = ref.pos_embed_2d(D, (gh, gw), cls_token=True)
    assert table.dtype == torch.float32 and table.shape == (1 + gh * gw, D)
    assert torch.equal(table[0], torch.zeros(D))
    i, j = 1, 2  # token i*w + j; omega_k = 1 / 10000^(k / (D/4)) for k in 0..D/4-1 -> 1, 1/100
    expect = [math.sin(j), math.sin(j / 100), math.cos(j), math.cos(j / 100),
              math.sin(i), math.sin(i / 100), math.cos(i), math.cos(i / 100)]
    torch.testing.assert_close(table[1 + i * gw + j], torch.tensor(expect), rtol=0, atol=1e-7)
    assert torch.equal(ref.pos_embed_2d(D, 4), ref.pos_embed_2d(D, (4, 4)))
    with pytest.raises(ValueError, match="multiple of 4"):
        ref.pos_embed_2d(6, 2)


@pytest.mark.parametrize("ratio,kept", [(0.75, 49), (0.9, 19), (0.5, 98)])
def test_official_masking_counts_and_consistency(ratio, kept):
    B, L = 3, 196
    ids_keep, mask, ids_restore = ref.random_masking(B, L, ratio)
    assert ids_keep.shape == (B, kept)
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - kept)))
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(B, kept))
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(L).expand(B, L))


@pytest.mark.parametrize("ratio,masked", [(0.75, 147), (0.9, 176)])
def test_vit_pytorch_masking_counts_and_noise(ratio, masked):
    B, L = 2, 196
    noise = torch.rand(B, L)
    m, u = ref.vit_pytorch_masking(B, L, ratio, noise)
    assert m.shape == (B, masked) and u.shape == (B, L - masked)
    assert torch.equal(torch.cat([m, u], 1).sort(1).values, torch.arange(L).expand(B, L))
    # vit-pytorch masks the lowest-noise patches; the official model keeps them
    keep, _, _ = ref.random_masking(B, L, 1 - ratio, noise)
    assert torch.equal(keep, m[:, : keep.shape[1]])
    torch.manual_seed(3)
    m2, _ = ref.vit_pytorch_masking(B, L, ratio)
    torch.manual_seed(3)
    assert torch.equal(m2, torch.rand(B, L).argsort(-1)[:, :masked])


def test_norm_pix_unbiased_variance_and_eps():
    t = torch.randn(4, 5, 12, dtype=torch.float64) * 3 + 1
    n = ref.norm_pix(t)
    torch.testing.assert_close(n.mean(-1), torch.zeros(4, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    var = t.var(-1, unbiased=True)
    torch.testing.assert_close(n.var(-1), var / (var + 1e-6))
    const = torch.full((1, 1, 4), 2.0)  # zero variance: finite thanks to eps
    assert torch.equal(ref.norm_pix(const), torch.zeros(1, 1, 4))


def test_loss_conventions_agree_when_every_row_removes_the_same_count():
    B, C, H, W, p = 2, 3, 8, 12, 4
    imgs = torch.randn(B, C, H, W, dtype=torch.float64)
    L, P = 6, p * p * C
    ids_keep, mask, _ = ref.random_masking(B, L, 0.5)
    removed = torch.nonzero(mask)[:, 1].reshape(B, -1)
    pred_full = torch.randn(B, L, P, dtype=torch.float64)
    for norm in (False, True):
        official = ref.masked_mse_loss(pred_full, imgs, p, mask=mask, norm_pix_target=norm)
        vp = ref.masked_mse_loss(ref.gather_tokens(pred_full, removed), imgs, p, ids=removed, norm_pix_target=norm)
        torch.testing.assert_close(official, vp)
    target = ref.patchify(imgs, p)
    hand = sum(((pred_full[b, l] - target[b, l]) ** 2).mean() for b in range(B) for l in range(L) if mask[b, l])
    torch.testing.assert_close(ref.masked_mse_loss(pred_full, imgs, p, mask=mask), hand / mask.sum())
    with pytest.raises(ValueError, match="exactly one"):
        ref.masked_mse_loss(pred_full, imgs, p)


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_unshuffle_matches_official_cat_gather(num_prefix):
    B, L, D = 3, 10, 5
    ids_keep, mask, ids_restore = ref.random_masking(B, L, 0.6)
    K = ids_keep.shape[1]
    visible = torch.randn(B, num_prefix + K, D)
    mask_token = torch.randn(1, 1, D)
    pos = torch.randn(1, num_prefix + L, D)
    # the official decoder: cat the mask tokens after the visible rows, unshuffle with ids_restore
    x_ = torch.cat([visible[:, num_prefix:], mask_token.repeat(B, L - K, 1)], dim=1)
    expect = torch.cat([visible[:, :num_prefix], ref.gather_tokens(x_, ids_restore)], dim=1) + pos
    out = ref.unshuffle_tokens(visible, ids_keep, L, mask_token, pos, num_prefix)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def tiny_official(**kw):
    cfg = dict(img_size=(16, 24), patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4,
               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    cfg.update(kw)
    return ref.MaskedAutoencoderViT(**cfg)


def test_official_reference_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = tiny_official(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 16, 24)
    noise = torch.rand(2, 24)
    loss, pred, mask = model(imgs, 0.75, noise)
    assert pred.shape == (2, 24, 48) and mask.shape == (2, 24)
    assert torch.equal(mask.sum(1), torch.full((2,), 18.0))
    expect = ref.masked_mse_loss(pred, imgs, 4, mask=mask, norm_pix_target=True)
    assert torch.equal(loss, expect) and torch.isfinite(loss)
    loss.backward()
    assert model.pos_embed.grad is None and model.cls_token.grad is not None


def test_vit_pytorch_reference_matches_vit_pytorch():
    vit_pytorch = pytest.importorskip("vit_pytorch")
    from vit_pytorch.mae import MAE as VitPytorchMAE

    kw = dict(image_size=(16, 24), patch_size=4, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64,
              pool="mean", dim_head=8)
    theirs = VitPytorchMAE(encoder=vit_pytorch.ViT(**kw), decoder_dim=16, decoder_depth=1, decoder_heads=2, decoder_dim_head=8)
    ours = ref.MAE(encoder=ref.ViT(**kw), decoder_dim=16, decoder_depth=1, decoder_heads=2, decoder_dim_head=8)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    imgs = torch.randn(2, 3, 16, 24)
    torch.manual_seed(7)
    expect = theirs(imgs)
    torch.manual_seed(7)
    got = ours(imgs)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    expect.backward()
    got.backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_vit_pytorch_reference_cls_pool_uses_patch_rows_of_pos_embedding():
    kw = dict(image_size=8, patch_size=4, num_classes=0, dim=16, depth=1, heads=2, mlp_dim=32, dim_head=8)
    model = ref.MAE(encoder=ref.ViT(pool="cls", **kw), decoder_dim=16, decoder_dim_head=8)
    assert model.decoder_pos_emb.weight.shape == (5, 16)
    loss = model(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(loss)
