"""save(model, path) / load(path, model=...): a model with packed layers as one safetensors file, no pickle.

The architecture comes from code and the weights from the file, as elsewhere in the ecosystem:

- The file holds every parameter and persistent buffer by its state-dict name (tied tensors
  once, the others named as their aliases). Every subtree whose root is a mixedprec module (a
  packed layer, an SBS or OPQ layer left unpacked, a ``LinearMultiheadAttention``) is described
  in the metadata as JSON: its class, plain attributes (numbers, strings, tuples, dtypes) and
  children. Modules that ``sbs.export`` narrowed keep their original widths (``pruned_from``).
- ``load(path, model=skeleton)`` takes a freshly built float model (``torchvision.models.resnet50()``,
  the user's own class), puts each described subtree in place of the module the skeleton has
  there (built from the description: no constructor runs, only torch.nn and mixedprec classes),
  narrows the modules export narrowed, and loads every tensor, strictly by default: missing,
  unexpected and wrongly shaped entries are each named.
- Without ``model``, ``load`` rebuilds the model itself when it can: a model made only of
  torch.nn and mixedprec modules is described whole ("tree", as format version 2 did), and a
  model built by a factory given to ``save`` (``module:function`` or ``file.py:function`` with
  keyword arguments) is built by calling it (``mixedprec.nn.factory``: code runs only for
  mixedprec's zoo and torchvision's models, or with ``trust_code=True``).
File-level checks (versions, checksums, truncation): ``mixedprec.formats``.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixedprec import formats
from mixedprec.nn import factory as factories
from mixedprec.nn.attention import keep_off_fused_paths
from mixedprec.nn.module_tree import (ALLOWED_PREFIXES, build, child_prefix, class_path, decode, deduplicate, describe,
                                      describe_parts, encode_checked, rebuild, validate_packed)
from mixedprec.nn.packed_conv import symmetric_padding

_SHOWN = 6  # problems named in one error message


def save(model: nn.Module, path: str | os.PathLike, *, factory: Callable | str | None = None,
         factory_kwargs: dict | None = None) -> None:
    """Writes ``model`` (e.g. the result of ``mixedprec.pack``) to ``path`` atomically.

    ``factory``: the function (or its name, ``module:function`` or ``path/to/file.py:function``)
    that builds the float model with ``factory_kwargs``, recorded so that ``load`` can rebuild a
    model of user-defined classes without being given one."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"save: model must be an nn.Module, got {type(model).__name__}")
    content: dict = {}
    if factory is not None:
        try:
            content["factory"] = {"name": factories.name_of(factory), "kwargs": encode_checked(factory_kwargs or {},
                                                                                              "factory_kwargs")}
        except ValueError as exc:
            raise ValueError(f"save: {exc}") from None
    tensors: dict[str, Tensor] = {}
    if all(class_path(type(m)).startswith(ALLOWED_PREFIXES) for m in model.modules()):
        content["tree"] = describe(model, "", tensors)
    else:
        content.update(root=class_path(type(model)), **describe_parts(model, tensors))
    aliases = deduplicate(tensors)
    if aliases:
        content["aliases"] = aliases
    formats.save_file(path, tensors, content)


def load(path: str | os.PathLike, model: nn.Module | None = None, *, strict: bool = True, trust_code: bool = False,
         map_location: str | torch.device | None = None) -> nn.Module:
    """The model saved at ``path``; a ValueError says what is wrong with a bad file or a model it does not fit.

    model: a freshly built float model of the saved one's architecture (unpruned: layers narrowed
        by SBS are narrowed to the saved widths); filled in place and returned. Without it the
        file must describe its model or name a factory (see the module doc).
    strict: missing, unexpected and wrongly shaped entries are an error (else they are skipped).
    trust_code: call a factory the file names even when it is not mixedprec's or torchvision's.
    map_location: where the result goes (default: the given model's device, else the CPU).
    """
    where = os.fspath(path)
    tensors, content = formats.load_file(path)
    if not isinstance(content, dict) or not ("tree" in content or "modules" in content):
        raise ValueError(f"{where}: no model description in the file's metadata")
    for alias, name in content.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    if model is None and "tree" in content:
        model = rebuild(content["tree"], tensors, where)
    else:
        if model is None:
            model = _build_from_factory(content, trust_code, where)
        elif not isinstance(model, nn.Module):
            raise ValueError(f"load: model must be an nn.Module (a freshly built one), got {type(model).__name__}")
        _install(model, content, tensors, strict, where)
    keep_off_fused_paths(model)
    return model if map_location is None else model.to(map_location)


