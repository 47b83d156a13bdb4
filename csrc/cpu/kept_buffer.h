// Scratch kept per thread across calls, grown and never shrunk: decoded weight tiles and the
// Winograd transforms' buffers. Allocated on every call, a few MB of fresh pages cost more to
// fault in (~1 us per 4 kB page) than the work that fills them: a 2.4 MB decoded tile took
// 0.6-0.8 ms more than its decode on a 384 x 1536 layer.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace mixedprec {

template <class T>
T* kept_buffer(std::vector<T>& buffer, int64_t count) {
  if (int64_t(buffer.size()) < count) buffer.resize(size_t(count));
  return buffer.data();
}

// A float32 CPU tensor of `shape` over buffer's storage: valid until the buffer's next use.
inline at::Tensor kept_tensor(std::vector<float>& buffer, at::IntArrayRef shape) {
  return at::from_blob(kept_buffer(buffer, c10::multiply_integers(shape)), shape,
                       at::TensorOptions().dtype(at::kFloat));
}

}  // namespace mixedprec
