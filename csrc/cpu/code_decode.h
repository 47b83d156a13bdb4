// Decoding packed codes into codebook levels on the CPU, shared by lowbit_linear and lut_conv2d.
// Fast paths (AVX-512): codes of every bits decoded 16 at a time (cpu/lowbit_avx512.h), 4- and
// 2-bit codes of the interleaved order with one vpermps in a register-resident codebook; pruned
// positions filled with vexpandps under the bitmap. The scalar loops are their twins (the `simd`
// arguments; cpu_simd in cpu/switches.h selects them in tests).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)  // as vec_ops.h: Vec is 16 lanes
#include <immintrin.h>
#define MP_DECODE_AVX512 1
#endif

#include "mixedprec/packed_weight.h"
#if defined(MP_DECODE_AVX512)
#include "cpu/lowbit_avx512.h"
#endif

namespace mixedprec {

#if defined(MP_DECODE_AVX512)
// The codebook in a register, looked up by the low 4 bits of a lane: a 2-bit codebook is repeated
// four times, so the bits above a 2-bit code need no masking.
inline __m512 lut_register(const float* codebook, int bits) {
  if (bits == 4) return _mm512_loadu_ps(codebook);
  float repeated[16];
  for (int i = 0; i < 16; ++i) repeated[i] = codebook[i & 3];
  return _mm512_loadu_ps(repeated);
}

// 16 levels of 4- or 2-bit codes starting at byte `src`, in stream order.
template <int kBits>
__m512 decode16(const uint8_t* src, __m512 lut) {
  if constexpr (kBits == 4) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
    const __m128i nibble = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), lut);  // code 2j: low nibble of byte j
  } else {
    uint32_t word;
    std::memcpy(&word, src, 4);
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), shifts), lut);
  }
}

// Levels of the codes from byte `src` on, 16 at a time while 16 remain; returns how many.
template <int kBits>
int64_t decode_run16(const uint8_t* src, int64_t count, __m512 lut, float* levels) {
  int64_t k = 0;
  for (; k + 16 <= count; k += 16, src += 2 * kBits) _mm512_storeu_ps(levels + k, decode16<kBits>(src, lut));
  return k;
}
#endif

// levels[k] = codebook[code first + k] for k < count; under `simd` 16 codes per step at every
// bits (cpu/lowbit_avx512.h).
inline void decode_levels(const uint8_t* codes, const float* codebook, int bits, int64_t first, int64_t count,
                          float* levels, bool simd) {
#if defined(MP_DECODE_AVX512)
  if (simd) return avx512::decode_levels(codes, codebook, bits, first, count, levels);
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
