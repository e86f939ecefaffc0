"""pretrain on your own data: grayscale 16-bit PNGs and 5-channel TIFFs (--in-chans), their
statistics (--norm auto, --mean/--std) kept in the checkpoint for the later commands, non-square
crops (--input-size), starting weights (--init), --clip-grad and --grad-checkpointing; each bad
input a one-line error before anything is written."""
import json

import numpy as np
import pytest
import torch

from mae_fast import cli
from mae_fast import data as mdata
from mae_fast.io.checkpoint import read_checkpoint, save_checkpoint
from mae_fast.models.official import MaskedAutoencoderViT
from mae_fast.train import pretrain
from mae_fast.train.run_dir import pixel_stats

tifffile = pytest.importorskip("tifffile")

SMALL = ["--model", "tiny", "--batch-size", "4", "--samples-per-epoch", "8", "--quiet", "--vis-every", "100",
         "--num-workers", "0"]


@pytest.fixture(autouse=True)
def _pytorch_fallback_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def gray16(tmp_path_factory):
    """An ImageFolder of 16-bit grayscale PNGs of 24 x 32 pixels."""
    from PIL import Image

    root = tmp_path_factory.mktemp("gray16")
    rng = np.random.default_rng(0)
    for k in range(6):
        (root / f"c{k % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 65536, (24, 32), dtype=np.uint16)).save(root / f"c{k % 2}" / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def tiff5(tmp_path_factory):
    """A folder of 5-channel 16-bit TIFFs."""
    root = tmp_path_factory.mktemp("tiff5")
    rng = np.random.default_rng(1)
    for k in range(4):
        tifffile.imwrite(root / f"{k}.tif", rng.integers(0, 65536, (5, 20, 20), dtype=np.uint16))
    return root


def train(out, *flags):
    return pretrain.main([*SMALL, "--output-dir", str(out), *flags])


def one_line_error(capsys, call) -> str:
    """The error of a refused command: a SystemExit message, or argparse's last stderr line."""
    with pytest.raises(SystemExit) as e:
        call()
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_16_bit_grayscale_trains_with_measured_statistics_that_later_commands_use(tmp_path, gray16, monkeypatch):
    seen = []
    real = mdata.normalize_batch
    monkeypatch.setattr(mdata, "normalize_batch", lambda imgs, mean, std: seen.append((imgs, mean, std)) or real(imgs, mean, std))
    summary = train(tmp_path / "run", "--data", str(gray16), "--in-chans", "1", "--norm", "auto",
                    "--input-size", "16", "24", "--epochs", "1")
    ckpt = read_checkpoint(summary["checkpoint"])
    args = ckpt["args"]
    expected = mdata.channel_stats(mdata.pretrain_dataset(gray16, (16, 24), in_chans=1))
    assert (args["mean"], args["std"]) == expected and pixel_stats(args) == expected
    assert args["norm"] == "auto" and args["in_chans"] == 1 and args["input_size"] == [16, 24]
    assert ckpt["model"]["patch_embed.proj.weight"].shape == (96, 1, 4, 4)
    imgs, mean, std = seen[0]
    assert imgs.shape == (4, 1, 16, 24) and imgs.dtype == torch.float32  # 16-bit crops, not squashed to uint8
    assert not torch.allclose(imgs * 255, (imgs * 255).round(), atol=1e-3)
    assert mean.tolist() == pytest.approx(expected[0]) and std.tolist() == pytest.approx(expected[1])

    image = next(gray16.rglob("*.png"))
    picture = cli.cmd_visualize([str(tmp_path / "run"), str(image)])
    assert picture == str(tmp_path / "run" / "reconstructions.png") and open(picture, "rb").read(4) == b"\x89PNG"
    cli.cmd_export([str(tmp_path / "run"), "--to", "timm"])
    config = json.loads((tmp_path / "run" / "encoder-timm.json").read_text())
    assert config["pretrained_cfg"]["mean"] == expected[0] and config["pretrained_cfg"]["input_size"] == [1, 16, 24]


def test_5_channel_tiffs_train_with_given_statistics_and_a_resume_keeps_them(tmp_path, tiff5, capsys):
    stats = ["--mean", *["0.5"] * 5, "--std", *["0.3"] * 5]
    out = tmp_path / "run"
    summary = train(out, "--data", str(tiff5), "--in-chans", "5", "--img-size", "16", "--epochs", "1", *stats)
    args = read_checkpoint(summary["checkpoint"])["args"]
    assert pixel_stats(args) == ([0.5] * 5, [0.3] * 5)
    picture = cli.cmd_visualize([str(out), str(tiff5 / "0.tif"), "--attention"])
    assert picture == str(out / "attention.png")
    other = ["--mean", *["0.4"] * 5, "--std", *["0.3"] * 5]
    message = one_line_error(capsys, lambda: train(out, "--data", str(tiff5), "--in-chans", "5", "--img-size", "16",
                                                   "--epochs", "2", "--resume", "auto", *other))
    assert "used --mean [0.5, 0.5, 0.5, 0.5, 0.5], this command [0.4, 0.4, 0.4, 0.4, 0.4]" in message


@pytest.mark.parametrize("case", ["3-channel model, 1-channel data", "stats of the wrong length",
                                  "mean without std", "1 channel without stats", "init of another architecture",
                                  "init and resume", "embedded photos with in-chans"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, gray16, capsys, case):
    other = tmp_path / "other.pth"
    save_checkpoint(other, {"model": MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                                          decoder_embed_dim=32, decoder_depth=1,
                                                          decoder_num_heads=2).state_dict()})
    gray = ["--data", str(gray16), "--in-chans"]
    flags, expected = {
        "3-channel model, 1-channel data": (gray + ["3"], f"--in-chans 3: {gray16}"),
        "stats of the wrong length": (gray + ["1", "--mean", "0.5", "0.5", "--std", "0.2"],
                                      "--mean needs one value per channel: 1 (--in-chans 1), got 2: 0.5 0.5"),
        "mean without std": (gray + ["1", "--mean", "0.5"], "--mean and --std go together"),
        "1 channel without stats": (gray + ["1"], "--in-chans 1: ImageNet's statistics are for 3 channels; "
                                                  "pass --norm auto"),
        "init of another architecture": (["--init", str(other)], f"--init {other}: the weights of another "
                                                                   "architecture than --model tiny (3 channels, 32x32 px)"),
        "init and resume": (["--init", str(other), "--resume", "auto"], "--init starts a new run from weights"),
        "embedded photos with in-chans": (["--in-chans", "1", "--norm", "auto"], "--in-chans 1 reads your files as "
                                                                                  "stored: pass --data DIR"),
    }[case]
    message = one_line_error(capsys, lambda: train(tmp_path / "run", *flags))
    assert expected in message
    if case == "3-channel model, 1-channel data":
        assert message.endswith("has 1 channel; expected 3 (omit --in-chans to read every image as RGB)")
    if case == "init of another architecture":
        assert "shape mismatch for 'cls_token'" in message
    assert not (tmp_path / "run").exists()


def test_a_file_of_another_channel_count_met_by_a_worker_mid_run_stops_in_one_line(tmp_path, gray16, capsys):
    """The start checks the first file (and, with --norm auto, a sample): a later odd file stops the
    run when a DataLoader worker meets it, with the same one-line message."""
    import shutil

    from PIL import Image

    data = shutil.copytree(gray16, tmp_path / "data")
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(data / "c1" / "9-rgb.png")  # sorted last
    flags = ["--data", str(data), "--in-chans", "1", "--mean", "0.5", "--std", "0.2", "--img-size", "16",
             "--num-workers", "1", "--batch-size", "7", "--samples-per-epoch", "7"]
    message = one_line_error(capsys, lambda: train(tmp_path / "run", *flags))
    assert message == f"--in-chans 1: {data / 'c1' / '9-rgb.png'} has 3 channels; expected 1"


def test_init_from_encoder_only_weights_at_another_size_and_from_a_hugging_face_folder(tmp_path, capsys):
    first = train(tmp_path / "first", "--img-size", "16", "--epochs", "1")
    encoder = {k: v for k, v in read_checkpoint(first["checkpoint"])["model"].items()
               if not k.startswith(("decoder", "mask_token"))}
    save_checkpoint(tmp_path / "mae_pretrain_vit_tiny.pth", {"model": encoder})  # as the official releases
    capsys.readouterr()
    # --lr 0: the one step leaves the weights as loaded
    summary = train(tmp_path / "init", "--init", str(tmp_path / "mae_pretrain_vit_tiny.pth"), "--max-steps", "1",
                    "--lr", "0")
    assert "position tables interpolated to the 8x8 grid" in capsys.readouterr().out
    loaded = read_checkpoint(summary["checkpoint"])["model"]
    assert all(torch.equal(loaded[k], v) for k, v in encoder.items() if "pos_embed" not in k)
    assert loaded["pos_embed"].shape == (1, 65, 96)

    pytest.importorskip("transformers")
    cli.cmd_export([str(tmp_path / "first"), "--to", "hf"])
    summary = train(tmp_path / "from-hf", "--img-size", "16", "--init", str(tmp_path / "first" / "encoder-hf"),
                    "--max-steps", "1", "--lr", "0")
    assert "converted from hf-" in capsys.readouterr().out
    loaded = read_checkpoint(summary["checkpoint"])["model"]
    assert all(torch.equal(loaded[k], v) for k, v in encoder.items())


def test_clip_grad_clips_the_global_norm_of_every_optimizer_step(tmp_path, monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **kw):
        params = list(params)
        total = real(params, max_norm, *a, **kw)
        norms.append((float(total), max_norm, float(torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm())))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train(tmp_path / "run", "--img-size", "16", "--max-steps", "2", "--clip-grad", "0.05")
    assert len(norms) == 2
    for before, max_norm, after in norms:
        assert max_norm == 0.05 and before > max_norm and after == pytest.approx(max_norm, rel=1e-3)
    train(tmp_path / "plain", "--img-size", "16", "--max-steps", "1")
    assert len(norms) == 2  # off by default


def test_grad_checkpointing_trains_as_without(tmp_path, monkeypatch):
    enabled = []
    real = MaskedAutoencoderViT.set_grad_checkpointing
    monkeypatch.setattr(MaskedAutoencoderViT, "set_grad_checkpointing",
                        lambda self, enable=True: enabled.append(enable) or real(self, enable))
    plain = train(tmp_path / "plain", "--img-size", "16", "--max-steps", "3")
    assert enabled == []
    checkpointed = train(tmp_path / "ckpt", "--img-size", "16", "--max-steps", "3", "--grad-checkpointing")
    assert enabled == [True]
    a, b = (read_checkpoint(s["checkpoint"])["model"] for s in (plain, checkpointed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_pixel_stats_of_checkpoint_args():
    import argparse

    assert pixel_stats({"mean": [0.5], "std": [0.2], "in_chans": 1}) == ([0.5], [0.2])
    assert pixel_stats(argparse.Namespace(mean=[0.1, 0.2, 0.3], std=[1, 1, 1])) == ([0.1, 0.2, 0.3], [1, 1, 1])
    assert pixel_stats({"model": "mae_vit_base_patch16"}) == (list(mdata.IMAGENET_MEAN), list(mdata.IMAGENET_STD))
    assert pixel_stats(None) == (list(mdata.IMAGENET_MEAN), list(mdata.IMAGENET_STD))
    with pytest.raises(ValueError, match="in_chans 5 but no mean/std"):
        pixel_stats({"in_chans": 5})
