"""Defines an op's custom ops once for every kernel family (mixedprec/ops/backend.py).

An op module writes its custom op as one implementation ``impl(family, *args)`` that runs the
family's kernels (``backend.kernel(family, op, role)``), one fake and one autograd formula;
``define`` registers them as ``mixedprec::<name>``, ``mixedprec_triton::<name>`` and
``mixedprec_simt::<name>``, and ``custom_op`` picks the one of a resolved backend.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from mixedprec.ops.backend import NAMESPACES, Backend

# One backend per torch library: CPU stands for `mixedprec`, whose kernels the dispatcher picks
# by device (CPU or CUDA).
FAMILIES = (Backend.CPU, Backend.TRITON, Backend.SIMT)


def family(backend: Backend) -> Backend:
    return Backend.CPU if backend is Backend.CUDA else backend


def define(name: str, schema: str, impl: Callable, fake: Callable) -> None:
    """Registers ``<namespace>::<name>`` for each kernel family, all with ``schema`` and ``fake``."""
    for f in FAMILIES:
        op = torch.library.custom_op(f"{NAMESPACES[f]}::{name}", functools.partial(impl, f), mutates_args=(),
                                     schema=schema)
        op.register_fake(fake)


def register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """Registers ``backward(family, ctx, *grads)`` as the autograd of every family's ``name``."""
    for f in FAMILIES:
        torch.library.register_autograd(f"{NAMESPACES[f]}::{name}", functools.partial(backward, f),
                                        setup_context=setup_context)


def custom_op(backend: Backend, name: str):
    """The custom op ``name`` of ``backend``'s family (an OpOverloadPacket)."""
    return getattr(getattr(torch.ops, NAMESPACES[family(backend)]), name)


def memory_format(x: Tensor) -> torch.memory_format:
    """The layout kernels take and return x in: channels-last for a 4-D tensor stored so (and not
    also contiguous, as an N x C x 1 x 1 one is), contiguous otherwise. Keeping the caller's layout,
    as torch's own ops do, keeps a channels-last model channels-last, with no copy per layer."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense(x: Tensor) -> Tensor:
    """x in the layout ``memory_format`` names (a copy only when x is not stored so)."""
    return x.contiguous(memory_format=memory_format(x))


def empty_as(x: Tensor, shape=None, dtype: torch.dtype | None = None) -> Tensor:
    """A fake op's output: ``shape`` (x's by default) in x's dtype and layout (``memory_format``)."""
    return torch.empty(x.shape if shape is None else shape, dtype=dtype or x.dtype, device=x.device,
                       memory_format=memory_format(x))


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call when t has that dtype (a no-op ``.to`` still costs a
    dispatch, a tenth of a small layer's call)."""
    return t if t.dtype == dtype else t.to(dtype)


def through_autograd(*tensors: Tensor | None) -> bool:
    """Whether an op must go through its custom op (autograd) rather than call its kernels: under
    torch.compile, which traces it, or when a gradient can flow. Otherwise its implementation is
    called directly: the custom op's Python dispatch costs ~40 us a call, 10% of a 4096^2 GEMV."""
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
