"""Both model APIs against the eager reference, vit-pytorch, torch.compile, autocast, bad input."""
import os

import pytest
import torch

import mae_fast
from mae_fast.testing import reference as ref

INTERPRET_OR_CUDA = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

OFFICIAL = dict(img_size=(16, 24), patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
VP_VIT = dict(image_size=(16, 24), patch_size=4, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8)
VP_MAE = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2, decoder_dim_head=8)


def official_pair(**kw):
    cfg = {**OFFICIAL, **kw}
    fast = mae_fast.MaskedAutoencoderViT(**cfg)
    oracle = ref.MaskedAutoencoderViT(**cfg)
    oracle.load_state_dict(fast.state_dict())
    return fast, oracle


def assert_grads_close(fast, oracle, rtol=1e-4, atol=1e-6):
    theirs = dict(oracle.named_parameters())
    for name, p in fast.named_parameters():
        if theirs[name].grad is None:  # unused by the MAE (the vit-pytorch encoder's cls token, mlp head)
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("kw,ratio", [
    (dict(), 0.75), (dict(norm_pix_loss=True), 0.75), (dict(in_chans=1, norm_pix_loss=True), 0.3),
    (dict(img_size=(12, 8), patch_size=2, in_chans=4), 0.9),
])
def test_official_matches_reference(kw, ratio):
    fast, oracle = official_pair(**kw)
    H, W = fast.img_size
    imgs = torch.randn(2, fast.in_chans, H, W)
    noise = torch.rand(2, fast.num_patches)
    loss, pred, mask = fast(imgs, ratio, noise)
    rloss, rpred, rmask = oracle(imgs, ratio, noise)
    assert torch.equal(mask, rmask)
    torch.testing.assert_close(pred, rpred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-6)
    loss.backward()
    rloss.backward()
    assert_grads_close(fast, oracle)


def test_official_removed_rows_only_path_gives_the_same_loss_and_grads():
    fast, oracle = official_pair(norm_pix_loss=True)
    imgs, noise = torch.randn(3, 3, 16, 24), torch.rand(3, 24)
    loss, pred, mask = fast(imgs, 0.75, noise, return_pred=False)
    rloss, _, rmask = oracle(imgs, 0.75, noise)
    assert pred is None and torch.equal(mask, rmask)
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-6)
    loss.backward()
    rloss.backward()
    assert_grads_close(fast, oracle)


def test_official_state_dict_and_init_follow_the_official_model():
    torch.manual_seed(0)
    model = mae_fast.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=256, depth=1, num_heads=4,
                                          decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4)
    assert list(model.state_dict()) == list(ref.MaskedAutoencoderViT(
        img_size=32, patch_size=8, embed_dim=256, depth=1, num_heads=4, decoder_embed_dim=128, decoder_depth=1,
        decoder_num_heads=4).state_dict())
    assert torch.equal(model.pos_embed[0], ref.pos_embed_2d(256, 4, cls_token=True))
    assert torch.equal(model.decoder_pos_embed[0], ref.pos_embed_2d(128, 4, cls_token=True))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert abs(model.cls_token.std().item() - 0.02) < 0.005 and abs(model.mask_token.std().item() - 0.02) < 0.006
    w = model.blocks[0].mlp.fc1.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.equal(model.blocks[0].mlp.fc1.bias, torch.zeros_like(model.blocks[0].mlp.fc1.bias))
    conv = model.patch_embed.proj.weight
    conv_bound = (6 / (conv.shape[0] + conv[0].numel())) ** 0.5
    assert conv.abs().max() <= conv_bound and conv.abs().max() > 0.9 * conv_bound
    assert model.blocks[0].norm1.eps == 1e-5  # the class's default norm_layer is nn.LayerNorm, as upstream's
    assert mae_fast.mae_vit_base_patch16(depth=1, decoder_depth=1).norm.eps == 1e-6  # the factories pass 1e-6
    assert mae_fast.models.official.mae_vit_base_patch16_dec512d8b is mae_fast.mae_vit_base_patch16  # upstream's names


