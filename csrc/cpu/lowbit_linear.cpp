// lowbit_linear on the CPU: y = x W^T (forward) and grad_x = grad_y W (backward) with W read
// from the packed format (include/mixedprec/lowbit.h), never materialized as a whole.
//
// Work unit: a block of kRowBlock output channels. Their rows are decoded into a thread-local
// float tile (codebook levels; kRowBlock * in floats, L1/L2 resident), then every batch row is
// multiplied with the tile while it is hot. At batch 1 (GEMV) the cost is the decode: the packed
// codes are read once (bits/8 B per kept weight + 1/8 B of bitmap), x once per row block.
// Decode fast paths (AVX-512): 4- and 2-bit codes expanded 16 at a time and looked up with one
// vpermps in a register-resident codebook; sparse rows expanded with vexpandps under the bitmap.
// The scalar decoder is their twin (set_cpu_simd(false) selects it; tests compare both).
//
// Backward: grad_x[m] = sum_c (grad_y[m, c] * scale[c]) * W[c]. Small batches: output channels
// split into a fixed number of chunks (by shape, not thread count: results are deterministic),
// each accumulating into its own partial grad_x, summed in chunk order; large batches: tasks
// over batch rows, each decoding every row.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)  // as vec_ops.h: Vec is 16 lanes
#include <immintrin.h>
#define MP_LOWBIT_AVX512 1
#endif

#include "../lowbit_glue.h"
#include "vec_ops.h"

namespace mixedprec {
namespace {

constexpr int64_t kRowBlock = 8;
constexpr int64_t kLargeBatch = 64;  // backward: from this batch on, parallel over batch rows
constexpr int64_t kMaxChunks = 16;

std::atomic<bool> simd_enabled{true};

// kAccumulators independent FMA chains (vector step j feeds chain j % kAccumulators), added
// pairwise at the end: one chain would wait on the FMA latency every step.
constexpr int kAccumulators = 4;

inline float finish_dot(Vec (&acc)[kAccumulators]) {
  return float(lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3])));
}

// Kept codes [first, first + count) of the stream into levels (scalar twin: any bits).
void decode_levels_scalar(const PackedView& w, int64_t first, int64_t count, float* levels) {
  for (int64_t k = 0; k < count; ++k) levels[k] = w.codebook[read_code(w.codes, first + k, w.bits)];
}

#if defined(MP_LOWBIT_AVX512)
// 4- and 2-bit codes: scalar up to a byte boundary, then 16 codes per step.
void decode_levels_simd(const PackedView& w, int64_t first, int64_t count, float* levels) {
  const int per_byte = 8 / w.bits;
  int64_t k = 0;
  for (; k < count && (first + k) % per_byte != 0; ++k) levels[k] = w.codebook[read_code(w.codes, first + k, w.bits)];
  const __m512 lut = w.bits == 4 ? _mm512_loadu_ps(w.codebook) : _mm512_castps128_ps512(_mm_loadu_ps(w.codebook));
  const uint8_t* src = w.codes + (first + k) / per_byte;
  if (w.bits == 4) {
    const __m128i nibble = _mm_set1_epi8(0x0f);
    for (; k + 16 <= count; k += 16, src += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
      const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));  // code 2j: low nibble of byte j
      _mm512_storeu_ps(levels + k, _mm512_permutexvar_ps(idx, lut));
    }
  } else {
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i two_bits = _mm512_set1_epi32(3);
    for (; k + 16 <= count; k += 16, src += 4) {
      uint32_t word;
      std::memcpy(&word, src, 4);
      const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), shifts), two_bits);
      _mm512_storeu_ps(levels + k, _mm512_permutexvar_ps(idx, lut));
    }
  }
  for (; k < count; ++k) levels[k] = w.codebook[read_code(w.codes, first + k, w.bits)];
}

// Dense row from its kept levels: row[i] = bit i ? levels[next] : 0, 16 columns per vexpandps.
void expand_row_simd(const uint8_t* bitmap, int64_t nbytes, int64_t pos, int64_t in, const float* levels, float* row) {
  int64_t i = 0, k = 0;
  for (; i + 16 <= in; i += 16) {
    const __mmask16 keep = __mmask16(read_bits32(bitmap, nbytes, pos + i) & 0xffffu);
    _mm512_storeu_ps(row + i, _mm512_maskz_expandloadu_ps(keep, levels + k));
    k += popcount32(keep);
  }
  for (; i < in; ++i) row[i] = ((bitmap[(pos + i) >> 3] >> ((pos + i) & 7)) & 1) ? levels[k++] : 0.0f;
}
#endif

#if defined(MP_LOWBIT_AVX512)
// 16 levels of 4- or 2-bit codes starting at byte `src` (byte-aligned), from a register LUT.
template <int kBits>
__m512 decode16(const uint8_t* src, __m512 lut) {
  if constexpr (kBits == 4) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
    const __m128i nibble = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), lut);
  } else {
    uint32_t word;
    std::memcpy(&word, src, 4);
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), shifts), _mm512_set1_epi32(3));
    return _mm512_permutexvar_ps(idx, lut);
  }
}

