// lowbit_linear on the CPU: y = x W^T (forward) and grad_x = grad_y W (backward) with W read
// from the packed format (include/mixedprec/packed_weight.h), never materialized as a whole.
// Arguments are checked by the glue (lowbit_linear_glue.cpp).
//
// Work unit: a block of kRowBlock output channels. Their rows are decoded into a thread-local
// float tile (codebook levels; kRowBlock * in floats, L1/L2 resident), then every batch row is
// multiplied with the tile while it is hot. At batch 1 (GEMV) the cost is the decode: the packed
// codes are read once (bits/8 B per kept weight + 1/8 B of bitmap), x once per row block.
// Rows are decoded by code_decode.h (AVX-512: every bits, 16 codes per step, sparse rows through
// vexpandps; set_cpu_simd(false) selects the scalar twins, which tests compare with them). Up to
// kFusedBatch batch rows, each output row is decoded in registers and multiplied at once
// (cpu/lowbit_avx512.h's forward_rows, or fused_rows below for interleaved weights).
// Builds without AVX-512 but with AVX2 (x86-64-v3) take cpu/lowbit_avx2.h instead, at every bits
// and sparsity: up to kRegisterBatch batch rows each output row is decoded in registers and
// multiplied at once (avx2::forward_rows), larger batches and the backward decode rows into the
// tile with it (avx2::decode_row). Its sums are dot_block's, in column order, so every path and
// the scalar twin agree bit for bit.
//
// Dense 4-/2-bit rows that start on a byte take the columns in an interleaved order (both x and
// W, so the dot products are the same sums): one 64-byte load holds 16 lanes of 32 bits, and
// lane l, bits [b s, b s + b) is column (32/b) l + s of the block; shifting the whole register by
// b and looking the low 4 bits up with vpermps yields the 16 levels of step s, one shuffle per 16
// weights (the natural order needs three). Every path of such weights (register-decoded small
// batches, decode tile, scalar twin) uses that order, so results do not depend on the path.
//
// Backward: grad_x = (grad_y * scale) W. Output channels split into a fixed number of chunks (by
// shape, not thread count: results are deterministic), each adding its blocks of decoded rows
// (through sgemm) into its own partial grad_x, summed in chunk order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/code_decode.h"
#include "cpu/lowbit_avx2.h"
#include "cpu/switches.h"
#include "cpu/vec_ops.h"
#include "mixedprec/packed_weight.h"
#include "register/op.h"

namespace mixedprec {
namespace {

constexpr int64_t kRowBlock = 8;
constexpr int64_t kMaxChunks = 16;
// From this batch on, the forward decodes kGemmRows rows at a time into a float block and
// multiplies it with ATen's sgemm (4096 x 4096, batch 64, one thread: 50 ms through the decode
// tile's 2 x 2 dot blocks, 64 ms for fp32 F.linear, 51 ms this way). Each task decodes and
// multiplies its own blocks (one parallel region a call: with a region per block, a loaded
// machine spent 0.5 s a call in barriers). Below it the dot blocks keep a row's result
// independent of the other rows of its batch. The backward always takes blocks.
constexpr int64_t kGemmBatch = 16;
constexpr int64_t kGemmRows = 64;
// AVX2 builds: up to this batch the forward decodes every row in registers (avx2::forward_rows,
// one pass of its kMaxRows), above it through the decode tile (the same sums either way; measured
// on 4096 x 4096: at batch 16 the tile takes a third of the time of six register passes).
#if defined(MP_LOWBIT_AVX2) && !defined(MP_DECODE_AVX512)
constexpr int64_t kRegisterBatch = avx2::kMaxRows;
#endif

// kAccumulators independent FMA chains (vector step j feeds chain j % kAccumulators, see
// for_each_step), added pairwise at the end: the order cpu/lowbit_avx2.h's kernels follow.
constexpr int kAccumulators = kChains;

inline float finish_dot(Vec (&acc)[kAccumulators]) {
  return float(lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3])));
}

