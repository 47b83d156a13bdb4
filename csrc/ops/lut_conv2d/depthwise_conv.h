// Depthwise convolutions (one input and one output channel per group: MobileNet's, EfficientNet's,
// ConvNeXt's 3x3..7x7 layers) for lut_conv2d's CPU kernel, convolved directly from the decoded
// (C, kh * kw) weight. Each output is a handful of taps, so the work is one pass over x; through
// ATen's convolution (oneDNN) the call itself cost more than that pass, and NCHW layers whose
// channels are not a multiple of 16 ran several times slower (docs/kernels.md).
//
// Each output is bias + its taps in (kh, kw) order, one fused multiply-add each, in both layouts
// (so NCHW and channels-last give the same values). Taps over the padding add nothing: skipped,
// or w * 0 from the NCHW path's zero-padded rows. Pruned weights are +0 and still multiply x, so
// a NaN or inf in x reaches the outputs the reference's does.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/vec_ops.h"
#include "mixedprec/conv2d.h"

namespace mixedprec {

inline bool depthwise_conv_applies(const Conv2dGeometry& g) {
  return g.groups == g.in_channels && g.groups == g.out_channels;
}

namespace depthwise {

// Work per parallel task (taps times outputs): a smaller layer runs on one thread, where a
// parallel region costs more than its pass.
constexpr int64_t kTaskWork = 1 << 15;
constexpr int64_t kLanes = Vec::size();

// A column of taps kw: iw = ow * stride_w + off, inside x for the outputs ow in [lo, hi).
// Computed once per call (a division per tap and row cost more than small planes' arithmetic).
struct Column {
  int64_t off, lo, hi;
};

inline std::vector<Column> columns(const Conv2dGeometry& g) {
  std::vector<Column> out;
  for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
    const int64_t off = kw * g.dil_w - g.pad_w;
    out.push_back({off, off >= 0 ? 0 : ceil_div(-off, g.stride_w),
                   off >= g.width ? 0 : std::min(g.out_width, (g.width - 1 - off) / g.stride_w + 1)});
  }
  return out;
}

// NCHW planes are convolved from a zero-padded copy (each thread keeps its own), so that every
// tap reads whole vectors and each output vector's sums stay in registers over all taps: adding
// each tap's run into the output row in memory instead stalled on masked stores read back at once
// (4x slower on MobileNetV2's 7x7 planes).
struct PaddedPlane {
  int64_t row;  // floats per row
  std::vector<float> data;

  // x's row after pad_w zeros, and room for what the last vector of outputs (the row rounded up to
  // whole vectors) reads: up to two vectors at its stride past its first input
  explicit PaddedPlane(const Conv2dGeometry& g)
      : row(std::max(g.pad_w + g.width,
                     ceil_div(g.out_width, kLanes) * kLanes * g.stride_w + (g.kernel_w - 1) * g.dil_w + 2 * kLanes)),
        data(g.height * row, 0.0f) {}

  void fill(const float* x, const Conv2dGeometry& g) {
    for (int64_t ih = 0; ih < g.height; ++ih)
      std::copy(x + ih * g.width, x + (ih + 1) * g.width, data.data() + ih * row + g.pad_w);
  }
};

// Outputs [ow0, ow0 + (V - 1) * kLanes + last) of row oh: V vectors of sums in registers (V and
// the stride S are constants, or S = 0: any stride, read lane by lane), the last vector stored to
// `last` lanes. Stride 2 reads two vectors and keeps their even lanes.
template <int V, int S>
inline void row_block(const PaddedPlane& x, const float* w, float bias, float* y_row, int64_t oh, int64_t ow0,
                      int64_t last, const Conv2dGeometry& g) {
  const int64_t stride = S ? S : g.stride_w;
  Vec acc[V];
  for (int v = 0; v < V; ++v) acc[v] = Vec(bias);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h;
    if (ih < 0 || ih >= g.height) continue;
    const float* in_row = x.data.data() + ih * x.row + ow0 * stride;
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const Vec tap(w[kh * g.kernel_w + kw]);
      const float* in = in_row + kw * g.dil_w;
      for (int v = 0; v < V; ++v) {
        const float* src = in + v * kLanes * stride;
        if constexpr (S == 1) {
          acc[v] = at::vec::fmadd(tap, Vec::loadu(src), acc[v]);
        } else if constexpr (S == 2) {
          acc[v] = at::vec::fmadd(tap, at::vec::deinterleave2(Vec::loadu(src), Vec::loadu(src + kLanes)).first, acc[v]);
        } else {
          alignas(64) float lanes[kLanes];
          for (int64_t i = 0; i < kLanes; ++i) lanes[i] = src[i * stride];
          acc[v] = at::vec::fmadd(tap, Vec::loadu(lanes), acc[v]);
        }
      }
    }
  }
  for (int v = 0; v < V; ++v) acc[v].store(y_row + ow0 + v * kLanes, v == V - 1 ? last : kLanes);
}

