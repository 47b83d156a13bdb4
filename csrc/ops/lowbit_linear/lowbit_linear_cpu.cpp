// lowbit_linear on the CPU: y = x W^T (forward) and grad_x = grad_y W (backward) with W read
// from the packed format (include/mixedprec/packed_weight.h), never materialized as a whole.
// Arguments are checked by the glue (lowbit_linear_glue.cpp).
//
// Work unit: a block of kRowBlock output channels. Up to kRegisterBatch batch rows (the
// register-blocked limit of cpu/lowbit_simd.h, AVX2 or AVX-512 builds), each output row is
// decoded in registers and multiplied into x at once (simd::forward_rows, or fused_rows for the
// interleaved rows below: bits/8 B of codes + 1/8 B of bitmap read per weight, no float tile; a
// sparse row's kept codes are read first as one run into a row buffer), at every bits 1..8, dense
// or sparse; the codes and bitmap about 8 kB ahead are prefetched. Larger batches decode the
// block's rows into a thread-local float tile (decode_span; kRowBlock * in floats, L1/L2
// resident), then multiply every batch row with the tile while it is hot. set_cpu_simd(false)
// selects the scalar twin (decode_run + dot_block), which tests compare with them: every path sums
// dot_block's order (see lowbit_simd.h), so they agree bit for bit.
//
// Dense and sparse rows of up to 5 bits take the columns in an interleaved order on
// AVX-512 builds (both x and W, so the dot products are the same sums; interleave_steps): one
// 64-byte register holds 16 lanes of 32 bits, and lane l, bits [b s, b s + b) is column
// (32/b) l + s of the block (dense 4-, 2- and 1-bit rows starting on a byte as stored; the others'
// codes spread one per byte first, b = 8, with VBMI2); shifting the register by b and looking the
// low bits of each lane up with one permute yields the 16 levels of step s (DenseBlocks,
// ByteBlocks, SparseBlocks; fused_rows multiplies up to kFusedBatch batch rows at once).
// Every path of such weights below kGemmBatch rows (register-decoded small batches, decode tile,
// scalar twin) uses that order; from there only the dense 32-bit-lane rows keep it (see
// lowbit_linear_forward).
//
// From kGemmBatch batch rows on, SIMD builds run batch rows in the vector lanes over blocks of
// decoded rows (lane_forward) up to kLaneBatch; from there (and without SIMD) blocks of decoded
// rows go through ATen's sgemm (below); from kTileBatch on, tiles of the decoded weight meet all
// of x in one sgemm over every thread.
//
// Backward: grad_x = (grad_y * scale) W. Output channels split into a fixed number of chunks (by
// shape, not thread count: results are deterministic), each adding its blocks of decoded rows
// (through sgemm) into its own partial grad_x, summed in chunk order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/code_decode.h"
#include "cpu/kept_buffer.h"
#include "cpu/lowbit_simd.h"
#include "cpu/switches.h"
#include "cpu/vec_ops.h"
#include "mixedprec/packed_weight.h"
#include "ops/lowbit_linear/lowbit_linear_cpu.h"
#include "register/op.h"

#if defined(MP_DECODE_AVX512) && !defined(MP_LOWBIT_SIMD)
#error "AVX-512 builds take the interleaved path on top of lowbit_simd.h, which needs BMI2 (every AVX-512 CPU has it)"
#endif

namespace mixedprec {
namespace {

constexpr int64_t kRowBlock = 8;
constexpr int64_t kMaxChunks = 16;
// From this batch on, the forward decodes kGemmRows rows at a time into a float block and
// multiplies it with ATen's sgemm (4096 x 4096, batch 64, one thread: 50 ms through the decode
// tile's 2 x 2 dot blocks, 64 ms for fp32 F.linear, 51 ms this way). Each task decodes and
// multiplies its own blocks (one parallel region a call: with a region per block, a loaded
// machine spent 0.5 s a call in barriers). Below it the dot blocks keep a row's result
// independent of the other rows of its batch. The backward always takes blocks.
constexpr int64_t kGemmBatch = 16;
constexpr int64_t kGemmRows = 64;
// From kTileBatch batch rows on (a CNN's pixels, a prefill), W is decoded into tiles of at most
// kTileFloats floats (16 MB, half of this machine's L3) and each tile multiplied with all of x by
// one sgemm over every thread (tiled_forward): there each decoded weight serves >= 512
// multiply-adds, which outweighs streaming the tile through the cache. Below it the per-task
// blocks above, which stay in L2, were faster (Zen 4, 2 threads: 4096 x 4096 at 128 rows 26-27
// against 31-32 ms, 256 rows 48-58 against 52-67; at 512 rows 108-111 against 99-102; ConvNeXt's
// 3136 x 96 -> 384 1.7-2.7 against 1.3-1.9 ms, 784 x 192 -> 768 1.4-2.8 against 1.3-2.5). With
// the tile kept across calls (no fresh pages) the blocks still won below 512 rows: 384 -> 1536 at
// 32-256 rows 0.33-1.75 against 0.41-1.76 ms tiled, 4096 x 4096 8.2-47 against 26.5-67.9.
constexpr int64_t kTileBatch = 512;
constexpr int64_t kTileFloats = int64_t(1) << 22;
// Weights per task at least: small layers run on one thread (a parallel region costs more).
constexpr int64_t kTaskWeights = 1 << 15;
// Up to this batch the forward decodes every row in registers (one pass of simd::kMaxRows), above
// it through the decode tile (the same sums either way; measured on 4096 x 4096 with AVX2: at
// batch 16 the tile takes a third of the time of six register passes).
#if defined(MP_LOWBIT_SIMD)
constexpr int64_t kRegisterBatch = simd::kMaxRows;
static_assert(simd::kLanes == Vec::size(), "the register path sums in dot_block's lane order");
#endif

// kAccumulators independent FMA chains (vector step j feeds chain j % kAccumulators, see
// for_each_step), added pairwise at the end: the order cpu/lowbit_simd.h's kernels follow.
constexpr int kAccumulators = kChains;

inline float finish_dot(Vec (&acc)[kAccumulators]) {
  return float(lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3])));
}