// Columns in the interleaved order: blocks of 16 * 32/bits columns (one 64-byte code load);
// column (32/bits) l + s of a block goes to position 16 s + l. Columns past the last whole block
// keep their place.
struct Interleave {
  int64_t steps, block, end;  // steps = codes per 32-bit lane; end = first column of the tail
  Interleave(int bits, int64_t in) : steps(32 / bits), block(16 * steps), end(in - in % block) {}
  int64_t position(int64_t i) const {
    if (i >= end) return i;
    const int64_t r = i % block;
    return i - r + 16 * (r % steps) + r / steps;
  }
  // dst[position(i)] = src[i] for i < in (a steps x 16 transpose per block, no divisions).
  void apply(const float* src, float* dst, int64_t in) const {
    for (int64_t b = 0; b < end; b += block)
      for (int64_t l = 0; l < 16; ++l)
        for (int64_t s = 0; s < steps; ++s) dst[b + 16 * s + l] = src[b + steps * l + s];
    std::copy(src + end, src + in, dst + end);
  }
};

// Dense 4-/2-bit rows starting on a byte: the forward runs in the interleaved order (AVX-512
// builds; the AVX2 kernels and their scalar twin take every row in column order).
bool interleaved(const PackedView& w) {
#if defined(MP_DECODE_AVX512)
  return !w.keep_bitmap && (w.bits == 4 || w.bits == 2) && (w.row_length * w.bits) % 8 == 0;
#else
  (void)w;
  return false;
#endif
}

#if defined(MP_DECODE_AVX512)
// Every step of one interleaved block of codes at `src` (64 bytes): step(s, chain, levels).
template <int kBits, class Step>
void interleaved_block(const uint8_t* src, __m512 lut, Step&& step) {
  __m512i lanes = _mm512_loadu_si512(src);
  for_each_step(32 / kBits, [&](int64_t s, auto chain) {
    step(s, chain, _mm512_permutexvar_ps(lanes, lut));
    lanes = _mm512_srli_epi32(lanes, kBits);
  });
}

// Row c of an interleaved weight (see Interleave) into row[0, in).
template <int kBits>
void decode_row_interleaved_simd(const PackedView& w, int64_t c, float* row) {
  const Interleave order(kBits, w.row_length);
  const __m512 lut = lut_register(w.codebook, kBits);
  const uint8_t* src = w.codes + c * w.row_length * kBits / 8;
  int64_t k = 0;
  for (; k < order.end; k += order.block, src += 64)
    interleaved_block<kBits>(src, lut, [&](int64_t s, auto, __m512 levels) { _mm512_storeu_ps(row + k + 16 * s, levels); });
  k += decode_run16<kBits>(src, w.row_length - k, lut, row + k);
  for (; k < w.row_length; ++k) row[k] = w.codebook[read_code(w.codes, c * w.row_length + k, kBits)];
}

constexpr int64_t kFusedBatch = avx512::kMaxRows;  // up to it, rows are decoded in registers

// Small batches (kM rows of interleaved x) times interleaved weights: the codes are decoded in
// registers and multiplied into x at once (no tile), reading bits/8 B per weight. The sums are
// the tile path's exactly (the same FMA chains over the same columns, scalar tail), so results
// are bit-identical to decode_row + dot_block.
template <int kBits, int kM>
void fused_rows(const PackedView& w, const float* x, int64_t c0, int64_t c1, float* y) {
  const __m512 lut = lut_register(w.codebook, kBits);
  const Interleave order(kBits, w.row_length);
  const int64_t in = w.row_length;
  for (int64_t c = c0; c < c1; ++c) {
    const uint8_t* src = w.codes + c * in * kBits / 8;
    Vec acc[kM][kAccumulators];
    for (auto& chains : acc)
      for (Vec& a : chains) a = Vec(0.0f);
    const auto fma = [&](int64_t k, auto chain, __m512 levels) {
      for (int m = 0; m < kM; ++m) acc[m][chain] = at::vec::fmadd(Vec::loadu(x + m * in + k), Vec(levels), acc[m][chain]);
    };
    int64_t k = 0;
    for (; k < order.end; k += order.block, src += 64)
      interleaved_block<kBits>(src, lut, [&](int64_t s, auto chain, __m512 levels) { fma(k + 16 * s, chain, levels); });
    const int64_t tail_steps = (in - k) / 16;
    for_each_step(tail_steps, [&](int64_t t, auto chain) { fma(k + 16 * t, chain, decode16<kBits>(src + 2 * kBits * t, lut)); });
    k += 16 * tail_steps;
    for (int m = 0; m < kM; ++m) {
      float s = finish_dot(acc[m]);
      for (int64_t i = k; i < in; ++i) s += w.codebook[read_code(w.codes, c * in + i, kBits)] * x[m * in + i];
      y[m * w.out + c] = w.channel_scale[c] * s;
    }
  }
}

