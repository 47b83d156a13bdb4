// Winograd F(2x2, 3x3) convolution for lut_conv2d's CPU kernel (3x3, stride 1, dilation 1, one
// group): each 2x2 output tile is A^T [sum_c (G g_oc G^T) . (B^T d_c B)] A, 16 multiplies per
// tile and channel pair instead of 36 (Lavin & Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016). oneDNN's direct convolution runs near this CPU's peak already, so fewer
// multiplies is what lets a kernel that also decodes its weight go faster than it.
//
// Per call, chunk by chunk of tiles (a chunk's transformed inputs at most kChunkBytes), each
// thread takes a part: a share of the output-channel blocks (transforming all the chunk's tiles
// itself) or a share of the tiles (transforming every block's weight itself), whichever repeats
// less work. It transforms its tiles' inputs (V[t][tiles / 16][c][16]), then per block decodes
// the codes and transforms them (U[c][t][o]), runs the 16 GEMMs M[t] = U[t]^T V[t] in 8-channel x
// 48-tile register blocks and transforms M back into y. Nothing one thread writes is read by
// another. Channels-last x and y (NHWC) take the same steps with channels in the vector lanes
// instead of tiles: a tile's 16 patch values load 16 channels each (V[t][tile][c]), the GEMMs run
// 6-tile x 64-channel register blocks (M[t][tile][o]) and y's pixels store 16 output channels at
// a time, so a channels-last network needs no copies into NCHW and back (they cost 20-40% of the
// call at 16 to 64 channels). The sums run in the same order: y is the NCHW path's, bit for bit. The float weight is never whole in memory: a block's U is at most kBlockBytes, or 16
// channels' where that is more. Buffers are kept per thread between calls (fresh large
// allocations page-fault each call): V, U (2 MB at 2048 input channels) and M (kItemBytes).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu/code_decode.h"
#include "cpu/kept_buffer.h"
#include "cpu/switches.h"
#include "mixedprec/conv2d.h"

