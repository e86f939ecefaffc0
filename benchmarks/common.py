"""What every benchmark suite reads the same way: the device, and the CPU compile switch."""
import os

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# torch.compile on a small CPU costs seconds per graph: the op suites compile their baselines there
# only with MAE_FAST_BENCH_COMPILE_ALL=1 (the patchify/loss suite still compiles one case)
CPU_COMPILE_ALL = os.environ.get("MAE_FAST_BENCH_COMPILE_ALL") == "1"


def device_name() -> str:
    """The GPU's name, or "CPU" (titles and extra_info; the results file's device column is
    conftest.device_label())."""
    return torch.cuda.get_device_name() if CUDA else "CPU"