# ------------------------------------------------------------------------------------ writing


def _build_from_factory(content: dict, trust_code: bool, where: str) -> nn.Module:
    recorded = content.get("factory")
    if recorded is None:
        raise ValueError(f"{where}: the saved model is a {content.get('root', 'model')} whose architecture comes from "
                         f"code: pass a freshly built one, mixedprec.load(path, model=...) (or save it with "
                         f"factory=... so that load can build it)")
    name = recorded["name"]
    if not (trust_code or factories.is_trusted(name)):
        raise factories.UntrustedFactory(f"{where}: the model is built by {name!r}, which load calls only with "
                                         f"trust_code=True (it runs that code); or pass a freshly built model, "
                                         f"mixedprec.load(path, model=...)", name)
    try:
        return factories.build(name, decode(recorded["kwargs"]))
    except ValueError as exc:
        raise ValueError(f"{where}: rebuilding the model failed: {exc}") from None


def _parts(content: dict) -> tuple[dict[str, dict], dict[str, dict], dict]:
    """(described mixedprec subtrees, narrowed modules, extra state) of either description."""
    if "tree" not in content:
        return content["modules"], content.get("narrowed", {}), content.get("extra_state", {})
    described, narrowed = {}, {}

    def walk(spec: dict, name: str) -> None:
        if spec["class"].startswith("mixedprec.") and name:
            described[name] = spec
            return
        original = spec["attrs"].get("pruned_from")
        if original is not None:
            original = decode(original)
            narrowed[name] = {"from": original, "to": {k: decode(spec["attrs"][k]) for k in original}}
        for child, child_spec in spec["children"].items():
            if child_spec is not None:
                walk(child_spec, f"{child_prefix(name)}{child}")

    walk(content["tree"], "")
    return described, narrowed, {}


def _install(model: nn.Module, content: dict, tensors: dict, strict: bool, where: str) -> None:
    """Fills a freshly built ``model`` in place from the file's parts."""
    described, narrowed, extra_state = _parts(content)
    problems: list[str] = []
    modules = dict(model.named_modules())
    for name, widths in narrowed.items():
        _narrow(modules, name, widths, tensors, problems)
    used: set[str] = set()
    made: dict = {}
    for name, spec in described.items():
        target = modules.get(name)
        if target is None:
            problems.append(f"the model has no module {name!r}, where the file holds a "
                            f"{spec['class'].rpartition('.')[2]}")
            continue
        new = build(spec, child_prefix(name), tensors, used, made)
        mismatch = _mismatch(target, new)
        if mismatch:
            problems.append(f"{name!r}: {mismatch}")
            continue
        validate_packed(new, name, where)
        anchor = next(iter((*target.parameters(), *target.buffers())), None)
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent], attr, new if anchor is None or anchor.is_meta else new.to(anchor.device))
    state = {k: v for k, v in tensors.items() if k not in used}
    state.update({k: decode(v) for k, v in extra_state.items()})
    expected = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(child_prefix(name)) for name in described)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if isinstance(state[k], Tensor)
                   and isinstance(expected[k], Tensor) and state[k].shape != expected[k].shape)
    for label, keys in (("missing from the file", missing), ("unexpected (not in the model)", unexpected)):
        if keys:
            problems.append(f"{len(keys)} entries {label}: {_few(keys)}")
    if wrong:
        problems.append(f"{len(wrong)} entries of another shape: " + _few(
            [f"{k} {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model" for k in wrong]))
    if problems and strict:
        raise ValueError(f"{where}: the file does not fit the model ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}): "
                         + "; ".join(problems[:_SHOWN]) + (" ..." if len(problems) > _SHOWN else ""))
    for k in wrong + unexpected:
        del state[k]
    meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    model.load_state_dict(state, strict=False, assign=meta)