namespace mixedprec {

// The geometries this path takes (the rest go through ATen's convolution). Its kernels are AVX-512.
inline bool winograd_conv3x3_applies(const Conv2dGeometry& g) {
#if defined(MP_DECODE_AVX512)
  return cpu_winograd.load(std::memory_order_relaxed) && g.kernel_h == 3 && g.kernel_w == 3 && g.stride_h == 1 &&
         g.stride_w == 1 && g.dil_h == 1 && g.dil_w == 1 && g.groups == 1 && g.in_channels >= 8 &&
         g.in_channels <= 2048 && g.out_channels >= 8;
#else
  (void)g;
  return false;
#endif
}

#if defined(MP_DECODE_AVX512)
namespace winograd {

constexpr int kLanes = 16;                     // tiles per vector
constexpr int kTerms = 16;                     // transformed elements of a 4x4 tile
constexpr int kOutRows = 8;                    // output channels per GEMM register block
constexpr int kMaxVecs = 3;                    // tile vectors per GEMM register block
constexpr int64_t kChunkBytes = 4 << 20;       // transformed inputs of a chunk of tiles
constexpr int64_t kBlockBytes = 256 << 10;     // transformed weight block (at least 16 channels)
constexpr int64_t kItemBytes = 128 << 10;      // GEMM results of one pass over a block

// r[i] lane j <- r[j] lane i.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// v = B^T d B for 4x4 tiles d (element 4 * row + column), one tile per lane.
inline void input_transform(const __m512 d[16], __m512 v[16]) {
  __m512 w[16];
  for (int s = 0; s < 4; ++s) {  // columns: B^T d
    w[s] = _mm512_sub_ps(d[s], d[8 + s]);
    w[4 + s] = _mm512_add_ps(d[4 + s], d[8 + s]);
    w[8 + s] = _mm512_sub_ps(d[8 + s], d[4 + s]);
    w[12 + s] = _mm512_sub_ps(d[4 + s], d[12 + s]);
  }
  for (int r = 0; r < 16; r += 4) {  // rows: (B^T d) B
    v[r] = _mm512_sub_ps(w[r], w[r + 2]);
    v[r + 1] = _mm512_add_ps(w[r + 1], w[r + 2]);
    v[r + 2] = _mm512_sub_ps(w[r + 2], w[r + 1]);
    v[r + 3] = _mm512_sub_ps(w[r + 1], w[r + 3]);
  }
}

// u = G g G^T for 3x3 kernels g (tap 3 * row + column), one kernel per lane. The halves of G
// are exact.
inline void weight_transform(const __m512 g[9], __m512 u[16]) {
  const __m512 half = _mm512_set1_ps(0.5f);
  __m512 w[12];  // G g: 4 rows of 3
  for (int b = 0; b < 3; ++b) {
    const __m512 outer = _mm512_add_ps(g[b], g[6 + b]);
    w[b] = g[b];
    w[3 + b] = _mm512_mul_ps(_mm512_add_ps(outer, g[3 + b]), half);
    w[6 + b] = _mm512_mul_ps(_mm512_sub_ps(outer, g[3 + b]), half);
    w[9 + b] = g[6 + b];
  }
  for (int i = 0; i < 4; ++i) {  // (G g) G^T
    const __m512 outer = _mm512_add_ps(w[3 * i], w[3 * i + 2]);
    u[4 * i] = w[3 * i];
    u[4 * i + 1] = _mm512_mul_ps(_mm512_add_ps(outer, w[3 * i + 1]), half);
    u[4 * i + 2] = _mm512_mul_ps(_mm512_sub_ps(outer, w[3 * i + 1]), half);
    u[4 * i + 3] = w[3 * i + 2];
  }
}

// out[r][s] = (A^T m A)[r][s] + beta for 4x4 tiles m (element 4 * row + column), one tile per lane.
inline void output_transform(const __m512 m[16], __m512 beta, __m512 out[2][2]) {
  __m512 z[8];  // A^T m: 2 rows of 4
  for (int s = 0; s < 4; ++s) {
    z[s] = _mm512_add_ps(_mm512_add_ps(m[s], m[4 + s]), m[8 + s]);
    z[4 + s] = _mm512_sub_ps(_mm512_sub_ps(m[4 + s], m[8 + s]), m[12 + s]);
  }
  for (int r = 0; r < 2; ++r) {
    out[r][0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(z[4 * r], z[4 * r + 1]), z[4 * r + 2]), beta);
    out[r][1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(z[4 * r + 1], z[4 * r + 2]), z[4 * r + 3]), beta);
  }
}

struct Plan {
  int64_t batch, C, O, H, W, OH, OW, pad_h, pad_w;
  int64_t tiles_h, tiles_w, tiles;  // 2x2 output tiles, n-major then row-major
  int64_t block;                    // output channels per block (a multiple of 16)
  int64_t chunk;                    // tiles per chunk (a multiple of kLanes)
  int64_t range;                    // tiles per GEMM pass, whose M fits kItemBytes (a multiple of kLanes)

  explicit Plan(const Conv2dGeometry& g)
      : batch(g.batch), C(g.in_channels), O(g.out_channels), H(g.height), W(g.width), OH(g.out_height),
        OW(g.out_width), pad_h(g.pad_h), pad_w(g.pad_w) {
    tiles_h = ceil_div(OH, 2), tiles_w = ceil_div(OW, 2), tiles = batch * tiles_h * tiles_w;
    const int64_t fit = kBlockBytes / (kTerms * C * 16 * int64_t(sizeof(float)));
    block = 16 * std::clamp<int64_t>(fit, 1, ceil_div(O, 16));
    chunk = std::max<int64_t>(1, kChunkBytes / (kTerms * C * kLanes * int64_t(sizeof(float)))) * kLanes;
    chunk = std::min(chunk, ceil_div(tiles, kLanes) * kLanes);
    range = std::max<int64_t>(1, kItemBytes / (kTerms * block * kLanes * int64_t(sizeof(float)))) * kLanes;
    range = std::min(range, chunk);
  }
  int64_t blocks() const { return ceil_div(O, block); }
  int64_t c_stride() const { return ceil_div(C, kLanes) * kLanes; }  // a channels-last V row: C rounded up
  // Floats per input channel of U[c][t][o]: a channel's 16 terms side by side, so that its weight
  // transform stores one contiguous run, not 16 runs a plane apart (Xeon, 2 threads, 512 -> 512 at
  // 7x7, batch 1, 4- and 8-bit: 1.31-1.49 against 1.47-1.61 ms; at 14x14 0.66-0.69 against
  // 0.68-0.73; at 28x28 and 56x56, and whole ResNet-18 OPQ 8x models, within noise), plus one
  // cache line, as the planes below.
  int64_t u_row() const { return kTerms * block + kLanes; }
  // Floats per term of V[t][j / 16][c][j % 16] and M[t][o][j]: one cache line more than the plane,
  // so that a step's 16 accesses, one per term, fall in 16 cache sets, not one.
  int64_t v_plane(int64_t tiles) const { return C * ceil_div(tiles, kLanes) * kLanes + kLanes; }
  int64_t v_plane_nhwc(int64_t tiles) const { return c_stride() * tiles + kLanes; }  // V[t][tile][c]
  int64_t m_plane() const { return block * range + kLanes; }
};

