// Reading the packed low-bit weight format (mixedprec/formats.py) one weight at a time, shared by
// the CPU, CUDA and SIMT builds. W[c, i] = channel_scale[c] * codebook[code] at kept positions, 0
// elsewhere; the codes of kept weights form one LSB-first bit stream in row-major order.
#pragma once

#include <cstdint>

#include "mixedprec/common.h"
#include "mixedprec/packed_codes.h"

namespace mixedprec {

constexpr int kCodeGroup = 32;  // columns per entry of group_code_offsets (formats.GROUP)

// Raw pointers of one PackedWeight; codebook and channel_scale already widened to float32.
struct PackedView {
  const float* codebook;             // (2^bits,)
  const float* channel_scale;        // (out,)
  const uint8_t* codes;              // ceil(kept * bits / 8) bytes
  const uint8_t* keep_bitmap;        // ceil(out * in / 8) bytes, nullptr when nothing is pruned
  int64_t bitmap_bytes;
  const int64_t* row_code_offsets;   // (out + 1,)
  const int32_t* group_code_offsets; // (out, groups): kept codes of a row before each group
  int64_t out, in, groups;
  int bits;
};

// Up to 32 bits of `bitmap` starting at bit `pos` (bits past the end read as 0).
MP_HD inline uint32_t read_bits32(const uint8_t* bitmap, int64_t nbytes, int64_t pos) {
  const int64_t byte = pos >> 3;
  uint64_t v = 0;
  for (int j = 0; j < 5; ++j)
    if (byte + j < nbytes) v |= uint64_t(bitmap[byte + j]) << (8 * j);
  return uint32_t(v >> (pos & 7));
}

// codebook[code of W[c, i]], or 0 where W[c, i] is pruned (the channel scale not applied).
MP_HD inline float packed_level(const PackedView& w, int64_t c, int64_t i) {
  int64_t index = c * w.in + i;
  if (w.keep_bitmap != nullptr) {
    const int64_t group = i / kCodeGroup;
    const int lane = int(i % kCodeGroup);
    const uint32_t window = read_bits32(w.keep_bitmap, w.bitmap_bytes, index - lane);
    if (((window >> lane) & 1u) == 0u) return 0.0f;
    index = w.row_code_offsets[c] + w.group_code_offsets[c * w.groups + group] +
            popcount32(window & ((1u << lane) - 1u));
  }
  return w.codebook[read_code(w.codes, index, w.bits)];
}

}  // namespace mixedprec
