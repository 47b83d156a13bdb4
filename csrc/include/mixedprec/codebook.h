// OPQ codebook fake-quant: the per-element math, written once for every backend.
//
//   z     = w * (1 / s_c)                  the reciprocal rounded first
//   m_j   = (c_j + c_{j+1}) * 0.5          j = 0 .. L-2, rounded midpoints
//   j*    = #{j : !(m_j >= z)}             torch.searchsorted(m, z, side="left"): a z on a
//                                          midpoint takes the LOWER level
//   y     = keep ? s_c * c_{j*} + (w - w) : 0
//
// Every operation is spelled as mixedprec/backends/reference/ spells it, so float32 results agree bit
// for bit. `w - w` is the reference's `w - w.detach()`: 0 for a finite w, NaN for NaN or +-inf.
// Templates over an Ops policy (scalar_ops.h; cpu/vec_ops.h) serve CUDA, SIMT and the CPU SIMD.
#pragma once

#include "mixedprec/common.h"
#include "mixedprec/scalar_ops.h"

namespace mixedprec {

constexpr int kMaxCodebookSize = 256;  // 8-bit codes

// Entry j of the search table: the midpoint m_j for j < L-1, +inf past the last one. The
// padding makes the search below branch-free: +inf is >= every z but NaN.
MP_HD inline float cb_midpoint(const float* codebook, int j, int levels) {
  return j + 1 < levels ? (codebook[j] + codebook[j + 1]) * 0.5f : bits_to_float(0x7f800000u);
}

// Halving steps of the search: the smallest s with 2^s >= levels (0 for one level).
MP_HD inline int cb_search_steps(int levels) {
  int steps = 0;
  while ((1 << steps) < levels) ++steps;
  return steps;
}

// j* for z, given the search table (cb_midpoint for j < 2^steps - 1). A binary lower-bound
// search with one table read per step and no data-dependent branch: step by step it advances
// past a block of `step` midpoints unless the block's last one is >= z. A NaN z (0 * inf, when
// 1 / s_c overflows) advances every step, as torch's lower bound does, and ends on the last level.
template <class Ops>
MP_HD inline typename Ops::Index cb_level_index(typename Ops::F z, const float* midpoints, int steps, int levels) {
  typename Ops::Index index = Ops::index_splat(0);
  for (int s = steps - 1; s >= 0; --s) {
    const int step = 1 << s;
    index = Ops::step_unless_ge(index, Ops::gather(midpoints + (step - 1), index), z, step);
  }
  return Ops::index_min(index, levels - 1);
}

// y for one element, or for one vector of elements (lanes may belong to different channels).
template <class Ops, class F, class M>
MP_HD inline F cb_fake_quant(F w, M keep, F scale, F inv_scale, const float* codebook, const float* midpoints,
                             int steps, int levels) {
  const F z = Ops::mul_rn(w, inv_scale);
  const F level = Ops::gather(codebook, cb_level_index<Ops>(z, midpoints, steps, levels));
  return Ops::select(keep, Ops::mul_rn(scale, level) + (w - w), Ops::splat(0.0f));
}

// The codebook and its search table, built on the host (the CPU kernels; the CUDA kernels build
// the same two arrays in shared memory with cb_midpoint).
struct CodebookTable {
  int levels;
  int steps;
  float codebook[kMaxCodebookSize];
  float midpoints[kMaxCodebookSize];
};

inline CodebookTable make_codebook_table(const float* codebook, int levels) {
  CodebookTable t{};
  t.levels = levels;
  t.steps = cb_search_steps(levels);
  for (int j = 0; j < kMaxCodebookSize; ++j) {
    t.codebook[j] = j < levels ? codebook[j] : 0.0f;
    t.midpoints[j] = cb_midpoint(codebook, j, levels);
  }
  return t;
}

}  // namespace mixedprec
