// The CPU kernels (csrc/cpu/*.cpp) called through the torch dispatcher on small odd shapes,
// against the plain loops of kernel_cases.h: every op, each storage type, every instantiated K
// and sign of the bit-sharing kernel, the SIMD code decode and its scalar twin (set_cpu_simd)
// in lowbit_linear (every bits dense and sparse; rows decoded in registers, the decode tile,
// batch rows in lanes, the sgemm blocks and the tiled large batches) and lut_conv2d (grouped, depthwise in both layouts,
// strided, dilated; Winograd; GEMMs over one tile or blocks of decoded rows). Built with
// -DMIXEDPREC_CPU_KERNEL_TESTS=ON and run under ASan+UBSan by tests/test_sanitizers.py: the
// kernels and this program are instrumented, libtorch is not (ASan still sees every tensor's heap
// block). ASan checks scalar and vector loads and stores; the AVX-512 masked expand-loads of
// lut_conv2d's bitmap expansion and the masked loads and stores of lut_conv2d's Winograd tiles
// are compiler builtins it does not instrument (they touch only the lanes of their masks, inside
// the tensors).
//
// `cpu_kernel_tests planted-out-of-bounds` runs a planted bug instead, which ASan must name.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstring>
#include <optional>

#include "kernel_cases.h"

using namespace kernel_cases;

namespace {

const std::string kWho = "cpu";

template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

template <class T>
constexpr at::ScalarType scalar_type() {
  if constexpr (std::is_same_v<T, float>) return at::kFloat;
  else if constexpr (std::is_same_v<T, Half16>) return at::kHalf;
  else if constexpr (std::is_same_v<T, BFloat16>) return at::kBFloat16;
  else if constexpr (std::is_same_v<T, uint8_t>) return at::kByte;
  else if constexpr (std::is_same_v<T, int32_t>) return at::kInt;
  else return at::kLong;
}

// A tensor over v's storage (no copy: ASan checks the kernels' reads against v's heap block).
template <class T>
at::Tensor view(const std::vector<T>& v, at::IntArrayRef shape) {
  return at::from_blob(const_cast<T*>(v.data()), shape, at::TensorOptions(scalar_type<T>()));
}

template <class T>
at::Tensor view(const std::vector<T>& v) {
  return view(v, {int64_t(v.size())});
}

// v stored as T (Half16 and BFloat16 share at::Half's and at::BFloat16's bits).
template <class T>
std::vector<T> stored(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = mixedprec::from_float<T>(v[i]);
  return out;
}

template <class T>
const T* data(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == scalar_type<T>() && t.is_contiguous(), "unexpected output ", t.scalar_type());
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using OptTensor = const std::optional<at::Tensor>&;

template <class T>
void run_bit_sharing(const BitSharingCase& c) {
  static auto forward = op<Tensors2(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, bool,
                                    OptTensor, OptTensor)>("mixedprec::bit_sharing_quant_fwd");
  static auto stats = op<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, bool, OptTensor)>(
      "mixedprec::bit_sharing_quant_stats");
  static auto backward = op<Tensors2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     at::IntArrayRef, bool, OptTensor)>("mixedprec::bit_sharing_quant_bwd");
  const int64_t n = int64_t(c.x.size());
  const std::vector<T> x = stored<T>(c.x), grad_y = stored<T>(c.grad_y);
  const at::Tensor clip = at::full({}, c.clip);
  const std::optional<at::Tensor> z0 =
      c.zero_point ? std::optional<at::Tensor>(at::full({}, *c.zero_point)) : std::nullopt;
  const auto [y, residual_mean] =
      forward.call(view(x, {n}), clip, view(c.thresholds), c.bits, c.is_signed, std::nullopt, z0);
  check_bit_sharing_forward(c, data<T>(y), data<float>(residual_mean), kWho);
  if (c.bits.size() > 1) {  // the data-parallel path: sums of |r_j| alone, then the apply pass given the means
    const at::Tensor sums = stats.call(view(x, {n}), clip, c.bits, c.is_signed, z0);
    expect(at::allclose(sums / double(n), residual_mean.to(at::kDouble), 1e-5, 1e-7), c.name + " stats: sums / n != residual_mean");
    const auto [y_given, mean_given] = forward.call(view(x, {n}), clip, view(c.thresholds), c.bits, c.is_signed, residual_mean, z0);
    check_bit_sharing_forward(c, data<T>(y_given), data<float>(mean_given), kWho);
  }
  const auto [grad_x, sums] = backward.call(view(grad_y, {n}), view(x, {n}), clip, view(c.gates), c.bits, c.is_signed, z0);
  check_bit_sharing_backward(c, data<T>(grad_x), data<float>(sums), kWho);
}

