// The integer codes of SBS's fixed-bit activation quantizer on the CPU, for the int8 path of
// PackedConv2d and PackedLinear (mixedprec/nn/int8.py): k = rint(z n), z = clamp(x / v + z0, 0, 1)
// or (signed) (clamp(x / v, -1, 1) + 1) / 2, the k that bit_sharing_quant rounds to
// (include/mixedprec/bit_sharing.h, spelled the same way), as uint8 in x's layout (centered: k - 128
// as int8, the operand of s8 x s8 GEMMs), and per pixel
// the sum over channels of k - j, j the zero level (z0 n; signed: (n - 1) / 2, half a step below
// the grid's middle, which has no level). The int8 convolution's weights have no zero point, so
// the weight grid's offset is added as offset * (that sum, summed over each output's window). A
// NaN in x gives some code and a NaN sum at its pixel, which the window sums carry to every output
// it reaches, as the float path does.
//
// int8_epilogue turns the int32 sums of the int8 path's small GEMMs (torch._int_mm) into y, one
// pass: y = float(acc + offset_c) factor_c + bias_c + window_factor_c window_sum, each operation
// rounded in turn (in the order written), in acc's layout.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/vec_ops.h"
#include "mixedprec/bit_sharing.h"
#include "register/op.h"

namespace mixedprec {
namespace {

constexpr int kW = Vec::size();

struct CodeParams {
  float inv_clip, z0, levels, zero_level;
  bool is_signed;
  uint8_t flip;  // 0x80 when centered: k ^ 0x80 is k - 128 as int8
};

inline Vec code_of(Vec x, const CodeParams& p) {
  const Vec z = bs_normalize<VecOps>(x * Vec(p.inv_clip), p.is_signed, p.z0);
  return VecOps::round_even(z * Vec(p.levels));
}

// codes[i] = the code of x[i] for i < count (<= kW); returns the codes as floats, 0 past count.
inline Vec store_codes(const float* x, uint8_t* codes, const CodeParams& p, int count = kW) {
  const Vec k = code_of(count == kW ? Vec::loadu(x) : Vec::loadu(x, count), p);
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_mask_cvtusepi32_storeu_epi8(codes, __mmask16((1u << count) - 1u),
                                     _mm512_xor_si512(_mm512_cvttps_epi32(k), _mm512_set1_epi32(p.flip)));
#else
  alignas(64) float lanes[kW];
  k.store(lanes);
  for (int l = 0; l < count; ++l) codes[l] = lanes[l] == lanes[l] ? uint8_t(uint8_t(lanes[l]) ^ p.flip) : 0;  // NaN: 0
#endif
  return count == kW ? k : Vec::set(Vec(0.0f), k, count);
}

// Channels-last: pixel q's channels are x[q C .. q C + C - 1].
void channels_last(const float* x, uint8_t* codes, float* sums, int64_t pixels, int64_t c, const CodeParams& p) {
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(c, 1));  // ~32k elements a task
  at::parallel_for(0, pixels, grain, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const float* xq = x + q * c;
      uint8_t* cq = codes + q * c;
      Vec acc(0.0f);
      int64_t i = 0;
      for (; i + kW <= c; i += kW) acc = acc + store_codes(xq + i, cq + i, p);
      if (i < c) acc = acc + store_codes(xq + i, cq + i, p, int(c - i));
      sums[q] = float(lane_sum(acc) - double(c) * p.zero_level);
    }
  });
}

