"""PackedLinear: an inference linear layer whose weight lives only in the packed format."""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mixedprec.formats import PackedWeight
from mixedprec.nn.int8 import int8_linear
from mixedprec.nn.packed_module import PackedModule
from mixedprec.ops.lowbit_linear import lowbit_linear_call


class PackedLinear(PackedModule):
    """y = input_quant(x) W^T + bias, W decoded on the fly by ``mixedprec.ops.lowbit_linear``.

    The packed tensors are buffers (they move and save with the module, no optimizer sees them)
    and are frozen: assigning a Parameter to them, or running with one that requires grad,
    raises. ``bias`` stays a float Parameter (trainable). ``input_quant`` is an optional
    activation quantizer applied first (SBS models quantize layer inputs). ``backend`` is passed
    to the op (None: ``ops.use_backend``'s choice, else the fastest available).
    """

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None, input_quant: nn.Module | None = None, *,
                 backend: str | None = None):
        super().__init__()
        if not isinstance(packed, PackedWeight) or len(packed.shape) != 2:
            raise ValueError(f"PackedLinear: packed must be a 2-D PackedWeight, got "
                             f"{getattr(packed, 'shape', type(packed).__name__)}")
        self.out_features, self.in_features = packed.shape
        self._set_packed(packed)
        self.backend = backend
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"PackedLinear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        self.input_quant = input_quant

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def packed(self) -> PackedWeight:
        """The weight as a (validated) PackedWeight."""
        return self.packed_weight()

    def forward(self, x: Tensor) -> Tensor:
        call = self.inference_call(x)
        if call is not None:
            return call(x)
        # SBS layers on the CPU under no_grad: one integer GEMM (nn/int8.py)
        y = None if self.input_quant is None else int8_linear(self, x)
        if y is not None:
            return y
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self.op_call(x)(x)

    def op_call(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        return lowbit_linear_call(x, self.packed_weight(), self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"sparsity={self.sparsity():.3f}, bias={self.bias is not None}")
