// Decoding packed codes into codebook levels on the CPU, shared by lowbit_linear and lut_conv2d:
// fast paths through cpu/lowbit_simd.h (AVX2 and AVX-512 builds), and the scalar loop that is
// their twin (the `simd` argument; cpu_simd in cpu/switches.h selects it in tests).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)  // as vec_ops.h: Vec is 16 lanes
#include <immintrin.h>
#define MP_DECODE_AVX512 1
#endif

#include "cpu/lowbit_simd.h"
#include "mixedprec/packed_weight.h"

namespace mixedprec {

// out[i] = the level of flat weight f0 + i (0 where pruned, the channel scale not applied) for
// i < n. Under `simd` (AVX2 or AVX-512 builds), cpu/lowbit_simd.h's decode at every bits: codes
// unpacked in registers, looked up in a register-resident codebook (vpermps / vpermt2ps and a
// blend tree; 7-/8-bit: byte planes) or gathered; a sparse span's kept codes read as one run,
// then spread over its columns by the bitmap (as codes: vpexpandb; or as levels: a permute by
// kept rank, or vexpandps). The scalar twin: decode_run.
inline void decode_span(const PackedView& w, int64_t f0, int64_t n, float* out, bool simd) {
#if defined(MP_LOWBIT_SIMD)
  // below one vector step the register codebook would cost more than it saves (depthwise rows: 9)
  if (simd && n >= simd::kLanes) return simd::decode_span(w, f0, n, out);
#else
  (void)simd;
#endif
  decode_run(w, w.codebook, f0, f0 + n, out);
}

// out[i] *= scale for i < n, rounded once (mul_rn): levels into weights, one multiply per weight
// (not per codebook entry: a depthwise row holds 9 weights, an 8-bit codebook 256 levels); the
// scale is > 0, so pruned weights stay +0.
inline void apply_scale(float scale, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = mul_rn(scale, out[i]);
}

// Rows [c0, c1) of W (row_length weights each, flat, channel scales applied) into out: each task's
// rows decoded as one run (per-row calls cost more than a depthwise row's 9 weights), in tasks of
// >= 32k weights (a small layer stays on one thread: a parallel region costs more than its decode).
inline void decode_scaled_rows(const PackedView& w, int64_t c0, int64_t c1, float* out, bool simd) {
  const int64_t row = w.row_length;
  at::parallel_for(c0, c1, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, row)), [&](int64_t b0, int64_t b1) {
    float* dst = out + (b0 - c0) * row;
    decode_span(w, b0 * row, (b1 - b0) * row, dst, simd);
    for (int64_t c = b0; c < b1; ++c) apply_scale(w.channel_scale[c], row, dst + (c - b0) * row);
  });
}

}  // namespace mixedprec