constexpr int64_t kFusedBatch = 4;

// Small batches of dense, byte-aligned 4-/2-bit rows: the codes are decoded in registers and
// multiplied into x at once (no tile), reading bits/8 B per weight. The accumulation is the
// tile path's exactly (the same FMA chains over the same columns, scalar tail), so results
// are bit-identical to decode_row + dot_block.
template <int kBits>
void fused_rows(const PackedView& w, const float* x, int64_t m_rows, int64_t c0, int64_t c1, float* y) {
  const __m512 lut = kBits == 4 ? _mm512_loadu_ps(w.codebook) : _mm512_castps128_ps512(_mm_loadu_ps(w.codebook));
  const int64_t in = w.in;
  for (int64_t c = c0; c < c1; ++c) {
    const uint8_t* src = w.codes + c * in * kBits / 8;
    Vec acc[kFusedBatch][kAccumulators];
    for (int64_t m = 0; m < m_rows; ++m)
      for (int j = 0; j < kAccumulators; ++j) acc[m][j] = Vec(0.0f);
    int64_t k = 0;
    for (int j = 0; k + 16 <= in; k += 16, src += 2 * kBits, j = (j + 1) % kAccumulators) {
      const Vec levels(decode16<kBits>(src, lut));
      for (int64_t m = 0; m < m_rows; ++m)
        acc[m][j] = at::vec::fmadd(Vec::loadu(x + m * in + k), levels, acc[m][j]);
    }
    for (int64_t m = 0; m < m_rows; ++m) {
      float s = finish_dot(acc[m]);
      for (int64_t i = k; i < in; ++i) s += w.codebook[read_code(w.codes, c * in + i, kBits)] * x[m * in + i];
      y[m * w.out + c] = w.channel_scale[c] * s;
    }
  }
}
#endif

void expand_row_scalar(const uint8_t* bitmap, int64_t, int64_t pos, int64_t in, const float* levels, float* row) {
  int64_t k = 0;
  for (int64_t i = 0; i < in; ++i) row[i] = ((bitmap[(pos + i) >> 3] >> ((pos + i) & 7)) & 1) ? levels[k++] : 0.0f;
}

// Row c of W / channel_scale[c] (the levels, 0 at pruned positions) into row[0, in).
void decode_row(const PackedView& w, int64_t c, float* row, float* levels) {
  const int64_t first = w.row_code_offsets[c], count = w.row_code_offsets[c + 1] - first;
  float* dst = w.keep_bitmap ? levels : row;
#if defined(MP_LOWBIT_AVX512)
  const bool simd = simd_enabled.load(std::memory_order_relaxed);
  if (simd && (w.bits == 4 || w.bits == 2)) decode_levels_simd(w, first, count, dst);
  else decode_levels_scalar(w, first, count, dst);
  if (w.keep_bitmap) (simd ? expand_row_simd : expand_row_scalar)(w.keep_bitmap, w.bitmap_bytes, c * w.in, w.in, levels, row);
#else
  decode_levels_scalar(w, first, count, dst);
  if (w.keep_bitmap) expand_row_scalar(w.keep_bitmap, w.bitmap_bytes, c * w.in, w.in, levels, row);
#endif
}

// dots[i][j] = sum_k a[i n + k] b[j n + k] for i < ma, j < mb (at most 2 x 2): every a and b vector
// is loaded once for the block (half the loads per multiply-add of one dot at a time); each dot
// runs its own kAccumulators chains, summed by finish_dot, then the scalar tail.
template <int MA, int MB>
void dot_block(const float* a, const float* b, int64_t n, float (&dots)[2][2]) {
  Vec acc[MA][MB][kAccumulators];
  for (auto& row : acc)
    for (auto& chains : row)
      for (Vec& c : chains) c = Vec(0.0f);
  int64_t i = 0;
  for (int j = 0; i + Vec::size() <= n; i += Vec::size(), j = (j + 1) % kAccumulators) {
    Vec av[MA], bv[MB];
    for (int p = 0; p < MA; ++p) av[p] = Vec::loadu(a + p * n + i);
    for (int q = 0; q < MB; ++q) bv[q] = Vec::loadu(b + q * n + i);
    for (int p = 0; p < MA; ++p)
      for (int q = 0; q < MB; ++q) acc[p][q][j] = at::vec::fmadd(av[p], bv[q], acc[p][q][j]);
  }
  for (int p = 0; p < MA; ++p)
    for (int q = 0; q < MB; ++q) {
      float s = finish_dot(acc[p][q]);
      for (int64_t k = i; k < n; ++k) s += a[p * n + k] * b[q * n + k];
      dots[p][q] = s;
    }
}

