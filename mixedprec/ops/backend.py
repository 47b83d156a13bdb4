"""Which implementation runs an op: one mechanism for every op and every layer.

By default an op runs the compiled kernels registered for its tensors' device (the ``mixedprec``
torch library: C++ CPU kernels, CUDA kernels), else the Triton kernels on CUDA tensors, else the
reference. Tests and benchmarks choose another with the per-call ``backend=`` argument of each op,
or for everything in a block (SBS and OPQ layers, packed layers, whole models) with
``use_backend``; the per-call argument wins.

Each kernel family is a torch library with the same op names and schemas, so that an op's choice
is a different op to call (traceable by ``torch.compile``), never a string inside a schema:

    Backend.CPU, Backend.CUDA   torch.ops.mixedprec.*         dispatched by the tensors' device
    Backend.TRITON              torch.ops.mixedprec_triton.*  mixedprec/backends/triton/
    Backend.SIMT                torch.ops.mixedprec_simt.*    the CUDA sources run on host threads
                                                              (mixedprec._simt, a test-only build)
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import importlib
from collections.abc import Iterator

import torch
from torch import Tensor

from mixedprec import _extension

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Backend(str, enum.Enum):
    REFERENCE = "reference"
    CPU = "cpu"
    CUDA = "cuda"
    TRITON = "triton"
    SIMT = "simt"

    def __str__(self) -> str:
        return self.value


BACKENDS = tuple(b.value for b in Backend)

# The namespace of each kernel family's torch library (the reference has none: it is a composite).
NAMESPACES = {Backend.CPU: "mixedprec", Backend.CUDA: "mixedprec", Backend.TRITON: "mixedprec_triton",
              Backend.SIMT: "mixedprec_simt"}
# An op's kernels by role: the C++ libraries name them <op>_<suffix>, the Triton modules
# mixedprec/backends/triton/<op>.py by function.
_KERNEL_NAMES = {"forward": ("fwd", "forward"), "backward": ("bwd", "backward"), "stats": ("stats", "residual_sums")}

_selected: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("mixedprec_backend", default=None)


def parse(backend: str | Backend | None, what: str = "backend") -> Backend | None:
    if backend is None or isinstance(backend, Backend):
        return backend
    try:
        return Backend(backend)
    except ValueError:
        raise ValueError(f"{what} must be one of {BACKENDS} or None, got {backend!r}") from None


@contextlib.contextmanager
def use_backend(backend: str | Backend | None) -> Iterator[None]:
    """Runs every op in the block (and the layers that call them) with ``backend``; None restores
    the default choice. Ops given ``backend=`` explicitly keep theirs."""
    token = _selected.set(parse(backend, "use_backend: backend"))
    try:
        yield
    finally:
        _selected.reset(token)


def selected() -> Backend | None:
    """The backend ``use_backend`` chose for this block, or None (the default choice)."""
    return _selected.get()


def call_key(x: Tensor) -> tuple:
    """What an op's prepared call (``lut_conv2d_call``, ``lowbit_linear_call``, ``fixed_quant_call``)
    holds for, besides its other arguments: x's shape, strides, dtype and device, and the backend
    ``use_backend`` chose. A caller keeping such a call compares the key of each new x to it."""
    return (x.shape, x.stride(), x.dtype, x.device, _selected.get())


def usable(backend: Backend, device: torch.device) -> bool:
    """Whether ``backend`` can run tensors on ``device`` in this process (any op)."""
    if backend is Backend.REFERENCE:
        return True
    if backend is Backend.CPU:
        return device.type == "cpu" and _extension.CPU_BUILT
    if backend is Backend.CUDA:
        return device.type == "cuda" and _extension.CUDA_BUILT
    if backend is Backend.SIMT:
        return device.type == "cpu" and _extension.SIMT_BUILT
    return _extension.triton_usable(device)


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b.value for b in Backend if usable(b, device)]


def kernel_built(op: str, backend: Backend) -> bool:
    """Whether this build registered ``op``'s forward kernel for ``backend`` (the reference and
    Triton have every op)."""
    if backend in (Backend.REFERENCE, Backend.TRITON):
        return True
    key = "CUDA" if backend is Backend.CUDA else "CPU"
    return _extension.has_kernel(f"{NAMESPACES[backend]}::{op}_fwd", key)


# Per op, per backend name: whether this build has the op's kernel. Filled once per op at import
# (``kernels_built``), so that torch.compile sees constants; tests may patch an entry.
KERNELS_BUILT: dict[str, dict[str, bool]] = {}


def kernels_built(op: str) -> dict[str, bool]:
    """``op``'s entry of KERNELS_BUILT."""
    return KERNELS_BUILT.setdefault(op, {b.value: kernel_built(op, b) for b in Backend})


