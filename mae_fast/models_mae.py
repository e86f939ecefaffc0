"""The official-API model under its old module path (mae_fast.models.official)."""
from .models.official import *  # noqa: F401,F403
