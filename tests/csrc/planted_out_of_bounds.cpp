// A kernel without the bounds check its grid needs: the last block writes past the end of the
// output. AddressSanitizer must name this file's line.
#include <cstdio>
#include <vector>

#include "simt/simt.h"

__global__ void scale_without_bounds_check(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  // if (i >= n) return;   <- the planted bug
  y[i] = 2.0f * (i < n ? x[i] : 0.0f);
}

int main() {
  const int n = 100;  // two blocks of 64 threads cover 128 elements
  std::vector<float> x(n, 1.0f), y(n);
  MP_LAUNCH(scale_without_bounds_check, dim3(2), dim3(64), 0, nullptr, x.data(), y.data(), n);
  std::printf("y[0] %g\n", y[0]);
  return 0;
}
