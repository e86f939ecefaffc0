"""mae_fast.io.checkpoint: formats, encoder-only loads, position-table interpolation, safety, atomic save."""
import argparse
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from mae_fast.io.checkpoint import (CheckpointError, LoadReport, compact_keys, interpolate_pos_table,
                                 load_checkpoint, read_checkpoint, save_checkpoint)
from mae_fast.io.files import checkpoint_metadata
from mae_fast.testing.reference import MaskedAutoencoderViT

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=4,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT(**{**TINY, **kw})
    with torch.no_grad():  # every tensor distinct and non-zero (the tokens start at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    return model


def assert_same_weights(a, b, keys=None):
    sa, sb = a.state_dict(), b.state_dict()
    for k in keys if keys is not None else sa:
        assert torch.equal(sa[k], sb[k]), k


def decoder_keys(model):
    return sorted(k for k in model.state_dict() if k.startswith("decoder_") or k == "mask_token")


# ----------------------------------------------------------------------------- formats

@pytest.mark.parametrize("fmt", ["official", "plain", "safetensors", "in_memory", "ddp_prefix"])
def test_round_trip(tmp_path, fmt):
    src, dst = make_model(1), make_model(2)
    sd = src.state_dict()
    if fmt == "official":
        opt = torch.optim.AdamW(src.parameters(), lr=1e-3)
        src(torch.randn(2, 3, 32, 32))[0].backward()
        opt.step()
        sd = src.state_dict()
        path = tmp_path / "checkpoint-3.pth"
        save_checkpoint(path, {"model": sd, "optimizer": opt.state_dict(), "epoch": 3,
                               "scaler": {"scale": 65536.0, "growth_tracker": 0},
                               "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75, blr=1.5e-4)})
        arg = path
    elif fmt == "plain":
        arg = tmp_path / "plain.pth"
        save_checkpoint(str(arg), sd)
    elif fmt == "safetensors":
        arg = tmp_path / "model.safetensors"
        save_checkpoint(arg, {"model": sd})
    elif fmt == "in_memory":
        arg = {"model": sd}
    else:
        arg = tmp_path / "ddp.pth"
        torch.save({"model": {"module." + k: v for k, v in sd.items()}}, arg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_checkpoint(dst, arg)
    assert isinstance(report, LoadReport)
    assert report.ok and not report.interpolated and report.converted_from is None
    assert_same_weights(src, dst)
    if fmt == "official":  # the whole training state comes back, args included
        ckpt = read_checkpoint(arg)
        assert ckpt["epoch"] == 3 and ckpt["args"].blr == 1.5e-4 and ckpt["scaler"]["scale"] == 65536.0
        opt2 = torch.optim.AdamW(dst.parameters(), lr=1e-3)
        opt2.load_state_dict(ckpt["optimizer"])


def test_safetensors_is_detected_without_the_extension(tmp_path):
    src, dst = make_model(1), make_model(2)
    save_checkpoint(tmp_path / "w.safetensors", src.state_dict())
    os.replace(tmp_path / "w.safetensors", tmp_path / "w.bin")
    assert load_checkpoint(dst, tmp_path / "w.bin").ok
    assert_same_weights(src, dst)


def test_safetensors_save_rejects_non_tensors(tmp_path):
    with pytest.raises(ValueError, match="tensors only"):
        save_checkpoint(tmp_path / "x.safetensors", {"model": {}, "epoch": 3})


def test_dict_without_state_dict_is_rejected():
    with pytest.raises(CheckpointError, match="no state dict found.*epoch"):
        load_checkpoint(make_model(), {"epoch": 3, "optimizer": {"state": {}}})


# ----------------------------------------------------------------------------- partial loads

def test_encoder_only_checkpoint_reports_exactly_the_decoder_keys(tmp_path):
    src, dst = make_model(1), make_model(2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    enc = {k: v for k, v in src.state_dict().items() if k not in decoder_keys(src)}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": enc}, path)  # as released: {'model': encoder state dict}
    summary = (r"missing 20: mask_token, decoder_pos_embed, decoder_embed\.\{bias,weight\}, "
               r"decoder_blocks\.\[0\]\.\* \(12 keys\), decoder_norm\.\{bias,weight\}, decoder_pred")
    with pytest.warns(UserWarning, match=summary):
        report = load_checkpoint(dst, path)
    assert sorted(report.missing) == decoder_keys(dst) == sorted(report.missing_keys)
    assert report.unexpected == [] and report.interpolated == {}
    assert_same_weights(src, dst, enc.keys())
    for k in decoder_keys(dst):
        assert torch.equal(dst.state_dict()[k], before[k]), k
    with pytest.raises(RuntimeError, match="strict load.*missing 20"):
        load_checkpoint(make_model(), path, strict=True)


def test_unexpected_keys_are_reported_not_loaded():
    src, dst = make_model(1), make_model(2)
    sd = dict(src.state_dict(), **{"head.weight": torch.zeros(10, 32), "fc_norm.bias": torch.zeros(32)})
    with pytest.warns(UserWarning, match="unexpected 2"):
        report = load_checkpoint(dst, sd)
    assert sorted(report.unexpected) == ["fc_norm.bias", "head.weight"] and report.missing == []
    assert_same_weights(src, dst)


def test_compact_keys():
    keys = [f"blocks.{i}.attn.qkv.{t}" for i in range(4) for t in ("weight", "bias")] + ["norm.weight", "norm.bias",
                                                                                         "mask_token"]
    assert compact_keys(keys) == "blocks.[0-3].* (8 keys), norm.{bias,weight}, mask_token"


# ----------------------------------------------------------------------------- interpolation

def coded_table(grid, dim, cls_seed):
    """(1, 1+h*w, dim): channel 0 = column j, channel 1 = row i, channel 2 = 5, rest random."""
    gh, gw = grid
    i, j = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    body = torch.randn(gh * gw, dim, generator=torch.Generator().manual_seed(cls_seed))
    body[:, 0], body[:, 1], body[:, 2] = j.flatten(), i.flatten(), 5.0
    cls = torch.randn(1, dim, generator=torch.Generator().manual_seed(cls_seed + 1))
    return torch.cat([cls, body])[None]


def expected_interp(table, old, new):
    """The official util/pos_embed.py recipe, written out for (possibly non-square) grids."""
    d = table.shape[-1]
    g = table[:, 1:].reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new, mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], g.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d)], dim=1)


