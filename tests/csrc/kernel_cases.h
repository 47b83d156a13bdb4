// Inputs and expected outputs of every kernel on small odd shapes, computed by plain loops over
// the math of DESIGN.md and the packed format (no torch, no SIMT, none of the kernels' shared
// math headers). Shared by simt_kernel_tests.cpp (the CUDA sources under SIMT emulation) and
// cpu_kernel_tests.cpp (the CPU kernels through the torch dispatcher), which run under the
// sanitizers (tests/test_sanitizers.py).
//
// Every input a kernel reads lives in a heap block of exactly its size (exact()), so that
// AddressSanitizer sees a read one element past any of them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "mixedprec/common.h"
#include "mixedprec/conv2d.h"

namespace kernel_cases {

using mixedprec::BFloat16;
using mixedprec::Conv2dGeometry;
using mixedprec::Half16;

// ---------------------------------------------------------------------------------------------
// bookkeeping

struct Tally {
  int cases = 0, failures = 0;
};
inline Tally tally;

inline void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++tally.failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

inline int finish() {
  std::printf("%d kernel cases, %d failed checks\n", tally.cases, tally.failures);
  return tally.failures == 0 ? 0 : 1;
}

template <class T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, Half16>) return "float16";
  else return "bfloat16";
}

// A copy in a heap block of exactly v.size() elements (a vector that grew or shrank keeps a
// larger capacity, inside which an over-read would go unseen).
template <class V>
V exact(const V& v) {
  return V(v.begin(), v.end());
}

// v rounded to the storage type T (round to nearest even) and widened back.
template <class T>
float round_to(float v) {
  return mixedprec::to_float(mixedprec::from_float<T>(v));
}

inline bool same_bits(float a, float b) {
  return std::memcmp(&a, &b, sizeof(float)) == 0 || (std::isnan(a) && std::isnan(b));
}

// A kernel's stored output equals the float32 value `want` rounded to T.
template <class T>
bool stored_equals(T got, float want) {
  return same_bits(mixedprec::to_float(got), round_to<T>(want));
}

template <class T>
std::vector<float> normal_values(int64_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (auto& e : v) e = round_to<T>(scale * normal(rng));
  return v;
}

// ---------------------------------------------------------------------------------------------
// SBS bit sharing: t = x / v, z = (clamp(t, -1, 1) + 1) / 2 or clamp(t + z0, 0, 1),
// q_1 = D(z, b_1), r_j = z - q_{j-1}, e_j = D(r_j, b_j), q_j = q_{j-1} + e_j,
// z_hat = q_1 + g_2 (e_2 + g_3 (e_3 + ...)), y = v (2 z_hat - 1) or v (z_hat - z0).

struct BitSharingCase {
  std::string name;
  std::vector<int64_t> bits;
  bool is_signed = true;
  float clip = 1.5f;
  std::optional<float> zero_point;  // z0 of the asymmetric grid (unsigned only); none: 0
  std::vector<float> x, grad_y;   // values of the storage type under test
  std::vector<float> thresholds;  // (K-1,): half or one and a half of the true means, far from ties
  std::vector<float> gates;       // (K-1,): 1[residual_mean_j > threshold_j]
  // expected
  std::vector<float> y, grad_x;
  std::vector<double> residual_mean;  // (K-1,) mean |r_j|, j = 2..K
  std::vector<double> sums;           // (K,): sum grad_y dy/dv, then sum grad_y T_j (j = 2..K)
  double grad_scale = 0;              // sum |grad_y|, the scale of the sums' rounding error
};

