"""Modules as data: a subtree of torch.nn and mixedprec modules described as JSON-safe metadata
(class, plain attributes, children) and rebuilt from it without running a constructor, and the
tensors of a state dict stored once however many names share them (mixedprec/nn/serialization.py)."""
from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

ALLOWED_PREFIXES = ("torch.nn.", "mixedprec.")
MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_mixedprec(module: nn.Module) -> bool:
    return class_path(type(module)).startswith("mixedprec.")


def describe_parts(model: nn.Module, tensors: dict) -> dict:
    """A model with modules of other classes: its mixedprec subtrees, narrowed modules, other state."""
    described: dict[str, dict] = {}
    narrowed: dict[str, dict] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in map(child_prefix, described)):
            continue  # inside a described subtree
        if is_mixedprec(module) and name:
            described[name] = describe(module, child_prefix(name), tensors)
        elif hasattr(module, "pruned_from"):
            narrowed[name] = {"from": module.pruned_from, "to": {k: getattr(module, k) for k in module.pruned_from}}
    extra_state = {}
    for key, value in model.state_dict().items():
        if any(key.startswith(child_prefix(name)) for name in described):
            continue
        if isinstance(value, Tensor):
            tensors[key] = value
        else:
            extra_state[key] = encode_checked(value, f"state {key!r}")
    parts = {"modules": described, "narrowed": narrowed, "extra_state": extra_state}
    return {k: v for k, v in parts.items() if v or k == "modules"}


def child_prefix(name: str) -> str:
    return f"{name}." if name else ""


def describe(module: nn.Module, prefix: str, tensors: dict) -> dict:
    path = class_path(type(module))
    if not path.startswith(ALLOWED_PREFIXES):
        raise ValueError(f"save: module {prefix.rstrip('.') or '<root>'!r} is a {path} inside a mixedprec module; "
                         f"only torch.nn and mixedprec modules can be described there")
    attrs = {key: encode_checked(value, f"attribute {key!r} of module {prefix.rstrip('.') or '<root>'!r} ({path})")
             for key, value in vars(module).items()
             if key not in MODULE_INTERNALS and key not in getattr(module, "DERIVED_ATTRS", ())}
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
    children = {name: None if child is None else describe(child, f"{prefix}{name}.", tensors)
                for name, child in module._modules.items()}  # a None child (an unset slot) stays None
    return {"class": path, "attrs": attrs, "params": params, "buffers": buffers, "children": children,
            "non_persistent": sorted(module._non_persistent_buffers_set)}


def deduplicate(tensors: dict[str, Tensor]) -> dict[str, str]:
    """Stores tied tensors (the same view of the same memory) once: removes the repeats from
    ``tensors`` and returns them as alias -> stored name. A tensor that shares memory with
    another in some other way is stored as a copy (safetensors holds no overlapping tensors)."""
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    aliases = {}
    for name in sorted(tensors):
        t = tensors[name]
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if key in seen:
            aliases[name] = seen[key]
            del tensors[name]
        elif key[0] in storages:
            tensors[name] = t.clone()
        else:
            seen[key] = name
            storages.add(key[0])
    return aliases


def encode_checked(value, what: str):
    try:
        return encode(value)
    except TypeError:
        raise ValueError(f"save: {what} is a {type(value).__name__}, which the packed file cannot hold") from None


def encode(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        items = [encode(v) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: encode(v) for k, v in value.items()}}
    raise TypeError(type(value).__name__)


# ------------------------------------------------------------------------------------ reading

def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "__dtype__" in value:
            dtype = getattr(torch, value["__dtype__"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {value['__dtype__']!r}")
            return dtype
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        return {k: decode(v) for k, v in value["__dict__"].items()}
    return value


def rebuild(tree: dict, tensors: dict, where: str) -> nn.Module:
    """The whole model from its description (no constructor runs)."""
    used: set[str] = set()
    model = build(tree, "", tensors, used, {})
    unused = set(tensors) - used
    if unused:
        raise ValueError(f"{where}: tensors {sorted(unused)} belong to no module")
    validate_packed(model, "", where)
    return model


def build(spec: dict, prefix: str, tensors: dict, used: set, made: dict) -> nn.Module:
    """A module from its description; ``made`` maps tensor names to the tensors already made, so
    that tied parameters come back as one Parameter."""
    where = prefix.rstrip(".") or "<root>"
    try:
        path = spec["class"]
        if not path.startswith(ALLOWED_PREFIXES):
            raise ValueError(f"class {path} is not a torch.nn or mixedprec module")
        module_name, _, qualname = path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), qualname)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"{path} is not an nn.Module class")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for key, value in spec["attrs"].items():
            object.__setattr__(module, key, decode(value))
        for name, requires_grad in spec["params"].items():
            module._parameters[name] = None if requires_grad is None else \
                take(tensors, prefix + name, used, made, requires_grad)
        for name, present in spec["buffers"].items():
            module._buffers[name] = take(tensors, prefix + name, used, made) if present else None
        for name in spec.get("non_persistent", []):
            module._buffers.setdefault(name, None)
            module._non_persistent_buffers_set.add(name)
        for name, child in spec["children"].items():
            module._modules[name] = None if child is None else build(child, f"{prefix}{name}.", tensors, used, made)
    except (KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ValueError(f"packed file: module {where!r} is malformed: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"packed file: module {where!r}: {exc}") from None
    return module


def take(tensors: dict, name: str, used: set, made: dict, requires_grad: bool | None = None) -> Tensor:
    if name not in tensors:
        raise ValueError(f"tensor {name!r} is missing")
    used.add(name)
    key = id(tensors[name])  # aliases of one stored tensor share it
    if key not in made:
        t = tensors[name]
        made[key] = t if requires_grad is None else nn.Parameter(t, requires_grad=requires_grad)
    return made[key]


def validate_packed(model: nn.Module, prefix: str, where: str) -> None:
    """Packed layers check their buffers and rebuild their derived tables."""
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        if hasattr(module, "rebuild_derived"):
            try:
                module.rebuild_derived()
            except ValueError as exc:
                raise ValueError(f"{where}: layer {name!r} is inconsistent: {exc}") from None
