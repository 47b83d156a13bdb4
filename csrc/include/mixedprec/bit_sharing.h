// SBS bit-sharing fake-quant: the per-element math, written once for every backend.
//
//   t   = x * (1 / v)
//   z   = (clamp(t, -1, 1) + 1) / 2  (signed)   or  clamp(t + z0, 0, 1)  (unsigned)
//   q_1 = D(z, b_1);  r_j = z - q_{j-1};  e_j = D(r_j, b_j);  q_j = q_{j-1} + e_j
//   z_hat = q_1 + g_2 (e_2 + g_3 (e_3 + ...));   y = v (2 z_hat - 1)  or  v (z_hat - z0)
//   D(t, b) = rint(t * n_b) * (1 / n_b),  n_b = 2^b - 1,  rint = round half to even
//
// z0 in [0, 1] is the zero point of the unsigned grid (0: the plain unsigned grid; > 0: the
// asymmetric grid, whose range is [-z0 v, (1 - z0) v]). The public op passes z0 = D(o, b_1) of
// a learnable offset o, a level of the lowest grid and so of every candidate grid (each b_j
// divides the next): x = 0 gives z = z0, q_1 = z0, r_j = 0, z_hat = z0 and y = 0 exactly.
//
// The functions are templates over a value type F and an Ops policy so that the same source
// serves a float (CUDA, SIMT, scalar tails) and a SIMD vector (the CPU kernels). Every
// operation is spelled exactly like mixedprec/backends/reference/ so that results agree bit for bit.
#pragma once

#include "mixedprec/common.h"
#include "mixedprec/scalar_ops.h"

namespace mixedprec {

constexpr int kMaxCandidateBits = 8;

struct BitSharingParams {
  int num_bits;                        // K, candidate bitwidths b_1 < ... < b_K
  bool is_signed;
  float levels[kMaxCandidateBits];      // n_j = 2^{b_j} - 1
  float inv_levels[kMaxCandidateBits];  // 1 / n_j, rounded once to float
};

// The same parameters with K and signedness fixed at compile time: the CPU kernels are
// instantiated per (K, signed) so that every per-element loop unrolls into registers. The
// math below takes either kind (it reads p.num_bits and p.is_signed).
template <int K, bool kSigned>
struct FixedBitSharingParams {
  static constexpr int num_bits = K;
  static constexpr bool is_signed = kSigned;
  float levels[kMaxCandidateBits];
  float inv_levels[kMaxCandidateBits];
  explicit FixedBitSharingParams(const BitSharingParams& p) {
    for (int j = 0; j < kMaxCandidateBits; ++j) {
      levels[j] = p.levels[j];
      inv_levels[j] = p.inv_levels[j];
    }
  }
};

inline BitSharingParams make_bit_sharing_params(const int64_t* bits, int num_bits, bool is_signed) {
  BitSharingParams p{};
  p.num_bits = num_bits;
  p.is_signed = is_signed;
  for (int j = 0; j < num_bits; ++j) {
    p.levels[j] = float((int64_t(1) << bits[j]) - 1);
    p.inv_levels[j] = 1.0f / p.levels[j];
  }
  return p;
}

// t = x / v, z = normalized value in [0, 1]; z0 is the unsigned grid's zero point (unused signed).
template <class Ops, class F>
MP_HD inline F bs_normalize(F t, bool is_signed, float z0) {
  return is_signed ? (Ops::clamp(t, -1.0f, 1.0f) + Ops::splat(1.0f)) * Ops::splat(0.5f)
                   : Ops::clamp(t + Ops::splat(z0), 0.0f, 1.0f);
}

template <class Ops, class F>
MP_HD inline F bs_quantize(F t, float levels, float inv_levels) {
  return Ops::mul_rn(Ops::round_even(t * Ops::splat(levels)), Ops::splat(inv_levels));
}

// The base q_1 and offsets e_2..e_K of z; |r_j| goes to abs_residual[j-1] when given.
template <class Ops, class F, class P>
MP_HD inline F bs_decompose(F z, const P& p, F* offsets, F* abs_residual) {
  F q = bs_quantize<Ops>(z, p.levels[0], p.inv_levels[0]);
  const F base = q;
  MP_UNROLL
  for (int j = 1; j < kMaxCandidateBits; ++j) {
    if (j < p.num_bits) {
      const F r = z - q;
      const F e = bs_quantize<Ops>(r, p.levels[j], p.inv_levels[j]);
      offsets[j] = e;
      if (abs_residual) abs_residual[j] = Ops::abs(r);
      q = q + e;
    }
  }
  return base;
}

// Folds the gated offsets from the innermost out: tails[j] = T_j = e_j + g_{j+1} T_{j+1}.
// Returns z_hat = q_1 + g_2 T_2. gates[j] holds g_{j+1} in {0, 1} (index 1 = g_2).
template <class Ops, class F, class P>
MP_HD inline F bs_fold(F base, const F* offsets, const F* gates, const P& p, F* tails) {
  F tail = Ops::splat(0.0f);
  MP_UNROLL
  for (int j = kMaxCandidateBits - 1; j >= 1; --j) {
    if (j < p.num_bits) {
      if (j + 1 < kMaxCandidateBits && j + 1 < p.num_bits)
        tail = offsets[j] + gates[j + 1] * tail;
      else
        tail = offsets[j];  // the innermost offset e_K
      if (tails) tails[j] = tail;
    }
  }
  return p.num_bits > 1 ? base + gates[1] * tail : base;
}

// y from z_hat.
template <class Ops, class F>
MP_HD inline F bs_output(F z_hat, F clip, bool is_signed, float z0) {
  return is_signed ? clip * (Ops::splat(2.0f) * z_hat - Ops::splat(1.0f)) : clip * (z_hat - Ops::splat(z0));
}

// Whether t = x/v lies inside the clip range, where d y / d x = 1: the open interval -1 < t < 1
// (signed) or 0 < t + z0 < 1 (unsigned): torch.clamp passes no gradient at its bounds, nor do we.
template <class Ops, class F>
MP_HD inline auto bs_inside(F t, bool is_signed, float z0) {
  const F u = is_signed ? t : t + Ops::splat(z0);
  return (u > Ops::splat(is_signed ? -1.0f : 0.0f)) & (u < Ops::splat(1.0f));
}

// d y / d v with round() as identity: (2 z_hat - 1) - t inside the clip range, 2 z_hat - 1
// outside (signed); z_hat - z0 - t inside, z_hat - z0 outside (unsigned). (d y / d z0 is 0
// inside and -v outside: the op's Python side gets its sum from grad_x, no kernel output.)
template <class Ops, class F, class M>
MP_HD inline F bs_clip_grad(F z_hat, F t, M inside, bool is_signed, float z0) {
  const F direct = is_signed ? Ops::splat(2.0f) * z_hat - Ops::splat(1.0f) : z_hat - Ops::splat(z0);
  return Ops::select(inside, direct - t, direct);
}

}  // namespace mixedprec
