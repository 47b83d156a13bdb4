"""Model factories by name: ``package.module:function`` or ``path/to/file.py:function``.

The command line builds models from such a name (``--model``), and a saved model file can record
the one it was built from, so that ``mixedprec.load`` rebuilds the architecture from code. Calling
a factory runs code, so ``load`` calls one recorded in a file only when it comes from a package
whose builders are known to do nothing else (mixedprec's zoo, torchvision's models) or when the
caller says it trusts the file (``trust_code=True``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

TRUSTED_PACKAGES = ("mixedprec.models", "torchvision.models")


class UntrustedFactory(ValueError):
    """A file names a factory that ``load`` calls only when told to trust it."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def name_of(factory: Callable | str) -> str:
    """The name ``resolve`` finds ``factory`` by: a function or class gives ``module:qualname``
    (it must be importable), a ``file.py:function`` name gets the file's absolute path."""
    if isinstance(factory, str):
        module, sep, attr = factory.rpartition(":")
        if not sep or not module or not attr:
            raise ValueError(f"factory {factory!r} is not of the form module:function or path/to/file.py:function")
        return f"{Path(module).resolve()}:{attr}" if module.endswith(".py") else factory
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not callable(factory) or not module or module == "__main__" or "<locals>" in qualname:
        raise ValueError(f"factory {factory!r} cannot be found again by name (defined in __main__, inside a "
                         f"function, or not a function); pass its name instead, e.g. 'path/to/file.py:make_model'")
    return f"{module}:{qualname}"


def is_trusted(name: str) -> bool:
    module = name.rpartition(":")[0]
    return any(module == p or module.startswith(p + ".") for p in TRUSTED_PACKAGES)


def resolve(name: str) -> Callable[..., nn.Module]:
    """The callable a factory name designates; ValueError with the reason when there is none."""
    module_name, sep, attr = name.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{name!r} is not of the form module:function or path/to/file.py:function")
    target = _import(name, module_name)
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{name!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{name!r}: {attr} is a {type(target).__name__}, not a function or class")
    return target


def build(name: str, kwargs: dict) -> nn.Module:
    """Calls the factory ``name`` with ``kwargs``; it must return an nn.Module."""
    factory = resolve(name)
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the factory's own code: its error is the message
        raise ValueError(f"{name!r}: calling it with {kwargs or 'no arguments'} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name!r}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import(name: str, module_name: str):
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ValueError(f"{name!r}: file {path} not found")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules in the current folder import
        return importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as exc:  # the user's code: any error while importing it is theirs to see
        raise ValueError(f"{name!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