// The stretches of one tile row among a vector's lanes: lanes [l0, l1) are the tiles from output
// row `row`, column `col` of image n on, 2 columns apart.
struct Segment {
  int64_t n, row, col;
  int l0, l1;
};

// Segments of lanes [0, lanes) holding tiles first, first + 1, ...; returns how many.
inline int segments(const Plan& p, int64_t first, int64_t lanes, Segment* out) {
  const int64_t per_image = p.tiles_h * p.tiles_w;
  int count = 0;
  for (int64_t l = 0; l < lanes;) {
    const int64_t tile = first + l, n = tile / per_image, rest = tile - n * per_image;
    const int64_t tile_col = rest % p.tiles_w, run = std::min(lanes - l, p.tiles_w - tile_col);
    out[count++] = Segment{n, 2 * (rest / p.tiles_w), 2 * tile_col, int(l), int(l + run)};
    l += run;
  }
  return count;
}

// Lanes of bits [lo, hi) clipped to 0..15.
inline __mmask16 lane_range(int64_t lo, int64_t hi) {
  lo = std::clamp<int64_t>(lo, 0, 16), hi = std::clamp<int64_t>(hi, 0, 16);
  return lo >= hi ? 0 : __mmask16(((1u << (hi - lo)) - 1) << lo);
}

// V[t][j / 16][c][j % 16] (plane stride v_plane) for tiles j in [first, first + count), lanes
// past count zero. Row r of the tiles' patches, column s, is x[row - pad + r][col - pad + 2 lane
// + s]: a segment's lanes read 34 consecutive floats (masked to its lanes and the image), split
// into even and odd columns. Returns whether every V is finite.
inline bool transform_inputs(const Plan& p, const float* x, int64_t first, int64_t count, float* v,
                             int64_t v_plane) {
  const int64_t vectors = ceil_div(count, kLanes), plane = p.H * p.W, C = p.C;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __mmask16 non_finite = 0;
  for (int64_t vec = 0; vec < vectors; ++vec) {
    Segment seg[kLanes];
    const int n_seg = segments(p, first + vec * kLanes, std::min<int64_t>(kLanes, count - vec * kLanes), seg);
    // Per patch row and segment: the offset in channel 0 of lane 0's 34 floats, and the lanes of
    // the four loads (columns +0, +16, +2, +18) inside the image; rows outside load nothing.
    int64_t offset[4][kLanes];
    __mmask16 mask[4][kLanes][4];
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < n_seg; ++i) {
        const Segment& sg = seg[i];
        const int64_t h = sg.row - p.pad_h + r, base = sg.col - p.pad_w - 2 * sg.l0;
        offset[r][i] = sg.n * p.C * plane + h * p.W + base;
        const int64_t starts[4] = {0, 16, 2, 18}, lane0[4] = {0, 8, 0, 8};
        for (int k = 0; k < 4; ++k)
          mask[r][i][k] = h < 0 || h >= p.H ? 0
                              : lane_range(2 * (sg.l0 - lane0[k]), 2 * (sg.l1 - lane0[k])) &
                                    lane_range(-(base + starts[k]), p.W - (base + starts[k]));
      }
    for (int64_t c = 0; c < C; ++c) {
      __m512 d[16], t[16];
      for (int r = 0; r < 4; ++r) {
        __m512 load[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int i = 0; i < n_seg; ++i) {
          const float* src = x + offset[r][i] + c * plane;
          load[0] = _mm512_mask_loadu_ps(load[0], mask[r][i][0], src);
          load[1] = _mm512_mask_loadu_ps(load[1], mask[r][i][1], src + 16);
          load[2] = _mm512_mask_loadu_ps(load[2], mask[r][i][2], src + 2);
          load[3] = _mm512_mask_loadu_ps(load[3], mask[r][i][3], src + 18);
        }
        d[4 * r] = _mm512_permutex2var_ps(load[0], even, load[1]);
        d[4 * r + 1] = _mm512_permutex2var_ps(load[0], odd, load[1]);
        d[4 * r + 2] = _mm512_permutex2var_ps(load[2], even, load[3]);
        d[4 * r + 3] = _mm512_permutex2var_ps(load[2], odd, load[3]);
      }
      input_transform(d, t);
      for (int e = 0; e < kTerms; ++e) {
        non_finite |= _mm512_fpclass_ps_mask(t[e], 0x99);  // NaN or +-inf
        _mm512_storeu_ps(v + e * v_plane + (vec * C + c) * kLanes, t[e]);
      }
    }
  }
  return !non_finite;
}

