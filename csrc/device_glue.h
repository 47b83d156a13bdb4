// Torch-facing wrappers around the raw-pointer launchers of csrc/cuda/*.cu, shared by the real
// CUDA build (cuda/register.cpp) and the SIMT emulation (simt/register.cpp). `Launchers` is
// a struct of static functions forwarding to mixedprec::cuda:: or mixedprec::simt::.
#pragma once

#include <tuple>

#include "torch_utils.h"

namespace mixedprec {

// With `given_mean` the gates come from those residual means (e.g. reduced over ranks) and
// only the apply kernel runs; the returned residual_mean is a copy of them.
template <class Launchers>
std::tuple<at::Tensor, at::Tensor> device_bit_sharing_fwd(const at::Tensor& x, const at::Tensor& clip,
                                                          const at::Tensor& thresholds, at::IntArrayRef bits,
                                                          bool is_signed, const std::optional<at::Tensor>& given_mean) {
  const char* op = Launchers::kForwardName;
  const BitSharingParams p = check_bit_sharing(x, clip, thresholds, bits, is_signed, op, "thresholds");
  const auto stream = Launchers::stream(x);
  at::Tensor y = poisoned(at::empty_like(x));
  const char* err;
  at::Tensor residual_mean;
  if (given_mean) {
    check_same_device(*given_mean, x, op, "residual_mean");
    check_float32(*given_mean, {p.num_bits - 1}, op, "residual_mean");
    residual_mean = given_mean->clone();
    err = Launchers::apply(kernel_dtype(x, op, "x"), x.data_ptr(), y.data_ptr(), x.numel(), clip.data_ptr<float>(),
                           thresholds.data_ptr<float>(), residual_mean.data_ptr<float>(), p, stream);
  } else {
    residual_mean = poisoned(at::empty({p.num_bits - 1}, clip.options()));
    at::Tensor workspace = at::empty({Launchers::workspace_floats(x.numel())}, clip.options());
    err = Launchers::forward(kernel_dtype(x, op, "x"), x.data_ptr(), y.data_ptr(), x.numel(), clip.data_ptr<float>(),
                             thresholds.data_ptr<float>(), residual_mean.data_ptr<float>(),
                             workspace.data_ptr<float>(), p, stream);
  }
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return {y, residual_mean};
}

template <class Launchers>
at::Tensor device_bit_sharing_residual_sums(const at::Tensor& x, const at::Tensor& clip, at::IntArrayRef bits,
                                            bool is_signed) {
  const char* op = Launchers::kResidualSumsName;
  const BitSharingParams p = check_bit_sharing_stats(x, clip, bits, is_signed, op);
  at::Tensor sums = poisoned(at::empty({p.num_bits - 1}, clip.options().dtype(at::kDouble)));
  at::Tensor workspace = at::empty({Launchers::workspace_floats(x.numel())}, clip.options());
  const char* err = Launchers::residual_sums(kernel_dtype(x, op, "x"), x.data_ptr(), x.numel(), clip.data_ptr<float>(),
                                             sums.data_ptr<double>(), workspace.data_ptr<float>(), p,
                                             Launchers::stream(x));
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return sums;
}

template <class Launchers>
std::tuple<at::Tensor, at::Tensor> device_bit_sharing_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& clip, const at::Tensor& gates,
                                                          at::IntArrayRef bits, bool is_signed) {
  const char* op = Launchers::kBackwardName;
  const BitSharingParams p = check_bit_sharing_backward(grad_y, x, clip, gates, bits, is_signed, op);
  const auto stream = Launchers::stream(x);
  at::Tensor grad_x = poisoned(at::empty_like(x));
  at::Tensor sums = poisoned(at::empty({p.num_bits}, clip.options()));
  at::Tensor workspace = at::empty({Launchers::workspace_floats(x.numel())}, clip.options());
  const char* err = Launchers::backward(kernel_dtype(x, op, "x"), grad_y.data_ptr(), x.data_ptr(), grad_x.data_ptr(),
                                        x.numel(), clip.data_ptr<float>(), gates.data_ptr<float>(),
                                        sums.data_ptr<float>(), workspace.data_ptr<float>(), p, stream);
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return {grad_x, sums};
}

template <class Launchers>
at::Tensor device_codebook_quant_fwd(const at::Tensor& weight, const at::Tensor& codebook,
                                     const at::Tensor& channel_scale, const at::Tensor& keep_mask) {
  const char* op = Launchers::kCodebookForwardName;
  const CodebookQuantShape shape = check_codebook_quant(weight, codebook, channel_scale, keep_mask, op);
  const auto stream = Launchers::stream(weight);
  at::Tensor y = poisoned(at::empty_like(weight));
  const char* err = Launchers::codebook_forward(kernel_dtype(weight, op, "weight"), weight.data_ptr(),
                                                keep_mask.data_ptr<bool>(), y.data_ptr(), weight.numel(),
                                                shape.inner, codebook.data_ptr<float>(), shape.levels,
                                                channel_scale.data_ptr<float>(), stream);
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return y;
}

}  // namespace mixedprec

// ---------------------------------------------------------------------------------------------
// lut_conv2d: `Launchers` has kForwardName, kBackwardName, stream(t), forward and backward
// (the raw-pointer lut_conv2d launchers of cuda:: or simt::).
#include "lut_conv2d_args.h"

namespace mixedprec {

template <class Launchers>
at::Tensor device_lut_conv2d_fwd(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                                 const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                                 int64_t bits, at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const char* op = Launchers::kForwardName;
  const DType dtype = kernel_dtype(x, op, "x");
  const LutConv2dArgs a = check_lut_conv2d(op, x, x.sizes(), codes, codebook, channel_scale, keep_bitmap, bits,
                                           weight_shape, stride, padding, dilation, groups);
  const Conv2dGeometry& g = a.geometry;
  const at::Tensor bias_f = float_bias(op, bias, x, g);
  const at::Tensor x_c = x.contiguous();
  at::Tensor y = poisoned(at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, x.options()));
  if (y.numel() == 0) return y;
  const char* err = Launchers::forward(dtype, x_c.data_ptr(), bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
                                       y.data_ptr(), a.weight(), g, Launchers::stream(x));
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return y;
}

template <class Launchers>
at::Tensor device_lut_conv2d_bwd(const at::Tensor& grad_y, const at::Tensor& codes, const at::Tensor& codebook,
                                 const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                                 int64_t bits, at::IntArrayRef weight_shape, at::IntArrayRef input_shape,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const char* op = Launchers::kBackwardName;
  const LutConv2dArgs a = check_lut_conv2d(op, grad_y, input_shape, codes, codebook, channel_scale, keep_bitmap, bits,
                                           weight_shape, stride, padding, dilation, groups);
  check_grad_y(op, grad_y, a.geometry);
  const at::Tensor grad_y_c = grad_y.contiguous();
  at::Tensor grad_x = poisoned(at::empty(input_shape, grad_y.options()));
  if (grad_x.numel() == 0) return grad_x;
  const char* err = Launchers::backward(kernel_dtype(grad_y, op, "grad_y"), grad_y_c.data_ptr(), grad_x.data_ptr(),
                                        a.weight(), a.geometry, Launchers::stream(grad_y));
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return grad_x;
}

}  // namespace mixedprec
