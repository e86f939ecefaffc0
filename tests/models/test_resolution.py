"""interpolate_pos_encoding: the official-API model on images of another size, against Hugging Face
ViTMAE's own interpolation and against a model rebuilt at that size from a resized checkpoint."""
import pytest
import torch

import mae_fast
from mae_fast.io.checkpoint import interpolate_pos_table
from mae_fast.testing import reference as ref

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

CFG = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16,
           decoder_depth=1, decoder_num_heads=2)


def random_model(**kw):
    """Random weights and random position tables, so that a wrong table row shows."""
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(**{**CFG, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def hf_model(norm_pix, mask_ratio, attn):
    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          image_size=16, patch_size=4, num_channels=3, decoder_hidden_size=16,
                          decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
                          layer_norm_eps=1e-6, norm_pix_loss=norm_pix, mask_ratio=mask_ratio)
    config._attn_implementation = attn
    torch.manual_seed(1)
    hf = ViTMAEForPreTraining(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return hf.eval()


@pytest.mark.parametrize("size,norm_pix,ratio,attn", [
    ((24, 24), True, 0.75, "eager"), ((20, 32), False, 0.6, "sdpa"), ((12, 8), True, 0.5, "eager"),
])
def test_hf_mode_matches_transformers_at_another_resolution(size, norm_pix, ratio, attn):
    hf = hf_model(norm_pix, ratio, attn)
    model = mae_fast.MaskedAutoencoderViT.from_hf(hf).eval()
    L = (size[0] // 4) * (size[1] // 4)
    imgs, noise = torch.randn(2, 3, *size), torch.rand(2, L)
    out = hf(pixel_values=imgs, noise=noise, interpolate_pos_encoding=True)
    loss, pred, mask = model(imgs, ratio, noise, interpolate_pos_encoding="hf")
    assert torch.equal(mask, out.mask) and pred.shape == (2, L, 48)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    loss.backward()
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad,
                               torch.cat([hf.vit.layers[0].attention.q_proj.weight.grad,
                                          hf.vit.layers[0].attention.k_proj.weight.grad,
                                          hf.vit.layers[0].attention.v_proj.weight.grad]), rtol=1e-4, atol=1e-6)
    # True resizes the decoder's table on the 2-D grid, not along the flattened sequence as transformers
    assert not torch.allclose(model(imgs, ratio, noise, interpolate_pos_encoding=True)[1], out.logits, atol=1e-3)
    # the encoder is the same in both modes: transformers' 2-D bicubic resize of the table
    latent = model.forward_encoder(imgs, ratio, noise, interpolate_pos_encoding=True)[0]
    torch.testing.assert_close(latent, hf.vit(pixel_values=imgs, noise=noise, interpolate_pos_encoding=True)
                               .last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(24, 24), (20, 32), (8, 12)])
def test_call_time_interpolation_equals_a_model_rebuilt_at_that_size(size):
    """Both tables resized on the image's 2-D grid: the same loss, pred and gradients as the eager
    oracle built for that size from a checkpoint whose tables load_checkpoint's resize made."""
    model = random_model(norm_pix_loss=True)
    grid = (size[0] // 4, size[1] // 4)
    oracle = ref.MaskedAutoencoderViT(**{**CFG, "img_size": size}, norm_pix_loss=True)
    sd = model.state_dict()
    for key in ("pos_embed", "decoder_pos_embed"):
        sd[key] = interpolate_pos_table(sd[key], grid, old_grid=(4, 4))
    oracle.load_state_dict(sd)
    imgs, noise = torch.randn(2, 3, *size), torch.rand(2, grid[0] * grid[1])
    loss, pred, mask = model(imgs, 0.75, noise, interpolate_pos_encoding=True)
    rloss, rpred, rmask = oracle(imgs, 0.75, noise)
    assert torch.equal(mask, rmask)
    torch.testing.assert_close(pred, rpred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-6)
    loss.backward()
    rloss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, dict(oracle.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)
    # forward_features / forward_encoder / forward_decoder take the same flag
    ordered = torch.arange(grid[0] * grid[1], dtype=torch.float32).expand(2, -1)
    features = model.forward_features(imgs, interpolate_pos_encoding=True)
    torch.testing.assert_close(features, oracle.forward_encoder(imgs, 0.0, ordered)[0], rtol=1e-5, atol=1e-5)
    latent, _, ids_restore = model.forward_encoder(imgs, 0.75, noise, interpolate_pos_encoding=True)
    torch.testing.assert_close(model.forward_decoder(latent, ids_restore, interpolate_pos_encoding=True,
                                                     img_size=size), rpred, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.unpatchify(model.patchify(imgs), img_size=size), imgs)


def test_native_size_with_the_flag_is_the_plain_forward():
    model = random_model()
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    loss, pred, _ = model(imgs, 0.75, noise)
    for mode in (True, "hf"):
        l2, p2, _ = model(imgs, 0.75, noise, interpolate_pos_encoding=mode)
        assert torch.equal(l2, loss) and torch.equal(p2, pred)


def test_subclass_composition_passes_the_size_on():
    class Sub(mae_fast.MaskedAutoencoderViT):
        def forward_loss(self, imgs, pred, mask):  # an override: forward composes the official methods
            return super().forward_loss(imgs, pred, mask)

    model = random_model()
    sub = Sub(**CFG)
    sub.load_state_dict(model.state_dict())
    imgs, noise = torch.randn(2, 3, 12, 24), torch.rand(2, 18)
    loss, pred, _ = model(imgs, 0.75, noise, interpolate_pos_encoding=True)
    sloss, spred, _ = sub(imgs, 0.75, noise, interpolate_pos_encoding=True)
    torch.testing.assert_close(spred, pred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sloss, loss, rtol=1e-5, atol=1e-6)


def test_interpolated_forward_compiles_fullgraph():
    model = random_model(norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 24, 20), torch.rand(2, 30)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for mode in (True, "hf"):
        torch.testing.assert_close(compiled(imgs, 0.75, noise, interpolate_pos_encoding=mode)[0],
                                   model(imgs, 0.75, noise, interpolate_pos_encoding=mode)[0], rtol=1e-5, atol=1e-6)


def test_bad_sizes_and_flags_are_refused_clearly():
    model = random_model()
    with pytest.raises(ValueError, match=r"imgs must be \(batch, 3, 16, 16\) for this model"):
        model(torch.randn(2, 3, 24, 24))  # another size without the flag
    with pytest.raises(ValueError, match=r"imgs must be \(batch, 3, H, W\) with H and W positive multiples of "
                                         r"patch_size=4; got \(2, 3, 24, 22\)"):
        model(torch.randn(2, 3, 24, 22), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"interpolate_pos_encoding must be False, True or 'hf', got 'bicubic'"):
        model(torch.randn(2, 3, 16, 16), interpolate_pos_encoding="bicubic")
    with pytest.raises(ValueError, match=r"noise must be a \(batch, num_patches\) = \(2, 36\) tensor, got \(2, 16\)"):
        model(torch.randn(2, 3, 24, 24), 0.75, torch.rand(2, 16), interpolate_pos_encoding=True)
    latent, _, ids_restore = model.forward_encoder(torch.randn(2, 3, 12, 24), 0.75, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"pass img_size=\(H, W\) of the images"):
        model.forward_decoder(latent, ids_restore, interpolate_pos_encoding=True)
