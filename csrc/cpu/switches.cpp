// The ops that set the CPU kernels' switches (cpu/switches.h); each returns the previous setting.
#include <torch/library.h>

#include "cpu/switches.h"

TORCH_LIBRARY_FRAGMENT(mixedprec, m) {
  // the CPU kernels' AVX-512 code decode (true) or its scalar twin
  m.def("set_cpu_simd(bool enabled) -> bool", [](bool enabled) { return mixedprec::cpu_simd.exchange(enabled); });
  // lut_conv2d's CPU Winograd F(2x2, 3x3) path where it applies (true) or the direct convolution everywhere
  m.def("set_cpu_winograd(bool enabled) -> bool",
        [](bool enabled) { return mixedprec::cpu_winograd.exchange(enabled); });
}
