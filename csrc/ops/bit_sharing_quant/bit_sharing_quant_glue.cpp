// bit_sharing_quant's torch glue (SBS bit-sharing fake-quant; math: include/mixedprec/bit_sharing.h):
//   _fwd    (y, residual_mean); given a residual_mean (e.g. reduced over ranks from _stats) the
//           gates come from it instead of from x
//   _bwd    (grad_x, sums = [dL/dv, sum grad_y T_j ...])
//   _stats  the float64 sums of |r_j| (j = 2..K) over x
//   bit_sharing_codes  (CPU only) one fixed bitwidth's codes as uint8 (centered: k - 128 as int8)
//           in x's layout (channels_last: channels-last whatever x's) and their sums over channels
//           per pixel: the input of PackedConv2d's and PackedLinear's int8 path
//   int8_epilogue_  (CPU only) that path's small GEMMs' int32 sums to y, in place (float32 over acc)
//   int8_nchw_epilogue  (CPU only) oneDNN's channels-last y of an NCHW call to NCHW, the offset
//           term added
// Every one takes an optional 0-dim float32 zero_point z0 in [0, 1] (None: 0), the unsigned
// grid's zero point (the asymmetric activation grid; only with signed=False).
// Kernels: bit_sharing_quant_cpu.cpp (CPU), bit_sharing_quant.cu (CUDA, SIMT).
#include <cmath>
#include <tuple>

#include "mixedprec/bit_sharing.h"
#include "register/op.h"

namespace mixedprec {
namespace cpu {  // bit_sharing_quant_cpu.cpp
std::tuple<at::Tensor, at::Tensor> bit_sharing_quant_forward(const at::Tensor& x, const at::Tensor& clip,
                                                             const at::Tensor& thresholds, const BitSharingParams& p,
                                                             const std::optional<at::Tensor>& given_mean, float z0);
at::Tensor bit_sharing_quant_stats(const at::Tensor& x, const at::Tensor& clip, const BitSharingParams& p, float z0);
std::tuple<at::Tensor, at::Tensor> bit_sharing_quant_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& clip, const at::Tensor& gates,
                                                              const BitSharingParams& p, float z0);
std::tuple<at::Tensor, at::Tensor> bit_sharing_codes(const at::Tensor& x, float clip, bool is_signed, float z0,
                                                     int bits, bool centered, bool channels_last);
void int8_epilogue_(at::Tensor& acc, const at::Tensor& offset, const at::Tensor& factor,
                    const std::optional<at::Tensor>& bias, const at::Tensor& window_sums,
                    const at::Tensor& window_factor);
at::Tensor int8_nchw_epilogue(const at::Tensor& y, const at::Tensor& window_sums, const at::Tensor& window_factor,
                              const std::optional<at::Tensor>& shift);
}  // namespace cpu
namespace MP_DEVICE_NS {  // bit_sharing_quant.cu
// floats of scratch the launchers need for n elements
int64_t bit_sharing_workspace_floats(int64_t n);
// y = fake-quant(x); residual_mean[j-1] = mean |r_j| (j = 2..K)
const char* bit_sharing_forward(DType dtype, const void* x, void* y, int64_t n, const float* clip,
                                const float* zero_point, const float* thresholds, float* residual_mean, float* workspace,
                                const BitSharingParams& p, void* stream);
// y = fake-quant(x) with gates residual_mean[j-1] > thresholds[j-1] (means given)
const char* bit_sharing_apply(DType dtype, const void* x, void* y, int64_t n, const float* clip,
                              const float* zero_point, const float* thresholds, const float* residual_mean, const BitSharingParams& p,
                              void* stream);
// sums[j-1] = sum |r_j| (j = 2..K) in double, for a reduction over ranks
const char* bit_sharing_residual_sums(DType dtype, const void* x, int64_t n, const float* clip,
                                      const float* zero_point, double* sums, float* workspace,
                                      const BitSharingParams& p, void* stream);
// grad_x = STE mask * grad_y; sums[0] = sum grad_y dy/dv, sums[j] = sum grad_y T_{j+1}
const char* bit_sharing_backward(DType dtype, const void* grad_y, const void* x, void* grad_x, int64_t n,
                                 const float* clip, const float* zero_point, const float* gates, float* sums, float* workspace,
                                 const BitSharingParams& p, void* stream);
}  // namespace MP_DEVICE_NS

