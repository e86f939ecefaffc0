"""What a new user meets: --help that shows each default once, help text on every option, progress
as plain lines in a log file, one start-up line, pictures in the run folder, attention maps, and
exports that load by their architecture file alone."""
import json
import os
import re

import pytest
import torch

from mae_fast import cli
from mae_fast.io.checkpoint import read_checkpoint
from mae_fast.train import pretrain

SMALL = ["--model", "tiny", "--img-size", "16", "--batch-size", "8", "--samples-per-epoch", "32", "--vis-every", "100",
         "--num-workers", "0"]


@pytest.fixture(autouse=True)
def _pytorch_fallback_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def help_text(capsys, call) -> str:
    with pytest.raises(SystemExit):
        call(["--help"])
    return capsys.readouterr().out


def options(text: str) -> dict:
    """option -> its help entry, from argparse's --help output."""
    entries, name = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-\S+)", line)
        if m:
            name = m.group(1).rstrip(",")
            entries[name] = line
        elif name:
            entries[name] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_pretrain_help_shows_each_default_once(capsys):
    entries = options(help_text(capsys, pretrain.parse_args))
    assert "(default: None)" not in str(entries) and "(default: False)" not in str(entries)
    for option, default in [("--model", "tiny"), ("--epochs", "12"), ("--output-dir", "runs/mae-demo"), ("--seed", "0"),
                            ("--log-every", "20"), ("--blr", "0.00015")]:
        assert f"(default: {default})" in entries[option], entries[option]
    assert "the preset's size: tiny 32" in entries["--img-size"]
    for option, entry in entries.items():
        assert entry.count("default") <= 1, entry
        assert len(entry.split(None, 1)) > 1 and option != entry, f"{option} has no help text"


@pytest.mark.parametrize("command", ["visualize", "export"])
def test_visualize_and_export_options_have_help_text(capsys, command):
    call = {"visualize": cli.cmd_visualize, "export": cli.cmd_export}[command]
    text = help_text(capsys, call)
    assert "(default: None)" not in text and "(default: False)" not in text
    for option, entry in options(text).items():
        if option != "-h":
            assert len(entry.split()) > 2, f"{command} {option} has no help text: {entry!r}"
    assert "checkpoint" in text.split("options:")[0].split("positional arguments:")[1]


def test_a_redirected_run_prints_a_start_up_line_and_plain_progress_lines(tmp_path, capsys):
    pretrain.main([*SMALL, "--epochs", "1", "--log-every", "3", "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out
    assert lines[0].startswith("mae-fast pretrain: --model tiny (0.6M parameters, 16x16 px, 3 channels, ImageNet) "
                               "on cpu (fp32); data the embedded photos (20), 32 crops an epoch; output ")
    assert lines[0].endswith(str(tmp_path / "run"))
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["3/4", "4/4"]  # every 3rd step and the last
    assert re.fullmatch(r"step 3/4 epoch 0 loss \d+\.\d{4} lr \S+ \d+ img/s data wait \d+%", steps[0])
    pretrain.main([*SMALL, "--epochs", "1", "--quiet", "--output-dir", str(tmp_path / "quiet")])
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]


def test_visualize_writes_into_the_run_folder_and_draws_attention(tmp_path, trained, capsys, monkeypatch):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray((torch.rand(20, 30, 3) * 255).byte().numpy()).save(image)
    monkeypatch.chdir(tmp_path)
    assert cli.cmd_visualize([str(trained), str(image)]) == os.path.join(trained, "reconstructions.png")
    calls = []
    from mae_fast.models.official import MaskedAutoencoderViT

    real = MaskedAutoencoderViT.get_attention_maps
    monkeypatch.setattr(MaskedAutoencoderViT, "get_attention_maps",
                        lambda self, imgs, indices=None, **kw: calls.append(indices) or real(self, imgs, indices, **kw))
    picture = cli.cmd_visualize([str(trained), str(image), str(image), "--attention"])
    assert picture == os.path.join(trained, "attention.png") and open(picture, "rb").read(4) == b"\x89PNG"
    assert calls == [[-1]] and "attention maps: " in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("*.png")] == ["img.png"]  # nothing written to the working directory


def test_cls_attention_maps_are_the_last_blocks_cls_row_on_the_grid(trained):
    from mae_fast.train.attention_pictures import cls_attention

    model, _, _, _ = cli.model_from_checkpoint(str(trained))
    imgs = torch.randn(2, 3, 16, 16)
    maps = cls_attention(model, imgs)
    full = model.get_attention_maps(imgs, indices=[-1])[0]
    assert maps.shape == (2, 3, 4, 4)
    torch.testing.assert_close(maps.flatten(2), full[:, :, 0, 1:])


def test_timm_export_loads_by_its_architecture_file(tmp_path, trained):
    timm = pytest.importorskip("timm")
    weights = cli.cmd_export([str(trained), "--to", "timm", "--out", str(tmp_path / "enc.pth")])
    config = json.loads((tmp_path / "enc.json").read_text())
    assert config["exported_by"] == "mae-fast" and config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    vit = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    vit.load_state_dict(read_checkpoint(weights), strict=True)
    model, _, _, _ = cli.model_from_checkpoint(str(trained))
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(imgs), model.forward_features(imgs), rtol=1e-4, atol=1e-4)


def test_hf_export_is_a_folder_that_from_pretrained_loads(tmp_path, trained):
    transformers = pytest.importorskip("transformers")
    folder = cli.cmd_export([str(trained), "--to", "hf", "--out", str(tmp_path / "hf")])
    hf, info = transformers.ViTMAEModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model, _, _, _ = cli.model_from_checkpoint(str(trained))
    assert torch.equal(hf.embeddings.cls_token.detach(), model.cls_token.detach())
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406]
    assert cli.cmd_export([str(trained), "--to", "hf", "--out", str(tmp_path / "hf")]) == folder  # its own export


def test_export_refuses_what_it_must_not_replace_in_one_line(tmp_path, trained, capsys):
    (tmp_path / "enc.json").write_text("{}")  # someone else's file beside new weights
    message = str(pytest.raises(SystemExit, cli.main, ["export", str(trained), "--to", "timm", "--out",
                                                       str(tmp_path / "enc.pth")]).value.code)
    assert message == f"--out: {str(tmp_path / 'enc.json')!r} exists and belongs to no export of mae-fast; " \
                      "expected another --out, or --force to replace it"
    assert not (tmp_path / "enc.pth").exists()
    message = str(pytest.raises(SystemExit, cli.main, ["export", str(trained), "--to", "hf", "--out",
                                                       str(tmp_path / "x.safetensors")]).value.code)
    assert "--to hf writes a folder" in message and "\n" not in message
    (tmp_path / "foreign").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "foreign" / "model.safetensors")
    message = str(pytest.raises(SystemExit, cli.main, ["export", str(trained), "--to", "hf", "--out",
                                                       str(tmp_path / "foreign")]).value.code)
    assert "exists and is no export of mae-fast" in message and not (tmp_path / "foreign" / "config.json").exists()
