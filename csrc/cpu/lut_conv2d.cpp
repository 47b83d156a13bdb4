// lut_conv2d on the CPU: the weight is decoded through the codebook one tile of output channels
// at a time, and each tile runs through oneDNN (the platform's tuned convolution; a hand-written
// implicit GEMM here reached 18-45% of its speed). What this kernel adds is the decode: AVX-512
// codebook lookups (code_decode.h) turning bits/8 B per weight into the float tile.
// Forward: the tile is decoded straight into the blocked layout oneDNN's channels-last
// convolution expects (onednn_weight.h), sparing the reorder ATen's conv2d makes of a plain weight
// on every call; where that path is not available (onednn_weight.h says when), into a plain OIHW
// tile run through ATen's float32 convolution.
// Scratch: one tile of at most kTileFloats floats (4.7 MB), whatever the layer's size. A layer
// whose float weight fits is decoded whole into it, transiently (the packed weight is what stays
// resident): splitting a convolution into more calls than the scratch needs cost 10-40% at
// batch 1 here.
//
// Forward: y[:, tile] = conv(x[:, tile's groups], W[tile]) (+ bias[tile]), in x's memory format.
// Backward: grad_x = sum over tiles of conv_transpose(grad_y[:, tile], W[tile]) (tiles of whole
// groups write disjoint channels of grad_x; with one group the tiles add up, in tile order).
// Inputs in float16/bfloat16 are widened to float32 first; results are rounded back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../lut_conv2d_args.h"
#include "code_decode.h"
#include "onednn_weight.h"

namespace mixedprec {
namespace {

// Decoded weights per tile (4.7 MB): 256 output channels of a 512-channel 3x3 convolution.
constexpr int64_t kTileFloats = 256 * 512 * 9;
constexpr int64_t kChannelUnit = 16;  // channels per tile step when groups == 1

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output-channel tiles: whole groups each (kChannelUnit channels when groups == 1), as many as
// fit kTileFloats, balanced.
struct Tiles {
  int64_t channels, unit, units, per_tile, count;
  explicit Tiles(const Conv2dGeometry& g) : channels(g.out_channels) {
    unit = g.groups > 1 ? g.group_out() : std::min(kChannelUnit, g.out_channels);
    units = ceil_div(g.out_channels, unit);
    const int64_t fit = std::max<int64_t>(1, kTileFloats / (unit * g.row_length()));
    count = ceil_div(units, fit);
    per_tile = ceil_div(units, count);
  }
  int64_t first_channel(int64_t t) const { return std::min(t * per_tile * unit, channels); }
};

#if defined(MP_DECODE_AVX512)
// dst[tap[i]] = column i of the 16x16 block at `src` (rows `stride` floats apart): the block's 16
// rows (output channels) land as one vector per tap.
inline void transpose16_store(const float* src, int64_t stride, float* dst, const int64_t* tap) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * stride);
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane L: rows i, i+1 at columns 4L .. 4L + 3
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  const auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
  for (int i = 0; i < 16; i += 4) {  // r[i + m], lane L: rows i .. i + 3 at column 4L + m
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i]), pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i]), pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i + 1]), pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i + 1]), pd(t[i + 3])));
  }
  for (int m = 0; m < 4; ++m) {  // column 4L + m: lane L of r[m], r[4 + m], r[8 + m], r[12 + m]
    const __m512 lo01 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44), hi01 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xee);
    const __m512 lo23 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44), hi23 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xee);
    _mm512_storeu_ps(dst + tap[m], _mm512_shuffle_f32x4(lo01, lo23, 0x88));
    _mm512_storeu_ps(dst + tap[4 + m], _mm512_shuffle_f32x4(lo01, lo23, 0xdd));
    _mm512_storeu_ps(dst + tap[8 + m], _mm512_shuffle_f32x4(hi01, hi23, 0x88));
    _mm512_storeu_ps(dst + tap[12 + m], _mm512_shuffle_f32x4(hi01, hi23, 0xdd));
  }
}
#endif