// bit_sharing_codes (the int8 path's input): x of shape (n, c, h, w), stored NCHW or channels-last,
// codes in x's layout or (to_channels_last) channels-last, against the quantizer's rounding written
// out (include/mixedprec/bit_sharing.h's spelling).
void run_bit_sharing_codes(int64_t n, int64_t c, int64_t h, int64_t w, int bits, bool is_signed, float z0,
                           bool channels_last, std::mt19937& rng, bool centered = false, bool to_channels_last = false) {
  static auto codes_op = op<Tensors2(const at::Tensor&, const at::Tensor&, int64_t, bool, OptTensor, bool, bool)>(
      "mixedprec::bit_sharing_codes");
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::vector<float> x(size_t(n * c * h * w));
  for (float& v : x) v = normal(rng);
  const float clip = 1.7f, levels = float((1 << bits) - 1), inv_clip = 1.0f / clip;
  const float zero_level = is_signed ? float(((1 << bits) - 2) / 2) : std::nearbyint(z0 * levels);
  const at::Tensor xt = channels_last ? view(x, {n, h, w, c}).permute({0, 3, 1, 2}) : view(x, {n, c, h, w});
  const std::optional<at::Tensor> zp = is_signed ? std::nullopt : std::optional<at::Tensor>(at::full({}, z0));
  const auto [codes, sums] = codes_op.call(xt, at::full({}, clip), bits, is_signed, zp, centered, to_channels_last);
  const std::string name = "bit_sharing_codes " + std::to_string(bits) + "-bit" + (is_signed ? " signed" : "") +
                           (channels_last ? " channels-last" : "") + (centered ? " centered" : "") +
                           (to_channels_last ? " to channels-last" : "");
  const bool codes_channels_last = channels_last || to_channels_last;
  const std::vector<int64_t> nchw{c * h * w, h * w, w, 1}, nhwc{h * w * c, 1, w * c, c};
  expect(h * w == 1 || codes.strides() == at::IntArrayRef(codes_channels_last ? nhwc : nchw),
         name + ": codes' layout");
  expect(codes.scalar_type() == (centered ? at::kChar : at::kByte), name + ": codes' dtype");
  const uint8_t* k = reinterpret_cast<const uint8_t*>(codes.const_data_ptr());
  const float* s = data<float>(sums);
  std::vector<double> expected_sums(size_t(n * h * w), 0.0);
  for (size_t i = 0; i < x.size(); ++i) {
    const float t = x[i] * inv_clip;
    const float z = is_signed ? (std::min(std::max(t, -1.0f), 1.0f) + 1.0f) * 0.5f : std::min(std::max(t + z0, 0.0f), 1.0f);
    const float code = std::nearbyint(z * levels);
    const int64_t ch = channels_last ? int64_t(i) % c : int64_t(i) / (h * w) % c;
    const int64_t pixel = channels_last ? int64_t(i) / c : (int64_t(i) / (c * h * w)) * h * w + int64_t(i) % (h * w);
    const int64_t at = codes_channels_last ? pixel * c + ch : pixel / (h * w) * c * h * w + ch * h * w + pixel % (h * w);
    expect(float(centered ? int8_t(k[at]) + 128 : k[at]) == code, name + ": code");
    expected_sums[size_t(pixel)] += code - zero_level;
  }
  for (size_t q = 0; q < expected_sums.size(); ++q) expect(double(s[q]) == expected_sums[q], name + ": sum");
}