// Columns in the interleaved order: blocks of 16 * steps columns (one 64-byte load of codes);
// column steps l + s of a block goes to position 16 s + l. Columns past the last whole block
// keep their place.
struct Interleave {
  int64_t steps, block, end;  // end = first column of the tail
  Interleave(int64_t steps_, int64_t in) : steps(steps_), block(16 * steps), end(in - in % block) {}
  int64_t position(int64_t i) const {
    if (i >= end) return i;
    const int64_t r = i % block;
    return i - r + 16 * (r % steps) + r / steps;
  }
  // dst[position(i)] = src[i] for i < in (a steps x 16 transpose per block, no divisions).
  void apply(const float* src, float* dst, int64_t in) const {
    for (int64_t b = 0; b < end; b += block)
      for (int64_t l = 0; l < 16; ++l)
        for (int64_t s = 0; s < steps; ++s) dst[b + 16 * s + l] = src[b + steps * l + s];
    std::copy(src + end, src + in, dst + end);
  }
};

// Dense 4-, 2- and 1-bit rows starting on a byte: 32 / bits codes per 32-bit lane (DenseBlocks).
bool dense_lanes(const PackedView& w) {
  return !w.keep_bitmap && (w.bits == 4 || w.bits == 2 || w.bits == 1) && (w.row_length * w.bits) % 8 == 0;
}

// The rows whose forward runs in the interleaved order (0: column order), as its steps per block:
// dense_lanes rows (AVX-512 builds), and the other rows of up to 5 bits, dense or sparse, 4 codes
// per lane, one per byte (AVX-512 VBMI2 builds: ByteBlocks, SparseBlocks). Every
// path of such weights below kGemmBatch rows sums in that order; the AVX2 kernels take every row
// in column order.
int64_t interleave_steps(const PackedView& w) {
#if defined(MP_DECODE_AVX512)
  if (dense_lanes(w)) return 32 / w.bits;
#endif
#if defined(MP_BYTE_CODES)
  if (w.bits <= 5) return 4;
#endif
  (void)w;
  return 0;
}

#if defined(MP_DECODE_AVX512)
// Dense interleaved rows, one block of 16 * kSteps columns per 64-byte load: shifting the whole
// register by kBits and looking the low 4 bits of each lane up with vpermps yields the 16 levels
// of step s, one shuffle per 16 weights (Zen 4, 1 thread, 4096 x 4096 at batch 1: 0.7 against
// 0.9 ms at 2 bits for lowbit_simd.h's generic decode with vpermb, 2.5 ms before it). A 2- or
// 1-bit codebook is repeated in the register, so the bits above a code need no masking.
template <int kBits>
struct DenseBlocks {
  static constexpr int kSteps = 32 / kBits;
  // One row's blocks, read in order (a value, so that its state stays in registers).
  struct Row {
    const uint8_t* src;
    __m512 lut;
    // Every step of the row's next block: step(s, chain, levels).
    template <class Step>
    void next(Step&& step) {
      __builtin_prefetch(src + kPrefetchBytes);
      __m512i lanes = _mm512_loadu_si512(src);
      src += 64;
      for_each_step<kSteps>([&](int64_t s, auto chain) {
        step(s, chain, _mm512_permutexvar_ps(lanes, lut));
        lanes = _mm512_srli_epi32(lanes, kBits);
      });
    }
  };
  const uint8_t* codes;
  int64_t row_bytes;
  __m512 lut;
  DenseBlocks(const PackedView& w, int64_t, int64_t) : codes(w.codes), row_bytes(w.row_length * kBits / 8) {
    float repeated[16];
    for (int i = 0; i < 16; ++i) repeated[i] = w.codebook[i & ((1 << kBits) - 1)];
    lut = _mm512_loadu_ps(repeated);
  }
  Row start(int64_t c) const { return {codes + c * row_bytes, lut}; }
};
#endif

