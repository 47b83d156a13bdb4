// Argument checks of the lut_conv2d kernel ops, shared by every device (cpu/, cuda/, simt/):
// the packed weight's tensors, the convolution's geometry, and the per-call bitmap word offsets
// the kernels use to find a weight's code in O(1) (derived here, never stored in the format).
#pragma once

#include <ATen/ATen.h>

#include "mixedprec/lut_weight.h"
#include "torch_utils.h"

namespace mixedprec {

struct LutConv2dArgs {
  Conv2dGeometry geometry;
  at::Tensor codes, codebook, channel_scale, keep_bitmap, word_code_offsets;  // channel_scale: float32
  int bits = 0;

  LutWeight weight() const {
    return LutWeight{codes.data_ptr<uint8_t>(),
                     codebook.data_ptr<float>(),
                     channel_scale.data_ptr<float>(),
                     keep_bitmap.defined() ? keep_bitmap.data_ptr<uint8_t>() : nullptr,
                     word_code_offsets.defined() ? word_code_offsets.data_ptr<int64_t>() : nullptr,
                     bits};
  }
};

// Kept weights before each 32-weight word of the bitmap (exclusive prefix sum of popcounts).
inline at::Tensor bitmap_word_code_offsets(const at::Tensor& keep_bitmap) {
  const int64_t words = (keep_bitmap.numel() + 3) / 4;
  const at::Tensor bytes = at::constant_pad_nd(keep_bitmap.to(at::kInt), {0, words * 4 - keep_bitmap.numel()});
  const at::Tensor bit = at::arange(8, bytes.options());
  const at::Tensor counts = bytes.unsqueeze(1).bitwise_right_shift(bit).bitwise_and(1).view({words, 32}).sum(1);
  return (counts.cumsum(0) - counts).to(at::kLong).contiguous();
}

inline void check_pair(at::IntArrayRef v, int64_t min, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 2 && v[0] >= min && v[1] >= min, op, ": ", name, " must be two ints >= ", min,
              ", got ", v);
}

// `device_like` is x (forward) or grad_y (backward): the device every tensor must be on.
inline LutConv2dArgs check_lut_conv2d(const char* op, const at::Tensor& device_like, at::IntArrayRef input_shape,
                                      const at::Tensor& codes, const at::Tensor& codebook,
                                      const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                                      int64_t bits, at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must lie in 1..8, got ", bits);
  TORCH_CHECK(weight_shape.size() == 4, op, ": weight_shape must be (C_out, C_in/groups, kh, kw), got ", weight_shape);
  TORCH_CHECK(input_shape.size() == 4, op, ": x must be 4-D (N, C_in, H, W), got shape ", input_shape);
  for (int64_t s : weight_shape) TORCH_CHECK(s >= 1, op, ": weight_shape must be positive, got ", weight_shape);
  check_pair(stride, 1, op, "stride");
  check_pair(padding, 0, op, "padding");
  check_pair(dilation, 1, op, "dilation");
  TORCH_CHECK(groups >= 1 && weight_shape[0] % groups == 0, op, ": groups must be >= 1 and divide C_out = ",
              weight_shape[0], ", got ", groups);
  TORCH_CHECK(input_shape[1] == weight_shape[1] * groups, op, ": x has ", input_shape[1],
              " channels but the weight expects C_in/groups * groups = ", weight_shape[1] * groups);

  LutConv2dArgs a;
  Conv2dGeometry& g = a.geometry;
  g.batch = input_shape[0], g.in_channels = input_shape[1], g.height = input_shape[2], g.width = input_shape[3];
  g.out_channels = weight_shape[0], g.kernel_h = weight_shape[2], g.kernel_w = weight_shape[3];
  g.stride_h = stride[0], g.stride_w = stride[1], g.pad_h = padding[0], g.pad_w = padding[1];
  g.dil_h = dilation[0], g.dil_w = dilation[1], g.groups = groups;
  g.out_height = (g.height + 2 * g.pad_h - g.dil_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  g.out_width = (g.width + 2 * g.pad_w - g.dil_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  TORCH_CHECK(g.out_height >= 1 && g.out_width >= 1, op, ": the output would be empty: input ", input_shape,
              ", kernel ", weight_shape, ", padding ", padding, ", dilation ", dilation);

  const int64_t numel = weight_shape[0] * weight_shape[1] * weight_shape[2] * weight_shape[3];
  check_same_device(codes, device_like, op, "codes");
  check_same_device(codebook, device_like, op, "codebook");
  check_same_device(channel_scale, device_like, op, "channel_scale");
  TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.dim() == 1 && codebook.numel() == (1 << bits), op,
              ": codebook must be float32 of shape (", 1 << bits, ",), got ", codebook.scalar_type(), " ", codebook.sizes());
  TORCH_CHECK((channel_scale.scalar_type() == at::kHalf || channel_scale.scalar_type() == at::kFloat) &&
                  channel_scale.dim() == 1 && channel_scale.numel() == g.out_channels,
              op, ": channel_scale must be float16 or float32 of shape (", g.out_channels, ",), got ",
              channel_scale.scalar_type(), " ", channel_scale.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1, op, ": codes must be a 1-D uint8 tensor, got ",
              codes.scalar_type(), " ", codes.sizes());
  int64_t kept = numel;
  if (keep_bitmap.has_value()) {
    const at::Tensor& bitmap = *keep_bitmap;
    check_same_device(bitmap, device_like, op, "keep_bitmap");
    TORCH_CHECK(bitmap.scalar_type() == at::kByte && bitmap.dim() == 1 && bitmap.numel() == (numel + 7) / 8, op,
                ": keep_bitmap must be uint8 of shape (", (numel + 7) / 8, ",), got ", bitmap.scalar_type(), " ",
                bitmap.sizes());
    a.keep_bitmap = bitmap.contiguous();
    a.word_code_offsets = bitmap_word_code_offsets(a.keep_bitmap);
    if (bitmap.is_cpu()) {  // on a GPU this would cost a sync; PackedWeight checked it when built
      const int64_t last = (numel - 1) >> 5;
      const at::Tensor tail = a.keep_bitmap.slice(0, last * 4).to(at::kInt);
      kept = a.word_code_offsets[last].item<int64_t>() +
             tail.unsqueeze(1).bitwise_right_shift(at::arange(8, tail.options())).bitwise_and(1).sum().item<int64_t>();
    }
  }
  if (codes.is_cpu())
    TORCH_CHECK(codes.numel() >= (kept * bits + 7) / 8, op, ": codes hold ", codes.numel(), " bytes but ", kept,
                " kept ", bits, "-bit codes need ", (kept * bits + 7) / 8);
  a.codes = codes.contiguous();
  a.codebook = codebook.contiguous();
  a.channel_scale = channel_scale.to(at::kFloat).contiguous();
  a.bits = int(bits);
  return a;
}

// bias (C_out,) as float32, or an undefined tensor.
inline at::Tensor float_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                             const Conv2dGeometry& g) {
  if (!bias.has_value()) return {};
  check_same_device(*bias, x, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->numel() == g.out_channels, op, ": bias must have shape (", g.out_channels,
              ",), got ", bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

inline void check_grad_y(const char* op, const at::Tensor& grad_y, const Conv2dGeometry& g) {
  kernel_dtype(grad_y, op, "grad_y");
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_height, g.out_width}), op,
              ": grad_y must have the output's shape (", g.batch, ", ", g.out_channels, ", ", g.out_height, ", ",
              g.out_width, "), got ", grad_y.sizes());
}

}  // namespace mixedprec