def test_official_forward_composes_a_subclasss_methods():
    """Forks subclass the official model to change the masking or the loss: forward then runs
    their methods, composed as upstream's forward, and the subclass's masking reaches the encoder."""
    calls = []

    class Fork(mae_fast.MaskedAutoencoderViT):
        def random_masking(self, x, mask_ratio, noise=None):
            calls.append("random_masking")
            return super().random_masking(x, mask_ratio, noise)

        def forward_loss(self, imgs, pred, mask):
            return torch.tensor(123.0)

    fork = Fork(**OFFICIAL)
    fork.load_state_dict(official_pair()[0].state_dict())
    imgs = torch.randn(2, 3, 16, 24)
    loss, pred, mask = fork(imgs, 0.5)
    assert loss.item() == 123.0 and calls == ["random_masking"] and pred.shape[:2] == mask.shape
    # the official composition (every patch embedded, then masked) equals the fast path
    fast, _ = official_pair()
    fast.load_state_dict(fork.state_dict())
    noise = torch.rand(2, 24)
    for a, b in zip(Fork.forward_encoder(fork, imgs, 0.5, noise), fast.forward_encoder(imgs, 0.5, noise)):
        torch.testing.assert_close(a, b)


def test_official_drop_in_details():
    fast, _ = official_pair()
    imgs = torch.randn(2, 3, 16, 24)
    # a block given its own forward (attention-map extraction) runs it
    seen = []
    blk = fast.blocks[0]
    blk.forward = lambda x: seen.append(x.shape) or type(blk).forward(blk, x)
    fast(imgs, 0.5)
    assert seen
    # mask_ratio 0: the encoder on every patch, as upstream's forward_encoder(imgs, 0.0)
    latent, mask, _ = fast.forward_encoder(imgs, 0.0)
    assert latent.shape[1] == 1 + fast.num_patches and not mask.any()
    # timm's PatchEmbed: its attributes, and images in
    pe = fast.patch_embed
    assert (pe.num_patches, pe.patch_size, pe.grid_size) == (24, (4, 4), (4, 6))
    torch.testing.assert_close(pe(imgs), pe(fast.patchify(imgs)))
    # any mask dtype, as the official arithmetic
    pred = torch.randn(2, 24, 48)
    torch.testing.assert_close(fast.forward_loss(imgs, pred, mask.long() + 1), fast.forward_loss(imgs, pred, mask + 1))
    # vit-pytorch's MAE exposes the encoder's patch rearrange as to_patch
    vp, _ = vp_pair()
    assert vp.to_patch(imgs).shape == (2, 24, 48) and not any(k.startswith("to_patch.") for k in vp.state_dict())


def test_official_methods_are_consistent_with_forward():
    fast, oracle = official_pair()
    imgs, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24)
    torch.testing.assert_close(fast.unpatchify(fast.patchify(imgs)), imgs, rtol=0, atol=0)
    latent, mask, ids_restore = fast.forward_encoder(imgs, 0.75, noise)
    rlatent, rmask, rids = oracle.forward_encoder(imgs, 0.75, noise)
    torch.testing.assert_close(latent, rlatent, rtol=1e-4, atol=1e-5)
    assert torch.equal(ids_restore, rids) and torch.equal(mask, rmask)
    pred = fast.forward_decoder(latent, ids_restore)
    torch.testing.assert_close(pred, oracle.forward_decoder(rlatent, rids), rtol=1e-4, atol=1e-5)
    loss, _, _ = fast(imgs, 0.75, noise)
    torch.testing.assert_close(fast.forward_loss(imgs, pred, mask), loss, rtol=1e-6, atol=0)
    x_masked, m, _ = fast.random_masking(torch.randn(2, 24, 5), 0.75, noise)
    assert x_masked.shape == (2, 6, 5) and torch.equal(m, mask)


