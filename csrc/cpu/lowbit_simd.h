// SIMD kernels of lowbit_linear's CPU forward and of the code decode (torch-free): packed rows
// decoded Isa::kLanes weights per step straight from the format (include/mixedprec/packed_weight.h),
// templated over bits 1..8 and over the instruction set (Isa: AVX-512, 16 lanes, or AVX2, 8
// lanes; the build's target picks one). set_cpu_simd(false) selects the scalar twin (decode_run
// + the same dot), which sums in the same order, so every path is bit-identical:
//
//   dot(row, x) = float(lane_sum((c0 + c1) + (c2 + c3))) + sum of the tail, in column order
//   c_j = FMA chain of kLanes lanes over the kLanes-column steps t with t % kChains == j
//   tail = the in % kLanes last columns, scalar (w * x rounded, then added)
//
// (the order of lowbit_linear_cpu.cpp's dot_block with ATen's vectors, which have kLanes lanes
// on the same build; lane_sum adds the lanes in double, in lane order). Per step, one source
// gives kLanes levels:
//   CodeReader<B>  kLanes codes: AVX-512 VBMI, one 16-byte load, vpermb and vpsrlvd; else
//                  64-bit windows of the stream (Isa::codes: shift, pdep, vpmovzxbd)
//   RegLut<B>      B <= Isa::kRegLutBits: the codebook in registers, one permute on the low
//                  kLutBits bits (vpermps: 3; vpermt2ps: 5) and a blend tree on the bits above;
//                  GatherLut (larger B): vgatherdps from the codebook; ByteLut<B> (B = 7, 8 on
//                  AVX-512 VBMI): 64 codes at once, looked up in four byte planes (vpermi2b)
//   DenseSrc       a dense row: codes at kLanes B bits per step
//   SparseSrc      a row with a bitmap, its kept codes read first as one run (the decode
//                  follows the kept codes): ByteSparseSrc (B <= 5 on AVX-512 VBMI2) spreads the
//                  codes, one per byte, over 64 columns at a time by one vpexpandb, then looks
//                  them up; LevelSparseSrc decodes the kept levels, then spreads them over each
//                  step's columns (Isa::expand: a permute by each lane's kept rank, or vexpandps);
//                  0 where pruned
// dot_rows decodes a row once for up to kMaxRows batch rows (register-blocked); decode_span writes
// the levels out (the tile path of large batches, the backward, lut_conv2d).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

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

