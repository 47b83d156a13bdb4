"""Loads the compiled library ``mixedprec._C`` and says which kernel backends exist.

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


def _has_kernel(op_name: str, dispatch_key: str) -> bool:
    if LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mixedprec::{op_name}", dispatch_key)


def cpu_built() -> bool:
    return _has_kernel("bit_sharing_quant_fwd", "CPU")


def cuda_built() -> bool:
    return _has_kernel("bit_sharing_quant_fwd", "CUDA")


def simt_built() -> bool:
    return _has_kernel("simt_bit_sharing_quant_fwd", "CPU")


def triton_interpreted() -> bool:
    """Triton kernels run on CPU tensors only under its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return not triton_interpreted()
    return device.type == "cpu" and triton_interpreted()


def missing_reason(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot run on ``device`` (for error messages)."""
    if backend in ("cpu", "simt") and device.type != "cpu":
        return f"backend {backend!r} runs on CPU tensors, got a tensor on {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, got a tensor on {device}"
    if backend == "triton":
        return ("backend 'triton' needs triton and a CUDA tensor, or a CPU tensor with "
                f"TRITON_INTERPRET=1 set before mixedprec is imported (got a tensor on {device})")
    if LOAD_ERROR is not None:
        return f"the compiled library mixedprec._C failed to load ({LOAD_ERROR}); rebuild with `pip install -e .`"
    return f"mixedprec._C was built without the {backend!r} kernels"
