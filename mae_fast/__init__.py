"""mae_fast: fast Masked Autoencoder pretraining on NVIDIA GPUs.

Importing this package never initialises CUDA and never fails for want of the compiled
extension or of Triton; `python -m mae_fast.info` says what is available.
"""
from . import _ext, ops, reference

__version__ = "0.1.0"
__all__ = ["ops", "reference", "__version__"]
