import pytest

from mae_fast.train import pretrain


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run of the tiny model on 16 px crops (4 steps: checkpoint-4.pth), made
    once per test module with the PyTorch fallback ops; tests that write into it copy it."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        pretrain.main(["--model", "tiny", "--img-size", "16", "--batch-size", "8", "--samples-per-epoch", "32",
                       "--vis-every", "100", "--num-workers", "0", "--quiet", "--epochs", "1",
                       "--output-dir", str(out)])
    return str(out)