// x is 0 on its first `zero_prefix` elements (a sample taken there misjudges the gates).
// offset: the asymmetric grid (unsigned only) with z0 = D(offset, b_1), a level of every grid, so
// that x = 0 gives y = 0 exactly.
template <class T>
BitSharingCase bit_sharing_case(int64_t n, const std::vector<int64_t>& bits, bool is_signed, std::mt19937& rng,
                                int64_t zero_prefix = 0, std::optional<float> offset = std::nullopt) {
  BitSharingCase c;
  const int k = int(bits.size());
  c.name = "bit_sharing n=" + std::to_string(n) + " K=" + std::to_string(k) + (is_signed ? " signed " : " unsigned ") +
           dtype_name<T>() + (zero_prefix ? " zero-prefixed" : "") + (offset ? " asymmetric" : "");
  c.bits = bits;
  c.is_signed = is_signed;
  c.x = normal_values<T>(n, rng);
  std::fill(c.x.begin(), c.x.begin() + std::min(n, zero_prefix), 0.0f);
  c.grad_y = normal_values<T>(n, rng);

  auto quant = [](float u, int64_t b) {
    const float levels = float((int64_t(1) << b) - 1);
    return std::nearbyint(u * levels) * (1.0f / levels);
  };
  if (offset) c.zero_point = quant(*offset, bits[0]);
  const float z0 = c.zero_point.value_or(0.0f);
  const float lo = is_signed ? -1.0f : 0.0f;
  std::vector<float> t(n), u(n), base(n), offsets(n * k, 0.0f);
  c.residual_mean.assign(k - 1, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    t[i] = c.x[i] * (1.0f / c.clip);
    u[i] = is_signed ? t[i] : t[i] + z0;
    const float clamped = u[i] < lo ? lo : (u[i] > 1.0f ? 1.0f : u[i]);
    const float z = is_signed ? (clamped + 1.0f) * 0.5f : clamped;
    float q = base[i] = quant(z, bits[0]);
    for (int j = 1; j < k; ++j) {
      const float r = z - q;
      c.residual_mean[j - 1] += std::fabs(r);
      offsets[i * k + j] = quant(r, bits[j]);
      q = q + offsets[i * k + j];
    }
  }
  for (int j = 1; j < k; ++j) {
    c.residual_mean[j - 1] /= double(n);
    c.thresholds.push_back(float(c.residual_mean[j - 1] * ((j % 2) ? 0.5 : 1.5)));
    c.gates.push_back(float(c.residual_mean[j - 1]) > c.thresholds.back() ? 1.0f : 0.0f);
  }
  auto gate = [&](int j) { return j < k ? c.gates[j - 1] : 0.0f; };  // g_{j+1}, j = 1..K-1

  c.y.resize(n);
  c.grad_x.resize(n);
  c.sums.assign(k, 0.0);
  std::vector<float> tails(k);
  for (int64_t i = 0; i < n; ++i) {
    float tail = 0.0f;
    for (int j = k - 1; j >= 1; --j) tails[j] = tail = (j == k - 1) ? offsets[i * k + j] : offsets[i * k + j] + gate(j + 1) * tail;
    const float z_hat = k > 1 ? base[i] + gate(1) * tail : base[i];
    c.y[i] = is_signed ? c.clip * (2.0f * z_hat - 1.0f) : c.clip * (z_hat - z0);
    if (offset && c.x[i] == 0.0f) expect(c.y[i] == 0.0f, c.name + ": x = 0 maps to y = 0 exactly (expected value)");
    const bool inside = u[i] > lo && u[i] < 1.0f;  // open, as torch.clamp's gradient
    c.grad_x[i] = inside ? c.grad_y[i] : 0.0f;
    const float direct = is_signed ? 2.0f * z_hat - 1.0f : z_hat - z0;
    c.sums[0] += double(c.grad_y[i]) * (inside ? direct - t[i] : direct);
    for (int j = 1; j < k; ++j) c.sums[j] += double(c.grad_y[i]) * tails[j];
    c.grad_scale += std::fabs(c.grad_y[i]);
  }
  c.x = exact(c.x);
  c.grad_y = exact(c.grad_y);
  c.thresholds = exact(c.thresholds);
  c.gates = exact(c.gates);
  return c;
}

