// SBS bit-sharing fake-quant on the CPU (math: include/mixedprec/bit_sharing.h), vectorized with
// ATen's Vectorized<float> and threaded with at::parallel_for.
//
// forward:  a reduction pass over x (per-chunk sums of |r_j|, 4 B/elem), then an elementwise
//           pass x -> y (8 B/elem in fp32);
// backward: one pass reading grad_y and x, writing grad_x, and reducing dL/dv and the K-1 gate
//           tails (12 B/elem).
// Reductions go through fixed-size chunks whose partials are summed in chunk order, so results
// do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../torch_utils.h"
#include "vec_ops.h"

namespace mixedprec {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per reduction chunk and per parallel task
constexpr int kW = Vec::size();
using Sums = std::array<double, kMaxCandidateBits>;

// Runs fn(begin, end) -> Sums over fixed chunks of [0, n) in parallel; returns the chunk sums
// added in chunk order.
template <class Fn>
Sums chunked_sums(int64_t n, const Fn& fn) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<Sums> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) partial[c] = fn(c * kChunk, std::min(n, (c + 1) * kChunk));
  });
  Sums total{};
  for (const Sums& s : partial)
    for (int j = 0; j < kMaxCandidateBits; ++j) total[j] += s[j];
  return total;
}

template <class T>
Sums residual_sums(const T* x, int64_t begin, int64_t end, float inv_clip, const BitSharingParams& p) {
  Vec acc[kMaxCandidateBits] = {};
  int64_t i = begin;
  for (; i + kW <= end; i += kW) {
    const Vec z = bs_normalize<VecOps>(load_vec(x + i) * Vec(inv_clip), p.is_signed);
    Vec offsets[kMaxCandidateBits], abs_residual[kMaxCandidateBits];
    bs_decompose<VecOps>(z, p, offsets, abs_residual);
    for (int j = 1; j < p.num_bits; ++j) acc[j] += abs_residual[j];
  }
  Sums s{};
  for (; i < end; ++i) {
    const float z = bs_normalize<ScalarOps>(static_cast<float>(x[i]) * inv_clip, p.is_signed);
    float offsets[kMaxCandidateBits], abs_residual[kMaxCandidateBits];
    bs_decompose<ScalarOps>(z, p, offsets, abs_residual);
    for (int j = 1; j < p.num_bits; ++j) s[j] += abs_residual[j];
  }
  for (int j = 1; j < p.num_bits; ++j) s[j] += lane_sum(acc[j]);
  return s;
}

template <class T>
void apply(const T* x, T* y, int64_t n, float clip, const float* gate_values, const BitSharingParams& p) {
  const float inv_clip = 1.0f / clip;
  Vec vgates[kMaxCandidateBits];
  for (int j = 0; j < kMaxCandidateBits; ++j) vgates[j] = Vec(gate_values[j]);
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kW <= end; i += kW) {
      const Vec z = bs_normalize<VecOps>(load_vec(x + i) * Vec(inv_clip), p.is_signed);
      Vec offsets[kMaxCandidateBits];
      const Vec base = bs_decompose<VecOps>(z, p, offsets, static_cast<Vec*>(nullptr));
      const Vec z_hat = bs_fold<VecOps>(base, offsets, vgates, p, static_cast<Vec*>(nullptr));
      store_vec(y + i, bs_output<VecOps>(z_hat, Vec(clip), p.is_signed));
    }
    for (; i < end; ++i) {
      const float z = bs_normalize<ScalarOps>(static_cast<float>(x[i]) * inv_clip, p.is_signed);
      float offsets[kMaxCandidateBits];
      const float base = bs_decompose<ScalarOps>(z, p, offsets, static_cast<float*>(nullptr));
      const float z_hat = bs_fold<ScalarOps>(base, offsets, gate_values, p, static_cast<float*>(nullptr));
      y[i] = static_cast<T>(bs_output<ScalarOps>(z_hat, clip, p.is_signed));
    }
  });
}

