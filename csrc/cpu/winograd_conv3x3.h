// Winograd F(2x2, 3x3) convolution for lut_conv2d's CPU kernel (3x3, stride 1, dilation 1, one
// group): each 2x2 output tile is A^T [sum_c (G g_oc G^T) . (B^T d_c B)] A, 16 multiplies per
// tile and channel pair instead of 36 (Lavin & Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016). oneDNN's direct convolution runs near this CPU's peak already, so fewer
// multiplies is what lets a kernel that also decodes its weight go faster than it.
//
// Per call: the input tiles are transformed chunk by chunk (V[t][c][tile], at most kChunkBytes),
// and work items (a block of output channels x a range of tiles) each decode their block's codes,
// transform them (U[t][c][o], kept while the thread's next item has the same block), run 16
// GEMMs M[t] = U[t]^T V[t] in an 8-channel x 48-tile register block, and transform M back into y.
// The float weight is never whole in memory: a block is at most 16 x C x kMaxBlock floats.
// All buffers are kept per thread between calls (fresh large allocations page-fault each call).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "code_decode.h"
#include "mixedprec/lut_weight.h"

namespace mixedprec {

// The geometries this path takes (the rest go through ATen's convolution). Its kernels are AVX-512.
inline bool winograd_conv3x3_applies(const Conv2dGeometry& g) {
#if defined(MP_DECODE_AVX512)
  return g.kernel_h == 3 && g.kernel_w == 3 && g.stride_h == 1 && g.stride_w == 1 && g.dil_h == 1 &&
         g.dil_w == 1 && g.groups == 1 && g.in_channels >= 8 && g.out_channels >= 8;
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
constexpr int64_t kChunkBytes = 4 << 20;       // transformed input tiles per chunk
constexpr int64_t kBlockBytes = 256 << 10;     // transformed weight block (at least 16 channels)
constexpr int64_t kItemBytes = 128 << 10;      // GEMM results of one work item

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline float* kept_buffer(std::vector<float>& buffer, int64_t floats) {
  if (int64_t(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

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

struct Plan {
  int64_t batch, C, O, H, W, OH, OW, pad_h, pad_w;
  int64_t tiles_h, tiles_w, tiles;  // 2x2 output tiles, n-major then row-major
  int64_t block;                    // output channels per work item (a multiple of 16)
  int64_t chunk;                    // tiles per transformed-input chunk (a multiple of kLanes)
  int64_t range;                    // tiles per work item (a multiple of kLanes)

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
};

// Where a tile's 4x4 input patch and 2x2 output start.
struct TileOrigin {
  int64_t n, row, col;  // output row and column of the tile's top left (even)
  TileOrigin(const Plan& p, int64_t tile) {
    n = tile / (p.tiles_h * p.tiles_w);
    const int64_t rest = tile - n * p.tiles_h * p.tiles_w;
    row = 2 * (rest / p.tiles_w), col = 2 * (rest % p.tiles_w);
  }
};

// V[t][c][j] for the chunk's tiles [first, first + count), lanes past count zero.
inline void transform_inputs(const Plan& p, const float* x, int64_t first, int64_t count, float* v) {
  const int64_t vectors = ceil_div(count, kLanes), plane = p.H * p.W;
  at::parallel_for(0, vectors, 1, [&](int64_t v0, int64_t v1) {
    for (int64_t vec = v0; vec < v1; ++vec) {
      int64_t offset[kLanes];  // of the patch's top left in channel 0 of its image
      bool interior[kLanes], live[kLanes];
      int64_t top[kLanes], left[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        const int64_t j = vec * kLanes + l;
        live[l] = j < count;
        const TileOrigin o(p, first + std::min(j, count - 1));
        top[l] = o.row - p.pad_h, left[l] = o.col - p.pad_w;
        interior[l] = top[l] >= 0 && top[l] + 4 <= p.H && left[l] >= 0 && left[l] + 4 <= p.W;
        offset[l] = o.n * p.C * plane + top[l] * p.W + left[l];
      }
      for (int64_t c = 0; c < p.C; ++c) {
        __m512 d[16], t[16];
        for (int l = 0; l < kLanes; ++l) {
          const float* src = x + offset[l] + c * plane;
          if (live[l] && interior[l]) {
            __m512 z = _mm512_castps128_ps512(_mm_loadu_ps(src));
            z = _mm512_insertf32x4(z, _mm_loadu_ps(src + p.W), 1);
            z = _mm512_insertf32x4(z, _mm_loadu_ps(src + 2 * p.W), 2);
            d[l] = _mm512_insertf32x4(z, _mm_loadu_ps(src + 3 * p.W), 3);
            continue;
          }
          alignas(64) float patch[16] = {};
          for (int r = 0; live[l] && r < 4; ++r)
            for (int s = 0; s < 4; ++s) {
              const int64_t h = top[l] + r, w = left[l] + s;
              if (h >= 0 && h < p.H && w >= 0 && w < p.W) patch[4 * r + s] = src[r * p.W + s];
            }
          d[l] = _mm512_load_ps(patch);
        }
        transpose16(d);
        input_transform(d, t);
        for (int e = 0; e < kTerms; ++e) _mm512_storeu_ps(v + (e * p.C + c) * p.chunk + vec * kLanes, t[e]);
      }
    }
  });
}

// acc[i][j] = sum_c u[c * u_stride + i] * v[c * v_stride + 16 j .. + 16], stored at m + i * m_stride.
template <int kVecs>
void gemm_block(const float* u, int64_t u_stride, const float* v, int64_t v_stride, int64_t C, float* m,
                int64_t m_stride) {
  __m512 acc[kOutRows][kVecs];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c, u += u_stride, v += v_stride) {
    __m512 b[kVecs];
    for (int j = 0; j < kVecs; ++j) b[j] = _mm512_loadu_ps(v + kLanes * j);
    for (int i = 0; i < kOutRows; ++i) {
      const __m512 a = _mm512_set1_ps(u[i]);
      for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < kOutRows; ++i)
    for (int j = 0; j < kVecs; ++j) _mm512_storeu_ps(m + i * m_stride + kLanes * j, acc[i][j]);
}

// One thread's buffers, kept between calls.
struct Workspace {
  std::vector<float> rows, taps, u, m;
  int64_t block = -1;  // whose U is in u
};

template <class DecodeRow>
void transform_weights(const Plan& p, int64_t block, const DecodeRow& decode_row, Workspace& ws) {
  const int64_t o0 = block * p.block, o1 = std::min(p.O, o0 + p.block), R = 9 * p.C;
  const int64_t R16 = ceil_div(R, 16) * 16;
  float* rows = kept_buffer(ws.rows, p.block * R16);
  float* taps = kept_buffer(ws.taps, R16 * 16);
  float* u = kept_buffer(ws.u, kTerms * p.C * p.block);
  for (int64_t o = o0; o < o1; ++o) decode_row(o, rows + (o - o0) * R16);
  std::fill(rows + (o1 - o0) * R16, rows + p.block * R16, 0.f);  // channels past O: zero weights
  for (int64_t q = 0; q < p.block; q += 16) {
    for (int64_t k0 = 0; k0 < R; k0 += 16) {  // taps[k][16 channels] <- rows[q..q+16)[k]
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows + (q + i) * R16 + k0);
      transpose16(r);
      for (int k = 0; k < 16; ++k) _mm512_storeu_ps(taps + (k0 + k) * 16, r[k]);
    }
    for (int64_t c = 0; c < p.C; ++c) {
      __m512 g[9], t[16];
      for (int k = 0; k < 9; ++k) g[k] = _mm512_loadu_ps(taps + (9 * c + k) * 16);
      weight_transform(g, t);
      for (int e = 0; e < kTerms; ++e) _mm512_storeu_ps(u + (e * p.C + c) * p.block + q, t[e]);
    }
  }
  ws.block = block;
}

// y for output channels [o0, o0 + p.block) and the chunk's tiles [first + a, first + b) from M.
inline void transform_outputs(const Plan& p, const float* m, int64_t o0, int64_t first, int64_t a, int64_t b,
                              const float* bias, float* y) {
  const int64_t plane = p.OH * p.OW;
  for (int64_t vec = 0; vec * kLanes < b - a; ++vec) {
    const int64_t lanes = std::min<int64_t>(kLanes, b - a - vec * kLanes);
    const TileOrigin origin(p, first + a + vec * kLanes);
    // One stretch of a tile row, clear of the right and bottom edges: stored as two vector rows.
    const bool stretch = lanes == kLanes && origin.col / 2 + kLanes <= p.tiles_w &&
                         origin.col + 2 * kLanes <= p.OW && origin.row + 2 <= p.OH;
    for (int64_t o = o0; o < std::min(p.O, o0 + p.block); ++o) {
      __m512 mt[16];
      for (int e = 0; e < kTerms; ++e) mt[e] = _mm512_loadu_ps(m + (e * p.block + o - o0) * p.range + vec * kLanes);
      __m512 z[8];  // A^T M: 2 rows of 4
      for (int s = 0; s < 4; ++s) {
        z[s] = _mm512_add_ps(_mm512_add_ps(mt[s], mt[4 + s]), mt[8 + s]);
        z[4 + s] = _mm512_sub_ps(_mm512_sub_ps(mt[4 + s], mt[8 + s]), mt[12 + s]);
      }
      const __m512 beta = _mm512_set1_ps(bias ? bias[o] : 0.f);
      __m512 out[4];  // (A^T M) A + bias: element 2 * row + column
      for (int r = 0; r < 2; ++r) {
        out[2 * r] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(z[4 * r], z[4 * r + 1]), z[4 * r + 2]), beta);
        out[2 * r + 1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(z[4 * r + 1], z[4 * r + 2]), z[4 * r + 3]), beta);
      }
      if (stretch) {
        const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        float* dst = y + (origin.n * p.O + o) * plane + origin.row * p.OW + origin.col;
        for (int r = 0; r < 2; ++r, dst += p.OW) {
          _mm512_storeu_ps(dst, _mm512_permutex2var_ps(out[2 * r], lo, out[2 * r + 1]));
          _mm512_storeu_ps(dst + kLanes, _mm512_permutex2var_ps(out[2 * r], hi, out[2 * r + 1]));
        }
        continue;
      }
      alignas(64) float lane[4][kLanes];
      for (int e = 0; e < 4; ++e) _mm512_store_ps(lane[e], out[e]);
      for (int64_t l = 0; l < lanes; ++l) {
        const TileOrigin t(p, first + a + vec * kLanes + l);
        float* dst = y + (t.n * p.O + o) * plane + t.row * p.OW + t.col;
        for (int r = 0; r < 2 && t.row + r < p.OH; ++r)
          for (int s = 0; s < 2 && t.col + s < p.OW; ++s) dst[r * p.OW + s] = lane[2 * r + s][l];
      }
    }
  }
}

}  // namespace winograd

