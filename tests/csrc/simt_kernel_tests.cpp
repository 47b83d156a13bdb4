// The CUDA kernels, run on host buffers through the SIMT emulation, against a plain scalar
// version of the math written here. Built plain, under ASan+UBSan and under TSan (CMakeLists.txt);
// the Python suite compares the same kernels with mixedprec/reference.py.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "mixedprec/launchers.h"

using namespace mixedprec;

namespace {

int failures = 0;

void expect(bool ok, const char* what, int n, int k, bool is_signed) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (n=%d, K=%d, signed=%d)\n", what, n, k, int(is_signed));
  }
}

void expect(bool ok, const char* what, int n, int levels) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (n=%d, levels=%d)\n", what, n, levels);
  }
}

struct Oracle {
  std::vector<float> y, grad_x;
  std::vector<double> residual_mean, sums;
};

// y = v (2 z_hat - 1) or v z_hat with z_hat = q_1 + g_2 (e_2 + g_3 (e_3 + ...)), as DESIGN.md.
Oracle oracle(const std::vector<float>& x, const std::vector<float>& grad_y, float v, const std::vector<int>& bits,
              bool is_signed, const std::vector<float>& thresholds, bool use_thresholds, std::vector<float>& gates) {
  const int k = int(bits.size());
  const size_t n = x.size();
  Oracle o;
  o.residual_mean.assign(k, 0.0);
  std::vector<std::vector<float>> e(n, std::vector<float>(k, 0.0f));
  std::vector<float> base(n), t(n);
  for (size_t i = 0; i < n; ++i) {
    t[i] = x[i] * (1.0f / v);
    const float c = t[i] < (is_signed ? -1.0f : 0.0f) ? (is_signed ? -1.0f : 0.0f) : (t[i] > 1.0f ? 1.0f : t[i]);
    const float z = is_signed ? (c + 1.0f) * 0.5f : c;
    auto quant = [](float u, int b) {
      const float levels = float((1 << b) - 1);
      return std::nearbyint(u * levels) * (1.0f / levels);
    };
    float q = base[i] = quant(z, bits[0]);
    for (int j = 1; j < k; ++j) {
      const float r = z - q;
      o.residual_mean[j] += std::fabs(r);
      e[i][j] = quant(r, bits[j]);
      q = q + e[i][j];
    }
  }
  if (use_thresholds)
    for (int j = 1; j < k; ++j) gates[j] = float(o.residual_mean[j] / double(n)) > thresholds[j - 1] ? 1.0f : 0.0f;
  o.y.resize(n);
  o.grad_x.resize(n);
  o.sums.assign(k, 0.0);
  for (size_t i = 0; i < n; ++i) {
    float tail = 0.0f;
    std::vector<float> tails(k, 0.0f);
    for (int j = k - 1; j >= 1; --j) tails[j] = tail = (j == k - 1) ? e[i][j] : e[i][j] + gates[j + 1] * tail;
    const float z_hat = k > 1 ? base[i] + gates[1] * tail : base[i];
    o.y[i] = is_signed ? v * (2.0f * z_hat - 1.0f) : v * z_hat;
    const bool inside = t[i] > (is_signed ? -1.0f : 0.0f) && t[i] < 1.0f;
    o.grad_x[i] = inside ? grad_y[i] : 0.0f;
    const float direct = is_signed ? 2.0f * z_hat - 1.0f : z_hat;
    o.sums[0] += double(grad_y[i]) * (inside ? direct - t[i] : direct);
    for (int j = 1; j < k; ++j) o.sums[j] += double(grad_y[i]) * tails[j];
  }
  for (int j = 1; j < k; ++j) o.residual_mean[j] /= double(n);
  return o;
}

