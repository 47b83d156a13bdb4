// lowbit_cpu.h -- torch-free, header-only AVX2 kernels for packed low-bit linear layers (issue 17, prototype).
//
// y (M x out) = x (M x in) W^T, W read straight from the packed stream (format: see Packed).
// Structure (one abstraction per concern, templates over bits):
//   Codes<B>      8 codes at a bit position -> 8 int32 lanes (64-bit load, shift, pdep, vpmovzxbd)
//   Lut families  8 codes -> 8 levels: RegLut<B> (B<=5, codebook in 1..4 ymm, vpermps + blend tree),
//                 GatherLut (vgatherdps from the codebook in L1), UniformLut (cvtdq2ps + fma: SBS)
//   Sources       8 weights of one row at column i: DenseSrc (stream), ExpandSrc (sparse: decode 8 kept
//                 codes, expand with a 256-entry permutation table indexed by 8 bitmap bits), F32Src
//   row_kernel    one output row x up to 8 batch rows in registers (decode once, FMA into MB rows)
//   row_gather    sparse alternative: only kept columns, x gathered (vgatherdps) at their indices
//   tmac_gemv     batch-1 dense, bits 1,2,4: per group of 8/B inputs a 256-entry table of partial
//                 sums, a row is byte-indexed table lookups + adds (T-MAC style)
// Threads: OpenMP over output rows (static); a row is always reduced by one thread in a fixed
// order, so results do not depend on the thread count.
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace lowbit {

struct Packed {
  int64_t out = 0, in = 0;
  int bits = 0;
  const float* codebook = nullptr;      // (2^bits,) sorted levels
  const float* channel_scale = nullptr; // (out,)
  const uint8_t* codes = nullptr;       // LSB-first stream of the kept codes, row-major
  int64_t codes_bytes = 0;              // ceil(kept*bits/8)
  const uint8_t* keep_bitmap = nullptr; // (ceil(out*in/8),) LSB-first, or null (dense)
  const int64_t* code_offsets = nullptr;// (ceil(out*in/64),) kept weights before each 64-block
};

// ---------------------------------------------------------------- bit stream
// 64 bits of the stream from bit p on (at least 57 meaningful); never reads past nbytes.
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

inline int64_t bitmap_bytes(const Packed& w) { return (w.out * w.in + 7) / 8; }

// Kept weights before flat index f (= the code index of the next kept weight).
inline int64_t kept_before(const Packed& w, int64_t f) {
  if (!w.keep_bitmap) return f;
  const int64_t blk = f >> 6;
  const int r = int(f & 63);
  int64_t k = w.code_offsets[blk];
  if (r) k += __builtin_popcountll(bits_at(w.keep_bitmap, bitmap_bytes(w), blk * 64) & ((1ull << r) - 1));
  return k;
}

// ---------------------------------------------------------------- codes -> lanes
template <int B>
struct Codes {
  static constexpr uint64_t kSpread = 0x0101010101010101ull * ((1u << B) - 1);
  static __m256i get(uint64_t v) {  // v: stream bits from the first code on
    if constexpr (B == 8) return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(v)));
    else return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(_pdep_u64(v, kSpread))));
  }
};

// ---------------------------------------------------------------- lookup families
template <int B>
struct RegLut {  // codebook in N = 2^(B-3) registers; lanes choose by bits 0..2, blend tree on bits 3..B-1
  static constexpr int N = B <= 3 ? 1 : 1 << (B - 3);
  __m256 t[N];
  explicit RegLut(const float* cb) {
    float pad[8 * N] = {};
    for (int k = 0; k < (1 << B); ++k) pad[k] = cb[k];
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
  const float* cb;
  explicit GatherLut(const float* c) : cb(c) {}
  __m256 operator()(__m256i idx) const { return _mm256_i32gather_ps(cb, idx, 4); }
};

struct UniformLut {  // codebook[k] = a + k*d (SBS)
  __m256 a, d;
  explicit UniformLut(const float* cb) : a(_mm256_set1_ps(cb[0])), d(_mm256_set1_ps(cb[1] - cb[0])) {}
  __m256 operator()(__m256i idx) const { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(idx), d, a); }
};

