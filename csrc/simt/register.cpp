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
  static void* stream(const at::Tensor&) { return nullptr; }
  static int64_t workspace_floats(int64_t n) { return simt::bit_sharing_workspace_floats(n); }
  static constexpr auto forward = &simt::bit_sharing_forward;
  static constexpr auto backward = &simt::bit_sharing_backward;
};

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CPU, m) {
  m.impl("simt_bit_sharing_quant_fwd", &mixedprec::device_bit_sharing_fwd<mixedprec::SimtLaunchers>);
  m.impl("simt_bit_sharing_quant_bwd", &mixedprec::device_bit_sharing_bwd<mixedprec::SimtLaunchers>);
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
