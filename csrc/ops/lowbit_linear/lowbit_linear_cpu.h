// lowbit_linear's CPU kernels (lowbit_linear_cpu.cpp), for its glue and for lut_conv2d's 1x1
// convolutions over few pixels: x (M, in) and grad_y (M, out) float32 and contiguous.
#pragma once

#include <ATen/ATen.h>

#include "mixedprec/packed_weight.h"

namespace mixedprec {
namespace cpu {
at::Tensor lowbit_linear_forward(const at::Tensor& x, const PackedView& w);
at::Tensor lowbit_linear_backward(const at::Tensor& grad_y, const PackedView& w);
}  // namespace cpu
}  // namespace mixedprec