inline bool is_uniform(const float* cb, int bits) {
  const int n = 1 << bits;
  if (n < 2) return false;
  const double d = double(cb[1]) - cb[0];
  for (int k = 0; k < n; ++k)
    if (std::fabs((double(cb[0]) + k * d) - cb[k]) > 1e-6 * (std::fabs(cb[k]) + std::fabs(d))) return false;
  return true;
}

// ---------------------------------------------------------------- tables
struct Tables {  // expand[m]: lane j takes kept code #rank_j(m); keep[m]: lane j kept; pos[m]: kept lanes' columns
  alignas(32) int32_t expand[256][8], keep[256][8], pos[256][8];
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int r = 0;
      for (int j = 0; j < 8; ++j) {
        const bool k = (m >> j) & 1;
        expand[m][j] = k ? r : 0;
        keep[m][j] = k ? -1 : 0;
        pos[m][j] = 0;
        if (k) pos[m][r] = j;
        r += k;
      }
    }
  }
};
inline const Tables kTables;  // built at static initialization (no guard in the hot loops)
inline const Tables& tables() { return kTables; }

inline __m256i tail_mask(int r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// ---------------------------------------------------------------- weight sources (8 weights of a row)
template <int B, class L>
struct DenseSrc {
  const uint8_t* s; int64_t n, p0; const L& lut;
  __m256 get(int64_t i) const { return lut(Codes<B>::get(bits_at(s, n, p0 + i * B))); }
  __m256 tail(int64_t i, __m256i) const { return get(i); }  // lanes past the row meet x = 0
};

template <int B, class L>
struct ExpandSrc {  // sparse: stateful, columns visited in order
  const uint8_t* s; int64_t n, p;          // code stream, bit position of the next kept code
  const uint8_t* bm; int64_t bn, f;        // bitmap, flat index of the row's first weight
  const L& lut;
  __m256 get(int64_t i) {
    const unsigned m = unsigned(bits_at(bm, bn, f + i)) & 0xff;
    const __m256 w = lut(Codes<B>::get(bits_at(s, n, p)));
    p += int64_t(__builtin_popcount(m)) * B;
    const auto& t = tables();
    return _mm256_and_ps(_mm256_permutevar8x32_ps(w, _mm256_load_si256((const __m256i*)t.expand[m])),
                         _mm256_load_ps((const float*)t.keep[m]));
  }
  __m256 tail(int64_t i, __m256i) { return get(i); }
};

struct F32Src {
  const float* row;
  __m256 get(int64_t i) const { return _mm256_loadu_ps(row + i); }
  __m256 tail(int64_t i, __m256i mk) const { return _mm256_maskload_ps(row + i, mk); }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One output row against MB batch rows: y[m*ldy] = scale * sum_i w_i x[m*ldx + i].
template <int MB, class Src>
inline void row_kernel(Src src, int64_t in, const float* x, int64_t ldx, float* y, int64_t ldy, float scale) {
  constexpr int U = MB >= 4 ? 1 : 4 / MB;  // independent FMA chains to cover latency
  __m256 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MB; ++m) acc[u][m] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * U <= in; i += 8 * U)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m256 w = src.get(i + 8 * u);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[u][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + i + 8 * u), acc[u][m]);
    }
  for (; i + 8 <= in; i += 8) {
    const __m256 w = src.get(i);
    for (int m = 0; m < MB; ++m) acc[0][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + i), acc[0][m]);
  }
  if (i < in) {
    const __m256i mk = tail_mask(int(in - i));
    const __m256 w = src.tail(i, mk);
    for (int m = 0; m < MB; ++m) acc[0][m] = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + m * ldx + i, mk), acc[0][m]);
  }
  for (int m = 0; m < MB; ++m) {
    for (int u = 1; u < U; ++u) acc[0][m] = _mm256_add_ps(acc[0][m], acc[u][m]);
    y[m * ldy] = scale * hsum(acc[0][m]);
  }
}