void run_case(int n, const std::vector<int>& bits, bool is_signed, std::mt19937& rng) {
  const int k = int(bits.size());
  std::normal_distribution<float> normal;
  std::vector<float> x(n), grad_y(n);
  for (auto& v : x) v = normal(rng);
  for (auto& v : grad_y) v = normal(rng);
  const float clip = 1.5f;
  std::vector<float> gates(kMaxCandidateBits + 1, 0.0f), thresholds(kMaxCandidateBits, 0.0f);
  // thresholds half or one and a half of the true means: gate decisions far from ties
  const Oracle probe = oracle(x, grad_y, clip, bits, is_signed, thresholds, false, gates);
  for (int j = 1; j < k; ++j) thresholds[j - 1] = float(probe.residual_mean[j] * ((j % 2) ? 0.5 : 1.5));
  const Oracle want = oracle(x, grad_y, clip, bits, is_signed, thresholds, true, gates);

  std::vector<int64_t> bits64(bits.begin(), bits.end());
  const BitSharingParams p = make_bit_sharing_params(bits64.data(), k, is_signed);
  std::vector<float> y(n, NAN), residual_mean(kMaxCandidateBits, NAN);
  std::vector<float> workspace(simt::bit_sharing_workspace_floats(n), NAN);
  const char* err = simt::bit_sharing_forward(DType::f32, x.data(), y.data(), n, &clip, thresholds.data(),
                                              residual_mean.data(), workspace.data(), p, nullptr);
  expect(err == nullptr, "forward launch", n, k, is_signed);
  bool same_y = true;
  for (int i = 0; i < n; ++i) same_y &= y[i] == want.y[i];
  expect(same_y, "forward output bit-exact", n, k, is_signed);
  for (int j = 1; j < k; ++j)
    expect(std::fabs(residual_mean[j - 1] - want.residual_mean[j]) <= 1e-5 * want.residual_mean[j] + 1e-9,
           "residual mean", n, k, is_signed);

  std::vector<float> grad_x(n, NAN), sums(kMaxCandidateBits, NAN), gate_values(kMaxCandidateBits, 0.0f);
  for (int j = 1; j < k; ++j) gate_values[j - 1] = gates[j];
  err = simt::bit_sharing_backward(DType::f32, grad_y.data(), x.data(), grad_x.data(), n, &clip,
                                   gate_values.data(), sums.data(), workspace.data(), p, nullptr);
  expect(err == nullptr, "backward launch", n, k, is_signed);
  bool same_grad = true;
  for (int i = 0; i < n; ++i) same_grad &= grad_x[i] == want.grad_x[i];
  expect(same_grad, "grad_x", n, k, is_signed);
  double grad_scale = 0;
  for (float g : grad_y) grad_scale += std::fabs(g);
  for (int j = 0; j < k; ++j)
    expect(std::fabs(sums[j] - want.sums[j]) <= 1e-5 * grad_scale, "gradient sums", n, k, is_signed);

  // float16 storage: the same math on the widened values, outputs rounded to nearest even
  std::vector<Half16> xh(n), yh(n);
  std::vector<float> xh_wide(n);
  for (int i = 0; i < n; ++i) xh_wide[i] = to_float(xh[i] = from_float<Half16>(x[i]));
  const Oracle want_h = oracle(xh_wide, grad_y, clip, bits, is_signed, thresholds, true, gates);
  err = simt::bit_sharing_forward(DType::f16, xh.data(), yh.data(), n, &clip, thresholds.data(), residual_mean.data(),
                                  workspace.data(), p, nullptr);
  bool same_h = err == nullptr;
  for (int i = 0; i < n; ++i) same_h &= yh[i].bits == from_float<Half16>(want_h.y[i]).bits;
  expect(same_h, "float16 forward", n, k, is_signed);
}

// OPQ codebook fake-quant, written out plainly: a linear scan for the first midpoint >= z
// (torch.searchsorted's lower bound), then the reference's `scale * level + (w - w)`.
float codebook_oracle(float w, bool keep, float scale, const std::vector<float>& codebook) {
  const float z = w * (1.0f / scale);
  size_t j = 0;
  while (j + 1 < codebook.size() && !((codebook[j] + codebook[j + 1]) * 0.5f >= z)) ++j;
  return keep ? scale * codebook[j] + (w - w) : 0.0f;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0 || (std::isnan(a) && std::isnan(b)); }

