// A shared-memory block sum with its __syncthreads removed: thread 0 reads the slots the other
// threads write with nothing ordering the accesses. ThreadSanitizer must name this file's line.
#include <cstdio>
#include <vector>

#include "simt/simt.h"

__global__ void block_sum_without_barrier(const float* x, float* out) {
  __shared__ float slot[64];
  slot[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  // __syncthreads();   <- the planted bug
  if (threadIdx.x == 0) {
    float total = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) total += slot[i];
    out[blockIdx.x] = total;
  }
}

int main() {
  std::vector<float> x(128, 1.0f), out(2, 0.0f);
  MP_LAUNCH(block_sum_without_barrier, dim3(2), dim3(64), 0, nullptr, x.data(), out.data());
  std::printf("sums %g %g\n", out[0], out[1]);
  return 0;
}
