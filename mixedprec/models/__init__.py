"""Small model zoo: the models the papers' CIFAR experiments use and one sized for digits."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mixedprec.models.digits import digits_cnn
from mixedprec.models.preact_resnet import PreActResNet, resnet20, resnet56

MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "resnet20": resnet20,
    "resnet56": resnet56,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """A fresh model from the zoo by name (keyword arguments go to its factory)."""
    if name not in MODELS:
        raise ValueError(f"get_model: unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["MODELS", "PreActResNet", "digits_cnn", "get_model", "resnet20", "resnet56"]