template <class T>
void check_bit_sharing_forward(const BitSharingCase& c, const T* y, const float* residual_mean, const std::string& who) {
  ++tally.cases;
  bool same = true;
  for (size_t i = 0; i < c.y.size(); ++i) same &= stored_equals(y[i], c.y[i]);
  expect(same, c.name + ": " + who + " forward output bit-exact");
  for (size_t j = 0; j < c.residual_mean.size(); ++j)
    expect(std::fabs(residual_mean[j] - c.residual_mean[j]) <= 1e-5 * c.residual_mean[j] + 1e-9,
           c.name + ": " + who + " residual mean " + std::to_string(j + 2));
}

template <class T>
void check_bit_sharing_backward(const BitSharingCase& c, const T* grad_x, const float* sums, const std::string& who) {
  ++tally.cases;
  bool same = true;
  for (size_t i = 0; i < c.grad_x.size(); ++i) same &= stored_equals(grad_x[i], c.grad_x[i]);
  expect(same, c.name + ": " + who + " grad_x");
  for (size_t j = 0; j < c.sums.size(); ++j)
    expect(std::fabs(sums[j] - c.sums[j]) <= 1e-5 * c.grad_scale, c.name + ": " + who + " gradient sum " + std::to_string(j));
}

// ---------------------------------------------------------------------------------------------
// OPQ codebook fake-quant: the first midpoint >= z by a linear scan (torch.searchsorted's lower
// bound), then the reference's `scale * level + (w - w)`; 0 at pruned positions.

struct CodebookCase {
  std::string name;
  int64_t channels = 0, inner = 0;
  std::vector<float> codebook, channel_scale, weight;  // weight: values of the storage type
  std::vector<uint8_t> keep;                           // bool storage without std::vector<bool>'s packing
};

inline float codebook_oracle(float w, bool keep, float scale, const std::vector<float>& codebook) {
  const float z = w * (1.0f / scale);
  size_t j = 0;
  while (j + 1 < codebook.size() && !((codebook[j] + codebook[j + 1]) * 0.5f >= z)) ++j;
  return keep ? scale * codebook[j] + (w - w) : 0.0f;
}

template <class T>
CodebookCase codebook_case(int64_t channels, int64_t inner, int levels, std::mt19937& rng) {
  CodebookCase c;
  c.channels = channels;
  c.inner = inner;
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> pick(0, 3);
  for (int j = 0; j < levels; ++j) c.codebook.push_back(normal(rng));
  std::sort(c.codebook.begin(), c.codebook.end());
  c.codebook.erase(std::unique(c.codebook.begin(), c.codebook.end()), c.codebook.end());
  levels = int(c.codebook.size());
  c.name = "codebook_quant " + std::to_string(channels) + "x" + std::to_string(inner) + " levels=" +
           std::to_string(levels) + " " + dtype_name<T>();
  for (int64_t ch = 0; ch < channels; ++ch) c.channel_scale.push_back(std::ldexp(1.0f, int(ch % 5) - 2) * (ch % 2 ? 1.0f : 1.37f));
  const int64_t n = channels * inner;
  c.weight.resize(n);
  c.keep.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const float s = c.channel_scale[i / inner];
    const int j = std::uniform_int_distribution<int>(0, levels - 1)(rng);
    float w;
    switch (pick(rng)) {  // a random value, a level, a midpoint (a tie), or a non-finite value
      case 0: w = 2.0f * normal(rng); break;
      case 1: w = c.codebook[j] * s; break;
      case 2: w = (j + 1 < levels ? (c.codebook[j] + c.codebook[j + 1]) * 0.5f : c.codebook[j]) * s; break;
      default: w = i % 3 == 0 ? NAN : (i % 3 == 1 ? INFINITY : -INFINITY);
    }
    c.weight[i] = round_to<T>(w);
    c.keep[i] = pick(rng) != 0;
  }
  c.codebook = exact(c.codebook);
  c.channel_scale = exact(c.channel_scale);
  c.weight = exact(c.weight);
  c.keep = exact(c.keep);
  return c;
}