#if defined(MP_DECODE_AVX512) && defined(__AVX512VBMI__)
#define MP_COLUMN_DECODE 1
// W[o0 .. o0 + 15, k] for k = 0 .. count - 1 (count a multiple of 16), one vector of 16 output
// channels per tap, stored at dst[tap[k]]: 16 rows of dense byte-aligned kBits codes (row r's
// codes from byte rows + r * row_bytes), looked up in the unscaled codebook register `lut` and
// times the rows' scales (one rounding, as mul_rn). The codes are transposed, not the floats:
// per 16x16 block two gathers bring the 16 rows' code bytes, then one byte permute per tap lines
// up its 16 codes (vpermps reads the low 4 bits of each lane, so nothing needs masking).
template <int kBits>
void decode_columns(const uint8_t* rows, int64_t row_bytes, int64_t count, __m512 lut, __m512 scale, float* dst,
                    const int64_t* tap) {
  static_assert(kBits == 4 || kBits == 2);
  constexpr int kBytes = 2 * kBits;                 // per row and block
  constexpr int kPerByte = 8 / kBits;               // codes per byte
  alignas(64) uint8_t select[kBytes][64] = {};      // block byte b of row r into lane r
  for (int b = 0; b < kBytes; ++b)
    for (int r = 0; r < 16; ++r) select[b][4 * r] = uint8_t(r * kBytes + b);
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(int(row_bytes)));
  for (int64_t k0 = 0; k0 < count; k0 += 16, rows += kBytes, tap += 16) {
    // shifted[s]: the block with each byte's code s in its low bits (4-bit: rows 0-7 here and
    // rows 8-15 in shifted_hi; 2-bit: all 16 rows)
    __m512i shifted[kPerByte], shifted_hi[kPerByte];
    if constexpr (kBits == 4) {
      const __m512i lo = _mm512_i32gather_epi64(_mm512_castsi512_si256(offsets), rows, 1);
      const __m512i hi = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(offsets, 1), rows, 1);
      shifted[0] = lo, shifted[1] = _mm512_srli_epi64(lo, 4), shifted_hi[0] = hi, shifted_hi[1] = _mm512_srli_epi64(hi, 4);
    } else {
      const __m512i all = _mm512_i32gather_epi32(offsets, rows, 1);
      for (int s = 0; s < kPerByte; ++s) shifted[s] = _mm512_srli_epi32(all, s * kBits);
    }
    for (int b = 0; b < kBytes; ++b) {
      const __m512i pick = _mm512_load_si512(select[b]);
      for (int s = 0; s < kPerByte; ++s) {
        const __m512i codes = kBits == 4 ? _mm512_permutex2var_epi8(shifted[s], pick, shifted_hi[s])
                                         : _mm512_permutexvar_epi8(pick, shifted[s]);
        _mm512_storeu_ps(dst + tap[b * kPerByte + s], _mm512_mul_ps(_mm512_permutexvar_ps(codes, lut), scale));
      }
    }
  }
}
#endif

struct TileDecoder {
  const LutWeight w;
  const Conv2dGeometry& g;
  std::vector<float> codebook;  // widened to float32
  int64_t bitmap_bytes;
  bool simd;

  TileDecoder(const LutWeight& weight, const Conv2dGeometry& geometry)
      : w(weight), g(geometry), codebook(size_t(1) << weight.bits),
        bitmap_bytes((g.out_channels * g.row_length() + 7) / 8), simd(cpu_simd.load(std::memory_order_relaxed)) {
    for (size_t i = 0; i < codebook.size(); ++i) codebook[i] = to_float(w.codebook[i]);
  }

  // Row c of W (scale applied, 0 where pruned) into row[0, R). Its codes are looked up in the
  // codebook times the row's scale: scale * level rounded once, as mul_rn, with no pass over the
  // row for the scale. `levels`: R floats of room for a sparse row's kept levels.
  void decode_row(int64_t c, float* row, float* levels) const {
    const int64_t R = g.row_length();
    float scaled[256];
    for (size_t i = 0; i < codebook.size(); ++i) scaled[i] = mul_rn(w.channel_scale[c], codebook[i]);
    const int64_t f0 = c * R, first = kept_before(w, f0);
    if (!w.keep_bitmap) return decode_levels(w.codes, scaled, w.bits, first, R, row, simd);
    const int64_t count = count_kept(w.keep_bitmap, bitmap_bytes, f0, R);
    decode_levels(w.codes, scaled, w.bits, first, count, levels, simd);
    expand_kept(w.keep_bitmap, bitmap_bytes, f0, R, levels, row, simd);
  }