// One output row in blocks of four vectors, then the rest.
template <int S>
inline void row(const PaddedPlane& x, const float* w, float bias, float* y_row, int64_t oh, const Conv2dGeometry& g) {
  constexpr int64_t kBlock = 4 * kLanes;
  int64_t ow0 = 0;
  for (; ow0 + kBlock <= g.out_width; ow0 += kBlock) row_block<4, S>(x, w, bias, y_row, oh, ow0, kLanes, g);
  const int64_t rest = g.out_width - ow0;
  if (rest == 0) return;
  const int64_t vectors = ceil_div(rest, kLanes), last = rest - (vectors - 1) * kLanes;
  switch (vectors) {
    case 1: row_block<1, S>(x, w, bias, y_row, oh, ow0, last, g); break;
    case 2: row_block<2, S>(x, w, bias, y_row, oh, ow0, last, g); break;
    case 3: row_block<3, S>(x, w, bias, y_row, oh, ow0, last, g); break;
    default: row_block<4, S>(x, w, bias, y_row, oh, ow0, last, g); break;
  }
}

// NCHW: the plane y[n, c] from x (its padded copy) and the channel's taps w (kh * kw).
inline void plane(const PaddedPlane& x, const float* w, float bias, float* y, const Conv2dGeometry& g) {
  for (int64_t oh = 0; oh < g.out_height; ++oh) {
    float* y_row = y + oh * g.out_width;
    if (g.stride_w == 1) row<1>(x, w, bias, y_row, oh, g);
    else if (g.stride_w == 2) row<2>(x, w, bias, y_row, oh, g);
    else row<0>(x, w, bias, y_row, oh, g);
  }
}

// Channels-last: channels [c0, c0 + (V - 1) * kLanes + last) of the output pixel (oh, ow), from
// x's pixels of one image and the taps laid out (kh * kw, C): V vectors of sums held in registers
// (V is a constant), the last one masked to `last` lanes.
template <int V>
inline void pixel_block(const float* x_image, const float* w_taps, const float* bias, float* out, int64_t c0,
                        int64_t last, int64_t oh, int64_t ow, const Conv2dGeometry& g,
                        const std::vector<Column>& cols) {
  const int64_t channels = g.out_channels;
  const auto lanes = [&](int v) { return v == V - 1 ? last : kLanes; };
  Vec acc[V];
  for (int v = 0; v < V; ++v) acc[v] = bias ? Vec::loadu(bias + c0 + v * kLanes, lanes(v)) : Vec(0.0f);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h;
    if (ih < 0 || ih >= g.height) continue;
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const Column& col = cols[kw];
      if (ow < col.lo || ow >= col.hi) continue;
      const float* in = x_image + (ih * g.width + ow * g.stride_w + col.off) * channels + c0;
      const float* tap = w_taps + (kh * g.kernel_w + kw) * channels + c0;
      for (int v = 0; v < V; ++v)
        acc[v] = at::vec::fmadd(Vec::loadu(tap + v * kLanes, lanes(v)), Vec::loadu(in + v * kLanes, lanes(v)), acc[v]);
    }
  }
  for (int v = 0; v < V; ++v) acc[v].store(out + c0 + v * kLanes, lanes(v));
}

// The output pixel (oh, ow): four vectors of channels at a time, then the rest.
inline void pixel(const float* x_image, const float* w_taps, const float* bias, float* out, int64_t oh, int64_t ow,
                  const Conv2dGeometry& g, const std::vector<Column>& cols) {
  int64_t c0 = 0;
  for (; c0 + 4 * kLanes <= g.out_channels; c0 += 4 * kLanes)
    pixel_block<4>(x_image, w_taps, bias, out, c0, kLanes, oh, ow, g, cols);
  const int64_t rest = g.out_channels - c0;
  if (rest == 0) return;
  const int64_t vectors = ceil_div(rest, kLanes), last = rest - (vectors - 1) * kLanes;
  switch (vectors) {
    case 1: pixel_block<1>(x_image, w_taps, bias, out, c0, last, oh, ow, g, cols); break;
    case 2: pixel_block<2>(x_image, w_taps, bias, out, c0, last, oh, ow, g, cols); break;
    case 3: pixel_block<3>(x_image, w_taps, bias, out, c0, last, oh, ow, g, cols); break;
    default: pixel_block<4>(x_image, w_taps, bias, out, c0, last, oh, ow, g, cols); break;
  }
}

// Channels-last, kPixels pixels [ow0, ow0 + kPixels) of row oh whose taps all lie inside x's
// columns: each vector of channels at a time, each tap's weights loaded once for all the pixels.
// K > 0: rows of K taps at stride 1 without dilation, whose kPixels + K - 1 inputs are loaded once
// and shared by the taps that read them (3x3: 10 loads for 24 multiply-adds, not 24; 1.0-1.4x on
// MobileNetV2's stride-1 channels-last layers, one thread; at stride 2 the 17 inputs held at once
// made 72 x 112 x 112 1.6x slower, so other rows take K = 0: any stride and dilation).
constexpr int kPixels = 8;

