"""PackedLinear: an inference linear layer whose weight lives only in the packed format."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mixedprec import ops
from mixedprec.formats import PackedWeight
from mixedprec.nn.packed_module import DERIVED_BUFFERS, PACKED_BUFFERS, PackedModule


class PackedLinear(PackedModule):
    """y = input_quant(x) W^T + bias, W decoded on the fly by ``mixedprec.ops.lowbit_linear``.

    The packed tensors are buffers (they move and save with the module, no optimizer sees them)
    and are frozen: assigning a Parameter to them, or running with one that requires grad,
    raises. ``bias`` stays a float Parameter (trainable). ``input_quant`` is an optional
    activation quantizer applied first (SBS models quantize layer inputs).
    """

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None, input_quant: nn.Module | None = None, *,
                 backend: str | None = None):
        super().__init__()
        if not isinstance(packed, PackedWeight) or len(packed.shape) != 2:
            raise ValueError(f"PackedLinear: packed must be a 2-D PackedWeight, got "
                             f"{getattr(packed, 'shape', type(packed).__name__)}")
        self.out_features, self.in_features = packed.shape
        self.bits = packed.bits
        self.backend = backend
        self._set_packed(packed)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"PackedLinear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        self.input_quant = input_quant

    def packed_weight(self) -> PackedWeight:
        return PackedWeight((self.out_features, self.in_features), self.bits, self.codebook, self.channel_scale,
                            self.codes, self.keep_bitmap)

    @property
    def packed(self) -> PackedWeight:
        """The weight as a (validated) PackedWeight."""
        return self.packed_weight()

    def __setattr__(self, name, value):
        if name in PACKED_BUFFERS + DERIVED_BUFFERS and isinstance(value, nn.Parameter):
            raise ValueError(f"PackedLinear: {name} is a frozen packed buffer and cannot become a Parameter")
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        frozen = [name for name in PACKED_BUFFERS if getattr(self, name) is not None and getattr(self, name).requires_grad]
        if frozen:
            raise ValueError(f"PackedLinear: packed buffers {frozen} must not require grad (they are frozen; "
                             f"train the bias or other float layers instead)")
        if self.input_quant is not None:
            x = self.input_quant(x)
        return ops.packed_linear(x, self.codebook, self.channel_scale, self.codes, self.keep_bitmap,
                                 self.code_offsets, (self.out_features, self.in_features),
                                 self.bits, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        sparsity = 1.0 - self.packed_weight().kept / (self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"sparsity={sparsity:.3f}, bias={self.bias is not None}")