// y (N, O, OH, OW) = conv2d(x, W, bias, padding) for float32 NCHW-contiguous x and y (bias: O
// floats or null), where decode_row(o, row) writes W's row o (C * 9 floats); it is called from
// several threads at once.
template <class DecodeRow>
void winograd_conv3x3(const float* x, const float* bias, float* y, const Conv2dGeometry& g,
                      const DecodeRow& decode_row) {
  using namespace winograd;
  const Plan p(g);
  static thread_local std::vector<float> chunk_buffer;
  float* v = kept_buffer(chunk_buffer, kTerms * p.C * p.chunk);
  for (int64_t first = 0; first < p.tiles; first += p.chunk) {
    const int64_t count = std::min(p.chunk, p.tiles - first);
    transform_inputs(p, x, first, count, v);
    const int64_t ranges = ceil_div(count, p.range);
    at::parallel_for(0, p.blocks() * ranges, 1, [&](int64_t i0, int64_t i1) {
      static thread_local Workspace ws;
      ws.block = -1;  // another call's weight may be there
      float* m = kept_buffer(ws.m, kTerms * p.block * p.range);
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t block = item / ranges, a = (item % ranges) * p.range, b = std::min(count, a + p.range);
        if (ws.block != block) transform_weights(p, block, decode_row, ws);
        const int64_t vecs = ceil_div(b - a, kLanes);
        for (int e = 0; e < kTerms; ++e) {
          const float* u_e = ws.u.data() + e * p.C * p.block;
          const float* v_e = v + e * p.C * p.chunk + a;
          for (int64_t o = 0; o < p.block; o += kOutRows) {
            float* m_e = m + (e * p.block + o) * p.range;
            for (int64_t j = 0; j < vecs; j += kMaxVecs) {
              const int64_t n = std::min<int64_t>(kMaxVecs, vecs - j), off = j * kLanes;
              if (n == 3) gemm_block<3>(u_e + o, p.block, v_e + off, p.chunk, p.C, m_e + off, p.range);
              else if (n == 2) gemm_block<2>(u_e + o, p.block, v_e + off, p.chunk, p.C, m_e + off, p.range);
              else gemm_block<1>(u_e + o, p.block, v_e + off, p.chunk, p.C, m_e + off, p.range);
            }
          }
        }
        transform_outputs(p, m, block * p.block, first, a, b, bias, y);
      }
    });
  }
}
#endif

}  // namespace mixedprec
