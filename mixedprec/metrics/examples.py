"""Example inputs: what BOPs and reports run a model on to find each layer's output positions.

An example is given either as the shape of one input (no batch dim), which stands for a zeros
tensor of shape (1, *shape) in the model's float dtype, or as the tensors themselves, with their batch dim: one
tensor, or a tuple passed to the model as positional arguments (token ids, several inputs, any
dtype the model takes). Layers count per example, whatever the batch size of the tensors.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

Example = Sequence[int] | Tensor | tuple[Tensor, ...]

_float_forward: contextvars.ContextVar[bool] = contextvars.ContextVar("float_forward", default=False)


@contextlib.contextmanager
def float_forward() -> Iterator[None]:
    """Quantizing layers (SBS) run as their float originals, with no quantizer or gate state
    touched, while the example's forward measures the layers' outputs."""
    token = _float_forward.set(True)
    try:
        yield
    finally:
        _float_forward.reset(token)


def in_float_forward() -> bool:
    return _float_forward.get()


def is_shape(example) -> bool:
    return isinstance(example, (tuple, list, torch.Size)) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in example)


def as_tensors(example: Example, model: nn.Module, caller: str) -> tuple[Tensor, ...]:
    """The tensors ``model(*tensors)`` is called with, on the model's device."""
    anchor = next(iter((*model.parameters(), *model.buffers())), None)
    device = anchor.device if anchor is not None else torch.device("cpu")
    if is_shape(example):
        if not example or any(d < 1 for d in example):
            raise ValueError(f"{caller}: input_shape must be the positive dims of one example (no batch dim), "
                             f"got {tuple(example)!r}")
        dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
        return (torch.zeros(1, *example, device=device, dtype=dtype),)
    tensors = (example,) if isinstance(example, Tensor) else example
    if not isinstance(tensors, (tuple, list)) or not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError(f"{caller}: example inputs must be a shape of one example (ints), a tensor or a tuple of "
                         f"tensors with a batch dim, got {type(example).__name__}")
    if any(t.dim() == 0 or t.shape[0] < 1 for t in tensors):
        raise ValueError(f"{caller}: example tensors need a batch dim of size >= 1, got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    return tuple(t.to(device) for t in tensors)


def label(example: Example) -> str:
    """How an example reads in a report: "of shape (3, 32, 32)" or "int64 (1, 16)"."""
    if is_shape(example):
        return f"of shape {tuple(example)}"
    return ", ".join(f"{d['dtype']} {tuple(d['shape'])}" for d in describe(example))


def describe(example: Example) -> list[dict]:
    """JSON-able description (shape with batch dim, dtype) of each example tensor, for records."""
    if is_shape(example):
        return [{"shape": [1, *example], "dtype": "float32"}]
    tensors = (example,) if isinstance(example, Tensor) else example
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in tensors]


def from_description(description: list[dict]) -> tuple[Tensor, ...]:
    """Zeros of the described shapes and dtypes (token id 0 is as good an example as any)."""
    try:
        return tuple(torch.zeros([int(d) for d in item["shape"]], dtype=getattr(torch, item["dtype"]))
                     for item in description)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"example inputs: malformed description {description!r} ({exc})") from None


def _positions_of(module: nn.Module, out: Tensor) -> int:
    """Output positions of one call per example: the spatial size of a conv's output (H_out *
    W_out for a 2-D conv), the positions of a linear's (N, ..., C) output (1 for (N, C))."""
    kernel = getattr(module, "kernel_size", None)
    if kernel is not None:
        return math.prod(out.shape[-len(kernel):])
    return out[..., 0].numel() // out.shape[0]


@torch.no_grad()
def output_positions(model: nn.Module, layers: dict[str, nn.Module], example: Example, caller: str) -> dict[str, int]:
    """Output positions per example of each of ``layers`` (name -> module), summed over its calls,
    from one eval-mode forward of ``example`` in which no quantizer or gate state is touched.
    Layers the forward does not call are absent (they run no operations on such inputs)."""
    tensors = as_tensors(example, model, caller)
    positions: dict[str, int] = {}

    def record(name, module, _inputs, out):
        positions[name] = positions.get(name, 0) + _positions_of(module, out)

    hooks = [m.register_forward_hook(functools.partial(record, name)) for name, m in layers.items()]
    was_training = model.training
    try:
        model.eval()
        with float_forward():
            model(*tensors)
    except Exception as exc:
        hint = (" A shape stands for one float example; a model that takes token ids or several inputs needs "
                "example tensors, e.g. torch.zeros(1, 16, dtype=torch.long)." if is_shape(example) else "")
        raise ValueError(f"{caller}: the model does not run on example inputs {describe(example)}: "
                         f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}."
                         f"{hint}") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return positions