// int8_epilogue_: the plain loop, operation for operation (built with -ffp-contract=off: the same
// bits), written over acc.
void run_int8_epilogue(int64_t n, int64_t c, int64_t h, int64_t w, bool with_bias, bool channels_last,
                       std::mt19937& rng) {
  static auto epilogue = op<void(at::Tensor&, const at::Tensor&, const at::Tensor&, OptTensor, const at::Tensor&,
                                 const at::Tensor&)>("mixedprec::int8_epilogue_");
  std::uniform_int_distribution<int32_t> ints(-(1 << 22), 1 << 22);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<int32_t> acc(static_cast<size_t>(n * c * h * w)), offset(static_cast<size_t>(c));
  for (int32_t& v : acc) v = ints(rng);
  for (int32_t& v : offset) v = ints(rng);
  std::vector<float> factor(static_cast<size_t>(c)), bias(factor), window_factor(factor),
      sums(static_cast<size_t>(n * h * w));
  for (auto* v : {&factor, &bias, &window_factor, &sums})
    for (float& e : *v) e = normal(rng);
  std::vector<int32_t> written(acc);
  at::Tensor acc_t = channels_last ? view(written, {n, h, w, c}).permute({0, 3, 1, 2}) : view(written, {n, c, h, w});
  const std::optional<at::Tensor> b = with_bias ? std::optional<at::Tensor>(view(bias)) : std::nullopt;
  epilogue.call(acc_t, view(offset), view(factor), b, view(sums, {n, 1, h, w}), view(window_factor));
  const std::string name = std::string("int8_epilogue_") + (channels_last ? " channels-last" : "");
  std::vector<float> yp(written.size());  // y: acc's bytes, in acc's layout, as the loop below indexes it
  std::memcpy(yp.data(), written.data(), written.size() * sizeof(float));
  for (int64_t i = 0; i < int64_t(acc.size()); ++i) {
    const int64_t ch = channels_last ? i % c : i / (h * w) % c;
    const int64_t pixel = channels_last ? i / c : i / (c * h * w) * h * w + i % (h * w);
    const float want = (float(acc[i] + offset[ch]) * factor[ch] + (with_bias ? bias[ch] : 0.0f)) +
                       window_factor[ch] * sums[pixel];
    expect(yp[i] == want, name + ": y");
  }
}

// int8_nchw_epilogue: channels-last y to NCHW, the plain loop operation for operation.
void run_int8_nchw_epilogue(int64_t n, int64_t c, int64_t h, int64_t w, bool with_shift, std::mt19937& rng) {
  static auto epilogue = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, OptTensor)>(
      "mixedprec::int8_nchw_epilogue");
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> y(static_cast<size_t>(n * h * w * c)), window_factor(static_cast<size_t>(c)),
      sums(static_cast<size_t>(n * h * w)), shift(static_cast<size_t>(c * h * w));
  for (auto* v : {&y, &window_factor, &sums, &shift})
    for (float& e : *v) e = normal(rng);
  const std::optional<at::Tensor> s = with_shift ? std::optional<at::Tensor>(view(shift, {1, c, h, w})) : std::nullopt;
  const at::Tensor out = epilogue.call(view(y, {n, h, w, c}).permute({0, 3, 1, 2}), view(sums, {n, 1, h, w}),
                                       view(window_factor), s);
  const std::string name = std::string("int8_nchw_epilogue") + (with_shift ? " shifted" : "");
  expect(out.is_contiguous(), name + ": out not NCHW");
  const float* o = out.const_data_ptr<float>();
  for (int64_t i = 0; i < int64_t(y.size()); ++i) {  // i in y's channels-last order
    const int64_t ch = i % c, pixel = i / c, q = pixel % (h * w);
    const float want = (y[size_t(i)] + window_factor[size_t(ch)] * sums[size_t(pixel)]) +
                       (with_shift ? shift[size_t(ch * h * w + q)] : 0.0f);
    expect(o[(pixel / (h * w) * c + ch) * h * w + q] == want, name + ": out");
  }
}

