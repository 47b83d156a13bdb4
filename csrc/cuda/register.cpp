// Registers the CUDA kernels (raw-pointer launchers in this folder's .cu files) for CUDA tensors.
// Compiled only when the extension is built with CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../device_glue.h"
#include "mixedprec/launchers.h"

namespace mixedprec {
namespace {

struct CudaLaunchers {
  static constexpr const char* kForwardName = "bit_sharing_quant_fwd";
  static constexpr const char* kBackwardName = "bit_sharing_quant_bwd";
  static constexpr const char* kResidualSumsName = "bit_sharing_quant_stats";
  static void* stream(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }
  static int64_t workspace_floats(int64_t n) { return cuda::bit_sharing_workspace_floats(n); }
  static constexpr auto forward = &cuda::bit_sharing_forward;
  static constexpr auto apply = &cuda::bit_sharing_apply;
  static constexpr auto residual_sums = &cuda::bit_sharing_residual_sums;
  static constexpr auto backward = &cuda::bit_sharing_backward;
  static constexpr const char* kCodebookForwardName = "codebook_quant_fwd";
  static constexpr auto codebook_forward = &cuda::codebook_quant_forward;
};

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& clip, const at::Tensor& thresholds,
                                       at::IntArrayRef bits, bool is_signed, const std::optional<at::Tensor>& residual_mean) {
  const c10::cuda::CUDAGuard guard(x.device());
  return device_bit_sharing_fwd<CudaLaunchers>(x, clip, thresholds, bits, is_signed, residual_mean);
}

at::Tensor residual_sums(const at::Tensor& x, const at::Tensor& clip, at::IntArrayRef bits, bool is_signed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return device_bit_sharing_residual_sums<CudaLaunchers>(x, clip, bits, is_signed);
}

std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& clip,
                                       const at::Tensor& gates, at::IntArrayRef bits, bool is_signed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return device_bit_sharing_bwd<CudaLaunchers>(grad_y, x, clip, gates, bits, is_signed);
}

at::Tensor codebook_fwd(const at::Tensor& weight, const at::Tensor& codebook, const at::Tensor& channel_scale,
                        const at::Tensor& keep_mask) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return device_codebook_quant_fwd<CudaLaunchers>(weight, codebook, channel_scale, keep_mask);
}

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CUDA, m) {
  m.impl("bit_sharing_quant_fwd", &mixedprec::fwd);
  m.impl("bit_sharing_quant_bwd", &mixedprec::bwd);
  m.impl("bit_sharing_quant_stats", &mixedprec::residual_sums);
  m.impl("codebook_quant_fwd", &mixedprec::codebook_fwd);
}

// --- lowbit_linear
#include "../lowbit_glue.h"

namespace mixedprec {
namespace {

struct CudaLowbitLaunchers {
  static constexpr const char* kLowbitForwardName = "lowbit_linear_fwd";
  static constexpr const char* kLowbitBackwardName = "lowbit_linear_bwd";
  static void* stream(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }
  static constexpr auto lowbit_forward = &cuda::lowbit_linear_forward;
  static constexpr auto lowbit_backward = &cuda::lowbit_linear_backward;
};

template <auto Fn>
at::Tensor guarded(const at::Tensor& t, const at::Tensor& codebook, const at::Tensor& channel_scale,
                   const at::Tensor& codes, const std::optional<at::Tensor>& keep_bitmap,
                   const at::Tensor& row_code_offsets, const std::optional<at::Tensor>& group_code_offsets,
                   int64_t in_features, int64_t bits) {
  const c10::cuda::CUDAGuard guard(t.device());
  return Fn(t, codebook, channel_scale, codes, keep_bitmap, row_code_offsets, group_code_offsets, in_features, bits);
}

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CUDA, m) {
  using Device = mixedprec::LowbitLinearDevice<mixedprec::CudaLowbitLaunchers>;
  m.impl("lowbit_linear_fwd", &mixedprec::guarded<&Device::forward>);
  m.impl("lowbit_linear_bwd", &mixedprec::guarded<&Device::backward>);
}

// ---------------------------------------------------------------------------------------------
// lut_conv2d
namespace mixedprec {
namespace {

struct CudaLutConv2d {
  static constexpr const char* kForwardName = "lut_conv2d_fwd";
  static constexpr const char* kBackwardName = "lut_conv2d_bwd";
  static void* stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
  static constexpr auto forward = &cuda::lut_conv2d_forward;
  static constexpr auto backward = &cuda::lut_conv2d_backward;
};

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CUDA, m) {
  m.impl("lut_conv2d_fwd", [](const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                              const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                              int64_t bits, at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    const c10::cuda::CUDAGuard guard(x.device());
    return mixedprec::device_lut_conv2d_fwd<mixedprec::CudaLutConv2d>(x, codes, codebook, channel_scale, keep_bitmap, bits,
                                                                      weight_shape, bias, stride, padding, dilation, groups);
  });
  m.impl("lut_conv2d_bwd", [](const at::Tensor& grad_y, const at::Tensor& codes, const at::Tensor& codebook,
                              const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                              int64_t bits, at::IntArrayRef weight_shape, at::IntArrayRef input_shape,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    const c10::cuda::CUDAGuard guard(grad_y.device());
    return mixedprec::device_lut_conv2d_bwd<mixedprec::CudaLutConv2d>(grad_y, codes, codebook, channel_scale, keep_bitmap,
                                                                      bits, weight_shape, input_shape, stride, padding,
                                                                      dilation, groups);
  });
}
