"""PackedWeight: one layer's packed weight (the format: mixedprec/formats/__init__.py), validated
when it is made, with the one index the kernels read (``code_offsets``); ``pack_weight`` builds
it from integer codes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

MAX_BITS = 8
CODE_BLOCK = 64  # weights per entry of code_offsets


@dataclass(frozen=True)
class PackedWeight:
    shape: tuple[int, ...]
    bits: int
    codebook: Tensor
    channel_scale: Tensor
    codes: Tensor
    keep_bitmap: Tensor | None = None
    # Derived on construction, never stored (files.FIELDS): the index and the float32 tables the
    # kernels read (views of the stored tables where those are float32), so no call converts them.
    code_offsets: Tensor | None = field(init=False, repr=False, compare=False)
    codebook_float32: Tensor = field(init=False, repr=False, compare=False)
    channel_scale_float32: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _validate(self)
        # Normal tensors even when first built under torch.inference_mode (a layer rebuilds its
        # PackedWeight at its next forward), so that autograd may save them later; an inference-mode
        # bitmap is copied out too: the C++ glue checks a sparse index once per version of its
        # tensors, and inference tensors have none.
        with torch.inference_mode(False):
            if self.keep_bitmap is not None and self.keep_bitmap.is_inference():
                object.__setattr__(self, "keep_bitmap", self.keep_bitmap.clone())
            object.__setattr__(self, "code_offsets", _code_offsets(self))
            object.__setattr__(self, "codebook_float32", self.codebook.detach().to(torch.float32))
            object.__setattr__(self, "channel_scale_float32", self.channel_scale.detach().to(torch.float32))

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def row_length(self) -> int:
        """Weights per output channel (C_in/groups * kh * kw for a conv)."""
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def numel(self) -> int:
        return self.out_channels * self.row_length

    @property
    def kept(self) -> int:
        """Kept weights: codes in the stream."""
        if self.keep_bitmap is None:
            return self.numel
        last = self.code_offsets.numel() - 1
        tail = _unpack_bits(self.keep_bitmap[last * CODE_BLOCK // 8:], 1, self.numel - last * CODE_BLOCK)
        return int(self.code_offsets[-1]) + int(tail.sum())

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def keep_mask(self) -> Tensor:
        """bool tensor of the weight's shape."""
        if self.keep_bitmap is None:
            return torch.ones(self.shape, dtype=torch.bool, device=self.device)
        return _unpack_bits(self.keep_bitmap, 1, self.numel).bool().reshape(self.shape)

    def code_values(self) -> Tensor:
        """int64 codes of the weight's shape (0 at pruned positions)."""
        kept_codes = _unpack_bits(self.codes, self.bits, self.kept)
        if self.keep_bitmap is None:
            return kept_codes.reshape(self.shape)
        out = torch.zeros(self.numel, dtype=torch.int64, device=self.device)
        out[self.keep_mask().flatten()] = kept_codes
        return out.reshape(self.shape)

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight, computed as the kernels do: float(scale) * float(codebook[code])."""
        levels = self.codebook.to(dtype)[self.code_values()]
        scale = self.channel_scale.to(dtype).reshape((-1,) + (1,) * (len(self.shape) - 1))
        return torch.where(self.keep_mask(), scale * levels, torch.zeros((), dtype=dtype, device=self.device))

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.shape, self.bits, self.codebook.to(device), self.channel_scale.to(device),
                            self.codes.to(device), None if self.keep_bitmap is None else self.keep_bitmap.to(device))


def pack_weight(codes: Tensor, codebook: Tensor, channel_scale: Tensor, bits: int,
                keep_mask: Tensor | None = None, *, codebook_dtype: torch.dtype = torch.float16) -> PackedWeight:
    """Packs integer ``codes`` (the weight's shape, values in [0, 2^bits)) of a layer.

    The codebook is stored as ``codebook_dtype``: float16 (half the bytes) or float32 (levels
    that float16 would round, e.g. a finetuned uniform grid with an offset, kept exact).

    ``keep_mask`` (bool, the weight's shape) marks kept weights; codes at pruned positions are
    dropped. A mask with nothing pruned is stored as no bitmap.
    """
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"pack_weight: bits must be an int in 1..{MAX_BITS}, got {bits!r}")
    if codes.dtype.is_floating_point or codes.dim() < 1:
        raise ValueError(f"pack_weight: codes must be an integer tensor with an output-channel dim, got {codes.dtype}, shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"pack_weight: codes must lie in [0, {1 << bits}) for bits={bits}, "
                         f"got [{int(codes.min())}, {int(codes.max())}]")
    if codebook.shape != (1 << bits,):
        raise ValueError(f"pack_weight: codebook must have shape ({1 << bits},) for bits={bits}, got {tuple(codebook.shape)}")
    if codebook_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"pack_weight: codebook_dtype must be torch.float16 or torch.float32, got {codebook_dtype}")
    flat = codes.reshape(-1).to(torch.int64)
    bitmap = None
    if keep_mask is not None:
        if keep_mask.dtype != torch.bool or keep_mask.shape != codes.shape:
            raise ValueError(f"pack_weight: keep_mask must be a bool tensor of shape {tuple(codes.shape)}, "
                             f"got {keep_mask.dtype} {tuple(keep_mask.shape)}")
        if not bool(keep_mask.all()):
            flat = flat[keep_mask.reshape(-1)]
            bitmap = _pack_bits(keep_mask.reshape(-1).to(torch.int64), 1)
    return PackedWeight(tuple(codes.shape), bits, codebook.to(codebook_dtype), channel_scale,
                        _pack_bits(flat, bits), bitmap)


def _pack_bits(values: Tensor, bits: int) -> Tensor:
    """LSB-first bit stream of ``bits``-bit values, as uint8 bytes."""
    v = values.cpu().numpy().astype(np.uint8)
    stream = np.unpackbits(v[:, None], axis=1, count=bits, bitorder="little").reshape(-1)
    return torch.from_numpy(np.packbits(stream, bitorder="little")).to(values.device)


def _unpack_bits(data: Tensor, bits: int, count: int) -> Tensor:
    stream = np.unpackbits(data.cpu().numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy(stream.astype(np.int64) @ weights).to(data.device)


def _code_offsets(p: PackedWeight) -> Tensor | None:
    """(ceil(numel / 64),) int64: the kept weights before each 64-weight block; None when dense."""
    if p.keep_bitmap is None:
        return None
    mask = p.keep_mask().reshape(-1).cpu()
    blocks = -(-p.numel // CODE_BLOCK)
    per_block = torch.nn.functional.pad(mask.to(torch.int64), (0, blocks * CODE_BLOCK - p.numel)).reshape(blocks, -1).sum(1)
    return (per_block.cumsum(0) - per_block).to(p.device)


def check_entries(op: str, name: str, t: Tensor, positive: bool) -> None:
    """A ValueError naming the first entry of ``t`` that is not finite (or not > 0 when ``positive``)."""
    bad = ~torch.isfinite(t)
    if positive:
        bad |= ~(t > 0)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.flatten())[0])
        raise ValueError(f"{op}: {name} must be finite{' and > 0' if positive else ''}, but {name}[{i}] = "
                         f"{t.flatten()[i].item()} ({int(bad.sum())} of {bad.numel()} entries invalid)")


def _validate(p: PackedWeight) -> None:
    op = "PackedWeight"
    if len(p.shape) < 1 or any(int(s) < 1 for s in p.shape):
        raise ValueError(f"{op}: shape must have positive sizes, got {p.shape}")
    if not isinstance(p.bits, int) or not 1 <= p.bits <= MAX_BITS:
        raise ValueError(f"{op}: bits must be an int in 1..{MAX_BITS}, got {p.bits!r}")
    if p.codebook.dtype not in (torch.float16, torch.float32) or p.codebook.shape != (1 << p.bits,):
        raise ValueError(f"{op}: codebook must be float16 or float32 of shape ({1 << p.bits},), got {p.codebook.dtype} "
                         f"{tuple(p.codebook.shape)}")
    if p.channel_scale.dtype not in (torch.float16, torch.float32) or p.channel_scale.shape != (p.shape[0],):
        raise ValueError(f"{op}: channel_scale must be float16 or float32 of shape ({p.shape[0]},), "
                         f"got {p.channel_scale.dtype} {tuple(p.channel_scale.shape)}")
    check_entries(op, "codebook", p.codebook, positive=False)
    check_entries(op, "channel_scale", p.channel_scale, positive=True)
    numel = int(np.prod(p.shape, dtype=np.int64))
    if p.keep_bitmap is not None and (p.keep_bitmap.dtype != torch.uint8 or p.keep_bitmap.shape != (-(-numel // 8),)):
        raise ValueError(f"{op}: keep_bitmap must be uint8 of shape ({-(-numel // 8)},), got "
                         f"{p.keep_bitmap.dtype} {tuple(p.keep_bitmap.shape)}")
    if p.keep_bitmap is not None and numel % 8 and int(p.keep_bitmap[-1]) >> numel % 8:
        raise ValueError(f"{op}: keep_bitmap's bits past the weight's {numel} entries must be 0 (its last byte is "
                         f"{int(p.keep_bitmap[-1]):#04x})")
    kept = numel if p.keep_bitmap is None else int(_unpack_bits(p.keep_bitmap, 1, numel).sum())
    if p.codes.dtype != torch.uint8 or p.codes.shape != (-(-kept * p.bits // 8),):
        raise ValueError(f"{op}: codes must be uint8 of shape ({-(-kept * p.bits // 8)},) for {kept} kept "
                         f"{p.bits}-bit codes, got {p.codes.dtype} {tuple(p.codes.shape)}")
    devices = {t.device for t in (p.codebook, p.channel_scale, p.codes) + ((p.keep_bitmap,) if p.keep_bitmap is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
