// lut_conv2d on the GPU: implicit GEMM through the codebook (weight decode: include/mixedprec/packed_weight.h).
//
// One tiled GEMM kernel, C (M x N) = A (M x K) . B (K x N) per group (blockIdx.z), serves both
// directions; a Problem says where A, B and C live:
//   forward   M = C_out/G, K = C_in/G kh kw, N = batch OH OW:
//             A[co, (ci, kh, kw)] = W (decoded), B = x gathered on the fly (implicit im2col),
//             C -> y (+ bias)
//   backward  M = C_in/G, K = C_out/G kh kw, N = batch H W   (grad_x = the transposed conv):
//             A[ci, (co, kh, kw)] = W[co, ci, kh, kw], B = grad_y at oh = (ih + p - kh d) / s
//             where that division is exact and in range, 0 elsewhere; C -> grad_x
// A block computes a kBM x kBN tile; every kBK-deep step stages kBM x kBK decoded weights and
// kBK x kBN gathered activations in shared memory, and each thread accumulates a kTM x kTN
// sub-tile in registers. The codebook is widened into shared memory once per block.
// Traffic per block: kBM K weights decoded from bits/8 B codes (plus 1/8 B of bitmap) and
// K kBN activations, each reused kBN resp. kBM times from shared memory; the float weight is
// never written to global memory.
// Entry points (raw pointers; declared by the glue, lut_conv2d_glue.cpp) return nullptr or an error.
#include "mixedprec/conv2d.h"
#include "mixedprec/kernel_launch.h"
#include "mixedprec/packed_weight.h"

namespace mixedprec {
namespace MP_KERNEL_NS {
namespace {
namespace lut_conv2d_impl {  // named: tests/csrc/simt_kernel_tests.cpp compiles every .cu in one unit

constexpr int kBM = 64, kBN = 64, kBK = 16, kTM = 4, kTN = 4;
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256
constexpr int kMaxLevels = 256;

template <class T>
struct ForwardProblem {
  PackedView w;
  Conv2dGeometry g;
  const T* x;
  const float* bias;
  T* y;

  MP_HD int64_t rows() const { return g.group_out(); }
  MP_HD int64_t depth() const { return g.row_length(); }
  MP_HD int64_t cols() const { return g.batch * g.out_pixels(); }
  __device__ float a(const float* levels, int64_t group, int64_t co, int64_t k) const {
    const int64_t c = group * g.group_out() + co;
    return weight_at(w, levels, c, c * g.row_length() + k);
  }
  __device__ float b(int64_t group, int64_t k, int64_t j) const {
    const int64_t khkw = g.kernel_h * g.kernel_w, ci = k / khkw, kh = k % khkw / g.kernel_w, kw = k % g.kernel_w;
    const int64_t n = j / g.out_pixels(), oh = j % g.out_pixels() / g.out_width, ow = j % g.out_width;
    const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h, iw = ow * g.stride_w - g.pad_w + kw * g.dil_w;
    if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) return 0.0f;
    return to_float(x[((n * g.in_channels + group * g.group_in() + ci) * g.height + ih) * g.width + iw]);
  }
  __device__ void store(int64_t group, int64_t co, int64_t j, float v) const {
    const int64_t c = group * g.group_out() + co, n = j / g.out_pixels();
    y[(n * g.out_channels + c) * g.out_pixels() + j % g.out_pixels()] = from_float<T>(bias ? v + bias[c] : v);
  }
};

template <class T>
struct BackwardProblem {
  PackedView w;
  Conv2dGeometry g;
  const T* grad_y;
  T* grad_x;

