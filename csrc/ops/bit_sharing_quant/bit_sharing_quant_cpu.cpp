// SBS bit-sharing fake-quant on the CPU (math: include/mixedprec/bit_sharing.h), vectorized with
// ATen's Vectorized<float>, threaded with at::parallel_for, instantiated per (K, signed) so the
// per-element loops unroll into registers.
//
// forward:  the gates depend on mean |r_j| over the whole tensor, which a single pass cannot
//           know before it writes y. So the gates are first guessed from a 1/128 sample of x,
//           then one fused pass reduces |r_j| and writes y under the guessed gates (4 + 4 B/elem
//           in fp32); only if the exact gates differ from the guess does a second elementwise
//           pass rewrite y. Results are exact either way. Given residual means (reduced over
//           ranks from the residual-sums entry point) the gates are known: one apply pass.
// backward: one pass reading grad_y and x, writing grad_x, and reducing dL/dv and the K-1 gate
//           tails (12 B/elem).
// Reductions go through fixed-size chunks whose partials are summed in chunk order, so results
// do not depend on the number of threads. Arguments are checked by the glue (bit_sharing_quant_glue.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "cpu/vec_ops.h"
#include "mixedprec/bit_sharing.h"
#include "register/op.h"

namespace mixedprec {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per reduction chunk and per parallel task
// Float lanes sum at most this many elements (64 per lane) before they are added into the double
// sums: over a whole chunk (1024 terms per lane) one-signed terms such as |r_j| lost up to 6e-5
// of the mean's relative accuracy; 64 terms keep it under 4e-6.
constexpr int64_t kFlush = 64 * Vec::size();
constexpr int64_t kSampleStride = 128;  // the gate guess reads every 128th chunk of kSampleRun
constexpr int64_t kSampleRun = 256;
constexpr int kW = Vec::size();
constexpr int K8 = kMaxCandidateBits;
using Sums = std::array<double, K8>;

// fn(begin, end) -> Sums over fixed chunks of [0, n), in parallel; the chunk sums are added in
// chunk order.
template <class Fn>
Sums chunked_sums(int64_t n, const Fn& fn) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<Sums> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) partial[c] = fn(c * kChunk, std::min(n, (c + 1) * kChunk));
  });
  Sums total{};
  for (const Sums& s : partial)
    for (int j = 0; j < K8; ++j) total[j] += s[j];
  return total;
}

// Calls step(i, acc) for every full vector of [begin, end), acc being float lanes that are added
// into s every kFlush elements; returns where the scalar tail starts.
template <class Step>
int64_t vector_sums(int64_t begin, int64_t end, Sums& s, const Step& step) {
  int64_t i = begin;
  while (i + kW <= end) {
    const int64_t block_end = std::min(end, i + kFlush);
    Vec acc[K8] = {};
    for (; i + kW <= block_end; i += kW) step(i, acc);
    for (int j = 0; j < K8; ++j) s[j] += lane_sum(acc[j]);
  }
  return i;
}

struct Gates {
  float value[K8] = {};  // value[j] = g_{j+1} in {0, 1}, j = 1..K-1
  bool operator==(const Gates& o) const { return std::equal(value, value + K8, o.value); }
};

// Gates 1[residual_mean[j-1] > thresholds[j-1]], j = 1..K-1.
template <class P>
Gates gates_of(const float* residual_mean, const float* thresholds) {
  Gates g;
  for (int j = 1; j < P::num_bits; ++j) g.value[j] = residual_mean[j - 1] > thresholds[j - 1] ? 1.0f : 0.0f;
  return g;
}

// Means of residual sums over `count` elements into residual_mean[0..K-2].
template <class P>
void means_of(const Sums& s, double count, float* residual_mean) {
  for (int j = 1; j < P::num_bits; ++j) residual_mean[j - 1] = float(s[j] / count);
}