#if defined(MP_BYTE_CODES)
// Dense rows of kBits <= 5 that DenseBlocks does not take (3 and 5 bits; 1, 2 and 4 starting
// mid-byte), blocks of 64 columns: one load, vpermb and vpmultishiftqb put code t in byte t
// (lowbit_simd.h's ByteCodes, per starting bit of the row), lane l holding columns 4l .. 4l + 3;
// its bytes shifted down and each lane's low 5 bits looked up in 32 entries (the codebook,
// repeated below 5 bits: the bits above a code need no masking) yield the step's 16 levels. Per
// 64 columns: 3 shuffles, 3 shifts and 4 vpermt2ps, against 4 loads, vpermb, vpsrlvd and vpermt2ps
// in column order (lowbit_simd.h's CodeReader; measured in docs/kernels.md).
template <int kBits>
struct ByteBlocks {
  static constexpr int kSteps = 4;
  struct Row {  // one row's blocks, read in order (a value, so that its state stays in registers)
    const uint8_t* codes;
    int64_t nbytes, p;  // p: the block's first bit
    const simd::ByteCodes<kBits>* read;
    __m512 lo, hi;
    template <class Step>
    void next(Step&& step) {
      // past the stream's end a masked load reads 0 (ByteCodes' own fallback is a call, around
      // which GCC kept the accumulators in memory: 1.1 against 1.2 ms at 5 bits, one thread)
      const int64_t at = p >> 3;
      __builtin_prefetch(codes + at + kPrefetchBytes);
      const __m512i v = __builtin_expect(at + 64 <= nbytes, 1)
                            ? _mm512_loadu_si512(codes + at)
                            : _mm512_maskz_loadu_epi8(at < nbytes ? _bzhi_u64(~0ull, unsigned(nbytes - at)) : 0, codes + at);
      const __m512i lanes = read->spread(v);
      p += 64 * kBits;
      for_each_step<kSteps>([&](int64_t s, auto chain) {
        step(s, chain, _mm512_permutex2var_ps(lo, _mm512_srli_epi32(lanes, 8 * int(s)), hi));
      });
    }
  };
  const PackedView& w;
  int64_t nbytes;
  __m512 lo, hi;
  std::array<std::optional<simd::ByteCodes<kBits>>, 8> readers;  // per starting bit, built when met
  ByteBlocks(const PackedView& w_, int64_t, int64_t) : w(w_), nbytes(simd::code_bytes(w_)) {
    float table[32];
    for (int i = 0; i < 32; ++i) table[i] = w.codebook[i & ((1 << kBits) - 1)];
    lo = _mm512_loadu_ps(table), hi = _mm512_loadu_ps(table + 16);
  }
  Row start(int64_t c) {
    const int64_t p = c * w.row_length * kBits;
    auto& read = readers[p & 7];
    if (!read) read.emplace(int(p & 7));
    return {w.codes, nbytes, p, &*read, lo, hi};
  }
};

// Sparse rows of kBits <= 5, blocks of 64 columns: the row's kept codes are first read as one run,
// one per byte with a kept bit set (the next row's while this one is multiplied: a load spanning
// two pending stores waits for them); a block's 64 bitmap bits spread them over its columns with
// one vpexpandb, pruned columns 0. Lane l of that register holds columns 4l .. 4l + 3, one per
// byte: its bytes shifted down and each lane's low 5 bits looked up in 32 entries yield the step's
// 16 levels, 0 where pruned: up to 4 bits the kept bit is bit 4 and the entries 16 zeros, then
// the levels (no mask); at 5 bits it is bit 7, tested into the permute's zero mask. Per 64
// columns that is 1 expand, 4 vpermt2ps and 3 shifts (and 4 tests), against 1 expand, 4 vpermb,
// 4 vpermt2ps and 3 mask shifts in column order (lowbit_simd.h's ByteSparseSrc; measured in
// docs/kernels.md).
template <int kBits>
struct SparseBlocks {
  static constexpr int kSteps = 4;
  static constexpr int kKept = kBits <= 4 ? 16 : 128;  // a kept column's bit in its byte
  // One row's blocks, read in order (a value, so that its state stays in registers).
  struct Row {
    const uint8_t* kept;    // the row's kept codes, with kKept set
    const uint8_t* bitmap;  // the byte of the block's first column (rows starting on a byte)
    int64_t f, nbytes;      // else: the block's first column, as a bit of the whole bitmap
    __m512 lo, hi;
    template <class Step>
    void next(Step&& step) {
      uint64_t keep;
      if (bitmap) __builtin_prefetch(bitmap + kPrefetchBytes / 4), std::memcpy(&keep, bitmap, 8), bitmap += 8;
      else keep = simd::bits64_at(bitmap_base, nbytes, f), f += 64;
      const __m512i lanes = _mm512_maskz_expand_epi8(keep, _mm512_loadu_si512(kept));
      kept += __builtin_popcountll(keep);
      for_each_step<kSteps>([&](int64_t s, auto chain) {
        const __m512i index = _mm512_srli_epi32(lanes, 8 * int(s));
        if constexpr (kBits <= 4) {
          step(s, chain, _mm512_permutex2var_ps(lo, index, hi));
        } else {  // 32 levels: the pruned lanes masked by the kept bit
          const __mmask16 kept_lanes = _mm512_test_epi32_mask(lanes, _mm512_set1_epi32(kKept << (8 * int(s))));
          step(s, chain, _mm512_maskz_permutex2var_ps(kept_lanes, lo, index, hi));
        }
      });
    }
    const uint8_t* bitmap_base;
  };
  const PackedView& w;
  int64_t c_end, nbytes, in, ld, ready = -1;
  __m512 lo, hi;
  uint8_t* buffers;  // two rows' kept codes, each followed by at least 64 readable bytes
  SparseBlocks(const PackedView& w_, int64_t, int64_t c1)
      : w(w_), c_end(c1), nbytes(simd::code_bytes(w_)), in(w_.row_length), ld(w_.row_length + 128) {
    float table[32] = {};  // up to 4 bits, entries 0-15: pruned
    for (int i = 0; i < (1 << kBits); ++i) table[kBits <= 4 ? 16 + i : i] = w.codebook[i];
    lo = _mm512_loadu_ps(table), hi = _mm512_loadu_ps(table + 16);
    static thread_local std::vector<uint8_t> kept_rows;
    buffers = kept_buffer(kept_rows, 2 * ld);
  }
  void prepare(int64_t c) {  // row c's kept codes, with kKept set, a byte each
    uint8_t* dst = buffers + (c & 1) * ld;
    const int64_t f0 = c * in, count = kept_between(w, f0, f0 + in), p0 = kept_before(w, f0) * kBits;
    const simd::ByteCodes<kBits> read(int(p0 & 7));
    const __m512i mask = _mm512_set1_epi8(char((1 << kBits) - 1)), kept_bit = _mm512_set1_epi8(char(kKept));
    for (int64_t t = 0; t < count; t += 64) {  // (code & mask) | kKept
      __builtin_prefetch(w.codes + (p0 + t * kBits) / 8 + kPrefetchBytes);
      _mm512_storeu_si512(dst + t, _mm512_ternarylogic_epi32(read(w.codes, nbytes, p0 + t * kBits), mask, kept_bit, 0xea));
    }
  }
  Row start(int64_t c) {
    if (ready != c) prepare(c);
    if (c + 1 < c_end) prepare(c + 1);
    ready = c + 1;
    const int64_t f0 = c * in;
    const uint8_t* aligned = f0 % 8 == 0 ? w.keep_bitmap + f0 / 8 : nullptr;
    return {buffers + (c & 1) * ld, aligned, f0, w.bitmap_bytes(), lo, hi, w.keep_bitmap};
  }
};
#endif

