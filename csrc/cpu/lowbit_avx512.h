// AVX-512 decode of packed codes at every bits 1..8, dense and sparse, 16 weights per step
// (torch-free): what lowbit_linear's forward (register-blocked small batches, decode tile,
// backward), cpu/code_decode.h's decode_levels and so lut_conv2d read codes with on AVX-512
// builds, except dense 2-/4-bit GEMV rows, which take lowbit_linear_cpu.cpp's interleaved order.
// The sums follow dot_block's order with 16-lane vectors (lowbit_linear_cpu.cpp), so every path
// and the scalar twin (set_cpu_simd(false)) are bit-identical:
//
//   dot(row, x) = float(lane_sum((c0 + c1) + (c2 + c3))) + sum of the tail, in column order
//   c_j = FMA chain over the 16-column steps t with t % kChains == j
//
// Per step:
//   codes16<B>   16 codes from any bit position: the (at most 16) bytes they span, masked-loaded
//                (never past the stream), broadcast to the four 128-bit lanes; vpshufb brings each
//                code's two bytes into its 32-bit lane, vpsrlvd and a mask finish. A run of 16
//                codes spans 2B bytes, so the bit offset in the first byte stays the same along a
//                dense row: the shuffle and shift vectors are looked up once per offset (8 each).
//   Lut<B>       the codebook in registers: vpermps (B <= 4), vpermt2ps on 32 entries (B = 5),
//                and a vpermt2ps per 32 entries with a blend tree on bits 5.. (B = 6, 7);
//                vgatherdps for B = 8 (measured: faster than 8 vpermt2ps and 7 blends here).
//   DenseSrc     a row without bitmap: codes at 16 B bits per step
//   SparseSrc    a row with a bitmap: the next popcount(m) kept codes decoded and spread over the
//                16 columns by vexpandps under the step's 16 bitmap bits m (0 where pruned)
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/lowbit_avx2.h"  // for_each_step, with_int, kChains, code_bytes (ISA-independent)
#include "mixedprec/packed_weight.h"

namespace mixedprec::avx512 {

constexpr int kMaxRows = 4;  // batch rows per pass of dot_rows (4 x kChains accumulators)

// Per bit offset s of the first code in its byte: the vpshufb control and shifts of codes16<B>.
template <int B>
struct UnpackTables {
  alignas(64) uint8_t shuffle[8][64];
  alignas(64) uint32_t shift[8][16];
  UnpackTables() {
    for (int s = 0; s < 8; ++s)
      for (int j = 0; j < 16; ++j) {
        const int q = s + j * B, k = q >> 3;
        uint8_t* lane = shuffle[s] + 4 * j;
        lane[0] = uint8_t(k);
        lane[1] = (q & 7) + B > 8 ? uint8_t(k + 1) : 0x80;  // the code reaches into the next byte
        lane[2] = lane[3] = 0x80;
        shift[s][j] = uint32_t(q & 7);
      }
  }
};
template <int B>
inline const UnpackTables<B> kUnpack;  // built at static initialization

// The 16 codes from bit position p of a stream of nbytes bytes, in 16 int32 lanes. Codes past
// the stream read as 0; no byte past it is touched.
template <int B>
inline __m512i codes16(const uint8_t* stream, int64_t nbytes, int64_t p) {
  const int64_t byte = p >> 3;
  const int s = int(p & 7);
  const int64_t span = std::min<int64_t>((s + 16 * B + 7) >> 3, nbytes - byte);
  const __mmask16 load = span >= 16 ? __mmask16(0xffff) : __mmask16((1u << std::max<int64_t>(span, 0)) - 1u);
  const __m128i bytes = _mm_maskz_loadu_epi8(load, stream + byte);
  if constexpr (B == 8) {
    return _mm512_cvtepu8_epi32(bytes);  // p is a multiple of 8
  } else {
    const __m512i both = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(bytes),
                                             _mm512_load_si512(kUnpack<B>.shuffle[s]));
    return _mm512_and_si512(_mm512_srlv_epi32(both, _mm512_load_si512(kUnpack<B>.shift[s])),
                            _mm512_set1_epi32((1 << B) - 1));
  }
}

// Levels of codes < 2^B held in registers (B <= 7) or gathered from the codebook (B = 8).
template <int B>
struct Lut {
  static constexpr int kTables = B <= 4 || B == 8 ? 1 : 1 << (B - 4);  // 16-entry registers
  __m512 t[kTables];
  const float* codebook;
  explicit Lut(const float* c) : codebook(c) {
    if constexpr (B < 8) {
      alignas(64) float pad[16 * kTables] = {};
      std::memcpy(pad, c, sizeof(float) << B);
      for (int j = 0; j < kTables; ++j) t[j] = _mm512_load_ps(pad + 16 * j);
    }
  }
  __m512 operator()(__m512i idx) const {
    if constexpr (B <= 4) {
      return _mm512_permutexvar_ps(idx, t[0]);
    } else if constexpr (B == 8) {
      return _mm512_i32gather_ps(idx, codebook, 4);
    } else {
      constexpr int kPairs = kTables / 2;  // 32-entry halves, picked by bits 5..B-1
      __m512 r[kPairs];
      for (int j = 0; j < kPairs; ++j) r[j] = _mm512_permutex2var_ps(t[2 * j], idx, t[2 * j + 1]);
      for (int bit = 5, n = kPairs; n > 1; ++bit, n /= 2) {
        const __mmask16 high = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(1 << bit));
        for (int j = 0; j < n / 2; ++j) r[j] = _mm512_mask_blend_ps(high, r[2 * j], r[2 * j + 1]);
      }
      return r[0];
    }
  }
};

