"""lowbit_linear in float64 through the decoded weight (the oracle; materializes W)."""
from __future__ import annotations

import torch
from torch import Tensor


def lowbit_linear(x: Tensor, packed, bias: Tensor | None = None) -> Tensor:
    """y = x W^T + b with W = packed.decode() in float64 (the oracle; materializes W).

    Differentiable in x and bias; the packed weight gets no gradient. Output in x's dtype.
    """
    weight = packed.decode(torch.float64).reshape(packed.out_channels, -1)
    y = x.to(torch.float64) @ weight.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)
