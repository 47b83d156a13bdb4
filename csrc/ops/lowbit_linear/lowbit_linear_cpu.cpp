// lowbit_linear on the CPU: y = x W^T (forward) and grad_x = grad_y W (backward) with W read
// from the packed format (include/mixedprec/packed_weight.h), never materialized as a whole.
// Arguments are checked by the glue (lowbit_linear_glue.cpp).
//
// Work unit: a block of kRowBlock output channels. Up to kRegisterBatch batch rows (the
// register-blocked limit of cpu/lowbit_simd.h, AVX2 or AVX-512 builds), each output row is
// decoded in registers and multiplied into x at once (simd::forward_rows: bits/8 B of codes +
// 1/8 B of bitmap read per weight, no float tile), at every bits 1..8, dense or sparse. Larger
// batches decode the block's rows into a thread-local float tile (simd::decode_row; kRowBlock *
// in floats, L1/L2 resident), then multiply every batch row with the tile while it is hot.
// set_cpu_simd(false) selects the scalar twin (decode_run + dot_block), which tests compare with
// them: every path sums dot_block's order (see lowbit_simd.h) in column order, so they agree bit
// for bit.
//
// Backward: grad_x[m] = sum_c (grad_y[m, c] * scale[c]) * W[c]. Small batches: output channels
// split into a fixed number of chunks (by shape, not thread count: results are deterministic),
// each accumulating into its own partial grad_x, summed in chunk order; large batches: tasks
// over batch rows, each decoding every row.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/lowbit_simd.h"
#include "cpu/switches.h"
#include "cpu/vec_ops.h"
#include "mixedprec/packed_weight.h"
#include "register/op.h"

namespace mixedprec {
namespace {

constexpr int64_t kRowBlock = 8;
constexpr int64_t kLargeBatch = 64;  // backward: from this batch on, parallel over batch rows
constexpr int64_t kMaxChunks = 16;
// Up to this batch the forward decodes every row in registers (one pass of simd::kMaxRows), above
// it through the decode tile (the same sums either way; measured on 4096 x 4096 with AVX2: at
// batch 16 the tile takes a third of the time of six register passes).
#if defined(MP_LOWBIT_SIMD)
constexpr int64_t kRegisterBatch = simd::kMaxRows;
static_assert(simd::kLanes == Vec::size(), "the register path sums in dot_block's lane order");
#endif

// kAccumulators independent FMA chains (vector step j feeds chain j % kAccumulators, see
// for_each_step), added pairwise at the end: the order cpu/lowbit_simd.h's kernels follow.
constexpr int kAccumulators = kChains;

inline float finish_dot(Vec (&acc)[kAccumulators]) {
  return float(lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3])));
}

// Row c of W / channel_scale[c] (the levels, 0 at pruned positions) into row[0, in).
void decode_row(const PackedView& w, int64_t c, float* row) {
#if defined(MP_LOWBIT_SIMD)
  if (cpu_simd.load(std::memory_order_relaxed)) return simd::decode_row(w, c, row);
#endif
  decode_run(w, w.codebook, c * w.row_length, (c + 1) * w.row_length, row);  // the scalar twin: the shared decoder
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

void axpy(float alpha, const float* x, float* y, int64_t n) {
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}


}  // namespace

namespace cpu {

at::Tensor lowbit_linear_forward(const at::Tensor& x, const PackedView& w) {
  const int64_t m_rows = x.size(0), in = w.row_length, out = w.out;
  at::Tensor y = poisoned(at::empty({m_rows, out}, x.options()));
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (out + kRowBlock - 1) / kRowBlock;
  const float* xp = x.data_ptr<float>();
#if defined(MP_LOWBIT_SIMD)
  if (cpu_simd.load(std::memory_order_relaxed) && m_rows <= kRegisterBatch) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      simd::forward_rows(w, xp, m_rows, b0 * kRowBlock, std::min(out, b1 * kRowBlock), yp);
    });
    return y;
  }
#endif
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tile(kRowBlock * in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kRowBlock, rows = std::min(kRowBlock, out - c0);
      for (int64_t r = 0; r < rows; ++r) decode_row(w, c0 + r, tile.data() + r * in);
      for (int64_t m = 0; m < m_rows; m += 2)
        for (int64_t r = 0; r < rows; r += 2) {
          const int mb = int(std::min<int64_t>(2, m_rows - m)), rb = int(std::min<int64_t>(2, rows - r));
          float dots[2][2];
          dot_block(xp + m * in, mb, tile.data() + r * in, rb, in, dots);
          for (int i = 0; i < mb; ++i)
            for (int j = 0; j < rb; ++j) yp[(m + i) * out + c0 + r + j] = w.channel_scale[c0 + r + j] * dots[i][j];
        }
    }
  });
  return y;
}

at::Tensor lowbit_linear_backward(const at::Tensor& grad_y, const PackedView& w) {
  const int64_t m_rows = grad_y.size(0), in = w.row_length, out = w.out;
  const float* gp = grad_y.data_ptr<float>();
  const int64_t chunks = m_rows >= kLargeBatch ? 1 : std::min(kMaxChunks, (out + 63) / 64);
  const int64_t m_blocks = m_rows >= kLargeBatch ? (m_rows + 15) / 16 : 1;
  const int64_t m_per_block = (m_rows + m_blocks - 1) / std::max<int64_t>(m_blocks, 1);
  at::Tensor partial = at::zeros({chunks, m_rows, in}, grad_y.options());
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks * m_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> row(in);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / m_blocks, mb = t % m_blocks;
      const int64_t c_begin = out * chunk / chunks, c_end = out * (chunk + 1) / chunks;
      const int64_t m_begin = mb * m_per_block, m_end = std::min(m_rows, m_begin + m_per_block);
      for (int64_t c = c_begin; c < c_end; ++c) {
        decode_row(w, c, row.data());
        for (int64_t m = m_begin; m < m_end; ++m) {
          const float g = gp[m * out + c] * w.channel_scale[c];
          axpy(g, row.data(), pp + (chunk * m_rows + m) * in, in);
        }
      }
    }
  });
  at::Tensor grad_x = partial.sum(0);  // chunk order: deterministic
  return grad_x;
}

}  // namespace cpu
}  // namespace mixedprec