// acc[i][j] = sum_c u[c * u_stride + i] * v[j * vec_stride + 16 c .. + 16], stored at m + i * m_stride.
template <int kVecs>
void gemm_block(const float* u, int64_t u_stride, const float* v, int64_t vec_stride, int64_t C, float* m,
                int64_t m_stride) {
  __m512 acc[kOutRows][kVecs];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c, u += u_stride, v += kLanes) {
    __m512 b[kVecs];
    for (int j = 0; j < kVecs; ++j) b[j] = _mm512_loadu_ps(v + j * vec_stride);
    for (int i = 0; i < kOutRows; ++i) {
      const __m512 a = _mm512_set1_ps(u[i]);
      for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < kOutRows; ++i)
    for (int j = 0; j < kVecs; ++j) _mm512_storeu_ps(m + i * m_stride + kLanes * j, acc[i][j]);
}

// The same for a last tile vector with only kTiles live lanes, output channels in the vectors:
// acc[j] = sum_c u[c * u_stride + q .. + 16] * v[16 c + j] for every 16 channels q of the block, so
// that 1 to 8 tiles (a batch-1 layer's leftover) cost that many FMAs per step, not 8 per 8 rows.
template <int kTiles>
void gemm_tail(const float* u, int64_t u_stride, int64_t block, const float* v, int64_t C, float* m, int64_t m_stride) {
  for (int64_t q = 0; q < block; q += 16) {
    __m512 acc[kTiles];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m512 a = _mm512_loadu_ps(u + c * u_stride + q);
      for (int j = 0; j < kTiles; ++j) acc[j] = _mm512_fmadd_ps(a, _mm512_set1_ps(v[c * kLanes + j]), acc[j]);
    }
    for (int j = 0; j < kTiles; ++j) {
      alignas(64) float rows[16];
      _mm512_store_ps(rows, acc[j]);
      for (int i = 0; i < 16; ++i) m[(q + i) * m_stride + j] = rows[i];
    }
  }
}

constexpr int kTailTiles = 8;
using TailGemm = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
constexpr TailGemm kTailGemm[kTailTiles + 1] = {nullptr,        gemm_tail<1>, gemm_tail<2>, gemm_tail<3>, gemm_tail<4>,
                                                gemm_tail<5>, gemm_tail<6>, gemm_tail<7>, gemm_tail<8>};

