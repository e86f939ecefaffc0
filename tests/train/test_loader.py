"""The trainer's loader: --num-workers default, the data-wait share and its one warning, the same
run with and without workers, workers that leave Ctrl-C to the main process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mae_fast.models.official import MaskedAutoencoderViT
from mae_fast.train import loader, pretrain

SMALL = ["--model", "tiny", "--img-size", "16", "--batch-size", "8", "--samples-per-epoch", "32", "--quiet",
         "--vis-every", "100"]


@pytest.fixture(autouse=True)
def _pytorch_fallback_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the loader is under test, not the kernels


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_num_workers_defaults_to_the_cpus_per_local_process(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    assert pretrain.parse_args(SMALL).num_workers == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader.default_num_workers() == max(1, cpus // 2)
    assert pretrain.parse_args([*SMALL, "--num-workers", "0"]).num_workers == 0


def test_data_wait_warns_once_after_warm_up_when_over_the_threshold():
    wait = loader.DataWait(warmup=2, window=3, threshold=0.2)
    fired = []
    for _ in range(10):
        wait.add(0.5, 1.0)
        fired.append(wait.bottleneck())
    assert fired == [False] * 4 + [True] + [False] * 5  # once, at the first full window after warm-up
    assert wait.share == pytest.approx(0.5)
    calm = loader.DataWait(warmup=2, window=3, threshold=0.2)
    for _ in range(10):
        calm.add(0.1, 1.0)
        assert not calm.bottleneck()


class Sleepy(torch.utils.data.Dataset):
    """A dataset that takes `delay` seconds an item, or returns cached items at once."""

    def __init__(self, inner, delay):
        self.inner, self.delay, self.crops, self.cache = inner, delay, inner.crops, {}

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, key):
        time.sleep(self.delay)
        if key not in self.cache:
            self.cache[key] = self.inner[key]
        return self.cache[key]


@pytest.mark.parametrize("delay", [0.05, 0.0])
def test_a_slow_loader_gets_one_warning_naming_the_fix(tmp_path, monkeypatch, capsys, delay):
    build = pretrain.build_dataset
    monkeypatch.setattr(pretrain, "build_dataset", lambda *a: Sleepy(build(*a), delay))
    monkeypatch.setattr(pretrain, "DataWait", lambda: loader.DataWait(warmup=2, window=4))
    if delay == 0:  # a warm cache (filled in a first epoch, measured apart) and a step that takes its time
        monkeypatch.setattr(pretrain, "DataWait", lambda: loader.DataWait(warmup=4, window=4))
        forward = MaskedAutoencoderViT.forward

        def slow_forward(self, *args, **kwargs):
            time.sleep(0.05)
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(MaskedAutoencoderViT, "forward", slow_forward)
    pretrain.main([*SMALL, "--epochs", "3", "--num-workers", "0", "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    warnings = out.count("the data loader is the bottleneck")
    assert warnings == (1 if delay else 0), out
    if delay:
        assert "--num-workers" in out and "--data-backend gpu" in out
    shares = [r["data_wait"] for r in rows(tmp_path / "run")]
    assert len(shares) == 12 and all(0 <= s <= 1 for s in shares)


def test_workers_change_no_loss(tmp_path):
    pretrain.main([*SMALL, "--epochs", "2", "--num-workers", "0", "--output-dir", str(tmp_path / "w0")])
    pretrain.main([*SMALL, "--epochs", "2", "--num-workers", "2", "--output-dir", str(tmp_path / "w2")])
    assert [r["loss"] for r in rows(tmp_path / "w0")] == [r["loss"] for r in rows(tmp_path / "w2")]


def test_ctrl_c_to_the_process_group_saves_a_checkpoint_with_workers_running(tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "mae_fast.pretrain", *SMALL, "--epochs", "50", "--num-workers", "2",
           "--accum-iter", "2", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the workers get it too
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "interrupted (SIGINT): checkpoint saved" in stdout
    assert pretrain.checkpoints_in(str(out))