template <int K>
inline void interior_block(const float* x_image, const float* w_taps, const float* bias, float* out_row, int64_t oh,
                           int64_t ow0, const Conv2dGeometry& g) {
  const int64_t channels = g.out_channels, step = g.stride_w * channels;
  for (int64_t c0 = 0; c0 < channels; c0 += kLanes) {
    const int64_t n = std::min(kLanes, channels - c0);
    const Vec b = bias ? Vec::loadu(bias + c0, n) : Vec(0.0f);
    Vec acc[kPixels];
    for (int p = 0; p < kPixels; ++p) acc[p] = b;
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h;
      if (ih < 0 || ih >= g.height) continue;
      const float* in = x_image + (ih * g.width + ow0 * g.stride_w - g.pad_w) * channels + c0;
      const float* taps = w_taps + kh * g.kernel_w * channels + c0;
      if constexpr (K > 0) {
        Vec inputs[kPixels + K - 1];
        for (int i = 0; i < kPixels + K - 1; ++i) inputs[i] = Vec::loadu(in + i * channels, n);
        for (int kw = 0; kw < K; ++kw) {
          const Vec tap = Vec::loadu(taps + kw * channels, n);
          for (int p = 0; p < kPixels; ++p) acc[p] = at::vec::fmadd(tap, inputs[p + kw], acc[p]);
        }
      } else {
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const Vec tap = Vec::loadu(taps + kw * channels, n);
          const float* src = in + kw * g.dil_w * channels;
          for (int p = 0; p < kPixels; ++p) acc[p] = at::vec::fmadd(tap, Vec::loadu(src + p * step, n), acc[p]);
        }
      }
    }
    for (int p = 0; p < kPixels; ++p) acc[p].store(out_row + (ow0 + p) * channels + c0, n);
  }
}

inline void interior(const float* x_image, const float* w_taps, const float* bias, float* out_row, int64_t oh,
                     int64_t ow0, const Conv2dGeometry& g) {
  const bool stride1 = g.stride_w == 1 && g.dil_w == 1;
  if (stride1 && g.kernel_w == 3) return interior_block<3>(x_image, w_taps, bias, out_row, oh, ow0, g);
  if (stride1 && g.kernel_w == 5) return interior_block<5>(x_image, w_taps, bias, out_row, oh, ow0, g);
  interior_block<0>(x_image, w_taps, bias, out_row, oh, ow0, g);
}

}  // namespace depthwise

// y (N, C, H_out, W_out) in x's layout from x (N, C, H, W: NCHW, or channels-last when
// channels_last), the decoded weight w (C, kh * kw; scale applied) and bias (C, or nullptr).
inline void depthwise_conv(const float* x, const float* w, const float* bias, float* y, const Conv2dGeometry& g,
                           bool channels_last) {
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t in_plane = g.height * g.width, out_plane = g.out_pixels();
  const std::vector<depthwise::Column> cols = depthwise::columns(g);
  if (!channels_last) {
    const int64_t grain = std::max<int64_t>(1, depthwise::kTaskWork / std::max<int64_t>(1, taps * out_plane));
    at::parallel_for(0, g.batch * g.out_channels, grain, [&](int64_t p0, int64_t p1) {
      depthwise::PaddedPlane padded(g);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % g.out_channels;
        padded.fill(x + p * in_plane, g);
        depthwise::plane(padded, w + c * taps, bias ? bias[c] : 0.0f, y + p * out_plane, g);
      }
    });
    return;
  }
  std::vector<float> w_taps(taps * g.out_channels);  // (kh * kw, C): a pixel's channels side by side
  for (int64_t c = 0; c < g.out_channels; ++c)
    for (int64_t t = 0; t < taps; ++t) w_taps[t * g.out_channels + c] = w[c * taps + t];
  // the outputs whose taps all lie inside x's columns
  int64_t inside_lo = 0, inside_hi = g.out_width;
  for (const depthwise::Column& col : cols) {
    inside_lo = std::max(inside_lo, col.lo);
    inside_hi = std::min(inside_hi, col.hi);
  }
  const int64_t row_work = std::max<int64_t>(1, taps * g.out_width * g.out_channels);
  at::parallel_for(0, g.batch * g.out_height, std::max<int64_t>(1, depthwise::kTaskWork / row_work),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.out_height, oh = r % g.out_height;
      const float* x_image = x + n * in_plane * g.in_channels;
      float* out = y + r * g.out_width * g.out_channels;
      for (int64_t ow = 0; ow < g.out_width; ++ow) {
        if (ow >= inside_lo && ow + depthwise::kPixels <= inside_hi) {
          depthwise::interior(x_image, w_taps.data(), bias, out, oh, ow, g);
          ow += depthwise::kPixels - 1;
        } else {
          depthwise::pixel(x_image, w_taps.data(), bias, out + ow * g.out_channels, oh, ow, g, cols);
        }
      }
    }
  });
}

}  // namespace mixedprec
