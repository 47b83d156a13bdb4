// lut_conv2d on the CPU: implicit GEMM through the codebook (weight math: include/mixedprec/lut_weight.h).
//
// Forward, per group g:   Y_g (C_out/G x P) = W_g (C_out/G x R) . X_g (R x P)
//   R = C_in/G kh kw (the GEMM depth), P = N OH OW output pixels flattened over the batch,
//   X_g[(ci, kh, kw), (n, oh, ow)] = x[n, g C_in/G + ci, oh s - p + kh d, ow s - p + kw d] (0 outside).
// A task owns a block of output channels and a range of pixels. It decodes its channels' weights
// once into a float tile (at most kTileFloats, laid out as kMR-row panels), then for every
// kBlockN-pixel block and kDepth-deep slice of R gathers just that slice of X_g (bounded scratch,
// never the full im2col) and runs a kMR x (kNV vectors) register-blocked FMA micro-kernel.
// Traffic: codes (bits/8 B per weight) once per task; x once per channel block (4 B/elem, hot in
// L2 for the later blocks); y written once.
//
// Backward:  grad_x = col2im(W_g^T . grad_Y_g). A task owns a block of input channels and a
// range of images, so the col2im scatter-adds of different tasks never overlap: it decodes
// W_g[:, its rows of R] once, then per kBlockN-pixel block multiplies with grad_y and adds the
// result into grad_x through the same row-segment geometry the forward gathers with.
// Inputs in float16/bfloat16 are widened to float32 first; results are rounded back.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../lut_conv2d_args.h"
#include "vec_ops.h"

