// codebook_quant's torch glue (OPQ codebook fake-quant; math: include/mixedprec/codebook.h): y
// (the backward is a select in mixedprec/ops/codebook_quant.py). Kernels: codebook_quant_cpu.cpp (CPU),
// codebook_quant.cu (CUDA, SIMT).
#include <c10/util/accumulate.h>

#include <utility>

#include "mixedprec/codebook.h"
#include "register/op.h"

namespace mixedprec {
namespace cpu {  // codebook_quant_cpu.cpp: weight viewed as (weight.numel() / inner, inner) rows
at::Tensor codebook_quant_forward(const at::Tensor& weight, const at::Tensor& codebook,
                                  const at::Tensor& channel_scale, const at::Tensor& keep_mask, int64_t inner);
}  // namespace cpu
namespace MP_DEVICE_NS {  // codebook_quant.cu
// y = codebook fake-quant of weight viewed as (n / inner, inner) rows, one channel_scale per row,
// 0 where !keep_mask; codebook holds `levels` ascending floats (1..256)
const char* codebook_quant_forward(DType dtype, const void* weight, const bool* keep_mask, void* y, int64_t n,
                                   int64_t inner, const float* codebook, int levels, const float* channel_scale,
                                   void* stream);
}  // namespace MP_DEVICE_NS

namespace {

// Types, shapes, layouts and devices; returns `inner`, the weights per output channel. Values
// (codebook finite and strictly ascending, channel_scale finite and > 0) are checked by
// mixedprec/ops/codebook_quant.py before any backend runs: reading them here would sync the GPU on every call.
int64_t check_args(const at::Tensor& weight, const at::Tensor& codebook, const at::Tensor& channel_scale,
                   const at::Tensor& keep_mask, const char* op) {
  kernel_dtype(weight, op, "weight");
  TORCH_CHECK(weight.dim() >= 1, op, ": weight must have an output-channel dim 0, got a 0-dim tensor");
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  for (const auto& [t, name] : {std::pair{&codebook, "codebook"}, {&channel_scale, "channel_scale"},
                                {&keep_mask, "keep_mask"}})
    check_same_device(*t, weight, op, name, "weight");
  TORCH_CHECK(codebook.dim() == 1 && codebook.numel() >= 1 && codebook.numel() <= kMaxCodebookSize, op,
              ": codebook must be 1-D with 1 to ", kMaxCodebookSize, " levels, got shape ", codebook.sizes());
  check_float32(codebook, codebook.sizes(), op, "codebook");
  check_float32(channel_scale, {weight.size(0)}, op, "channel_scale");
  TORCH_CHECK(keep_mask.scalar_type() == at::kBool, op, ": keep_mask must be bool, got ", keep_mask.scalar_type());
  TORCH_CHECK(keep_mask.sizes() == weight.sizes(), op, ": keep_mask must have weight's shape ", weight.sizes(),
              ", got ", keep_mask.sizes());
  TORCH_CHECK(keep_mask.is_contiguous(), op, ": keep_mask must be contiguous");
  return c10::multiply_integers(weight.sizes().slice(1));
}

template <bool kDevice>
at::Tensor forward(const at::Tensor& weight, const at::Tensor& codebook, const at::Tensor& channel_scale,
                   const at::Tensor& keep_mask) {
  const char* op = "codebook_quant_fwd";
  const int64_t inner = check_args(weight, codebook, channel_scale, keep_mask, op);
  if constexpr (!kDevice) {
    return cpu::codebook_quant_forward(weight, codebook, channel_scale, keep_mask, inner);
  } else {
    const DeviceCall call(weight);
    at::Tensor y = poisoned(at::empty_like(weight));
    check_launch(MP_DEVICE_NS::codebook_quant_forward(kernel_dtype(weight, op, "weight"), weight.data_ptr(),
                                                      keep_mask.data_ptr<bool>(), y.data_ptr(), weight.numel(), inner,
                                                      codebook.data_ptr<float>(), int(codebook.numel()),
                                                      channel_scale.data_ptr<float>(), call.stream()),
                 op);
    return y;
  }
}

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_FRAGMENT(MP_LIBRARY, m) {
  MP_OP(m, codebook_quant_fwd, "(Tensor weight, Tensor codebook, Tensor channel_scale, Tensor keep_mask) -> Tensor",
        mixedprec::forward<false>, mixedprec::forward<true>);
}