template <class T>
void check_codebook(const CodebookCase& c, const T* y, const std::string& who) {
  ++tally.cases;
  bool same = true;
  for (size_t i = 0; i < c.weight.size(); ++i)
    same &= stored_equals(y[i], codebook_oracle(c.weight[i], c.keep[i], c.channel_scale[i / c.inner], c.codebook));
  expect(same, c.name + ": " + who + " output bit-exact");
}

// ---------------------------------------------------------------------------------------------
// The packed format (mixedprec/formats/): bits-bit codes of the kept weights as one LSB-first
// stream in row-major order, an LSB-first keep bitmap (none when nothing is pruned) and, with
// it, code_offsets: the kept weights before each 64-weight block.

struct PackedCodes {
  std::vector<uint8_t> codes, keep_bitmap;  // keep_bitmap empty: dense
  std::vector<int64_t> code_offsets;        // (ceil(numel / 64),); empty when dense
  std::vector<int32_t> codes_of;            // per weight: its code, or -1 where pruned
  int64_t kept = 0;
};

// `numel` weights, each kept with probability keep_prob (all when keep_prob >= 1).
inline PackedCodes pack_random_codes(int64_t numel, int bits, double keep_prob, std::mt19937& rng) {
  PackedCodes p;
  const bool sparse = keep_prob < 1.0;
  std::vector<uint8_t> codes((numel * bits + 7) / 8, 0), bitmap((numel + 7) / 8, 0);
  for (int64_t f = 0; f < numel; ++f) {
    if (sparse && f % 64 == 0) p.code_offsets.push_back(p.kept);
    if (sparse && std::uniform_real_distribution<double>(0, 1)(rng) >= keep_prob) {
      p.codes_of.push_back(-1);
      continue;
    }
    bitmap[f / 8] |= uint8_t(1u << (f % 8));
    const uint32_t code = rng() % (1u << bits);
    for (int b = 0; b < bits; ++b) {
      const int64_t bit = p.kept * bits + b;
      codes[bit / 8] |= uint8_t(((code >> b) & 1u) << (bit % 8));
    }
    p.codes_of.push_back(int32_t(code));
    ++p.kept;
  }
  p.codes = std::vector<uint8_t>(codes.begin(), codes.begin() + (p.kept * bits + 7) / 8);
  if (sparse) p.keep_bitmap = exact(bitmap);
  p.code_offsets = exact(p.code_offsets);
  return p;
}

// ---------------------------------------------------------------------------------------------
// lowbit_linear: y = x W^T, grad_x = grad_y W, W[c, i] = channel_scale[c] * codebook[code] at
// kept positions. Integer-valued data: float sums are exact, so results must agree exactly.

struct LowbitCase {
  std::string name;
  int64_t out = 0, in = 0, m_rows = 0;
  int bits = 0;
  std::vector<float> codebook, channel_scale;
  PackedCodes packed;
  std::vector<float> x, grad_y;             // (m_rows, in), (m_rows, out)
  std::vector<float> y, grad_x;             // expected
};