template <int kBits>
void fused_forward(const PackedView& w, const float* x, int64_t m_rows, int64_t c0, int64_t c1, float* y) {
  switch (m_rows) {
    case 1: return fused_rows<kBits, 1>(w, x, c0, c1, y);
    case 2: return fused_rows<kBits, 2>(w, x, c0, c1, y);
    case 3: return fused_rows<kBits, 3>(w, x, c0, c1, y);
    default: return fused_rows<kBits, 4>(w, x, c0, c1, y);
  }
}
#endif

// Row c of W / channel_scale[c] (the levels, 0 at pruned positions) into row[0, in), in column
// order, or in the interleaved order when `interleave` (dense 4-/2-bit rows starting on a byte).
void decode_row(const PackedView& w, int64_t c, bool interleave, float* row, float* levels) {
  const int64_t f0 = c * w.row_length, first = kept_before(w, f0);
  const bool simd = cpu_simd.load(std::memory_order_relaxed);
  if (interleave) {
#if defined(MP_DECODE_AVX512)
    if (simd) return (w.bits == 4 ? decode_row_interleaved_simd<4> : decode_row_interleaved_simd<2>)(w, c, row);
#endif
    const Interleave order(w.bits, w.row_length);
    for (int64_t i = 0; i < w.row_length; ++i) row[order.position(i)] = w.codebook[read_code(w.codes, first + i, w.bits)];
    return;
  }
  if (!simd) return decode_run(w, w.codebook, f0, f0 + w.row_length, row);  // the scalar twin: the shared decoder
#if defined(MP_LOWBIT_AVX2) && !defined(MP_DECODE_AVX512)
  (void)first, (void)levels;
  return avx2::decode_row(w, c, row);
#endif
  if (!w.keep_bitmap) return decode_levels(w.codes, w.codebook, w.bits, first, w.row_length, row, simd);
  const int64_t count = count_kept(w.keep_bitmap, w.bitmap_bytes(), f0, w.row_length);
  decode_levels(w.codes, w.codebook, w.bits, first, count, levels, simd);
  expand_kept(w.keep_bitmap, w.bitmap_bytes(), f0, w.row_length, levels, row, simd);
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
  const int64_t steps = n / Vec::size();
  for_each_step(steps, [&](int64_t t, auto chain) {
    const int64_t i = t * Vec::size();
    Vec av[MA], bv[MB];
    for (int p = 0; p < MA; ++p) av[p] = Vec::loadu(a + p * n + i);
    for (int q = 0; q < MB; ++q) bv[q] = Vec::loadu(b + q * n + i);
    for (int p = 0; p < MA; ++p)
      for (int q = 0; q < MB; ++q) acc[p][q][chain] = at::vec::fmadd(av[p], bv[q], acc[p][q][chain]);
  });
  for (int p = 0; p < MA; ++p)
    for (int q = 0; q < MB; ++q) {
      float s = finish_dot(acc[p][q]);
      for (int64_t k = steps * Vec::size(); k < n; ++k) s += a[p * n + k] * b[q * n + k];
      dots[p][q] = s;
    }
}

void dot_block(const float* a, int ma, const float* b, int mb, int64_t n, float (&dots)[2][2]) {
  if (ma == 2) return mb == 2 ? dot_block<2, 2>(a, b, n, dots) : dot_block<2, 1>(a, b, n, dots);
  return mb == 2 ? dot_block<1, 2>(a, b, n, dots) : dot_block<1, 1>(a, b, n, dots);
}

struct Scratch {  // a task's decode buffers
  std::vector<float> tile, levels;
  explicit Scratch(int64_t rows, int64_t in) : tile(rows * in), levels(in) {}
};

// f(c0, block) for the blocks of at most kGemmRows output rows in [c_begin, c_end), in order:
// block (rows x in, in the scratch's tile) holds the levels of rows [c0, c0 + rows) (channel
// scale not applied).
template <class F>
void for_each_decoded_block(const PackedView& w, bool interleave, int64_t c_begin, int64_t c_end, Scratch& s, F&& f) {
  const int64_t in = w.row_length;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kGemmRows) {
    const int64_t rows = std::min(kGemmRows, c_end - c0);
    for (int64_t r = 0; r < rows; ++r) decode_row(w, c0 + r, interleave, s.tile.data() + r * in, s.levels.data());
    f(c0, at::from_blob(s.tile.data(), {rows, in}, at::TensorOptions().dtype(at::kFloat)));
  }
}

