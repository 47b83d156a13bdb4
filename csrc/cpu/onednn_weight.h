// oneDNN's prepacked convolution weights, written by the lut_conv2d decoder instead of reordered
// from a float weight. ATen's float32 conv2d reorders a plain OIHW weight into oneDNN's blocked
// layout on every call (a full read and write of the float weight, ~0.3 ms for 512x512x3x3 here)
// and, on NCHW input, runs oneDNN's older direct kernels; its channels-last convolution with a
// prepacked weight (the op mkldnn::_convolution_pointwise) skips the reorder and runs the BRGEMM
// kernels: 0.89 against 1.25 ms for a 512x7x7 3x3 layer at batch 1, the NCHW <-> NHWC
// transposes of x and y included.
// The layout is learnt once per geometry by prepacking a weight whose entries are their own
// indices. Every blocked layout puts W[o, k] (k = (i, kh, kw), OIHW order) at
// channel[o] + tap[k]; that is checked, and the decoder writes there.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace mixedprec {

struct BlockedLayout {
  std::vector<uint8_t> descriptor;  // oneDNN's serialized memory descriptor of the weight
  int64_t floats = 0;               // buffer length, block padding included
  bool padded = false;              // some floats hold no weight: they must be 0
  std::vector<int64_t> channel;     // per output channel
  std::vector<int64_t> tap;         // per k < C_in/groups * kh * kw
  // Per 16 output channels 16j .. 16j + 15: whether they sit at 16 consecutive floats (O is the
  // innermost block), so the decoder stores them as one vector per tap.
  std::vector<uint8_t> channels_run16;
};

// The prepacked layout oneDNN's channels-last convolution expects for the weight `weight_shape`
// (C_out, C_in/groups, kh, kw) convolved over input `input_shape`, or nullptr where this path is not taken: torch without
// oneDNN or with it disabled (torch.backends.mkldnn.enabled), an empty batch, more than 2^24
// weights (the indices must be exact floats), or a layout not of the form above. Cached per
// geometry.
std::shared_ptr<const BlockedLayout> blocked_layout(at::IntArrayRef weight_shape, at::IntArrayRef input_shape,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, int64_t groups);

// conv2d(x, W) + bias through oneDNN, W held in `buffer` (float32, layout.floats long) as laid
// out by `layout`. x: float32, any memory format. The result is channels-last.
at::Tensor blocked_conv2d(const at::Tensor& x, const at::Tensor& buffer, const BlockedLayout& layout,
                          at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

}  // namespace mixedprec