  // Channels [c0, c1) into tile (c1 - c0, C_in/G, kh, kw).
  void decode(int64_t c0, int64_t c1, float* tile) const {
    const int64_t R = g.row_length();
    at::parallel_for(c0, c1, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> levels(w.keep_bitmap ? R : 0);
      for (int64_t c = b0; c < b1; ++c) decode_row(c, tile + (c - c0) * R, levels.data());
    });
  }

  // Channels [c0, c1) into `dst` laid out as `layout` (a tile of c1 - c0 channels), 16 at a time:
  // decoded as rows, then stored a 16x16 block per step where the 16 channels sit side by side.
  void decode_blocked(int64_t c0, int64_t c1, const BlockedLayout& layout, float* dst) const {
    const int64_t R = g.row_length();
    if (layout.padded) std::fill_n(dst, layout.floats, 0.0f);
#if defined(MP_COLUMN_DECODE)
    // Dense 4-/2-bit rows that start on a byte go through decode_columns; the rest are decoded
    // as rows into a buffer, then transposed 16x16 floats at a time.
    const bool column_codes = simd && !w.keep_bitmap && (w.bits == 4 || w.bits == 2) && R * w.bits % 8 == 0;
    const __m512 lut = column_codes ? lut_register(codebook.data(), w.bits) : _mm512_setzero_ps();
#endif
    at::parallel_for(0, (c1 - c0 + 15) / 16, 1, [&](int64_t j0, int64_t j1) {
      thread_local std::vector<float> rows, levels;  // kept: 16 rows of a 512-channel 3x3 layer are 295 KB
      rows.resize(16 * R);
      levels.resize(w.keep_bitmap ? R : 0);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = std::min<int64_t>(16, c1 - c0 - 16 * j), o0 = c0 + 16 * j;
        float* const block = dst + layout.channel[16 * j];
#if defined(MP_COLUMN_DECODE)
        if (column_codes && n == 16 && layout.channels_run16[j]) {
          const int64_t row_bytes = R * w.bits / 8, columns = R / 16 * 16;
          (w.bits == 4 ? decode_columns<4> : decode_columns<2>)(w.codes + o0 * row_bytes, row_bytes, columns, lut,
                                                               _mm512_loadu_ps(w.channel_scale + o0), block, layout.tap.data());
          for (int64_t i = 0; i < 16; ++i)
            for (int64_t k = columns; k < R; ++k) block[i + layout.tap[k]] = weight_at(w, codebook.data(), o0 + i, (o0 + i) * R + k);
          continue;
        }
#endif
        for (int64_t i = 0; i < n; ++i) decode_row(o0 + i, rows.data() + i * R, levels.data());
        int64_t k = 0;
#if defined(MP_DECODE_AVX512)
        if (simd && n == 16 && layout.channels_run16[j])
          for (; k + 16 <= R; k += 16) transpose16_store(rows.data() + k, R, block, layout.tap.data() + k);
#endif
        for (int64_t i = 0; i < n; ++i)
          for (int64_t kk = k; kk < R; ++kk) dst[layout.channel[16 * j + i] + layout.tap[kk]] = rows[i * R + kk];
      }
    });
  }
};

// The decode scratch of the calling thread, at least `floats` long. It stays allocated between
// calls (at most one tile, kTileFloats plus oneDNN's block padding): a fresh allocation of that
// size page-faults on every call.
const at::Tensor& scratch(int64_t floats) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < floats) {
    buffer = at::Tensor();  // the old one is freed first
    buffer = at::empty({floats}, at::kFloat);
  }
  return buffer;
}

// The weight shape of channels [c0, c1).
std::array<int64_t, 4> tile_shape(const Conv2dGeometry& g, int64_t c0, int64_t c1) {
  return {c1 - c0, g.group_in(), g.kernel_h, g.kernel_w};
}

// The groups of channels [c0, c1) (whole groups when groups > 1).
int64_t tile_groups(const Conv2dGeometry& g, int64_t c0, int64_t c1) {
  return g.groups > 1 ? (c1 - c0) / g.group_out() : 1;
}

// The input channels that channels [c0, c1) read.
at::Tensor tile_input(const at::Tensor& x, const Conv2dGeometry& g, int64_t c0, int64_t c1) {
  return g.groups > 1 ? x.narrow(1, c0 / g.group_out() * g.group_in(), tile_groups(g, c0, c1) * g.group_in()) : x;
}