namespace {

// x, clip and bits of every bit-sharing op: the kernel parameters.
BitSharingParams check_stats_args(const at::Tensor& x, const at::Tensor& clip, at::IntArrayRef bits, bool is_signed,
                                  const char* op) {
  kernel_dtype(x, op, "x");
  // Elementwise over the storage: either dense layout works, and the outputs take x's strides.
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x must be contiguous (or channels-last contiguous)");
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

// The zero point's checks: a 0-dim float32 tensor on x's device, only with signed=False; on the
// CPU its value too (finite, in [0, 1]; on a device that read would sync: the Python op checks
// it there). Returns the device pointer, nullptr for None.
const float* check_zero_point(const std::optional<at::Tensor>& zero_point, const at::Tensor& x, bool is_signed,
                              const char* op) {
  if (!zero_point) return nullptr;
  TORCH_CHECK(!is_signed, op, ": zero_point is only for the unsigned grid (signed=False)");
  check_same_device(*zero_point, x, op, "zero_point");
  check_float32(*zero_point, {}, op, "zero_point");
  if (zero_point->is_cpu()) {
    const float z0 = zero_point->item<float>();
    TORCH_CHECK(std::isfinite(z0) && z0 >= 0.0f && z0 <= 1.0f, op, ": zero_point must be finite and in [0, 1], got ",
                z0);
  }
  return zero_point->data_ptr<float>();
}

// The zero point's value for the CPU kernels (checked above).
float zero_point_value(const float* zero_point) { return zero_point ? *zero_point : 0.0f; }

// ... and a (K-1,) float32 per-gate tensor (thresholds, gates, residual_mean).
void check_per_gate(const at::Tensor& t, const at::Tensor& x, const BitSharingParams& p, const char* op,
                    const char* name) {
  check_same_device(t, x, op, name);
  check_float32(t, {p.num_bits - 1}, op, name);
}

template <bool kDevice>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& clip, const at::Tensor& thresholds,
                                           at::IntArrayRef bits, bool is_signed,
                                           const std::optional<at::Tensor>& given_mean,
                                           const std::optional<at::Tensor>& zero_point) {
  const char* op = "bit_sharing_quant_fwd";
  const BitSharingParams p = check_stats_args(x, clip, bits, is_signed, op);
  check_per_gate(thresholds, x, p, op, "thresholds");
  if (given_mean) check_per_gate(*given_mean, x, p, op, "residual_mean");
  const float* z0 = check_zero_point(zero_point, x, is_signed, op);
  if constexpr (!kDevice) {
    return cpu::bit_sharing_quant_forward(x, clip, thresholds, p, given_mean, zero_point_value(z0));
  } else {
    const DeviceCall call(x);
    const DType dtype = kernel_dtype(x, op, "x");
    at::Tensor y = poisoned(at::empty_like(x));
    if (given_mean) {  // the gates come from the given means: only the apply kernel runs
      at::Tensor residual_mean = given_mean->clone();
      check_launch(MP_DEVICE_NS::bit_sharing_apply(dtype, x.data_ptr(), y.data_ptr(), x.numel(), clip.data_ptr<float>(), z0,
                                                   thresholds.data_ptr<float>(), residual_mean.data_ptr<float>(), p,
                                                   call.stream()),
                   op);
      return {y, residual_mean};
    }
    at::Tensor residual_mean = poisoned(at::empty({p.num_bits - 1}, clip.options()));
    at::Tensor workspace = at::empty({MP_DEVICE_NS::bit_sharing_workspace_floats(x.numel())}, clip.options());
    check_launch(MP_DEVICE_NS::bit_sharing_forward(dtype, x.data_ptr(), y.data_ptr(), x.numel(), clip.data_ptr<float>(), z0,
                                                   thresholds.data_ptr<float>(), residual_mean.data_ptr<float>(),
                                                   workspace.data_ptr<float>(), p, call.stream()),
                 op);
    return {y, residual_mean};
  }
}

template <bool kDevice>
at::Tensor stats(const at::Tensor& x, const at::Tensor& clip, at::IntArrayRef bits, bool is_signed,
                 const std::optional<at::Tensor>& zero_point) {
  const char* op = "bit_sharing_quant_stats";
  const BitSharingParams p = check_stats_args(x, clip, bits, is_signed, op);
  const float* z0 = check_zero_point(zero_point, x, is_signed, op);
  if constexpr (!kDevice) {
    return cpu::bit_sharing_quant_stats(x, clip, p, zero_point_value(z0));
  } else {
    const DeviceCall call(x);
    at::Tensor sums = poisoned(at::empty({p.num_bits - 1}, clip.options().dtype(at::kDouble)));
    at::Tensor workspace = at::empty({MP_DEVICE_NS::bit_sharing_workspace_floats(x.numel())}, clip.options());
    check_launch(MP_DEVICE_NS::bit_sharing_residual_sums(kernel_dtype(x, op, "x"), x.data_ptr(), x.numel(),
                                                         clip.data_ptr<float>(), z0, sums.data_ptr<double>(),
                                                         workspace.data_ptr<float>(), p, call.stream()),
                 op);
    return sums;
  }
}

template <bool kDevice>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& clip,
                                            const at::Tensor& gates, at::IntArrayRef bits, bool is_signed,
                                            const std::optional<at::Tensor>& zero_point) {
  const char* op = "bit_sharing_quant_bwd";
  const auto layout = x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous(layout) && grad_y.scalar_type() == x.scalar_type(),
              op, ": grad_y must be a tensor of x's shape, layout and dtype");
  check_same_device(grad_y, x, op, "grad_y");
  const BitSharingParams p = check_stats_args(x, clip, bits, is_signed, op);
  check_per_gate(gates, x, p, op, "gates");
  const float* z0 = check_zero_point(zero_point, x, is_signed, op);
  if constexpr (!kDevice) {
    return cpu::bit_sharing_quant_backward(grad_y, x, clip, gates, p, zero_point_value(z0));
  } else {
    const DeviceCall call(x);
    at::Tensor grad_x = poisoned(at::empty_like(x));
    at::Tensor sums = poisoned(at::empty({p.num_bits}, clip.options()));
    at::Tensor workspace = at::empty({MP_DEVICE_NS::bit_sharing_workspace_floats(x.numel())}, clip.options());
    check_launch(MP_DEVICE_NS::bit_sharing_backward(kernel_dtype(x, op, "x"), grad_y.data_ptr(), x.data_ptr(),
                                                    grad_x.data_ptr(), x.numel(), clip.data_ptr<float>(), z0,
                                                    gates.data_ptr<float>(), sums.data_ptr<float>(),
                                                    workspace.data_ptr<float>(), p, call.stream()),
                 op);
    return {grad_x, sums};
  }
}

