"""save(model, path) / load(path): packed models as safetensors files, no pickle.

The file holds every parameter and persistent buffer (packed codes, codebooks, scales, bitmaps,
biases, BatchNorm statistics, ...) as tensors, and the module tree as JSON in the metadata:
per module its class (only classes from torch.nn and mixedprec are written or read back, so
loading never runs other code), its plain attributes (numbers, strings, tuples, dtypes) and its
children. Loading rebuilds the tree without calling constructors, then lets packed layers
validate their buffers and recompute derived tables. File-level checks: mixedprec.formats.
"""
from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from mixedprec import formats

_ALLOWED_PREFIXES = ("torch.nn.", "mixedprec.")
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes ``model`` (e.g. the result of ``mixedprec.pack``) to ``path`` atomically."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"save: model must be an nn.Module, got {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    tree = _describe(model, "", tensors)
    formats.save_file(path, tensors, {"tree": tree})


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model saved at ``path``; a ValueError says what is wrong with a bad file."""
    tensors, content = formats.load_file(path)
    if not isinstance(content, dict) or "tree" not in content:
        raise ValueError(f"{os.fspath(path)}: no module tree in the file's metadata")
    used: set[str] = set()
    model = _build(content["tree"], "", tensors, used)
    if used != set(tensors):
        raise ValueError(f"{os.fspath(path)}: tensors {sorted(set(tensors) - used)} belong to no module")
    for name, module in model.named_modules():
        if hasattr(module, "rebuild_derived"):
            try:
                module.rebuild_derived()
            except ValueError as exc:
                raise ValueError(f"{os.fspath(path)}: layer {name!r} is inconsistent: {exc}") from None
    return model.to(map_location)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(module: nn.Module, prefix: str, tensors: dict) -> dict:
    path = _class_path(type(module))
    if not path.startswith(_ALLOWED_PREFIXES):
        raise ValueError(f"save: module {prefix.rstrip('.') or '<root>'!r} is a {path}; only torch.nn and mixedprec "
                         f"modules can be saved")
    attrs = {}
    for key, value in vars(module).items():
        if key in _MODULE_INTERNALS:
            continue
        try:
            attrs[key] = _encode(value)
        except TypeError:
            raise ValueError(f"save: attribute {key!r} of module {prefix.rstrip('.') or '<root>'!r} ({path}) is a "
                             f"{type(value).__name__}, which the packed file cannot hold") from None
    params, buffers = {}, {}
    for name, p in module._parameters.items():
        params[name] = None if p is None else p.requires_grad
        if p is not None:
            tensors[prefix + name] = p.detach()
    for name, b in module._buffers.items():
        if name in module._non_persistent_buffers_set:
            continue
        buffers[name] = b is not None
        if b is not None:
            tensors[prefix + name] = b
    children = {name: None if child is None else _describe(child, f"{prefix}{name}.", tensors)
                for name, child in module._modules.items()}  # a None child (an unset slot) stays None
    return {"class": path, "attrs": attrs, "params": params, "buffers": buffers, "children": children,
            "non_persistent": sorted(module._non_persistent_buffers_set)}


def _build(spec: dict, prefix: str, tensors: dict, used: set) -> nn.Module:
    where = prefix.rstrip(".") or "<root>"
    try:
        path = spec["class"]
        if not path.startswith(_ALLOWED_PREFIXES):
            raise ValueError(f"class {path} is not a torch.nn or mixedprec module")
        module_name, _, qualname = path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), qualname)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"{path} is not an nn.Module class")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for key, value in spec["attrs"].items():
            object.__setattr__(module, key, _decode(value))
        for name, requires_grad in spec["params"].items():
            module._parameters[name] = None if requires_grad is None else \
                nn.Parameter(_take(tensors, prefix + name, used), requires_grad=requires_grad)
        for name, present in spec["buffers"].items():
            module._buffers[name] = _take(tensors, prefix + name, used) if present else None
        for name in spec.get("non_persistent", []):
            module._buffers.setdefault(name, None)
            module._non_persistent_buffers_set.add(name)
        for name, child in spec["children"].items():
            module._modules[name] = None if child is None else _build(child, f"{prefix}{name}.", tensors, used)
    except (KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ValueError(f"packed file: module {where!r} is malformed: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"packed file: module {where!r}: {exc}") from None
    return module


def _take(tensors: dict, name: str, used: set) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"tensor {name!r} is missing")
    used.add(name)
    return tensors[name]


def _encode(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        items = [_encode(v) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    raise TypeError(type(value).__name__)


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__dtype__" in value:
            dtype = getattr(torch, value["__dtype__"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {value['__dtype__']!r}")
            return dtype
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    return value