// f(std::type_identity<Blocks>) for an interleaved weight's block source.
template <class F>
void with_interleaved_blocks(const PackedView& w, F&& f) {
#if defined(MP_DECODE_AVX512)
  if (dense_lanes(w)) {
    if (w.bits == 4) return f(std::type_identity<DenseBlocks<4>>{});
    if (w.bits == 2) return f(std::type_identity<DenseBlocks<2>>{});
    return f(std::type_identity<DenseBlocks<1>>{});
  }
#endif
#if defined(MP_BYTE_CODES)
  with_int<1, 5>(w.bits, [&](auto B) {
    if (w.keep_bitmap) {
      f(std::type_identity<SparseBlocks<B()>>{});
    } else {
      f(std::type_identity<ByteBlocks<B()>>{});
    }
  });
#endif
}

#if defined(MP_DECODE_AVX512)
// Rows [c0, c1) of an interleaved weight (see Interleave), row c at out + (c - c0) * stride: the
// blocks' levels, then the columns past them in their place. One block source for the rows (its
// tables and code readers built once, a sparse row's kept codes read while the row before it is
// decoded).
template <class Blocks>
void decode_rows_interleaved_simd(const PackedView& w, int64_t c0, int64_t c1, float* out, int64_t stride) {
  const int64_t in = w.row_length;
  const Interleave order(Blocks::kSteps, in);
  Blocks blocks(w, c0, c1);
  for (int64_t c = c0; c < c1; ++c) {
    float* row = out + (c - c0) * stride;
    auto reader = blocks.start(c);
    int64_t k = 0;
    for (; k < order.end; k += order.block)
      reader.next([&](int64_t s, auto, __m512 levels) { _mm512_storeu_ps(row + k + 16 * s, levels); });
    decode_span(w, c * in + k, in - k, row + k, true);
  }
}

constexpr int64_t kFusedBatch = 4;
// Batch rows up to which the fused kernel serves, in groups of kFusedBatch (each decoding the rows
// again), rather than the decode tile: dense 32-bit-lane rows up to kGemmBatch (4096 x 4096, 2
// threads, 4-bit: batch 5 1.37-1.44 against 2.24-2.63 ms, 8 2.17-2.27 against 2.82-2.99, 15
// 3.63-3.83 against 4.58-5.30; 1-bit alike), the others only one group (sparse 4- and 5-bit and
// dense 3-bit rows, whose decode costs more, ran within noise at 5-8 rows and up to 1.4x slower
// at 12-15).
int64_t fused_rows_limit(const PackedView& w) { return dense_lanes(w) ? kGemmBatch - 1 : kFusedBatch; }