// M[t][o][j] = sum_c U[c][t][o] V[t][j][c] for a block and `tiles` tiles (V from their first).
inline void multiply(const Plan& p, const float* u, const float* v, int64_t v_plane, int64_t tiles, float* m) {
  const int tail = tiles % kLanes <= kTailTiles ? int(tiles % kLanes) : 0;  // live lanes of a short last vector
  const int64_t vecs = tiles / kLanes + (tail == 0 && tiles % kLanes ? 1 : 0), C = p.C;
  for (int e = 0; e < kTerms; ++e) {
    const float* u_e = u + e * p.block;
    const float* v_e = v + e * v_plane;
    float* m_e = m + e * p.m_plane();
    for (int64_t o = 0; o < p.block; o += kOutRows)
      for (int64_t j = 0; j < vecs; j += kMaxVecs) {
        const int64_t n = std::min<int64_t>(kMaxVecs, vecs - j), off = j * kLanes;
        const float* v_j = v_e + off * C;  // tile vector j: C x 16 floats
        float* m_j = m_e + o * p.range + off;
        if (n == 3) gemm_block<3>(u_e + o, p.u_row(), v_j, kLanes * C, C, m_j, p.range);
        else if (n == 2) gemm_block<2>(u_e + o, p.u_row(), v_j, kLanes * C, C, m_j, p.range);
        else gemm_block<1>(u_e + o, p.u_row(), v_j, kLanes * C, C, m_j, p.range);
      }
    if (tail) kTailGemm[tail](u_e, p.u_row(), p.block, v_e + vecs * kLanes * C, C, m_e + vecs * kLanes, p.range);
  }
}

// One thread's buffers, kept between calls.
struct Workspace {
  std::vector<float> v, u, m;
};

// U[c][t][o] for output channels [block * p.block, + p.block) (zero past O), from their codes 64
// input channels at a time: 16 rows x 576 taps decoded, transposed to taps x 16 rows (16x16
// register transposes; the lanes past a short span are never read), transformed.
template <class DecodeSpan>
void transform_weights(const Plan& p, int64_t block, const DecodeSpan& decode_span, Workspace& ws) {
  constexpr int64_t kChannels = 64, kSpan = kChannels * 9;
  // Plan fields in locals: a vector store may alias anything, so members would be reloaded after each
  const int64_t o0 = block * p.block, o1 = std::min(p.O, o0 + p.block), u_row = p.u_row(), n = p.block;
  float* u = kept_buffer(ws.u, p.C * u_row);
  alignas(64) float rows[16][kSpan], taps[kSpan][16];
  for (int64_t q = 0; q < p.block; q += 16)
    for (int64_t c0 = 0; c0 < p.C; c0 += kChannels) {
      const int64_t span = 9 * std::min<int64_t>(kChannels, p.C - c0);
      for (int64_t i = 0; i < 16; ++i) {
        if (o0 + q + i < o1) decode_span(o0 + q + i, 9 * c0, span, rows[i]);
        else std::fill(rows[i], rows[i] + kSpan, 0.f);
      }
      for (int64_t k0 = 0; k0 < span; k0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(rows[i] + k0);
        transpose16(r);
        for (int k = 0; k < 16; ++k) _mm512_store_ps(taps[k0 + k], r[k]);
      }
      for (int64_t c = 0; c < span / 9; ++c) {
        __m512 g[9], t[16];
        for (int k = 0; k < 9; ++k) g[k] = _mm512_load_ps(taps[9 * c + k]);
        weight_transform(g, t);
        for (int e = 0; e < kTerms; ++e) _mm512_storeu_ps(u + (c0 + c) * u_row + e * n + q, t[e]);
      }
    }
}

