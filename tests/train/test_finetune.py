"""`mae-fast finetune` and `mae-fast linprobe` on a tiny ImageFolder tree: a real run, exact resume,
the frozen encoder of the probe, and bad input refused in one line before anything is written."""
import json
import os

import numpy as np
import pytest
import torch

from mae_fast import cli
from mae_fast.io.checkpoint import read_checkpoint, save_checkpoint
from mae_fast.models.presets import build_model

pytest.importorskip("torchvision")
pytest.importorskip("timm")


@pytest.fixture(autouse=True)
def _pytorch_fallback_ops(monkeypatch):
    """The CLI is under test, not the kernels: CPU ops take their PyTorch fallback."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny pretraining checkpoint at 16 px, as mae-fast pretrain writes it."""
    path = tmp_path_factory.mktemp("pretrain") / "checkpoint-3.pth"
    torch.manual_seed(0)
    save_checkpoint(path, {"model": build_model("tiny", 16).state_dict(), "args": {"model": "tiny", "img_size": 16}})
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ and val/ with two classes of four 20x20 pictures each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            os.makedirs(root / split / cls)
            for i in range(4):
                pixels = rng.integers(0, 128, (20, 20, 3)) + 120 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / cls / f"{i}.png")
    return str(root)


def finetune(pretrained, folder, out, *extra):
    return cli_run("finetune", pretrained, "--data", folder, "--batch-size", "4", "--epochs", "2",
                   "--warmup-epochs", "1", "--quiet", "--output-dir", str(out), *extra)


def cli_run(*argv):
    from mae_fast.train import finetune as ft, linprobe as lp

    return {"finetune": ft.main, "linprobe": lp.main}[argv[0]](list(argv[1:]))


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_finetune_runs_evaluates_and_resumes_bitwise(pretrained, folder, tmp_path):
    whole = finetune(pretrained, folder, tmp_path / "whole")["data"]
    assert sorted(os.listdir(whole["output_dir"])) == ["checkpoint-4.pth", "checkpoint-best.pth", "curves.png",
                                                       "metrics.jsonl"]
    evals = [r for r in rows(whole["output_dir"]) if "acc1" in r]
    assert [e["epoch"] for e in evals] == [0, 1] and all(0 <= e["acc1"] <= e["acc5"] == 100 for e in evals)
    assert whole["last"] == evals[-1] and whole["best"] == max(e["acc1"] for e in evals)

    part = tmp_path / "part"
    finetune(pretrained, folder, part, "--max-steps", "1")  # stops mid-epoch
    assert os.listdir(part) and "checkpoint-1.pth" in os.listdir(part)
    finetune(pretrained, folder, part, "--resume", "auto")
    a, b = read_checkpoint(whole["checkpoint"]), read_checkpoint(os.path.join(part, "checkpoint-4.pth"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert [r["loss"] for r in rows(whole["output_dir"]) if "loss" in r] == \
        [r["loss"] for r in rows(part) if "loss" in r]


def test_finetune_groups_carry_layer_decay(pretrained, folder, tmp_path):
    out = finetune(pretrained, folder, tmp_path / "ld", "--epochs", "1", "--layer-decay", "0.5")["data"]
    groups = read_checkpoint(out["checkpoint"])["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == [0.5 ** k for k in range(5, -1, -1)]
    assert all(g["lr"] == pytest.approx(groups[0]["lr"] / groups[0]["lr_scale"] * g["lr_scale"]) for g in groups)


def test_linprobe_trains_the_head_only(pretrained, folder, tmp_path):
    out = cli_run("linprobe", pretrained, "--data", folder, "--batch-size", "4", "--epochs", "1", "--quiet",
                  "--output-dir", str(tmp_path / "lp"))["data"]
    sd = read_checkpoint(out["checkpoint"])["model"]
    src = read_checkpoint(pretrained)["model"]
    for k in ("blocks.0.attn.qkv.weight", "norm.weight", "pos_embed", "cls_token"):
        assert torch.equal(sd[k], src[k]), k  # frozen
    assert {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"} <= set(sd)
    assert "head.0.weight" not in sd  # BatchNorm without affine parameters
    assert sd["head.0.running_mean"].abs().sum() > 0 and 0 < sd["head.1.weight"].std() < 0.05


def test_the_cli_dispatches_both_commands(pretrained, folder, tmp_path, capsys):
    assert cli.main(["finetune", pretrained, "--data", folder, "--batch-size", "4", "--epochs", "1", "--quiet",
                     "--output-dir", str(tmp_path / "c"), "--mixup", "0", "--cutmix", "0", "--aa", "none"]) == 0
    assert "finetune: top-1" in capsys.readouterr().out
    assert "linprobe" in cli.USAGE and "finetune" in cli.USAGE


def bad_inputs(tmp_path, pretrained, folder):
    other = tmp_path / "vit-pytorch.pth"
    from mae_fast import ViT

    save_checkpoint(other, {"model": ViT(image_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2,
                                         mlp_dim=64).state_dict()})
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        os.makedirs(empty / split)
    return [
        (["--nb-classes", "1", "--data", folder], "--nb-classes must be >= 2, got 1"),
        (["--nb-classes", "1"], "--nb-classes must be >= 2, got 1"),
        (["--data", folder, "--nb-classes", "1"], "--nb-classes must be >= 2"),
        (["--data", str(empty)], "expected one sub-folder of images per class"),
        (["--data", str(tmp_path)], "expected train/ inside it"),
        (["--data", folder, "--input-size", "18"], "--input-size must be a multiple of the patch size 4"),
        (["--data", folder, "--batch-size", "3"], "--batch-size must be even with mixup"),
    ], other


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_bad_input_is_one_line_and_writes_nothing(pretrained, folder, tmp_path, command):
    cases, other = bad_inputs(tmp_path, pretrained, folder)
    cases = [(str(other), ["--data", folder], "holds no ViT encoder of the official / timm layout")] + \
        [(pretrained, flags, msg) for flags, msg in cases if command == "finetune" or "mixup" not in msg]
    for source, flags, msg in cases:
        out = tmp_path / "never"
        with pytest.raises(SystemExit) as e:
            cli_run(command, source, *flags, "--quiet", "--output-dir", str(out))
        assert msg in str(e.value.code) and "\n" not in str(e.value.code), (flags, e.value.code)
        assert not out.exists(), flags


def test_the_embedded_default_trains_pretrained_beside_random_init(pretrained, tmp_path):
    pytest.importorskip("sklearn")
    out = cli_run("finetune", pretrained, "--batch-size", "8", "--max-steps", "2", "--quiet",
                  "--output-dir", str(tmp_path / "digits"))
    assert set(out) == {"pretrained", "random-init"}
    a, b = (read_checkpoint(out[k]["checkpoint"])["model"] for k in ("pretrained", "random-init"))
    src = read_checkpoint(pretrained)["model"]
    # both start from the same recipe; only the pretrained one starts from the checkpoint's blocks
    assert (a["blocks.0.mlp.fc1.weight"] - src["blocks.0.mlp.fc1.weight"]).abs().max() < 0.05
    assert (b["blocks.0.mlp.fc1.weight"] - src["blocks.0.mlp.fc1.weight"]).abs().max() > 0.05
    assert os.path.basename(out["pretrained"]["checkpoint"]) == "checkpoint-2.pth"
