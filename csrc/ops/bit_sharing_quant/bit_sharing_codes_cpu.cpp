// The integer codes of SBS's fixed-bit activation quantizer on the CPU, for the int8 path of
// PackedConv2d and PackedLinear (mixedprec/nn/int8.py): k = rint(z n), z = clamp(x / v + z0, 0, 1)
// or (signed) (clamp(x / v, -1, 1) + 1) / 2, the k that bit_sharing_quant rounds to
// (include/mixedprec/bit_sharing.h, spelled the same way), as uint8 in x's layout or channels-last
// (centered: k - 128 as int8, the operand of s8 x s8 GEMMs), and per pixel
// the sum over channels of k - j, j the zero level (z0 n; signed: (n - 1) / 2, half a step below
// the grid's middle, which has no level). The int8 convolution's weights have no zero point, so
// the weight grid's offset is added as offset * (that sum, summed over each output's window). A
// NaN in x gives some code and a NaN sum at its pixel, which the window sums carry to every output
// it reaches, as the float path does.
//
// int8_epilogue_ turns the int32 sums of the int8 path's small GEMMs (torch._int_mm) into y in
// place, one pass: y = float(acc + offset_c) factor_c + bias_c + window_factor_c window_sum, each
// operation rounded in turn (in the order written), written over acc as float32 (y is then acc's
// bytes: no second activation-sized buffer, whose fresh pages cost ~1 us each to fault in).
//
// int8_nchw_epilogue lays oneDNN's channels-last y of an NCHW call out as NCHW and adds the offset
// term in the same pass (torch's transposing copy alone took 4-16x a plain copy's time):
// out[n, c, q] = (y[n, q, c] + window_factor_c window_sums[n, q]) + shift[c, q] (shift: the padded
// signed grid's, when given), each product and sum rounded in turn.
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

// codes[i] = the code k[i] (a float from code_of) for i < count (<= kW).
inline void store_code_bytes(Vec k, uint8_t* codes, uint8_t flip, int count = kW) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_mask_cvtusepi32_storeu_epi8(codes, __mmask16((1u << count) - 1u),
                                     _mm512_xor_si512(_mm512_cvttps_epi32(k), _mm512_set1_epi32(flip)));
#else
  alignas(64) float lanes[kW];
  k.store(lanes);
  for (int l = 0; l < count; ++l) codes[l] = lanes[l] == lanes[l] ? uint8_t(uint8_t(lanes[l]) ^ flip) : 0;  // NaN: 0
#endif
}

// codes[i] = the code of x[i] for i < count (<= kW); returns the codes as floats, 0 past count.
inline Vec store_codes(const float* x, uint8_t* codes, const CodeParams& p, int count = kW) {
  const Vec k = code_of(count == kW ? Vec::loadu(x) : Vec::loadu(x, count), p);
  store_code_bytes(k, codes, p.flip, count);
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

// NCHW: image n's channel planes of hw values each; sums[n hw + i] over the planes. A task codes
// whole planes of a block of channels (long contiguous streams: spans of 256 pixels across the
// planes ran 2-7x slower) into its own partial sums, added up after; with fewer images than
// threads an image's channels split into blocks. The sums are integers below 2^24: exact in
// float32 in any order.
void planar(const float* x, uint8_t* codes, float* sums, int64_t images, int64_t c, int64_t hw, const CodeParams& p) {
  const int64_t wanted = 4 * at::get_num_threads();  // tasks: a few per thread
  const int64_t blocks = std::clamp<int64_t>(wanted / std::max<int64_t>(images, 1), 1, std::max<int64_t>(c / 8, 1));
  const int64_t block = (c + blocks - 1) / blocks;
  std::vector<float> partial(size_t(images * blocks * hw), 0.0f);
  at::parallel_for(0, images * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / blocks, c0 = (t % blocks) * block, c1 = std::min(c, c0 + block);
      float* acc = partial.data() + t * hw;
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t at = (n * c + ch) * hw;
        for (int64_t i = 0; i < hw; i += kW) {
          const int count = int(std::min<int64_t>(kW, hw - i));
          (Vec::loadu(acc + i, count) + store_codes(x + at + i, codes + at + i, p, count)).store(acc + i, count);
        }
      }
    }
  });
  const float start = -p.zero_level * float(c);
  at::parallel_for(0, images, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(hw * blocks, 1)),
                   [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t i = 0; i < hw; ++i) {
        float sum = start;
        for (int64_t b = 0; b < blocks; ++b) sum += partial[size_t((n * blocks + b) * hw + i)];
        sums[n * hw + i] = sum;
      }
  });
}

