"""The suite's own guards (tests/conftest.py): a backend that should run on this machine and
cannot fails its tests instead of skipping them; kernel outputs are NaN-poisoned in the session."""
from __future__ import annotations

import pytest
import torch

import conftest
from conftest import require_backend
from mixedprec import _extension


def test_outputs_are_poisoned_in_this_session(monkeypatch):
    assert _extension.poison_outputs()  # what the Triton launchers read; the C++ glue reads the same variable
    monkeypatch.setenv("MIXEDPREC_POISON_OUTPUTS", "0")
    with pytest.raises(pytest.UsageError, match="MIXEDPREC_POISON_OUTPUTS='0'"):
        conftest.pytest_sessionstart(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible to torch here")
def test_cuda_fails_where_a_gpu_is_present_but_not_visible_to_torch(monkeypatch):
    monkeypatch.setattr(conftest, "gpu_hardware", lambda: "/dev/nvidia0")
    with pytest.raises(pytest.fail.Exception, match=r"has a GPU \(/dev/nvidia0\) but torch.cuda.is_available"):
        require_backend("cuda")
    monkeypatch.setattr(conftest, "gpu_hardware", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="no GPU on this machine"):
        require_backend("cuda")


@pytest.mark.skipif(not _extension.TRITON_IMPORTABLE, reason="triton is not installed")
def test_triton_fails_where_interpret_is_set_against_the_machine(monkeypatch):
    """TRITON_INTERPRET=0 on a machine without a GPU (or 1 on one with a GPU) would leave no
    device for the Triton kernels; it was a silent skip of every Triton case."""
    monkeypatch.setattr(_extension, "TRITON_INTERPRETED", torch.cuda.is_available())
    with pytest.raises(pytest.fail.Exception, match="backend 'triton' must run here"):
        require_backend("triton")
    monkeypatch.setattr(_extension, "TRITON_IMPORTABLE", False)
    with pytest.raises(pytest.skip.Exception, match="triton is not installed"):
        require_backend("triton")


def test_compiled_backends_fail_where_the_build_lacks_them(monkeypatch):
    monkeypatch.setattr(_extension, "CPU_BUILT", False)
    with pytest.raises(pytest.fail.Exception, match="backend 'cpu' must run here"):
        require_backend("cpu")
    with pytest.raises(pytest.fail.Exception, match="backend 'simt' has no kernel for this op in this build"):
        require_backend("simt", {"simt": False})
