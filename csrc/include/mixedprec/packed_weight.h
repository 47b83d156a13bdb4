// The packed low-bit weight (mixedprec/formats/, docs/packed-format.md) read inside a kernel:
// ONE view and decoder for every kernel that decodes packed weights (lowbit_linear, lut_conv2d)
// in the CPU, CUDA and SIMT builds. No torch, no CUDA runtime.
//
//   W[f] = channel_scale[c] * codebook[code(f)] if f is kept, else 0
//   f = c * row_length + i, the row-major flat index (c the output channel)
//   code(f) = the k-th bits-bit field of the LSB-first stream `codes`, k = kept_before(f)
//
// kept_before(f) is O(1): code_offsets[f / 64] (formats.PackedWeight.code_offsets, built once
// in Python) counts the kept weights before f's 64-weight block, popcounts of the bitmap bytes
// of that block before f add the rest. A dense weight (no bitmap, no offsets) has k = f.
#pragma once

#include <cstdint>

#include "mixedprec/common.h"

namespace mixedprec {

constexpr int kCodeBlock = 64;  // weights per entry of code_offsets (formats.CODE_BLOCK)

// Raw pointers of one PackedWeight; codebook and channel_scale widened to float32 by the caller.
struct PackedView {
  const uint8_t* codes;         // ceil(kept * bits / 8) bytes: LSB-first stream of the kept codes
  const float* codebook;        // (2^bits,)
  const float* channel_scale;   // (out,)
  const uint8_t* keep_bitmap;   // (ceil(numel / 8),) LSB first, or nullptr: nothing pruned
  const int64_t* code_offsets;  // (ceil(numel / 64),) kept weights before each block, or nullptr
  int64_t out, row_length;      // numel = out * row_length
  int bits;                     // 1..8

  MP_HD int64_t numel() const { return out * row_length; }
  MP_HD int64_t bitmap_bytes() const { return (numel() + 7) / 8; }
};

MP_HD inline int popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// The bits-bit code number `index` of the stream. A code spans at most two bytes (bits <= 8), and
// the second is read only when the code reaches into it, so no byte past the stream is touched.
MP_HD inline uint32_t read_code(const uint8_t* codes, int64_t index, int bits) {
  const int64_t bit = index * bits;
  const int shift = int(bit & 7);
  uint32_t v = codes[bit >> 3];
  if (shift + bits > 8) v |= uint32_t(codes[(bit >> 3) + 1]) << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

MP_HD inline bool is_kept(const PackedView& w, int64_t f) {
  return w.keep_bitmap == nullptr || ((w.keep_bitmap[f >> 3] >> (f & 7)) & 1u);
}

// Number of kept weights before flat index f < numel (f itself when nothing is pruned). Reads
// only bitmap bytes before f's own byte and that byte.
MP_HD inline int64_t kept_before(const PackedView& w, int64_t f) {
  if (w.keep_bitmap == nullptr) return f;
  int64_t k = w.code_offsets[f >> 6];
  for (int64_t byte = (f >> 6) << 3; byte < (f >> 3); ++byte) k += popcount32(w.keep_bitmap[byte]);
  return k + popcount32(w.keep_bitmap[f >> 3] & ((1u << (f & 7)) - 1u));
}

// Kept weights among flat indices [f0, f1), f1 <= numel: two O(1) lookups.
MP_HD inline int64_t kept_between(const PackedView& w, int64_t f0, int64_t f1) {
  if (f0 >= f1) return 0;
  const int64_t end = f1 < w.numel() ? kept_before(w, f1) : kept_before(w, f1 - 1) + (is_kept(w, f1 - 1) ? 1 : 0);
  return end - kept_before(w, f0);
}

// table[code of W[f]], or 0 where f is pruned. `table` is the codebook (levels; the channel
// scale not applied) or a copy of it, e.g. staged in shared memory or pre-scaled.
MP_HD inline float level_at(const PackedView& w, const float* table, int64_t f) {
  if (!is_kept(w, f)) return 0.0f;
  return table[read_code(w.codes, kept_before(w, f), w.bits)];
}

// W[f] of output channel c: channel_scale[c] * level, rounded once (mul_rn).
MP_HD inline float weight_at(const PackedView& w, const float* table, int64_t c, int64_t f) {
  if (!is_kept(w, f)) return 0.0f;
  return mul_rn(w.channel_scale[c], table[read_code(w.codes, kept_before(w, f), w.bits)]);
}

// out[f - f0] = table[code of W[f]] (0 where pruned) for f in [f0, f1): one sequential walk of
// the code stream (kept_before once, then one code per kept weight).
MP_HD inline void decode_run(const PackedView& w, const float* table, int64_t f0, int64_t f1, float* out) {
  int64_t k = f0 < f1 ? kept_before(w, f0) : 0;
  for (int64_t f = f0; f < f1; ++f, ++out) *out = is_kept(w, f) ? table[read_code(w.codes, k++, w.bits)] : 0.0f;
}

}  // namespace mixedprec