// y for output channels [o0, o0 + p.block) and the chunk's tiles [first + a, first + b) from M.
// A segment's 2x2 outputs interleave into two 32-float stretches of output rows, stored masked
// to its lanes and the image.
inline void transform_outputs(const Plan& p, const float* m, int64_t o0, int64_t first, int64_t a, int64_t b,
                              const float* bias, float* y) {
  // Plan fields in locals: a vector store may alias anything, so members would be reloaded after each
  const int64_t plane = p.OH * p.OW, OH = p.OH, OW = p.OW, O = p.O, m_plane = p.m_plane(), range = p.range;
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int64_t vec = 0; vec * kLanes < b - a; ++vec) {
    Segment seg[kLanes];
    const int n_seg = segments(p, first + a + vec * kLanes, std::min<int64_t>(kLanes, b - a - vec * kLanes), seg);
    __mmask16 mask[kLanes][2];
    for (int i = 0; i < n_seg; ++i) {
      const int64_t end = std::min<int64_t>(2 * seg[i].l1, OW - seg[i].col + 2 * seg[i].l0);
      mask[i][0] = lane_range(2 * seg[i].l0, end), mask[i][1] = lane_range(2 * seg[i].l0 - 16, end - 16);
    }
    for (int64_t o = o0; o < std::min(O, o0 + p.block); ++o) {
      __m512 mt[16];
      for (int e = 0; e < kTerms; ++e) mt[e] = _mm512_loadu_ps(m + e * m_plane + (o - o0) * range + vec * kLanes);
      __m512 out[2][2], row[2][2];  // row: out interleaved, output row r, columns of lanes 0-7 and 8-15
      output_transform(mt, _mm512_set1_ps(bias ? bias[o] : 0.f), out);
      for (int r = 0; r < 2; ++r) {
        row[r][0] = _mm512_permutex2var_ps(out[r][0], lo, out[r][1]);
        row[r][1] = _mm512_permutex2var_ps(out[r][0], hi, out[r][1]);
      }
      for (int i = 0; i < n_seg; ++i) {
        const Segment& sg = seg[i];
        float* dst = y + (sg.n * O + o) * plane + sg.row * OW + sg.col - 2 * sg.l0;
        for (int r = 0; r < 2 && sg.row + r < OH; ++r, dst += OW) {
          _mm512_mask_storeu_ps(dst, mask[i][0], row[r][0]);
          _mm512_mask_storeu_ps(dst + kLanes, mask[i][1], row[r][1]);
        }
      }
    }
  }
}


// Channels-last x (N, H, W, C): V[t][j][c] (plane stride v_plane, row stride c_stride, channels
// past C zero) for tiles j in [first, first + count). A tile's 4x4 patch values each load 16
// channels (zero outside the image). Returns whether every V is finite.
inline bool transform_inputs_nhwc(const Plan& p, const float* x, int64_t first, int64_t count, float* v,
                                  int64_t v_plane) {
  const int64_t per_image = p.tiles_h * p.tiles_w, C = p.C, H = p.H, W = p.W, stride = p.c_stride();
  __mmask16 non_finite = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t tile = first + j, n = tile / per_image, rest = tile - n * per_image;
    const int64_t h0 = 2 * (rest / p.tiles_w) - p.pad_h, w0 = 2 * (rest % p.tiles_w) - p.pad_w;
    const float* src[16];  // the patch's pixels, null outside the image
    for (int r = 0; r < 4; ++r)
      for (int s = 0; s < 4; ++s) {
        const int64_t h = h0 + r, w = w0 + s;
        src[4 * r + s] = h >= 0 && h < H && w >= 0 && w < W ? x + ((n * H + h) * W + w) * C : nullptr;
      }
    for (int64_t c = 0; c < C; c += kLanes) {
      const __mmask16 lanes = lane_range(0, C - c);
      __m512 d[16], t[16];
      for (int k = 0; k < 16; ++k) d[k] = src[k] ? _mm512_maskz_loadu_ps(lanes, src[k] + c) : _mm512_setzero_ps();
      input_transform(d, t);
      for (int e = 0; e < kTerms; ++e) {
        non_finite |= _mm512_fpclass_ps_mask(t[e], 0x99);  // NaN or +-inf
        _mm512_storeu_ps(v + e * v_plane + j * stride + c, t[e]);
      }
    }
  }
  return !non_finite;
}

