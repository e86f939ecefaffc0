"""probe, visualize, export: what export may overwrite, which file visualize writes, and one-line
errors (a SystemExit with a one-line message, which Python prints without a traceback)."""
import shutil

import pytest
import torch

from mae_fast import cli
from mae_fast.io.checkpoint import read_checkpoint, save_checkpoint
from mae_fast.models.presets import build_model
from mae_fast.train import pretrain

SMALL = ["--model", "tiny", "--img-size", "16", "--batch-size", "8", "--samples-per-epoch", "32", "--quiet",
         "--vis-every", "100"]


@pytest.fixture(autouse=True)
def _pytorch_fallback_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def fail(argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


def image(tmp_path, name="img.png"):
    from PIL import Image

    path = tmp_path / name
    Image.fromarray((torch.rand(20, 30, 3) * 255).byte().numpy()).save(path)
    return str(path)


# ----------------------------------------------------------------------------- export

def test_export_never_replaces_a_training_checkpoint(tmp_path, trained):
    run = shutil.copytree(trained, tmp_path / "run")
    ckpt = run / "checkpoint-4.pth"
    before = ckpt.read_bytes()
    for force in ([], ["--force"]):
        message = fail(["export", str(run), "--to", "timm", "--out", str(ckpt), *force])
        assert message.startswith(f"--out '{ckpt}'") and "training checkpoint" in message
    official = tmp_path / "official.pth"  # a training checkpoint by its contents, under another name
    shutil.copy(ckpt, official)
    message = fail(["export", str(run), "--to", "timm", "--out", str(official), "--force"])
    assert "is a training checkpoint; expected another path" in message
    message = fail(["export", str(run), "--to", "timm", "--out", str(run / "checkpoint-99.pth")])
    assert "named like a training checkpoint" in message  # --resume auto would pick it up
    assert ckpt.read_bytes() == before and official.read_bytes() == before
    assert not (run / "checkpoint-99.pth").exists()
    summary = pretrain.main([*SMALL, "--epochs", "2", "--resume", "auto", "--output-dir", str(run)])
    assert summary["checkpoint"] == str(run / "checkpoint-8.pth")


def test_export_replaces_its_own_exports_and_other_files_only_with_force(tmp_path, trained):
    run = shutil.copytree(trained, tmp_path / "run")
    assert cli.cmd_export([str(run), "--to", "timm"]) == cli.cmd_export([str(run), "--to", "timm"])
    for name in ("enc.pth", "enc.safetensors"):
        out = str(tmp_path / name)
        cli.cmd_export([str(run), "--to", "timm", "--out", out])
        cli.cmd_export([str(run), "--to", "timm", "--out", out])  # over an export of ours
        assert "cls_token" in read_checkpoint(out)
    folder = tmp_path / "hf"
    for _ in range(2):
        cli.cmd_export([str(run), "--to", "hf", "--out", str(folder)])
        assert "embeddings.cls_token" in read_checkpoint(folder / "model.safetensors")
    foreign = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, foreign)
    message = fail(["export", str(run), "--to", "timm", "--out", str(foreign)])
    assert "exists and is no export of mae-fast; expected a new path, or --force" in message
    assert set(torch.load(foreign, weights_only=True)) == {"w"}
    cli.cmd_export([str(run), "--to", "timm", "--out", str(foreign), "--force"])
    assert "cls_token" in read_checkpoint(foreign)


def test_export_out_must_name_a_file_in_an_existing_directory(tmp_path, trained):
    message = fail(["export", trained, "--to", "timm", "--out", str(tmp_path)])
    assert message == (f"--out '{tmp_path}' is a directory; expected a file path such as "
                       f"{tmp_path / 'encoder.pth'}")
    message = fail(["export", trained, "--to", "timm", "--out", str(tmp_path / "no" / "enc.pth")])
    assert message.startswith(f"--out '{tmp_path / 'no' / 'enc.pth'}': the directory") and "does not exist" in message


# ----------------------------------------------------------------------------- visualize

def test_visualize_reports_the_file_it_writes(tmp_path, trained, capsys):
    written = cli.cmd_visualize([trained, image(tmp_path), "--out", str(tmp_path / "visx")])
    assert written == str(tmp_path / "visx.png")
    assert open(written, "rb").read(4) == b"\x89PNG"
    assert capsys.readouterr().out.strip() == f"reconstructions: {written}"


def test_visualize_checks_out_and_mask_ratio_before_any_work(tmp_path, trained):
    unreadable = tmp_path / "broken.png"  # read last: each error below comes first
    unreadable.write_bytes(b"not an image")
    message = fail(["visualize", trained, str(unreadable), "--out", str(tmp_path / "x.txt")])
    assert message.startswith(f"--out '{tmp_path / 'x.txt'}': matplotlib cannot write '.txt' pictures; "
                              "expected a name ending in ") and ".png" in message
    message = fail(["visualize", trained, str(unreadable), "--out", str(tmp_path)])
    assert message.startswith(f"--out '{tmp_path}' is a directory; expected a picture file")
    message = fail(["visualize", trained, str(unreadable), "--mask-ratio", "0.999"])
    assert message == ("--mask-ratio 0.999: mask_ratio 0.999 keeps 0 of 16 patches; at least one patch must stay "
                       "visible and one be removed")
    assert not list(tmp_path.glob("x*")) and not (tmp_path / "reconstructions.png").exists()


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("command", ["probe", "visualize", "export"])
def test_a_checkpoint_whose_args_name_no_model_is_refused_in_one_line(tmp_path, command):
    path = tmp_path / "ckpt.pth"
    argv = {"probe": ["probe", str(path)],
            "visualize": ["visualize", str(path), image(tmp_path), "--out", str(tmp_path / "v.png")],
            "export": ["export", str(path), "--to", "timm", "--out", str(tmp_path / "enc.pth")]}[command]
    save_checkpoint(path, {"model": build_model("tiny", 16).state_dict(), "args": {"model": "gigantic"}})
    message = fail(argv)
    assert message.startswith(f"{path}: its args name the model 'gigantic'; expected one of tiny, ")
    save_checkpoint(path, {"model": build_model("tiny", 16).state_dict(), "args": {"model": "tiny", "img_size": 18}})
    message = fail(argv)
    assert message.startswith(f"{path}: does not fit the model its args describe (--model tiny): ")
