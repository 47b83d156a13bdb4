"""Loads the compiled libraries ``mixedprec._C`` (the kernel ops, namespace ``mixedprec``) and,
test-only, ``mixedprec._simt`` (the CUDA sources under SIMT emulation, namespace
``mixedprec_simt``), and says which kernel backends exist.

A missing or broken build is not fatal: the reference backend keeps working, and asking for a
compiled backend raises an error that carries the original import failure.
"""
from __future__ import annotations

import os

import torch

try:
    from mixedprec import _C  # noqa: F401  (registers torch.ops.mixedprec.*)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

try:
    from mixedprec import _simt  # noqa: F401  (registers torch.ops.mixedprec_simt.*)

    SIMT_LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    SIMT_LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def poison_outputs() -> bool:
    """MIXEDPREC_POISON_OUTPUTS=1 (set by the tests): kernels' outputs start as NaN, so an
    element a kernel fails to write cannot pass as correct. The C++ glue reads the same variable."""
    return os.environ.get("MIXEDPREC_POISON_OUTPUTS", "0") == "1"


def _has_kernel(op_name: str, dispatch_key: str, namespace: str = "mixedprec") -> bool:
    if (SIMT_LOAD_ERROR if namespace == "mixedprec_simt" else LOAD_ERROR) is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{op_name}", dispatch_key)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Decided once at import, as plain bools, so that torch.compile sees constants.
CPU_BUILT = _has_kernel("bit_sharing_quant_fwd", "CPU")
CUDA_BUILT = _has_kernel("bit_sharing_quant_fwd", "CUDA")
SIMT_BUILT = _has_kernel("bit_sharing_quant_fwd", "CPU", namespace="mixedprec_simt")
TRITON_IMPORTABLE = _triton_importable()
# Triton kernels run on CPU tensors only under its interpreter, which must be chosen before
# the kernels are defined (TRITON_INTERPRET=1 before mixedprec is imported).
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    if not TRITON_IMPORTABLE:
        return False
    if device.type == "cuda":
        return not TRITON_INTERPRETED
    return device.type == "cpu" and TRITON_INTERPRETED


def missing_reason(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot run on ``device`` (for error messages)."""
    if backend in ("cpu", "simt") and device.type != "cpu":
        return f"backend {backend!r} runs on CPU tensors, got a tensor on {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, got a tensor on {device}"
    if backend == "triton":
        return ("backend 'triton' needs triton and a CUDA tensor, or a CPU tensor with "
                f"TRITON_INTERPRET=1 set before mixedprec is imported (got a tensor on {device})")
    if backend == "simt" and SIMT_LOAD_ERROR is not None:
        return (f"the test-only library mixedprec._simt failed to load ({SIMT_LOAD_ERROR}); rebuild with "
                "`pip install -e .`")
    if LOAD_ERROR is not None:
        return f"the compiled library mixedprec._C failed to load ({LOAD_ERROR}); rebuild with `pip install -e .`"
    return f"mixedprec._C was built without the {backend!r} kernels"
