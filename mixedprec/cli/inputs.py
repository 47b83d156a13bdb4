"""What the user points the CLI at: a model (zoo name or module:function), its weights, a data set.

Every mistake (unknown model, import failure, missing file, weights that do not fit, a data
folder that is absent or has the wrong layout) raises UsageError with a one-line message.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from mixedprec.cli.common import UsageError
from mixedprec.models import MODELS
from mixedprec.nn import factory

DATA_SOURCES = ("digits", "cifar10", "cifar100", "imagefolder")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Data(NamedTuple):
    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) of one example


# ---------------------------------------------------------------- models

def parse_model_args(items: list[str]) -> dict:
    """KEY=VALUE strings -> keyword arguments; values are Python literals, else strings."""
    kwargs = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg {item!r}: expected KEY=VALUE with KEY a Python name, e.g. width=16")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def factory_name(spec: str) -> str:
    """The name a model file records for ``spec``: a zoo name becomes its function's module path."""
    if spec in MODELS:
        return factory.name_of(MODELS[spec])
    if spec.rpartition(":")[1] != ":":
        raise UsageError(f"--model {spec!r}: not a zoo model ({', '.join(sorted(MODELS))}) and not of the form "
                         f"module:function or file.py:function")
    try:
        return factory.name_of(spec)
    except ValueError as exc:
        raise UsageError(f"--model {exc}") from None


def build_model(spec: str, kwargs: dict, data: Data) -> tuple[nn.Module, dict]:
    """The model from ``spec`` and the keyword arguments it was built with; zoo models get the
    data's class and channel counts unless given."""
    name = factory_name(spec)
    if spec in MODELS:
        params = inspect.signature(MODELS[spec]).parameters
        defaults = {"num_classes": data.num_classes, "in_channels": data.input_shape[0]}
        kwargs = {**{k: v for k, v in defaults.items() if k in params}, **kwargs}
    try:
        model = factory.build(name, kwargs)
    except ValueError as exc:
        raise UsageError(f"--model {spec!r}: {str(exc).split(': ', 1)[-1]}") from None
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            out = model(data.test[0][0].unsqueeze(0))
            model.train(was_training)
    except Exception as exc:
        raise UsageError(f"--model {spec!r} does not accept the data's inputs of shape "
                         f"{tuple(data.input_shape)}: {type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != data.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"--model {spec!r}: outputs {shape} for one example; expected logits of shape "
                         f"(1, {data.num_classes}) for {data.name}'s {data.num_classes} classes")
    return model, kwargs


def load_weights(model: nn.Module, path: Path) -> None:
    """A state_dict file (or a checkpoint dict holding one under 'state_dict' or 'model')."""
    if not path.is_file():
        raise UsageError(f"--weights {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"--weights {path}: not a torch state_dict file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        problems = [f"{label} {_few(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise UsageError(f"--weights {path} do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------- data

def load_data(source: str, data_dir: Path | None, *, image_size: int, seed: int) -> Data:
    if source == "digits":
        if data_dir is not None:
            raise UsageError("--data-dir: the digits set ships with scikit-learn; --data-dir is for "
                             "cifar10, cifar100 and imagefolder")
        from mixedprec.data.digits import load_digits

        split = load_digits(seed=seed)
        return Data("digits", split.train, split.test, split.num_classes, split.input_shape)
    if data_dir is None:
        raise UsageError(f"--data {source} needs --data-dir (the folder that holds the data set; nothing is downloaded)")
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir}: folder not found")
    transforms = _torchvision(source).transforms
    if source in ("cifar10", "cifar100"):
        return _cifar(source, data_dir, transforms)
    return _image_folder(data_dir, transforms, image_size)


def _torchvision(source: str):
    try:
        import torchvision
    except ImportError:
        raise UsageError(f"--data {source} needs torchvision: pip install 'mixedprec[vision]'") from None
    return torchvision


def _cifar(source: str, root: Path, transforms) -> Data:
    from torchvision import datasets

    cls, folder = (datasets.CIFAR10, "cifar-10-batches-py") if source == "cifar10" else (datasets.CIFAR100, "cifar-100-python")
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    try:
        train = cls(str(root), train=True, transform=train_tf, download=False)
        test = cls(str(root), train=False, transform=test_tf, download=False)
    except RuntimeError:
        raise UsageError(f"--data-dir {root}: no intact {source} download there (expected {root / folder}/ as "
                         f"torchvision writes it; mixedprec never downloads: run torchvision.datasets."
                         f"{cls.__name__}({str(root)!r}, download=True) once)") from None
    return Data(source, train, test, len(train.classes), (3, 32, 32))


def _image_folder(root: Path, transforms, image_size: int) -> Data:
    from torchvision import datasets

    splits = {}
    for role, names in (("train", ("train",)), ("test", ("val", "test"))):
        found = next((root / n for n in names if (root / n).is_dir()), None)
        if found is None:
            raise UsageError(f"--data-dir {root}: expected subfolders train/ and val/ (or test/), each with one "
                             f"folder of images per class; {'/ or '.join(names)}/ is missing")
        splits[role] = found
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    resize = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    try:
        train = datasets.ImageFolder(str(splits["train"]), transforms.Compose(
            resize + [transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
        test = datasets.ImageFolder(str(splits["test"]), transforms.Compose(resize + [transforms.ToTensor(), normalize]))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(f"--data-dir {root}: {exc}") from None
    if train.classes != test.classes:
        raise UsageError(f"--data-dir {root}: {splits['train'].name}/ and {splits['test'].name}/ have different "
                         f"class folders ({_few(train.classes)} vs {_few(test.classes)})")
    return Data(f"imagefolder:{root}", train, test, len(train.classes), (3, image_size, image_size))
