"""benchmarks/flops.py (the FLOP count behind the benchmarks' MFU) against torch.utils.flop_counter
on tiny models, CPU: forward alone and a whole forward + backward.

SDPA runs on its math backend here so that the counter sees the attention matmuls (it has no
formula for the CPU flash kernel); the reference model's explicit attention is counted as is.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mae_fast
from mae_fast.testing import reference as R

_spec = importlib.util.spec_from_file_location(
    "mae_fast_bench_flops", Path(__file__).resolve().parents[2] / "benchmarks" / "flops.py")
flops = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = flops  # dataclasses look their module up there
_spec.loader.exec_module(flops)

B = 3
OFFICIAL = dict(img_size=(16, 24), patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3, mlp_ratio=3.0, norm_pix_loss=True)
L_OFFICIAL = (16 // 4) * (24 // 4)


def _counted(fn, backward: bool) -> tuple[int, int]:
    """(FLOPs of fn(), FLOPs of fn() + backward of its loss)."""
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd_only:
            fn()
        with FlopCounterMode(display=False) as both:
            loss = fn()
            if backward:
                loss.backward()
    return fwd_only.get_total_flops(), both.get_total_flops()


@pytest.mark.parametrize("ratio", [0.75, 0.5])
@pytest.mark.parametrize("return_pred", [True, False])
def test_official_fast_model(ratio, return_pred):
    model = mae_fast.MaskedAutoencoderViT(**OFFICIAL)
    imgs, noise = torch.randn(B, 3, 16, 24), torch.rand(B, L_OFFICIAL)
    fwd, total = _counted(lambda: model(imgs, ratio, noise, return_pred=return_pred)[0], backward=True)
    expected = flops.official_step_flops(model, B, ratio, pred_rows="all" if return_pred else "removed")
    assert fwd == expected.forward
    assert total == expected.total
    assert expected.backward == 2 * expected.forward - expected.parts["patch_embed"]


def test_official_reference_model():
    """The reference embeds all L patches (conv, weight gradient only) and predicts L + 1 rows."""
    torch.manual_seed(0)
    model = R.MaskedAutoencoderViT(**OFFICIAL)
    imgs, noise = torch.randn(B, 3, 16, 24), torch.rand(B, L_OFFICIAL)
    fwd, total = _counted(lambda: model(imgs, 0.75, noise)[0], backward=True)
    expected = flops.official_step_flops(model, B, 0.75, embed_rows="all", pred_rows=L_OFFICIAL + 1)
    assert (fwd, total) == (expected.forward, expected.total)


def _vit_pytorch_model(heads=2, dim_head=8, dec_heads=2, dec_dim_head=6, decoder_dim=20, pool="mean", cls=mae_fast):
    enc = cls.ViT(image_size=(16, 20), patch_size=4, num_classes=0, dim=24, depth=2, heads=heads, mlp_dim=40,
                  dim_head=dim_head, pool=pool, channels=3)
    return cls.MAE(encoder=enc, decoder_dim=decoder_dim, masking_ratio=0.6, decoder_depth=2,
                   decoder_heads=dec_heads, decoder_dim_head=dec_dim_head)


@pytest.mark.parametrize("kw", [dict(), dict(pool="cls"), dict(decoder_dim=24),  # no enc_to_dec
                                dict(dec_heads=1, dec_dim_head=20)],  # decoder without out-projection
                         ids=["mean", "cls", "same-dim", "no-out-proj"])
def test_vit_pytorch_fast_model(kw):
    model = _vit_pytorch_model(**kw)
    img = torch.randn(B, 3, 16, 20)
    L = 20
    noise = torch.rand(B, L)
    fwd, total = _counted(lambda: model(img, noise), backward=True)
    expected = flops.vit_pytorch_step_flops(model, B)
    assert (fwd, total) == (expected.forward, expected.total)
    # the embedding's input is LayerNorm(patches): its input gradient is computed, so 2x throughout
    assert expected.backward == 2 * expected.forward


def test_vit_pytorch_reference_model():
    """The reference (like vit-pytorch) embeds all L patches before masking."""
    torch.manual_seed(0)
    model = _vit_pytorch_model(cls=R)
    img, noise = torch.randn(B, 3, 16, 20), torch.rand(B, 20)
    fwd, total = _counted(lambda: model(img, noise), backward=True)
    expected = flops.vit_pytorch_step_flops(model, B, embed_rows="all")
    assert (fwd, total) == (expected.forward, expected.total)


def test_vit_b16_numbers():
    """ViT-B/16 MAE at 224, mask 0.75, by hand; ~58.1 GFLOP per image and step: a compute floor of
    ~13,600 images/s at the ~790 TFLOP/s bf16 ceiling of an H200."""
    with torch.device("meta"):
        model = mae_fast.mae_vit_base_patch16()
    f = flops.official_step_flops(model, 1, 0.75)
    # encoder: 12 blocks on 50 tokens of 768; decoder: 8 blocks on 197 tokens of 512
    enc = 12 * (2 * 50 * 768 * 768 * 12 + 4 * 50 * 50 * 768)
    dec = 8 * (2 * 197 * 512 * 512 * 12 + 4 * 197 * 197 * 512)
    embed, bridge, pred = 2 * 49 * 768 * 768, 2 * 50 * 768 * 512, 2 * 196 * 512 * 768
    assert f.forward == enc + dec + embed + bridge + pred
    assert f.total == 3 * f.forward - embed
    assert 13_500 < 790e12 / f.total < 13_700


def test_bad_rows():
    with pytest.raises(ValueError, match="rows"):
        flops.mae_step_flops(batch=1, num_patches=4, len_keep=1, patch_dim=3, enc_dim=4, enc_inner=4, enc_mlp=8,
                             enc_depth=1, dec_dim=4, dec_inner=4, dec_mlp=8, dec_depth=1, pred_rows="some")
