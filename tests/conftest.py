import os
import sys

import pytest
import torch

# Without a GPU, CPU tensors run the very Triton kernels under the interpreter. It must be set
# before mae_fast (and so triton.jit) is imported; on a GPU machine the compiled kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton fixes its builtins (tl.sum, ...) as interpreted or compiled when first imported; import
    # it now, so a test that runs with TRITON_INTERPRET=0 cannot leave it compiled for later tests.
    try:
        import mae_fast.kernels.masked_mse_loss  # noqa: F401
        import mae_fast.kernels.patchify  # noqa: F401
    except ImportError:  # no Triton: the ops run their PyTorch fallbacks
        pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_run.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Each test starts seeded and leaves the process as it found it: the thread count (which
    changes CPU reduction orders, so bitwise comparisons with a subprocess) and torch.compile's
    caches (a test compiling the same forward as earlier ones must not hit the recompile limit)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
