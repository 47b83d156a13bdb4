"""Compression accounting of weight tensors: the papers' rate and the real packed bytes.

Counted: the weight tensor of every Conv/Linear layer; compressed layers at their packed size,
the others at float32 size. Not counted: biases, BatchNorm and other parameters (kept in float;
``ModelReport.other_float_bytes`` of a model lists them; the report model: ``metrics.report``).

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

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["PackedLayerBytes", "packed_layer_bytes", "paper_layer_bits"]

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

    mixedprec/formats/ writes exactly this many bytes per layer; tests check its files against it.
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
