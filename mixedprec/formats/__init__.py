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
So are ``codebook_float32`` and ``channel_scale_float32``, the tables as the kernels take them.

``packed.py`` holds PackedWeight and its index; ``files.py`` the files (``save_file`` /
``load_file``): safetensors, atomic writes, a format version and a CRC32 per tensor.
"""
from mixedprec.formats.files import (FIELDS, FORMAT_NAME, FORMAT_VERSION, crc32, load_file, packed_from_tensors,
                                    packed_tensors, save_file)
from mixedprec.formats.packed import CODE_BLOCK, MAX_BITS, PackedWeight, check_entries, pack_weight

__all__ = ["CODE_BLOCK", "FIELDS", "FORMAT_NAME", "FORMAT_VERSION", "MAX_BITS", "PackedWeight", "check_entries",
           "crc32", "load_file", "pack_weight", "packed_from_tensors", "packed_tensors", "save_file"]
