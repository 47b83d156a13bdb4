"""Compression accounting of weight tensors: the papers' rate and the real packed bytes.

Counted: the weight tensor of every Conv/Linear layer; compressed layers at their packed size,
the others at float32 size. Not counted: biases, BatchNorm and other parameters (kept in float;
``CompressionReport.other_float_bytes`` of a model lists them).

- paper rate = 32 bits * weights / (sum of b-bit codes of kept weights; 32 bits per weight of
  float layers) -- the convention of the pruning+quantization papers (no masks, codebooks, scales).
- real rate  = float32 bytes / packed bytes, where ``packed_layer_bytes`` is the size of one
  layer in the packed format (DESIGN.md "Packed weights", docs/opq.md "Bytes"):

      header          64 bytes: shape, bits, flags, kept count, section offsets
      codebook        2^b fp16 or fp32 values                  -> (2 or 4) * 2^b bytes
      channel_scale   one fp16 or fp32 value per output channel -> C_out * (2 or 4) bytes
      keep_bitmap     1 bit per weight, only when a weight is pruned -> ceil(numel / 8) bytes
      codes           b bits per kept weight, packed            -> ceil(kept * b / 8) bytes

  every section after the header padded to a multiple of 16 bytes (aligned vector loads).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "CompressedWeight", "CompressionReport", "LayerCompression", "PackedLayerBytes",
    "compression_report", "packed_layer_bytes", "paper_layer_bits",
]

FLOAT_BITS = 32
HEADER_BYTES = 64
SECTION_ALIGN = 16
SCALE_DTYPES = CODEBOOK_DTYPES = (torch.float16, torch.float32)


class PackedLayerBytes(NamedTuple):
    """Bytes of each section of one packed layer (ints, or numpy arrays for many candidates)."""
    header: int
    codebook: int
    channel_scale: int
    keep_bitmap: int
    codes: int

    @property
    def total(self):
        return self.header + self.codebook + self.channel_scale + self.keep_bitmap + self.codes


def _aligned(nbytes):
    return -(-nbytes // SECTION_ALIGN) * SECTION_ALIGN


def packed_layer_bytes(numel: int, out_channels: int, kept, bits, scale_dtype: torch.dtype = torch.float16,
                       codebook_dtype: torch.dtype = torch.float16) -> PackedLayerBytes:
    """Size of one layer in the packed format; ``kept`` and ``bits`` may be numpy int arrays.

    formats.py writes exactly this many bytes per layer; tests check its files against it.
    """
    kept, bits = np.asarray(kept, dtype=np.int64), np.asarray(bits, dtype=np.int64)
    if numel < 1 or out_channels < 1 or numel % out_channels:
        raise ValueError(f"packed_layer_bytes: numel ({numel}) must be a positive multiple of "
                         f"out_channels ({out_channels})")
    if np.any((kept < 0) | (kept > numel)):
        raise ValueError(f"packed_layer_bytes: kept must be in 0..numel={numel}, got {kept}")
    if np.any((bits < 1) | (bits > 8)):
        raise ValueError(f"packed_layer_bytes: bits must be in 1..8, got {bits}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"packed_layer_bytes: scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise ValueError(f"packed_layer_bytes: codebook_dtype must be torch.float16 or torch.float32, got {codebook_dtype}")
    result = PackedLayerBytes(
        header=HEADER_BYTES,
        codebook=_aligned((1 << bits) * codebook_dtype.itemsize),
        channel_scale=_aligned(out_channels * scale_dtype.itemsize),
        keep_bitmap=_aligned(-(-numel // 8)) * (kept < numel),
        codes=_aligned(-(-kept * bits // 8)),
    )
    return PackedLayerBytes(*(int(v) if np.ndim(v) == 0 else v for v in result))


def paper_layer_bits(kept, bits):
    """The papers' count: b bits for each kept weight's code, nothing else."""
    return np.asarray(kept, dtype=np.int64) * np.asarray(bits, dtype=np.int64)


class CompressedWeight(NamedTuple):
    """What a compressed layer reports about its weight (``module.compressed_weight()``)."""
    numel: int
    out_channels: int
    kept: int
    bits: int
    scale_dtype: torch.dtype
    codebook_dtype: torch.dtype = torch.float16


@dataclass(frozen=True)
class LayerCompression:
    name: str
    numel: int
    kept: int
    bits: int | None      # None: stored as float32
    packed_bytes: int
    paper_bits: int

    @classmethod
    def compressed(cls, name: str, weight: CompressedWeight) -> LayerCompression:
        packed = packed_layer_bytes(weight.numel, weight.out_channels, weight.kept, weight.bits, weight.scale_dtype,
                                    weight.codebook_dtype)
        return cls(name, weight.numel, weight.kept, weight.bits, packed.total, int(paper_layer_bits(weight.kept, weight.bits)))

    @classmethod
    def float32(cls, name: str, numel: int) -> LayerCompression:
        return cls(name, numel, numel, None, numel * FLOAT_BITS // 8, numel * FLOAT_BITS)

    @property
    def float_bytes(self) -> int:
        return self.numel * FLOAT_BITS // 8

    @property
    def real_rate(self) -> float:
        return self.float_bytes / self.packed_bytes

    @property
    def paper_rate(self) -> float:
        return self.numel * FLOAT_BITS / max(self.paper_bits, 1)


@dataclass(frozen=True)
class CompressionReport:
    layers: tuple[LayerCompression, ...]
    other_float_bytes: int = 0  # biases, BatchNorm, ...: outside the rates

    @property
    def float_bytes(self) -> int:
        return sum(layer.float_bytes for layer in self.layers)

    @property
    def packed_bytes(self) -> int:
        return sum(layer.packed_bytes for layer in self.layers)

    @property
    def paper_bits(self) -> int:
        return sum(layer.paper_bits for layer in self.layers)

    @property
    def real_rate(self) -> float:
        return self.float_bytes / self.packed_bytes

    @property
    def paper_rate(self) -> float:
        return self.float_bytes * 8 / max(self.paper_bits, 1)

    def table(self) -> str:
        rows = [f"{'layer':<28}{'weights':>10}{'kept':>9}{'bits':>5}{'packed B':>10}{'real x':>8}{'paper x':>9}"]
        for layer in self.layers:
            bits = "fp32" if layer.bits is None else str(layer.bits)
            rows.append(f"{layer.name:<28}{layer.numel:>10}{layer.kept:>9}{bits:>5}{layer.packed_bytes:>10}"
                        f"{layer.real_rate:>8.2f}{layer.paper_rate:>9.2f}")
        rows.append(f"{'total':<28}{sum(l.numel for l in self.layers):>10}{sum(l.kept for l in self.layers):>9}"
                    f"{'':>5}{self.packed_bytes:>10}{self.real_rate:>8.2f}{self.paper_rate:>9.2f}")
        if self.other_float_bytes:
            rows.append(f"(other float parameters and buffers, not in the rates: {self.other_float_bytes} bytes)")
        return "\n".join(rows)


def compression_report(model: nn.Module) -> CompressionReport:
    """Per-layer and total rates of a model: modules with ``compressed_weight()`` count packed,
    other Conv/Linear layers at float32 size."""
    layers, counted = [], set()
    for name, module in model.named_modules():
        if hasattr(module, "compressed_weight"):
            layers.append(LayerCompression.compressed(name, module.compressed_weight()))
            counted.update(id(t) for t in module.buffers(recurse=False))  # its codebook, scales, mask
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            layers.append(LayerCompression.float32(name, module.weight.numel()))
        else:
            continue
        counted.add(id(module.weight))
    if not layers:
        raise ValueError("compression_report: model has no Conv or Linear layer")
    other = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                if id(t) not in counted and t.dtype.is_floating_point)
    return CompressionReport(tuple(layers), other)