namespace mixedprec {
namespace {

constexpr int64_t kMR = 4;                      // weight rows per micro-kernel
constexpr int64_t kNV = 2;                      // vectors of pixels per micro-kernel
constexpr int64_t kNR = kNV * Vec::size();      // pixels per micro-kernel
constexpr int64_t kBlockN = 8 * kNR;            // pixels per block (the gathered slice's width)
constexpr int64_t kDepth = 256;                 // depth of a gathered slice
constexpr int64_t kTileFloats = 96 * 1024;      // decoded weights per task (384 KB)
constexpr int64_t kMaxBlockM = 128;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// c[m][j] += sum_k a[k kMR + m] b[k ldb + j]   for m < kMR, j < kNR; c has row stride ldc.
inline void micro_kernel(const float* a, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  Vec acc[kMR][kNV];
  for (int64_t m = 0; m < kMR; ++m)
    for (int64_t v = 0; v < kNV; ++v) acc[m][v] = Vec::loadu(c + m * ldc + v * Vec::size());
  for (int64_t k = 0; k < depth; ++k, a += kMR, b += ldb) {
    Vec bv[kNV];
    for (int64_t v = 0; v < kNV; ++v) bv[v] = Vec::loadu(b + v * Vec::size());
    for (int64_t m = 0; m < kMR; ++m) {
      const Vec av(a[m]);
      for (int64_t v = 0; v < kNV; ++v) acc[m][v] = at::vec::fmadd(av, bv[v], acc[m][v]);
    }
  }
  for (int64_t m = 0; m < kMR; ++m)
    for (int64_t v = 0; v < kNV; ++v) acc[m][v].store(c + m * ldc + v * Vec::size());
}

// C (rows x width) += A[:, k0 : k0 + depth] . B (depth x width, row stride width).
// A is stored as kMR-row panels: A[i][k] at panels[(i / kMR) panel_stride + k kMR + i % kMR].
void gemm_slice(const float* panels, int64_t panel_stride, int64_t k0, int64_t depth, const float* b, int64_t rows,
                int64_t width, float* c) {
  for (int64_t p = 0; p < rows / kMR; ++p)
    for (int64_t j = 0; j < width; j += kNR)
      micro_kernel(panels + p * panel_stride + k0 * kMR, b + j, width, depth, c + p * kMR * width + j, width);
}

// A run of consecutive output pixels in one output row (n, oh): block columns j0 .. j0 + len.
struct RowSegment {
  int64_t j0, len, n, oh, ow0;
};

std::vector<RowSegment> row_segments(const Conv2dGeometry& g, int64_t p0, int64_t count) {
  std::vector<RowSegment> segs;
  for (int64_t j = 0; j < count;) {
    const int64_t p = p0 + j, n = p / g.out_pixels(), oh = p % g.out_pixels() / g.out_width, ow = p % g.out_width;
    const int64_t len = std::min(g.out_width - ow, count - j);
    segs.push_back({j, len, n, oh, ow});
    j += len;
  }
  return segs;
}

// The input columns iw = iw0 + t stride (t < len) that lie in [0, width): t in [lo, hi).
inline void valid_range(int64_t iw0, int64_t stride, int64_t len, int64_t width, int64_t& lo, int64_t& hi) {
  lo = iw0 >= 0 ? 0 : ceil_div(-iw0, stride);
  hi = iw0 >= width ? 0 : std::min(len, (width - 1 - iw0) / stride + 1);
  hi = std::max(hi, lo);
}

// Calls fn(r, seg, input_row_offset or -1, lo, hi, iw_first) for every depth row r = (ci, kh, kw)
// in [r0, r1) and segment: where the segment's pixels read x (forward) or add into grad_x (backward).
template <class Fn>
void for_each_row_segment(const Conv2dGeometry& g, int64_t n_channel_base, int64_t r0, int64_t r1,
                          const std::vector<RowSegment>& segs, const Fn& fn) {
  const int64_t khkw = g.kernel_h * g.kernel_w;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t ci = r / khkw, kh = r % khkw / g.kernel_w, kw = r % g.kernel_w;
    for (const RowSegment& s : segs) {
      const int64_t ih = s.oh * g.stride_h - g.pad_h + kh * g.dil_h;
      const int64_t iw0 = s.ow0 * g.stride_w - g.pad_w + kw * g.dil_w;
      int64_t lo = 0, hi = 0;
      if (ih >= 0 && ih < g.height) valid_range(iw0, g.stride_w, s.len, g.width, lo, hi);
      const int64_t row = ((s.n * g.in_channels + n_channel_base + ci) * g.height + ih) * g.width;
      fn(r, s, row, lo, hi, iw0);
    }
  }
}

// b[(r - r0) width + j] = X_g[r, p0 + j] for r in [r0, r1); columns past the segments stay 0.
void gather_slice(const float* x, const Conv2dGeometry& g, int64_t channel_base, int64_t r0, int64_t r1,
                  const std::vector<RowSegment>& segs, int64_t width, float* b) {
  std::fill(b, b + (r1 - r0) * width, 0.0f);
  for_each_row_segment(g, channel_base, r0, r1, segs,
                       [&](int64_t r, const RowSegment& s, int64_t row, int64_t lo, int64_t hi, int64_t iw0) {
                         float* dst = b + (r - r0) * width + s.j0;
                         const float* src = x + row + iw0;
                         if (g.stride_w == 1) {
                           if (hi > lo) std::memcpy(dst + lo, src + lo, sizeof(float) * (hi - lo));
                         } else {
                           for (int64_t t = lo; t < hi; ++t) dst[t] = src[t * g.stride_w];
                         }
                       });
}

std::vector<float> widened_codebook(const LutWeight& w) {
  std::vector<float> levels(size_t(1) << w.bits);
  for (size_t i = 0; i < levels.size(); ++i) levels[i] = to_float(w.codebook[i]);
  return levels;
}

void forward(const float* x, const float* bias, float* y, const LutWeight& w, const Conv2dGeometry& g) {
  const std::vector<float> levels = widened_codebook(w);
  const int64_t R = g.row_length(), cout_g = g.group_out(), pixels = g.batch * g.out_pixels();
  const int64_t block_m = std::clamp(kTileFloats / R / kMR * kMR, kMR, std::min(kMaxBlockM, round_up(cout_g, kMR)));
  const int64_t channel_blocks = ceil_div(cout_g, block_m), pixel_blocks = ceil_div(pixels, kBlockN);
  const int64_t ranges = std::clamp(ceil_div(4 * at::get_num_threads(), g.groups * channel_blocks), int64_t(1), pixel_blocks);
  at::parallel_for(0, g.groups * channel_blocks * ranges, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> panels(block_m * R), slice(kDepth * kBlockN), acc(block_m * kBlockN);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t group = task / (channel_blocks * ranges), cb = task / ranges % channel_blocks, rg = task % ranges;
      const int64_t co0 = group * cout_g + cb * block_m, rows = std::min(block_m, cout_g - cb * block_m);
      const int64_t rows_padded = round_up(rows, kMR);
      for (int64_t i = 0; i < rows_padded; ++i) {
        float* dst = panels.data() + i / kMR * R * kMR + i % kMR;
        if (i < rows) decode_run(w, levels.data(), co0 + i, (co0 + i) * R, (co0 + i + 1) * R, dst, kMR);
        else for (int64_t k = 0; k < R; ++k) dst[k * kMR] = 0.0f;
      }
      for (int64_t pb = rg * pixel_blocks / ranges; pb < (rg + 1) * pixel_blocks / ranges; ++pb) {
        const int64_t p0 = pb * kBlockN, count = std::min(kBlockN, pixels - p0), width = round_up(count, kNR);
        const std::vector<RowSegment> segs = row_segments(g, p0, count);
        std::fill(acc.begin(), acc.begin() + rows_padded * width, 0.0f);
        for (int64_t k0 = 0; k0 < R; k0 += kDepth) {
          const int64_t depth = std::min(kDepth, R - k0);
          gather_slice(x, g, group * g.group_in(), k0, k0 + depth, segs, width, slice.data());
          gemm_slice(panels.data(), R * kMR, k0, depth, slice.data(), rows_padded, width, acc.data());
        }
        for (int64_t i = 0; i < rows; ++i) {
          const float b = bias ? bias[co0 + i] : 0.0f;
          for (const RowSegment& s : segs) {
            float* dst = y + (s.n * g.out_channels + co0 + i) * g.out_pixels() + s.oh * g.out_width + s.ow0;
            const float* src = acc.data() + i * width + s.j0;
            for (int64_t t = 0; t < s.len; ++t) dst[t] = src[t] + b;
          }
        }
      }
    }
  });
}