#if !defined(MP_SIMT_LIBRARY)
std::tuple<at::Tensor, at::Tensor> codes(const at::Tensor& x, const at::Tensor& clip, int64_t bits, bool is_signed,
                                         const std::optional<at::Tensor>& zero_point, bool centered,
                                         bool channels_last) {
  const char* op = "bit_sharing_codes";
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4, op,
              ": x must be a 4-D float32 CPU tensor (N, C, H, W), got ", x.dim(), "-D ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(x.size(1) * 255 < (int64_t(1) << 24), op, ": x has ", x.size(1),
              " channels; their code sums must be exact in float32 (at most 65793)");
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  check_stats_args(x, clip, {bits}, is_signed, op);
  const float v = clip.item<float>();
  TORCH_CHECK(std::isfinite(v) && v > 0.0f, op, ": clip must be finite and > 0, got ", v);
  const float z0 = zero_point_value(check_zero_point(zero_point, x, is_signed, op));
  return cpu::bit_sharing_codes(x, v, is_signed, z0, int(bits), centered, channels_last);
}

// The epilogues' per-channel vectors: contiguous (c,) of dtype.
void check_per_channel(const at::Tensor& t, at::ScalarType dtype, int64_t c, const char* op, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == c && t.is_contiguous(), op, ": ",
              name, " must be a contiguous ", dtype, " CPU tensor of shape (", c, ",), got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
}

// The epilogues' planes: contiguous float32 (images, channels) of y's H x W.
void check_planes(const at::Tensor& t, int64_t images, int64_t channels, const at::Tensor& y, const char* op,
                  const char* name) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.sizes() == at::IntArrayRef({images, channels, y.size(2), y.size(3)}),
              op, ": ", name, " must be a contiguous float32 CPU tensor of shape (", images, ", ", channels, ", ",
              y.size(2), ", ", y.size(3), "), got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