// NCHW x, channels-last codes (oneDNN's convolution takes them so; torch's transposing copy of
// NCHW codes took 3-7x the time of a plain copy): per image, a vector's width of channels and of
// pixels at a time (16 x 16 on AVX-512), coded from the planes and transposed through a float tile.
void planar_to_channels_last(const float* x, uint8_t* codes, float* sums, int64_t images, int64_t c, int64_t hw,
                             const CodeParams& p) {
  constexpr int64_t kSpan = 4 * kW;  // pixels per task: 4 vectors of each plane
  const int64_t spans = (hw + kSpan - 1) / kSpan;
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (std::max<int64_t>(c, 1) * kSpan));
  at::parallel_for(0, images * spans, grain, [&](int64_t t0, int64_t t1) {
    alignas(64) float acc[kSpan], tile[kW * kW], flipped[kW * kW];  // tile[channel][pixel], flipped[pixel][channel]
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / spans, q0 = (t % spans) * kSpan, len = std::min(kSpan, hw - q0);
      std::fill(acc, acc + len, -p.zero_level * float(c));
      for (int64_t c0 = 0; c0 < c; c0 += kW) {
        const int cn = int(std::min<int64_t>(kW, c - c0));
        for (int64_t i = 0; i < len; i += kW) {
          const int qn = int(std::min<int64_t>(kW, len - i));
          Vec sum = Vec::loadu(acc + i, qn);
          for (int j = 0; j < cn; ++j) {
            const Vec k = code_of(Vec::loadu(x + ((n * c + c0 + j) * hw + q0 + i), qn), p);
            k.store(tile + j * kW);
            sum = sum + (qn == kW ? k : Vec::set(Vec(0.0f), k, qn));
          }
          sum.store(acc + i, qn);
          at::vec::transpose_mxn<float>(tile, kW, flipped, kW, cn, qn);
          for (int q = 0; q < qn; ++q)
            store_code_bytes(Vec::loadu(flipped + q * kW), codes + (n * hw + q0 + i + q) * c + c0, p.flip, cn);
        }
      }
      std::copy(acc, acc + len, sums + n * hw + q0);
    }
  });
}

}  // namespace

namespace cpu {

std::tuple<at::Tensor, at::Tensor> bit_sharing_codes(const at::Tensor& x, float clip, bool is_signed, float z0,
                                                     int bits, bool centered, bool to_channels_last) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const float levels = float((1 << bits) - 1);
  const float zero_level = is_signed ? float(((1 << bits) - 2) / 2) : std::nearbyint(z0 * levels);
  const CodeParams p{1.0f / clip, z0, levels, zero_level, is_signed, uint8_t(centered ? 0x80 : 0)};
  const bool pixel_major = h * w == 1 || (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous());
  at::Tensor codes = poisoned(to_channels_last && !pixel_major
                                  ? at::empty(x.sizes(), x.options().dtype(at::kByte).memory_format(
                                                             at::MemoryFormat::ChannelsLast))
                                  : at::empty_like(x, x.options().dtype(at::kByte)));
  at::Tensor sums = poisoned(at::empty({n, 1, h, w}, x.options()));
  const float* xp = x.const_data_ptr<float>();
  if (pixel_major)
    channels_last(xp, codes.data_ptr<uint8_t>(), sums.data_ptr<float>(), n * h * w, c, p);
  else if (to_channels_last)
    planar_to_channels_last(xp, codes.data_ptr<uint8_t>(), sums.data_ptr<float>(), n, c, h * w, p);
  else
    planar(xp, codes.data_ptr<uint8_t>(), sums.data_ptr<float>(), n, c, h * w, p);
  return {centered ? codes.view(at::kChar) : codes, sums};
}

