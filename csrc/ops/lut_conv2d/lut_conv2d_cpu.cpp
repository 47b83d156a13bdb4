// lut_conv2d on the CPU. 3x3, stride-1, single-group forwards (ResNet's bulk) go through
// Winograd F(2x2, 3x3) (winograd_conv3x3.h), which decodes the codes per block of output channels
// straight into its transformed weight and needs 2.25x fewer multiplies than a direct
// convolution: oneDNN's direct convolution runs near this CPU's peak, so that is what lets a
// kernel that decodes its weight on every call go faster than it. Everything else (and those
// convolutions when ops.set_cpu_winograd(false), or where x holds a NaN or inf) goes direct: the
// weight is decoded through the codebook one tile of output channels at a time, and each tile
// runs through ATen's float32 convolution (oneDNN where torch has it), or, for channels-last 1x1
// convolutions over few pixels and NCHW 1x1 convolutions at stride 1 (at batch 1, or over channel
// counts that are not multiples of 16), through ATen's sgemm, which writes each tile's channels of
// y in place (pointwise_gemm_applies, nchw_gemm_applies). Over fewer than 128 output pixels the
// GEMMs run in blocks of decoded rows, one thread each (RowBlocks), and large single-group layers
// there (3x3 stride 2, strided 1x1 in NCHW) are GEMMs too, over x's columns (im2col:
// unfolded_gemm_applies). 1x1 convolutions over fewer than 16 pixels and 64+ input channels are
// lowbit_linear's forward, with no tile (linear_applies). The decode is AVX-512 codebook lookups
// (code_decode.h) turning bits/8 B per weight into the float tile.
// Scratch: one tile of at most kTileFloats floats (4.7 MB), whatever the layer's size. A layer
// whose float weight fits is decoded whole into it, transiently (the packed weight is what stays
// resident): splitting a convolution into more calls than the scratch needs cost 10-40% at
// batch 1 here. The row blocks take at most kBlockFloats floats per thread instead.
//
// Forward: y[:, tile] = conv(x[:, tile's groups], W[tile]) (+ bias[tile]).
// Backward (always direct): grad_x = sum over tiles of conv_transpose(grad_y[:, tile], W[tile])
// (tiles of whole groups write disjoint channels of grad_x; with one group the tiles add up, in
// tile order).
// Inputs in float16/bfloat16 are widened to float32 first; results are rounded back. A
// channels-last x gives a channels-last y (oneDNN convolves it as it is; Winograd, NCHW only,
// converts around itself). Arguments are checked by the glue (lut_conv2d_glue.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/code_decode.h"
#include "cpu/kept_buffer.h"
#include "cpu/switches.h"
#include "mixedprec/conv2d.h"
#include "mixedprec/packed_weight.h"
#include "ops/lowbit_linear/lowbit_linear_cpu.h"
#include "ops/lut_conv2d/depthwise_conv.h"
#include "ops/lut_conv2d/winograd_conv3x3.h"
#include "register/op.h"

