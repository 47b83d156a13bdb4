// AVX2 kernels of lowbit_linear's CPU forward (torch-free): packed rows decoded 8 weights per
// step straight from the format (include/mixedprec/packed_weight.h), templated over bits 1..8.
// Used where the build has no AVX-512 (cpu/code_decode.h's path); set_cpu_simd(false) selects
// the scalar twin (decode_run + the same dot), which sums in the same order, so every path is
// bit-identical:
//
//   dot(row, x) = float(lane_sum((c0 + c1) + (c2 + c3))) + sum of the tail, in column order
//   c_j = FMA chain of 8 lanes over the 8-column steps t with t % kChains == j
//   tail = the in % 8 last columns, scalar (w * x rounded, then added)
//
// (the order of lowbit_linear_cpu.cpp's dot_block with ATen's 8-lane vectors; lane_sum adds the
// lanes in double, in lane order). Per step, one source gives 8 levels:
//   codes8<B>     8 codes from a 64-bit window of the stream (shift, pdep, vpmovzxbd)
//   RegLut<B>     B <= 6: the codebook in 2^(B-3) registers, vpermps on bits 0..2 and a blend
//                 tree on bits 3..B-1; GatherLut (B = 7, 8): vgatherdps from the codebook
//   DenseSrc      a dense row: codes at 8 B bits per step
//   SparseSrc     a row with a bitmap: 8 kept codes decoded, spread to the 8 columns by a
//                 permutation looked up by the step's 8 bitmap bits (0 where pruned)
// dot_rows decodes a row once for up to kMaxRows batch rows (register-blocked); decode_row
// writes the levels out (the tile path of large batches, the backward).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "mixedprec/packed_weight.h"

namespace mixedprec {

constexpr int kChains = 4;  // independent FMA chains per dot (one would wait on the FMA latency)

// step(t, chain) for t in [0, n), chain = t % kChains as a constant (the accumulators stay in
// registers; an index known only at run time would put them in memory).
template <class Step>
inline void for_each_step(int64_t n, Step&& step) {
  static_assert(kChains == 4);
  using C0 = std::integral_constant<int, 0>;
  using C1 = std::integral_constant<int, 1>;
  using C2 = std::integral_constant<int, 2>;
  using C3 = std::integral_constant<int, 3>;
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) step(t, C0{}), step(t + 1, C1{}), step(t + 2, C2{}), step(t + 3, C3{});
  if (t < n) step(t, C0{});
  if (t + 1 < n) step(t + 1, C1{});
  if (t + 2 < n) step(t + 2, C2{});
}

// Calls f(std::integral_constant<int, v>) for v in [K, N].
template <int K, int N, class F>
inline void with_int(int v, F&& f) {
  if constexpr (K <= N) {
    if (v == K) f(std::integral_constant<int, K>{});
    else with_int<K + 1, N>(v, std::forward<F>(f));
  }
}

// Bytes of the code stream: ceil(kept * bits / 8).
inline int64_t code_bytes(const PackedView& w) {
  const int64_t last = w.numel() - 1;
  const int64_t kept = w.numel() == 0 ? 0 : kept_before(w, last) + (is_kept(w, last) ? 1 : 0);
  return (kept * w.bits + 7) / 8;
}

}  // namespace mixedprec

#if defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__)
#include <immintrin.h>
#define MP_LOWBIT_AVX2 1

namespace mixedprec::avx2 {

constexpr int kMaxRows = 3;  // batch rows per pass of dot_rows (3 x kChains accumulators)

// 64 bits of the byte stream s (nbytes long) from bit p on, at least 57 of them meaningful;
// bytes past the stream read as 0 and are never touched.
[[gnu::noinline]] inline uint64_t bits_at_end(const uint8_t* s, int64_t nbytes, int64_t p) {
  uint64_t v = 0;
  if ((p >> 3) < nbytes) std::memcpy(&v, s + (p >> 3), size_t(nbytes - (p >> 3)));
  return v >> (p & 7);
}
inline uint64_t bits_at(const uint8_t* s, int64_t nbytes, int64_t p) {
  if (__builtin_expect((p >> 3) + 8 > nbytes, 0)) return bits_at_end(s, nbytes, p);
  uint64_t v;
  std::memcpy(&v, s + (p >> 3), 8);
  return v >> (p & 7);
}

// The 8 codes of a window v (its lowest bits first) in 8 int32 lanes.
template <int B>
inline __m256i codes8(uint64_t v) {
  if constexpr (B == 8) return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(v)));
  else return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(_pdep_u64(v, 0x0101010101010101ull * ((1u << B) - 1)))));
}