inline LowbitCase lowbit_case(int64_t out, int64_t in, int64_t m_rows, int bits, double keep_prob, std::mt19937& rng) {
  LowbitCase c;
  c.name = "lowbit_linear " + std::to_string(out) + "x" + std::to_string(in) + " M=" + std::to_string(m_rows) +
           " bits=" + std::to_string(bits) + (keep_prob < 1.0 ? " sparse" : " dense");
  c.out = out, c.in = in, c.m_rows = m_rows, c.bits = bits;
  for (int j = 0; j < (1 << bits); ++j) c.codebook.push_back(float(j - 2));
  for (int64_t ch = 0; ch < out; ++ch) c.channel_scale.push_back(float(1 + ch % 3));
  c.packed = pack_random_codes(out * in, bits, keep_prob, rng);
  std::vector<float> dense(out * in, 0.0f);
  for (int64_t f = 0; f < out * in; ++f)
    if (c.packed.codes_of[f] >= 0) dense[f] = c.channel_scale[f / in] * c.codebook[c.packed.codes_of[f]];
  c.x.resize(m_rows * in);
  c.grad_y.resize(m_rows * out);
  for (auto& v : c.x) v = float(int(rng() % 7) - 3);
  for (auto& v : c.grad_y) v = float(int(rng() % 5) - 2);
  c.y.assign(m_rows * out, 0.0f);
  c.grad_x.assign(m_rows * in, 0.0f);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t ch = 0; ch < out; ++ch)
      for (int64_t i = 0; i < in; ++i) {
        c.y[m * out + ch] += c.x[m * in + i] * dense[ch * in + i];
        c.grad_x[m * in + i] += c.grad_y[m * out + ch] * dense[ch * in + i];
      }
  c.codebook = exact(c.codebook);
  c.channel_scale = exact(c.channel_scale);
  c.x = exact(c.x);
  c.grad_y = exact(c.grad_y);
  return c;
}

inline void check_lowbit_forward(const LowbitCase& c, const float* y, const std::string& who) {
  ++tally.cases;
  bool same = true;
  for (size_t i = 0; i < c.y.size(); ++i) same &= y[i] == c.y[i];
  expect(same, c.name + ": " + who + " forward");
}

inline void check_lowbit_backward(const LowbitCase& c, const float* grad_x, const std::string& who) {
  ++tally.cases;
  bool same = true;
  for (size_t i = 0; i < c.grad_x.size(); ++i) same &= grad_x[i] == c.grad_x[i];
  expect(same, c.name + ": " + who + " backward (grad_x)");
}

// ---------------------------------------------------------------------------------------------
// lut_conv2d: y = conv2d(x, W) + bias and grad_x = conv_transpose2d(grad_y, W), W decoded from
// a packed weight (float32 codebook), against a double-precision loop over the dense weight.

// (out_height, out_width) filled in from the rest, as torch computes them.
inline Conv2dGeometry conv_geometry(int64_t batch, int64_t in_channels, int64_t height, int64_t width,
                                    int64_t out_channels, int64_t kernel_h, int64_t kernel_w, int64_t stride_h,
                                    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                                    int64_t groups) {
  Conv2dGeometry g{batch, in_channels, height, width, out_channels, kernel_h, kernel_w, 0, 0,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups};
  g.out_height = (height + 2 * pad_h - dil_h * (kernel_h - 1) - 1) / stride_h + 1;
  g.out_width = (width + 2 * pad_w - dil_w * (kernel_w - 1) - 1) / stride_w + 1;
  return g;
}

struct LutConv2dCase {
  std::string name;
  Conv2dGeometry g{};
  int bits = 0;
  std::vector<float> codebook;
  std::vector<float> channel_scale, bias;   // bias empty: none
  PackedCodes packed;
  std::vector<float> x, grad_y;             // values of the storage type under test
  std::vector<double> y, grad_x;            // expected
  int64_t weight_numel() const { return g.out_channels * g.row_length(); }
};

