"""What the installed torch supports on this machine, for tests that need it."""
import torch


def fp16_cpu_supported() -> bool:
    """Whether fp16 autocast and a GradScaler run on the CPU (the fp16 training tests need both)."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        torch.amp.GradScaler("cpu")
        return True
    except (RuntimeError, TypeError, ValueError):
        return False
