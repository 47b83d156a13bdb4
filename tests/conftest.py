"""Test-suite setup: poisoned kernel outputs, Triton's interpreter on CPU-only machines, and the
list of backends that can run here (a backend that was not built is skipped with the reason)."""
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

from mixedprec import _extension, ops  # noqa: E402

KERNEL_BACKENDS = ("cpu", "simt", "triton", "cuda")


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