template <class T>
void run_codebook(const CodebookCase& c) {
  static auto forward = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "mixedprec::codebook_quant_fwd");
  const std::vector<T> weight = stored<T>(c.weight);
  const at::Tensor keep_mask = view(c.keep, {c.channels, c.inner}).view(at::kBool);
  const at::Tensor y = forward.call(view(weight, {c.channels, c.inner}), view(c.codebook), view(c.channel_scale), keep_mask);
  check_codebook(c, data<T>(y), kWho);
}

// The packed weight's op arguments after x: codes, codebook, channel_scale, keep_bitmap,
// code_offsets, weight_shape, bits (the vectors must outlive the call).
using PackedSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   OptTensor, OptTensor, at::IntArrayRef, int64_t);
std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>> sparse_tables(const PackedCodes& p) {
  if (p.keep_bitmap.empty()) return {};
  return {view(p.keep_bitmap), view(p.code_offsets)};
}

void run_lowbit(const LowbitCase& c, const std::string& who) {
  static auto forward = op<PackedSignature>("mixedprec::lowbit_linear_fwd");
  static auto backward = op<PackedSignature>("mixedprec::lowbit_linear_bwd");
  const auto [keep_bitmap, code_offsets] = sparse_tables(c.packed);
  const std::vector<int64_t> weight_shape{c.out, c.in};
  const at::Tensor y = forward.call(view(c.x, {c.m_rows, c.in}), view(c.packed.codes), view(c.codebook),
                                    view(c.channel_scale), keep_bitmap, code_offsets, weight_shape, c.bits);
  check_lowbit_forward(c, data<float>(y), who);
  const at::Tensor grad_x = backward.call(view(c.grad_y, {c.m_rows, c.out}), view(c.packed.codes), view(c.codebook),
                                          view(c.channel_scale), keep_bitmap, code_offsets, weight_shape, c.bits);
  check_lowbit_backward(c, data<float>(grad_x), who);
}

// x (NCHW values) stored channels-last (NHWC), over its own heap block.
template <class T>
std::vector<T> stored_channels_last(const std::vector<T>& x, const Conv2dGeometry& g) {
  std::vector<T> out(x.size());
  const int64_t C = g.in_channels, H = g.height, W = g.width;
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t ch = 0; ch < C; ++ch)
      for (int64_t i = 0; i < H * W; ++i) out[(n * H * W + i) * C + ch] = x[(n * C + ch) * H * W + i];
  return out;
}

// channels_last: x is passed in that layout (y comes back so, checked in NCHW order).
template <class T>
void run_lut_conv2d(const LutConv2dCase& c, bool channels_last = false) {
  static auto forward = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      OptTensor, OptTensor, at::IntArrayRef, int64_t, OptTensor, at::IntArrayRef,
                                      at::IntArrayRef, at::IntArrayRef, int64_t)>("mixedprec::lut_conv2d_fwd");
  static auto backward = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       OptTensor, OptTensor, at::IntArrayRef, int64_t, at::IntArrayRef, at::IntArrayRef,
                                       at::IntArrayRef, at::IntArrayRef, int64_t)>("mixedprec::lut_conv2d_bwd");
  const Conv2dGeometry& g = c.g;
  const std::vector<int64_t> input_shape{g.batch, g.in_channels, g.height, g.width};
  const std::vector<int64_t> output_shape{g.batch, g.out_channels, g.out_height, g.out_width};
  const std::vector<int64_t> weight_shape{g.out_channels, g.group_in(), g.kernel_h, g.kernel_w};
  const std::vector<int64_t> stride{g.stride_h, g.stride_w}, padding{g.pad_h, g.pad_w}, dilation{g.dil_h, g.dil_w};
  const std::vector<T> x = stored<T>(c.x), grad_y = stored<T>(c.grad_y);
  const std::vector<T> x_nhwc = channels_last ? stored_channels_last(x, g) : std::vector<T>();
  const at::Tensor x_in = channels_last
      ? at::from_blob(const_cast<T*>(x_nhwc.data()), input_shape,
                      {g.in_channels * g.height * g.width, 1, g.width * g.in_channels, g.in_channels},
                      at::TensorOptions(scalar_type<T>()))
      : view(x, input_shape);
  const auto [keep_bitmap, code_offsets] = sparse_tables(c.packed);
  std::optional<at::Tensor> bias;
  if (!c.bias.empty()) bias = view(c.bias);
  const at::Tensor y = forward.call(x_in, view(c.packed.codes), view(c.codebook), view(c.channel_scale), keep_bitmap,
                                    code_offsets, weight_shape, c.bits, bias, stride, padding, dilation, g.groups);
  check_lut_conv2d_forward(c, data<T>(y.contiguous()), kWho);
  const at::Tensor grad_x = backward.call(view(grad_y, output_shape), view(c.packed.codes), view(c.codebook),
                                          view(c.channel_scale), keep_bitmap, code_offsets, weight_shape, c.bits,
                                          input_shape, stride, padding, dilation, g.groups);
  check_lut_conv2d_backward(c, data<T>(grad_x), kWho);
}

