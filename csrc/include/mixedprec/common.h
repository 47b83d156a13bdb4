// Host+device basics shared by the CPU, CUDA and SIMT builds: qualifiers, storage types for
// 16-bit floats (bit-compatible with at::Half / at::BFloat16), rounding without FMA contraction.
// No torch and no CUDA headers here: this file compiles under nvcc, g++ and the SIMT emulation.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__) || defined(MP_SIMT)
#define MP_HD __host__ __device__
#else
#define MP_HD
#endif

// Loops over small per-thread arrays must unroll so the arrays stay in registers.
#if defined(__CUDACC__)
#define MP_UNROLL _Pragma("unroll")
#else
#define MP_UNROLL
#endif

namespace mixedprec {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct Half16 { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

MP_HD inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

MP_HD inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
MP_HD inline uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

MP_HD inline float to_float(float v) { return v; }
MP_HD inline float to_float(BFloat16 v) { return bits_to_float(uint32_t(v.bits) << 16); }
MP_HD inline float to_float(Half16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu, mant = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // subnormal half: value = mant * 2^-24, exact in float
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <class T> MP_HD inline T from_float(float v);
template <> MP_HD inline float from_float<float>(float v) { return v; }
// Round to nearest even, as torch converts.
template <> MP_HD inline BFloat16 from_float<BFloat16>(float v) {
  uint32_t u = float_to_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{uint16_t(u >> 16)};
}
template <> MP_HD inline Half16 from_float<Half16>(float v) {
  const uint32_t u = float_to_bits(v);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return Half16{uint16_t(sign | 0x7e00u)};  // nan
  if (a >= 0x477ff000u) return Half16{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: subnormal half (or zero); round(|v| * 2^24) to even
    const float scaled = bits_to_float(a) * 16777216.0f;  // exact: power-of-two scaling
    const float r = rintf(scaled);
    return Half16{uint16_t(sign | uint16_t(r))};
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits to nearest even
  uint32_t h = ((a >> 13) - (112u << 10));
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return Half16{uint16_t(sign | h)};
}

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<Half16> { static constexpr DType value = DType::f16; };
template <> struct dtype_of<BFloat16> { static constexpr DType value = DType::bf16; };

// a * b rounded once. nvcc would otherwise contract `c - a * b` into an FMA, and the result
// would then differ from the CPU kernels and the reference in the last bit.
MP_HD inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

}  // namespace mixedprec
