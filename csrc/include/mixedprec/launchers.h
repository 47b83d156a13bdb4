// Raw-pointer entry points of the CUDA kernels. The same declarations exist twice: in
// namespace mixedprec::cuda (built by nvcc) and mixedprec::simt (the same sources compiled as
// C++ under the SIMT emulation). All pointers are device pointers for cuda, host for simt;
// `stream` is a cudaStream_t (ignored by simt). Each returns nullptr or an error string.
#pragma once

#include <cstdint>

#include "mixedprec/bit_sharing.h"
#include "mixedprec/codebook.h"
#include "mixedprec/common.h"
#include "mixedprec/lut_weight.h"

#define MP_DECLARE_LAUNCHERS                                                                   \
  /* floats of scratch the bit-sharing launchers need for n elements */                       \
  int64_t bit_sharing_workspace_floats(int64_t n);                                             \
  /* y = fake-quant(x); residual_mean[j-1] = mean |r_j| (j = 2..K) */                          \
  const char* bit_sharing_forward(DType dtype, const void* x, void* y, int64_t n,              \
                                  const float* clip, const float* thresholds,                  \
                                  float* residual_mean, float* workspace,                      \
                                  const BitSharingParams& p, void* stream);                    \
  /* y = fake-quant(x) with gates residual_mean[j-1] > thresholds[j-1] (means given) */        \
  const char* bit_sharing_apply(DType dtype, const void* x, void* y, int64_t n,                \
                                const float* clip, const float* thresholds,                    \
                                const float* residual_mean, const BitSharingParams& p,         \
                                void* stream);                                                 \
  /* sums[j-1] = sum |r_j| (j = 2..K) in double, for a reduction over ranks */                 \
  const char* bit_sharing_residual_sums(DType dtype, const void* x, int64_t n,                 \
                                        const float* clip, double* sums, float* workspace,     \
                                        const BitSharingParams& p, void* stream);              \
  /* grad_x = STE mask * grad_y; sums[0] = sum grad_y dy/dv, sums[j] = sum grad_y T_{j+1} */   \
  const char* bit_sharing_backward(DType dtype, const void* grad_y, const void* x,             \
                                   void* grad_x, int64_t n, const float* clip,                 \
                                   const float* gates, float* sums, float* workspace,          \
                                   const BitSharingParams& p, void* stream);                    \
  /* y = codebook fake-quant of weight viewed as (n / inner, inner) rows, one channel_scale */ \
  /* per row, 0 where !keep_mask; codebook holds `levels` ascending floats (1..256) */         \
  const char* codebook_quant_forward(DType dtype, const void* weight, const bool* keep_mask,   \
                                     void* y, int64_t n, int64_t inner,                        \
                                     const float* codebook, int levels,                        \
                                     const float* channel_scale, void* stream);   \
  /* y = conv2d(x, W decoded from the packed weight w) + bias (bias may be null) */             \
  const char* lut_conv2d_forward(DType dtype, const void* x, const float* bias, void* y,       \
                                 const LutWeight& w, const Conv2dGeometry& g, void* stream);   \
  /* grad_x = conv_transpose2d(grad_y, W): the gradient of lut_conv2d_forward w.r.t. x */      \
  const char* lut_conv2d_backward(DType dtype, const void* grad_y, void* grad_x,              \
                                  const LutWeight& w, const Conv2dGeometry& g, void* stream);

namespace mixedprec {
namespace cuda { MP_DECLARE_LAUNCHERS }
namespace simt { MP_DECLARE_LAUNCHERS }
}  // namespace mixedprec

// --- lowbit_linear (cuda/lowbit_linear.cu): x (M, in), y (M, out), grad_y (M, out), grad_x (M, in),
// all float32 contiguous; W from the packed view.
#include "mixedprec/lowbit.h"

#define MP_DECLARE_LOWBIT_LAUNCHERS                                                            \
  /* y = x W^T */                                                                              \
  const char* lowbit_linear_forward(const float* x, float* y, int64_t m_rows,                 \
                                    const PackedView& w, void* stream);                        \
  /* grad_x = grad_y W */                                                                      \
  const char* lowbit_linear_backward(const float* grad_y, float* grad_x, int64_t m_rows,      \
                                     const PackedView& w, void* stream);

namespace mixedprec {
namespace cuda { MP_DECLARE_LOWBIT_LAUNCHERS }
namespace simt { MP_DECLARE_LOWBIT_LAUNCHERS }
}  // namespace mixedprec
