// Decoding packed codes into codebook levels on the CPU, shared by lowbit_linear and lut_conv2d.
// Fast paths: codes at every bits through cpu/lowbit_simd.h (AVX2 and AVX-512 builds); pruned
// positions filled with vexpandps under the bitmap (AVX-512). The scalar loops are their twins
// (the `simd` arguments; cpu_simd in cpu/switches.h selects them in tests).
#pragma once

#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)  // as vec_ops.h: Vec is 16 lanes
#include <immintrin.h>
#define MP_DECODE_AVX512 1
#endif

#include "cpu/lowbit_simd.h"
#include "mixedprec/packed_weight.h"

namespace mixedprec {

// levels[k] = codebook[code first + k] for k < count. Under `simd` (AVX2 or AVX-512 builds),
// cpu/lowbit_simd.h's decode at every bits: codes unpacked in registers, looked up in a
// register-resident codebook (vpermps / vpermt2ps and a blend tree) or gathered.
inline void decode_levels(const uint8_t* codes, const float* codebook, int bits, int64_t first, int64_t count,
                          float* levels, bool simd) {
#if defined(MP_LOWBIT_SIMD)
  // below one vector step the register codebook would cost more than it saves (depthwise rows: 9)
  if (simd && count >= simd::kLanes) return simd::decode_codes(codes, codebook, bits, first, count, levels);
#else
  (void)simd;
#endif
  for (int64_t k = 0; k < count; ++k) levels[k] = codebook[read_code(codes, first + k, bits)];
}

// Set bits pos .. pos + n of `bitmap` (the kept weights among n positions).
inline int64_t count_kept(const uint8_t* bitmap, int64_t nbytes, int64_t pos, int64_t n) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; i += 32) {
    const uint32_t window = read_bits32(bitmap, nbytes, pos + i);
    kept += popcount32(n - i >= 32 ? window : window & ((1u << (n - i)) - 1u));
  }
  return kept;
}

// row[i] = bit pos + i of `bitmap` ? levels[next kept] : 0 for i < n (16 columns per vexpandps
// under `simd`).
inline void expand_kept(const uint8_t* bitmap, int64_t nbytes, int64_t pos, int64_t n, const float* levels, float* row,
                        bool simd) {
  int64_t i = 0, k = 0;
#if defined(MP_DECODE_AVX512)
  if (simd)
    for (; i + 16 <= n; i += 16) {
      const __mmask16 keep = __mmask16(read_bits32(bitmap, nbytes, pos + i) & 0xffffu);
      _mm512_storeu_ps(row + i, _mm512_maskz_expandloadu_ps(keep, levels + k));
      k += popcount32(keep);
    }
#else
  (void)simd;
#endif
  for (; i < n; ++i) row[i] = ((bitmap[(pos + i) >> 3] >> ((pos + i) & 7)) & 1) ? levels[k++] : 0.0f;
}

}  // namespace mixedprec
