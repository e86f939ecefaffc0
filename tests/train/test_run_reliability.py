"""What a pretraining run guarantees when it is misused: one run per folder, no silent switch of
data, no run that trains nothing or diverges and still exits 0, a non-zero exit when a signal
stops it, fresh metrics for a fresh start, and one-line errors before any work."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from mae_fast import cli
from mae_fast.io.checkpoint import read_checkpoint, save_checkpoint
from mae_fast.models.official import MaskedAutoencoderViT
from mae_fast.train import pretrain
from _torch_support import fp16_cpu_supported

SMALL = ["--model", "tiny", "--img-size", "16", "--batch-size", "8", "--samples-per-epoch", "32", "--quiet",
         "--vis-every", "100", "--epochs", "1"]  # 4 steps an epoch
LOCK_FILE = ".mae-fast-run.lock"


@pytest.fixture(autouse=True)
def _pytorch_fallback_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def run(out, *extra):
    return pretrain.main([*SMALL, "--output-dir", str(out), *extra])


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def child_env():
    return {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}


def images(root, names):
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    for name in names:
        Image.fromarray((torch.rand(24, 24, 3) * 255).byte().numpy()).save(os.path.join(root, name))
    return str(root)


# ----------------------------------------------------------------------------- one run per folder

HOLD_LOCK = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(300)
"""


def test_a_folder_in_use_refuses_a_second_run_and_a_killed_runs_lock_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"--output-dir {out} is in use by another mae-fast pretrain run"):
            run(out, "--resume", "auto")
        assert os.listdir(out) == [LOCK_FILE]  # the refused run touched nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops its lock; the lock file stays behind
        holder.communicate(timeout=60)
    assert os.path.exists(out / LOCK_FILE)
    summary = run(out, "--max-steps", "1", "--resume", "auto")
    assert summary["checkpoint"].endswith("checkpoint-1.pth")
    assert not os.path.exists(out / LOCK_FILE)  # a run removes its lock file as it ends
    # the lock is released on an error too: this process's next run is not refused
    with pytest.raises(SystemExit, match="used --seed 0, this command 1"):
        run(out, "--max-steps", "2", "--resume", "auto", "--seed", "1")
    assert run(out, "--max-steps", "2", "--resume", "auto")["checkpoint"].endswith("checkpoint-2.pth")


def test_two_runs_started_together_on_one_folder_one_is_refused(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mae_fast.pretrain", *SMALL, "--output-dir", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    refused = next(err for code, err in results if code)
    assert f"--output-dir {out} is in use by another mae-fast pretrain run" in refused
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]  # the one run's steps, once each
    assert [os.path.basename(p) for p in pretrain.checkpoints_in(str(out))] == ["checkpoint-4.pth"]


# ----------------------------------------------------------------------------- refused before any work

def test_accum_iter_longer_than_an_epoch_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--accum-iter 4 is more than the 2 steps of an epoch .*--samples-per-epoch"):
        pretrain.main([*SMALL, "--samples-per-epoch", "16", "--accum-iter", "4", "--output-dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("ratio,what", [("0.999", "keeps 0 of 16 patches"), ("1e-17", "keeps 16 of 16 patches")])
def test_a_mask_ratio_that_keeps_no_patch_or_removes_none_is_refused_before_the_folder_exists(tmp_path, capsys, ratio,
                                                                                               what):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run(out, "--mask-ratio", ratio)
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"--mask-ratio {ratio}" in err and what in err and "Traceback" not in err


def test_a_data_folder_of_unreadable_files_is_one_error(tmp_path):
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    for name in ("x.png", "y.jpg"):
        (data / name).write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped unreadable image file"):
        with pytest.raises(SystemExit, match=r"--data .*: none of the 2 image files can be read"):
            run(tmp_path / "run", "--data", str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "run")


def _rewrite_args(path, **changes):
    ckpt = read_checkpoint(path)
    ckpt["args"] = changes.pop("args") if "args" in changes else {**ckpt["args"], **changes}
    os.remove(path)
    save_checkpoint(path, ckpt)


def test_a_checkpoint_naming_an_unknown_preset_or_odd_args_is_one_error(tmp_path):
    out = tmp_path / "run"
    path = run(out, "--max-steps", "1")["checkpoint"]
    args = read_checkpoint(path)["args"]
    _rewrite_args(path, args=["--model", "tiny"])
    with pytest.raises(SystemExit, match="holds args of type list"):
        run(out, "--resume", "auto")
    _rewrite_args(path, args={**args, "model": "gigantic"})
    with pytest.raises(SystemExit, match="names --model 'gigantic', which is not a preset"):
        run(out, "--resume", "auto")


# ----------------------------------------------------------------------------- resume

def test_resume_refuses_other_data_and_accepts_the_same_folder_moved(tmp_path):
    a = images(tmp_path / "a" / "cls", ["1.png", "2.png", "3.png"])
    b = images(tmp_path / "b" / "cls", ["1.png", "2.png", "4.png"])
    out = tmp_path / "run"
    run(out, "--data", os.path.dirname(a), "--max-steps", "1")
    with pytest.raises(SystemExit, match=r"trained on --data .*/a \(3 files, names sha256 \w+\), "
                                         r"this command on --data .*/b \(3 files, names sha256 \w+\)"):
        run(out, "--data", os.path.dirname(b), "--resume", "auto")
    with pytest.raises(SystemExit, match=r"this command on --data \(the embedded sample photos\)"):
        run(out, "--resume", "auto")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "a", moved)
    summary = run(out, "--data", str(moved), "--resume", "auto", "--max-steps", "2")
    assert summary["checkpoint"].endswith("checkpoint-2.pth")
    assert read_checkpoint(summary["checkpoint"])["args"]["data_source"]["files"] == 3


def test_resume_auto_without_a_checkpoint_starts_fresh_metrics(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "metrics.jsonl", "w") as f:  # a run killed before its first checkpoint
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "epoch": 0, "loss": 9.0}) + "\n")
    run(out, "--resume", "auto", "--max-steps", "2")
    assert [r["step"] for r in rows(out)] == [1, 2] and 9.0 not in [r["loss"] for r in rows(out)]