def test_encoder_only_checkpoint_loads_into_the_fast_model(tmp_path):
    trained, _ = official_pair()
    encoder_only = {k: v for k, v in trained.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain_tiny.pth"
    torch.save({"model": encoder_only}, path)
    fresh = mae_fast.MaskedAutoencoderViT(**OFFICIAL)
    with pytest.warns(UserWarning, match="missing"):
        report = mae_fast.load_checkpoint(fresh, path)
    assert set(report.missing_keys) == set(trained.state_dict()) - set(encoder_only)
    imgs = torch.randn(2, 3, 16, 24)
    torch.testing.assert_close(fresh.forward_features(imgs), trained.forward_features(imgs), rtol=0, atol=0)


def test_official_factories():
    model = mae_fast.mae_vit_base_patch16(img_size=32, depth=1, decoder_depth=1)
    assert model.pos_embed.shape == (1, 5, 768) and model.decoder_pred.out_features == 768
    assert len(model.decoder_blocks) == 1 and model.decoder_blocks[0].attn.num_heads == 16
    assert mae_fast.mae_vit_huge_patch14(img_size=28, depth=1, decoder_depth=1).patch_size == 14


def vp_pair(encoder_cls=None, **vit_kw):
    encoder_cls = encoder_cls or mae_fast.ViT
    kw = {**VP_VIT, **vit_kw}
    fast = mae_fast.MAE(encoder=encoder_cls(**kw), **VP_MAE)
    oracle = ref.MAE(encoder=ref.ViT(**kw), **VP_MAE)
    oracle.load_state_dict(fast.state_dict())
    return fast, oracle


@pytest.mark.parametrize("pool", ["mean", "cls"])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_vit_pytorch_matches_reference(pool, norm_pix):
    fast, oracle = vp_pair(pool=pool)
    fast.norm_pix_loss = oracle.norm_pix_loss = norm_pix
    imgs = torch.randn(2, 3, 16, 24)
    torch.manual_seed(5)
    loss = fast(imgs)
    torch.manual_seed(5)
    rloss = oracle(imgs)
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-6)
    loss.backward()
    rloss.backward()
    assert_grads_close(fast, oracle)


@pytest.mark.parametrize("ours_encoder", [True, False])
def test_vit_pytorch_matches_vit_pytorch(ours_encoder):
    vit_pytorch = pytest.importorskip("vit_pytorch")
    from vit_pytorch.mae import MAE as VitPytorchMAE

    kw = {**VP_VIT, "pool": "mean"}
    theirs = VitPytorchMAE(encoder=vit_pytorch.ViT(**kw), **VP_MAE)
    encoder = mae_fast.ViT(**kw) if ours_encoder else vit_pytorch.ViT(**kw)
    ours = mae_fast.MAE(encoder=encoder, **VP_MAE)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    imgs = torch.randn(2, 3, 16, 24)
    torch.manual_seed(11)
    expect = theirs(imgs)
    torch.manual_seed(11)
    got = ours(imgs)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    expect.backward()
    got.backward()
    assert_grads_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # the encoder is trained in place, and the state dict goes back to vit-pytorch
    assert encoder.transformer.layers[0][0].to_qkv.weight.grad is not None
    theirs.load_state_dict(ours.state_dict())
    encoder_back = vit_pytorch.ViT(**kw)
    encoder_back.load_state_dict(encoder.state_dict())


def test_vit_pytorch_vit_classifies_with_both_pools():
    for pool in ("cls", "mean"):
        vit = mae_fast.ViT(**{**VP_VIT, "pool": pool})
        oracle = ref.ViT(**{**VP_VIT, "pool": pool})
        assert list(vit.state_dict()) == list(oracle.state_dict())
        assert vit(torch.randn(2, 3, 16, 24)).shape == (2, 10)


def test_vit_pytorch_vit_matches_vit_pytorch_classifier():
    vit_pytorch = pytest.importorskip("vit_pytorch")
    theirs = vit_pytorch.ViT(**VP_VIT)
    ours = mae_fast.ViT(**VP_VIT)
    ours.load_state_dict(theirs.state_dict())
    imgs = torch.randn(2, 3, 16, 24)
    torch.testing.assert_close(ours(imgs), theirs(imgs), rtol=1e-5, atol=1e-5)


