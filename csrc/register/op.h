// What every op's torch glue (ops/<op>/<op>_glue.cpp) uses: which library this build registers
// into, the device kernels' namespace and stream, argument checks that name the argument, and
// MP_OP, the one way an op is registered.
//
// One glue file is compiled into two libraries:
//   mixedprec._C     namespace `mixedprec`: the CPU kernels (ops/<op>/<op>_cpu.cpp) for the CPU
//                    key and, built with MP_WITH_CUDA, the .cu kernels (mixedprec::cuda) for CUDA
//   mixedprec._simt  namespace `mixedprec_simt` (MP_SIMT_LIBRARY, test-only): the same .cu
//                    sources run under SIMT emulation (mixedprec::simt) for the CPU key
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "mixedprec/common.h"

#if defined(MP_SIMT_LIBRARY)
#define MP_LIBRARY mixedprec_simt
#define MP_DEVICE_NS simt
#else
#define MP_LIBRARY mixedprec
#define MP_DEVICE_NS cuda
#if defined(MP_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#endif

// MP_OP(m, name, "(args) -> result", cpu_fn, device_fn), inside TORCH_LIBRARY_FRAGMENT(MP_LIBRARY, m):
// defines `name` with its schema (written once for both libraries) and registers by dispatch key
//   _C:     cpu_fn for CPU; device_fn for CUDA when built with CUDA
//   _simt:  device_fn (the SIMT build of the .cu kernels) for CPU
// A function a build does not register is not referenced there, so it is never linked.
#if defined(MP_SIMT_LIBRARY)
#define MP_OP_IMPLS(m, name, cpu_fn, device_fn) m.impl(#name, torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(device_fn)))
#elif defined(MP_WITH_CUDA)
#define MP_OP_IMPLS(m, name, cpu_fn, device_fn)                              \
  m.impl(#name, torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(cpu_fn)));   \
  m.impl(#name, torch::dispatch(c10::DispatchKey::CUDA, TORCH_FN(device_fn)))
#else
#define MP_OP_IMPLS(m, name, cpu_fn, device_fn) m.impl(#name, torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(cpu_fn)))
#endif
#define MP_OP(m, name, schema, cpu_fn, device_fn) \
  m.def(#name schema);                            \
  MP_OP_IMPLS(m, name, cpu_fn, device_fn)

namespace mixedprec {

// The device of a device kernel call: selects t's CUDA device and gives its current stream (the
// SIMT build: no device, no stream).
class DeviceCall {
 public:
#if defined(MP_WITH_CUDA) && !defined(MP_SIMT_LIBRARY)
  explicit DeviceCall(const at::Tensor& t) : guard_(t.device()) {}
  void* stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }

 private:
  c10::cuda::CUDAGuard guard_;
#else
  explicit DeviceCall(const at::Tensor&) {}
  void* stream() const { return nullptr; }
#endif
};

// A device launcher's result: nullptr, or the error string of the failed launch.
inline void check_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
}

inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name,
                              const char* x_name = "x") {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but ", x_name, " is on ", x.device());
}

inline void check_float32(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// With MIXEDPREC_POISON_OUTPUTS=1 (set by the test suite) every kernel output is filled with
// NaN before the kernel runs (integer outputs: all bits set), so an element a kernel forgets to
// write cannot pass as correct.
inline at::Tensor poisoned(at::Tensor t) {
  static const bool poison = [] {
    const char* v = std::getenv("MIXEDPREC_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  if (!poison) return t;
  if (t.is_floating_point()) return t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t.fill_(t.scalar_type() == at::kByte ? 255 : -1);
}

}  // namespace mixedprec