namespace mixedprec {
namespace {

// Decoded weights per tile (4.7 MB): 256 output channels of a 512-channel 3x3 convolution.
constexpr int64_t kTileFloats = 256 * 512 * 9;
constexpr int64_t kChannelUnit = 16;  // channels per tile step when groups == 1
// A channels-last 1x1 convolution with up to this many output pixels (N * H_out * W_out) is a GEMM
// of x's pixel rows with the decoded tile (ATen's sgemm): oneDNN's channels-last 1x1 convolution
// is slow on few pixels (Zen 4, 2 threads, batch 1 at 7x7: 2048 -> 512 in 2.0 ms as a
// convolution, 0.77 ms as a GEMM; 512 -> 2048 1.17 against 0.70; at 14x14 and at batch 8 on 7x7
// the two are within noise; NCHW ones: nchw_gemm_applies).
constexpr int64_t kPointwiseGemmPixels = 512;

bool pointwise(const Conv2dGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.pad_h == 0 && g.pad_w == 0 && g.groups == 1;
}

bool pointwise_gemm_applies(const Conv2dGeometry& g, at::MemoryFormat layout) {
  return layout == at::MemoryFormat::ChannelsLast && pointwise(g) && g.batch * g.out_pixels() <= kPointwiseGemmPixels;
}

// An NCHW 1x1 convolution at stride 1 is a GEMM per image, the tile's rows times x's (C_in, H W)
// matrix, at batch 1 and, over channel counts that are not both multiples of 16 (pruned and narrow
// networks: ShuffleNet's 116, RegNet's 104 and 440, EfficientNet's 40 and 240), at every batch:
// oneDNN's NCHW convolution is slower (Xeon with AVX-512, 2 threads, F.conv2d against mm on the
// same float weight, batch 1: 512 -> 2048 at 7x7 482 against 388 us, 1024 -> 512 at 14x14 772
// against 569, 256 -> 64 at 56x56 486 against 285; on the odd counts several times, Zen 4:
// 116 -> 116 at 14x14 156 against 68, 72 -> 24 at 56x56 348 against 111). Batches above 1 of
// small maps keep the convolution (Zen 4, batch 8, odd counts: the per-image GEMMs ran at
// 0.76-1.04x on 7x7, 440 -> 440 and 232 -> 232, 1.0-1.4x on 14x14 and 1.7-4.9x on 28x28), and so
// do batches above 1 over counts that are multiples of 16. The backward (always NCHW) takes the
// same route, with W^T.
constexpr int64_t kNchwGemmPixels = 128;  // per image, at batches above 1
bool nchw_gemm_applies(const Conv2dGeometry& g, at::MemoryFormat layout) {
  const int64_t pixels = g.height * g.width;  // stride 1: the output's
  return layout == at::MemoryFormat::Contiguous && pointwise(g) && g.stride_h == 1 && g.stride_w == 1 &&
         (g.batch == 1 || ((g.in_channels % 16 != 0 || g.out_channels % 16 != 0) &&
                           (pixels == 1 || pixels >= kNchwGemmPixels)));
}

// A 1x1 convolution over fewer output pixels than kLinearPixels (squeeze-and-excitation layers on
// their 1 x 1 maps, at batches below it) with rows of at least kLinearDepth input channels is
// lowbit_linear's forward on x's pixel rows, in either layout: its small-batch paths read the
// codes in registers, with no float tile and no ATen convolution (Zen 4, 2 threads, 4-/7-bit:
// 960 -> 240 at batch 1 75-93 against 106-128 us; at batch 8 2-4.6x; 2048 -> 512 2.2-2.8x;
// EfficientNet's 1152 -> 48 26 against 41 us). Shorter rows cost it more per row than the tile
// (EfficientNet's SE expansions, 6-bit: 28 -> 672 55 against 28 us, 20 -> 480 41 against 25).
constexpr int64_t kLinearPixels = 16;
constexpr int64_t kLinearDepth = 64;
bool linear_applies(const Conv2dGeometry& g) {
  const int64_t pixels = g.batch * g.out_pixels();  // lowbit_linear's kernels take M >= 1
  return pointwise(g) && pixels > 0 && pixels < kLinearPixels && g.in_channels >= kLinearDepth;
}

// x's pixel rows (N * H_out * W_out, C_in) for a 1x1 convolution: a view of a
// channels-last x, or the strided pixels gathered (once per call, whatever the number of tiles).
at::Tensor pixel_rows(const at::Tensor& x, const Conv2dGeometry& g) {
  const at::Tensor picked = g.stride_h == 1 && g.stride_w == 1
                                ? x : x.slice(2, 0, g.height, g.stride_h).slice(3, 0, g.width, g.stride_w);
  return picked.permute({0, 2, 3, 1}).reshape({-1, g.in_channels});
}

// out = a b (+ bias, broadcast over out): ATen's sgemm writes out in place through its strides (a
// tile's channels of y: no copy of the tile's result).
void gemm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  if (bias) at::addmm_out(out, *bias, a, b);
  else at::mm_out(out, a, b);
}

// out (N, M, P) = a (M, K) times each image of `images` (N, K, P), plus bias (M,), for the 1x1
// layers of nchw_gemm_applies (forward: W times x's images; backward: W^T times grad_y's). One
// GEMM over the images' rows when each is one pixel.
void per_image_gemm(const at::Tensor& a, const at::Tensor& images, const std::optional<at::Tensor>& bias,
                    const at::Tensor& out) {
  if (images.size(2) == 1) return gemm_into(out.select(2, 0), images.select(2, 0), a.t(), bias);
  const std::optional<at::Tensor> column = bias ? std::optional(bias->view({a.size(0), 1})) : std::nullopt;
  for (int64_t n = 0; n < images.size(0); ++n) gemm_into(out[n], a, images[n], column);
}

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
  int64_t rows() const { return std::min(per_tile * unit, channels); }  // the scratch's channels
};

