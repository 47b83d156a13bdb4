// Registers the SIMT-emulated CUDA kernels (mixedprec::simt::, compiled from csrc/cuda/*.cu by
// the generated build/simt/*.cpp wrappers) as CPU implementations of the simt_* ops.
#include <torch/library.h>

#include "../device_glue.h"
#include "mixedprec/launchers.h"

namespace mixedprec {
namespace {

struct SimtLaunchers {
  static constexpr const char* kForwardName = "simt_bit_sharing_quant_fwd";
  static constexpr const char* kBackwardName = "simt_bit_sharing_quant_bwd";
  static constexpr const char* kResidualSumsName = "simt_bit_sharing_quant_stats";
  static void* stream(const at::Tensor&) { return nullptr; }
  static int64_t workspace_floats(int64_t n) { return simt::bit_sharing_workspace_floats(n); }
  static constexpr auto forward = &simt::bit_sharing_forward;
  static constexpr auto apply = &simt::bit_sharing_apply;
  static constexpr auto residual_sums = &simt::bit_sharing_residual_sums;
  static constexpr auto backward = &simt::bit_sharing_backward;
  static constexpr const char* kCodebookForwardName = "simt_codebook_quant_fwd";
  static constexpr auto codebook_forward = &simt::codebook_quant_forward;
};

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CPU, m) {
  m.impl("simt_bit_sharing_quant_fwd", &mixedprec::device_bit_sharing_fwd<mixedprec::SimtLaunchers>);
  m.impl("simt_bit_sharing_quant_bwd", &mixedprec::device_bit_sharing_bwd<mixedprec::SimtLaunchers>);
  m.impl("simt_bit_sharing_quant_stats", &mixedprec::device_bit_sharing_residual_sums<mixedprec::SimtLaunchers>);
  m.impl("simt_codebook_quant_fwd", &mixedprec::device_codebook_quant_fwd<mixedprec::SimtLaunchers>);
}

// --- lowbit_linear
#include "../lowbit_glue.h"

namespace mixedprec {
namespace {

struct SimtLowbitLaunchers {
  static constexpr const char* kLowbitForwardName = "simt_lowbit_linear_fwd";
  static constexpr const char* kLowbitBackwardName = "simt_lowbit_linear_bwd";
  static void* stream(const at::Tensor&) { return nullptr; }
  static constexpr auto lowbit_forward = &simt::lowbit_linear_forward;
  static constexpr auto lowbit_backward = &simt::lowbit_linear_backward;
};

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CPU, m) {
  using Device = mixedprec::LowbitLinearDevice<mixedprec::SimtLowbitLaunchers>;
  m.impl("simt_lowbit_linear_fwd", &Device::forward);
  m.impl("simt_lowbit_linear_bwd", &Device::backward);
}

// ---------------------------------------------------------------------------------------------
// lut_conv2d
namespace mixedprec {
namespace {

struct SimtLutConv2d {
  static constexpr const char* kForwardName = "simt_lut_conv2d_fwd";
  static constexpr const char* kBackwardName = "simt_lut_conv2d_bwd";
  static void* stream(const at::Tensor&) { return nullptr; }
  static constexpr auto forward = &simt::lut_conv2d_forward;
  static constexpr auto backward = &simt::lut_conv2d_backward;
};

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CPU, m) {
  m.impl("simt_lut_conv2d_fwd", &mixedprec::device_lut_conv2d_fwd<mixedprec::SimtLutConv2d>);
  m.impl("simt_lut_conv2d_bwd", &mixedprec::device_lut_conv2d_bwd<mixedprec::SimtLutConv2d>);
}
