// Reading the packed format's bit streams (mixedprec/formats.py), shared by every kernel that
// decodes packed weights (lowbit_linear, lut_conv2d) on the CPU, CUDA and SIMT builds.
#pragma once

#include <cstdint>

#include "mixedprec/common.h"

namespace mixedprec {

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

}  // namespace mixedprec