// for_each_step(N, step) for a compile-time N, unrolled whole: the interleaved blocks' 8 to 32
// steps (GCC left a 32-step loop rolled, its accumulators stored to the stack every pass).
template <int N, class Step>
inline void for_each_step(Step&& step) {
  [&]<int... T>(std::integer_sequence<int, T...>) {
    (step(int64_t(T), std::integral_constant<int, T % kChains>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// Calls f(std::integral_constant<int, v>) for v in [K, N].
template <int K, int N, class F>
inline void with_int(int v, F&& f) {
  if constexpr (K <= N) {
    if (v == K) f(std::integral_constant<int, K>{});
    else with_int<K + 1, N>(v, std::forward<F>(f));
  }
}

// Row c's codes and bitmap bits into the cache ahead of their use (c < w.out). Weights that come
// from DRAM or L3, as a model's do, otherwise wait on each cache line: the kernels' work per byte
// leaves few loads in flight (4096 x 4096 GEMV cycling over 8 weights, 1 thread on a Xeon: 4-bit
// 1.14 against 0.76 ms, 5-bit 3.13 against 1.39, 8-bit 6.25 against 3.29; see docs/kernels.md).
// Inlined early, with the builtin in the caller: GCC 12 deems a function that only prefetches
// pure and drops its calls.
[[gnu::always_inline]] inline void prefetch_row(const PackedView& w, int64_t c) {
  const int64_t f0 = c * w.row_length, f1 = f0 + w.row_length, k0 = kept_before(w, f0);
  if (w.keep_bitmap)
    for (int64_t b = (f0 / 8) & ~int64_t(63); b < (f1 + 7) / 8; b += 64) __builtin_prefetch(w.keep_bitmap + b, 0, 3);
  const int64_t end = (k0 + kept_between(w, f0, f1)) * w.bits / 8 + 1;
  for (int64_t b = (k0 * w.bits / 8) & ~int64_t(63); b < end; b += 64) __builtin_prefetch(w.codes + b, 0, 3);
}

// How far ahead of the codes being read to prefetch: kPrefetchBytes, or as rows (at least one).
// The fast kernels of interleaved rows (lowbit_linear_cpu.cpp) prefetch one line per block read,
// a stream with no bursts: a whole row's lines at once cost 10-20% where the weight sat in L3.
constexpr int64_t kPrefetchBytes = 8 << 10;
inline int64_t prefetch_ahead(const PackedView& w) {
  return std::max<int64_t>(1, 8 * kPrefetchBytes / std::max<int64_t>(1, w.row_length * w.bits));
}

}  // namespace mixedprec

#if defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__)
#include <immintrin.h>
#define MP_LOWBIT_SIMD 1

namespace mixedprec::simd {

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

// 8 codes of B bits from the window at bit p, one per byte (pdep; 8-bit codes are the bytes).
template <int B>
inline int64_t code_bytes8(const uint8_t* s, int64_t nbytes, int64_t p) {
  const uint64_t v = bits_at(s, nbytes, p);
  if constexpr (B == 8) return int64_t(v);
  else return int64_t(_pdep_u64(v, 0x0101010101010101ull * ((1u << B) - 1)));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)  // as vec_ops.h
#define MP_ISA_AVX512 1
struct Isa {  // AVX-512: 16 lanes, a 32-entry table per vpermt2ps
  using F = __m512;
  using I = __m512i;
  struct Table { __m512 lo, hi; };
  static constexpr int kLanes = 16, kLutBits = 5, kRegLutBits = 8, kMaxRows = 4;
  static F zero() { return _mm512_setzero_ps(); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  template <int B>
  static I codes(const uint8_t* s, int64_t nbytes, int64_t p) {
    // (maskz with every lane: the unmasked intrinsic trips GCC 12's -Wuninitialized)
    return _mm512_maskz_cvtepu8_epi32(__mmask16(0xffff), _mm_set_epi64x(code_bytes8<B>(s, nbytes, p + 8 * B), code_bytes8<B>(s, nbytes, p)));
  }
  static Table load_table(const float* t) { return {_mm512_loadu_ps(t), _mm512_loadu_ps(t + 16)}; }
  static F permute(const Table& t, I idx) { return _mm512_permutex2var_ps(t.lo, idx, t.hi); }
  static F pick_by_bit(I idx, int bit, F if_clear, F if_set) {
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(1 << bit)), if_clear, if_set);
  }
  static F gather(const float* table, I idx) { return _mm512_i32gather_ps(idx, table, 4); }
  // levels[0 ..) to the set bits of `keep` (in order), 0 elsewhere. With VPOPCNTDQ: a permute by
  // the count of kept lanes below each lane (vexpandps takes ~4 cycles per step on Zen 4, this ~3).
  static F expand(F levels, unsigned keep) {
#if defined(__AVX512VPOPCNTDQ__)
    const __m512i below = _mm512_setr_epi32(0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047, 4095, 8191, 16383, 32767);
    const __m512i rank = _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(int(keep)), below));
    return _mm512_maskz_permutexvar_ps(__mmask16(keep), rank, levels);
#else
    return _mm512_maskz_expand_ps(__mmask16(keep), levels);
#endif
  }
};
#else
struct Isa {  // AVX2: 8 lanes, an 8-entry table per vpermps
  using F = __m256;
  using I = __m256i;
  using Table = __m256;
  static constexpr int kLanes = 8, kLutBits = 3, kRegLutBits = 6, kMaxRows = 3;
  static F zero() { return _mm256_setzero_ps(); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  template <int B>
  static I codes(const uint8_t* s, int64_t nbytes, int64_t p) {
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(code_bytes8<B>(s, nbytes, p)));
  }
  static Table load_table(const float* t) { return _mm256_loadu_ps(t); }
  static F permute(Table t, I idx) { return _mm256_permutevar8x32_ps(t, idx); }
  static F pick_by_bit(I idx, int bit, F if_clear, F if_set) {
    return _mm256_blendv_ps(if_clear, if_set, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 31 - bit)));
  }
  static F gather(const float* table, I idx) { return _mm256_i32gather_ps(table, idx, 4); }
  // For the 8 bitmap bits m: expand[m][j] = rank of column j among the kept ones, keep[m][j] =
  // all ones where column j is kept (built at static initialization: no guard in the loops).
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
  static inline const ExpandTables kExpand;
  static F expand(F levels, unsigned m) {
    return _mm256_and_ps(_mm256_permutevar8x32_ps(levels, _mm256_load_si256((const __m256i*)kExpand.expand[m])),
                         _mm256_load_ps((const float*)kExpand.keep[m]));
  }
};
#endif