// Writes grad_x over [begin, end) and returns [sum g dy/dv, sum g T_2, ..., sum g T_K].
template <class T>
Sums backward_chunk(const T* grad_y, const T* x, T* grad_x, int64_t begin, int64_t end, float clip,
                    const float* gate_values, const BitSharingParams& p) {
  const float inv_clip = 1.0f / clip;
  const float lo = p.is_signed ? -1.0f : 0.0f;
  Vec vgates[kMaxCandidateBits];
  for (int j = 0; j < kMaxCandidateBits; ++j) vgates[j] = Vec(gate_values[j]);
  Vec acc[kMaxCandidateBits] = {};
  int64_t i = begin;
  for (; i + kW <= end; i += kW) {
    const Vec g = load_vec(grad_y + i);
    const Vec t = load_vec(x + i) * Vec(inv_clip);
    const Vec inside = (t >= Vec(lo)) & (t <= Vec(1.0f));
    store_vec(grad_x + i, Vec::blendv(Vec(0.0f), g, inside));
    const Vec z = bs_normalize<VecOps>(t, p.is_signed);
    Vec offsets[kMaxCandidateBits], tails[kMaxCandidateBits];
    const Vec base = bs_decompose<VecOps>(z, p, offsets, static_cast<Vec*>(nullptr));
    const Vec z_hat = bs_fold<VecOps>(base, offsets, vgates, p, tails);
    acc[0] += g * bs_clip_grad<VecOps>(z_hat, t, inside, p.is_signed);
    for (int j = 1; j < p.num_bits; ++j) acc[j] += g * tails[j];
  }
  Sums s{};
  for (; i < end; ++i) {
    const float g = static_cast<float>(grad_y[i]);
    const float t = static_cast<float>(x[i]) * inv_clip;
    const bool inside = t >= lo && t <= 1.0f;
    grad_x[i] = static_cast<T>(inside ? g : 0.0f);
    const float z = bs_normalize<ScalarOps>(t, p.is_signed);
    float offsets[kMaxCandidateBits], tails[kMaxCandidateBits];
    const float base = bs_decompose<ScalarOps>(z, p, offsets, static_cast<float*>(nullptr));
    const float z_hat = bs_fold<ScalarOps>(base, offsets, gate_values, p, tails);
    s[0] += g * bs_clip_grad<ScalarOps>(z_hat, t, inside, p.is_signed);
    for (int j = 1; j < p.num_bits; ++j) s[j] += g * tails[j];
  }
  for (int j = 0; j < p.num_bits; ++j) s[j] += lane_sum(acc[j]);
  return s;
}

template <class Fn>
void dispatch_dtype(const at::Tensor& x, const char* op, const Fn& fn) {
  switch (kernel_dtype(x, op, "x")) {
    case DType::f32: return fn(float{});
    case DType::f16: return fn(at::Half{});
    case DType::bf16: return fn(at::BFloat16{});
  }
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& clip, const at::Tensor& thresholds,
                                           at::IntArrayRef bits, bool is_signed) {
  const char* op = "bit_sharing_quant_fwd";
  const BitSharingParams p = check_bit_sharing(x, clip, thresholds, bits, is_signed, op, "thresholds");
  const float v = clip.item<float>();
  const int64_t n = x.numel();
  at::Tensor y = poisoned(at::empty_like(x));
  at::Tensor residual_mean = poisoned(at::empty({p.num_bits - 1}, clip.options()));
  float gate_values[kMaxCandidateBits] = {};
  dispatch_dtype(x, op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    if (p.num_bits > 1) {
      const Sums s = chunked_sums(n, [&](int64_t b, int64_t e) { return residual_sums(xp, b, e, 1.0f / v, p); });
      const float* thr = thresholds.const_data_ptr<float>();
      float* mean = residual_mean.data_ptr<float>();
      for (int j = 1; j < p.num_bits; ++j) {
        mean[j - 1] = float(s[j] / double(n));
        gate_values[j] = mean[j - 1] > thr[j - 1] ? 1.0f : 0.0f;
      }
    }
    apply(xp, y.data_ptr<T>(), n, v, gate_values, p);
  });
  return {y, residual_mean};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& clip,
                                            const at::Tensor& gates, at::IntArrayRef bits, bool is_signed) {
  const char* op = "bit_sharing_quant_bwd";
  const BitSharingParams p = check_bit_sharing(x, clip, gates, bits, is_signed, op, "gates");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.is_contiguous(),
              op, ": grad_y must be a contiguous tensor of x's shape and dtype");
  check_same_device(grad_y, x, op, "grad_y");
  const float v = clip.item<float>();
  float gate_values[kMaxCandidateBits] = {};
  for (int j = 1; j < p.num_bits; ++j) gate_values[j] = gates.const_data_ptr<float>()[j - 1];
  at::Tensor grad_x = poisoned(at::empty_like(x));
  at::Tensor sums = poisoned(at::empty({p.num_bits}, clip.options()));
  dispatch_dtype(x, op, [&](auto tag) {
    using T = decltype(tag);
    const T* gp = grad_y.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    T* gxp = grad_x.data_ptr<T>();
    const Sums s = chunked_sums(x.numel(), [&](int64_t b, int64_t e) {
      return backward_chunk(gp, xp, gxp, b, e, v, gate_values, p);
    });
    for (int j = 0; j < p.num_bits; ++j) sums.data_ptr<float>()[j] = float(s[j]);
  });
  return {grad_x, sums};
}

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CPU, m) {
  m.impl("bit_sharing_quant_fwd", &mixedprec::forward);
  m.impl("bit_sharing_quant_bwd", &mixedprec::backward);
}