// Small batches (kM rows of interleaved x) times interleaved weights: the codes are decoded in
// registers and multiplied into x at once (no tile), reading bits/8 B per weight (and a sparse
// row's bitmap). The sums are the tile path's exactly (the same FMA chains over the same columns,
// then the tail's vector steps and scalar columns), so results are bit-identical to decode_rows +
// dot_block.
template <class Blocks, int kM>
void fused_rows(const PackedView& w, const float* x, int64_t c0, int64_t c1, float* y) {
  const int64_t in = w.row_length;
  const Interleave order(Blocks::kSteps, in);
  Blocks blocks(w, c0, c1);
  alignas(64) float tail[16 * 32];  // the columns past the blocks (fewer than a block)
  for (int64_t c = c0; c < c1; ++c) {
    __m512 acc[kM][kAccumulators];  // raw registers: as Vec, GCC kept some in memory between blocks
    for (auto& chains : acc)
      for (__m512& a : chains) a = _mm512_setzero_ps();
    const auto fma = [&](int64_t k, auto chain, __m512 levels) {
      for (int m = 0; m < kM; ++m) acc[m][chain] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * in + k), levels, acc[m][chain]);
    };
    auto reader = blocks.start(c);
    int64_t k = 0;
    for (; k < order.end; k += order.block)
      reader.next([&](int64_t s, auto chain, __m512 levels) { fma(k + 16 * s, chain, levels); });
    decode_span(w, c * in + k, in - k, tail, true);
    const int64_t tail_steps = (in - k) / 16;
    for_each_step(tail_steps, [&](int64_t t, auto chain) { fma(k + 16 * t, chain, _mm512_load_ps(tail + 16 * t)); });
    for (int m = 0; m < kM; ++m) {
      Vec chains[kAccumulators] = {Vec(acc[m][0]), Vec(acc[m][1]), Vec(acc[m][2]), Vec(acc[m][3])};
      float s = finish_dot(chains);
      for (int64_t i = k + 16 * tail_steps; i < in; ++i) s += tail[i - k] * x[m * in + i];
      y[m * w.out + c] = w.channel_scale[c] * s;
    }
  }
}

template <class Blocks>
void fused_forward(const PackedView& w, const float* x, int64_t m_rows, int64_t c0, int64_t c1, float* y) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += kFusedBatch) {  // each group of batch rows decodes the rows again
    const float* xm = x + m0 * w.row_length;
    float* ym = y + m0 * w.out;
    switch (std::min(kFusedBatch, m_rows - m0)) {
      case 1: fused_rows<Blocks, 1>(w, xm, c0, c1, ym); break;
      case 2: fused_rows<Blocks, 2>(w, xm, c0, c1, ym); break;
      case 3: fused_rows<Blocks, 3>(w, xm, c0, c1, ym); break;
      default: fused_rows<Blocks, 4>(w, xm, c0, c1, ym);
    }
  }
}
#endif

// Rows [c0, c1) of W / channel_scale (the levels, 0 at pruned positions), row c at
// out + (c - c0) * stride, in column order, or in the interleaved order when `interleave`
// (interleave_steps(w) > 0).
void decode_rows(const PackedView& w, int64_t c0, int64_t c1, bool interleave, float* out, int64_t stride) {
  const bool simd = cpu_simd.load(std::memory_order_relaxed);
#if defined(MP_DECODE_AVX512)
  if (interleave && simd)
    return with_interleaved_blocks(w, [&](auto blocks) {
      decode_rows_interleaved_simd<typename decltype(blocks)::type>(w, c0, c1, out, stride);
    });
#endif
  const int64_t in = w.row_length, ahead = prefetch_ahead(w);
  static thread_local std::vector<float> ordered;  // the scalar twin: column order, then permuted
  for (int64_t c = c0; c < c1; ++c) {
    float* row = out + (c - c0) * stride;
    if (interleave) {
      float* levels = kept_buffer(ordered, in);
      decode_span(w, c * in, in, levels, false);
      Interleave(interleave_steps(w), in).apply(levels, row, in);
    } else {
      if (c + ahead < w.out) prefetch_row(w, c + ahead);
      decode_span(w, c * in, in, row, simd);
    }
  }
}

// dots[i][j] = sum_k a[i n + k] b[j n + k] for i < ma, j < mb (at most 2 x 2): every a and b vector
// is loaded once for the block (half the loads per multiply-add of one dot at a time); each dot
// runs its own kAccumulators chains, summed by finish_dot, then the scalar tail.
template <int MA, int MB>
void dot_block(const float* a, const float* b, int64_t n, float (&dots)[2][2]) {
  Vec acc[MA][MB][kAccumulators];
  for (auto& row : acc)
    for (auto& chains : row)
      for (Vec& c : chains) c = Vec(0.0f);
  const int64_t steps = n / Vec::size();
  for_each_step(steps, [&](int64_t t, auto chain) {
    const int64_t i = t * Vec::size();
    Vec av[MA], bv[MB];
    for (int p = 0; p < MA; ++p) av[p] = Vec::loadu(a + p * n + i);
    for (int q = 0; q < MB; ++q) bv[q] = Vec::loadu(b + q * n + i);
    for (int p = 0; p < MA; ++p)
      for (int q = 0; q < MB; ++q) acc[p][q][chain] = at::vec::fmadd(av[p], bv[q], acc[p][q][chain]);
  });
  for (int p = 0; p < MA; ++p)
    for (int q = 0; q < MB; ++q) {
      float s = finish_dot(acc[p][q]);
      for (int64_t k = steps * Vec::size(); k < n; ++k) s += a[p * n + k] * b[q * n + k];
      dots[p][q] = s;
    }
}

void dot_block(const float* a, int ma, const float* b, int mb, int64_t n, float (&dots)[2][2]) {
  if (ma == 2) return mb == 2 ? dot_block<2, 2>(a, b, n, dots) : dot_block<2, 1>(a, b, n, dots);
  return mb == 2 ? dot_block<1, 2>(a, b, n, dots) : dot_block<1, 1>(a, b, n, dots);
}

