"""Pure-PyTorch composite version of every op, one module per op: the test oracle and the
fallback backend; ``quant`` holds the quantization math that layers and the packer share.

Each function is written the way the papers state the math (DESIGN.md), out of differentiable
torch ops, so that autograd of the composite *is* the reference backward. Straight-through
pieces are expressed by two primitives, ``ste_round`` and ``ste_gate`` (hard value forward,
surrogate gradient backward); a float64 gradcheck swaps them for smooth twins with the same
derivatives (tests/test_bit_sharing.py).

Arithmetic is spelled exactly as the kernels spell it (``x * (1 / clip)``, ``rint(z * n) * (1 / n)``,
the gated sum folded from the innermost offset outwards) so that a float32 kernel and this
composite in float32 agree bit for bit; float16/bfloat16 inputs are computed in float32.
"""
import importlib
import pkgutil

from mixedprec.backends.reference.bit_sharing_quant import bit_sharing_residual_sums
from mixedprec.backends.reference.quant import compute_dtype, levels, normalize, ste_gate, ste_round

__all__ = ["bit_sharing_residual_sums", "compute_dtype", "levels", "normalize", "ste_gate", "ste_round"]

# ``reference.<op>`` is the function ``<op>`` of this package's module ``<op>.py``: adding an op
# adds a module, no line here.
for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if callable(getattr(_module, _info.name, None)):
        globals()[_info.name] = getattr(_module, _info.name)
        __all__.append(_info.name)
