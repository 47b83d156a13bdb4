"""The packed low-bit weight format shared by SBS and OPQ results (DESIGN.md "Packed weights").

One layer's weight W (C_out, ...) is stored as:

    codebook       (2^bits,) float16 or float32 the layer's levels (a LUT), shared by all channels
    channel_scale  (C_out,) float16 or float32  W[c, i] = channel_scale[c] * codebook[code]
    keep_bitmap    (ceil(numel / 8),) uint8     bit i (LSB first) set iff weight i (row-major) is
                   or None                      kept; None when nothing is pruned
    codes          (ceil(kept * bits / 8),) uint8  the bits-bit codes of the kept weights, row-major,
                                                as one LSB-first bit stream (code k occupies bits
                                                k*bits .. k*bits + bits - 1)

Its byte size is ``mixedprec.metrics.packed_layer_bytes`` (sections padded to 16 bytes plus a
64-byte header when saved). ``code_offsets`` is derived on construction, not stored: for a sparse
weight, (ceil(numel / 64),) int64, the kept weights before each 64-weight block of the row-major
flat weight (None for a dense one, whose weight f has code f). It is the one index every kernel
reads (csrc/include/mixedprec/packed_weight.h, mixedprec/backends/triton/): the code of weight f is number
code_offsets[f // 64] + (kept weights of f's block before f), one popcount away.

Files (``save_file`` / ``load_file``): safetensors (no pickle), written atomically (temp file,
fsync, rename), with a format version and a CRC32 per tensor in the metadata; loading rejects
truncated, corrupted, inconsistent and newer-version files with a ValueError naming the problem.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mixedprec.atomic import write_atomically

MAX_BITS = 8
CODE_BLOCK = 64  # weights per entry of code_offsets
FORMAT_NAME = "mixedprec.packed"
# 2: float32 codebooks allowed (version 1 held float16 only); 3: models of any architecture
# (mixedprec subtrees described by module path, loaded into a freshly built model; nn/serialization.py)
FORMAT_VERSION = 3


@dataclass(frozen=True)
class PackedWeight:
    shape: tuple[int, ...]
    bits: int
    codebook: Tensor
    channel_scale: Tensor
    codes: Tensor
    keep_bitmap: Tensor | None = None
    code_offsets: Tensor | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _validate(self)
        object.__setattr__(self, "code_offsets", _code_offsets(self))

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
    kept = numel if p.keep_bitmap is None else int(_unpack_bits(p.keep_bitmap, 1, numel).sum())
    if p.codes.dtype != torch.uint8 or p.codes.shape != (-(-kept * p.bits // 8),):
        raise ValueError(f"{op}: codes must be uint8 of shape ({-(-kept * p.bits // 8)},) for {kept} kept "
                         f"{p.bits}-bit codes, got {p.codes.dtype} {tuple(p.codes.shape)}")
    devices = {t.device for t in (p.codebook, p.channel_scale, p.codes) + ((p.keep_bitmap,) if p.keep_bitmap is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")


# ---------------------------------------------------------------------------------------------
# files

_FIELDS = ("codebook", "channel_scale", "codes", "keep_bitmap")


def packed_tensors(p: PackedWeight, prefix: str) -> tuple[dict[str, Tensor], dict]:
    """The stored tensors of ``p`` under ``prefix`` and its JSON-able description."""
    tensors = {f"{prefix}{name}": getattr(p, name) for name in _FIELDS if getattr(p, name) is not None}
    return tensors, {"shape": list(p.shape), "bits": p.bits}


def packed_from_tensors(tensors: dict[str, Tensor], prefix: str, description: dict) -> PackedWeight:
    """Inverse of ``packed_tensors``; a ValueError names the layer whose data is inconsistent."""
    name = prefix.rstrip(".") or "<root>"
    try:
        shape, bits = tuple(int(s) for s in description["shape"]), description["bits"]
        fields = {f: tensors.get(f"{prefix}{f}") for f in _FIELDS}
        missing = [f for f in _FIELDS[:3] if fields[f] is None]
        if missing:
            raise ValueError(f"missing tensors {missing}")
        return PackedWeight(shape, bits, **fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"packed layer {name!r} is inconsistent: {exc}") from None


def save_file(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict) -> None:
    """Writes ``tensors`` and the JSON-able ``metadata`` as a versioned safetensors file, atomically:
    a crash leaves either the old file or the new one, never a partial one."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "content": json.dumps(metadata),
              "crc32": json.dumps({k: _crc32(v) for k, v in tensors.items()})}
    write_atomically(path, _sorted_header(save(tensors, metadata=header)))


def _sorted_header(data: bytes) -> bytes:
    """The safetensors bytes with their JSON header's keys sorted: safetensors writes the header
    from hash maps, in an order that changes from process to process, and a file's bytes should
    depend on its content alone."""
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data that follows to 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + length:]


def load_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a file written by ``save_file``, checked: a ValueError says what is wrong."""
    from safetensors.torch import load

    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from None
    if header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a mixedprec packed model (format {header.get('format')!r}, expected {FORMAT_NAME!r})")
    try:
        version = int(header["version"])
        content, checksums = json.loads(header["content"]), json.loads(header["crc32"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: malformed mixedprec header: {exc}") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: written by packed format version {version}, this mixedprec reads versions "
                         f"up to {FORMAT_VERSION}; upgrade mixedprec to load it")
    if set(checksums) != set(tensors):
        raise ValueError(f"{path}: tensors {sorted(set(checksums) ^ set(tensors))} are missing or unexpected")
    for name, t in tensors.items():
        if _crc32(t) != checksums[name]:
            raise ValueError(f"{path}: tensor {name!r} is corrupted (CRC32 mismatch)")
    return tensors, content


def _crc32(t: Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else 0
