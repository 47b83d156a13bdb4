"""Test-suite setup: poisoned kernel outputs, Triton's interpreter on CPU-only machines, the
list of backends that can run here (a backend that was not built is skipped with the reason),
and the hypothesis profiles of the property tests."""
import os

os.environ.setdefault("MIXEDPREC_POISON_OUTPUTS", "1")  # read by the C++ glue and the Triton launchers
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton kernels are defined
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from mixedprec import _extension, ops  # noqa: E402

KERNEL_BACKENDS = ("cpu", "simt", "triton", "cuda")
# Property tests give these fewer and smaller examples: the CUDA sources under SIMT emulation,
# and Triton's interpreter where there is no GPU. The others run at native speed.
EMULATED_BACKENDS = ("simt",) if torch.cuda.is_available() else ("simt", "triton")
NATIVE_BACKENDS = tuple(b for b in ("reference",) + KERNEL_BACKENDS if b not in EMULATED_BACKENDS)

# "ci" (the default): the same examples on every run (derandomized, no example database), sized so
# that tests/test_properties.py takes half a minute on an idle 2-core machine (two on a busy one).
# HYPOTHESIS_PROFILE=long: ten times as many examples, freshly random on each run, failures
# remembered in .hypothesis/.
_PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, print_blob=True, **_PROFILE)
settings.register_profile("long", max_examples=1000, **_PROFILE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(ci_count: int) -> int:
    """A property test's example count: ``ci_count`` under the ci profile, scaled with the profile."""
    return max(1, ci_count * settings.default.max_examples // 100)


def backend_device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu")


def require_backend(backend: str) -> torch.device:
    """The device to test ``backend`` on; skips with the reason when it cannot run here."""
    device = backend_device(backend)
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("backend 'cuda' needs a GPU")
    if backend not in ops.available_backends(device):
        pytest.skip(_extension.missing_reason(backend, device))
    return device


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """(backend, device) for every kernel backend that can run on this machine."""
    return request.param, require_backend(request.param)
