// OPQ codebook fake-quant on the GPU (math: include/mixedprec/codebook.h).
//
// One kernel, one pass: reads weight and keep_mask, writes y (4 + 1 + 4 B/elem in fp32; 2 + 1 + 2
// in fp16/bf16). Each block first stages the codebook and its search table (2 x 1 KB) in shared
// memory, so the search costs ceil(log2 L) shared-memory reads per element and global memory
// sees only the streaming traffic. Grid-stride loop over a capped grid; element i belongs to
// channel i / inner, whose scale comes through the read-only cache (C floats, reused by a row).
#include <algorithm>

#include "mixedprec/kernel_launch.h"
#include "mixedprec/codebook.h"

namespace mixedprec {
namespace MP_KERNEL_NS {
namespace {
namespace codebook_quant_impl {  // named: tests/csrc/simt_kernel_tests.cpp compiles every .cu in one unit

constexpr int kThreads = 256;
#if defined(MP_SIMT)
constexpr int64_t kMaxBlocks = 3;  // emulated blocks run one after another; few keep it quick
#else
constexpr int64_t kMaxBlocks = 4096;
#endif

template <class T>
__global__ void __launch_bounds__(kThreads)
codebook_quant_kernel(const T* __restrict__ weight, const bool* __restrict__ keep_mask, T* __restrict__ y, int64_t n,
                      int64_t inner, const float* __restrict__ codebook, int levels,
                      const float* __restrict__ channel_scale) {
  __shared__ float codebook_s[kMaxCodebookSize];
  __shared__ float midpoints_s[kMaxCodebookSize];
  for (int j = threadIdx.x; j < kMaxCodebookSize; j += blockDim.x) {
    codebook_s[j] = j < levels ? codebook[j] : 0.0f;
    midpoints_s[j] = cb_midpoint(codebook, j, levels);
  }
  __syncthreads();
  const int steps = cb_search_steps(levels);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float scale = channel_scale[i / inner];
    y[i] = from_float<T>(cb_fake_quant<ScalarOps>(to_float(weight[i]), keep_mask[i], scale, 1.0f / scale, codebook_s,
                                                  midpoints_s, steps, levels));
  }
}

template <class T>
const char* forward_typed(const void* weight, const bool* keep_mask, void* y, int64_t n, int64_t inner,
                          const float* codebook, int levels, const float* channel_scale, void* stream) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
  auto* kernel = &codebook_quant_kernel<T>;
  MP_LAUNCH(kernel, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, static_cast<const T*>(weight), keep_mask,
            static_cast<T*>(y), n, inner, codebook, levels, channel_scale);
  MP_LAUNCH_RESULT();
  return nullptr;
}

}  // namespace codebook_quant_impl
}  // namespace

const char* codebook_quant_forward(DType dtype, const void* weight, const bool* keep_mask, void* y, int64_t n,
                                   int64_t inner, const float* codebook, int levels, const float* channel_scale,
                                   void* stream) {
  using namespace codebook_quant_impl;
  if (levels < 1 || levels > kMaxCodebookSize) return "codebook_quant_forward: levels must lie in 1..256";
  switch (dtype) {
    case DType::f32: return forward_typed<float>(weight, keep_mask, y, n, inner, codebook, levels, channel_scale, stream);
    case DType::f16: return forward_typed<Half16>(weight, keep_mask, y, n, inner, codebook, levels, channel_scale, stream);
    case DType::bf16:
      return forward_typed<BFloat16>(weight, keep_mask, y, n, inner, codebook, levels, channel_scale, stream);
  }
  return "codebook_quant_forward: unsupported dtype";
}

}  // namespace MP_KERNEL_NS
}  // namespace mixedprec