at::Tensor lut_conv2d_fwd(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                          const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap, int64_t bits,
                          at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "lut_conv2d_fwd";
  kernel_dtype(x, op, "x");
  const LutConv2dArgs a = check_lut_conv2d(op, x, x.sizes(), codes, codebook, channel_scale, keep_bitmap, bits,
                                           weight_shape, stride, padding, dilation, groups);
  const Conv2dGeometry& g = a.geometry;
  const at::Tensor bias_f = float_bias(op, bias, x, g);
  const at::Tensor x_f = x.to(at::kFloat);
  const Tiles tiles(g);
  const TileDecoder decoder(a.weight(), g);
  // oneDNN's channels-last convolution on a prepacked weight where x is channels-last already, or
  // where the weight outweighs the activations: the NCHW <-> NHWC transposes of x and y it then
  // needs cost less than its faster kernels and the weight reorder it spares (docs/kernels.md).
  // Otherwise, or if oneDNN declines a tile's layout, the plain path: OIHW tiles for conv2d.
  const at::MemoryFormat format = x.suggest_memory_format();  // the output's, as conv2d
  const bool prepack = format == at::MemoryFormat::ChannelsLast ||
                       g.out_channels * g.row_length() >= x.numel() + g.batch * g.out_channels * g.out_pixels();
  std::vector<std::shared_ptr<const BlockedLayout>> layouts(prepack ? tiles.count : 0);
  int64_t floats = tiles.per_tile * tiles.unit * g.row_length();
  for (int64_t t = 0; t < int64_t(layouts.size()); ++t) {
    const int64_t c0 = tiles.first_channel(t), c1 = tiles.first_channel(t + 1);
    if (c0 == c1) continue;
    layouts[t] = blocked_layout(tile_shape(g, c0, c1), tile_input(x_f, g, c0, c1).sizes(), stride, padding, dilation,
                                tile_groups(g, c0, c1));
    if (!layouts[t]) {
      layouts.clear();
      break;
    }
    floats = std::max(floats, layouts[t]->floats);
  }
  const at::Tensor& buffer = scratch(floats);
  const auto conv = [&](int64_t t, int64_t c0, int64_t c1) {
    const at::Tensor x_t = tile_input(x_f, g, c0, c1);
    const std::optional<at::Tensor> bias_t = bias_f.defined() ? std::optional(bias_f.narrow(0, c0, c1 - c0)) : std::nullopt;
    if (!layouts.empty()) {
      decoder.decode_blocked(c0, c1, *layouts[t], buffer.data_ptr<float>());
      return blocked_conv2d(x_t, buffer, *layouts[t], tile_shape(g, c0, c1), bias_t, stride, padding, dilation,
                            tile_groups(g, c0, c1));
    }
    decoder.decode(c0, c1, buffer.data_ptr<float>());
    const at::Tensor tile = buffer.narrow(0, 0, (c1 - c0) * g.row_length()).view(tile_shape(g, c0, c1));
    return at::convolution(x_t, tile, bias_t, stride, padding, dilation, false, {0, 0}, tile_groups(g, c0, c1));
  };
  if (tiles.count == 1) return conv(0, 0, g.out_channels).contiguous(format).to(x.scalar_type());
  at::Tensor y = poisoned(at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, x_f.options().memory_format(format)));
  for (int64_t t = 0; t < tiles.count; ++t) {
    const int64_t c0 = tiles.first_channel(t), c1 = tiles.first_channel(t + 1);
    if (c0 < c1) y.narrow(1, c0, c1 - c0).copy_(conv(t, c0, c1));
  }
  return y.to(x.scalar_type());
}

at::Tensor lut_conv2d_bwd(const at::Tensor& grad_y, const at::Tensor& codes, const at::Tensor& codebook,
                          const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap, int64_t bits,
                          at::IntArrayRef weight_shape, at::IntArrayRef input_shape, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "lut_conv2d_bwd";
  const LutConv2dArgs a = check_lut_conv2d(op, grad_y, input_shape, codes, codebook, channel_scale, keep_bitmap, bits,
                                           weight_shape, stride, padding, dilation, groups);
  const Conv2dGeometry& g = a.geometry;
  check_grad_y(op, grad_y, g);
  const at::Tensor grad_y_f = grad_y.to(at::kFloat).contiguous();
  if (g.batch == 0) return at::zeros(input_shape, grad_y.options());
  // The input rows past the last window (floor in the output size) come back as output padding.
  const int64_t output_padding[2] = {
      (g.height + 2 * g.pad_h - g.dil_h * (g.kernel_h - 1) - 1) % g.stride_h,
      (g.width + 2 * g.pad_w - g.dil_w * (g.kernel_w - 1) - 1) % g.stride_w};
  const Tiles tiles(g);
  const TileDecoder decoder(a.weight(), g);
  const at::Tensor& buffer = scratch(tiles.per_tile * tiles.unit * g.row_length());
  const auto conv_transpose = [&](int64_t c0, int64_t c1) {
    decoder.decode(c0, c1, buffer.data_ptr<float>());
    const at::Tensor tile = buffer.narrow(0, 0, (c1 - c0) * g.row_length()).view(tile_shape(g, c0, c1));
    return at::convolution(grad_y_f.narrow(1, c0, c1 - c0), tile, std::nullopt, stride, padding,
                           dilation, true, output_padding, tile_groups(g, c0, c1));
  };
  if (tiles.count == 1) return conv_transpose(0, g.out_channels).to(grad_y.scalar_type());
  at::Tensor grad_x = at::zeros(input_shape, grad_y_f.options());
  for (int64_t t = 0; t < tiles.count; ++t) {
    const int64_t c0 = tiles.first_channel(t), c1 = tiles.first_channel(t + 1);
    if (c0 == c1) continue;
    const at::Tensor part = conv_transpose(c0, c1);
    if (g.groups > 1) tile_input(grad_x, g, c0, c1).copy_(part);
    else grad_x.add_(part);
  }
  return grad_x.to(grad_y.scalar_type());
}

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CPU, m) {
  m.impl("lut_conv2d_fwd", &mixedprec::lut_conv2d_fwd);
  m.impl("lut_conv2d_bwd", &mixedprec::lut_conv2d_bwd);
}