using F = Isa::F;
using I = Isa::I;
constexpr int kLanes = Isa::kLanes;
constexpr int kMaxRows = Isa::kMaxRows;  // batch rows per pass of dot_rows (kMaxRows x kChains accumulators)

// Bytes of the code stream: ceil(kept * bits / 8).
inline int64_t code_bytes(const PackedView& w) { return (kept_between(w, 0, w.numel()) * w.bits + 7) / 8; }

// kLanes codes of B bits per call, from bit p on; p & 7 == off in every call of a run (a run
// advances kLanes * B bits, whole bytes). Each lane's bits above B hold the next code's bits:
// the lookups below read only bits 0 .. B-1.
#if defined(MP_ISA_AVX512) && defined(__AVX512VBMI__)
// vpermb: byte j of the result = byte idx[j] % 64 of v (maskz with every lane: the unmasked
// intrinsic trips GCC 12's -Wuninitialized).
inline __m512i permute_bytes(__m512i idx, __m512i v) { return _mm512_maskz_permutexvar_epi8(~0ull, idx, v); }

template <int B>
struct CodeReader {  // one 16-byte load; vpermb puts each code's two bytes in its lane, vpsrlvd aligns it
  __m512i bytes, shifts;
  explicit CodeReader(int off) {
    alignas(64) uint8_t b[64];
    alignas(64) uint32_t sh[16];
    for (int j = 0; j < 16; ++j) {
      const int bit = off + j * B;  // < 8 + 15 * 8: the code's bytes lie in the first 16 bytes
      for (int q = 0; q < 4; ++q) b[4 * j + q] = uint8_t(std::min(15, (bit >> 3) + q));
      sh[j] = uint32_t(bit & 7);
    }
    bytes = _mm512_load_si512(b);
    shifts = _mm512_load_si512(sh);
  }
  I operator()(const uint8_t* s, int64_t nbytes, int64_t p) const {
    const int64_t at = p >> 3;
    __m128i v;
    if (__builtin_expect(at + 16 <= nbytes, 1)) v = _mm_loadu_si128((const __m128i*)(s + at));
    else v = last_bytes(s, nbytes, at);
    return _mm512_srlv_epi32(permute_bytes(bytes, _mm512_zextsi128_si512(v)), shifts);
  }
  // The stream's bytes from `at` on, 0 past its end.
  [[gnu::noinline]] static __m128i last_bytes(const uint8_t* s, int64_t nbytes, int64_t at) {
    alignas(16) uint8_t tail[16] = {};
    if (at < nbytes) std::memcpy(tail, s + at, size_t(std::min<int64_t>(16, nbytes - at)));
    return _mm_load_si128((const __m128i*)tail);
  }
};
#else
template <int B>
struct CodeReader {  // pdep (Isa::codes)
  explicit CodeReader(int) {}
  I operator()(const uint8_t* s, int64_t nbytes, int64_t p) const { return Isa::codes<B>(s, nbytes, p); }
};
#endif

template <int B>
struct RegLut {  // levels of codes < 2^B: a permute by the low kLutBits bits, a blend tree above
  static constexpr int kSpan = 1 << Isa::kLutBits, N = B <= Isa::kLutBits ? 1 : 1 << (B - Isa::kLutBits);
  Isa::Table t[N];
  explicit RegLut(const float* codebook) {
    float pad[kSpan * N];  // a codebook shorter than a table repeats: index bits >= B are not read
    for (int k = 0; k < kSpan * N; ++k) pad[k] = codebook[k & ((1 << B) - 1)];
    for (int j = 0; j < N; ++j) t[j] = Isa::load_table(pad + kSpan * j);
  }
  F operator()(I idx) const {
    F r[N];
    for (int j = 0; j < N; ++j) r[j] = Isa::permute(t[j], idx);
    for (int bit = Isa::kLutBits, n = N; n > 1; ++bit, n /= 2)
      for (int j = 0; j < n / 2; ++j) r[j] = Isa::pick_by_bit(idx, bit, r[2 * j], r[2 * j + 1]);
    return r[0];
  }
};