void dot_block(const float* a, int ma, const float* b, int mb, int64_t n, float (&dots)[2][2]) {
  if (ma == 2) return mb == 2 ? dot_block<2, 2>(a, b, n, dots) : dot_block<2, 1>(a, b, n, dots);
  return mb == 2 ? dot_block<1, 2>(a, b, n, dots) : dot_block<1, 1>(a, b, n, dots);
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

struct Scratch {  // a task's decode buffers
  std::vector<float> tile, levels;
  explicit Scratch(int64_t rows, int64_t in) : tile(rows * in), levels(in) {}
};

at::Tensor forward(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& channel_scale,
                   const at::Tensor& codes, const std::optional<at::Tensor>& keep_bitmap,
                   const at::Tensor& row_code_offsets, const std::optional<at::Tensor>& group_code_offsets,
                   int64_t in_features, int64_t bits) {
  const char* op = "lowbit_linear_fwd";
  const PackedView w = check_packed(x, codebook, channel_scale, codes, keep_bitmap, row_code_offsets,
                                    group_code_offsets, in_features, bits, op);
  const int64_t m_rows = check_lowbit_input(x, in_features, op, "x"), in = w.in, out = w.out;
  at::Tensor y = poisoned(at::empty({m_rows, out}, x.options()));
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (out + kRowBlock - 1) / kRowBlock;
#if defined(MP_LOWBIT_AVX512)
  if (simd_enabled.load(std::memory_order_relaxed) && !w.keep_bitmap && (w.bits == 4 || w.bits == 2) &&
      m_rows <= kFusedBatch && (in * w.bits) % 8 == 0) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const int64_t c0 = b0 * kRowBlock, c1 = std::min(out, b1 * kRowBlock);
      (w.bits == 4 ? fused_rows<4> : fused_rows<2>)(w, xp, m_rows, c0, c1, yp);
    });
    return y;
  }
#endif
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    Scratch s(kRowBlock, in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kRowBlock, rows = std::min(kRowBlock, out - c0);
      for (int64_t r = 0; r < rows; ++r) decode_row(w, c0 + r, s.tile.data() + r * in, s.levels.data());
      for (int64_t m = 0; m < m_rows; m += 2)
        for (int64_t r = 0; r < rows; r += 2) {
          const int mb = int(std::min<int64_t>(2, m_rows - m)), rb = int(std::min<int64_t>(2, rows - r));
          float dots[2][2];
          dot_block(xp + m * in, mb, s.tile.data() + r * in, rb, in, dots);
          for (int i = 0; i < mb; ++i)
            for (int j = 0; j < rb; ++j) yp[(m + i) * out + c0 + r + j] = w.channel_scale[c0 + r + j] * dots[i][j];
        }
    }
  });
  return y;
}

at::Tensor backward(const at::Tensor& grad_y, const at::Tensor& codebook, const at::Tensor& channel_scale,
                    const at::Tensor& codes, const std::optional<at::Tensor>& keep_bitmap,
                    const at::Tensor& row_code_offsets, const std::optional<at::Tensor>& group_code_offsets,
                    int64_t in_features, int64_t bits) {
  const char* op = "lowbit_linear_bwd";
  const PackedView w = check_packed(grad_y, codebook, channel_scale, codes, keep_bitmap, row_code_offsets,
                                    group_code_offsets, in_features, bits, op);
  const int64_t m_rows = check_lowbit_input(grad_y, w.out, op, "grad_y"), in = w.in, out = w.out;
  const float* gp = grad_y.data_ptr<float>();
  const int64_t chunks = m_rows >= kLargeBatch ? 1 : std::min(kMaxChunks, (out + 63) / 64);
  const int64_t m_blocks = m_rows >= kLargeBatch ? (m_rows + 15) / 16 : 1;
  const int64_t m_per_block = (m_rows + m_blocks - 1) / std::max<int64_t>(m_blocks, 1);
  at::Tensor partial = at::zeros({chunks, m_rows, in}, grad_y.options());
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks * m_blocks, 1, [&](int64_t t0, int64_t t1) {
    Scratch s(1, in);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / m_blocks, mb = t % m_blocks;
      const int64_t c_begin = out * chunk / chunks, c_end = out * (chunk + 1) / chunks;
      const int64_t m_begin = mb * m_per_block, m_end = std::min(m_rows, m_begin + m_per_block);
      for (int64_t c = c_begin; c < c_end; ++c) {
        decode_row(w, c, s.tile.data(), s.levels.data());
        for (int64_t m = m_begin; m < m_end; ++m) {
          const float g = gp[m * out + c] * w.channel_scale[c];
          axpy(g, s.tile.data(), pp + (chunk * m_rows + m) * in, in);
        }
      }
    }
  });
  at::Tensor grad_x = partial.sum(0);  // chunk order: deterministic
  return grad_x;
}

bool set_cpu_simd(bool enabled) { return simd_enabled.exchange(enabled); }

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CPU, m) {
  m.impl("lowbit_linear_fwd", &mixedprec::forward);
  m.impl("lowbit_linear_bwd", &mixedprec::backward);
}

TORCH_LIBRARY_IMPL(mixedprec, CompositeImplicitAutograd, m) {
  m.impl("lowbit_set_cpu_simd", &mixedprec::set_cpu_simd);
}