// f(c0, block) for the blocks of at most kGemmRows output rows in [c_begin, c_end), in order:
// block (rows x in, in `tile`) holds the levels of rows [c0, c0 + rows) (channel scale not
// applied), in the interleaved order when `interleave`.
template <class F>
void for_each_decoded_block(const PackedView& w, bool interleave, int64_t c_begin, int64_t c_end,
                            std::vector<float>& tile, F&& f) {
  const int64_t in = w.row_length;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kGemmRows) {
    const int64_t rows = std::min(kGemmRows, c_end - c0);
    decode_rows(w, c0, c0 + rows, interleave, tile.data(), in);
    f(c0, at::from_blob(tile.data(), {rows, in}, at::TensorOptions().dtype(at::kFloat)));
  }
}

// x (m_rows, in) W^T for large batches: W decoded (channel scales applied) in balanced tiles of
// whole rows, at most kTileFloats floats each (one tile for most layers), each multiplied with
// every row of x by one ATen sgemm over all threads.
at::Tensor tiled_forward(const at::Tensor& x, const PackedView& w) {
  const int64_t in = w.row_length, out = w.out;
  const int64_t count = ceil_div(out, std::max<int64_t>(1, kTileFloats / std::max<int64_t>(1, in)));
  const int64_t per_tile = ceil_div(out, count);
  const bool simd = cpu_simd.load(std::memory_order_relaxed);
  static thread_local std::vector<float> kept;  // the decoded tile (cpu/kept_buffer.h)
  const at::Tensor tile = kept_tensor(kept, {per_tile, in});
  if (count == 1) {
    decode_scaled_rows(w, 0, out, tile.data_ptr<float>(), simd);
    return at::mm(x, tile.t());
  }
  at::Tensor y = poisoned(at::empty({x.size(0), out}, x.options()));
  for (int64_t c0 = 0; c0 < out; c0 += per_tile) {
    const int64_t rows = std::min(per_tile, out - c0);
    decode_scaled_rows(w, c0, c0 + rows, tile.data_ptr<float>(), simd);
    y.narrow(1, c0, rows).copy_(at::mm(x, tile.narrow(0, 0, rows).t()));
  }
  return y;
}

// The grain of a parallel_for over units of `rows` weight rows: at least kTaskWeights weights a
// task, or multiply-adds where a unit's rows meet a batch (rows = weight rows x batch rows).
int64_t grain(const PackedView& w, int64_t rows) {
  return std::max<int64_t>(1, kTaskWeights / std::max<int64_t>(1, rows * w.row_length));
}

#if defined(MP_LOWBIT_SIMD)
// Batch rows in the vector lanes (kGemmBatch <= batch < kLaneBatch on SIMD builds, rows of up to
// kLaneMaxColumns weights): each task decodes kLaneRows output rows into a kept buffer of their
// levels, then, for every one or two lane vectors of batch rows, runs acc[i] += level[i][k] *
// xt[k] over the columns k in order (one broadcast per weight and pass, one FMA per weight and
// lane vector, 24 independent chains on AVX-512): the levels stay in L2 and serve every batch
// row. Against sgemm on decoded 64-row blocks (Xeon, 2 threads, bits 3/4/8 dense and 4-bit half
// pruned), 4096 x 4096: batch 16 2.8-3.3 against 6.6-7.4 ms, 32 4.2-4.7 against 8.5-9.5, 64
// 7.2-8.3 against 12.1-13.2, 128 14.2-16.3 against 18.5-19.9; 512 x 4608: batch 16 0.60-0.67
// against 0.79-1.38, 32 0.78-0.86 against 0.93-1.05, 64 within noise. From 128 rows on the
// narrow layer lost (2.8-3.0 against 2.4-2.8 ms; at 256 5.5-6.0 against 4.4-4.9: x's lanes
// outgrow L2 and stream once per row block), so larger batches keep sgemm.
// One FMA chain per output, in column order, so a row's result does not depend on the batch
// around it; the scalar twin (set_cpu_simd(false)) sums in the same order, bit for bit (std::fma;
// the build's -ffp-contract=off keeps the other products apart).
constexpr int kLaneRows = Vec::size() == 16 ? 24 : 12;  // accumulators: 24 of 32 zmm, 12 of 16 ymm
constexpr int64_t kLaneBatch = 128;
constexpr int64_t kLaneMaxColumns = 16384;