struct GatherLut {
  const float* codebook;
  explicit GatherLut(const float* c) : codebook(c) {}
  F operator()(I idx) const { return Isa::gather(codebook, idx); }
};

#if defined(MP_ISA_AVX512) && defined(__AVX512VBMI__) && defined(__AVX512VBMI2__)
#define MP_BYTE_CODES 1
// 64 codes of B bits from bit p on (p & 7 == off: 64 codes are 8 B bits, whole bytes), code t in
// byte t: vpermb puts each qword's 8 codes' bytes in it, vpmultishiftqb aligns each code on its
// byte. The bits above B hold the next code's bits: every lookup reads only bits 0 .. B-1.
template <int B>
struct ByteCodes {
  __m512i gather, shifts;
  explicit ByteCodes(int off) {
    alignas(64) uint8_t g[64], sh[64];
    for (int q = 0; q < 8; ++q)
      for (int j = 0; j < 8; ++j) {
        g[8 * q + j] = uint8_t(std::min(63, q * B + j));  // qword q: codes 8q .. 8q + 7 start at byte q B
        sh[8 * q + j] = uint8_t(off + j * B);              // <= 7 + 7 * 7: the field ends within the qword
      }
    gather = _mm512_load_si512(g);
    shifts = _mm512_load_si512(sh);
  }
  __m512i operator()(const uint8_t* s, int64_t nbytes, int64_t p) const {
    const int64_t at = p >> 3;
    __m512i v;
    if (__builtin_expect(at + 64 <= nbytes, 1)) v = _mm512_loadu_si512(s + at);
    else v = last_bytes(s, nbytes, at);
    return spread(v);
  }
  // The 64 codes of the 8 B bytes in v (from bit off of its first byte), one per byte.
  __m512i spread(__m512i v) const {
    if constexpr (B == 8) return v;
    else return _mm512_multishift_epi64_epi8(shifts, permute_bytes(gather, v));
  }
  // The stream's bytes from `at` on, 0 past its end.
  [[gnu::noinline]] static __m512i last_bytes(const uint8_t* s, int64_t nbytes, int64_t at) {
    alignas(64) uint8_t tail[64] = {};
    if (at < nbytes) std::memcpy(tail, s + at, size_t(std::min<int64_t>(64, nbytes - at)));
    return _mm512_load_si512(tail);
  }
};

// 7- and 8-bit codes, 64 per call: the codebook as four byte planes (byte q of every level), each
// looked up for 64 codes by one vpermi2b per 128 entries, the planes then interleaved into 64
// levels. Per 16 codes this costs about 4 shuffles, where RegLut<8> takes 8 vpermt2ps and 7 blends.
template <int B>
constexpr bool kByteLut = B >= 7;

template <int B>
struct ByteLut {
  static constexpr int kHalves = 1 << (B - 7);
  __m512i plane[4][2 * kHalves];
  explicit ByteLut(const float* codebook) {
    alignas(64) uint8_t bytes[4][256];
    for (int k = 0; k < 128 * kHalves; ++k) {
      uint32_t v;
      std::memcpy(&v, codebook + k, 4);
      for (int q = 0; q < 4; ++q) bytes[q][k] = uint8_t(v >> (8 * q));
    }
    for (int q = 0; q < 4; ++q)
      for (int h = 0; h < 2 * kHalves; ++h) plane[q][h] = _mm512_load_si512(bytes[q] + 64 * h);
  }
  // levels[t] = level of code byte t of `codes` (t < 64).
  void operator()(__m512i codes, float* levels) const {
    // dword 4L + k takes codes 16k + 4L .. + 3: the unpacks below then give levels in column order
    const __m512i v = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), codes);
    const __mmask64 high = _mm512_movepi8_mask(v);  // bit 7 (B = 8): the upper 128 entries
    __m512i b[4];
    for (int q = 0; q < 4; ++q) {
      b[q] = _mm512_permutex2var_epi8(plane[q][0], v, plane[q][1]);
      if constexpr (B == 8) b[q] = _mm512_mask_blend_epi8(high, b[q], _mm512_permutex2var_epi8(plane[q][2], v, plane[q][3]));
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    _mm512_storeu_si512(levels, _mm512_unpacklo_epi16(lo01, lo23));
    _mm512_storeu_si512(levels + 16, _mm512_unpackhi_epi16(lo01, lo23));
    _mm512_storeu_si512(levels + 32, _mm512_unpacklo_epi16(hi01, hi23));
    _mm512_storeu_si512(levels + 48, _mm512_unpackhi_epi16(hi01, hi23));
  }
};
#else
template <int B>
constexpr bool kByteLut = false;
template <int B>
struct ByteLut {};
#endif