// Sparse alternative: list the row's kept columns, then 8 kept codes at a time (plain dense decode),
// x gathered at their columns. Work follows the kept count (plus the list: 8 columns per step).
template <int MB, int B, class L>
inline void row_gather(const Packed& w, const L& lut, int64_t c, int32_t* pos, const float* x, int64_t ldx,
                       float* y, int64_t ldy) {
  const auto& t = tables();
  const int64_t in = w.in, f0 = c * in, bn = bitmap_bytes(w);
  int64_t n = 0;
  for (int64_t i = 0; i < in; i += 8) {
    unsigned m = unsigned(bits_at(w.keep_bitmap, bn, f0 + i)) & 0xff;
    if (in - i < 8) m &= (1u << (in - i)) - 1;
    _mm256_storeu_si256((__m256i*)(pos + n), _mm256_add_epi32(_mm256_load_si256((const __m256i*)t.pos[m]),
                                                              _mm256_set1_epi32(int(i))));
    n += __builtin_popcount(m);
  }
  const int64_t p0 = kept_before(w, f0) * B;
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) {
    const __m256i mk = tail_mask(int(n - k < 8 ? n - k : 8));
    const __m256i ix = _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(pos + k)), mk);
    const __m256 wv = _mm256_and_ps(lut(Codes<B>::get(bits_at(w.codes, w.codes_bytes, p0 + k * B))),
                                    _mm256_castsi256_ps(mk));
    for (int m = 0; m < MB; ++m)
      acc[m] = _mm256_fmadd_ps(wv, _mm256_i32gather_ps(x + m * ldx, ix, 4), acc[m]);
  }
  for (int m = 0; m < MB; ++m) y[m * ldy] = w.channel_scale[c] * hsum(acc[m]);
}

// ---------------------------------------------------------------- dispatch helpers
template <int K, int N, class F>
inline void with_int(int v, F&& f) {  // calls f(integral_constant<int, v>) for v in [K, N]
  if constexpr (K <= N) {
    if (v == K) f(std::integral_constant<int, K>{});
    else with_int<K + 1, N>(v, f);
  }
}

enum class Sparse { Auto, Expand, Gather };
enum class LutKind { Auto, Reg, Gather, Uniform };

struct Options {
  Sparse sparse = Sparse::Auto;
  LutKind lut = LutKind::Auto;
  bool tmac = true;  // batch-1 dense table GEMV (measured: wins only at 1 bit; 2 and 4 bits lose to RegLut)
  double gather_below_density = 0.35;  // Sparse::Auto: row_gather when kept/total is below this
};

// Batch rows in chunks of 8 per output row; rows spread over threads.
template <class RowFn>
inline void for_rows(int64_t out, int64_t M, RowFn&& row) {
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < out; ++c)
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int mb = int(M - m0 < 8 ? M - m0 : 8);
      with_int<1, 8>(mb, [&](auto MB) { row(c, m0, MB); });
    }
}

// ---------------------------------------------------------------- T-MAC batch-1 GEMV (dense, B in {1,2,4})
template <int B>
inline void tmac_gemv(const Packed& w, const float* x, float* y, std::vector<float>& tab) {
  constexpr int G = 8 / B;  // inputs per table (one code byte)
  const int64_t in = w.in, groups = in / G;
  tab.resize(size_t(groups) * 256);
  const float* cb = w.codebook;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {  // table by doubling: T over j inputs -> j+1 inputs
      float* T = tab.data() + g * 256;
      T[0] = 0.f;
      int n = 1;
      for (int j = 0; j < G; ++j, n <<= B) {
        const float xj = x[g * G + j];
        for (int c = (1 << B) - 1; c >= 0; --c)
          for (int t = 0; t < n; ++t) T[c * n + t] = T[t] + cb[c] * xj;
      }
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < w.out; ++c) {
      const uint8_t* s = w.codes + c * in * B / 8;  // in*B % 8 == 0 (checked by the caller)
      float a[4] = {0, 0, 0, 0};
      int64_t g = 0;
      for (; g + 4 <= groups; g += 4)
        for (int u = 0; u < 4; ++u) a[u] += tab[size_t(g + u) * 256 + s[g + u]];
      for (; g < groups; ++g) a[0] += tab[size_t(g) * 256 + s[g]];
      float r = (a[0] + a[1]) + (a[2] + a[3]);
      for (int64_t i = groups * G; i < in; ++i)  // inputs left over (in % G)
        r += cb[(bits_at(w.codes, w.codes_bytes, (c * in + i) * B)) & ((1u << B) - 1)] * x[i];
      y[c] = w.channel_scale[c] * r;
    }
  }
}

