// 2-D convolution geometry, shared by lut_conv2d's CPU, CUDA and SIMT kernels.
#pragma once

#include <cstdint>

#include "mixedprec/common.h"

namespace mixedprec {

// y[n, co, oh, ow] = sum_{ci, kh, kw} W[co, ci, kh, kw] x[n, g C_in/groups + ci, ih, iw] (+ bias[co]),
// ih = oh * stride_h - pad_h + kh * dil_h (iw alike), g = co / (C_out / groups).
struct Conv2dGeometry {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_height, out_width;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;

  MP_HD int64_t group_in() const { return in_channels / groups; }
  MP_HD int64_t group_out() const { return out_channels / groups; }
  MP_HD int64_t row_length() const { return group_in() * kernel_h * kernel_w; }  // R, the GEMM depth
  MP_HD int64_t out_pixels() const { return out_height * out_width; }
};

}  // namespace mixedprec
