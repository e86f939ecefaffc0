"""mae_fast.io.hf: official layout <-> transformers ViTMAEForPreTraining (configs, 4.x/5.x key names, parity)."""
import os
import re
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel  # noqa: E402

from mae_fast.io import hf as H  # noqa: E402
from mae_fast.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
import mae_fast  # noqa: E402
from mae_fast.testing.reference import MaskedAutoencoderViT  # noqa: E402

MODEL_CLS = MaskedAutoencoderViT  # the fast model has the same interface

TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               image_size=32, patch_size=8, num_channels=3, decoder_hidden_size=16,
               decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64)


def tiny_hf(seed=0, attn="eager", **kw):
    config = ViTMAEConfig(**{**TINY_HF, **kw})
    config._attn_implementation = attn  # before construction: the decoder deep-copies the config
    torch.manual_seed(seed)
    model = ViTMAEForPreTraining(config)
    with torch.no_grad():  # random everything, so that any mis-mapped tensor shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()



# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("eps,norm_pix,mask_ratio,attn,channels", [
    (1e-6, True, 0.6, "eager", 3),
    (1e-12, False, 0.75, "sdpa", 3),
    (1e-6, False, 0.5, "sdpa", 1),
    (1e-12, True, 0.9, "eager", 4),
])
@pytest.mark.parametrize("model_cls", [MaskedAutoencoderViT, mae_fast.MaskedAutoencoderViT], ids=["reference", "fast"])
def test_from_hf_matches_transformers(eps, norm_pix, mask_ratio, attn, channels, model_cls):
    hf = tiny_hf(layer_norm_eps=eps, norm_pix_loss=norm_pix, mask_ratio=mask_ratio, attn=attn,
                 num_channels=channels)
    assert hf.decoder.decoder_layers[0].attention.config._attn_implementation == attn
    model = H.from_hf(model_cls, hf).eval()
    assert model.default_mask_ratio == mask_ratio and model.norm_pix_loss is norm_pix
    eps_seen = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    assert eps_seen == {eps}
    B, L = 3, 16
    imgs = torch.randn(B, channels, 32, 32)
    noise = torch.rand(B, L)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    torch.testing.assert_close(mask, out.mask, rtol=0, atol=0)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)


def test_fast_model_classmethods_match_transformers_forward_and_backward():
    hf = tiny_hf(layer_norm_eps=1e-6, norm_pix_loss=True, mask_ratio=0.75, attn="sdpa")
    model = mae_fast.MaskedAutoencoderViT.from_hf(hf)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    out = hf(pixel_values=imgs, noise=noise)
    loss, pred, mask = model(imgs, noise=noise)  # mask_ratio from the HF config
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    loss.backward()
    hf_grads = H.official_state_dict_from_hf({k: p.grad for k, p in hf.named_parameters() if p.grad is not None})
    for name, p in model.named_parameters():
        if name in hf_grads:
            torch.testing.assert_close(p.grad, hf_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert len(hf_grads) > 20
    back = model.to_hf()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in hf.state_dict().items())


def test_eps_is_carried_not_defaulted():
    # with a large eps the two settings give visibly different outputs, so a dropped eps would fail
    hf = tiny_hf(layer_norm_eps=0.5)
    model = H.from_hf(MODEL_CLS, hf).eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(imgs, 0.75, noise)[1], hf(pixel_values=imgs, noise=noise).logits,
                                   rtol=1e-5, atol=1e-5)
    assert H.to_hf(model).config.layer_norm_eps == 0.5