// acc[j][q] = sum_c v[j * v_stride + c] * u[c * u_stride + 16 q .. + 16], stored at m + j * m_stride + 16 q:
// kTiles tiles by kVecs vectors of 16 output channels, the sum over c in the NCHW GEMM's order.
template <int kTiles, int kVecs>
void gemm_nhwc(const float* u, int64_t u_stride, const float* v, int64_t v_stride, int64_t C, float* m,
               int64_t m_stride) {
  __m512 acc[kTiles][kVecs];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c, u += u_stride) {
    __m512 b[kVecs];
    for (int q = 0; q < kVecs; ++q) b[q] = _mm512_loadu_ps(u + kLanes * q);
    for (int j = 0; j < kTiles; ++j) {
      const __m512 a = _mm512_set1_ps(v[j * v_stride + c]);
      for (int q = 0; q < kVecs; ++q) acc[j][q] = _mm512_fmadd_ps(a, b[q], acc[j][q]);
    }
  }
  for (int j = 0; j < kTiles; ++j)
    for (int q = 0; q < kVecs; ++q) _mm512_storeu_ps(m + j * m_stride + kLanes * q, acc[j][q]);
}

constexpr int kNhwcTiles = 6, kNhwcVecs = 4;  // 24 accumulators, 4 weight vectors, a broadcast
using NhwcGemm = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
template <int kTiles>
constexpr std::array<NhwcGemm, kNhwcVecs> nhwc_row() {
  return {gemm_nhwc<kTiles, 1>, gemm_nhwc<kTiles, 2>, gemm_nhwc<kTiles, 3>, gemm_nhwc<kTiles, 4>};
}
constexpr std::array<std::array<NhwcGemm, kNhwcVecs>, kNhwcTiles> kNhwcGemm = {
    nhwc_row<1>(), nhwc_row<2>(), nhwc_row<3>(), nhwc_row<4>(), nhwc_row<5>(), nhwc_row<6>()};

// M[t][j][o] = sum_c U[c][t][o] V[t][j][c] for a block and `tiles` tiles (V from their first).
inline void multiply_nhwc(const Plan& p, const float* u, const float* v, int64_t v_plane, int64_t tiles, float* m) {
  const int64_t C = p.C, stride = p.c_stride(), vecs = p.block / kLanes;
  for (int e = 0; e < kTerms; ++e) {
    const float* u_e = u + e * p.block;
    const float* v_e = v + e * v_plane;
    float* m_e = m + e * p.m_plane();
    for (int64_t q = 0; q < vecs; q += kNhwcVecs) {
      const int64_t nq = std::min<int64_t>(kNhwcVecs, vecs - q);
      for (int64_t j = 0; j < tiles; j += kNhwcTiles)
        kNhwcGemm[std::min<int64_t>(kNhwcTiles, tiles - j) - 1][nq - 1](
            u_e + q * kLanes, p.u_row(), v_e + j * stride, stride, C, m_e + j * p.block + q * kLanes, p.block);
    }
  }
}

// Channels-last y (N, OH, OW, O) for output channels [o0, o0 + p.block) and the chunk's tiles
// [first + a, first + b) from M: each tile's 2x2 pixels, 16 channels a store, masked to the
// channels and the image.
inline void transform_outputs_nhwc(const Plan& p, const float* m, int64_t o0, int64_t first, int64_t a, int64_t b,
                                   const float* bias, float* y) {
  const int64_t per_image = p.tiles_h * p.tiles_w, OH = p.OH, OW = p.OW, O = p.O, m_plane = p.m_plane();
  const int64_t o1 = std::min(O, o0 + p.block);
  for (int64_t j = a; j < b; ++j) {
    const int64_t tile = first + j, n = tile / per_image, rest = tile - n * per_image;
    const int64_t h0 = 2 * (rest / p.tiles_w), w0 = 2 * (rest % p.tiles_w);
    float* pixel = y + ((n * OH + h0) * OW + w0) * O;
    for (int64_t o = o0; o < o1; o += kLanes) {
      const __mmask16 lanes = lane_range(0, o1 - o);
      __m512 mt[16];
      for (int e = 0; e < kTerms; ++e) mt[e] = _mm512_loadu_ps(m + e * m_plane + (j - a) * p.block + (o - o0));
      __m512 out[2][2];
      output_transform(mt, bias ? _mm512_maskz_loadu_ps(lanes, bias + o) : _mm512_setzero_ps(), out);
      for (int r = 0; r < 2 && h0 + r < OH; ++r) {
        _mm512_mask_storeu_ps(pixel + r * OW * O + o, lanes, out[r][0]);
        if (w0 + 1 < OW) _mm512_mask_storeu_ps(pixel + r * OW * O + O + o, lanes, out[r][1]);
      }
    }
  }
}

}  // namespace winograd

