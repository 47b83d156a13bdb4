"""scikit-learn's handwritten digits (1797 images, 8x8, 10 classes), shipped with scikit-learn."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import TensorDataset


class DigitsSplit(NamedTuple):
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one image


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Images as float32 (N, 1, 8, 8) scaled to [0, 1], labels int64; a stratified split
    that depends only on ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):  # stratified: the same share of every class in the test split
        idx = np.flatnonzero(bunch.target == c)
        test_idx.append(rng.permutation(idx)[: round(len(idx) * test_fraction)])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    test_mask = torch.from_numpy(test_mask)
    return DigitsSplit(
        TensorDataset(images[~test_mask], labels[~test_mask]),
        TensorDataset(images[test_mask], labels[test_mask]),
        10,
        (1, 8, 8),
    )