template <int B>
using Lut = std::conditional_t<kByteLut<B>, ByteLut<B>, std::conditional_t<(B <= Isa::kRegLutBits), RegLut<B>, GatherLut>>;

// Codes from bit p0 on (a dense row: p0 = c row_length B): levels of codes i .. i + kLanes - 1
// (past the stream: 0). i is a multiple of kLanes: every step starts at p0's bit of a byte.
template <int B, bool = kByteLut<B>>
struct DenseSrc {
  const uint8_t* codes; int64_t nbytes, p0; const Lut<B>& lut;
  CodeReader<B> read{int(p0 & 7)};
  F get(int64_t i) { return lut(read(codes, nbytes, p0 + i * B)); }
};

#if defined(MP_BYTE_CODES)
template <int B>
struct DenseSrc<B, true> {  // ByteLut: 64 levels decoded at once, kept for the steps that follow
  const uint8_t* codes; int64_t nbytes, p0; const Lut<B>& lut;
  ByteCodes<B> read{int(p0 & 7)};
  int64_t block = -1;
  alignas(64) float levels[64];
  F get(int64_t i) {
    if ((i >> 6) != block) lut(read(codes, nbytes, p0 + (block = i >> 6) * 64 * B), levels);
    return Isa::loadu(levels + (i & 63));
  }
};
#endif

// out[i] = src.get's levels for i0 <= i < n, kLanes per step.
template <class Src>
inline void store_levels(Src src, int64_t n, float* out, int64_t i0 = 0) {
  int64_t i = i0;
  for (; i + kLanes <= n; i += kLanes) Isa::storeu(out + i, src.get(i));
  if (i < n) {
    alignas(64) float tail[kLanes];
    Isa::storeu(tail, src.get(i));
    std::memcpy(out + i, tail, sizeof(float) * size_t(n - i));
  }
}

#if defined(MP_BYTE_CODES)
// A ByteLut row: 64 levels per lookup, written in place.
template <int B>
inline void store_levels(DenseSrc<B, true> src, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) src.lut(src.read(src.codes, src.nbytes, src.p0 + i * B), out + i);
  store_levels<DenseSrc<B, true>>(src, n, out, i);
}
#endif

// A span of a sparse weight from flat index f0 on: its kept levels (decoded beforehand as one run:
// the decode follows the kept codes) spread to the step's columns by its kLanes bitmap bits, 0
// where pruned. Stateful: steps visited in order.
template <int B>
struct LevelSparseSrc {
  using Kept = float;
  static constexpr int64_t kPad = kLanes;  // kept holds n + kPad floats
  const Kept* kept;  // the span's kept levels, then at least kLanes readable floats
  const uint8_t* bitmap; int64_t bitmap_bytes, f0, k = 0;
  uint64_t window = 0;  // the bitmap bits of columns i - i % 32 .. + 31
  F get(int64_t i) {
    if (i % 32 == 0) window = bits_at(bitmap, bitmap_bytes, f0 + i);
    const unsigned m = unsigned(window >> (i % 32)) & ((1u << kLanes) - 1u);
    const F levels = Isa::expand(Isa::loadu(kept + k), m);
    k += __builtin_popcount(m);
    return levels;
  }
  // The source over flat indices [f0, f0 + n): kept[0, count) = the levels of the kept weights,
  // kept[count, count + kLanes) = 0.
  static LevelSparseSrc decode(const PackedView& w, int64_t f0, int64_t n, const Lut<B>& lut, int64_t nbytes, Kept* kept) {
    const int64_t count = kept_between(w, f0, f0 + n);
    store_levels(DenseSrc<B>{w.codes, nbytes, kept_before(w, f0) * B, lut}, count, kept);
    std::fill(kept + count, kept + count + kLanes, 0.0f);
    return {kept, w.keep_bitmap, w.bitmap_bytes(), f0};
  }
};

