"""Finetuning a converted model: masks, codebooks and scales frozen, latent weights trained."""
from __future__ import annotations

import os

from torch import nn
from torch.utils.data import Dataset

from mixedprec.opq.layers import _OPQWeight
from mixedprec.training import fit


def finetune(model: nn.Module, train_set: Dataset, *, epochs: int, lr: float = 0.01, batch_size: int = 64,
             weight_decay: float = 5e-4, seed: int = 0, device="cpu", checkpoint: str | os.PathLike | None = None,
             quiet: bool = False) -> nn.Module:
    """SGD (momentum, cosine schedule) through the straight-through estimator of the OPQ layers.

    The compression state is held in buffers, so the optimizer never sees it; pruned latent
    weights get zero gradient (and zero weight decay, being zero) and stay zero. With
    ``checkpoint``, the state is saved after every epoch and a run restarted with the same
    arguments resumes where it stopped (as SBS's loops do).
    """
    if not any(isinstance(m, _OPQWeight) for m in model.modules()):
        raise ValueError("finetune: model has no OPQ layer; run mixedprec.opq.convert(model, plan) first")
    return fit(model, train_set, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
               device=device, checkpoint=checkpoint, phase="OPQ finetune", quiet=quiet)