void run_codebook_case(int channels, int inner, int levels, std::mt19937& rng) {
  const int n = channels * inner;
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> pick(0, 3);
  std::vector<float> codebook(levels);
  for (auto& c : codebook) c = normal(rng);
  std::sort(codebook.begin(), codebook.end());
  codebook.erase(std::unique(codebook.begin(), codebook.end()), codebook.end());
  levels = int(codebook.size());
  std::vector<float> scale(channels), weight(n);
  for (int c = 0; c < channels; ++c) scale[c] = std::ldexp(1.0f, c % 5 - 2) * (c % 2 ? 1.0f : 1.37f);
  std::vector<uint8_t> keep(n);  // bool storage without std::vector<bool>'s packing
  for (int i = 0; i < n; ++i) {
    const float s = scale[i / inner];
    const int j = std::uniform_int_distribution<int>(0, levels - 1)(rng);
    switch (pick(rng)) {  // a random value, a level, a midpoint (a tie), or a non-finite value
      case 0: weight[i] = 2.0f * normal(rng); break;
      case 1: weight[i] = codebook[j] * s; break;
      case 2: weight[i] = (j + 1 < levels ? (codebook[j] + codebook[j + 1]) * 0.5f : codebook[j]) * s; break;
      default: weight[i] = i % 3 == 0 ? NAN : (i % 3 == 1 ? INFINITY : -INFINITY);
    }
    keep[i] = pick(rng) != 0;
  }
  std::vector<float> y(n, NAN);
  const bool* keep_mask = reinterpret_cast<const bool*>(keep.data());
  const char* err = simt::codebook_quant_forward(DType::f32, weight.data(), keep_mask, y.data(), n, inner,
                                                 codebook.data(), levels, scale.data(), nullptr);
  expect(err == nullptr, "codebook launch", n, levels);
  bool same = true;
  for (int i = 0; i < n; ++i) same &= same_bits(y[i], codebook_oracle(weight[i], keep[i], scale[i / inner], codebook));
  expect(same, "codebook output bit-exact", n, levels);

  std::vector<BFloat16> wb(n), yb(n);
  for (int i = 0; i < n; ++i) wb[i] = from_float<BFloat16>(weight[i]);
  err = simt::codebook_quant_forward(DType::bf16, wb.data(), keep_mask, yb.data(), n, inner, codebook.data(), levels,
                                     scale.data(), nullptr);
  bool same_b = err == nullptr;
  for (int i = 0; i < n; ++i)
    same_b &= same_bits(to_float(yb[i]), to_float(from_float<BFloat16>(
                                             codebook_oracle(to_float(wb[i]), keep[i], scale[i / inner], codebook))));
  expect(same_b, "codebook bfloat16 output", n, levels);
}


