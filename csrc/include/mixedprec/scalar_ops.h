// The Ops policy for plain floats, used by the shared kernel math (bit_sharing.h, codebook.h) in
// the CUDA and SIMT builds and in the CPU kernels' scalar tails. cpu/vec_ops.h holds its SIMD twin.
#pragma once

#include "mixedprec/common.h"

namespace mixedprec {

struct ScalarOps {
  using F = float;
  using Index = int;
  MP_HD static F splat(float v) { return v; }
  MP_HD static F round_even(F v) { return rintf(v); }
  MP_HD static F mul_rn(F a, F b) { return mixedprec::mul_rn(a, b); }
  // NaN passes through, as torch.clamp does (fminf/fmaxf would drop it).
  MP_HD static F clamp(F v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
  MP_HD static F abs(F v) { return fabsf(v); }
  MP_HD static F select(bool m, F a, F b) { return m ? a : b; }

  // Table lookups for codebook.h.
  MP_HD static Index index_splat(int v) { return v; }
  MP_HD static F gather(const float* table, Index i) { return table[i]; }
  // i where a >= b, else i + step (also when a or b is NaN: the comparison is ordered).
  MP_HD static Index step_unless_ge(Index i, F a, F b, int step) { return a >= b ? i : i + step; }
  MP_HD static Index index_min(Index i, int hi) { return i < hi ? i : hi; }
};

}  // namespace mixedprec
