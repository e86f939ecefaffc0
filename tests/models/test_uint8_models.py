"""Both model APIs on uint8 images: the same losses, predictions and gradients as the reference given
the normalised float images, the pixel statistics outside the state dict, and no float copy of the
image batch on the device (the fused ops normalise the pixels as they read them)."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mae_fast
from mae_fast.testing import reference as ref

from test_models import OFFICIAL, VP_MAE, VP_VIT, assert_grads_close, official_pair, vp_pair

KERNELS_RUN = os.environ.get("TRITON_INTERPRET") == "1"
STATS = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def pixels(B, C, H, W, device="cpu"):
    return torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device=device)


@pytest.mark.parametrize("return_pred", [True, False])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_official_uint8_matches_reference_on_normalised_images(norm_pix, return_pred):
    fast, oracle = official_pair(norm_pix_loss=norm_pix)
    fast.set_pixel_stats(*STATS)
    u, noise = pixels(2, 3, 16, 24), torch.rand(2, 24)
    loss, pred, mask = fast(u, 0.75, noise, return_pred=return_pred)
    rloss, rpred, rmask = oracle(ref.normalize_pixels(u, *STATS, dtype=torch.float32), 0.75, noise)
    assert torch.equal(mask, rmask)
    if return_pred:
        torch.testing.assert_close(pred, rpred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-6)
    loss.backward()
    rloss.backward()
    assert_grads_close(fast, oracle)


def test_official_set_pixel_stats_and_other_channel_counts():
    fast, oracle = official_pair(in_chans=1)
    u, noise = pixels(2, 1, 16, 24), torch.rand(2, 24)
    with pytest.raises(ValueError, match="set_pixel_stats"):
        fast(u, 0.75, noise)
    fast.set_pixel_stats([0.45], torch.tensor([0.2], dtype=torch.float64))
    assert (fast.pixel_mean, fast.pixel_std) == ((0.45,), (0.2,))
    loss, _, _ = fast(u, 0.5, noise)
    torch.testing.assert_close(loss, oracle(ref.normalize_pixels(u, (0.45,), (0.2,), torch.float32), 0.5, noise)[0],
                               rtol=1e-4, atol=1e-6)


def test_pixel_stats_stay_out_of_the_state_dict():
    plain = mae_fast.MaskedAutoencoderViT(**OFFICIAL)
    custom = mae_fast.MaskedAutoencoderViT(**OFFICIAL, pixel_mean=STATS[0], pixel_std=STATS[1])
    assert plain.pixel_mean == ref.normalize_pixels.__defaults__[0]  # ImageNet's by default
    assert list(custom.state_dict()) == list(plain.state_dict())
    custom.set_pixel_stats((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    assert list(custom.state_dict()) == list(plain.state_dict())
    custom.load_state_dict(plain.state_dict(), strict=True)
    assert custom.pixel_mean == (0.1, 0.2, 0.3)  # a load keeps the model's statistics
    vp = mae_fast.MAE(encoder=mae_fast.ViT(**VP_VIT), **VP_MAE, pixel_mean=STATS[0], pixel_std=STATS[1])
    assert list(vp.state_dict()) == list(vp_pair()[0].state_dict())


def test_official_feature_paths_and_subclass_paths_take_uint8():
    fast, oracle = official_pair()
    u, noise = pixels(2, 3, 16, 24), torch.rand(2, 24)
    x = ref.normalize_pixels(u, dtype=torch.float32)
    torch.testing.assert_close(fast.forward_features(u), fast.forward_features(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.forward_intermediates(u, indices=1)[1][0],
                               fast.forward_intermediates(x, indices=1)[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast(u, 0.75, noise, interpolate_pos_encoding=True)[0],
                               fast(x, 0.75, noise, interpolate_pos_encoding=True)[0], rtol=1e-5, atol=1e-6)
    latent, mask, ids_restore = fast.forward_encoder(u, 0.75, noise)
    pred = fast.forward_decoder(latent, ids_restore)
    torch.testing.assert_close(fast.forward_loss(u, pred, mask), oracle(x, 0.75, noise)[0], rtol=1e-4, atol=1e-6)

    class Fork(mae_fast.MaskedAutoencoderViT):  # a subclass's own patchify: the whole image normalised first
        def patchify(self, imgs):
            return ref.patchify(imgs, self.patch_size)

    fork = Fork(**OFFICIAL)
    fork.load_state_dict(fast.state_dict())
    torch.testing.assert_close(fork(u, 0.75, noise)[0], oracle(x, 0.75, noise)[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_vit_pytorch_uint8_matches_reference_on_normalised_images(norm_pix):
    fast, oracle = vp_pair()
    fast.norm_pix_loss = oracle.norm_pix_loss = norm_pix
    fast.set_pixel_stats(*STATS)
    u = pixels(2, 3, 16, 24)
    torch.manual_seed(5)
    loss = fast(u)
    torch.manual_seed(5)
    rloss = oracle(ref.normalize_pixels(u, *STATS, dtype=torch.float32))
    torch.testing.assert_close(loss, rloss, rtol=1e-4, atol=1e-6)
    loss.backward()
    rloss.backward()
    assert_grads_close(fast, oracle)


# ----------------------------------------------------------------------------- no float copy of the batch

class FloatImageWatch(TorchDispatchMode):
    """Records every float tensor of at least `numel` elements that an op returns (a new buffer or a
    view of one: either means a float image of the batch's size exists)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.numel:
                self.seen.append((str(func), tuple(t.shape), t.dtype))
        return out


# patch 8 and narrow layers: every activation is smaller than the image, so only an image copy is as big
SMALL_ACTS = dict(img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=16, depth=1, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)


def _models(device):
    official = mae_fast.MaskedAutoencoderViT(**SMALL_ACTS, norm_pix_loss=True).to(device)
    vit = mae_fast.ViT(image_size=(16, 24), patch_size=8, num_classes=4, dim=16, depth=1, heads=2, mlp_dim=32,
                       dim_head=8)
    vp = mae_fast.MAE(encoder=vit, decoder_dim=16, decoder_depth=1, decoder_heads=2, decoder_dim_head=8).to(device)
    return [("official", official, lambda m, u: m(u, 0.75, return_pred=False)[0]), ("vit-pytorch", vp, lambda m, u: m(u))]


def _assert_no_float_image(device):
    B, C, H, W = 4, 3, 16, 24
    u = pixels(B, C, H, W, device)
    for name, model, step in _models(device):
        with FloatImageWatch(B * C * H * W) as watch:
            step(model, u).backward()
        assert watch.seen == [], f"{name}: float tensors of the image batch's size: {watch.seen}"
    with FloatImageWatch(B * C * H * W) as watch:  # the watch sees the copy that normalising outside makes
        model(ref.normalize_pixels(u, dtype=torch.float32))
    assert watch.seen


@pytest.mark.skipif(not KERNELS_RUN, reason="the kernels run under TRITON_INTERPRET=1 (the fallback widens a copy)")
def test_uint8_training_step_makes_no_float_copy_of_the_batch():
    _assert_no_float_image("cpu")


@pytest.mark.gpu
def test_gpu_uint8_training_step_makes_no_float_copy_of_the_batch():
    _assert_no_float_image("cuda")


@pytest.mark.gpu
def test_gpu_official_uint8_matches_float_under_autocast():
    fast, _ = official_pair(norm_pix_loss=True)
    fast = fast.cuda()
    u, noise = pixels(4, 3, 16, 24, "cuda"), torch.rand(4, 24, device="cuda")
    x = ref.normalize_pixels(u, dtype=torch.float32)
    torch.testing.assert_close(fast(u, 0.75, noise)[0], fast(x, 0.75, noise)[0], rtol=1e-5, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = fast(u, 0.75, noise, return_pred=False)[0], fast(x, 0.75, noise, return_pred=False)[0]
    torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


def test_official_uint8_compiles_without_graph_breaks():
    fast, _ = official_pair(norm_pix_loss=True)
    fast.set_pixel_stats(*STATS)
    u, noise = pixels(2, 3, 16, 24), torch.rand(2, 24)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(u, 0.75, noise, return_pred=False)[0],
                               fast(u, 0.75, noise, return_pred=False)[0])
