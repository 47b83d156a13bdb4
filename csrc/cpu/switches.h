// Run-time switches of the CPU kernels, for tests and benchmarks (set through the ops
// set_cpu_simd and set_cpu_winograd, registered in switches.cpp).
#pragma once

#include <atomic>

namespace mixedprec {

// Whether the CPU kernels take the SIMD code decode (cpu/lowbit_simd.h, cpu/code_decode.h; AVX2 or
// AVX-512 builds) or its scalar twin.
inline std::atomic<bool> cpu_simd{true};

// Whether lut_conv2d's CPU kernel takes its Winograd path (ops/lut_conv2d/winograd_conv3x3.h) where
// it applies: its float32 error follows the tiles' magnitudes, a direct sum's follows |x| |w|.
inline std::atomic<bool> cpu_winograd{true};

}  // namespace mixedprec