// The planted bug: a sum over a tensor that reads one element past its end.
float planted_out_of_bounds() {
  const at::Tensor t = at::ones({7});
  const float* p = t.const_data_ptr<float>();
  float total = 0.0f;
  for (int64_t i = 0; i <= t.numel(); ++i) total += p[i];  // <- the planted bug: <= instead of <
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "planted-out-of-bounds") == 0) {
    std::printf("sum %g\n", planted_out_of_bounds());
    return 0;
  }
  at::set_num_threads(3);  // more tasks than cores: uneven splits of every parallel_for
  std::mt19937 rng(0);

  // bit_sharing: every instantiation (K = 1..8, both signs) in float32, scalar tails (n odd);
  // float16/bfloat16; 40000 elements: three reduction chunks, and zeros where the kernel samples
  // its gate guess, so that the guess is wrong and the rewrite pass runs.
  for (int k = 1; k <= 8; ++k) {
    std::vector<int64_t> bits;
    for (int j = 0; j < k; ++j) bits.push_back(k == 1 ? 3 : j + 1);
    for (bool is_signed : {true, false}) run_bit_sharing<float>(bit_sharing_case<float>(37 + 64 * k, bits, is_signed, rng));
  }
  const std::vector<int64_t> sbs_bits{2, 4, 8};
  run_bit_sharing<Half16>(bit_sharing_case<Half16>(1001, sbs_bits, true, rng));
  run_bit_sharing<BFloat16>(bit_sharing_case<BFloat16>(1001, sbs_bits, false, rng));
  run_bit_sharing<float>(bit_sharing_case<float>(40000, sbs_bits, true, rng));
  run_bit_sharing<float>(bit_sharing_case<float>(40000, sbs_bits, false, rng, 34000));
  // the asymmetric grid (zero point z0 = D(offset, b_1)): every K, vector lanes and scalar tails;
  // zeros in x map to exactly 0; half types
  for (int k = 1; k <= 8; ++k) {
    std::vector<int64_t> bits;
    for (int j = 0; j < k; ++j) bits.push_back(k == 1 ? 3 : j + 1);
    run_bit_sharing<float>(bit_sharing_case<float>(37 + 64 * k, bits, false, rng, 9, 0.3f + 0.05f * k));
  }
  run_bit_sharing<Half16>(bit_sharing_case<Half16>(1001, sbs_bits, false, rng, 100, 0.5f));
  run_bit_sharing<BFloat16>(bit_sharing_case<BFloat16>(1001, sbs_bits, false, rng, 100, 1.0f));

  // bit_sharing_codes: channels below, at and above a vector (masked tails), both layouts, grids
  for (bool channels_last : {false, true}) {
    run_bit_sharing_codes(2, 3, 5, 7, 8, true, 0.0f, channels_last, rng);
    run_bit_sharing_codes(1, 16, 3, 3, 4, false, 0.0f, channels_last, rng);
    run_bit_sharing_codes(3, 37, 4, 5, 2, false, 1.0f / 3.0f, channels_last, rng);
    run_bit_sharing_codes(2, 21, 1, 1, 1, true, 0.0f, channels_last, rng);
    run_bit_sharing_codes(2, 37, 3, 5, 8, false, 0.25f, channels_last, rng, true);
    // channels-last codes of any x: tiles of 16 channels x 16 pixels cut at both edges, spans of 64 pixels
    run_bit_sharing_codes(2, 37, 9, 11, 4, false, 0.25f, channels_last, rng, false, true);
    run_bit_sharing_codes(1, 16, 4, 16, 8, true, 0.0f, channels_last, rng, true, true);
    // int8_epilogue_: NCHW planes and pixel rows, with and without a bias, one pixel (a GEMM's rows)
    run_int8_epilogue(2, 37, 5, 3, true, channels_last, rng);
    run_int8_epilogue(3, 19, 1, 1, false, channels_last, rng);
  }
  // int8_nchw_epilogue: tiles cut at both edges, spans of 64 pixels, with and without the shift
  run_int8_nchw_epilogue(2, 37, 9, 11, true, rng);
  run_int8_nchw_epilogue(1, 16, 8, 8, false, rng);
  run_int8_nchw_epilogue(2, 5, 1, 1, true, rng);

  // codebook_quant: rows shorter than a vector (scalar tail only), odd rows, 1 to 256 levels
  for (int levels : {1, 2, 16, 256}) {
    run_codebook<float>(codebook_case<float>(1, 1, levels, rng));
    run_codebook<float>(codebook_case<float>(5, 37, levels, rng));
    run_codebook<float>(codebook_case<float>(3, 700, levels, rng));
  }
  run_codebook<Half16>(codebook_case<Half16>(5, 37, 16, rng));
  run_codebook<BFloat16>(codebook_case<BFloat16>(7, 19, 16, rng));

  // lowbit_linear (out, in, M, bits, keep probability), each with the SIMD decode and its twin:
  // every bits dense and sparse, batches 1..5 (up to the register-blocked limit, then the tile),
  // rows of 28..77 columns (16-lane steps, tails, codes straddling bytes)
  std::vector<LowbitCase> lowbit_cases = {
      lowbit_case(130, 40, 3, 1, 0.7, rng),   // 3 output-channel chunks in the backward
      lowbit_case(150, 37, 17, 2, 0.8, rng),  // 16 <= M < 128: batch rows in lanes (24-row blocks, the last partial; sgemm without SIMD)
      lowbit_case(30, 1100, 40, 4, 1.0, rng),  // ... interleaved rows in the 4112-float stride, a two-vector pass, a partial one
      lowbit_case(26, 300, 127, 7, 0.6, rng),  // ... three two-vector passes, a partial single one
      lowbit_case(5, 16400, 16, 3, 0.5, rng),  // ... rows past kLaneMaxColumns: 64-row blocks through sgemm
      lowbit_case(70, 45, 128, 6, 0.7, rng),   // M >= 128: 64-row blocks through sgemm, the last partial
      lowbit_case(21, 45, 512, 5, 0.6, rng),  // M >= 512: the whole weight decoded, one sgemm
      lowbit_case(3, 1, 2, 2, 1.0, rng),      // one input feature
      lowbit_case(11, 280, 3, 4, 1.0, rng),   // dense byte-aligned 4-bit rows, M <= 4: interleaved fused decode
      lowbit_case(7, 272, 1, 2, 1.0, rng),    // dense byte-aligned 2-bit rows, GEMV: interleaved fused decode
      lowbit_case(7, 268, 6, 2, 1.0, rng),    // ... M > 4: fused groups of 4 rows and 2
      lowbit_case(9, 203, 1, 4, 0.6, rng),    // sparse rows of <= 5 bits: interleaved 64-column blocks, rows mid-byte, GEMV
      lowbit_case(9, 203, 2, 5, 0.7, rng),    // ... 5 bits: the kept bit tested into the lookup's mask
      lowbit_case(8, 256, 4, 1, 0.7, rng),    // ... rows on a byte, the last block at the bitmap's end, M = 4
      lowbit_case(7, 200, 6, 3, 0.5, rng),    // ... M > 4: interleaved decode tile
      lowbit_case(30, 130, 20, 2, 0.9, rng),  // ... 16 <= M < 128: interleaved rows in lanes
      lowbit_case(9, 203, 1, 5, 1.0, rng),    // dense rows of 3 and 5 bits (and mid-byte 1-4): 64 codes a byte each, GEMV,
      lowbit_case(6, 150, 3, 3, 1.0, rng),    // ... the last blocks past the stream's end (masked loads)
  };
  for (int bits = 1; bits <= 8; ++bits)
    for (double keep : {1.0, 0.6}) {
      const int m_rows = 1 + (bits + (keep < 1 ? 2 : 0)) % 5;
      lowbit_cases.push_back(lowbit_case(5 + bits, 21 + 7 * bits, m_rows, bits, keep, rng));
    }
  static auto set_simd = op<bool(bool)>("mixedprec::set_cpu_simd");
  for (bool simd : {true, false}) {
    set_simd.call(simd);
    for (const LowbitCase& c : lowbit_cases) run_lowbit(c, simd ? "cpu simd" : "cpu scalar");
  }
  set_simd.call(true);

  // lut_conv2d (N, C_in, H, W, C_out, kh, kw, stride, padding, dilation, groups)
  const Conv2dGeometry plain = conv_geometry(2, 3, 5, 6, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1);
  const Conv2dGeometry strided_dilated_grouped = conv_geometry(1, 4, 7, 5, 6, 3, 2, 2, 2, 1, 1, 2, 1, 2);
  const Conv2dGeometry depthwise = conv_geometry(2, 5, 6, 7, 5, 3, 3, 1, 1, 1, 1, 1, 1, 5);
  // depthwise (ops/lut_conv2d/depthwise_conv.h): stride 2 (two vectors a step from the padded
  // plane); stride 3 and dilation 2 along rows, 70 channels (channels-last: four vectors and a
  // masked rest), pixels inside x in blocks of 8 and edge pixels
  const Conv2dGeometry depthwise_strided = conv_geometry(2, 19, 9, 37, 19, 3, 3, 2, 2, 1, 1, 1, 1, 19);
  const Conv2dGeometry depthwise_wide = conv_geometry(1, 70, 6, 40, 70, 5, 5, 1, 3, 2, 2, 1, 2, 70);
  // stride-1 rows of 3 and 5 taps (channels-last: blocks of 8 pixels sharing their inputs); 7x7
  // on a 5 x 6 image: no pixel has all its taps inside x
  const Conv2dGeometry depthwise_rows3 = conv_geometry(1, 37, 5, 20, 37, 3, 3, 1, 1, 1, 1, 1, 1, 37);
  const Conv2dGeometry depthwise_rows5 = conv_geometry(2, 21, 6, 23, 21, 5, 5, 1, 1, 2, 2, 1, 1, 21);
  const Conv2dGeometry depthwise_rows7 = conv_geometry(2, 18, 5, 6, 18, 7, 7, 1, 1, 3, 3, 1, 1, 18);
  const Conv2dGeometry many_channels = conv_geometry(1, 2, 9, 9, 70, 3, 3, 1, 1, 1, 1, 1, 1, 1);
  const Conv2dGeometry deep_wide = conv_geometry(2, 30, 12, 23, 6, 3, 3, 1, 2, 1, 1, 1, 1, 1);
  // Winograd F(2x2, 3x3): tiles straddling rows and images, a partial output-channel block; two
  // weight decode spans (70 input channels), asymmetric padding, an odd output
  const Conv2dGeometry winograd = conv_geometry(2, 20, 9, 11, 12, 3, 3, 1, 1, 1, 1, 1, 1, 1);
  const Conv2dGeometry winograd_spans = conv_geometry(1, 70, 5, 4, 9, 3, 3, 1, 1, 0, 2, 1, 1, 1);
  // channels-last 1x1 over few pixels: the pixel rows times the decoded tile (sgemm), strided
  const Conv2dGeometry pointwise = conv_geometry(2, 19, 7, 6, 11, 1, 1, 2, 3, 0, 0, 1, 1, 1);
  // 1x1 over fewer than 16 pixels, 64+ channels: lowbit_linear on the pixel rows (SE layers' 1 x 1
  // maps; strided)
  const Conv2dGeometry pointwise_few = conv_geometry(3, 71, 1, 1, 13, 1, 1, 1, 1, 0, 0, 1, 1, 1);
  const Conv2dGeometry pointwise_few_strided = conv_geometry(1, 67, 5, 4, 9, 1, 1, 2, 2, 0, 0, 1, 1, 1);
  // 1x1 over fewer than 128 pixels, 2^14+ weights: blocks of decoded rows, one thread each, written
  // into y in place (both layouts); more blocks than output channels (blocks with no rows)
  const Conv2dGeometry pointwise_blocks = conv_geometry(1, 200, 5, 7, 90, 1, 1, 1, 1, 0, 0, 1, 1, 1);
  const Conv2dGeometry pointwise_blocks_empty = conv_geometry(1, 6000, 2, 3, 3, 1, 1, 1, 1, 0, 0, 1, 1, 1);
  // 2^18+ weights over few pixels, 3x3 stride (2, 3), dilated: the blocks times x's columns (im2col)
  const Conv2dGeometry unfolded = conv_geometry(1, 40, 9, 11, 800, 3, 3, 2, 3, 2, 2, 2, 2, 1);
  for (bool simd : {true, false}) {
    set_simd.call(simd);
    for (int bits : {1, 4, 8})
      for (bool sparse : {false, true}) run_lut_conv2d<float>(lut_conv2d_case<float>(bits, sparse, true, plain, rng));
    run_lut_conv2d<float>(lut_conv2d_case<float>(3, true, false, strided_dilated_grouped, rng));
    run_lut_conv2d<float>(lut_conv2d_case<float>(2, false, true, depthwise, rng));
    run_lut_conv2d<float>(lut_conv2d_case<float>(4, true, true, many_channels, rng));
    run_lut_conv2d<float>(lut_conv2d_case<float>(5, true, true, deep_wide, rng));
    for (bool channels_last : {false, true}) {  // Winograd in NCHW and in NHWC
      run_lut_conv2d<float>(lut_conv2d_case<float>(4, false, true, winograd, rng), channels_last);
      run_lut_conv2d<float>(lut_conv2d_case<float>(3, true, false, winograd_spans, rng), channels_last);
      run_lut_conv2d<BFloat16>(lut_conv2d_case<BFloat16>(2, true, true, winograd, rng), channels_last);
    }
    run_lut_conv2d<Half16>(lut_conv2d_case<Half16>(4, true, true, plain, rng));
    run_lut_conv2d<BFloat16>(lut_conv2d_case<BFloat16>(4, false, false, depthwise, rng));
    run_lut_conv2d<float>(lut_conv2d_case<float>(5, true, true, pointwise, rng), true);
    run_lut_conv2d<float>(lut_conv2d_case<float>(7, true, true, pointwise_few, rng));
    for (bool channels_last : {false, true}) {
      run_lut_conv2d<float>(lut_conv2d_case<float>(4, false, true, pointwise_few_strided, rng), channels_last);
      run_lut_conv2d<float>(lut_conv2d_case<float>(6, true, true, pointwise_blocks, rng), channels_last);
      run_lut_conv2d<float>(lut_conv2d_case<float>(3, false, false, pointwise_blocks_empty, rng), channels_last);
      run_lut_conv2d<float>(lut_conv2d_case<float>(5, true, true, unfolded, rng), channels_last);
    }
    run_lut_conv2d<float>(lut_conv2d_case<float>(3, false, true, depthwise, rng), true);
    for (bool channels_last : {false, true}) {
      run_lut_conv2d<float>(lut_conv2d_case<float>(4, true, true, depthwise_strided, rng), channels_last);
      run_lut_conv2d<float>(lut_conv2d_case<float>(6, false, false, depthwise_wide, rng), channels_last);
      run_lut_conv2d<float>(lut_conv2d_case<float>(2, true, true, depthwise_rows3, rng), channels_last);
      run_lut_conv2d<float>(lut_conv2d_case<float>(5, false, true, depthwise_rows5, rng), channels_last);
      run_lut_conv2d<float>(lut_conv2d_case<float>(7, true, true, depthwise_rows7, rng), channels_last);
    }
  }
  set_simd.call(true);
  return finish();
}