// Row c, dense: levels of columns i .. i + 15 (past the row: the next codes, or 0).
template <int B>
struct DenseSrc {
  const uint8_t* codes; int64_t nbytes, p0; const Lut<B>& lut;
  DenseSrc(const PackedView& w, int64_t c, int64_t nb, const Lut<B>& l)
      : codes(w.codes), nbytes(nb), p0(c * w.row_length * B), lut(l) {}
  __m512 get(int64_t i) { return lut(codes16<B>(codes, nbytes, p0 + i * B)); }
};

// Row c with a bitmap: stateful, steps visited in order.
template <int B>
struct SparseSrc {
  const uint8_t* codes; int64_t nbytes, p;  // bit position of the next kept code
  const uint8_t* bitmap; int64_t bitmap_bytes, f0;
  const Lut<B>& lut;
  SparseSrc(const PackedView& w, int64_t c, int64_t nb, const Lut<B>& l)
      : codes(w.codes), nbytes(nb), p(kept_before(w, c * w.row_length) * B), bitmap(w.keep_bitmap),
        bitmap_bytes(w.bitmap_bytes()), f0(c * w.row_length), lut(l) {}
  __m512 get(int64_t i) {
    const __mmask16 m = __mmask16(read_bits32(bitmap, bitmap_bytes, f0 + i) & 0xffffu);
    const __m512 levels = lut(codes16<B>(codes, nbytes, p));
    p += int64_t(popcount32(m)) * B;
    return _mm512_maskz_expand_ps(m, levels);
  }
};

// lane_sum's order: the 16 lanes added in double, lane 0 first.
inline float lane_sum(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  double s = 0;
  for (float l : lanes) s += l;
  return float(s);
}

// y[m ldy] = scale * dot(row, x[m ldx ..]) for m < MB, the row decoded once.
template <int MB, class Src>
inline void dot_rows(Src src, int64_t in, const float* x, int64_t ldx, float* y, int64_t ldy, float scale) {
  __m512 acc[MB][kChains];
  for (auto& chains : acc)
    for (__m512& a : chains) a = _mm512_setzero_ps();
  const int64_t steps = in / 16;
  for_each_step(steps, [&](int64_t t, auto chain) {
    const __m512 wv = src.get(16 * t);
    for (int m = 0; m < MB; ++m) acc[m][chain] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + 16 * t), wv, acc[m][chain]);
  });
  alignas(64) float tail[16];
  if (steps * 16 < in) _mm512_store_ps(tail, src.get(steps * 16));
  for (int m = 0; m < MB; ++m) {
    float s = lane_sum(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
    for (int64_t i = steps * 16; i < in; ++i) {
      const float p = x[m * ldx + i] * tail[i - steps * 16];
      s += p;
    }
    y[m * ldy] = scale * s;
  }
}

template <int B, class F>
inline void with_source(const PackedView& w, int64_t c, int64_t nbytes, const Lut<B>& lut, F&& f) {
  if (w.keep_bitmap) f(SparseSrc<B>(w, c, nbytes, lut));
  else f(DenseSrc<B>(w, c, nbytes, lut));
}

// y[m, c] (y: m_rows x w.out) for rows c in [c0, c1), x: m_rows x w.row_length.
template <int B>
inline void forward_rows(const PackedView& w, const float* x, int64_t m_rows, int64_t c0, int64_t c1, float* y) {
  const Lut<B> lut(w.codebook);
  const int64_t nbytes = code_bytes(w), in = w.row_length;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxRows)
      with_int<1, kMaxRows>(int(std::min<int64_t>(kMaxRows, m_rows - m0)), [&](auto MB) {
        with_source<B>(w, c, nbytes, lut, [&](auto src) {
          dot_rows<MB()>(src, in, x + m0 * in, in, y + m0 * w.out + c, w.out, w.channel_scale[c]);
        });
      });
}

inline void forward_rows(const PackedView& w, const float* x, int64_t m_rows, int64_t c0, int64_t c1, float* y) {
  with_int<1, 8>(w.bits, [&](auto B) { forward_rows<B()>(w, x, m_rows, c0, c1, y); });
}

// levels[k] = table[code first + k] for k < count (a dense run of the stream, any start).
template <int B>
inline void decode_levels(const uint8_t* codes, const float* table, int64_t first, int64_t count, float* levels) {
  const Lut<B> lut(table);
  const int64_t nbytes = ((first + count) * B + 7) / 8;  // the run's last byte: nothing past it is read
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) _mm512_storeu_ps(levels + k, lut(codes16<B>(codes, nbytes, (first + k) * B)));
  for (; k < count; ++k) levels[k] = table[read_code(codes, first + k, B)];
}

inline void decode_levels(const uint8_t* codes, const float* table, int bits, int64_t first, int64_t count, float* levels) {
  with_int<1, 8>(bits, [&](auto B) { decode_levels<B()>(codes, table, first, count, levels); });
}

}  // namespace mixedprec::avx512