// out[i][j L + l] = sum_k levels[i kStride + k] xt[j][k][l] for kLaneRows / kVecs rows i and
// kVecs lane vectors j (xt[j]: in x L floats, in * L apart), k in order. Two lane vectors a pass
// (batch 32 on) take half the broadcasts per FMA. The row stride is a compile-time power of two
// plus a cache line (kLaneStrides): a step's broadcasts are fixed offsets from one pointer, in
// different cache sets (with a run-time stride the 24 row pointers spilled to the stack and
// doubled the loads).
template <int64_t kStride, int kVecs>
void lane_dots(const float* levels, int64_t in, const float* xt, float* out, bool simd) {
  constexpr int64_t L = Vec::size();
  constexpr int kRows = kLaneRows / kVecs;
  if (!simd) {  // the scalar twin
    for (int i = 0; i < kRows; ++i)
      for (int64_t l = 0; l < kVecs * L; ++l) {
        float acc = 0.0f;
        for (int64_t k = 0; k < in; ++k)
          acc = std::fma(levels[i * kStride + k], xt[l / L * in * L + k * L + l % L], acc);
        out[i * kVecs * L + l] = acc;
      }
    return;
  }
  Vec acc[kRows][kVecs];  // unrolled, so that the accumulators stay in registers
#pragma GCC unroll 32
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) acc[i][j] = Vec(0.0f);
  for (int64_t k = 0; k < in; ++k, ++levels, xt += L) {
    Vec xv[kVecs];
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) xv[j] = Vec::loadu(xt + j * in * L);
#pragma GCC unroll 32
    for (int i = 0; i < kRows; ++i) {
      const Vec level(levels[i * kStride]);
#pragma GCC unroll 4
      for (int j = 0; j < kVecs; ++j) acc[i][j] = at::vec::fmadd(level, xv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) acc[i][j].store(out + (i * kVecs + j) * L);
}

using LaneDots = void (*)(const float*, int64_t, const float*, float*, bool);
constexpr int64_t kLaneStrides[] = {256 + 16, 1024 + 16, 4096 + 16, kLaneMaxColumns + 16};
template <int kVecs>
constexpr std::array<LaneDots, 4> kLaneDots = {lane_dots<kLaneStrides[0], kVecs>, lane_dots<kLaneStrides[1], kVecs>,
                                               lane_dots<kLaneStrides[2], kVecs>, lane_dots<kLaneStrides[3], kVecs>};

// y (m_rows, out) = x W^T with batch rows in the lanes (x in W's column order).
void lane_forward(const float* x, int64_t m_rows, const PackedView& w, bool interleave, float* y) {
  constexpr int64_t L = Vec::size();
  const int64_t in = w.row_length, out = w.out, vecs = ceil_div(m_rows, L);
  const bool simd = cpu_simd.load(std::memory_order_relaxed);
  const int64_t pick = std::find_if(std::begin(kLaneStrides), std::end(kLaneStrides),
                                    [&](int64_t s) { return s >= in + 16; }) - std::begin(kLaneStrides);
  const int64_t stride = kLaneStrides[pick];
  // xt[v][k][l] = x[v L + l][k], zero past the batch (kept on the calling thread: up to 8 MB)
  static thread_local std::vector<float> kept_xt;
  float* xt = kept_buffer(kept_xt, vecs * in * L);
  at::parallel_for(0, vecs, 1, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v)
      for (int64_t l = 0; l < L; ++l) {
        float* dst = xt + v * in * L + l;
        const float* src = x + (v * L + l) * in;
        const bool live = v * L + l < m_rows;
        for (int64_t k = 0; k < in; ++k) dst[k * L] = live ? src[k] : 0.0f;
      }
  });
  at::parallel_for(0, ceil_div(out, int64_t(kLaneRows)), grain(w, kLaneRows * m_rows), [&](int64_t b0, int64_t b1) {
    static thread_local std::vector<float> kept;  // the block's levels (cpu/kept_buffer.h)
    float* levels = kept_buffer(kept, kLaneRows * stride);
    alignas(64) float dots[kLaneRows * 2 * L];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kLaneRows, rows = std::min<int64_t>(kLaneRows, out - c0);
      decode_rows(w, c0, c0 + rows, interleave, levels, stride);
      for (int64_t r = rows; r < kLaneRows; ++r) std::fill(levels + r * stride, levels + r * stride + in, 0.0f);
      for (int64_t v = 0; v < vecs;) {
        const int64_t pair = vecs - v >= 2 ? 2 : 1;  // lane vectors this pass
        const float* xv = xt + v * in * L;
        if (pair == 2) {  // half the rows a call, both lane vectors
          kLaneDots<2>[pick](levels, in, xv, dots, simd);
          kLaneDots<2>[pick](levels + kLaneRows / 2 * stride, in, xv, dots + kLaneRows / 2 * 2 * L, simd);
        } else {
          kLaneDots<1>[pick](levels, in, xv, dots, simd);
        }
        for (int64_t l = 0; l < std::min(pair * L, m_rows - v * L); ++l)
          for (int64_t r = 0; r < rows; ++r)
            y[(v * L + l) * out + c0 + r] = w.channel_scale[c0 + r] * dots[r * pair * L + l];
        v += pair;
      }
    }
  });
}
#endif
}  // namespace

namespace cpu {

at::Tensor lowbit_linear_forward(const at::Tensor& x, const PackedView& w) {
  const int64_t m_rows = x.size(0), in = w.row_length, out = w.out;
  if (m_rows >= kTileBatch) return tiled_forward(x, w);
  at::Tensor y = poisoned(at::empty({m_rows, out}, x.options()));
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (out + kRowBlock - 1) / kRowBlock;
  // From kGemmBatch rows on the sums follow their own order (lanes, sgemm) whatever the columns'
  // order, and the byte order's decode of rows other than dense_lanes ones ran slower there (an
  // MLP's 3000 x 1000 5-bit layer at 32 rows: 0.92-0.94 against 0.87-0.89 ms in column order).
  const int64_t steps = m_rows < kGemmBatch || dense_lanes(w) ? interleave_steps(w) : 0;
  const bool interleave = steps > 0;
  at::Tensor x_ordered = interleave ? at::empty_like(x) : x;  // x in the columns' order
  const float* xp = x_ordered.data_ptr<float>();
  if (interleave) {
    const Interleave order(steps, in);
    const float* src = x.data_ptr<float>();
    float* dst = x_ordered.data_ptr<float>();
    at::parallel_for(0, m_rows, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) order.apply(src + m * in, dst + m * in, in);
    });
  }