def _narrow(modules: dict, name: str, widths: dict, tensors: dict, problems: list) -> None:
    """Gives a module of the freshly built model the width SBS's export left it with."""
    module = modules.get(name)
    if module is None:
        problems.append(f"the model has no module {name!r}, which the file holds narrowed")
        return
    original = {k: getattr(module, k, None) for k in widths["from"]}
    if original != widths["from"]:
        problems.append(f"{name!r} has {_widths(original)}, the file was saved from a model with "
                        f"{_widths(widths['from'])}")
        return
    for key, value in widths["to"].items():
        setattr(module, key, value)
    for slot in (module._parameters, module._buffers):
        for attr, t in slot.items():
            stored = tensors.get(child_prefix(name) + attr)
            if t is not None and stored is not None and t.shape != stored.shape:
                new = torch.empty(stored.shape, dtype=t.dtype, device=t.device)
                slot[attr] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
    module.pruned_from = dict(widths["from"])


def _signature(m: nn.Module) -> tuple[str, dict] | None:
    """What a layer and its packed twin must agree on (conv, linear or attention geometry)."""
    if hasattr(m, "kernel_size") and hasattr(m, "out_channels"):
        padding = symmetric_padding(m) if isinstance(m, nn.Conv2d) else m.padding
        pair = nn.modules.utils._pair
        return "conv", {"in_channels": m.in_channels, "out_channels": m.out_channels,
                        "kernel_size": tuple(m.kernel_size), "stride": pair(m.stride),
                        "padding": m.padding if padding is None else pair(padding), "dilation": pair(m.dilation),
                        "groups": m.groups, "bias": m.bias is not None,
                        "padding_mode": getattr(m, "padding_mode", "zeros")}
    if hasattr(m, "in_features") and hasattr(m, "out_features"):
        return "linear", {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    if hasattr(m, "embed_dim") and hasattr(m, "num_heads"):
        return "attention", {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "kdim": m.kdim, "vdim": m.vdim,
                             "batch_first": m.batch_first, "bias": m.in_proj_bias is not None}
    return None


def _mismatch(target: nn.Module, new: nn.Module) -> str | None:
    """Why the file's module cannot stand where the model has ``target``, or None."""
    if isinstance(target, getattr(new, "STANDS_FOR", ())):  # e.g. a FoldedBatchNorm for a BatchNorm
        return None
    theirs, ours = _signature(target), _signature(new)
    if theirs is None or ours is None:
        if type(target) is type(new):
            return None
        return f"the model has a {type(target).__name__}, the file a {type(new).__name__}"
    ours[1].update(getattr(new, "pruned_from", {}))
    if hasattr(new, "bias_before_folding"):  # a conv that took a BatchNorm's shift (nn/fold.py)
        ours[1]["bias"] = new.bias_before_folding
    if theirs[0] != ours[0]:
        return f"the model has a {type(target).__name__}, the file a {type(new).__name__} ({ours[0]})"
    differ = {k: (theirs[1][k], v) for k, v in ours[1].items() if k in theirs[1] and theirs[1][k] != v}
    if differ:
        return (f"the model's {type(target).__name__} has " + ", ".join(f"{k}={a}" for k, (a, _) in differ.items())
                + f"; the file's {type(new).__name__} was made from one with "
                + ", ".join(f"{k}={b}" for k, (_, b) in differ.items()))
    return None


def _widths(widths: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in widths.items())


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