// y = float(acc + offset) factor + bias + window_factor window_sums (per channel c; window_sums
// per output pixel), as float32 over acc (acc.view(float32) is then y).
void int8_epilogue_(at::Tensor& acc, const at::Tensor& offset, const at::Tensor& factor,
                    const std::optional<at::Tensor>& bias, const at::Tensor& window_sums,
                    const at::Tensor& window_factor) {
  const char* op = "int8_epilogue_";
  TORCH_CHECK(acc.is_cpu() && acc.scalar_type() == at::kInt && acc.dim() == 4 &&
                  (acc.is_contiguous() || acc.is_contiguous(at::MemoryFormat::ChannelsLast)),
              op, ": acc must be a contiguous or channels-last 4-D int32 CPU tensor (N, C, H, W), got ", acc.dim(),
              "-D ", acc.scalar_type(), " on ", acc.device());
  const int64_t c = acc.size(1);
  check_per_channel(offset, at::kInt, c, op, "offset");
  check_per_channel(factor, at::kFloat, c, op, "factor");
  check_per_channel(window_factor, at::kFloat, c, op, "window_factor");
  if (bias) check_per_channel(*bias, at::kFloat, c, op, "bias");
  check_planes(window_sums, acc.size(0), 1, acc, op, "window_sums");
  cpu::int8_epilogue_(acc, offset, factor, bias, window_sums, window_factor);
}

// out = (y + window_factor window_sums) + shift, y channels-last, out NCHW (window_factor per
// channel; window_sums per output pixel; shift, when given, per channel and pixel).
at::Tensor int8_nchw_epilogue(const at::Tensor& y, const at::Tensor& window_sums, const at::Tensor& window_factor,
                              const std::optional<at::Tensor>& shift) {
  const char* op = "int8_nchw_epilogue";
  TORCH_CHECK(y.is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 4 &&
                  y.is_contiguous(at::MemoryFormat::ChannelsLast),
              op, ": y must be a channels-last 4-D float32 CPU tensor (N, C, H, W), got ", y.dim(), "-D ",
              y.scalar_type(), " on ", y.device());
  check_per_channel(window_factor, at::kFloat, y.size(1), op, "window_factor");
  check_planes(window_sums, y.size(0), 1, y, op, "window_sums");
  if (shift) check_planes(*shift, 1, y.size(1), y, op, "shift");
  return cpu::int8_nchw_epilogue(y, window_sums, window_factor, shift);
}
#endif

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_FRAGMENT(MP_LIBRARY, m) {
  MP_OP(m, bit_sharing_quant_fwd, "(Tensor x, Tensor clip, Tensor thresholds, int[] bits, bool signed, "
        "Tensor? residual_mean=None, Tensor? zero_point=None) -> (Tensor, Tensor)", mixedprec::forward<false>,
        mixedprec::forward<true>);
  MP_OP(m, bit_sharing_quant_bwd, "(Tensor grad_y, Tensor x, Tensor clip, Tensor gates, int[] bits, bool signed, "
        "Tensor? zero_point=None) -> (Tensor, Tensor)", mixedprec::backward<false>, mixedprec::backward<true>);
  MP_OP(m, bit_sharing_quant_stats, "(Tensor x, Tensor clip, int[] bits, bool signed, Tensor? zero_point=None) -> "
        "Tensor", mixedprec::stats<false>, mixedprec::stats<true>);
#if !defined(MP_SIMT_LIBRARY)
  m.def("bit_sharing_codes(Tensor x, Tensor clip, int bits, bool signed, Tensor? zero_point=None, "
        "bool centered=False, bool channels_last=False) -> (Tensor, Tensor)");
  m.impl("bit_sharing_codes", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(mixedprec::codes)));
  m.def("int8_epilogue_(Tensor(a!) acc, Tensor offset, Tensor factor, Tensor? bias, Tensor window_sums, "
        "Tensor window_factor) -> ()");
  m.impl("int8_epilogue_", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(mixedprec::int8_epilogue_)));
  m.def("int8_nchw_epilogue(Tensor y, Tensor window_sums, Tensor window_factor, Tensor? shift) -> Tensor");
  m.impl("int8_nchw_epilogue", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(mixedprec::int8_nchw_epilogue)));
#endif
}
