// SBS bit-sharing fake-quant on the GPU (math: include/mixedprec/bit_sharing.h).
//
// forward:  stats kernel   reads x once, per-block sums of |r_j|        (4 B/elem in fp32)
//           finalize       one block sums the per-block partials in double (deterministic)
//           apply kernel   reads x, writes y; gates read from device memory, no host sync
//                          (8 B/elem)
//           The stats half alone (residual sums in double) and the apply half alone (gates
//           from given means) are entry points too: distributed training reduces the sums
//           over ranks between them.
// backward: one kernel     reads grad_y and x, writes grad_x, per-block sums for dL/dv and the
//                          K-1 gate tails (12 B/elem), then the same finalize.
// Grid-stride loops over a capped grid keep the per-block partials small. zero_point (z0 of the
// unsigned grid, bit_sharing.h) is read from device memory like clip; nullptr means 0.
#include <algorithm>

#include "mixedprec/kernel_launch.h"
#include "mixedprec/bit_sharing.h"
#include "mixedprec/block_reduce.cuh"

namespace mixedprec {
namespace MP_KERNEL_NS {
namespace {
namespace bit_sharing_quant_impl {  // named: tests/csrc/simt_kernel_tests.cpp compiles every .cu in one unit

constexpr int kThreads = 256;
constexpr int kSums = kMaxCandidateBits;  // per-block values: K-1 residuals, or clip + K-1 tails
#if defined(MP_SIMT)
constexpr int64_t kMaxBlocks = 3;  // emulated blocks run one after another; few keep it quick
#else
constexpr int64_t kMaxBlocks = 2048;
#endif

int64_t grid_size(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

__device__ __forceinline__ float load_zero_point(const float* zero_point) {
  return zero_point ? *zero_point : 0.0f;
}

__device__ __forceinline__ void load_gates(const float* residual_mean, const float* thresholds,
                                           const BitSharingParams& p, float (&gates)[kMaxCandidateBits]) {
  MP_UNROLL for (int j = 0; j < kMaxCandidateBits; ++j)
    gates[j] = (j >= 1 && j < p.num_bits && residual_mean[j - 1] > thresholds[j - 1]) ? 1.0f : 0.0f;
}

template <class T>
__global__ void __launch_bounds__(kThreads, 4)
stats_kernel(const T* __restrict__ x, int64_t n, const float* __restrict__ clip, const float* __restrict__ zero_point,
             BitSharingParams p, float* __restrict__ partials) {
  const float inv_clip = 1.0f / *clip, z0 = load_zero_point(zero_point);
  float acc[kSums] = {};
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float z = bs_normalize<ScalarOps>(to_float(x[i]) * inv_clip, p.is_signed, z0);
    float offsets[kMaxCandidateBits] = {}, abs_residual[kMaxCandidateBits] = {};
    bs_decompose<ScalarOps>(z, p, offsets, abs_residual);
    MP_UNROLL for (int j = 1; j < kMaxCandidateBits; ++j)
      if (j < p.num_bits) acc[j - 1] += abs_residual[j];
  }
  block_sum(acc);
  if (threadIdx.x == 0)
    MP_UNROLL for (int j = 0; j < kSums; ++j) partials[int64_t(blockIdx.x) * kSums + j] = acc[j];
}

// out[j] = scale * sum over blocks of partials[b][j], j < count; one block, double accumulation.
template <class Out>
__global__ void __launch_bounds__(kThreads, 4)
finalize_kernel(const float* __restrict__ partials, int64_t blocks, int count, double scale, Out* __restrict__ out) {
  double acc[kSums] = {};
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x)
    MP_UNROLL for (int j = 0; j < kSums; ++j) acc[j] += partials[b * kSums + j];
  block_sum(acc);
  if (threadIdx.x == 0)
    MP_UNROLL for (int j = 0; j < kSums; ++j)
      if (j < count) out[j] = Out(acc[j] * scale);
}

template <class T>
__global__ void __launch_bounds__(kThreads, 4)
apply_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, const float* __restrict__ clip,
             const float* __restrict__ zero_point, const float* __restrict__ residual_mean,
             const float* __restrict__ thresholds, BitSharingParams p) {
  const float v = *clip, inv_clip = 1.0f / v, z0 = load_zero_point(zero_point);
  float gates[kMaxCandidateBits];
  load_gates(residual_mean, thresholds, p, gates);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float z = bs_normalize<ScalarOps>(to_float(x[i]) * inv_clip, p.is_signed, z0);
    float offsets[kMaxCandidateBits] = {};
    const float base = bs_decompose<ScalarOps>(z, p, offsets, static_cast<float*>(nullptr));
    const float z_hat = bs_fold<ScalarOps>(base, offsets, gates, p, static_cast<float*>(nullptr));
    y[i] = from_float<T>(bs_output<ScalarOps>(z_hat, v, p.is_signed, z0));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, 4)
backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, T* __restrict__ grad_x, int64_t n,
                const float* __restrict__ clip, const float* __restrict__ zero_point,
                const float* __restrict__ gates_in, BitSharingParams p, float* __restrict__ partials) {
  const float v = *clip, inv_clip = 1.0f / v, z0 = load_zero_point(zero_point);
  float gates[kMaxCandidateBits];
  MP_UNROLL for (int j = 0; j < kMaxCandidateBits; ++j) gates[j] = (j >= 1 && j < p.num_bits) ? gates_in[j - 1] : 0.0f;
  float acc[kSums] = {};  // acc[0]: sum grad_y dy/dv; acc[j]: sum grad_y T_{j+1}
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = to_float(grad_y[i]);
    const float t = to_float(x[i]) * inv_clip;
    const bool inside = bs_inside<ScalarOps>(t, p.is_signed, z0);
    grad_x[i] = from_float<T>(inside ? g : 0.0f);
    const float z = bs_normalize<ScalarOps>(t, p.is_signed, z0);
    float offsets[kMaxCandidateBits] = {}, tails[kMaxCandidateBits] = {};
    const float base = bs_decompose<ScalarOps>(z, p, offsets, static_cast<float*>(nullptr));
    const float z_hat = bs_fold<ScalarOps>(base, offsets, gates, p, tails);
    acc[0] += g * bs_clip_grad<ScalarOps>(z_hat, t, inside, p.is_signed, z0);
    MP_UNROLL for (int j = 1; j < kMaxCandidateBits; ++j)
      if (j < p.num_bits) acc[j] += g * tails[j];
  }
  block_sum(acc);
  if (threadIdx.x == 0)
    MP_UNROLL for (int j = 0; j < kSums; ++j) partials[int64_t(blockIdx.x) * kSums + j] = acc[j];
}