def test_resume_at_max_steps_runs_no_step(tmp_path, capsys):
    out = tmp_path / "run"
    first = run(out, "--max-steps", "2")
    capsys.readouterr()
    again = run(out, "--max-steps", "2", "--resume", "auto")
    assert "--max-steps 2: the run is at step 2 already" in capsys.readouterr().out
    assert [r["step"] for r in rows(out)] == [1, 2]
    assert pretrain.checkpoints_in(str(out)) == [first["checkpoint"]] == [again["checkpoint"]]
    assert again["final_loss"] == first["final_loss"]


# ----------------------------------------------------------------------------- divergence

@pytest.mark.skipif(not fp16_cpu_supported(), reason="this torch has no fp16 autocast/GradScaler on CPU")
def test_fp16_run_whose_steps_are_all_skipped_stops_non_zero(tmp_path, capsys):
    """--lr 1e8 wrecks the weights at the first step; every later step is non-finite and skipped."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        pretrain.main([*SMALL, "--batch-size", "2", "--samples-per-epoch", "40", "--precision", "fp16", "--lr", "1e8",
                       "--warmup-epochs", "0", "--output-dir", str(out)])
    message = str(e.value.code)  # a message: exit status 1
    assert f"{pretrain.MAX_SKIPPED_IN_A_ROW} optimizer steps in a row skipped" in message
    assert f"{pretrain.MAX_SKIPPED_IN_A_ROW} skipped in this run" in message
    assert "No checkpoint has been saved" in message and "is kept" not in message
    assert len(rows(out)) == pretrain.MAX_SKIPPED_IN_A_ROW + 1  # stopped there, not at the epoch's end
    assert "final loss" not in capsys.readouterr().out


def test_nan_loss_before_any_checkpoint_says_none_is_kept(tmp_path, monkeypatch):
    original = MaskedAutoencoderViT.forward

    def poisoned(self, *args, **kwargs):
        loss, pred, mask = original(self, *args, **kwargs)
        return loss * float("nan"), pred, mask

    monkeypatch.setattr(MaskedAutoencoderViT, "forward", poisoned)
    with pytest.raises(SystemExit, match="loss is nan at step .*No checkpoint has been saved") as e:
        run(tmp_path / "run")
    assert "is kept" not in str(e.value.code)


# ----------------------------------------------------------------------------- signals

def _signal_at_call(monkeypatch, sig, call):
    original = MaskedAutoencoderViT.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), sig)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MaskedAutoencoderViT, "forward", forward)


@pytest.mark.parametrize("sig,entry", [(signal.SIGTERM, "main"), (signal.SIGINT, "cli")])
def test_a_signal_saves_then_exits_128_plus_its_number(tmp_path, monkeypatch, capsys, sig, entry):
    out = tmp_path / "run"
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    _signal_at_call(monkeypatch, sig, 2)
    argv = [*SMALL, "--epochs", "5", "--output-dir", str(out)]
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv) if entry == "main" else cli.main(["pretrain", *argv])
    assert e.value.code == 128 + sig  # 143 for SIGTERM, 130 for SIGINT
    assert f"interrupted ({sig.name}): checkpoint saved" in capsys.readouterr().out
    assert [os.path.basename(p) for p in pretrain.checkpoints_in(str(out))] == ["checkpoint-2.pth"]
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # restored
    assert not os.path.exists(out / LOCK_FILE)

