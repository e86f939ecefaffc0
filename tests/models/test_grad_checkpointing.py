"""set_grad_checkpointing: fewer activations saved for backward, the same gradients, on both APIs."""
import pytest
import torch

import mae_fast

OFFICIAL = dict(img_size=(16, 24), patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=4,
                decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2, norm_pix_loss=True)
VP_VIT = dict(image_size=(16, 24), patch_size=4, num_classes=10, dim=32, depth=4, heads=4, mlp_dim=64, dim_head=8)
VP_MAE = dict(decoder_dim=16, decoder_depth=2, decoder_heads=2, decoder_dim_head=8)


def saved_bytes(fn, model):
    """(fn's result, bytes of activations autograd saves for backward during fn; the parameters it
    saves are not counted: they are kept anyway). Checkpointed blocks save through their own hooks,
    so what they keep, their input, is not seen here: the callers add it."""
    total, params = [], {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(total)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_both(model, step, set_on):
    """(saved bytes, grads) without and with checkpointing, from the same seed."""
    results = []
    for on in (False, True):
        set_on(on)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss, nbytes = saved_bytes(step, model)
        loss.backward()
        results.append((nbytes, grads(model)))
    return results


def test_official_checkpointing_saves_less_and_gives_the_same_grads():
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(**OFFICIAL)
    imgs, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24)
    (plain, g0), (ckpt, g1) = run_both(model, lambda: model(imgs, 0.75, noise)[0], model.set_grad_checkpointing)
    # each checkpointed block keeps its input: (B, 1 + 6, 32) in the encoder, (B, 1 + 24, 16) in the decoder
    kept = 4 * (4 * 2 * 7 * 32 + 2 * 2 * 25 * 16)
    assert ckpt + kept < plain / 3, (plain, ckpt, kept)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)


def test_vit_pytorch_checkpointing_replays_dropout_and_gives_the_same_grads():
    """With dropout, the recomputed forward draws the same masks (the RNG state is replayed)."""
    torch.manual_seed(0)
    encoder = mae_fast.ViT(**VP_VIT, dropout=0.2)
    mae = mae_fast.MAE(encoder=encoder, **VP_MAE).train()
    imgs, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24)
    (plain, g0), (ckpt, g1) = run_both(mae, lambda: mae(imgs, noise), mae.set_grad_checkpointing)
    kept = 4 * (4 * 2 * 6 * 32 + 2 * 2 * 24 * 16)  # no cls token in this API
    assert ckpt + kept < plain / 3, (plain, ckpt, kept)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)
    assert encoder.transformer.grad_checkpointing and mae.decoder.grad_checkpointing
    # the ViT on its own
    encoder.eval()
    (plain, g0), (ckpt, g1) = run_both(encoder, lambda: encoder(imgs).sum(), encoder.set_grad_checkpointing)
    assert ckpt < plain / 2
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointed_features_and_no_grad_forward():
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(**OFFICIAL)
    imgs, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24)
    plain = model.forward_intermediates(imgs, indices=2)
    with torch.no_grad():
        loss = model(imgs, 0.75, noise)[0]
    model.set_grad_checkpointing()
    ckpt = model.forward_intermediates(imgs, indices=2)
    torch.testing.assert_close(ckpt[0], plain[0])
    for a, b in zip(ckpt[1], plain[1]):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no autograd: the blocks run plainly
        torch.testing.assert_close(model(imgs, 0.75, noise)[0], loss)


def test_checkpointed_model_compiles_fullgraph():
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(**OFFICIAL)
    imgs, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24)
    loss = model(imgs, 0.75, noise)[0]
    g0 = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    model.set_grad_checkpointing(True)
    closs = torch.compile(model, fullgraph=True, backend="aot_eager")(imgs, 0.75, noise)[0]
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(closs, [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_set_grad_checkpointing_takes_a_bool():
    model = mae_fast.MaskedAutoencoderViT(**OFFICIAL)
    for obj in (model, mae_fast.ViT(**VP_VIT), mae_fast.MAE(encoder=mae_fast.ViT(**VP_VIT), **VP_MAE)):
        with pytest.raises(TypeError, match="enable must be a bool, got int"):
            obj.set_grad_checkpointing(1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_drops_on_gpu():
    """ViT-B/16 encoder at 448 px, MAE decoder: the step's peak memory with checkpointing is lower."""
    model = mae_fast.mae_vit_base_patch16(img_size=448).cuda()
    imgs = torch.randn(8, 3, 448, 448, device="cuda")
    peaks = []
    for on in (False, True):
        model.set_grad_checkpointing(on)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(imgs, 0.75, return_pred=False)[0]
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] < 0.8 * peaks[0], peaks
