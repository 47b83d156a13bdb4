// What a .cu kernel source needs to compile both under nvcc and under the SIMT emulation
// (csrc/simt/simt.h, included first by the generated simt wrappers and by tests/csrc/simt_kernel_tests.cpp).
#pragma once

#if defined(MP_SIMT)
#define MP_KERNEL_NS simt
#else
#include <cuda_runtime.h>
#define MP_KERNEL_NS cuda
#define MP_EXTERN_SHARED(type, name) extern __shared__ type name[]
// kernel must be a name or a function pointer, not an expression with template commas.
#define MP_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#endif

// Launchers return nullptr on success or the CUDA error string of the failed launch.
#define MP_LAUNCH_RESULT() \
  do {                                                              \
    const cudaError_t mp_err = cudaGetLastError();                  \
    if (mp_err != cudaSuccess) return cudaGetErrorString(mp_err);   \
  } while (0)