def test_official_compiles_with_dynamic_shapes():
    """dynamic=True makes the batch and the mask ratio symbolic: the keep count is then a symbolic
    int, which must trace (fullgraph) and give the eager losses for a new batch and ratio."""
    fast, _ = official_pair(norm_pix_loss=True)
    compiled = torch.compile(fast, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, ratio in ((2, 0.75), (3, 0.5)):
        imgs, noise = torch.randn(batch, 3, 16, 24), torch.rand(batch, 24)
        torch.testing.assert_close(compiled(imgs, ratio, noise)[0], fast(imgs, ratio, noise)[0], rtol=1e-4, atol=1e-6)


def test_compiled_models_match_eager():
    fast, _ = official_pair(norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24)
    loss, pred, _ = fast(imgs, 0.75, noise)
    compiled = torch.compile(fast, fullgraph=True)
    closs, cpred, _ = compiled(imgs, 0.75, noise)
    torch.testing.assert_close(closs, loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cpred, pred, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(loss, [p for p in fast.parameters() if p.requires_grad])
    cgrads = torch.autograd.grad(closs, [p for p in fast.parameters() if p.requires_grad])
    for g, cg in zip(grads, cgrads):
        torch.testing.assert_close(cg, g, rtol=1e-4, atol=1e-6)
    # the CLI's call (prediction head on removed rows only) traces whole too
    rows_loss = torch.compile(fast, fullgraph=True, backend="aot_eager")(imgs, 0.75, noise, return_pred=False)[0]
    torch.testing.assert_close(rows_loss, loss, rtol=1e-4, atol=1e-6)

    vp, _ = vp_pair()
    noise = torch.rand(2, 24)
    loss = vp(imgs, noise)
    closs = torch.compile(vp, fullgraph=True, backend="aot_eager")(imgs, noise)  # inductor is covered above
    torch.testing.assert_close(closs, loss, rtol=1e-4, atol=1e-6)
    closs.backward()
    assert vp.mask_token.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_and_stays_finite(dtype):
    fast, _ = official_pair()
    vp, _ = vp_pair(pool="cls")
    imgs = torch.randn(2, 3, 16, 24)
    with torch.autocast("cpu", dtype=dtype):
        loss, pred, _ = fast(imgs)
        vp_loss = vp(imgs)
    assert pred.dtype == dtype and loss.dtype == torch.float32
    for value in (loss, vp_loss):
        assert torch.isfinite(value)
        value.backward()
    assert torch.isfinite(vp.mask_token.grad).all() and torch.isfinite(fast.mask_token.grad).all()


def _count_fused_add_norms(monkeypatch):
    import mae_fast.models.blocks as blocks

    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        return real(*args, **kwargs)

    real = blocks.add_layer_norm
    monkeypatch.setattr(blocks, "add_layer_norm", counting)
    return calls


def test_fused_add_norm_switch(monkeypatch):
    """Off by default; set_fused_add_norm takes a bool; MAE_FAST_FUSED_ADD_NORM sets it at import
    and a bad value names the variable."""
    import subprocess
    import sys

    assert mae_fast.fused_add_norm() is False
    monkeypatch.setattr(mae_fast.models.blocks, "_fused_add_norm", False)  # restored after the test
    mae_fast.set_fused_add_norm(True)
    assert mae_fast.fused_add_norm() is True
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        mae_fast.set_fused_add_norm(1)
    code = "import mae_fast; print(mae_fast.fused_add_norm())"
    for value, ok in (("1", "True"), ("0", "False"), ("yes", None)):
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MAE_FAST_FUSED_ADD_NORM=value),
                           capture_output=True, text=True)
        if ok:
            assert r.stdout.strip() == ok, r.stderr
        else:
            assert r.returncode != 0 and "MAE_FAST_FUSED_ADD_NORM must be '0' or '1', got 'yes'" in r.stderr


@pytest.mark.skipif(not INTERPRET_OR_CUDA, reason="the fused add + norm runs only as a Triton kernel")
def test_blocks_fuse_every_residual_add_into_the_next_norm(monkeypatch):
    """With set_fused_add_norm(True), every residual add but the decoder's last is fused with the
    norm after it; by default none is."""
    calls = _count_fused_add_norms(monkeypatch)
    fast, _ = official_pair()
    fast(torch.randn(2, 3, 16, 24))
    assert calls == []
    monkeypatch.setattr(mae_fast.models.blocks, "_fused_add_norm", True)
    fast(torch.randn(2, 3, 16, 24))
    enc, dec = OFFICIAL["depth"], OFFICIAL["decoder_depth"]
    assert len(calls) == 2 * enc + (2 * dec - 1)  # the decoder's last add precedes the row gather
    calls.clear()
    vp, _ = vp_pair()
    vp(torch.randn(2, 3, 16, 24))
    assert len(calls) == 2 * VP_VIT["depth"] + 2 * VP_MAE["decoder_depth"]
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(torch.randn(2, 3, 16, 24))
    # norms that feed a Linear emit the autocast dtype; the encoder's final norm (the latent) does not
    assert calls == [torch.bfloat16] * (2 * enc - 1) + [None] + [torch.bfloat16] * (2 * dec - 1)