def test_official_model_to_hf_matches():
    torch.manual_seed(3)
    model = MODEL_CLS(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=4,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    hf = H.to_hf(model, mask_ratio=0.7, attn_implementation="eager")
    assert isinstance(hf, ViTMAEForPreTraining) and not hf.training
    c = hf.config
    got = (c.layer_norm_eps, c.mask_ratio, c.norm_pix_loss, c.hidden_act, c.qkv_bias)
    assert got == (1e-5, 0.7, True, "gelu", True)  # the class's default LayerNorm, as upstream's
    assert (c.intermediate_size, c.decoder_intermediate_size) == (128, 64)
    # the sin-cos tables travel with the weights (fresh 5.x models start with zero tables)
    torch.testing.assert_close(hf.vit.embeddings.position_embeddings, model.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(hf.decoder.decoder_pos_embed, model.decoder_pos_embed, rtol=0, atol=0)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = model(imgs, 0.7, noise)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mask, out.mask, rtol=0, atol=0)
    back = H.from_hf(MODEL_CLS, hf)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.default_mask_ratio == 0.7
    assert H.to_hf(back).config.mask_ratio == 0.7  # mask_ratio=None takes default_mask_ratio


def test_round_trip_to_hf_from_hf_is_identical():
    hf = tiny_hf(layer_norm_eps=1e-6, mask_ratio=0.6, norm_pix_loss=True)
    again = H.to_hf(H.from_hf(MODEL_CLS, hf))
    a, b = hf.state_dict(), again.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keep = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
            "patch_size", "num_channels", "decoder_hidden_size", "decoder_num_hidden_layers",
            "decoder_num_attention_heads", "decoder_intermediate_size", "layer_norm_eps", "mask_ratio",
            "norm_pix_loss", "hidden_act", "qkv_bias"]
    assert {k: getattr(hf.config, k) for k in keep} == {k: getattr(again.config, k) for k in keep}


