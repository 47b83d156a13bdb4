"""Which layers SBS and OPQ compress, and the ones they leave float, named in one warning.

Both methods compress the model's ``nn.Conv2d`` and ``nn.Linear`` modules of exactly those types
(a subclass may compute something else in its own forward). Attention is made of such layers
first (``mixedprec.nn.attention.unfuse_attention``). Every other layer with a conv or linear
weight (Conv1d/Conv3d, transposed convs, subclasses) stays float and is named in a warning, so
that nothing is left uncompressed silently; embeddings and norms stay float by design.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


def split_layers(model: nn.Module, method: str, exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The compressible layers of ``model`` by name (registration order), except ``exclude``;
    warns once naming the conv/linear-like layers that stay float."""
    exclude = set(exclude)
    chosen, left = {}, []
    for name, module in model.named_modules():
        if type(module) in COMPRESSIBLE:
            if name not in exclude:
                chosen[name] = module
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not _is_mixedprec(module):
            left.append(f"{name} ({type(module).__name__})")
    if left:
        warnings.warn(f"{method}: layers {left} are not nn.Conv2d or nn.Linear (exact types): they stay float",
                      stacklevel=3)
    return chosen


def _is_mixedprec(module: nn.Module) -> bool:
    """A layer of this package (SBS, OPQ or packed): already converted, not left float."""
    return type(module).__module__.startswith("mixedprec.")