// lut_conv2d: a packed weight (bits-bit codes, optional bitmap) convolved on host buffers, forward
// and the transposed convolution, against a double-precision loop over the decoded weight.
void run_lut_conv2d_case(int bits, bool sparse, const Conv2dGeometry& g, std::mt19937& rng) {
  const int64_t numel = g.out_channels * g.row_length();
  std::uniform_int_distribution<int> code_dist(0, (1 << bits) - 1);
  std::normal_distribution<float> normal;
  std::vector<Half16> codebook(1 << bits);
  for (auto& level : codebook) level = from_float<Half16>(normal(rng));
  std::vector<float> scale(g.out_channels), weight(numel, 0.0f), bias(g.out_channels);
  for (auto& s : scale) s = 0.5f + std::fabs(normal(rng));
  for (auto& b : bias) b = normal(rng);
  std::vector<uint8_t> codes((numel * bits + 7) / 8 + 1, 0), bitmap((numel + 7) / 8, 0);
  std::vector<int64_t> word_offsets((numel + 31) / 32, 0);
  int64_t kept = 0;
  for (int64_t f = 0; f < numel; ++f) {
    if (f % 32 == 0) word_offsets[f / 32] = kept;
    if (sparse && (rng() % 3 == 0)) continue;  // about a third pruned
    bitmap[f / 8] |= uint8_t(1u << (f % 8));
    const int code = code_dist(rng);
    for (int b = 0; b < bits; ++b)
      if ((code >> b) & 1) codes[(kept * bits + b) / 8] |= uint8_t(1u << ((kept * bits + b) % 8));
    weight[f] = scale[f / g.row_length()] * to_float(codebook[code]);
    ++kept;
  }
  codes.resize((kept * bits + 7) / 8);  // exactly the format's size: ASan sees any over-read
  if (codes.empty()) codes.push_back(0);
  const LutWeight w{codes.data(), codebook.data(), scale.data(), sparse ? bitmap.data() : nullptr,
                    sparse ? word_offsets.data() : nullptr, bits};
  const int64_t in_size = g.batch * g.in_channels * g.height * g.width;
  const int64_t out_size = g.batch * g.out_channels * g.out_pixels();
  std::vector<float> x(in_size), grad_y(out_size);
  for (auto& v : x) v = normal(rng);
  for (auto& v : grad_y) v = normal(rng);
  std::vector<double> want_y(out_size, 0.0), want_gx(in_size, 0.0);
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t co = 0; co < g.out_channels; ++co)
      for (int64_t oh = 0; oh < g.out_height; ++oh)
        for (int64_t ow = 0; ow < g.out_width; ++ow) {
          const int64_t o = ((n * g.out_channels + co) * g.out_height + oh) * g.out_width + ow;
          want_y[o] = bias[co];
          for (int64_t ci = 0; ci < g.group_in(); ++ci)
            for (int64_t kh = 0; kh < g.kernel_h; ++kh)
              for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
                const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h, iw = ow * g.stride_w - g.pad_w + kw * g.dil_w;
                if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) continue;
                const int64_t c_in = co / g.group_out() * g.group_in() + ci;
                const int64_t i = ((n * g.in_channels + c_in) * g.height + ih) * g.width + iw;
                const double wv = weight[co * g.row_length() + (ci * g.kernel_h + kh) * g.kernel_w + kw];
                want_y[o] += wv * x[i];
                want_gx[i] += wv * grad_y[o];
              }
        }
  std::vector<float> y(out_size, NAN), grad_x(in_size, NAN);
  const char* err = simt::lut_conv2d_forward(DType::f32, x.data(), bias.data(), y.data(), w, g, nullptr);
  expect(err == nullptr, "lut_conv2d forward launch", int(numel), bits, sparse);
  bool close = true;
  for (int64_t o = 0; o < out_size; ++o) close &= std::fabs(y[o] - want_y[o]) <= 1e-4 * (1.0 + std::fabs(want_y[o]));
  expect(close, "lut_conv2d forward", int(numel), bits, sparse);
  err = simt::lut_conv2d_backward(DType::f32, grad_y.data(), grad_x.data(), w, g, nullptr);
  expect(err == nullptr, "lut_conv2d backward launch", int(numel), bits, sparse);
  close = true;
  for (int64_t i = 0; i < in_size; ++i) close &= std::fabs(grad_x[i] - want_gx[i]) <= 1e-4 * (1.0 + std::fabs(want_gx[i]));
  expect(close, "lut_conv2d backward (grad_x)", int(numel), bits, sparse);
}

void run_lut_conv2d_cases(std::mt19937& rng) {
  // batch, C_in, H, W, C_out, kh, kw, OH, OW, stride, pad, dilation, groups
  const Conv2dGeometry plain{2, 3, 5, 6, 4, 3, 3, 5, 6, 1, 1, 1, 1, 1, 1, 1};
  const Conv2dGeometry strided_grouped{1, 4, 7, 5, 6, 3, 2, 3, 3, 2, 2, 1, 1, 2, 1, 2};
  for (int bits : {1, 3, 4, 8})
    for (bool sparse : {false, true}) run_lut_conv2d_case(bits, sparse, bits == 3 ? strided_grouped : plain, rng);
}
}  // namespace