#if defined(MP_BYTE_CODES)
// 64 bits of the bitmap from bit p on.
inline uint64_t bits64_at(const uint8_t* s, int64_t nbytes, int64_t p) {
  return (bits_at(s, nbytes, p) & 0xffffffffull) | (bits_at(s, nbytes, p + 32) << 32);
}

// A span of a sparse weight from flat index f0 on, 64 columns at a time: its kept codes (one per
// byte, read beforehand as one run) spread over the columns by their 64 bitmap bits with one
// vpexpandb, then looked up, 0 where pruned. Stateful: steps visited in order. For codes that
// one permute looks up: every column's lookup then costs less than LevelSparseSrc's vector step
// per 16 columns (4096 x 4096 at batch 1, one thread: 1.4-1.6 against 2.2-2.6 ms at 30%
// sparsity, 1.25 against 1.4-1.6 at 90%); a 64-entry or larger codebook's lookup does not.
template <int B>
struct ByteSparseSrc {
  using Kept = uint8_t;
  static constexpr int64_t kPad = 128;  // kept holds n + kPad bytes
  const Kept* kept;  // the span's kept codes, then at least 64 readable bytes
  const uint8_t* bitmap; int64_t bitmap_bytes, f0; const Lut<B>* lut;
  int64_t k = 0;
  uint64_t keep = 0;
  __m512i codes = _mm512_setzero_si512();
  F get(int64_t i) {
    if (i % 64 == 0) {
      keep = bits64_at(bitmap, bitmap_bytes, f0 + i);
      codes = _mm512_maskz_expand_epi8(keep, _mm512_loadu_si512(kept + k));
      k += __builtin_popcountll(keep);
    }
    // the step's 16 code bytes to the low byte of each lane; the pruned lanes' levels zeroed
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i idx = permute_bytes(_mm512_add_epi8(lane, _mm512_set1_epi8(char(i % 64))), codes);
    return _mm512_maskz_mov_ps(__mmask16(keep >> (i % 64)), (*lut)(idx));
  }
  // The source over flat indices [f0, f0 + n): kept[0, count) = the codes of the kept weights.
  static ByteSparseSrc decode(const PackedView& w, int64_t f0, int64_t n, const Lut<B>& lut, int64_t nbytes, Kept* kept) {
    const int64_t count = kept_between(w, f0, f0 + n), p0 = kept_before(w, f0) * B;
    const ByteCodes<B> read(int(p0 & 7));
    for (int64_t t = 0; t < count; t += 64) _mm512_storeu_si512(kept + t, read(w.codes, nbytes, p0 + t * B));
    return {kept, w.keep_bitmap, w.bitmap_bytes(), f0, &lut};
  }
};

template <int B>
constexpr bool kByteExpand = B <= Isa::kLutBits;
#else
template <int B>
constexpr bool kByteExpand = false;
template <int B>
struct ByteSparseSrc {};
#endif

template <int B>
using SparseSrc = std::conditional_t<kByteExpand<B>, ByteSparseSrc<B>, LevelSparseSrc<B>>;

// lane_sum's order (vec_ops.h): the lanes added in double, lane 0 first.
inline float lane_sum(F v) {
  alignas(64) float lanes[kLanes];
  Isa::storeu(lanes, v);
  double s = 0;
  for (float l : lanes) s += l;
  return float(s);
}