#if defined(MP_DECODE_AVX512)
  if (cpu_simd.load(std::memory_order_relaxed) && interleave && m_rows <= fused_rows_limit(w)) {
    at::parallel_for(0, blocks, grain(w, kRowBlock), [&](int64_t b0, int64_t b1) {
      const int64_t c0 = b0 * kRowBlock, c1 = std::min(out, b1 * kRowBlock);
      with_interleaved_blocks(w, [&](auto blocks) { fused_forward<typename decltype(blocks)::type>(w, xp, m_rows, c0, c1, yp); });
    });
    return y;
  }
#endif
#if defined(MP_LOWBIT_SIMD)
  if (cpu_simd.load(std::memory_order_relaxed) && !interleave && m_rows <= kRegisterBatch) {
    at::parallel_for(0, blocks, grain(w, kRowBlock), [&](int64_t b0, int64_t b1) {
      simd::forward_rows(w, xp, m_rows, b0 * kRowBlock, std::min(out, b1 * kRowBlock), yp);
    });
    return y;
  }
#endif
#if defined(MP_LOWBIT_SIMD)
  if (m_rows >= kGemmBatch && m_rows < kLaneBatch && in <= kLaneMaxColumns) {
    lane_forward(xp, m_rows, w, interleave, yp);
    return y;
  }
#endif
  if (m_rows >= kGemmBatch) {
    // a block's work is its m_rows x kGemmRows x in multiply-adds (with a grain by its weights
    // alone, ConvNeXt's 96 -> 384 layer split its 6 blocks 5:1 over 2 threads)
    at::parallel_for(0, ceil_div(out, kGemmRows), grain(w, kGemmRows * m_rows), [&](int64_t b0, int64_t b1) {
      std::vector<float> tile(kGemmRows * in);
      for_each_decoded_block(w, interleave, b0 * kGemmRows, std::min(out, b1 * kGemmRows), tile,
                             [&](int64_t c0, const at::Tensor& block) {  // sgemm on this thread (nested region)
        const int64_t rows = block.size(0);
        const at::Tensor dots = at::mm(x_ordered, block.t());  // (m_rows, rows), contiguous
        const float* dp = dots.data_ptr<float>();
        for (int64_t m = 0; m < m_rows; ++m)
          for (int64_t j = 0; j < rows; ++j) yp[m * out + c0 + j] = w.channel_scale[c0 + j] * dp[m * rows + j];
      });
    });
    return y;
  }
  at::parallel_for(0, blocks, grain(w, kRowBlock), [&](int64_t b0, int64_t b1) {
    std::vector<float> tile(kRowBlock * in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kRowBlock, rows = std::min(kRowBlock, out - c0);
      decode_rows(w, c0, c0 + rows, interleave, tile.data(), in);
      for (int64_t m = 0; m < m_rows; m += 2)
        for (int64_t r = 0; r < rows; r += 2) {
          const int mb = int(std::min<int64_t>(2, m_rows - m)), rb = int(std::min<int64_t>(2, rows - r));
          float dots[2][2];
          dot_block(xp + m * in, mb, tile.data() + r * in, rb, in, dots);
          for (int i = 0; i < mb; ++i)
            for (int j = 0; j < rb; ++j) yp[(m + i) * out + c0 + r + j] = w.channel_scale[c0 + r + j] * dots[i][j];
        }
    }
  });
  return y;
}

at::Tensor lowbit_linear_backward(const at::Tensor& grad_y, const PackedView& w) {
  const int64_t m_rows = grad_y.size(0), in = w.row_length, out = w.out;
  const at::Tensor scale = at::from_blob(const_cast<float*>(w.channel_scale), {out}, grad_y.options());
  const at::Tensor scaled = grad_y * scale;  // grad_y[m, c] * scale[c]
  const int64_t chunks = std::min(kMaxChunks, ceil_div(out, kGemmRows));
  at::Tensor partial = at::zeros({chunks, m_rows, in}, grad_y.options());
  float* pp = partial.data_ptr<float>();
  const int64_t chunk_grain = grain(w, ceil_div(out, std::max<int64_t>(chunks, 1)) * m_rows);
  at::parallel_for(0, chunks, chunk_grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(kGemmRows * in);
    for (int64_t chunk = t0; chunk < t1; ++chunk)
      for_each_decoded_block(w, false, out * chunk / chunks, out * (chunk + 1) / chunks, tile,
                             [&](int64_t c0, const at::Tensor& block) {  // sgemm on this thread (nested region)
        const at::Tensor part = at::mm(scaled.narrow(1, c0, block.size(0)), block);  // (m_rows, in)
        const float* src = part.data_ptr<float>();
        float* dst = pp + chunk * m_rows * in;
        for (int64_t i = 0; i < m_rows * in; ++i) dst[i] += src[i];
      });
  });
  return partial.sum(0);  // chunk order: deterministic
}

}  // namespace cpu
}  // namespace mixedprec