// y (N, O, OH, OW) = conv2d(x, W, bias, padding) for float32 x and y, both NCHW-contiguous or
// both channels-last (``channels_last``; bias: O floats or null), where decode_span(o, k0, n, out) writes W[o] flat [k0, k0 + n); it is called
// from several threads at once. Returns false, y unfinished, where x holds a NaN or inf (or a
// value so large its transform overflows): the transform's differences would turn an inf into
// NaN, or reach outputs through pruned weights differently than conv2d; such calls go direct.
template <class DecodeSpan>
bool winograd_conv3x3(const float* x, const float* bias, float* y, const Conv2dGeometry& g,
                      const DecodeSpan& decode_span, bool channels_last) {
  using namespace winograd;
  const Plan p(g);
  const int64_t threads = at::get_num_threads(), blocks = p.blocks();
  std::atomic<bool> finite{true};
  for (int64_t first = 0; first < p.tiles; first += p.chunk) {
    const int64_t count = std::min(p.chunk, p.tiles - first), vectors = ceil_div(count, kLanes);
    // Each part keeps to its own data: it transforms the inputs of its tiles and the weights of its
    // blocks itself, so that nothing one thread writes is read by another (a V shared by the
    // threads made the input transform 3x slower here, 10x at times). Parts split the blocks (each
    // transforming all the chunk's tiles) where repeating the input transform costs less than
    // repeating every block's (a tile's costs ~3x an output channel's), else the tiles.
    const bool by_blocks = blocks >= threads && 3 * count < p.O;
    const int64_t parts = std::min(threads, by_blocks ? blocks : vectors);
    at::parallel_for(0, parts, 1, [&](int64_t part0, int64_t part1) {
      static thread_local Workspace ws;
      for (int64_t part = part0; part < part1; ++part) {
        const int64_t b0 = by_blocks ? part * blocks / parts : 0;
        const int64_t b1 = by_blocks ? (part + 1) * blocks / parts : blocks;
        const int64_t v0 = by_blocks ? 0 : part * vectors / parts;
        const int64_t v1 = by_blocks ? vectors : (part + 1) * vectors / parts;
        const int64_t j0 = first + v0 * kLanes, tiles = std::min(count, v1 * kLanes) - v0 * kLanes;
        if (b0 == b1 || tiles <= 0) continue;
        const int64_t v_plane = channels_last ? p.v_plane_nhwc(tiles) : p.v_plane(tiles);
        float* v = kept_buffer(ws.v, kTerms * v_plane);
        float* m = kept_buffer(ws.m, kTerms * p.m_plane());
        const bool ok = channels_last ? transform_inputs_nhwc(p, x, j0, tiles, v, v_plane)
                                      : transform_inputs(p, x, j0, tiles, v, v_plane);
        if (!ok) finite.store(false, std::memory_order_relaxed);
        for (int64_t block = b0; block < b1 && finite.load(std::memory_order_relaxed); ++block) {
          transform_weights(p, block, decode_span, ws);
          for (int64_t a = 0; a < tiles; a += p.range) {
            const int64_t b = std::min(tiles, a + p.range);
            if (channels_last) {
              multiply_nhwc(p, ws.u.data(), v + a * p.c_stride(), v_plane, b - a, m);
              transform_outputs_nhwc(p, m, block * p.block, j0, a, b, bias, y);
            } else {
              multiply(p, ws.u.data(), v + a * p.C, v_plane, b - a, m);
              transform_outputs(p, m, block * p.block, j0, a, b, bias, y);
            }
          }
        }
      }
    });
    if (!finite.load()) return false;
  }
  return true;
}
#endif

}  // namespace mixedprec
