// Packed low-bit weights (mixedprec/formats.py) read inside a kernel, and 2-D convolution
// geometry: written once for the CPU, CUDA and SIMT builds.
//
//   W[f] = float(channel_scale[c]) * float(codebook[code(f)])  if f is kept, else 0
//   f = c * row_length + i (row-major flat index, c the output channel)
//   code(f) is the k-th bits-bit field of the LSB-first stream `codes`, k = #kept weights before f.
//
// k is found in O(1): `word_code_offsets[f / 32]` (derived per call from the bitmap, never
// stored) counts the kept weights before bitmap word f / 32, a popcount adds the rest.
#pragma once

#include "mixedprec/common.h"
#include "mixedprec/packed_codes.h"

namespace mixedprec {

struct LutWeight {
  const uint8_t* codes;              // LSB-first stream of the kept weights' codes
  const float* codebook;             // (2^bits,), widened to float32 by the op
  const float* channel_scale;        // (C_out,)
  const uint8_t* keep_bitmap;        // (ceil(numel / 8),) LSB first, or nullptr: nothing pruned
  const int64_t* word_code_offsets;  // (ceil(numel / 32),) kept weights before each 32-bit word
  int bits;                          // 1..8
};

// y[n, co, oh, ow] = sum_{ci, kh, kw} W[co, ci, kh, kw] x[n, g C_in/groups + ci, ih, iw] (+ bias[co]),
// ih = oh * stride_h - pad_h + kh * dil_h (iw alike), g = co / (C_out / groups).
struct Conv2dGeometry {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_height, out_width;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;

  MP_HD int64_t group_in() const { return in_channels / groups; }
  MP_HD int64_t group_out() const { return out_channels / groups; }
  MP_HD int64_t row_length() const { return group_in() * kernel_h * kernel_w; }  // R, the GEMM depth
  MP_HD int64_t out_pixels() const { return out_height * out_width; }
};

MP_HD inline bool is_kept(const LutWeight& w, int64_t f) {
  return w.keep_bitmap == nullptr || ((w.keep_bitmap[f >> 3] >> (f & 7)) & 1u);
}

// Number of kept weights before flat index f (f itself when nothing is pruned).
MP_HD inline int64_t kept_before(const LutWeight& w, int64_t f) {
  if (w.keep_bitmap == nullptr) return f;
  int64_t k = w.word_code_offsets[f >> 5];
  for (int64_t byte = (f >> 5) << 2; byte < (f >> 3); ++byte) k += popcount32(w.keep_bitmap[byte]);
  return k + popcount32(w.keep_bitmap[f >> 3] & ((1u << (f & 7)) - 1u));
}

// W[f] for flat index f of output channel c, the codebook already widened to float.
MP_HD inline float weight_at(const LutWeight& w, const float* codebook, int64_t c, int64_t f) {
  if (!is_kept(w, f)) return 0.0f;
  return mul_rn(w.channel_scale[c], codebook[read_code(w.codes, kept_before(w, f), w.bits)]);
}

// W[f0 .. f1) of output channel c, written to out[(f - f0) * out_stride]: one sequential walk of
// the code stream (a popcount for the start, then one code per kept weight).
MP_HD inline void decode_run(const LutWeight& w, const float* codebook, int64_t c, int64_t f0, int64_t f1,
                             float* out, int64_t out_stride) {
  const float scale = w.channel_scale[c];
  int64_t k = kept_before(w, f0);
  for (int64_t f = f0; f < f1; ++f, out += out_stride) {
    if (is_kept(w, f)) {
      *out = mul_rn(scale, codebook[read_code(w.codes, k, w.bits)]);
      ++k;
    } else {
      *out = 0.0f;
    }
  }
}

}  // namespace mixedprec