def check_table(out, table, old, new):
    gh, gw = new
    torch.testing.assert_close(out[0, 0], table[0, 0], rtol=0, atol=0)  # cls row kept
    body = out[0, 1:].reshape(gh, gw, -1)
    col, row = body[..., 0], body[..., 1]
    torch.testing.assert_close(col, col[:1].expand(gh, gw))  # channel 0 depends on j only
    torch.testing.assert_close(row, row[:, :1].expand(gh, gw))  # channel 1 depends on i only
    if gw > 1:
        assert (col[0, 1:] > col[0, :-1]).all()
    if gh > 1:
        assert (row[1:, 0] > row[:-1, 0]).all()
    torch.testing.assert_close(body[..., 2], torch.full((gh, gw), 5.0))
    torch.testing.assert_close(out, expected_interp(table, old, new))


@pytest.mark.parametrize("ckpt_img,model_img,old,new", [
    (16, 32, (2, 2), (4, 4)),  # square up
    (16, (24, 32), (2, 2), (3, 4)),  # into a non-square grid
    ((16, 24), (32, 48), (2, 3), (4, 6)),  # non-square checkpoint, grid from the model's aspect ratio
    (32, 16, (4, 4), (2, 2)),  # down
])
def test_pos_tables_are_interpolated(tmp_path, ckpt_img, model_img, old, new):
    src = make_model(1, img_size=ckpt_img)
    sd = src.state_dict()
    sd["pos_embed"] = coded_table(old, 32, 10)
    sd["decoder_pos_embed"] = coded_table(old, 16, 20)
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"model": sd})
    dst = make_model(2, img_size=model_img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_checkpoint(dst, path)
    L = new[0] * new[1]
    assert report.interpolated == {"pos_embed": ((1, 1 + old[0] * old[1], 32), (1, 1 + L, 32)),
                                   "decoder_pos_embed": ((1, 1 + old[0] * old[1], 16), (1, 1 + L, 16))}
    assert report.ok
    check_table(dst.pos_embed.detach(), sd["pos_embed"], old, new)
    check_table(dst.decoder_pos_embed.detach(), sd["decoder_pos_embed"], old, new)
    assert not dst.pos_embed.requires_grad  # still frozen
    assert_same_weights(src, dst, [k for k in sd if "pos_embed" not in k])
    loss, pred, mask = dst(torch.randn(1, 3, *((model_img,) * 2 if isinstance(model_img, int) else model_img)))
    assert torch.isfinite(loss) and pred.shape[1] == L


def test_strict_load_does_not_interpolate_unless_asked():
    sd = make_model(1, img_size=16).state_dict()
    msg = "'pos_embed': checkpoint has (1, 5, 32), model expects (1, 17, 32)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        load_checkpoint(make_model(2), sd, strict=True)
    report = load_checkpoint(make_model(2), sd, strict=True, interpolate=True)
    assert set(report.interpolated) == {"pos_embed", "decoder_pos_embed"}
    with pytest.raises(ValueError, match="pos_embed"):
        load_checkpoint(make_model(2), sd, interpolate=False)


def test_ambiguous_checkpoint_grid_needs_checkpoint_grid():
    sd = make_model(1, img_size=(16, 24)).state_dict()  # 2x3 grid
    dst = make_model(2)  # 4x4: aspect 1, and 6 rows are no square
    with pytest.raises(ValueError, match=r"pos_embed.*checkpoint_grid"):
        load_checkpoint(dst, sd)
    report = load_checkpoint(dst, sd, checkpoint_grid=(2, 3))
    assert set(report.interpolated) == {"pos_embed", "decoder_pos_embed"}
    torch.testing.assert_close(dst.pos_embed.detach(), expected_interp(sd["pos_embed"], (2, 3), (4, 4)))


def test_interpolate_pos_table_identity():
    t = coded_table((3, 5), 8, 0)
    assert torch.equal(interpolate_pos_table(t, (3, 5), old_grid=(3, 5)), t)


@pytest.mark.parametrize("kw,key", [
    (dict(patch_size=4), "patch_embed.proj.weight"),
    (dict(in_chans=1), "patch_embed.proj.weight"),
    (dict(embed_dim=48), "cls_token"),
    (dict(mlp_ratio=2.0), "blocks.0.mlp.fc1.weight"),
])
def test_shape_mismatch_names_key_and_shapes(kw, key):
    sd = make_model(1, **kw).state_dict()
    dst = make_model(2)
    want_ck, want_model = tuple(sd[key].shape), tuple(dst.state_dict()[key].shape)
    with pytest.raises(ValueError, match=re.escape(f"'{key}': checkpoint has {want_ck}, model expects {want_model}")):
        load_checkpoint(dst, sd)


# ----------------------------------------------------------------------------- bad files

def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_checkpoint(make_model(), path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_checkpoint(path)
    with pytest.raises(IsADirectoryError, match="from_hf"):
        load_checkpoint(make_model(), tmp_path)


@pytest.mark.parametrize("name", ["ckpt.pth", "model.safetensors"])
def test_truncated_file_names_the_path(tmp_path, name):
    path = tmp_path / name
    save_checkpoint(path, {"model": make_model().state_dict()})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(make_model(), path)


def test_garbage_file_names_the_path(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(make_model(), path)


class _Payload:
    """Unpickling this calls os.mkdir(marker): code execution if the loader were not weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": make_model().state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load.*evil.pth.*GLOBAL .*mkdir"):
        load_checkpoint(make_model(), path)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------- atomic save

def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good, other = make_model(1), make_model(2)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"model": good.state_dict(), "epoch": 1})
    before = path.read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"model": other.state_dict(), "epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]  # no temp file left behind
    fresh = make_model(3)
    load_checkpoint(fresh, path)
    assert_same_weights(good, fresh)

    save_checkpoint(path, {"model": other.state_dict(), "epoch": 2})  # a good save replaces it
    load_checkpoint(fresh, path)
    assert_same_weights(other, fresh)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


# ----------------------------------------------------------------------------- checksum

def _flip_a_byte_of(path, tensor):
    """Flips one bit in the middle of tensor's bytes inside the file (stored uncompressed)."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0
    data[at + tensor.numel() * tensor.element_size() // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["checkpoint-3.pth", "model.safetensors"])
def test_a_flipped_byte_in_a_tensor_is_refused(tmp_path, name):
    sd = make_model(1).state_dict()
    path = tmp_path / name
    save_checkpoint(path, {"model": sd} if name.endswith(".safetensors") else
                    {"model": sd, "epoch": 3, "args": {"model": "tiny"}})
    assert load_checkpoint(make_model(2), path).ok  # intact: loads, checksum and all
    _flip_a_byte_of(path, sd["blocks.0.attn.qkv.weight"])
    match = rf"checkpoint '{re.escape(str(path))}' is corrupt: .* sha256 checksum"
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(make_model(2), path)


def test_files_without_a_checksum_load_as_before(tmp_path):
    """Official releases and other tools' files carry none: read as they are, unverified."""
    sd = make_model(1).state_dict()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd}, path)
    _flip_a_byte_of(path, sd["blocks.0.attn.qkv.weight"])
    assert load_checkpoint(make_model(2), path).ok


def test_the_checksum_is_invisible_to_other_readers(tmp_path):
    src = make_model(1)
    save_checkpoint(tmp_path / "sd.pth", src.state_dict(), metadata={"export": "timm"})
    save_checkpoint(tmp_path / "sd.safetensors", src.state_dict(), metadata={"export": "timm"})
    dst = make_model(2)
    dst.load_state_dict(torch.load(tmp_path / "sd.pth", weights_only=True), strict=True)  # no extra key
    assert_same_weights(src, dst)
    safetensors = pytest.importorskip("safetensors.torch")
    assert safetensors.load_file(tmp_path / "sd.safetensors").keys() == src.state_dict().keys()
    for name in ("sd.pth", "sd.safetensors"):
        meta, _ = checkpoint_metadata(tmp_path / name)
        assert meta["export"] == "timm" and re.fullmatch("[0-9a-f]{64}", meta["sha256"])
        assert sorted(read_checkpoint(tmp_path / name)) == sorted(src.state_dict())
    assert checkpoint_metadata(tmp_path / "sd.pth")[1] == list(src.state_dict())


def test_the_checksum_covers_every_value_and_stays_with_its_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"model": make_model(1).state_dict(), "epoch": 3, "history": [[1, 0.5]]})
    raw = torch.load(path, weights_only=True)  # carries the checksum: edited, it no longer matches
    raw["epoch"] = 4
    torch.save(raw, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=r"edited.pth' is corrupt.*re-save it with mae_fast.save_checkpoint"):
        read_checkpoint(tmp_path / "edited.pth")
    ckpt = read_checkpoint(path)  # read_checkpoint hands out the object without it
    ckpt["epoch"] = 4
    torch.save(ckpt, tmp_path / "edited.pth")
    assert read_checkpoint(tmp_path / "edited.pth")["epoch"] == 4
    save_checkpoint(tmp_path / "resaved.pth", raw)  # save_checkpoint writes a fresh one
    assert read_checkpoint(tmp_path / "resaved.pth")["epoch"] == 4