# The default choice on each device type, fastest first (then the reference), with each one's
# key in KERNELS_BUILT (Enum.value is a property: a lookup per call of every op).
_PREFERRED = {"cpu": ((Backend.CPU, "cpu"),), "cuda": ((Backend.CUDA, "cuda"), (Backend.TRITON, "triton"))}


def resolve(op: str, backend: str | Backend | None, x: Tensor, built: dict[str, bool]) -> Backend:
    """The backend that runs ``op`` for ``x``: the one asked for (per call, else ``use_backend``),
    or the fastest available one that has the op's kernel. An explicit request that cannot be met
    is an error naming why."""
    asked = parse(backend) if backend is not None else _selected.get()
    device = x.device
    if asked is None:
        if x.dtype in KERNEL_DTYPES:
            for b, name in _PREFERRED.get(device.type, ()):
                if built[name] and usable(b, device):
                    return b
        return Backend.REFERENCE
    if not usable(asked, device):
        raise RuntimeError(f"{op}: {_extension.missing_reason(asked.value, device)}")
    if asked is not Backend.REFERENCE and x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{op}: backend {asked.value!r} supports x of dtype float32, float16 or "
                         f"bfloat16, got {x.dtype}; use backend='reference' for {x.dtype}")
    if not built[asked.value]:
        raise RuntimeError(f"{op}: backend {asked.value!r} has no {op} kernel in this build; rebuild mixedprec._C, "
                           f"or use backend='reference' (or None to pick what is available)")
    return asked


@functools.cache  # once per kernel: a lookup through torch.ops (or an import) costs ~2 us a call
def kernel(backend: Backend, op: str, role: str):
    """The kernel of ``op`` in ``role`` ("forward", "backward", "stats") for a kernel backend."""
    suffix, function = _KERNEL_NAMES[role]
    if backend is Backend.TRITON:
        return getattr(importlib.import_module(f"mixedprec.backends.triton.{op}"), function)
    return getattr(getattr(torch.ops, NAMESPACES[backend]), f"{op}_{suffix}")


def set_cpu_simd(enabled: bool) -> bool:
    """Selects the CPU kernels' (lowbit_linear, lut_conv2d) SIMD code decode (True, default:
    AVX-512, or lowbit_linear's AVX2 kernels on AVX2 builds) or its scalar twin; returns the previous setting (for tests and benchmarks)."""
    return torch.ops.mixedprec.set_cpu_simd(bool(enabled))


def set_cpu_winograd(enabled: bool) -> bool:
    """Selects whether lut_conv2d's CPU kernel computes 3x3, stride-1, single-group convolutions
    through Winograd F(2x2, 3x3) (True, default: 2.25x fewer multiplies) or directly, as it does
    every other geometry; returns the previous setting. Winograd's float32 error grows with the
    magnitudes in each 4x4 input tile rather than with sum |x w|: 1.2-4x conv2d's on ResNet-18's
    layers, more next to outliers that meet pruned weights (docs/kernels.md)."""
    return torch.ops.mixedprec.set_cpu_winograd(bool(enabled))
