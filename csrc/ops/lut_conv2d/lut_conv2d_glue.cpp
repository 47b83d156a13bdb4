// lut_conv2d's torch glue: conv2d through a packed codebook weight (register/packed_weight.h),
// y and grad_x (the transposed convolution). x, grad_y: float32, float16 or bfloat16; codebook and
// channel_scale float32 (mixedprec/ops/packed_args.py widens them). Kernels: lut_conv2d_cpu.cpp (CPU),
// lut_conv2d.cu (CUDA, SIMT).
#include "mixedprec/conv2d.h"
#include "register/op.h"
#include "register/packed_weight.h"

namespace mixedprec {
namespace cpu {  // lut_conv2d_cpu.cpp; bias: float32 (C_out,) or undefined
at::Tensor lut_conv2d_forward(const at::Tensor& x, const at::Tensor& bias, const PackedView& w, const Conv2dGeometry& g);
at::Tensor lut_conv2d_backward(const at::Tensor& grad_y, const PackedView& w, const Conv2dGeometry& g);
}  // namespace cpu
namespace MP_DEVICE_NS {  // lut_conv2d.cu
// y = conv2d(x, W) + bias (bias may be null); grad_x = conv_transpose2d(grad_y, W)
const char* lut_conv2d_forward(DType dtype, const void* x, const float* bias, void* y, const PackedView& w,
                               const Conv2dGeometry& g, void* stream);
const char* lut_conv2d_backward(DType dtype, const void* grad_y, void* grad_x, const PackedView& w,
                                const Conv2dGeometry& g, void* stream);
}  // namespace MP_DEVICE_NS

namespace {

void check_pair(at::IntArrayRef v, int64_t min, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 2 && v[0] >= min && v[1] >= min, op, ": ", name, " must be two ints >= ", min,
              ", got ", v);
}

struct Args {
  PackedView w;
  Conv2dGeometry g;
};

// `t` is x (forward) or grad_y (backward): its dtype is the kernels' and every tensor must be on its device.
Args check_args(const at::Tensor& t, const char* name, at::IntArrayRef input_shape, const at::Tensor& codes,
                const at::Tensor& codebook, const at::Tensor& channel_scale,
                const std::optional<at::Tensor>& keep_bitmap, const std::optional<at::Tensor>& code_offsets,
                at::IntArrayRef weight_shape, int64_t bits, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation, int64_t groups, const char* op) {
  kernel_dtype(t, op, name);
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
  Args a{check_packed_weight(t, codes, codebook, channel_scale, keep_bitmap, code_offsets, weight_shape, bits, op), {}};
  Conv2dGeometry& g = a.g;
  g.batch = input_shape[0], g.in_channels = input_shape[1], g.height = input_shape[2], g.width = input_shape[3];
  g.out_channels = weight_shape[0], g.kernel_h = weight_shape[2], g.kernel_w = weight_shape[3];
  g.stride_h = stride[0], g.stride_w = stride[1], g.pad_h = padding[0], g.pad_w = padding[1];
  g.dil_h = dilation[0], g.dil_w = dilation[1], g.groups = groups;
  g.out_height = (g.height + 2 * g.pad_h - g.dil_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  g.out_width = (g.width + 2 * g.pad_w - g.dil_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  TORCH_CHECK(g.out_height >= 1 && g.out_width >= 1, op, ": the output would be empty: input ", input_shape,
              ", kernel ", weight_shape, ", padding ", padding, ", dilation ", dilation);
  return a;
}

// kDevice: the .cu kernels (CUDA in _C, SIMT in _simt); else the CPU kernels.
template <bool kDevice>
at::Tensor forward(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                   const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                   const std::optional<at::Tensor>& code_offsets, at::IntArrayRef weight_shape, int64_t bits,
                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups) {
  const char* op = "lut_conv2d_fwd";
  const Args a = check_args(x, "x", x.sizes(), codes, codebook, channel_scale, keep_bitmap, code_offsets, weight_shape,
                            bits, stride, padding, dilation, groups, op);
  const Conv2dGeometry& g = a.g;
  at::Tensor bias_f;
  if (bias.has_value()) {
    check_same_device(*bias, x, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == g.out_channels, op, ": bias must have shape (", g.out_channels,
                ",), got ", bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  if constexpr (!kDevice) {
    return cpu::lut_conv2d_forward(x, bias_f, a.w, g);
  } else {
    const DeviceCall call(x);
    const at::Tensor x_c = x.contiguous();
    at::Tensor y = poisoned(at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, x.options()));
    if (y.numel() == 0) return y;
    check_launch(MP_DEVICE_NS::lut_conv2d_forward(kernel_dtype(x, op, "x"), x_c.data_ptr(),
                                                  bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, y.data_ptr(),
                                                  a.w, g, call.stream()),
                 op);
    return y;
  }
}

template <bool kDevice>
at::Tensor backward(const at::Tensor& grad_y, const at::Tensor& codes, const at::Tensor& codebook,
                    const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                    const std::optional<at::Tensor>& code_offsets, at::IntArrayRef weight_shape, int64_t bits,
                    at::IntArrayRef input_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups) {
  const char* op = "lut_conv2d_bwd";
  const Args a = check_args(grad_y, "grad_y", input_shape, codes, codebook, channel_scale, keep_bitmap, code_offsets,
                            weight_shape, bits, stride, padding, dilation, groups, op);
  const Conv2dGeometry& g = a.g;
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_height, g.out_width}), op,
              ": grad_y must have the output's shape (", g.batch, ", ", g.out_channels, ", ", g.out_height, ", ",
              g.out_width, "), got ", grad_y.sizes());
  if constexpr (!kDevice) {
    return cpu::lut_conv2d_backward(grad_y, a.w, g);
  } else {
    const DeviceCall call(grad_y);
    const at::Tensor grad_y_c = grad_y.contiguous();
    at::Tensor grad_x = poisoned(at::empty(input_shape, grad_y.options()));
    if (grad_x.numel() == 0) return grad_x;
    check_launch(MP_DEVICE_NS::lut_conv2d_backward(kernel_dtype(grad_y, op, "grad_y"), grad_y_c.data_ptr(),
                                                   grad_x.data_ptr(), a.w, g, call.stream()),
                 op);
    return grad_x;
  }
}

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_FRAGMENT(MP_LIBRARY, m) {
  MP_OP(m, lut_conv2d_fwd, "(Tensor x, " MP_PACKED_WEIGHT_ARGS ", Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor", mixedprec::forward<false>, mixedprec::forward<true>);
  MP_OP(m, lut_conv2d_bwd, "(Tensor grad_y, " MP_PACKED_WEIGHT_ARGS ", int[] input_shape, int[] stride, "
        "int[] padding, int[] dilation, int groups) -> Tensor", mixedprec::backward<false>, mixedprec::backward<true>);
}