// --- lowbit_linear: a sparse 3-bit packed weight built here, forward and backward against a
// dense decode (exact integer-valued data, so float sums agree exactly).
void test_lowbit_linear(int out, int in, int m_rows, int bits, double keep_prob) {
  std::mt19937 rng(out * 131 + in);
  std::vector<uint8_t> keep((size_t(out) * in + 7) / 8, 0), codes;
  std::vector<int64_t> row_offsets(out + 1, 0);
  const int groups = (in + 31) / 32;
  std::vector<int32_t> group_offsets(size_t(out) * groups, 0);
  std::vector<float> dense(size_t(out) * in, 0.0f), codebook(size_t(1) << bits), scale(out);
  for (size_t j = 0; j < codebook.size(); ++j) codebook[j] = float(int(j) - 2);
  for (int c = 0; c < out; ++c) scale[c] = float(1 + c % 3);
  int64_t kept = 0;
  for (int c = 0; c < out; ++c) {
    for (int i = 0; i < in; ++i) {
      if (i % 32 == 0) group_offsets[size_t(c) * groups + i / 32] = int32_t(kept - row_offsets[c]);
      if (std::uniform_real_distribution<double>(0, 1)(rng) >= keep_prob) continue;
      const size_t pos = size_t(c) * in + i;
      keep[pos / 8] |= uint8_t(1u << (pos % 8));
      const uint32_t code = rng() % (1u << bits);
      for (int b = 0; b < bits; ++b) {
        const int64_t bit = kept * bits + b;
        if (size_t(bit / 8) >= codes.size()) codes.push_back(0);
        codes[bit / 8] |= uint8_t(((code >> b) & 1u) << (bit % 8));
      }
      dense[pos] = scale[c] * codebook[code];
      ++kept;
    }
    row_offsets[c + 1] = kept;
  }
  codes.resize((kept * bits + 7) / 8);
  std::vector<float> x(size_t(m_rows) * in), grad_y(size_t(m_rows) * out);
  for (auto& v : x) v = float(int(rng() % 7) - 3);
  for (auto& v : grad_y) v = float(int(rng() % 5) - 2);
  const bool sparse = keep_prob < 1.0;  // a dense weight has no bitmap
  const PackedView w{codebook.data(), scale.data(), codes.data(), sparse ? keep.data() : nullptr,
                     int64_t(keep.size()), row_offsets.data(), sparse ? group_offsets.data() : nullptr,
                     out, in, groups, bits};
  std::vector<float> y(size_t(m_rows) * out, NAN), grad_x(size_t(m_rows) * in, NAN);
  expect(simt::lowbit_linear_forward(x.data(), y.data(), m_rows, w, nullptr) == nullptr, "lowbit launch", in, bits, false);
  expect(simt::lowbit_linear_backward(grad_y.data(), grad_x.data(), m_rows, w, nullptr) == nullptr, "lowbit launch", in, bits, false);
  for (int m = 0; m < m_rows; ++m) {
    for (int c = 0; c < out; ++c) {
      float ref = 0.0f;
      for (int i = 0; i < in; ++i) ref += x[size_t(m) * in + i] * dense[size_t(c) * in + i];
      expect(y[size_t(m) * out + c] == ref, "lowbit_linear forward", in, bits, false);
    }
    for (int i = 0; i < in; ++i) {
      float ref = 0.0f;
      for (int c = 0; c < out; ++c) ref += grad_y[size_t(m) * out + c] * dense[size_t(c) * in + i];
      expect(grad_x[size_t(m) * in + i] == ref, "lowbit_linear backward", in, bits, false);
    }
  }
}

int main() {
  std::mt19937 rng(0);
  // Few, small cases: every emulated launch starts a host thread per CUDA thread, and the
  // sanitizers slow those down further. The Python suite covers sizes and dtypes.
  const std::vector<std::vector<int>> bit_sets = {{2, 4, 8}, {3}, {1, 2, 3, 4, 5, 6, 7, 8}};
  for (int n : {7, 1000})
    for (const auto& bits : bit_sets)
      for (bool is_signed : {true, false}) run_case(n, bits, is_signed, rng);
  // 1, 2, 16 and 256 levels; 3 x 700 elements outrun the 3 x 256 emulated threads (grid stride)
  for (int levels : {1, 2, 16, 256}) {
    run_codebook_case(1, 1, levels, rng);
    run_codebook_case(5, 37, levels, rng);
    run_codebook_case(3, 700, levels, rng);
  }
  test_lowbit_linear(5, 70, 3, 3, 0.6);  // sparse, 3-bit codes straddling bytes, 3 column groups
  test_lowbit_linear(9, 33, 5, 8, 1.0);  // dense (no bitmap), two batch tiles
  run_lut_conv2d_cases(rng);
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