def test_from_hf_local_directory(tmp_path):
    hf = tiny_hf(layer_norm_eps=1e-6, mask_ratio=0.8)
    hf.save_pretrained(tmp_path)
    # transformers 5 writes legacy names on disk, decoder layers as 'decoder.decoder_encoder.layer.i'
    from safetensors.torch import load_file
    on_disk = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert H.detect_key_format(on_disk) == "4.x"
    assert H.official_state_dict_from_hf(on_disk).keys() == H.official_state_dict_from_hf(hf.state_dict()).keys()
    model = H.from_hf(MODEL_CLS, tmp_path)
    want = H.official_state_dict_from_hf(hf.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert model.default_mask_ratio == 0.8
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        H.from_hf(MODEL_CLS, tmp_path / "absent")
    with pytest.raises(TypeError, match="ViTMAEForPreTraining"):
        H.from_hf(MODEL_CLS, 42)


# ----------------------------------------------------------------------------- key names

_TO_4X = [  # from transformers 4.x models/vit_mae/modeling_vit_mae.py (ViTMAELayer / ViTMAEEncoder)
    ("vit.layers.", "vit.encoder.layer."),
    ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
    ("attention.o_proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
]


def to_4x_names(sd5):
    out = {}
    for k, v in sd5.items():
        for a, b in _TO_4X:
            k = k.replace(a, b)
        out[k] = v
    return out


def test_5x_key_names_are_what_transformers_uses():
    hf = tiny_hf()
    sd = H.hf_state_dict_from_official(H.official_state_dict_from_hf(hf.state_dict()), "5.x")
    assert set(sd) == set(hf.state_dict())
    assert H.detect_key_format(hf.state_dict()) == "5.x"


def test_4x_key_mapping_is_a_bijection():
    hf = tiny_hf()
    sd5 = hf.state_dict()
    sd4 = to_4x_names(sd5)
    assert len(sd4) == len(sd5)
    assert "vit.encoder.layer.1.attention.attention.query.weight" in sd4
    assert "decoder.decoder_layers.0.intermediate.dense.bias" in sd4
    assert H.detect_key_format(sd4) == "4.x"
    off4, off5 = H.official_state_dict_from_hf(sd4), H.official_state_dict_from_hf(sd5)
    official_keys = set(MODEL_CLS(**H.official_config_from_hf(hf.config)[0]).state_dict())
    assert set(off4) == set(off5) == official_keys
    for k in off5:
        assert torch.equal(off4[k], off5[k]), k
    back4 = H.hf_state_dict_from_official(off4, key_format="4.x")
    assert set(back4) == set(sd4)  # onto: every 4.x key produced exactly once
    for k in sd4:
        assert torch.equal(back4[k], sd4[k]), k
    # each official tensor maps to distinct HF names (q/k/v for the fused qkv), none shared
    n_qkv = sum(k.endswith(("attn.qkv.weight", "attn.qkv.bias")) for k in official_keys)
    assert len(sd4) == len(official_keys) + 2 * n_qkv


def test_4x_fixture_is_accepted_by_transformers_own_4x_loader(tmp_path):
    """transformers 5 renames 4.x checkpoints on load: it must read our 4.x fixture back exactly."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    hf = tiny_hf()
    off = H.official_state_dict_from_hf(hf.state_dict())
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in H.hf_state_dict_from_official(off, "4.x").items()},
              os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    loaded = ViTMAEForPreTraining.from_pretrained(tmp_path, local_files_only=True)
    for k, v in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_qkv_rows_are_q_then_k_then_v():
    hf = tiny_hf()
    off = H.official_state_dict_from_hf(hf.state_dict())
    D, Dd = 32, 16
    att = hf.vit.layers[1].attention
    for i, proj in enumerate((att.q_proj, att.k_proj, att.v_proj)):
        assert torch.equal(off["blocks.1.attn.qkv.weight"][i * D:(i + 1) * D], proj.weight)
        assert torch.equal(off["blocks.1.attn.qkv.bias"][i * D:(i + 1) * D], proj.bias)
    datt = hf.decoder.decoder_layers[0].attention
    assert torch.equal(off["decoder_blocks.0.attn.qkv.weight"][Dd:2 * Dd], datt.k_proj.weight)
    assert torch.equal(off["decoder_blocks.0.attn.proj.weight"], datt.o_proj.weight)
    assert torch.equal(off["pos_embed"], hf.vit.embeddings.position_embeddings)


def test_encoder_only_vitmae_model_weights():
    config = ViTMAEConfig(**TINY_HF)
    enc = ViTMAEModel(config)
    off = H.official_state_dict_from_hf(enc.state_dict())
    assert not any(k.startswith("decoder") or k == "mask_token" for k in off)
    model = MODEL_CLS(**H.official_config_from_hf(config)[0])
    with pytest.warns(UserWarning, match="missing 20"):
        report = load_checkpoint(model, enc.state_dict())
    assert report.converted_from == "hf-5.x"
    assert all(k.startswith("decoder") or k == "mask_token" for k in report.missing)


@pytest.mark.parametrize("names", ["5.x", "4.x"])
def test_load_checkpoint_converts_hf_files(tmp_path, names):
    hf = tiny_hf(layer_norm_eps=1e-6)
    sd = hf.state_dict() if names == "5.x" else to_4x_names(hf.state_dict())
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, sd)
    model = MODEL_CLS(**H.official_config_from_hf(hf.config)[0])
    report = load_checkpoint(model, path, strict=True)
    assert report.converted_from == f"hf-{names}" and report.ok
    want = H.official_state_dict_from_hf(hf.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change,message", [
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(hidden_act="gelu_new"), "exact"),
    (dict(qkv_bias=False), "qkv_bias=False"),
    (dict(patch_size=(8, 4)), "square patches"),
    (dict(decoder_intermediate_size=32), "one mlp_ratio"),
    (dict(hidden_size=30), "not divisible by its number of heads"),
    (dict(mask_ratio=1.0), r"mask_ratio=1.0 must be in \[0, 1\)"),
    (dict(image_size=36), "not divisible by patch_size"),
    (dict(model_type="vit"), "model_type 'vit'"),
    (dict(head_dim=16), "head_dim=16"),
])
def test_unrepresentable_configs_are_rejected(change, message):
    cfg = {**ViTMAEConfig(**TINY_HF).to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        H.official_config_from_hf(cfg)


def test_config_mapping_values():
    kw, ratio = H.official_config_from_hf(ViTMAEConfig(**TINY_HF, layer_norm_eps=1e-6, mask_ratio=0.65,
                                                       norm_pix_loss=True))
    norm_layer = kw.pop("norm_layer")
    assert norm_layer(8).eps == 1e-6 and ratio == 0.65
    assert kw == dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=4,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0, norm_pix_loss=True)
    assert H.official_config_from_hf(ViTMAEConfig())[0]["norm_layer"](4).eps == 1e-12  # HF default carried
    with pytest.warns(UserWarning, match="no dropout"):
        H.official_config_from_hf({**ViTMAEConfig(**TINY_HF).to_dict(), "hidden_dropout_prob": 0.1})


def test_bad_state_dicts_are_rejected():
    sd5 = tiny_hf().state_dict()
    mixed = dict(sd5)
    mixed["vit.encoder.layer.0.attention.attention.query.weight"] = mixed.pop("vit.layers.0.attention.q_proj.weight")
    with pytest.raises(ValueError, match="mixes transformers 4.x"):
        H.official_state_dict_from_hf(mixed)
    stray = dict(sd5, **{"classifier.weight": torch.zeros(2)})
    msg = "unrecognised ViTMAE keys for transformers 5.x names: ['classifier.weight']"
    with pytest.raises(ValueError, match=re.escape(msg)):
        H.official_state_dict_from_hf(stray)
    partial = {k: v for k, v in sd5.items() if k != "vit.layers.1.attention.v_proj.bias"}
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.bias: the q/k/v triple is incomplete"):
        H.official_state_dict_from_hf(partial)
    off = H.official_state_dict_from_hf(sd5)
    with pytest.raises(ValueError, match="not part of the official"):
        H.hf_state_dict_from_official(dict(off, **{"head.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="key_format must be"):
        H.hf_state_dict_from_official(off, key_format="3.x")
    assert set(H.hf_state_dict_from_official(off, "4.40.2")) == set(to_4x_names(sd5))


def test_to_hf_rejects_non_square_images():
    model = MODEL_CLS(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=4, decoder_embed_dim=16,
                      decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match="not square"):
        H.to_hf(model)


def test_to_hf_without_transformers(monkeypatch):
    model = H.from_hf(MODEL_CLS, tiny_hf())
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        H.to_hf(model)
    # the state-dict converters need no transformers
    assert "vit.layers.0.attention.q_proj.weight" in H.hf_state_dict_from_official(model.state_dict(), "5.x")


def test_fresh_transformers_model_with_zero_tables_warns():
    config = ViTMAEConfig(**TINY_HF)
    hf = ViTMAEForPreTraining(config)
    if hf.vit.embeddings.position_embeddings.any():
        pytest.skip("this transformers version initialises the sin-cos tables")
    with pytest.warns(UserWarning, match="all zeros"):
        model = H.from_hf(MODEL_CLS, hf)
    assert not model.pos_embed.any()  # converted faithfully, not silently replaced


def test_from_hf_follows_dtype_and_to_hf_keeps_it():
    hf = tiny_hf().to(torch.bfloat16)
    model = H.from_hf(MODEL_CLS, hf)
    assert model.pos_embed.dtype == torch.bfloat16 and model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    back = H.to_hf(model)
    assert back.vit.layers[0].attention.q_proj.weight.dtype == torch.bfloat16
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_mask_ratio_zero_is_kept():
    model = H.from_hf(MODEL_CLS, tiny_hf(mask_ratio=0.0))
    assert model.default_mask_ratio == 0.0
    assert H.to_hf(model).config.mask_ratio == 0.0
