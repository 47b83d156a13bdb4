// Decoding packed codes into codebook levels on the CPU, shared by lowbit_linear and lut_conv2d:
// fast paths through cpu/lowbit_simd.h (AVX2 and AVX-512 builds), and the scalar loop that is
// their twin (the `simd` argument; cpu_simd in cpu/switches.h selects it in tests).
#pragma once

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

}  // namespace mixedprec