def test_hooked_and_wrapped_blocks_still_run_as_modules(monkeypatch):
    """Fusing across blocks must not bypass what wraps or hooks them (FSDP's unshard, activation
    checkpointing, feature taps): such blocks are called as modules, with the same loss."""
    monkeypatch.setattr(mae_fast.models.blocks, "_fused_add_norm", True)
    fast, _ = official_pair()
    imgs, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24)
    plain = fast(imgs, 0.75, noise)[0]
    calls = []
    handles = [fast.blocks[0].register_forward_pre_hook(lambda m, args: calls.append("block")),
               fast.decoder_blocks[0].norm2.register_forward_hook(lambda m, args, out: calls.append("norm")),
               fast.norm.register_forward_hook(lambda m, args, out: calls.append("final norm"))]
    torch.testing.assert_close(fast(imgs, 0.75, noise)[0], plain)
    assert calls == ["block", "final norm", "norm"]
    for h in handles:
        h.remove()

    class Wrapper(torch.nn.Module):  # as activation checkpointing wraps a block
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append("wrapper")
            return self.inner(x)

    fast.blocks[1] = Wrapper(fast.blocks[1])
    calls.clear()
    torch.testing.assert_close(fast(imgs, 0.75, noise)[0], plain)
    assert calls == ["wrapper"]

    vp, _ = vp_pair()
    plain = vp(imgs, noise)
    calls.clear()
    vp.encoder.transformer.layers[1][0].register_forward_hook(lambda m, args, out: calls.append("attention"))
    torch.testing.assert_close(vp(imgs, noise), plain)
    assert calls == ["attention"]


@pytest.mark.skipif(not INTERPRET_OR_CUDA, reason="the fused add + norm runs only as a Triton kernel")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_add_norm_matches_unfused_under_autocast(monkeypatch, dtype, device):
    import mae_fast.models.blocks as blocks

    fast, _ = official_pair(norm_pix_loss=True)
    vp, _ = vp_pair()
    fast, vp = fast.to(device), vp.to(device)
    imgs, noise = torch.randn(2, 3, 16, 24, device=device), torch.rand(2, 24, device=device)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(blocks, "_fused_add_norm", fused)
        fast.zero_grad(set_to_none=True)
        vp.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            loss = fast(imgs, 0.75, noise)[0] + vp(imgs, noise)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in [*fast.parameters(), *vp.parameters()]
                                        if p.grad is not None]))
    (loss, grads), (uloss, ugrads) = results
    torch.testing.assert_close(loss, uloss, rtol=2e-3, atol=1e-4)
    for g, ug in zip(grads, ugrads):
        torch.testing.assert_close(g.float(), ug.float(), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("shape,match", [
    ((2, 3, 16, 16), r"imgs must be \(batch, 3, 16, 24\)"),
    ((2, 1, 16, 24), r"imgs must be \(batch, 3, 16, 24\)"),
    ((3, 16, 24), r"imgs must be"),
])
def test_official_rejects_wrong_images(shape, match):
    fast, _ = official_pair()
    with pytest.raises(ValueError, match=match):
        fast(torch.randn(*shape))


@pytest.mark.parametrize("ratio,match", [(0.0, r"mask_ratio must be in \(0, 1\)"), (1.0, "mask_ratio must be in"),
                                         (0.99, "at least one patch must stay visible"),
                                         (1e-17, "one be removed"), (-0.5, "mask_ratio must be in")])
def test_official_rejects_bad_mask_ratio(ratio, match):
    fast, _ = official_pair()
    with pytest.raises(ValueError, match=match):
        fast(torch.randn(1, 3, 16, 24), ratio)


def test_bad_noise_is_refused_by_both_models():
    fast, _ = official_pair()
    vp, _ = vp_pair()
    imgs = torch.randn(2, 3, 16, 24)
    with pytest.raises(ValueError, match=r"noise must be a \(batch, num_patches\) = \(2, 24\)"):
        fast(imgs, 0.75, torch.rand(2, 23))
    with pytest.raises(ValueError, match=r"noise must be a \(batch, num_patches\) = \(2, 24\)"):
        vp(imgs, torch.rand(24))
    with pytest.raises(TypeError, match="noise must be a floating-point"):
        vp(imgs, torch.randint(0, 5, (2, 24)))


def test_noise_on_another_device_is_named():
    fast, _ = official_pair()
    vp, _ = vp_pair()
    imgs, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24, device="meta")
    for call in (lambda: fast(imgs, 0.75, noise), lambda: vp(imgs, noise)):
        with pytest.raises(ValueError, match="noise must be on cpu like the images, got meta"):
            call()