// Over [begin, end): sums of |r_j| into the result, and y under `gates` when y is given.
template <class P, class T>
Sums forward_range(const T* x, T* y, int64_t begin, int64_t end, float clip, float z0, const Gates& gates,
                   const P& p) {
  const float inv_clip = 1.0f / clip;
  Vec vgates[K8];
  for (int j = 0; j < K8; ++j) vgates[j] = Vec(gates.value[j]);
  Sums s{};
  const int64_t tail = vector_sums(begin, end, s, [&](int64_t i, Vec* acc) {
    const Vec z = bs_normalize<VecOps>(load_vec(x + i) * Vec(inv_clip), P::is_signed, z0);
    Vec offsets[K8], abs_residual[K8];
    const Vec base = bs_decompose<VecOps>(z, p, offsets, abs_residual);
    for (int j = 1; j < P::num_bits; ++j) acc[j] += abs_residual[j];
    if (y) store_vec(y + i, bs_output<VecOps>(bs_fold<VecOps>(base, offsets, vgates, p, static_cast<Vec*>(nullptr)),
                                                Vec(clip), P::is_signed, z0));
  });
  for (int64_t i = tail; i < end; ++i) {
    const float z = bs_normalize<ScalarOps>(static_cast<float>(x[i]) * inv_clip, P::is_signed, z0);
    float offsets[K8], abs_residual[K8];
    const float base = bs_decompose<ScalarOps>(z, p, offsets, abs_residual);
    for (int j = 1; j < P::num_bits; ++j) s[j] += abs_residual[j];
    if (y) y[i] = static_cast<T>(bs_output<ScalarOps>(
               bs_fold<ScalarOps>(base, offsets, gates.value, p, static_cast<float*>(nullptr)), clip, P::is_signed, z0));
  }
  return s;
}

// y under known gates: one elementwise pass (the residual sums it computes are dropped).
template <class P, class T>
void apply(const T* x, T* y, int64_t n, float clip, float z0, const Gates& gates, const P& p) {
  at::parallel_for(0, n, kChunk, [&](int64_t b, int64_t e) { forward_range(x, y, b, e, clip, z0, gates, p); });
}

// With `given_mean` the gates come from it (and residual_mean is left alone).
template <class P, class T>
void forward(const T* x, T* y, int64_t n, float clip, float z0, const float* thresholds, const float* given_mean,
             float* residual_mean, const P& p) {
  if (P::num_bits == 1) return apply(x, y, n, clip, z0, Gates{}, p);  // no gates, no residuals
  if (given_mean) return apply(x, y, n, clip, z0, gates_of<P>(given_mean, thresholds), p);
  // Guess the gates from runs of kSampleRun elements every kSampleStride runs.
  Sums sample{};
  int64_t sampled = 0;
  for (int64_t b = 0; b < n; b += kSampleRun * kSampleStride) {
    const int64_t e = std::min(n, b + kSampleRun);
    const Sums s = forward_range<P, T>(x, nullptr, b, e, clip, z0, Gates{}, p);
    for (int j = 0; j < K8; ++j) sample[j] += s[j];
    sampled += e - b;
  }
  float sample_mean[K8];
  means_of<P>(sample, double(std::max<int64_t>(sampled, 1)), sample_mean);
  const Gates guess = gates_of<P>(sample_mean, thresholds);
  const Sums total = chunked_sums(n, [&](int64_t b, int64_t e) { return forward_range(x, y, b, e, clip, z0, guess, p); });
  means_of<P>(total, double(n), residual_mean);
  const Gates exact = gates_of<P>(residual_mean, thresholds);
  if (!(exact == guess)) apply(x, y, n, clip, z0, exact, p);  // rare: rewrite y
}

// sums[j-1] = sum |r_j| over x (j = 2..K), for a reduction over ranks.
template <class P, class T>
void residual_sums(const T* x, int64_t n, float clip, float z0, double* sums, const P& p) {
  const Sums total = chunked_sums(n, [&](int64_t b, int64_t e) {
    return forward_range<P, T>(x, nullptr, b, e, clip, z0, Gates{}, p);
  });
  for (int j = 1; j < P::num_bits; ++j) sums[j - 1] = total[j];
}

// Writes grad_x over [begin, end) and returns [sum g dy/dv, sum g T_2, ..., sum g T_K].
template <class P, class T>
Sums backward_range(const T* grad_y, const T* x, T* grad_x, int64_t begin, int64_t end, float clip, float z0,
                    const Gates& gates, const P& p) {
  const float inv_clip = 1.0f / clip;
  Vec vgates[K8];
  for (int j = 0; j < K8; ++j) vgates[j] = Vec(gates.value[j]);
  Sums s{};
  const int64_t tail = vector_sums(begin, end, s, [&](int64_t i, Vec* acc) {
    const Vec g = load_vec(grad_y + i);
    const Vec t = load_vec(x + i) * Vec(inv_clip);
    const Vec inside = bs_inside<VecOps>(t, P::is_signed, z0);
    store_vec(grad_x + i, Vec::blendv(Vec(0.0f), g, inside));
    const Vec z = bs_normalize<VecOps>(t, P::is_signed, z0);
    Vec offsets[K8], tails[K8];
    const Vec base = bs_decompose<VecOps>(z, p, offsets, static_cast<Vec*>(nullptr));
    const Vec z_hat = bs_fold<VecOps>(base, offsets, vgates, p, tails);
    acc[0] += g * bs_clip_grad<VecOps>(z_hat, t, inside, P::is_signed, z0);
    for (int j = 1; j < P::num_bits; ++j) acc[j] += g * tails[j];
  });
  for (int64_t i = tail; i < end; ++i) {
    const float g = static_cast<float>(grad_y[i]);
    const float t = static_cast<float>(x[i]) * inv_clip;
    const bool inside = bs_inside<ScalarOps>(t, P::is_signed, z0);
    grad_x[i] = static_cast<T>(inside ? g : 0.0f);
    const float z = bs_normalize<ScalarOps>(t, P::is_signed, z0);
    float offsets[K8], tails[K8];
    const float base = bs_decompose<ScalarOps>(z, p, offsets, static_cast<float*>(nullptr));
    const float z_hat = bs_fold<ScalarOps>(base, offsets, gates.value, p, tails);
    s[0] += g * bs_clip_grad<ScalarOps>(z_hat, t, inside, P::is_signed, z0);
    for (int j = 1; j < P::num_bits; ++j) s[j] += g * tails[j];
  }
  return s;
}

