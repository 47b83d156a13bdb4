"""Argument checks shared by the ops: each raises a ValueError that names the op and the argument."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mixedprec.formats import PackedWeight

MAX_CANDIDATE_BITS = 8

# Checking clip/threshold/codebook values reads them on the host: one device sync per call on
# CUDA. Long GPU runs whose parameters are known to be valid may set it to False.
check_values = True
SMALLEST_CLIP = torch.finfo(torch.float32).smallest_normal  # see clip()


def tensor(op: str, name: str, t, device: torch.device | None = None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")


def bits(op: str, value) -> tuple[int, ...]:
    try:
        bits = tuple(value)
    except TypeError:
        raise ValueError(f"{op}: bits must be a sequence of ints, got {value!r}") from None
    if not bits or len(bits) > MAX_CANDIDATE_BITS:
        raise ValueError(f"{op}: bits must hold 1 to {MAX_CANDIDATE_BITS} bitwidths, got {bits!r}")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
            raise ValueError(f"{op}: every entry of bits must be an int in 1..16, got {bits!r}")
    if any(b1 >= b2 for b1, b2 in zip(bits, bits[1:])):
        raise ValueError(f"{op}: bits must be strictly ascending, got {bits!r}")
    return bits


def clip(op: str, value: Tensor) -> None:
    """clip v > 0, finite and not subnormal: the ops compute x * (1 / v), and 1 / v overflows for
    v < 2^-128 (0 * inf would make x = 0 NaN)."""
    if not check_values or value.is_meta:
        return
    v = value.item()  # 0-dim: one host read
    if not (math.isfinite(v) and v >= SMALLEST_CLIP):
        raise ValueError(f"{op}: clip must be finite and > 0 (at least float32's smallest normal number, "
                         f"{SMALLEST_CLIP:.4g}), got {v}")


def finite(op: str, name: str, t: Tensor) -> None:
    if check_values and not t.is_meta and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} must be finite, got {t.detach().cpu().tolist()}")


def conv_pair(op: str, name: str, value, minimum: int) -> list[int]:
    pair = (value, value) if isinstance(value, int) else value
    if (isinstance(value, bool) or not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not _int_at_least(pair[0], minimum) or not _int_at_least(pair[1], minimum)):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return list(pair)


def _int_at_least(value, minimum: int) -> bool:  # called per element: any() over a generator costs ~1 us a pair
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def bias(op: str, value, x: Tensor, out_features: int) -> None:
    """None, or a float tensor (out_features,) on x's device."""
    if value is not None:
        tensor(op, "bias", value, x.device)
        if tuple(value.shape) != (out_features,):
            raise ValueError(f"{op}: bias must have shape ({out_features},), got {tuple(value.shape)}")


def packed_weight(op: str, x: Tensor, packed, ndim: int, layout: str) -> None:
    """``packed`` is a ``ndim``-D PackedWeight whose tensors live on x's device and are constant."""
    if not isinstance(packed, PackedWeight):
        raise ValueError(f"{op}: packed must be a mixedprec.formats.PackedWeight, got {type(packed).__name__}")
    if len(packed.shape) != ndim:
        raise ValueError(f"{op}: packed must hold a {layout} weight, got shape {packed.shape}")
    if packed.codes.device != x.device:  # PackedWeight holds its tensors on one device
        raise ValueError(f"{op}: packed is on {packed.codes.device} but x is on {x.device} (its codes)")
    for name in ("codebook", "channel_scale"):  # codes and keep_bitmap are uint8: they cannot require grad
        if getattr(packed, name).requires_grad:
            raise ValueError(f"{op}: the packed weight's {name} requires grad, but packed weights must not require "
                             f"grad (they are constant: finetune the float weights, then pack again)")
