// The CUDA kernels (csrc/ops/*/*.cu), run on host buffers through the SIMT emulation, against
// the plain loops of kernel_cases.h: every kernel, each storage type, sparse and dense packed
// weights, grouped, depthwise, strided and dilated convolutions, grids of several blocks with
// partly idle threads. Built plain, under ASan+UBSan and under TSan (CMakeLists.txt); the Python
// suite compares the same kernels with mixedprec/backends/reference/ over many more shapes.
#include <cmath>
#include <vector>

#include "kernel_cases.h"

// The kernel sources, compiled here under the SIMT emulation: their raw-pointer entry points are
// declared only by the ops' torch glue, which this torch-free program does not include.
#include "simt/simt.h"
#include "ops/bit_sharing_quant/bit_sharing_quant.cu"
#include "ops/codebook_quant/codebook_quant.cu"
#include "ops/lowbit_linear/lowbit_linear.cu"
#include "ops/lut_conv2d/lut_conv2d.cu"

using namespace mixedprec;
using namespace kernel_cases;

namespace {

const std::string kWho = "simt";

// stats + finalize + apply (forward); residual sums, then apply given the means (data parallel);
// backward + finalize.
template <class T>
void run_bit_sharing(const BitSharingCase& c) {
  const int64_t n = int64_t(c.x.size());
  const int k = int(c.bits.size());
  const BitSharingParams p = make_bit_sharing_params(c.bits.data(), k, c.is_signed);
  std::vector<T> x(n), grad_y(n), y(n), grad_x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = from_float<T>(c.x[i]), grad_y[i] = from_float<T>(c.grad_y[i]);
  std::vector<float> residual_mean(k - 1, NAN), sums(k, NAN), workspace(simt::bit_sharing_workspace_floats(n), NAN);
  const float* z0 = c.zero_point ? &*c.zero_point : nullptr;
  const char* err = simt::bit_sharing_forward(dtype_of<T>::value, x.data(), y.data(), n, &c.clip, z0, c.thresholds.data(),
                                              residual_mean.data(), workspace.data(), p, nullptr);
  expect(err == nullptr, c.name + ": forward launch");
  check_bit_sharing_forward(c, y.data(), residual_mean.data(), kWho);
  if (k > 1) {  // the data-parallel path: sums of |r_j| alone, then the apply pass given the means
    std::vector<double> residual_sums(k - 1, NAN);
    err = simt::bit_sharing_residual_sums(dtype_of<T>::value, x.data(), n, &c.clip, z0, residual_sums.data(),
                                          workspace.data(), p, nullptr);
    expect(err == nullptr, c.name + ": residual sums launch");
    for (int j = 0; j < k - 1; ++j)
      expect(std::abs(residual_sums[j] / double(n) - c.residual_mean[j]) <= 1e-5 * c.residual_mean[j] + 1e-7,
             c.name + ": residual sums / n != mean |r_j|");
    std::vector<T> y_given(n, from_float<T>(NAN));
    err = simt::bit_sharing_apply(dtype_of<T>::value, x.data(), y_given.data(), n, &c.clip, z0, c.thresholds.data(),
                                  residual_mean.data(), p, nullptr);
    expect(err == nullptr, c.name + ": apply launch");
    check_bit_sharing_forward(c, y_given.data(), residual_mean.data(), kWho);
  }
  err = simt::bit_sharing_backward(dtype_of<T>::value, grad_y.data(), x.data(), grad_x.data(), n, &c.clip, z0,
                                   c.gates.data(), sums.data(), workspace.data(), p, nullptr);
  expect(err == nullptr, c.name + ": backward launch");
  check_bit_sharing_backward(c, grad_x.data(), sums.data(), kWho);
}

template <class T>
void run_codebook(const CodebookCase& c) {
  const int64_t n = int64_t(c.weight.size());
  std::vector<T> weight(n), y(n);
  for (int64_t i = 0; i < n; ++i) weight[i] = from_float<T>(c.weight[i]);
  const char* err = simt::codebook_quant_forward(dtype_of<T>::value, weight.data(), reinterpret_cast<const bool*>(c.keep.data()),
                                                 y.data(), n, c.inner, c.codebook.data(), int(c.codebook.size()),
                                                 c.channel_scale.data(), nullptr);
  expect(err == nullptr, c.name + ": launch");
  check_codebook(c, y.data(), kWho);
}

// The kernels' view of a packed weight (out x row_length).
PackedView packed_view(const PackedCodes& p, const std::vector<float>& codebook,
                       const std::vector<float>& channel_scale, int64_t out, int64_t row_length, int bits) {
  const bool sparse = !p.keep_bitmap.empty();
  return PackedView{p.codes.data(), codebook.data(), channel_scale.data(), sparse ? p.keep_bitmap.data() : nullptr,
                    sparse ? p.code_offsets.data() : nullptr, out, row_length, bits};
}

void run_lowbit(const LowbitCase& c) {
  const PackedView w = packed_view(c.packed, c.codebook, c.channel_scale, c.out, c.in, c.bits);
  std::vector<float> y(c.y.size(), NAN), grad_x(c.grad_x.size(), NAN);
  expect(simt::lowbit_linear_forward(c.x.data(), y.data(), c.m_rows, w, nullptr) == nullptr, c.name + ": forward launch");
  check_lowbit_forward(c, y.data(), kWho);
  expect(simt::lowbit_linear_backward(c.grad_y.data(), grad_x.data(), c.m_rows, w, nullptr) == nullptr,
         c.name + ": backward launch");
  check_lowbit_backward(c, grad_x.data(), kWho);
}

template <class T>
void run_lut_conv2d(const LutConv2dCase& c) {
  const PackedView w = packed_view(c.packed, c.codebook, c.channel_scale, c.g.out_channels, c.g.row_length(), c.bits);
  std::vector<T> x(c.x.size()), grad_y(c.grad_y.size()), y(c.y.size()), grad_x(c.grad_x.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = from_float<T>(c.x[i]);
  for (size_t i = 0; i < grad_y.size(); ++i) grad_y[i] = from_float<T>(c.grad_y[i]);
  const char* err = simt::lut_conv2d_forward(dtype_of<T>::value, x.data(), c.bias.empty() ? nullptr : c.bias.data(),
                                             y.data(), w, c.g, nullptr);
  expect(err == nullptr, c.name + ": forward launch");
  check_lut_conv2d_forward(c, y.data(), kWho);
  err = simt::lut_conv2d_backward(dtype_of<T>::value, grad_y.data(), grad_x.data(), w, c.g, nullptr);
  expect(err == nullptr, c.name + ": backward launch");
  check_lut_conv2d_backward(c, grad_x.data(), kWho);
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  // Few, small cases: every emulated launch starts a host thread per CUDA thread, blocks run one
  // after another, and the sanitizers slow both down further.

  // bit_sharing: 7 elements (one partly idle block) and 1000 (3 blocks, grid-stride); K = 3, 1
  // (no stats pass), 8; both signs; float16 and bfloat16 storage on the first bit set.
  const std::vector<std::vector<int64_t>> bit_sets = {{2, 4, 8}, {3}, {1, 2, 3, 4, 5, 6, 7, 8}};
  for (int64_t n : {7, 1000})
    for (const auto& bits : bit_sets)
      for (bool is_signed : {true, false}) run_bit_sharing<float>(bit_sharing_case<float>(n, bits, is_signed, rng));
  run_bit_sharing<Half16>(bit_sharing_case<Half16>(1000, bit_sets[0], true, rng));
  run_bit_sharing<BFloat16>(bit_sharing_case<BFloat16>(1000, bit_sets[0], false, rng));
  // the asymmetric grid (zero point z0 = D(0.4, b_1)); zeros in x map to exactly 0
  run_bit_sharing<float>(bit_sharing_case<float>(1000, bit_sets[0], false, rng, 50, 0.4f));
  run_bit_sharing<BFloat16>(bit_sharing_case<BFloat16>(7, bit_sets[2], false, rng, 2, 0.7f));

  // codebook_quant: 1, 2, 16 and 256 levels; 3 x 700 elements outrun the 3 x 256 emulated
  // threads (grid stride)
  for (int levels : {1, 2, 16, 256}) {
    run_codebook<float>(codebook_case<float>(1, 1, levels, rng));
    run_codebook<float>(codebook_case<float>(5, 37, levels, rng));
    run_codebook<float>(codebook_case<float>(3, 700, levels, rng));
  }
  run_codebook<Half16>(codebook_case<Half16>(5, 37, 16, rng));
  run_codebook<BFloat16>(codebook_case<BFloat16>(5, 37, 16, rng));

  // lowbit_linear: 3-bit codes straddling bytes in a sparse weight with 3 column groups; a dense
  // 8-bit weight in two batch tiles and two warps' blocks; 300 columns: two backward blocks, the
  // second partly idle.
  run_lowbit(lowbit_case(5, 70, 3, 3, 0.6, rng));
  run_lowbit(lowbit_case(9, 33, 5, 8, 1.0, rng));
  run_lowbit(lowbit_case(3, 300, 2, 4, 0.5, rng));

  // lut_conv2d (N, C_in, H, W, C_out, kh, kw, stride, padding, dilation, groups)
  const Conv2dGeometry plain = conv_geometry(2, 3, 5, 6, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1);
  const Conv2dGeometry strided_dilated_grouped = conv_geometry(1, 4, 7, 5, 6, 3, 2, 2, 2, 1, 1, 2, 1, 2);
  const Conv2dGeometry depthwise = conv_geometry(2, 5, 6, 7, 5, 3, 3, 1, 1, 1, 1, 1, 1, 5);
  const Conv2dGeometry two_by_two_tiles = conv_geometry(1, 2, 9, 9, 70, 3, 3, 1, 1, 1, 1, 1, 1, 1);  // M 70, N 81
  for (int bits : {1, 4, 8})
    for (bool sparse : {false, true}) run_lut_conv2d<float>(lut_conv2d_case<float>(bits, sparse, true, plain, rng));
  run_lut_conv2d<float>(lut_conv2d_case<float>(3, true, false, strided_dilated_grouped, rng));
  run_lut_conv2d<float>(lut_conv2d_case<float>(2, false, true, depthwise, rng));
  run_lut_conv2d<float>(lut_conv2d_case<float>(4, true, true, two_by_two_tiles, rng));
  run_lut_conv2d<Half16>(lut_conv2d_case<Half16>(4, true, true, plain, rng));
  run_lut_conv2d<BFloat16>(lut_conv2d_case<BFloat16>(4, false, false, depthwise, rng));
  return finish();
}
