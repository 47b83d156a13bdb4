// Block-wide sums of a small fixed set of values, for kernels that end in a reduction.
// Warp shuffles first, then one shared-memory round across warps; works under SIMT too.
#pragma once

#include "mixedprec/common.h"

namespace mixedprec {

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums v[0..kCount) over the block (blockDim.x a multiple of 32, at most 1024 threads);
// thread 0 returns with the totals in v. Every thread of the block must call it.
template <int kCount, class T>
__device__ void block_sum(T (&v)[kCount]) {
  __shared__ T partial[32][kCount];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  MP_UNROLL for (int i = 0; i < kCount; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0)
    MP_UNROLL for (int i = 0; i < kCount; ++i) partial[warp][i] = v[i];
  __syncthreads();
  if (warp == 0) {
    MP_UNROLL for (int i = 0; i < kCount; ++i) v[i] = warp_sum(lane < warps ? partial[lane][i] : T(0));
  }
  __syncthreads();  // partial[] may be reused by a following call
}

}  // namespace mixedprec