// grad_x (zeroed by the caller) += col2im(W_g^T . grad_y_g).
void backward(const float* grad_y, float* grad_x, const LutWeight& w, const Conv2dGeometry& g) {
  const std::vector<float> levels = widened_codebook(w);
  const int64_t R = g.row_length(), khkw = g.kernel_h * g.kernel_w, cout_g = g.group_out(), cin_g = g.group_in();
  const int64_t by_tile = std::max<int64_t>(1, kTileFloats / (khkw * cout_g));
  const int64_t by_tasks = ceil_div(cin_g, ceil_div(4 * at::get_num_threads(), g.groups));
  const int64_t block_c = std::clamp(std::min(by_tile, by_tasks), int64_t(1), cin_g);
  const int64_t channel_blocks = ceil_div(cin_g, block_c);
  const int64_t ranges = std::clamp(ceil_div(4 * at::get_num_threads(), g.groups * channel_blocks), int64_t(1), g.batch);
  at::parallel_for(0, g.groups * channel_blocks * ranges, 1, [&](int64_t t0, int64_t t1) {
    const int64_t max_rows = round_up(block_c * khkw, kMR);
    std::vector<float> panels(max_rows * cout_g), row(block_c * khkw), slice(kDepth * kBlockN), acc(max_rows * kBlockN);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t group = task / (channel_blocks * ranges), cb = task / ranges % channel_blocks, rg = task % ranges;
      const int64_t r0 = cb * block_c * khkw, r1 = std::min(R, r0 + block_c * khkw);
      const int64_t rows = r1 - r0, rows_padded = round_up(rows, kMR);
      std::fill(panels.begin(), panels.end(), 0.0f);
      for (int64_t co = 0; co < cout_g; ++co) {  // panels[(i / kMR) cout_g kMR + co kMR + i % kMR] = W[co, r0 + i]
        const int64_t c = group * cout_g + co;
        decode_run(w, levels.data(), c, c * R + r0, c * R + r1, row.data(), 1);
        for (int64_t i = 0; i < rows; ++i) panels[i / kMR * cout_g * kMR + co * kMR + i % kMR] = row[i];
      }
      for (int64_t n = rg * g.batch / ranges; n < (rg + 1) * g.batch / ranges; ++n)
        for (int64_t p0 = n * g.out_pixels(); p0 < (n + 1) * g.out_pixels(); p0 += kBlockN) {
          const int64_t count = std::min(kBlockN, (n + 1) * g.out_pixels() - p0), width = round_up(count, kNR);
          const std::vector<RowSegment> segs = row_segments(g, p0, count);
          std::fill(acc.begin(), acc.begin() + rows_padded * width, 0.0f);
          for (int64_t k0 = 0; k0 < cout_g; k0 += kDepth) {
            const int64_t depth = std::min(kDepth, cout_g - k0);
            std::fill(slice.begin(), slice.begin() + depth * width, 0.0f);
            for (int64_t k = 0; k < depth; ++k)
              std::memcpy(slice.data() + k * width,
                          grad_y + (n * g.out_channels + group * cout_g + k0 + k) * g.out_pixels() + (p0 - n * g.out_pixels()),
                          sizeof(float) * count);
            gemm_slice(panels.data(), cout_g * kMR, k0, depth, slice.data(), rows_padded, width, acc.data());
          }
          for_each_row_segment(g, group * cin_g, r0, r1, segs,
                               [&](int64_t r, const RowSegment& s, int64_t row_offset, int64_t lo, int64_t hi, int64_t iw0) {
                                 float* dst = grad_x + row_offset + iw0;
                                 const float* src = acc.data() + (r - r0) * width + s.j0;
                                 for (int64_t t = lo; t < hi; ++t) dst[t * g.stride_w] += src[t];
                               });
        }
    }
  });
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
  const at::Tensor x_f = x.to(at::kFloat).contiguous();
  at::Tensor y = poisoned(at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, x_f.options()));
  if (y.numel() > 0)
    forward(x_f.data_ptr<float>(), bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, y.data_ptr<float>(),
          a.weight(), g);
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
  at::Tensor grad_x = at::zeros(input_shape, grad_y_f.options());
  if (grad_x.numel() > 0 && grad_y_f.numel() > 0)
    backward(grad_y_f.data_ptr<float>(), grad_x.data_ptr<float>(), a.weight(), g);
  return grad_x.to(grad_y.scalar_type());
}

}  // namespace
}  // namespace mixedprec

TORCH_LIBRARY_IMPL(mixedprec, CPU, m) {
  m.impl("lut_conv2d_fwd", &mixedprec::lut_conv2d_fwd);
  m.impl("lut_conv2d_bwd", &mixedprec::lut_conv2d_bwd);
}
