// OPQ codebook fake-quant on the CPU (math: include/mixedprec/codebook.h).
//
// One pass: reads weight and keep_mask, writes y (4 + 1 + 4 B/elem in fp32). Threads take fixed
// chunks of the flat weight (at::parallel_for); within a chunk each output channel's run is
// vectorized with ATen's Vectorized<float> under that channel's scale. The nearest-level search
// costs ceil(log2 L) gathers per vector from a 2 KB table (codebook + padded midpoints) built
// once per call; elementwise, so the result does not depend on the number of threads. Arguments
// are checked by the glue (codebook_quant_glue.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/vec_ops.h"
#include "mixedprec/codebook.h"
#include "register/op.h"

namespace mixedprec {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per parallel task at least
constexpr int kW = Vec::size();

template <class T>
void forward_range(const T* weight, const bool* keep_mask, T* y, int64_t begin, int64_t end, int64_t inner,
                   const float* channel_scale, const CodebookTable& t) {
  for (int64_t i = begin; i < end;) {
    const int64_t c = i / inner, row_end = std::min(end, (c + 1) * inner);
    const float scale = channel_scale[c], inv_scale = 1.0f / scale;
    const Vec vscale(scale), vinv_scale(inv_scale);
    for (; i + kW <= row_end; i += kW)
      store_vec(y + i, cb_fake_quant<VecOps>(load_vec(weight + i), load_lane_mask(keep_mask + i), vscale, vinv_scale,
                                             t.codebook, t.midpoints, t.steps, t.levels));
    for (; i < row_end; ++i)
      y[i] = static_cast<T>(cb_fake_quant<ScalarOps>(static_cast<float>(weight[i]), keep_mask[i], scale, inv_scale,
                                                     t.codebook, t.midpoints, t.steps, t.levels));
  }
}

}  // namespace

namespace cpu {

at::Tensor codebook_quant_forward(const at::Tensor& weight, const at::Tensor& codebook,
                                  const at::Tensor& channel_scale, const at::Tensor& keep_mask, int64_t inner) {
  const CodebookTable table = make_codebook_table(codebook.const_data_ptr<float>(), int(codebook.numel()));
  at::Tensor y = poisoned(at::empty_like(weight));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* w = weight.const_data_ptr<T>();
    const bool* keep = keep_mask.const_data_ptr<bool>();
    const float* scale = channel_scale.const_data_ptr<float>();
    T* out = y.data_ptr<T>();
    at::parallel_for(0, weight.numel(), kGrain, [&](int64_t b, int64_t e) {
      forward_range(w, keep, out, b, e, inner, scale, table);
    });
  };
  switch (kernel_dtype(weight, "codebook_quant_fwd", "weight")) {
    case DType::f32: run(float{}); break;
    case DType::f16: run(at::Half{}); break;
    case DType::bf16: run(at::BFloat16{}); break;
  }
  return y;
}

}  // namespace cpu
}  // namespace mixedprec
