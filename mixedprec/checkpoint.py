"""Checkpoints: a training loop's state after each epoch, resumed exactly; a finished stage's model.

One file per loop (float training, SBS search, SBS finetune, OPQ finetune) holds the phase name,
the model's, optimizer's and scheduler's state, the per-epoch history, torch's global RNG state
and, where the loop draws its data order from a generator of its own, that generator's state.
It is written with ``torch.save`` but holds tensors and plain containers only, and is read back
with ``weights_only=True`` (no code runs when a checkpoint is loaded). ``save_model`` keeps a
finished stage: a model's state with a JSON record about it.
"""
from __future__ import annotations

import io
import json
import os

import torch
from torch import nn

from mixedprec.atomic import write_atomically


def save(path: str | os.PathLike, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
         history: list[dict], generator: torch.Generator | None = None) -> None:
    """Writes the state after the last epoch of ``history``; a crash mid-write keeps the previous file."""
    state = {"phase": phase, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "history": history, "rng": torch.get_rng_state(),
             "generator": None if generator is None else generator.get_state()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue())


def resume(path: str | os.PathLike, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
           generator: torch.Generator | None = None) -> list[dict]:
    """Loads a checkpoint of ``phase`` into the loop's objects; returns its history (epochs done)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{phase}: checkpoint {os.fspath(path)} is not readable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("phase") != phase:
        found = state.get("phase") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{phase}: checkpoint {os.fspath(path)} holds a {found!r} run, not {phase!r}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    return state["history"]



def save_model(path: str | os.PathLike, model: nn.Module, info: dict) -> None:
    """A finished stage: the model's state and JSON-able ``info`` about it, written atomically."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "info": json.dumps(info)}, buffer)
    write_atomically(path, buffer.getvalue())


def load_model(path: str | os.PathLike, model: nn.Module) -> dict:
    """Loads a ``save_model`` file's state into ``model`` (built as it was); returns its info."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        return json.loads(state["info"])
    except Exception as exc:  # a truncated file, or a model that is not the one saved
        raise ValueError(f"checkpoint {os.fspath(path)} does not load ({type(exc).__name__}: {exc})") from None
