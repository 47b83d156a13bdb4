"""The ops: one module per op (its public function, custom ops, fakes, autograd and checks).

Flow of one call, e.g. ``bit_sharing_quant``:

    mixedprec.ops.bit_sharing_quant(...)           checks arguments, resolves the backend (backend.py)
    -> mixedprec.backends.reference                backend "reference": a differentiable composite
    -> torch.ops.<family>.bit_sharing_quant        otherwise the family's custom op (library.py), with
                                                   one fake and one autograd formula for every family,
       -> the family's kernels                     torch.ops.mixedprec.*_fwd/_bwd (CPU or CUDA by the
                                                   tensors' device), mixedprec.backends.triton, or the
                                                   test-only SIMT build, torch.ops.mixedprec_simt.*

The custom ops are defined in Python so that the package imports and the reference works when the
compiled library is missing; the kernel ops' schemas live in C++ next to their kernels
(csrc/README.md). ``use_backend`` chooses the backend for a block, ``backend=`` for one call.
Setting ``mixedprec.ops.checks.check_values = False`` skips the checks that read parameter values
on the host (one device sync per call on CUDA).

Every module here that names an op (``OP = "<op>"``) is imported, which registers its custom ops,
and its function ``<op>`` is exported: adding an op adds a module, no line here.
"""
import importlib
import pkgutil

from mixedprec.ops.backend import (BACKENDS, KERNEL_DTYPES, KERNELS_BUILT, Backend, available_backends, resolve,
                                   set_cpu_simd, set_cpu_winograd, use_backend)
from mixedprec.ops.bit_sharing_quant import BitSharingResult, ResidualSumsReducer

OPS = []
for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if hasattr(_module, "OP"):
        OPS.append(_module.OP)
        globals()[_module.OP] = getattr(_module, _module.OP)

__all__ = ["BACKENDS", "KERNEL_DTYPES", "KERNELS_BUILT", "OPS", "Backend", "BitSharingResult", "ResidualSumsReducer",
           "available_backends", "resolve", "set_cpu_simd", "set_cpu_winograd", "use_backend", *OPS]
