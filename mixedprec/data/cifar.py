"""CIFAR-100 from its python on-disk layout, read with pickle and torch alone (no torchvision,
nothing downloaded).

``<root>/cifar-100-python/{train,test,meta}``: pickles (latin-1 / bytes keys) holding
``b'data'`` (N, 3072) uint8, the three 32x32 colour planes of each image one after another,
and ``b'fine_labels'`` (N ints in 0..99); ``meta`` holds ``b'fine_label_names'``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

FOLDER = "cifar-100-python"
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # CIFAR-100 training set statistics


class CifarLayoutError(ValueError):
    """The folder does not hold CIFAR-100's python layout (missing or malformed files)."""


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise CifarLayoutError(f"{path}: not found (expected CIFAR-100's python layout: {FOLDER}/train, test, meta)")
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise CifarLayoutError(f"{path}: not a CIFAR-100 pickle ({exc})") from None


class Cifar100(Dataset):
    """One split as normalized float (3, 32, 32) tensors and int labels. ``augment``: a random
    32x32 crop of the image padded by 4 zeros and a random horizontal flip (the papers' CIFAR
    augmentation), drawn from torch's global generator."""

    def __init__(self, root: str | Path, train: bool, augment: bool | None = None):
        folder = Path(root) / FOLDER
        split = _unpickle(folder / ("train" if train else "test"))
        meta = _unpickle(folder / "meta")
        try:
            data, labels = np.asarray(split[b"data"], dtype=np.uint8), split[b"fine_labels"]
            self.classes = [name.decode() for name in meta[b"fine_label_names"]]
        except (KeyError, AttributeError, TypeError):
            raise CifarLayoutError(f"{folder}: pickles without b'data', b'fine_labels' or b'fine_label_names'") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
            raise CifarLayoutError(f"{folder}: b'data' must be (N, 3072) uint8 with N labels, got {data.shape} and "
                                   f"{len(labels)} labels")
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()).float().div_(255)
        self.images = (images - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        self.labels = torch.tensor(labels, dtype=torch.long)
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes):
            raise CifarLayoutError(f"{folder}: labels outside 0..{len(self.classes) - 1}")
        self.augment = train if augment is None else augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = self.images[i]
        if self.augment:
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            image = torch.nn.functional.pad(image, (4, 4, 4, 4))[:, dy:dy + 32, dx:dx + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image, int(self.labels[i])


def write_cifar100(root: str | Path, train: tuple[np.ndarray, list[int]], test: tuple[np.ndarray, list[int]],
                   classes: int = 100) -> Path:
    """Write images (N, 3072) uint8 and labels in CIFAR-100's python layout (tests, small copies)."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in (("train", train), ("test", test)):
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": np.asarray(data, dtype=np.uint8), b"fine_labels": list(labels)}, f)
    with (folder / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(classes)]}, f)
    return folder