void int8_epilogue_(at::Tensor& acc, const at::Tensor& offset, const at::Tensor& factor,
                    const std::optional<at::Tensor>& bias, const at::Tensor& window_sums,
                    const at::Tensor& window_factor) {
  const int64_t c = acc.size(1), hw = acc.size(2) * acc.size(3), pixels = acc.size(0) * hw;
  const bool pixel_major = hw == 1 || (acc.is_contiguous(at::MemoryFormat::ChannelsLast) && !acc.is_contiguous());
  const std::vector<float> zeros(bias ? 0 : c, 0.0f);
  int32_t* a = acc.data_ptr<int32_t>();  // read as int32, written over as float32 through vectors (no aliasing)
  const int32_t* off = offset.const_data_ptr<int32_t>();
  const float *f = factor.const_data_ptr<float>(), *b = bias ? bias->const_data_ptr<float>() : zeros.data();
  const float *ws = window_sums.const_data_ptr<float>(), *wf = window_factor.const_data_ptr<float>();
  // y[i] = (float(a[i] + o) * fc + bc) + wc * s for count (<= kW) values, each operand a vector
  const auto pass = [](int32_t* values, VecIndex o, Vec fc, Vec bc, Vec wc, Vec s, int count) {
    const Vec sums = at::vec::convert<float>(VecIndex::loadu(values, count) + o);
    ((sums * fc + bc) + wc * s).store(values, count);
  };
  if (pixel_major) {  // pixel q's channels at q C .. q C + C - 1
    at::parallel_for(0, pixels, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(c, 1)), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const Vec s(ws[q]);
        for (int64_t ch = 0; ch < c; ch += kW) {
          const int count = int(std::min<int64_t>(kW, c - ch));
          pass(a + q * c + ch, VecIndex::loadu(off + ch, count), Vec::loadu(f + ch, count), Vec::loadu(b + ch, count),
               Vec::loadu(wf + ch, count), s, count);
        }
      }
    });
  } else {  // NCHW: plane (n, ch) of hw values, image n's window sums at n hw
    at::parallel_for(0, acc.size(0) * c, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(hw, 1)),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t ch = plane % c;
        const float* wsn = ws + plane / c * hw;
        for (int64_t i = 0; i < hw; i += kW) {
          const int count = int(std::min<int64_t>(kW, hw - i));
          pass(a + plane * hw + i, VecIndex(off[ch]), Vec(f[ch]), Vec(b[ch]), Vec(wf[ch]), Vec::loadu(wsn + i, count),
               count);
        }
      }
    });
  }
}

at::Tensor int8_nchw_epilogue(const at::Tensor& y, const at::Tensor& window_sums, const at::Tensor& window_factor,
                              const std::optional<at::Tensor>& shift) {
  constexpr int64_t kTile = kW, kSpan = 4 * kTile;  // vector-square transposes; 4 vectors of pixels a task
  const int64_t c = y.size(1), hw = y.size(2) * y.size(3), spans = (hw + kSpan - 1) / kSpan;
  at::Tensor out = poisoned(at::empty(y.sizes(), y.options()));
  const float *yp = y.const_data_ptr<float>(), *ws = window_sums.const_data_ptr<float>();
  const float *wf = window_factor.const_data_ptr<float>(), *sh = shift ? shift->const_data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, y.size(0) * spans, std::max<int64_t>(1, (1 << 15) / (kSpan * std::max<int64_t>(c, 1))),
                   [&](int64_t t0, int64_t t1) {
    alignas(64) float flipped[kTile * kTile];  // [channel][pixel]
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t image = t / spans, q0 = (t % spans) * kSpan, q1 = std::min(q0 + kSpan, hw);
      const float* yi = yp + image * hw * c;
      float* oi = op + image * c * hw;
      for (int64_t c0 = 0; c0 < c; c0 += kTile) {
        const int cn = int(std::min(kTile, c - c0));
        for (int64_t q = q0; q < q1; q += kTile) {
          const int qn = int(std::min(kTile, q1 - q));
          at::vec::transpose_mxn<float>(yi + q * c + c0, c, flipped, kTile, qn, cn);
          const Vec sums = Vec::loadu(ws + image * hw + q, qn);
          for (int j = 0; j < cn; ++j) {
            Vec v = Vec::loadu(flipped + j * kTile, qn) + Vec(wf[c0 + j]) * sums;
            if (sh) v = v + Vec::loadu(sh + (c0 + j) * hw + q, qn);
            v.store(oi + (c0 + j) * hw + q, qn);
          }
        }
      }
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace mixedprec
