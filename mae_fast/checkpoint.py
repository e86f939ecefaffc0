"""Checkpoint loading and saving under its old module path (mae_fast.io.checkpoint)."""
from .io.checkpoint import *  # noqa: F401,F403