template <int B>
struct RegLut {  // levels of codes < 2^B, B <= 6: lanes pick by bits 0..2, a blend tree by bits 3..
  static constexpr int N = B <= 3 ? 1 : 1 << (B - 3);
  __m256 t[N];
  explicit RegLut(const float* codebook) {
    float pad[8 * N] = {};
    for (int k = 0; k < (1 << B); ++k) pad[k] = codebook[k];
    for (int j = 0; j < N; ++j) t[j] = _mm256_loadu_ps(pad + 8 * j);
  }
  __m256 operator()(__m256i idx) const {
    __m256 r[N];
    for (int j = 0; j < N; ++j) r[j] = _mm256_permutevar8x32_ps(t[j], idx);
    for (int bit = 3, n = N; n > 1; ++bit, n /= 2) {
      const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 31 - bit));
      for (int j = 0; j < n / 2; ++j) r[j] = _mm256_blendv_ps(r[2 * j], r[2 * j + 1], sel);
    }
    return r[0];
  }
};

struct GatherLut {
  const float* codebook;
  explicit GatherLut(const float* c) : codebook(c) {}
  __m256 operator()(__m256i idx) const { return _mm256_i32gather_ps(codebook, idx, 4); }
};

template <int B>
using Lut = std::conditional_t<(B <= 6), RegLut<B>, GatherLut>;

// For the 8 bitmap bits m of a step: expand[m][j] = rank of column j among the kept ones,
// keep[m][j] = all ones where column j is kept.
struct ExpandTables {
  alignas(32) int32_t expand[256][8], keep[256][8];
  ExpandTables() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0, r = 0; j < 8; ++j) {
        const bool k = (m >> j) & 1;
        expand[m][j] = k ? r : 0;
        keep[m][j] = k ? -1 : 0;
        r += k;
      }
  }
};
inline const ExpandTables kExpand;  // built at static initialization (no guard in the loops)

// Row c, dense: levels of columns i .. i + 7 (past the row: the next codes, or 0).
template <int B>
struct DenseSrc {
  const uint8_t* codes; int64_t nbytes, p0; const Lut<B>& lut;
  DenseSrc(const PackedView& w, int64_t c, int64_t nb, const Lut<B>& l)
      : codes(w.codes), nbytes(nb), p0(c * w.row_length * B), lut(l) {}
  __m256 get(int64_t i) { return lut(codes8<B>(bits_at(codes, nbytes, p0 + i * B))); }
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
  __m256 get(int64_t i) {
    const unsigned m = unsigned(bits_at(bitmap, bitmap_bytes, f0 + i)) & 0xffu;
    const __m256 levels = lut(codes8<B>(bits_at(codes, nbytes, p)));
    p += int64_t(__builtin_popcount(m)) * B;
    return _mm256_and_ps(_mm256_permutevar8x32_ps(levels, _mm256_load_si256((const __m256i*)kExpand.expand[m])),
                         _mm256_load_ps((const float*)kExpand.keep[m]));
  }
};

// lane_sum's order: the 8 lanes added in double, lane 0 first.
inline float lane_sum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  double s = 0;
  for (float l : lanes) s += l;
  return float(s);
}

// y[m ldy] = scale * dot(row, x[m ldx ..]) for m < MB, the row decoded once.
template <int MB, class Src>
inline void dot_rows(Src src, int64_t in, const float* x, int64_t ldx, float* y, int64_t ldy, float scale) {
  __m256 acc[MB][kChains];
  for (auto& chains : acc)
    for (__m256& a : chains) a = _mm256_setzero_ps();
  const int64_t steps = in / 8;
  for_each_step(steps, [&](int64_t t, auto chain) {
    const __m256 wv = src.get(8 * t);
    for (int m = 0; m < MB; ++m) acc[m][chain] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + 8 * t), wv, acc[m][chain]);
  });
  alignas(32) float tail[8];
  if (steps * 8 < in) _mm256_store_ps(tail, src.get(steps * 8));
  for (int m = 0; m < MB; ++m) {
    float s = lane_sum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
    for (int64_t i = steps * 8; i < in; ++i) {
      const float p = tail[i - steps * 8] * x[m * ldx + i];
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

// row[i] = level of row c's column i (0 where pruned) for i < w.row_length.
template <int B>
inline void decode_row(const PackedView& w, int64_t c, float* row) {
  const Lut<B> lut(w.codebook);
  const int64_t in = w.row_length;
  with_source<B>(w, c, code_bytes(w), lut, [&](auto src) {
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) _mm256_storeu_ps(row + i, src.get(i));
    if (i < in) {
      alignas(32) float tail[8];
      _mm256_store_ps(tail, src.get(i));
      std::memcpy(row + i, tail, sizeof(float) * size_t(in - i));
    }
  });
}

inline void decode_row(const PackedView& w, int64_t c, float* row) {
  with_int<1, 8>(w.bits, [&](auto B) { decode_row<B()>(w, c, row); });
}

}  // namespace mixedprec::avx2
#endif