// Sums of |r_j| (j = 2..K) over x into out[j - 2], times scale: residual means or plain sums.
template <class T, class Out>
void launch_residual_stats(const T* x, int64_t n, const float* clip, const float* zero_point, Out* out, double scale,
                           float* workspace, const BitSharingParams& p, void* stream) {
  const int64_t blocks = grid_size(n);
  auto* stats = &stats_kernel<T>;
  MP_LAUNCH(stats, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, x, n, clip, zero_point, p, workspace);
  auto* finalize = &finalize_kernel<Out>;
  MP_LAUNCH(finalize, dim3(1), dim3(kThreads), 0, stream, workspace, blocks, p.num_bits - 1, scale, out);
}

template <class T>
const char* apply_typed(const void* x, void* y, int64_t n, const float* clip, const float* zero_point,
                        const float* thresholds, const float* residual_mean, const BitSharingParams& p, void* stream) {
  auto* apply = &apply_kernel<T>;
  MP_LAUNCH(apply, dim3(unsigned(grid_size(n))), dim3(kThreads), 0, stream, static_cast<const T*>(x),
            static_cast<T*>(y), n, clip, zero_point, residual_mean, thresholds, p);
  MP_LAUNCH_RESULT();
  return nullptr;
}

template <class T>
const char* forward_typed(const void* x, void* y, int64_t n, const float* clip, const float* zero_point,
                          const float* thresholds, float* residual_mean, float* workspace, const BitSharingParams& p,
                          void* stream) {
  if (p.num_bits > 1)
    launch_residual_stats(static_cast<const T*>(x), n, clip, zero_point, residual_mean, 1.0 / double(n), workspace, p,
                          stream);
  return apply_typed<T>(x, y, n, clip, zero_point, thresholds, residual_mean, p, stream);
}

template <class T>
const char* residual_sums_typed(const void* x, int64_t n, const float* clip, const float* zero_point, double* sums,
                                float* workspace, const BitSharingParams& p, void* stream) {
  if (p.num_bits > 1)
    launch_residual_stats(static_cast<const T*>(x), n, clip, zero_point, sums, 1.0, workspace, p, stream);
  MP_LAUNCH_RESULT();
  return nullptr;
}

