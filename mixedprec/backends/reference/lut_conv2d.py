"""lut_conv2d in float64 through the decoded weight (the oracle; materializes W)."""
from __future__ import annotations

import torch
from torch import Tensor


def lut_conv2d(x: Tensor, packed, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
               groups: int = 1) -> Tensor:
    """conv2d(x, W) + bias with W = packed.decode() taken in float64, the result in x's dtype.

    ``packed`` is a ``mixedprec.formats.PackedWeight`` of shape (C_out, C_in/groups, kh, kw).
    Autograd of this composite gives grad_x (the transposed convolution) and grad_bias; the packed
    weight is constant.
    """
    weight = packed.decode(torch.float64)
    y = torch.nn.functional.conv2d(x.to(torch.float64), weight, None if bias is None else bias.to(torch.float64),
                                   stride, padding, dilation, groups)
    return y.to(x.dtype)