// ---------------------------------------------------------------- public entry points
template <int B, class L>
inline void gemm_bits(const Packed& w, const L& lut, const float* x, int64_t M, float* y, const Options& o) {
  const int64_t in = w.in, out = w.out;
  if (!w.keep_bitmap) {
    for_rows(out, M, [&](int64_t c, int64_t m0, auto MB) {
      row_kernel<MB()>(DenseSrc<B, L>{w.codes, w.codes_bytes, c * in * B, lut}, in, x + m0 * in, in, y + m0 * out + c,
                       out, w.channel_scale[c]);
    });
    return;
  }
  Sparse mode = o.sparse;
  if (mode == Sparse::Auto) {
    const double density = double(w.code_offsets[(out * in - 1) / 64] + 64) / double(out * in);
    mode = (density < o.gather_below_density && M <= 4) ? Sparse::Gather : Sparse::Expand;
  }
  if (mode == Sparse::Expand) {
    for_rows(out, M, [&](int64_t c, int64_t m0, auto MB) {
      ExpandSrc<B, L> src{w.codes, w.codes_bytes, kept_before(w, c * in) * B, w.keep_bitmap, bitmap_bytes(w), c * in, lut};
      row_kernel<MB()>(src, in, x + m0 * in, in, y + m0 * out + c, out, w.channel_scale[c]);
    });
    return;
  }
#pragma omp parallel
  {
    std::vector<int32_t> pos(size_t(in) + 16);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < out; ++c)
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        with_int<1, 8>(int(M - m0 < 8 ? M - m0 : 8), [&](auto MB) {
          row_gather<MB(), B>(w, lut, c, pos.data(), x + m0 * in, in, y + m0 * out + c, out);
        });
  }
}

// y (M x out) = x (M x in) W^T.
inline void gemm(const Packed& w, const float* x, int64_t M, float* y, const Options& o = {}) {
  const bool uniform = is_uniform(w.codebook, w.bits);
  if (o.tmac && M == 1 && !w.keep_bitmap && w.bits == 1 &&
      (w.in * w.bits) % 8 == 0 && o.lut == LutKind::Auto) {
    static thread_local std::vector<float> tab;
    with_int<1, 4>(w.bits, [&](auto B) {
      if constexpr (B() != 3) tmac_gemv<B()>(w, x, y, tab);
    });
    return;
  }
  with_int<1, 8>(w.bits, [&](auto Bc) {
    constexpr int B = Bc();
    LutKind k = o.lut;
    if (k == LutKind::Auto) k = uniform ? LutKind::Uniform : (B <= 6 ? LutKind::Reg : LutKind::Gather);
    if (k == LutKind::Uniform) gemm_bits<B>(w, UniformLut(w.codebook), x, M, y, o);
    else if (k == LutKind::Gather) gemm_bits<B>(w, GatherLut(w.codebook), x, M, y, o);
    else if constexpr (B <= 6) gemm_bits<B>(w, RegLut<B>(w.codebook), x, M, y, o);
  });
}

// fp32 baseline with the same blocking: W (out x in) row-major.
inline void gemm_f32(const float* W, int64_t out, int64_t in, const float* x, int64_t M, float* y) {
  for_rows(out, M, [&](int64_t c, int64_t m0, auto MB) {
    row_kernel<MB()>(F32Src{W + c * in}, in, x + m0 * in, in, y + m0 * out + c, out, 1.0f);
  });
}

}  // namespace lowbit
