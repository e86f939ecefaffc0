"""Hypothesis profiles of the fuzz tests (tests/test_fuzz.py).

  ci   (default): few examples, derandomized (the same examples every run), no deadline -- CI stays
                  fast and never flaky.
  dev:            many random examples for local bug hunting: HYPOTHESIS_PROFILE=dev pytest tests/test_fuzz.py

The profile is applied per test with the FUZZ decorator, not loaded globally, so other test modules'
hypothesis settings are left alone.
"""
import os

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
             HealthCheck.filter_too_much]

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=_SUPPRESS)
settings.register_profile("dev", max_examples=150, deadline=None, print_blob=True, suppress_health_check=_SUPPRESS)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings.get_profile(PROFILE if PROFILE in ("ci", "dev") else "ci")


def scaled(factor: float) -> settings:
    """The active profile with factor times its examples (more for the cheap tests, fewer for the
    model forwards)."""
    return settings(FUZZ, max_examples=max(1, int(FUZZ.max_examples * factor)))