template <class T>
const char* backward_typed(const void* grad_y, const void* x, void* grad_x, int64_t n, const float* clip,
                           const float* zero_point, const float* gates, float* sums, float* workspace,
                           const BitSharingParams& p, void* stream) {
  const int64_t blocks = grid_size(n);
  auto* backward = &backward_kernel<T>;
  MP_LAUNCH(backward, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, static_cast<const T*>(grad_y),
            static_cast<const T*>(x), static_cast<T*>(grad_x), n, clip, zero_point, gates, p, workspace);
  auto* finalize = &finalize_kernel<float>;
  MP_LAUNCH(finalize, dim3(1), dim3(kThreads), 0, stream, workspace, blocks, p.num_bits, 1.0, sums);
  MP_LAUNCH_RESULT();
  return nullptr;
}

}  // namespace bit_sharing_quant_impl
}  // namespace

int64_t bit_sharing_workspace_floats(int64_t n) {
  using namespace bit_sharing_quant_impl;
  return grid_size(n) * kSums;
}

const char* bit_sharing_forward(DType dtype, const void* x, void* y, int64_t n, const float* clip,
                                const float* zero_point, const float* thresholds, float* residual_mean, float* workspace,
                                const BitSharingParams& p, void* stream) {
  using namespace bit_sharing_quant_impl;
  switch (dtype) {
    case DType::f32: return forward_typed<float>(x, y, n, clip, zero_point, thresholds, residual_mean, workspace, p, stream);
    case DType::f16: return forward_typed<Half16>(x, y, n, clip, zero_point, thresholds, residual_mean, workspace, p, stream);
    case DType::bf16: return forward_typed<BFloat16>(x, y, n, clip, zero_point, thresholds, residual_mean, workspace, p, stream);
  }
  return "bit_sharing_forward: unsupported dtype";
}

const char* bit_sharing_apply(DType dtype, const void* x, void* y, int64_t n, const float* clip,
                              const float* zero_point, const float* thresholds, const float* residual_mean, const BitSharingParams& p,
                              void* stream) {
  using namespace bit_sharing_quant_impl;
  switch (dtype) {
    case DType::f32: return apply_typed<float>(x, y, n, clip, zero_point, thresholds, residual_mean, p, stream);
    case DType::f16: return apply_typed<Half16>(x, y, n, clip, zero_point, thresholds, residual_mean, p, stream);
    case DType::bf16: return apply_typed<BFloat16>(x, y, n, clip, zero_point, thresholds, residual_mean, p, stream);
  }
  return "bit_sharing_apply: unsupported dtype";
}

const char* bit_sharing_residual_sums(DType dtype, const void* x, int64_t n, const float* clip,
                                      const float* zero_point, double* sums, float* workspace,
                                      const BitSharingParams& p, void* stream) {
  using namespace bit_sharing_quant_impl;
  switch (dtype) {
    case DType::f32: return residual_sums_typed<float>(x, n, clip, zero_point, sums, workspace, p, stream);
    case DType::f16: return residual_sums_typed<Half16>(x, n, clip, zero_point, sums, workspace, p, stream);
    case DType::bf16: return residual_sums_typed<BFloat16>(x, n, clip, zero_point, sums, workspace, p, stream);
  }
  return "bit_sharing_residual_sums: unsupported dtype";
}

const char* bit_sharing_backward(DType dtype, const void* grad_y, const void* x, void* grad_x, int64_t n,
                                 const float* clip, const float* zero_point, const float* gates, float* sums, float* workspace,
                                 const BitSharingParams& p, void* stream) {
  using namespace bit_sharing_quant_impl;
  switch (dtype) {
    case DType::f32: return backward_typed<float>(grad_y, x, grad_x, n, clip, zero_point, gates, sums, workspace, p, stream);
    case DType::f16: return backward_typed<Half16>(grad_y, x, grad_x, n, clip, zero_point, gates, sums, workspace, p, stream);
    case DType::bf16: return backward_typed<BFloat16>(grad_y, x, grad_x, n, clip, zero_point, gates, sums, workspace, p, stream);
  }
  return "bit_sharing_backward: unsupported dtype";
}

}  // namespace MP_KERNEL_NS
}  // namespace mixedprec