// y[m ldy] = scale * dot(row, x[m ldx ..]) for m < MB, the row decoded once. Flattened: left to
// itself GCC stops inlining the step lambda once forward_rows holds every MB, and the
// accumulators go to memory (6x slower at MB = 3 and 4).
template <int MB, class Src>
[[gnu::flatten]] inline void dot_rows(Src src, int64_t in, const float* x, int64_t ldx, float* y, int64_t ldy, float scale) {
  F acc[MB][kChains];
  for (auto& chains : acc)
    for (F& a : chains) a = Isa::zero();
  const int64_t steps = in / kLanes;
  for_each_step(steps, [&](int64_t t, auto chain) {
    const F wv = src.get(kLanes * t);
    for (int m = 0; m < MB; ++m) acc[m][chain] = Isa::fmadd(Isa::loadu(x + m * ldx + kLanes * t), wv, acc[m][chain]);
  });
  alignas(64) float tail[kLanes];
  if (steps * kLanes < in) Isa::storeu(tail, src.get(steps * kLanes));
  for (int m = 0; m < MB; ++m) {
    float s = lane_sum(Isa::add(Isa::add(acc[m][0], acc[m][1]), Isa::add(acc[m][2], acc[m][3])));
    for (int64_t i = steps * kLanes; i < in; ++i) {
      const float p = tail[i - steps * kLanes] * x[m * ldx + i];
      s += p;
    }
    y[m * ldy] = scale * s;
  }
}

// y[m, c] (y: m_rows x w.out) for rows c in [c0, c1), x: m_rows x w.row_length.
template <int B>
inline void forward_rows(const PackedView& w, const float* x, int64_t m_rows, int64_t c0, int64_t c1, float* y) {
  const Lut<B> lut(w.codebook);
  const int64_t nbytes = code_bytes(w), in = w.row_length, ld = in + SparseSrc<B>::kPad;
  const auto run = [&](int64_t c, auto src) {
    for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxRows)
      with_int<1, kMaxRows>(int(std::min<int64_t>(kMaxRows, m_rows - m0)), [&](auto MB) {
        dot_rows<MB()>(src, in, x + m0 * in, in, y + m0 * w.out + c, w.out, w.channel_scale[c]);
      });
  };
  const int64_t ahead = prefetch_ahead(w);
  if (!w.keep_bitmap) {
    for (int64_t c = c0; c < c1; ++c) {
      if (c + ahead < c1) prefetch_row(w, c + ahead);
      run(c, DenseSrc<B>{w.codes, nbytes, c * in * B, lut});
    }
    return;
  }
  // Sparse rows: each row's kept codes (or levels) are read while the row before it is multiplied
  // (two buffers): spreading values stored just before waits on store forwarding (loads spanning
  // two pending stores; 4096 x 4096, 90% sparse, one thread on Zen 4: 4.8 ms with one buffer, 3.6).
  std::vector<typename SparseSrc<B>::Kept> kept(c0 < c1 ? 2 * ld : 0);
  SparseSrc<B> next = c0 < c1 ? SparseSrc<B>::decode(w, c0 * in, in, lut, nbytes, kept.data()) : SparseSrc<B>{};
  for (int64_t c = c0; c < c1; ++c) {
    if (c + ahead < c1) prefetch_row(w, c + ahead);
    const SparseSrc<B> src = next;
    if (c + 1 < c1) next = SparseSrc<B>::decode(w, (c + 1) * in, in, lut, nbytes, kept.data() + ((c + 1) & 1) * ld);
    run(c, src);
  }
}

inline void forward_rows(const PackedView& w, const float* x, int64_t m_rows, int64_t c0, int64_t c1, float* y) {
  with_int<1, 8>(w.bits, [&](auto B) { forward_rows<B()>(w, x, m_rows, c0, c1, y); });
}

// out[i] = level of flat weight f0 + i (0 where pruned) for i < n.
inline void decode_span(const PackedView& w, int64_t f0, int64_t n, float* out) {
  with_int<1, 8>(w.bits, [&](auto B) {
    const Lut<B()> lut(w.codebook);
    const int64_t nbytes = code_bytes(w);
    if (!w.keep_bitmap) return store_levels(DenseSrc<B()>{w.codes, nbytes, f0 * B, lut}, n, out);
    thread_local std::vector<typename SparseSrc<B()>::Kept> kept;
    kept.resize(size_t(n + SparseSrc<B()>::kPad));
    store_levels(SparseSrc<B()>::decode(w, f0, n, lut, nbytes, kept.data()), n, out);
  });
}

}  // namespace mixedprec::simd
#endif
