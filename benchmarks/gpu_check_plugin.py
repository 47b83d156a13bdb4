"""pytest plugin that benchmarks/gpu_check.py loads into its test runs (-p benchmarks.gpu_check_plugin):
the property tests run a fifth of the examples of the hypothesis profile tests/conftest.py loaded.
On a GPU every new shape, bitwidth or geometry compiles Triton kernels, seconds each, so the ci
profile's counts would not fit gpu_check's 8 minutes; the tests scale their counts from the
loaded profile (tests/conftest.py: examples)."""
from __future__ import annotations

from hypothesis import settings

PROFILE = "gpu_check"
FRACTION = 5


def pytest_sessionstart(session) -> None:
    # after tests/conftest.py has loaded its profile, before the test modules are collected
    settings.register_profile(PROFILE, parent=settings.default, max_examples=max(1, settings.default.max_examples // FRACTION))
    settings.load_profile(PROFILE)
