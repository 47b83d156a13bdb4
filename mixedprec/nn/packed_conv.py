"""PackedConv2d: a deployed Conv2d whose weight is a packed low-bit codebook weight
(mixedprec.formats.PackedWeight), run through mixedprec.ops.lut_conv2d."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixedprec.formats import PackedWeight
from mixedprec.nn.int8 import int8_conv2d
from mixedprec.nn.packed_module import PackedModule
from mixedprec.ops.lut_conv2d import lut_conv2d_call
from mixedprec.ops.checks import conv_pair


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")  # nn.Conv2d's


class PackedConv2d(PackedModule):
    """y = conv2d(input_quant(x), W, bias) with W decoded inside the kernel from ``packed``.

    The packed tensors are buffers (saved in the state dict, moved by ``.to()``), not parameters:
    they are constant, and asking for their gradient is an error. ``bias`` is an ordinary float
    Parameter and trains. ``padding_mode`` is nn.Conv2d's: "zeros" pads inside the kernel, the
    others pad x first (``F.pad``, as nn.Conv2d does; they copy values of x, so padding before the
    input quantizer gives what padding after it would). ``backend`` is passed to
    ``ops.lut_conv2d`` (None: ``ops.use_backend``'s choice, else the fastest available).
    """

    padding_mode = "zeros"  # files saved before padding modes describe none

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None, input_quant: nn.Module | None = None,
                 stride=1, padding=0, dilation=1, groups: int = 1, *, padding_mode: str = "zeros",
                 backend: str | None = None):
        super().__init__()
        if not isinstance(packed, PackedWeight) or len(packed.shape) != 4:
            raise ValueError(f"PackedConv2d: packed must be a PackedWeight of a conv weight (C_out, C_in/groups, kh, kw), "
                             f"got {getattr(packed, 'shape', type(packed).__name__)}")
        for name, value, minimum in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
            conv_pair("PackedConv2d", name, value, minimum)  # fail here rather than at the first forward
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or packed.shape[0] % groups:
            raise ValueError(f"PackedConv2d: groups must be an int >= 1 dividing C_out = {packed.shape[0]}, got {groups!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"PackedConv2d: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.weight_shape = tuple(int(s) for s in packed.shape)
        self._set_packed(packed)
        self.in_channels, self.out_channels = self.weight_shape[1] * groups, self.weight_shape[0]
        self.kernel_size = self.weight_shape[2:]
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        if padding_mode != "zeros":  # the class default otherwise: files of zero-padded convs stay as they were
            self.padding_mode = padding_mode
        self.backend = backend
        if bias is not None and tuple(bias.shape) != (self.out_channels,):
            raise ValueError(f"PackedConv2d: bias must have shape ({self.out_channels},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())
        self.input_quant = input_quant

    @classmethod
    def from_float(cls, conv: nn.Conv2d, packed: PackedWeight, *, backend: str | None = None) -> PackedConv2d:
        """The packed twin of ``conv`` (its geometry and bias), with ``packed`` as its weight."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"PackedConv2d.from_float: conv must be an nn.Conv2d, got {type(conv).__name__}")
        padding = symmetric_padding(conv)
        if padding is None:
            raise ValueError(f"PackedConv2d.from_float: padding={conv.padding!r} pads one side more than the other "
                             f"(dilation {conv.dilation}, kernel {conv.kernel_size}); the packed conv pads both alike")
        if tuple(packed.shape) != tuple(conv.weight.shape):
            raise ValueError(f"PackedConv2d.from_float: packed has shape {tuple(packed.shape)} but conv's weight is "
                             f"{tuple(conv.weight.shape)}")
        return cls(packed.to(conv.weight.device), conv.bias, None, conv.stride, padding, conv.dilation,
                   conv.groups, padding_mode=conv.padding_mode, backend=backend)

    @property
    def conv_padding(self):
        """The padding the convolution applies: ``padding`` with zeros, else none (x was padded)."""
        return self.padding if self.padding_mode == "zeros" else 0

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            (ph, pw) = conv_pair("PackedConv2d", "padding", self.padding, 0)
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
        call = self.inference_call(x)
        if call is not None:
            return call(x)
        # SBS layers on the CPU under no_grad: one integer convolution (nn/int8.py)
        y = None if self.input_quant is None else int8_conv2d(self, x)
        if y is not None:
            return y
        if self.input_quant is not None:  # SBS models quantize layer inputs
            x = self.input_quant(x)
        return self.op_call(x)(x)

    def op_call(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        return lut_conv2d_call(x, self.packed_weight(), self.bias, self.stride, self.conv_padding, self.dilation,
                               self.groups, backend=self.backend)

    def extra_repr(self) -> str:
        sparse = "" if self.keep_bitmap is None else ", sparse"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bits={self.bits}{sparse}, "
                + ("" if self.padding_mode == "zeros" else f"padding_mode={self.padding_mode!r}, ")
                + f"bias={self.bias is not None}")


def symmetric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """conv's padding as numbers per side (both sides alike), or None for "same" padding that
    pads one side more (an odd dilation * (kernel - 1): torch puts the extra one on the right)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(conv.padding)
