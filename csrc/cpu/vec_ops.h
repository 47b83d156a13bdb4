// SIMD policy for the shared kernel math (include/mixedprec/*.h) on ATen's portable vectors,
// plus loads/stores that widen float16/bfloat16 to float32.
#pragma once

// ATen's vectors take their width from CPU_CAPABILITY_*; derive it from the compile target.
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace mixedprec {

using Vec = at::vec::Vectorized<float>;
using VecIndex = at::vec::Vectorized<int32_t>;
static_assert(VecIndex::size() == Vec::size());

struct VecOps {
  using F = Vec;
  static F splat(float v) { return F(v); }
  static F round_even(F v) { return v.round(); }  // round half to even
  static F mul_rn(F a, F b) { return a * b; }      // built with -ffp-contract=off
  static F clamp(F v, float lo, float hi) { return at::vec::clamp(v, F(lo), F(hi)); }
  static F abs(F v) { return v.abs(); }
  static F select(F mask, F a, F b) { return F::blendv(b, a, mask); }

  using Index = VecIndex;
  static Index index_splat(int v) { return Index(v); }
  static F gather(const float* table, const Index& i) { return at::vec::gather<sizeof(float)>(table, i); }
  // i where a >= b, else i + step; the comparison is ordered (NaN -> i + step), as ScalarOps'.
  static Index step_unless_ge(const Index& i, F a, F b, int step) {
    return Index::blendv(i + Index(step), i, at::vec::cast<int32_t>(a >= b));
  }
  static Index index_min(const Index& i, int hi) { return at::vec::minimum(i, Index(hi)); }
};

template <class T>
inline Vec load_vec(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    alignas(64) float wide[Vec::size()];
    for (int i = 0; i < Vec::size(); ++i) wide[i] = static_cast<float>(p[i]);
    return Vec::loadu(wide);
  }
}

template <class T>
inline void store_vec(T* p, Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    alignas(64) float wide[Vec::size()];
    v.store(wide);
    for (int i = 0; i < Vec::size(); ++i) p[i] = static_cast<T>(wide[i]);
  }
}

// A bool mask as a lane mask (all bits set where true), for VecOps::select.
inline Vec load_lane_mask(const bool* p) {
  alignas(64) int32_t lanes[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) lanes[i] = p[i] ? -1 : 0;
  return at::vec::cast<float>(VecIndex::loadu(lanes));
}

inline double lane_sum(Vec v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  double s = 0;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

}  // namespace mixedprec
