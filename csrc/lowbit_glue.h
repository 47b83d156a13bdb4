// lowbit_linear's argument checks (one copy for the CPU, CUDA and SIMT kernels) and the
// tensors -> PackedView conversion. The kernels compute in float32: x, grad_y, codebook and
// channel_scale arrive as float32 (ops.py widens them), outputs are float32.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "mixedprec/lowbit.h"
#include "torch_utils.h"

namespace mixedprec {

inline void check_lowbit_tensor(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape,
                                const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  check_same_device(t, like, op, name);
}

// Checks the packed weight (out x in, `bits`-bit codes) against `x_like` (M, in or out) and
// returns its view. The code stream's length and the row offsets' steps are checked only on CPU
// tensors (reading a device value would sync); formats.PackedWeight guarantees both anyway, and
// the bitmap's agreement with the offsets.
inline PackedView check_packed(const at::Tensor& x_like, const at::Tensor& codebook, const at::Tensor& channel_scale,
                               const at::Tensor& codes, const std::optional<at::Tensor>& keep_bitmap,
                               const at::Tensor& row_code_offsets, const std::optional<at::Tensor>& group_code_offsets,
                               int64_t in_features, int64_t bits, const char* op) {
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK(in_features >= 1, op, ": in_features must be >= 1, got ", in_features);
  const int64_t out = channel_scale.numel();
  TORCH_CHECK(out >= 1, op, ": channel_scale must have one entry per output channel, got none");
  const int64_t groups = (in_features + kCodeGroup - 1) / kCodeGroup;
  check_lowbit_tensor(codebook, at::kFloat, {int64_t(1) << bits}, x_like, op, "codebook");
  check_lowbit_tensor(channel_scale, at::kFloat, {out}, x_like, op, "channel_scale");
  check_lowbit_tensor(row_code_offsets, at::kLong, {out + 1}, x_like, op, "row_code_offsets");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1 && codes.is_contiguous(), op,
              ": codes must be a contiguous 1-D uint8 tensor, got ", codes.scalar_type(), " ", codes.sizes());
  check_same_device(codes, x_like, op, "codes");
  TORCH_CHECK(keep_bitmap.has_value() == group_code_offsets.has_value(), op,
              ": keep_bitmap and group_code_offsets must be given together");
  PackedView w{codebook.data_ptr<float>(), channel_scale.data_ptr<float>(), codes.data_ptr<uint8_t>(), nullptr, 0,
               row_code_offsets.data_ptr<int64_t>(), nullptr, out, in_features, groups, int(bits)};
  if (keep_bitmap.has_value()) {
    check_lowbit_tensor(*keep_bitmap, at::kByte, {(out * in_features + 7) / 8}, x_like, op, "keep_bitmap");
    check_lowbit_tensor(*group_code_offsets, at::kInt, {out, groups}, x_like, op, "group_code_offsets");
    w.keep_bitmap = keep_bitmap->data_ptr<uint8_t>();
    w.bitmap_bytes = keep_bitmap->numel();
    w.group_code_offsets = group_code_offsets->data_ptr<int32_t>();
  }
  if (codes.device().is_cpu()) {
    // Kernels decode row c, codes [offsets[c], offsets[c + 1]), into buffers of in_features floats.
    const int64_t* offsets = w.row_code_offsets;
    TORCH_CHECK(offsets[0] == 0, op, ": row_code_offsets must start at 0, got ", offsets[0]);
    for (int64_t c = 0; c < out; ++c)
      TORCH_CHECK(offsets[c + 1] >= offsets[c] && offsets[c + 1] - offsets[c] <= in_features, op,
                  ": row_code_offsets must rise by 0..in_features = ", in_features, " per row, but row ", c,
                  " goes from ", offsets[c], " to ", offsets[c + 1]);
    const int64_t kept = w.row_code_offsets[out];
    TORCH_CHECK(kept >= 0 && kept <= out * in_features && codes.numel() == (kept * bits + 7) / 8, op, ": codes must hold ",
                "ceil(", kept, " * ", bits, " / 8) bytes (row_code_offsets[-1] kept codes), got ", codes.numel());
  }
  return w;
}

// x (M, in) float32 contiguous for the forward; grad_y (M, out) for the backward.
inline int64_t check_lowbit_input(const at::Tensor& t, int64_t features, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == features && t.is_contiguous(), op, ": ", name,
              " must be a contiguous (M, ", features, ") tensor, got ", t.sizes());
  return t.size(0);
}

}  // namespace mixedprec

namespace mixedprec {

// The CUDA and SIMT registrations of lowbit_linear: `Launchers` names the op and forwards to
// mixedprec::cuda:: or mixedprec::simt::.
template <class Launchers>
struct LowbitLinearDevice {
  static at::Tensor forward(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& channel_scale,
                            const at::Tensor& codes, const std::optional<at::Tensor>& keep_bitmap,
                            const at::Tensor& row_code_offsets, const std::optional<at::Tensor>& group_code_offsets,
                            int64_t in_features, int64_t bits) {
    const char* op = Launchers::kLowbitForwardName;
    const PackedView w = check_packed(x, codebook, channel_scale, codes, keep_bitmap, row_code_offsets,
                                      group_code_offsets, in_features, bits, op);
    const int64_t m_rows = check_lowbit_input(x, in_features, op, "x");
    at::Tensor y = poisoned(at::empty({m_rows, w.out}, x.options()));
    const char* err = Launchers::lowbit_forward(x.data_ptr<float>(), y.data_ptr<float>(), m_rows, w, Launchers::stream(x));
    TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
    return y;
  }

  static at::Tensor backward(const at::Tensor& grad_y, const at::Tensor& codebook, const at::Tensor& channel_scale,
                             const at::Tensor& codes, const std::optional<at::Tensor>& keep_bitmap,
                             const at::Tensor& row_code_offsets, const std::optional<at::Tensor>& group_code_offsets,
                             int64_t in_features, int64_t bits) {
    const char* op = Launchers::kLowbitBackwardName;
    const PackedView w = check_packed(grad_y, codebook, channel_scale, codes, keep_bitmap, row_code_offsets,
                                      group_code_offsets, in_features, bits, op);
    const int64_t m_rows = check_lowbit_input(grad_y, w.out, op, "grad_y");
    at::Tensor grad_x = poisoned(at::empty({m_rows, in_features}, grad_y.options()));
    const char* err = Launchers::lowbit_backward(grad_y.data_ptr<float>(), grad_x.data_ptr<float>(), m_rows, w,
                                                 Launchers::stream(grad_y));
    TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
    return grad_x;
  }
};

}  // namespace mixedprec