// Row blocks for the 1x1 GEMM routes over few pixels (fewer than kBlockPixels, batch included)
// of layers of at least kBlockWeights weights: blocks of at most kBlockFloats decoded weights
// (half a core's L2 or less), each decoded and multiplied by one thread while it is in that
// thread's L2, where one tile of the whole weight, decoded by every thread, goes out to L3 and
// back (Xeon with AVX-512, 2 threads, batch 1 at 7x7, NCHW and channels-last, against one tile:
// 1024 -> 2048 4-bit 42% sparse 1.02 and 0.91 against 1.49 and 1.32 ms, F.conv2d 1.05 and 1.12;
// 2048 -> 512 0.55 and 0.52 against 0.70 and 0.79, F.conv2d 0.54 and 0.76; 1280 -> 320 4-bit
// 0.21 and 0.19 against 0.26 and 0.23). From 196 pixels on (14 x 14) neither won throughout.
// count is 0 where they do not apply; it is a multiple of 4, by shape (not by thread count: the
// results do not depend on it), to share the blocks evenly.
constexpr int64_t kBlockPixels = 128;
constexpr int64_t kBlockWeights = int64_t(1) << 14;
constexpr int64_t kBlockFloats = int64_t(1) << 17;
struct RowBlocks {
  int64_t count = 0, rows = 0;
  explicit RowBlocks(const Conv2dGeometry& g) {
    const int64_t weights = g.out_channels * g.row_length();
    if (g.batch * g.out_pixels() >= kBlockPixels || weights < kBlockWeights) return;
    count = ceil_div(ceil_div(weights, kBlockFloats), 4) * 4;
    rows = ceil_div(g.out_channels, count);
  }
};

// Other single-group layers over few pixels (RowBlocks) whose decoded tile would not fit a core's
// L2 (kUnfoldWeights), and strided 1x1 layers (NCHW: oneDNN's NCHW 1x1 convolutions are slow, see
// nchw_gemm_applies), where Winograd does not take them: the blocks times x's columns (im2col, in
// W's row order (C_in, kh, kw)), y NCHW (Xeon with AVX-512, 2 threads, batch 1, NCHW and
// channels-last, against the tile and oneDNN: 256 -> 512 3x3 stride 2 at 14x14 0.78 and 0.83
// against 0.90 and 1.11 ms, F.conv2d 0.63 in either layout (so still slower); 1x1 stride 2 NCHW
// 1024 -> 2048 1.07 against 1.72, F.conv2d 1.02; but 64 -> 128 5x5 on 9x9, 205K weights, 0.25 and
// 0.27 against 0.19 and 0.23, and NCHW 1x1 stride 1 at batch 2 on 7x7, 2048 -> 512, 1.29 against
// 1.12).
constexpr int64_t kUnfoldWeights = int64_t(1) << 18;
bool unfolded_gemm_applies(const Conv2dGeometry& g, const RowBlocks& blocks) {
  if (blocks.count == 0 || g.groups > 1) return false;
  return pointwise(g) ? g.stride_h > 1 || g.stride_w > 1 : g.out_channels * g.row_length() >= kUnfoldWeights;
}