  MP_HD int64_t rows() const { return g.group_in(); }
  MP_HD int64_t depth() const { return g.group_out() * g.kernel_h * g.kernel_w; }
  MP_HD int64_t cols() const { return g.batch * g.height * g.width; }
  __device__ float a(const float* levels, int64_t group, int64_t ci, int64_t k) const {
    const int64_t khkw = g.kernel_h * g.kernel_w, c = group * g.group_out() + k / khkw;
    return weight_at(w, levels, c, c * g.row_length() + ci * khkw + k % khkw);
  }
  __device__ float b(int64_t group, int64_t k, int64_t j) const {
    const int64_t khkw = g.kernel_h * g.kernel_w, co = k / khkw, kh = k % khkw / g.kernel_w, kw = k % g.kernel_w;
    const int64_t hw = g.height * g.width, n = j / hw, ih = j % hw / g.width, iw = j % g.width;
    const int64_t th = ih + g.pad_h - kh * g.dil_h, tw = iw + g.pad_w - kw * g.dil_w;
    if (th < 0 || tw < 0 || th % g.stride_h != 0 || tw % g.stride_w != 0) return 0.0f;
    const int64_t oh = th / g.stride_h, ow = tw / g.stride_w;
    if (oh >= g.out_height || ow >= g.out_width) return 0.0f;
    return to_float(grad_y[((n * g.out_channels + group * g.group_out() + co) * g.out_height + oh) * g.out_width + ow]);
  }
  __device__ void store(int64_t group, int64_t ci, int64_t j, float v) const {
    const int64_t hw = g.height * g.width, n = j / hw;
    grad_x[(n * g.in_channels + group * g.group_in() + ci) * hw + j % hw] = from_float<T>(v);
  }
};

template <class Problem>
__global__ void __launch_bounds__(kThreads, 1) lut_gemm_kernel(Problem prob) {
  __shared__ float levels[kMaxLevels];
  __shared__ float a_tile[kBK][kBM];
  __shared__ float b_tile[kBK][kBN];
  const int tid = int(threadIdx.x), tm = tid / (kBN / kTN), tn = tid % (kBN / kTN);
  const int64_t group = blockIdx.z, m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int64_t rows = prob.rows(), depth = prob.depth(), cols = prob.cols();
  for (int i = tid; i < (1 << prob.w.bits); i += kThreads) levels[i] = prob.w.codebook[i];
  __syncthreads();

  float acc[kTM][kTN] = {};
  for (int64_t k0 = 0; k0 < depth; k0 += kBK) {
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int m = e / kBK, k = e % kBK;
      a_tile[k][m] = (m0 + m < rows && k0 + k < depth) ? prob.a(levels, group, m0 + m, k0 + k) : 0.0f;
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int k = e / kBN, j = e % kBN;
      b_tile[k][j] = (k0 + k < depth && n0 + j < cols) ? prob.b(group, k0 + k, n0 + j) : 0.0f;
    }
    __syncthreads();
    MP_UNROLL for (int k = 0; k < kBK; ++k) {
      float av[kTM], bv[kTN];
      MP_UNROLL for (int i = 0; i < kTM; ++i) av[i] = a_tile[k][tm * kTM + i];
      MP_UNROLL for (int j = 0; j < kTN; ++j) bv[j] = b_tile[k][tn * kTN + j];
      MP_UNROLL for (int i = 0; i < kTM; ++i)
        MP_UNROLL for (int j = 0; j < kTN; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
  MP_UNROLL for (int i = 0; i < kTM; ++i)
    MP_UNROLL for (int j = 0; j < kTN; ++j) {
      const int64_t m = m0 + tm * kTM + i, n = n0 + tn * kTN + j;
      if (m < rows && n < cols) prob.store(group, m, n, acc[i][j]);
    }
}

template <class Problem>
const char* launch(const Problem& prob, int64_t groups, void* stream) {
  const dim3 grid(unsigned((prob.cols() + kBN - 1) / kBN), unsigned((prob.rows() + kBM - 1) / kBM), unsigned(groups));
  auto* kernel = &lut_gemm_kernel<Problem>;
  MP_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, prob);
  MP_LAUNCH_RESULT();
  return nullptr;
}

template <class T>
const char* forward_typed(const void* x, const float* bias, void* y, const PackedView& w, const Conv2dGeometry& g,
                          void* stream) {
  return launch(ForwardProblem<T>{w, g, static_cast<const T*>(x), bias, static_cast<T*>(y)}, g.groups, stream);
}

template <class T>
const char* backward_typed(const void* grad_y, void* grad_x, const PackedView& w, const Conv2dGeometry& g,
                           void* stream) {
  return launch(BackwardProblem<T>{w, g, static_cast<const T*>(grad_y), static_cast<T*>(grad_x)}, g.groups, stream);
}

}  // namespace lut_conv2d_impl
}  // namespace

const char* lut_conv2d_forward(DType dtype, const void* x, const float* bias, void* y, const PackedView& w,
                               const Conv2dGeometry& g, void* stream) {
  using namespace lut_conv2d_impl;
  switch (dtype) {
    case DType::f32: return forward_typed<float>(x, bias, y, w, g, stream);
    case DType::f16: return forward_typed<Half16>(x, bias, y, w, g, stream);
    case DType::bf16: return forward_typed<BFloat16>(x, bias, y, w, g, stream);
  }
  return "lut_conv2d_forward: unsupported dtype";
}

const char* lut_conv2d_backward(DType dtype, const void* grad_y, void* grad_x, const PackedView& w,
                                const Conv2dGeometry& g, void* stream) {
  using namespace lut_conv2d_impl;
  switch (dtype) {
    case DType::f32: return backward_typed<float>(grad_y, grad_x, w, g, stream);
    case DType::f16: return backward_typed<Half16>(grad_y, grad_x, w, g, stream);
    case DType::bf16: return backward_typed<BFloat16>(grad_y, grad_x, w, g, stream);
  }
  return "lut_conv2d_backward: unsupported dtype";
}

}  // namespace MP_KERNEL_NS
}  // namespace mixedprec