at::Tensor channel_scales(const PackedView& w) {  // a view, for the backward's grad_y * scale
  return at::from_blob(const_cast<float*>(w.channel_scale), {w.out}, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

namespace cpu {

at::Tensor lowbit_linear_forward(const at::Tensor& x, const PackedView& w) {
  const int64_t m_rows = x.size(0), in = w.row_length, out = w.out;
  at::Tensor y = poisoned(at::empty({m_rows, out}, x.options()));
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (out + kRowBlock - 1) / kRowBlock;
  const bool interleave = interleaved(w);
  at::Tensor x_ordered = interleave ? at::empty_like(x) : x;  // x in the columns' order
  const float* xp = x_ordered.data_ptr<float>();
  if (interleave) {
    const Interleave order(w.bits, in);
    const float* src = x.data_ptr<float>();
    float* dst = x_ordered.data_ptr<float>();
    at::parallel_for(0, m_rows, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) order.apply(src + m * in, dst + m * in, in);
    });
  }
#if defined(MP_DECODE_AVX512)
  if (cpu_simd.load(std::memory_order_relaxed) && m_rows <= kFusedBatch) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const int64_t c0 = b0 * kRowBlock, c1 = std::min(out, b1 * kRowBlock);
      if (interleave) (w.bits == 4 ? fused_forward<4> : fused_forward<2>)(w, xp, m_rows, c0, c1, yp);
      else avx512::forward_rows(w, xp, m_rows, c0, c1, yp);
    });
    return y;
  }
#elif defined(MP_LOWBIT_AVX2)
  if (cpu_simd.load(std::memory_order_relaxed) && m_rows <= kRegisterBatch) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      avx2::forward_rows(w, xp, m_rows, b0 * kRowBlock, std::min(out, b1 * kRowBlock), yp);
    });
    return y;
  }
#endif
  if (m_rows >= kGemmBatch) {
    at::parallel_for(0, ceil_div(out, kGemmRows), 1, [&](int64_t b0, int64_t b1) {
      Scratch s(kGemmRows, in);
      for_each_decoded_block(w, interleave, b0 * kGemmRows, std::min(out, b1 * kGemmRows), s,
                             [&](int64_t c0, const at::Tensor& block) {  // sgemm on this thread (nested region)
        const int64_t rows = block.size(0);
        const at::Tensor dots = at::mm(x_ordered, block.t());  // (m_rows, rows), contiguous
        const float* dp = dots.data_ptr<float>();
        for (int64_t m = 0; m < m_rows; ++m)
          for (int64_t j = 0; j < rows; ++j) yp[m * out + c0 + j] = w.channel_scale[c0 + j] * dp[m * rows + j];
      });
    });
    return y;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    Scratch s(kRowBlock, in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kRowBlock, rows = std::min(kRowBlock, out - c0);
      for (int64_t r = 0; r < rows; ++r) decode_row(w, c0 + r, interleave, s.tile.data() + r * in, s.levels.data());
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

at::Tensor lowbit_linear_backward(const at::Tensor& grad_y, const PackedView& w) {
  const int64_t m_rows = grad_y.size(0), in = w.row_length, out = w.out;
  const at::Tensor scaled = grad_y * channel_scales(w);  // grad_y[m, c] * scale[c]
  const int64_t chunks = std::min(kMaxChunks, ceil_div(out, kGemmRows));
  at::Tensor partial = at::zeros({chunks, m_rows, in}, grad_y.options());
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    Scratch s(kGemmRows, in);
    for (int64_t chunk = t0; chunk < t1; ++chunk)
      for_each_decoded_block(w, false, out * chunk / chunks, out * (chunk + 1) / chunks, s,
                             [&](int64_t c0, const at::Tensor& block) {
        const at::Tensor part = at::mm(scaled.narrow(1, c0, block.size(0)), block);  // (m_rows, in)
        const float* src = part.data_ptr<float>();
        float* dst = pp + chunk * m_rows * in;
        for (int64_t i = 0; i < m_rows * in; ++i) dst[i] += src[i];
      });
  });
  return partial.sum(0);  // chunk order: deterministic
}

}  // namespace cpu
}  // namespace mixedprec