// t.narrow(dim, start, length), or t itself when that is all of it: a single-tile layer makes no
// narrow calls (with the scratch sized to the layer, a small layer's call went from 18 to 12 us,
// conv2d's 6).
at::Tensor part(const at::Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return start == 0 && length == t.size(dim) ? t : t.narrow(dim, start, length);
}

struct TileDecoder {
  const PackedView w;
  const Conv2dGeometry& g;
  bool simd;

  TileDecoder(const PackedView& weight, const Conv2dGeometry& geometry)
      : w(weight), g(geometry), simd(cpu_simd.load(std::memory_order_relaxed)) {}

  // W[c, k0 : k0 + count] (scale applied, 0 where pruned), flat over (C_in/G, kh, kw).
  void decode_span(int64_t c, int64_t k0, int64_t count, float* out) const {
    mixedprec::decode_span(w, c * g.row_length() + k0, count, out, simd);
    apply_scale(w.channel_scale[c], count, out);
  }

  // Channels [c0, c1) of W into tile (c1 - c0, C_in/G, kh, kw).
  void decode(int64_t c0, int64_t c1, float* tile) const { decode_scaled_rows(w, c0, c1, tile, simd); }
};

}  // namespace

namespace cpu {

at::Tensor lut_conv2d_forward(const at::Tensor& x, const at::Tensor& bias_f, const PackedView& w,
                              const Conv2dGeometry& g) {
  const int64_t stride[2] = {g.stride_h, g.stride_w}, padding[2] = {g.pad_h, g.pad_w}, dilation[2] = {g.dil_h, g.dil_w};
  // x's layout is y's (ops/library.py memory_format: channels-last when x is that and not also
  // contiguous). oneDNN and Winograd run channels-last inputs as they come.
  const auto layout = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
                          ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x_f = x.to(at::kFloat).contiguous(layout);
  const TileDecoder decoder(w, g);
  const RowBlocks blocks(g);
  const bool linear = linear_applies(g);
  const at::Tensor pixels = !linear && pointwise_gemm_applies(g, layout) ? pixel_rows(x_f, g) : at::Tensor();
  const bool nchw_gemm = !linear && nchw_gemm_applies(g, layout);
  const bool unfolded = !linear && !pixels.defined() && !nchw_gemm && unfolded_gemm_applies(g, blocks);
#if defined(MP_DECODE_AVX512)
  if (winograd_conv3x3_applies(g)) {
    at::Tensor y = poisoned(
        at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, x_f.options().memory_format(layout)));
    const auto decode_span = [&](int64_t o, int64_t k0, int64_t n, float* out) { decoder.decode_span(o, k0, n, out); };
    if (winograd_conv3x3(x_f.data_ptr<float>(), bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
                         y.data_ptr<float>(), g, decode_span, layout == at::MemoryFormat::ChannelsLast))
      return y.to(x.scalar_type());
  }
#endif
  if (depthwise_conv_applies(g)) {
    at::Tensor w_f = at::empty({g.out_channels, g.kernel_h * g.kernel_w}, x_f.options());
    decoder.decode(0, g.out_channels, w_f.data_ptr<float>());
    at::Tensor y = poisoned(
        at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, x_f.options().memory_format(layout)));
    depthwise_conv(x_f.data_ptr<float>(), w_f.data_ptr<float>(), bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
                   y.data_ptr<float>(), g, layout == at::MemoryFormat::ChannelsLast);
    return y.to(x.scalar_type());
  }
  if (linear) {
    at::Tensor y = cpu::lowbit_linear_forward(pixel_rows(x_f, g).contiguous(), w);
    if (bias_f.defined()) y.add_(bias_f);
    y = g.out_pixels() == 1 ? y.view({g.batch, g.out_channels, 1, 1})
                            : y.view({g.batch, g.out_height, g.out_width, g.out_channels}).permute({0, 3, 1, 2});
    return y.to(x.scalar_type()).contiguous(layout);
  }
  const bool gemm = pixels.defined() || nchw_gemm || unfolded;
  const Tiles tiles(g);
  static thread_local std::vector<float> kept;  // the decoded tile (cpu/kept_buffer.h)
  const auto tile = [&] { return kept_tensor(kept, {tiles.rows(), g.group_in(), g.kernel_h, g.kernel_w}); };
  const auto bias_part = [&](int64_t c0, int64_t n) {
    return bias_f.defined() ? std::optional(part(bias_f, 0, c0, n)) : std::nullopt;
  };
  if (!gemm) {
    const auto conv = [&](int64_t c0, int64_t c1) {
      const int64_t k = g.groups > 1 ? (c1 - c0) / g.group_out() : 1;
      const at::Tensor w_t = tile();
      decoder.decode(c0, c1, w_t.data_ptr<float>());
      const at::Tensor x_t = g.groups > 1 ? part(x_f, 1, c0 / g.group_out() * g.group_in(), k * g.group_in()) : x_f;
      return at::convolution(x_t, part(w_t, 0, 0, c1 - c0), bias_part(c0, c1 - c0), stride, padding, dilation, false,
                             {0, 0}, k);
    };
    if (tiles.count == 1) return conv(0, g.out_channels).to(x.scalar_type()).contiguous(layout);
    at::Tensor y = poisoned(
        at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, x_f.options().memory_format(layout)));
    for (int64_t t = 0; t < tiles.count; ++t) {
      const int64_t c0 = tiles.first_channel(t), c1 = tiles.first_channel(t + 1);
      if (c0 < c1) y.narrow(1, c0, c1 - c0).copy_(conv(c0, c1));
    }
    return y.to(x.scalar_type());
  }
  // The GEMM routes write y's channels [c0, c1) in place: y's pixel rows (N H_out W_out, C_out)
  // times the decoded rows (channels-last), or the decoded rows times each image of x (NCHW) or of
  // its columns (N, C_in kh kw, H_out W_out), in W's row order.
  const auto y_layout = pixels.defined() ? layout : at::MemoryFormat::Contiguous;
  at::Tensor y = poisoned(
      at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, x_f.options().memory_format(y_layout)));
  const at::Tensor y_rows = pixels.defined() ? y.permute({0, 2, 3, 1}).reshape({-1, g.out_channels})
                                             : y.view({g.batch, g.out_channels, g.out_height * g.out_width});
  const at::Tensor x_images = pixels.defined() ? at::Tensor()
                              : unfolded ? at::im2col(x_f, {g.kernel_h, g.kernel_w}, dilation, padding, stride)
                                         : x_f.view({g.batch, g.in_channels, g.height * g.width});
  const auto multiply = [&](int64_t c0, int64_t n, const float* decoded) {
    const at::Tensor w_t = at::from_blob(const_cast<float*>(decoded), {n, g.row_length()}, x_f.options());
    if (pixels.defined()) gemm_into(y_rows.narrow(1, c0, n), pixels, w_t.t(), bias_part(c0, n));
    else per_image_gemm(w_t, x_images, bias_part(c0, n), y_rows.narrow(1, c0, n));
  };
  if (blocks.count > 0) {
    // a parallel region over blocks: each task decodes its blocks and multiplies them on its thread,
    // with the caller's dispatch state (y may be an inference tensor: out= needs inference mode)
    const at::ThreadLocalState caller;
    at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
      const at::ThreadLocalStateGuard state(caller);
      static thread_local std::vector<float> kept_block;  // L2-resident
      float* block = kept_buffer(kept_block, blocks.rows * g.row_length());
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = std::min(b * blocks.rows, g.out_channels), n = std::min(blocks.rows, g.out_channels - c0);
        if (n <= 0) continue;
        decoder.decode(c0, c0 + n, block);  // nested regions run on this thread
        multiply(c0, n, block);
      }
    });
    return y.to(x.scalar_type()).contiguous(layout);
  }
  const at::Tensor w_t = tile();
  for (int64_t t = 0; t < tiles.count; ++t) {
    const int64_t c0 = tiles.first_channel(t), c1 = tiles.first_channel(t + 1);
    if (c0 == c1) continue;
    decoder.decode(c0, c1, w_t.data_ptr<float>());
    multiply(c0, c1 - c0, w_t.data_ptr<float>());
  }
  return y.to(x.scalar_type()).contiguous(layout);
}

