// The packed weight's seven op arguments (codes, codebook, channel_scale, keep_bitmap,
// code_offsets, weight_shape, bits; the same order in lowbit_linear and lut_conv2d) checked and
// turned into the kernels' view (include/mixedprec/packed_weight.h).
#pragma once

#include <optional>

#include "mixedprec/packed_weight.h"
#include "register/op.h"

// The seven arguments in schema form, written once for both ops.
#define MP_PACKED_WEIGHT_ARGS \
  "Tensor codes, Tensor codebook, Tensor channel_scale, Tensor? keep_bitmap, Tensor? code_offsets, int[] weight_shape, int bits"

namespace mixedprec {

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kLong: return "int64";
    case at::kByte: return "uint8";
    default: return c10::toString(t);
  }
}

// A contiguous tensor of `dtype` and `shape` on like's device.
inline void check_tensor(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const at::Tensor& like,
                         const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape, op, ": ", name, " must be ", dtype_name(dtype),
              " of shape ", shape, ", got ", dtype_name(t.scalar_type()), " ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  check_same_device(t, like, op, name);
}

// `like` is the op's x or grad_y: every tensor must be on its device. Reading values would sync a
// GPU, so the offsets' steps and the code stream's length of a sparse weight are checked on CPU
// tensors only (O(numel / 64)); formats.PackedWeight guarantees them anyway.
inline PackedView check_packed_weight(const at::Tensor& like, const at::Tensor& codes, const at::Tensor& codebook,
                                      const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                                      const std::optional<at::Tensor>& code_offsets, at::IntArrayRef weight_shape,
                                      int64_t bits, const char* op) {
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must lie in 1..8, got ", bits);
  TORCH_CHECK(!weight_shape.empty(), op, ": weight_shape must not be empty");
  int64_t numel = 1;
  for (int64_t s : weight_shape) {
    TORCH_CHECK(s >= 1, op, ": weight_shape must be positive, got ", weight_shape);
    numel *= s;
  }
  const int64_t out = weight_shape[0];
  check_tensor(codebook, at::kFloat, {int64_t(1) << bits}, like, op, "codebook");
  check_tensor(channel_scale, at::kFloat, {out}, like, op, "channel_scale");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1 && codes.is_contiguous(), op,
              ": codes must be a contiguous 1-D uint8 tensor, got ", codes.scalar_type(), " ", codes.sizes());
  check_same_device(codes, like, op, "codes");
  TORCH_CHECK(keep_bitmap.has_value() == code_offsets.has_value(), op,
              ": keep_bitmap and code_offsets must be given together");
  PackedView w{codes.data_ptr<uint8_t>(), codebook.data_ptr<float>(), channel_scale.data_ptr<float>(), nullptr,
               nullptr, out, numel / out, int(bits)};
  int64_t kept = numel;
  if (keep_bitmap.has_value()) {
    const int64_t blocks = ceil_div(numel, kCodeBlock);
    check_tensor(*keep_bitmap, at::kByte, {w.bitmap_bytes()}, like, op, "keep_bitmap");
    check_tensor(*code_offsets, at::kLong, {blocks}, like, op, "code_offsets");
    w.keep_bitmap = keep_bitmap->data_ptr<uint8_t>();
    w.code_offsets = code_offsets->data_ptr<int64_t>();
    if (!code_offsets->is_cpu()) return w;
    const int64_t* offsets = w.code_offsets;
    TORCH_CHECK(offsets[0] == 0, op, ": code_offsets must start at 0, got ", offsets[0]);
    // every call checks them: a branch-free pass (vectorized), then the culprit on failure
    uint64_t bad = 0;
    for (int64_t b = 1; b < blocks; ++b) bad |= uint64_t(offsets[b] - offsets[b - 1]) > uint64_t(kCodeBlock);
    for (int64_t b = 1; bad && b < blocks; ++b)
      TORCH_CHECK(offsets[b] - offsets[b - 1] >= 0 && offsets[b] - offsets[b - 1] <= kCodeBlock, op,
                  ": code_offsets must rise by 0..64 per block, but block ", b - 1, " goes from ", offsets[b - 1],
                  " to ", offsets[b]);
    kept = offsets[blocks - 1];
    for (int64_t byte = (blocks - 1) * (kCodeBlock / 8); byte < w.bitmap_bytes(); ++byte)
      kept += popcount32(w.keep_bitmap[byte]);
  }
  TORCH_CHECK(codes.numel() == ceil_div(kept * bits, 8), op, ": codes hold ", codes.numel(), " bytes but ", kept,
              " kept ", bits, "-bit codes need ", ceil_div(kept * bits, 8));
  return w;
}

}  // namespace mixedprec