// NCHW: image n's channel planes of hw values each; sums[n hw + i] over the planes.
void planar(const float* x, uint8_t* codes, float* sums, int64_t images, int64_t c, int64_t hw, const CodeParams& p) {
  constexpr int64_t kSpan = 256;  // pixels per task step: the span's sums stay in L1 over the planes
  const int64_t spans = (hw + kSpan - 1) / kSpan;
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (std::max<int64_t>(c, 1) * kSpan));
  at::parallel_for(0, images * spans, grain, [&](int64_t t0, int64_t t1) {
    alignas(64) float acc[kSpan];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / spans, i0 = (t % spans) * kSpan, len = std::min(kSpan, hw - i0);
      std::fill(acc, acc + len, -p.zero_level * float(c));
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t at = (n * c + ch) * hw + i0;
        for (int64_t i = 0; i < len; i += kW) {
          const int count = int(std::min<int64_t>(kW, len - i));
          (Vec::loadu(acc + i, count) + store_codes(x + at + i, codes + at + i, p, count)).store(acc + i, count);
        }
      }
      std::copy(acc, acc + len, sums + n * hw + i0);
    }
  });
}

}  // namespace

namespace cpu {

std::tuple<at::Tensor, at::Tensor> bit_sharing_codes(const at::Tensor& x, float clip, bool is_signed, float z0,
                                                     int bits, bool centered) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const float levels = float((1 << bits) - 1);
  const float zero_level = is_signed ? float(((1 << bits) - 2) / 2) : std::nearbyint(z0 * levels);
  const CodeParams p{1.0f / clip, z0, levels, zero_level, is_signed, uint8_t(centered ? 0x80 : 0)};
  at::Tensor codes = poisoned(at::empty_like(x, x.options().dtype(at::kByte)));
  at::Tensor sums = poisoned(at::empty({n, 1, h, w}, x.options()));
  const float* xp = x.const_data_ptr<float>();
  if (h * w == 1 || (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()))  // pixel-major
    channels_last(xp, codes.data_ptr<uint8_t>(), sums.data_ptr<float>(), n * h * w, c, p);
  else
    planar(xp, codes.data_ptr<uint8_t>(), sums.data_ptr<float>(), n, c, h * w, p);
  return {centered ? codes.view(at::kChar) : codes, sums};
}

at::Tensor int8_epilogue(const at::Tensor& acc, const at::Tensor& offset, const at::Tensor& factor,
                         const std::optional<at::Tensor>& bias, const at::Tensor& window_sums,
                         const at::Tensor& window_factor) {
  const int64_t c = acc.size(1), hw = acc.size(2) * acc.size(3), pixels = acc.size(0) * hw;
  const bool pixel_major = hw == 1 || (acc.is_contiguous(at::MemoryFormat::ChannelsLast) && !acc.is_contiguous());
  at::Tensor y = poisoned(at::empty_like(acc, acc.options().dtype(at::kFloat)));
  const std::vector<float> zeros(bias ? 0 : c, 0.0f);
  const int32_t* a = acc.const_data_ptr<int32_t>();
  const int32_t* off = offset.const_data_ptr<int32_t>();
  const float *f = factor.const_data_ptr<float>(), *b = bias ? bias->const_data_ptr<float>() : zeros.data();
  const float *ws = window_sums.const_data_ptr<float>(), *wf = window_factor.const_data_ptr<float>();
  float* out = y.data_ptr<float>();
  if (pixel_major) {  // pixel q's channels at q C .. q C + C - 1
    at::parallel_for(0, pixels, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(c, 1)), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int32_t* aq = a + q * c;
        float* yq = out + q * c;
        const float s = ws[q];
        for (int64_t ch = 0; ch < c; ++ch) yq[ch] = (float(aq[ch] + off[ch]) * f[ch] + b[ch]) + wf[ch] * s;
      }
    });
  } else {  // NCHW: plane (n, ch) of hw values, image n's window sums at n hw
    at::parallel_for(0, acc.size(0) * c, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(hw, 1)),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t ch = plane % c;
        const int32_t* ap = a + plane * hw;
        const float* wsn = ws + plane / c * hw;
        float* yp = out + plane * hw;
        const int32_t o = off[ch];
        const float fc = f[ch], bc = b[ch], wc = wf[ch];
        for (int64_t i = 0; i < hw; ++i) yp[i] = (float(ap[i] + o) * fc + bc) + wc * wsn[i];
      }
    });
  }
  return y;
}

}  // namespace cpu
}  // namespace mixedprec
