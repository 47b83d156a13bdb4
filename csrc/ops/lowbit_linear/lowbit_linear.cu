// lowbit_linear on the GPU (portable SIMT kernels; they also run under the SIMT emulation):
// W is decoded per element from the packed format (include/mixedprec/packed_weight.h) into registers,
// with the codebook staged in shared memory; no float copy of W exists.
//
// forward:  one warp per output channel c and tile of kBatchTile batch rows; lanes stride the
//           row, decode W[c, i] once and use it for every row of the tile; warp-shuffle sum.
//           Reads the codes once per batch tile (bits/8 B per weight) and x from cache.
// backward: one thread per input column i and batch tile, looping over output channels: the
//           transposed product grad_x = grad_y W. code_offsets locate a sparse weight's code
//           with popcounts within its 64-weight block, so no thread walks a row. No atomics:
//           deterministic.
// Entry points (raw pointers; declared by the glue, lowbit_linear_glue.cpp) return nullptr or an error.
// A tensor-core variant (decoded tiles into mma) is not written yet; these are its portable twin.
#include <algorithm>

#include "mixedprec/block_reduce.cuh"
#include "mixedprec/kernel_launch.h"
#include "mixedprec/packed_weight.h"

namespace mixedprec {
namespace MP_KERNEL_NS {
namespace {
namespace lowbit_linear_impl {  // named: tests/csrc/simt_kernel_tests.cpp compiles every .cu in one unit

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatchTile = 4;
constexpr int kMaxLevels = 256;

__device__ __forceinline__ void stage_codebook(PackedView& w, float* shared_levels) {
  for (int j = threadIdx.x; j < (1 << w.bits); j += blockDim.x) shared_levels[j] = w.codebook[j];
  __syncthreads();
  w.codebook = shared_levels;
}

__global__ void __launch_bounds__(kThreads)
forward_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t m_rows, PackedView w) {
  __shared__ float levels[kMaxLevels];
  stage_codebook(w, levels);
  const int lane = threadIdx.x % 32;
  const int64_t c = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t m0 = int64_t(blockIdx.y) * kBatchTile;
  if (c >= w.out) return;  // after the block's only __syncthreads
  float acc[kBatchTile] = {};
  for (int64_t i = lane; i < w.row_length; i += 32) {
    const float level = level_at(w, w.codebook, c * w.row_length + i);
    MP_UNROLL for (int t = 0; t < kBatchTile; ++t)
      if (m0 + t < m_rows) acc[t] += x[(m0 + t) * w.row_length + i] * level;
  }
  const float scale = w.channel_scale[c];
  MP_UNROLL for (int t = 0; t < kBatchTile; ++t) {
    const float total = warp_sum(acc[t]);
    if (lane == 0 && m0 + t < m_rows) y[(m0 + t) * w.out + c] = total * scale;
  }
}

__global__ void __launch_bounds__(kThreads)
backward_kernel(const float* __restrict__ grad_y, float* __restrict__ grad_x, int64_t m_rows, PackedView w) {
  __shared__ float levels[kMaxLevels];
  stage_codebook(w, levels);
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t m0 = int64_t(blockIdx.y) * kBatchTile;
  if (i >= w.row_length) return;
  float acc[kBatchTile] = {};
  for (int64_t c = 0; c < w.out; ++c) {
    const float weight = level_at(w, w.codebook, c * w.row_length + i) * w.channel_scale[c];
    MP_UNROLL for (int t = 0; t < kBatchTile; ++t)
      if (m0 + t < m_rows) acc[t] += grad_y[(m0 + t) * w.out + c] * weight;
  }
  MP_UNROLL for (int t = 0; t < kBatchTile; ++t)
    if (m0 + t < m_rows) grad_x[(m0 + t) * w.row_length + i] = acc[t];
}

// One thread block per `per_block` of the kernel's `units` (output channels or input columns)
// and tile of kBatchTile batch rows.
template <class Kernel>
const char* launch(Kernel* kernel, int64_t units, int64_t per_block, const float* in, float* out, int64_t m_rows,
                   const PackedView& w, void* stream) {
  if (m_rows == 0) return nullptr;
  const dim3 grid(unsigned((units + per_block - 1) / per_block),
                  unsigned(std::max<int64_t>(1, (m_rows + kBatchTile - 1) / kBatchTile)));
  MP_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, in, out, m_rows, w);
  MP_LAUNCH_RESULT();
  return nullptr;
}

}  // namespace lowbit_linear_impl
}  // namespace

const char* lowbit_linear_forward(const float* x, float* y, int64_t m_rows, const PackedView& w, void* stream) {
  using namespace lowbit_linear_impl;
  return launch(&forward_kernel, w.out, kWarps, x, y, m_rows, w, stream);  // a warp per output channel
}

const char* lowbit_linear_backward(const float* grad_y, float* grad_x, int64_t m_rows, const PackedView& w,
                                   void* stream) {
  using namespace lowbit_linear_impl;
  return launch(&backward_kernel, w.row_length, kThreads, grad_y, grad_x, m_rows, w, stream);  // a thread per column
}

}  // namespace MP_KERNEL_NS
}  // namespace mixedprec