template <class T>
LutConv2dCase lut_conv2d_case(int bits, bool sparse, bool with_bias, const Conv2dGeometry& g, std::mt19937& rng) {
  LutConv2dCase c;
  c.g = g;
  c.bits = bits;
  c.name = "lut_conv2d N" + std::to_string(g.batch) + " C" + std::to_string(g.in_channels) + "->" +
           std::to_string(g.out_channels) + " " + std::to_string(g.height) + "x" + std::to_string(g.width) + " k" +
           std::to_string(g.kernel_h) + "x" + std::to_string(g.kernel_w) + " s" + std::to_string(g.stride_h) +
           " d" + std::to_string(g.dil_h) + " groups=" + std::to_string(g.groups) + " bits=" + std::to_string(bits) +
           (sparse ? " sparse" : " dense") + (with_bias ? " bias " : " ") + dtype_name<T>();
  std::normal_distribution<float> normal;
  for (int j = 0; j < (1 << bits); ++j) c.codebook.push_back(normal(rng));
  for (int64_t co = 0; co < g.out_channels; ++co) c.channel_scale.push_back(0.5f + std::fabs(normal(rng)));
  if (with_bias)
    for (int64_t co = 0; co < g.out_channels; ++co) c.bias.push_back(normal(rng));
  const int64_t numel = c.weight_numel(), row = g.row_length();
  c.packed = pack_random_codes(numel, bits, sparse ? 2.0 / 3.0 : 1.0, rng);
  std::vector<float> weight(numel, 0.0f);
  for (int64_t f = 0; f < numel; ++f)
    if (c.packed.codes_of[f] >= 0) weight[f] = c.channel_scale[f / row] * c.codebook[c.packed.codes_of[f]];
  c.x = normal_values<T>(g.batch * g.in_channels * g.height * g.width, rng);
  c.grad_y = normal_values<T>(g.batch * g.out_channels * g.out_pixels(), rng);
  c.y.assign(c.grad_y.size(), 0.0);
  c.grad_x.assign(c.x.size(), 0.0);
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t co = 0; co < g.out_channels; ++co)
      for (int64_t oh = 0; oh < g.out_height; ++oh)
        for (int64_t ow = 0; ow < g.out_width; ++ow) {
          const int64_t o = ((n * g.out_channels + co) * g.out_height + oh) * g.out_width + ow;
          c.y[o] = with_bias ? c.bias[co] : 0.0;
          for (int64_t ci = 0; ci < g.group_in(); ++ci)
            for (int64_t kh = 0; kh < g.kernel_h; ++kh)
              for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
                const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h, iw = ow * g.stride_w - g.pad_w + kw * g.dil_w;
                if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) continue;
                const int64_t c_in = co / g.group_out() * g.group_in() + ci;
                const int64_t i = ((n * g.in_channels + c_in) * g.height + ih) * g.width + iw;
                const double w = weight[co * row + (ci * g.kernel_h + kh) * g.kernel_w + kw];
                c.y[o] += w * c.x[i];
                c.grad_x[i] += w * c.grad_y[o];
              }
        }
  c.codebook = exact(c.codebook);
  c.channel_scale = exact(c.channel_scale);
  c.bias = exact(c.bias);
  c.x = exact(c.x);
  c.grad_y = exact(c.grad_y);
  return c;
}

// Float accumulation against the double loop, then the output's rounding to T.
template <class T>
bool close_to(T got, double want) {
  const double tolerance = std::is_same_v<T, float> ? 1e-4 : (std::is_same_v<T, Half16> ? 1e-3 : 8e-3);
  return std::fabs(double(mixedprec::to_float(got)) - want) <= tolerance * (1.0 + std::fabs(want));
}

template <class T>
void check_lut_conv2d_forward(const LutConv2dCase& c, const T* y, const std::string& who) {
  ++tally.cases;
  bool close = true;
  for (size_t o = 0; o < c.y.size(); ++o) close &= close_to(y[o], c.y[o]);
  expect(close, c.name + ": " + who + " forward");
}

template <class T>
void check_lut_conv2d_backward(const LutConv2dCase& c, const T* grad_x, const std::string& who) {
  ++tally.cases;
  bool close = true;
  for (size_t i = 0; i < c.grad_x.size(); ++i) close &= close_to(grad_x[i], c.grad_x[i]);
  expect(close, c.name + ": " + who + " backward (grad_x)");
}

}  // namespace kernel_cases
