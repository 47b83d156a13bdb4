// lowbit_linear's torch glue: y = x W^T (forward) and grad_x = grad_y W (backward) with W (out, in)
// a packed weight (register/packed_weight.h), all float32 (mixedprec/ops/lowbit_linear.py widens x, grad_y,
// codebook and channel_scale). Kernels: lowbit_linear_cpu.cpp (CPU), lowbit_linear.cu (CUDA, SIMT).
#include "ops/lowbit_linear/lowbit_linear_cpu.h"
#include "register/op.h"
#include "register/packed_weight.h"

namespace mixedprec {
namespace MP_DEVICE_NS {  // lowbit_linear.cu: x (M, in), y (M, out), grad_y (M, out), grad_x (M, in)
const char* lowbit_linear_forward(const float* x, float* y, int64_t m_rows, const PackedView& w, void* stream);
const char* lowbit_linear_backward(const float* grad_y, float* grad_x, int64_t m_rows, const PackedView& w,
                                   void* stream);
}  // namespace MP_DEVICE_NS

namespace {

// t is x (M, in) in the forward, grad_y (M, out) in the backward: returns the checked weight view
// and M.
std::pair<PackedView, int64_t> check_args(const at::Tensor& t, const char* name, bool backward, const at::Tensor& codes,
                                          const at::Tensor& codebook, const at::Tensor& channel_scale,
                                          const std::optional<at::Tensor>& keep_bitmap,
                                          const std::optional<at::Tensor>& code_offsets, at::IntArrayRef weight_shape,
                                          int64_t bits, const char* op) {
  TORCH_CHECK(weight_shape.size() == 2, op, ": weight_shape must be [out, in], got ", weight_shape);
  const PackedView w =
      check_packed_weight(t, codes, codebook, channel_scale, keep_bitmap, code_offsets, weight_shape, bits, op);
  const int64_t features = backward ? w.out : w.row_length;
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == features && t.is_contiguous(), op, ": ", name,
              " must be a contiguous (M, ", features, ") tensor, got ", t.sizes());
  return {w, t.size(0)};
}

// kDevice: the .cu kernels (CUDA in _C, SIMT in _simt); else the CPU kernels.
template <bool kDevice>
at::Tensor forward(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                   const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                   const std::optional<at::Tensor>& code_offsets, at::IntArrayRef weight_shape, int64_t bits) {
  const char* op = "lowbit_linear_fwd";
  const auto [w, m_rows] = check_args(x, "x", false, codes, codebook, channel_scale, keep_bitmap, code_offsets,
                                      weight_shape, bits, op);
  if (m_rows == 0) return at::empty({0, w.out}, x.options());  // an empty batch: no kernel to run
  if constexpr (!kDevice) {
    return cpu::lowbit_linear_forward(x, w);
  } else {
    const DeviceCall call(x);
    at::Tensor y = poisoned(at::empty({m_rows, w.out}, x.options()));
    check_launch(MP_DEVICE_NS::lowbit_linear_forward(x.data_ptr<float>(), y.data_ptr<float>(), m_rows, w, call.stream()),
                 op);
    return y;
  }
}

template <bool kDevice>
at::Tensor backward(const at::Tensor& grad_y, const at::Tensor& codes, const at::Tensor& codebook,
                    const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                    const std::optional<at::Tensor>& code_offsets, at::IntArrayRef weight_shape, int64_t bits) {
  const char* op = "lowbit_linear_bwd";
  const auto [w, m_rows] = check_args(grad_y, "grad_y", true, codes, codebook, channel_scale, keep_bitmap,
                                      code_offsets, weight_shape, bits, op);
  if (m_rows == 0) return at::empty({0, w.row_length}, grad_y.options());
  if constexpr (!kDevice) {
    return cpu::lowbit_linear_backward(grad_y, w);
  } else {
    const DeviceCall call(grad_y);
    at::Tensor grad_x = poisoned(at::empty({m_rows, w.row_length}, grad_y.options()));
    check_launch(MP_DEVICE_NS::lowbit_linear_backward(grad_y.data_ptr<float>(), grad_x.data_ptr<float>(), m_rows, w,
                                                      call.stream()),
                 op);
    return grad_x;
  }
}

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_FRAGMENT(MP_LIBRARY, m) {
  MP_OP(m, lowbit_linear_fwd, "(Tensor x, " MP_PACKED_WEIGHT_ARGS ") -> Tensor", mixedprec::forward<false>,
        mixedprec::forward<true>);
  MP_OP(m, lowbit_linear_bwd, "(Tensor grad_y, " MP_PACKED_WEIGHT_ARGS ") -> Tensor", mixedprec::backward<false>,
        mixedprec::backward<true>);
}
