// Helpers for the torch-facing glue (ops.cpp, cpu/, cuda/, simt/): argument checks shared by
// every device, dtype mapping, and output poisoning for tests.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <limits>
#include <utility>

#include "mixedprec/bit_sharing.h"
#include "mixedprec/codebook.h"
#include "mixedprec/common.h"

namespace mixedprec {

inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name,
                              const char* x_name = "x") {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but ", x_name, " is on ", x.device());
}

inline void check_float32(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Validates x, clip and bits of the bit-sharing ops and returns the kernel parameters.
inline BitSharingParams check_bit_sharing_stats(const at::Tensor& x, const at::Tensor& clip, at::IntArrayRef bits,
                                                bool is_signed, const char* op) {
  kernel_dtype(x, op, "x");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t k = int64_t(bits.size());
  TORCH_CHECK(k >= 1 && k <= kMaxCandidateBits, op, ": bits must hold 1 to ", kMaxCandidateBits,
              " bitwidths, got ", bits);
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(bits[j] >= 1 && bits[j] <= 16, op, ": bits must lie in 1..16, got ", bits);
    TORCH_CHECK(j == 0 || bits[j - 1] < bits[j], op, ": bits must be strictly ascending, got ", bits);
  }
  check_same_device(clip, x, op, "clip");
  check_float32(clip, {}, op, "clip");
  return make_bit_sharing_params(bits.data(), int(k), is_signed);
}

// ... and the (K-1,) thresholds or gates.
inline BitSharingParams check_bit_sharing(const at::Tensor& x, const at::Tensor& clip, const at::Tensor& per_gate,
                                          at::IntArrayRef bits, bool is_signed, const char* op,
                                          const char* per_gate_name) {
  const BitSharingParams p = check_bit_sharing_stats(x, clip, bits, is_signed, op);
  check_same_device(per_gate, x, op, per_gate_name);
  check_float32(per_gate, {p.num_bits - 1}, op, per_gate_name);
  return p;
}

inline BitSharingParams check_bit_sharing_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                   const at::Tensor& clip, const at::Tensor& gates,
                                                   at::IntArrayRef bits, bool is_signed, const char* op) {
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.is_contiguous(),
              op, ": grad_y must be a contiguous tensor of x's shape and dtype");
  check_same_device(grad_y, x, op, "grad_y");
  return check_bit_sharing(x, clip, gates, bits, is_signed, op, "gates");
}

// weight viewed as (channels, inner): one channel_scale per row.
struct CodebookQuantShape {
  int64_t channels;
  int64_t inner;
  int levels;
};

// Validates the codebook_quant kernel arguments' types, shapes, layouts and devices. Their values
// (codebook finite and strictly ascending, channel_scale finite and > 0) are checked by
// mixedprec/ops.py before any backend runs: reading them here would sync the GPU on every call.
inline CodebookQuantShape check_codebook_quant(const at::Tensor& weight, const at::Tensor& codebook,
                                               const at::Tensor& channel_scale, const at::Tensor& keep_mask,
                                               const char* op) {
  kernel_dtype(weight, op, "weight");
  TORCH_CHECK(weight.dim() >= 1, op, ": weight must have an output-channel dim 0, got a 0-dim tensor");
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  for (const auto& [t, name] : {std::pair{&codebook, "codebook"}, {&channel_scale, "channel_scale"},
                                {&keep_mask, "keep_mask"}})
    check_same_device(*t, weight, op, name, "weight");
  TORCH_CHECK(codebook.dim() == 1 && codebook.numel() >= 1 && codebook.numel() <= kMaxCodebookSize, op,
              ": codebook must be 1-D with 1 to ", kMaxCodebookSize, " levels, got shape ", codebook.sizes());
  check_float32(codebook, codebook.sizes(), op, "codebook");
  const int64_t channels = weight.size(0);
  check_float32(channel_scale, {channels}, op, "channel_scale");
  TORCH_CHECK(keep_mask.scalar_type() == at::kBool, op, ": keep_mask must be bool, got ", keep_mask.scalar_type());
  TORCH_CHECK(keep_mask.sizes() == weight.sizes(), op, ": keep_mask must have weight's shape ", weight.sizes(),
              ", got ", keep_mask.sizes());
  TORCH_CHECK(keep_mask.is_contiguous(), op, ": keep_mask must be contiguous");
  return {channels, c10::multiply_integers(weight.sizes().slice(1)), int(codebook.numel())};
}

// With MIXEDPREC_POISON_OUTPUTS=1 (set by the test suite) every kernel output is filled with
// NaN before the kernel runs, so an element a kernel forgets to write cannot pass as correct.
inline at::Tensor poisoned(at::Tensor t) {
  static const bool poison = [] {
    const char* v = std::getenv("MIXEDPREC_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  if (poison) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

}  // namespace mixedprec