// Calls fn(FixedBitSharingParams<K, signed>{p}, T{}) for the runtime K, signedness and dtype.
template <int K = 1, class Fn>
void dispatch(const BitSharingParams& p, DType dtype, const Fn& fn) {
  if constexpr (K < K8) {
    if (p.num_bits != K) return dispatch<K + 1>(p, dtype, fn);
  }
  auto with_sign = [&](auto params) {
    switch (dtype) {
      case DType::f32: return fn(params, float{});
      case DType::f16: return fn(params, at::Half{});
      case DType::bf16: return fn(params, at::BFloat16{});
    }
  };
  if (p.is_signed) return with_sign(FixedBitSharingParams<K, true>(p));
  return with_sign(FixedBitSharingParams<K, false>(p));
}

}  // namespace

namespace cpu {

std::tuple<at::Tensor, at::Tensor> bit_sharing_quant_forward(const at::Tensor& x, const at::Tensor& clip,
                                                             const at::Tensor& thresholds, const BitSharingParams& p,
                                                             const std::optional<at::Tensor>& given_mean, float z0) {
  at::Tensor y = poisoned(at::empty_like(x));
  at::Tensor residual_mean = given_mean ? given_mean->clone() : poisoned(at::empty({p.num_bits - 1}, clip.options()));
  dispatch(p, kernel_dtype(x, "bit_sharing_quant_fwd", "x"), [&](const auto& fp, auto tag) {
    using T = decltype(tag);
    forward(x.const_data_ptr<T>(), y.data_ptr<T>(), x.numel(), clip.item<float>(), z0, thresholds.const_data_ptr<float>(),
            given_mean ? given_mean->const_data_ptr<float>() : nullptr, residual_mean.data_ptr<float>(), fp);
  });
  return {y, residual_mean};
}

at::Tensor bit_sharing_quant_stats(const at::Tensor& x, const at::Tensor& clip, const BitSharingParams& p, float z0) {
  at::Tensor sums = poisoned(at::empty({p.num_bits - 1}, clip.options().dtype(at::kDouble)));
  dispatch(p, kernel_dtype(x, "bit_sharing_quant_stats", "x"), [&](const auto& fp, auto tag) {
    using T = decltype(tag);
    residual_sums(x.const_data_ptr<T>(), x.numel(), clip.item<float>(), z0, sums.data_ptr<double>(), fp);
  });
  return sums;
}

std::tuple<at::Tensor, at::Tensor> bit_sharing_quant_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& clip, const at::Tensor& gates,
                                                              const BitSharingParams& p, float z0) {
  Gates gate_values;
  for (int j = 1; j < p.num_bits; ++j) gate_values.value[j] = gates.const_data_ptr<float>()[j - 1];
  at::Tensor grad_x = poisoned(at::empty_like(x));
  at::Tensor sums = poisoned(at::empty({p.num_bits}, clip.options()));
  const float v = clip.item<float>();
  dispatch(p, kernel_dtype(x, "bit_sharing_quant_bwd", "x"), [&](const auto& fp, auto tag) {
    using T = decltype(tag);
    const T* gp = grad_y.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    T* gxp = grad_x.data_ptr<T>();
    const Sums s = chunked_sums(x.numel(), [&](int64_t b, int64_t e) {
      return backward_range(gp, xp, gxp, b, e, v, z0, gate_values, fp);
    });
    for (int j = 0; j < p.num_bits; ++j) sums.data_ptr<float>()[j] = float(s[j]);
  });
  return {grad_x, sums};
}

}  // namespace cpu
}  // namespace mixedprec