at::Tensor lut_conv2d_backward(const at::Tensor& grad_y, const PackedView& w, const Conv2dGeometry& g) {
  const int64_t stride[2] = {g.stride_h, g.stride_w}, padding[2] = {g.pad_h, g.pad_w}, dilation[2] = {g.dil_h, g.dil_w};
  const int64_t input_shape[4] = {g.batch, g.in_channels, g.height, g.width};
  const at::Tensor grad_y_f = grad_y.to(at::kFloat).contiguous();
  if (g.batch == 0) return at::zeros(input_shape, grad_y.options());
  // The input rows past the last window (floor in the output size) come back as output padding.
  const int64_t output_padding[2] = {
      (g.height + 2 * g.pad_h - g.dil_h * (g.kernel_h - 1) - 1) % g.stride_h,
      (g.width + 2 * g.pad_w - g.dil_w * (g.kernel_w - 1) - 1) % g.stride_w};
  const Tiles tiles(g);
  const TileDecoder decoder(w, g);
  at::Tensor tile = at::empty({tiles.rows(), g.group_in(), g.kernel_h, g.kernel_w}, grad_y_f.options());
  const bool nchw_gemm = nchw_gemm_applies(g, at::MemoryFormat::Contiguous);
  const auto conv_transpose = [&](int64_t c0, int64_t c1) {
    decoder.decode(c0, c1, tile.data_ptr<float>());
    if (nchw_gemm) {
      const at::Tensor grads = part(grad_y_f, 1, c0, c1 - c0).reshape({g.batch, c1 - c0, g.height * g.width});
      at::Tensor grad_x = at::empty(input_shape, grad_y_f.options());
      per_image_gemm(part(tile, 0, 0, c1 - c0).view({c1 - c0, g.in_channels}).t(), grads, std::nullopt,
                     grad_x.view({g.batch, g.in_channels, g.height * g.width}));
      return grad_x;
    }
    return at::convolution(part(grad_y_f, 1, c0, c1 - c0), part(tile, 0, 0, c1 - c0), std::nullopt, stride, padding,
                           dilation, true, output_padding, g.groups > 1 ? (c1 - c0) / g.group_out() : 1);
  };
  if (tiles.count == 1) return conv_transpose(0, g.out_channels).to(grad_y.scalar_type());
  at::Tensor grad_x = at::zeros(input_shape, grad_y_f.options());
  for (int64_t t = 0; t < tiles.count; ++t) {
    const int64_t c0 = tiles.first_channel(t), c1 = tiles.first_channel(t + 1);
    if (c0 == c1) continue;
    const at::Tensor part = conv_transpose(c0, c1);
    if (g.groups > 1) grad_x.narrow(1, c0 / g.group_out() * g.group_in(), part.size(1)).copy_(part);
    else grad_x.add_(part);
  }
  return grad_x.to(grad_y.scalar_type());
}

}  // namespace cpu
}  // namespace mixedprec
