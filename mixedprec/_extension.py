"""Loads the compiled libraries and says which kernel backends exist: ``mixedprec._C`` (the
``mixedprec`` torch library: CPU and CUDA kernels) and ``mixedprec._simt`` (the test-only
``mixedprec_simt`` library: the CUDA sources run on host threads).

A missing or broken build is not fatal: the reference backend keeps working, and asking for a
compiled backend raises an error that carries the original import failure.
"""
from __future__ import annotations

import importlib
import os

import torch



def _load(module: str) -> str | None:
    """Imports a compiled module (which registers its torch library); the failure, if any."""
    try:
        importlib.import_module(f"mixedprec.{module}")
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


LOAD_ERROR = _load("_C")
SIMT_LOAD_ERROR = _load("_simt")


def poison_outputs() -> bool:
    """MIXEDPREC_POISON_OUTPUTS=1 (set by the tests): kernels' outputs start as NaN, so an
    element a kernel fails to write cannot pass as correct. The C++ glue reads the same variable."""
    return os.environ.get("MIXEDPREC_POISON_OUTPUTS", "0") == "1"


def loaded(library: str) -> bool:
    """Whether the compiled module behind torch library ``library`` loaded."""
    return (SIMT_LOAD_ERROR if library == "mixedprec_simt" else LOAD_ERROR) is None


def has_kernel(qualified_name: str, dispatch_key: str) -> bool:
    """Whether op ``namespace::name`` exists and has a kernel for ``dispatch_key``."""
    namespace, name = qualified_name.split("::")
    return (loaded(namespace) and hasattr(getattr(torch.ops, namespace), name)
            and torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, dispatch_key))


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Decided once at import, as plain bools, so that torch.compile sees constants.
CPU_BUILT = has_kernel("mixedprec::bit_sharing_quant_fwd", "CPU")
CUDA_BUILT = has_kernel("mixedprec::bit_sharing_quant_fwd", "CUDA")
SIMT_BUILT = has_kernel("mixedprec_simt::bit_sharing_quant_fwd", "CPU")
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
    module, error = ("_simt", SIMT_LOAD_ERROR) if backend == "simt" else ("_C", LOAD_ERROR)
    if error is not None:
        return f"the compiled library mixedprec.{module} failed to load ({error}); rebuild with `pip install -e .`"
    return f"mixedprec.{module} was built without the {backend!r} kernels"