def test_vit_pytorch_rejects_bad_input():
    vp, _ = vp_pair()
    with pytest.raises(ValueError, match=r"img must be \(batch, 3, H, W\) with 16x24"):
        vp(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"img must be \(batch, 3, H, W\)"):
        vp(torch.randn(2, 4, 16, 24))
    with pytest.raises(ValueError, match="masking_ratio must be in"):
        mae_fast.MAE(encoder=mae_fast.ViT(**VP_VIT), decoder_dim=16, masking_ratio=1.0)
    tiny = mae_fast.MAE(encoder=mae_fast.ViT(**VP_VIT), decoder_dim=16, masking_ratio=0.01)
    with pytest.raises(ValueError, match="at least one patch must be masked"):
        tiny(torch.randn(1, 3, 16, 24))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attention_runs_for_encoder_and_decoder_head_dims(dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # encoder head dim 64 (768 / 12), official decoder head dim 32 (512 / 16)
    model = mae_fast.MaskedAutoencoderViT(img_size=64, patch_size=16, embed_dim=768, depth=1, num_heads=12,
                                          decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16).cuda()
    imgs = torch.randn(4, 3, 64, 64, device="cuda")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel(backend), torch.autocast("cuda", dtype=dtype):
            loss, _, _ = model(imgs)
        loss.backward()
        assert torch.isfinite(loss)


@pytest.mark.gpu
def test_official_matches_reference_on_gpu():
    fast, oracle = official_pair(norm_pix_loss=True)
    fast, oracle = fast.cuda(), oracle.cuda()
    imgs, noise = torch.randn(4, 3, 16, 24, device="cuda"), torch.rand(4, 24, device="cuda")
    loss, pred, mask = fast(imgs, 0.75, noise)
    rloss, rpred, rmask = oracle(imgs, 0.75, noise)
    torch.testing.assert_close(pred, rpred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-5)
    loss.backward()
    rloss.backward()
    assert_grads_close(fast, oracle, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused-add-norm"])
@pytest.mark.parametrize("return_pred", [True, False])
def test_training_step_never_syncs_the_host(monkeypatch, return_pred, fused):
    """A bf16 training step (fused ops, fused AdamW, with and without the fused add + norm) queues
    its work without one device-to-host sync, so the host runs ahead and CUDA graphs can capture it."""
    monkeypatch.setattr(mae_fast.models.blocks, "_fused_add_norm", fused)
    model = mae_fast.MaskedAutoencoderViT(img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3,
                                          decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                                          norm_pix_loss=True).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    imgs = torch.randn(8, 3, 64, 64, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(imgs, return_pred=return_pred)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # first calls compile the Triton kernels and initialise the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_split_backward_is_one_write_pass(dtype):
    """The q/k/v split's backward writes each head gradient once into one (B, N, 3, H, d) buffer:
    no zero-filled full-size gradients, no sum of them, no permute copy (autograd's own backward
    of three selects does all three), and it gives bitwise the same gradient as that backward."""
    from _triton_ops import OpLog

    from mae_fast.models.blocks import split_heads

    B, N, H, d = 2, 7, 4, 8
    qkv = torch.randn(B, N, 3 * H * d, dtype=dtype, requires_grad=True)
    grads = [torch.randn(B, H, N, d, dtype=dtype) for _ in range(3)]
    outs = split_heads(qkv, H)
    with OpLog() as log:
        (g,) = torch.autograd.grad(outs, qkv, grads)
    names = [f.overloadpacket.__name__ for f in log.ops]
    written = [n for n in names if n not in ("view", "transpose", "select", "slice", "detach", "alias")]
    assert sorted(written) == ["copy_"] * 3 + ["new_empty"], names
    plain = qkv.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    assert all(torch.equal(a, b) for a, b in zip(outs, (plain[0], plain[1], plain[2])))
    assert torch.equal(g, torch.autograd.grad((plain[0], plain[1], plain[2]), qkv, grads)[0])
