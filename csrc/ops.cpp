// Schemas of the kernel ops (one TORCH_LIBRARY for the namespace). Implementations are
// registered per device next to their kernels: cpu/, cuda/register.cpp, simt/register.cpp. The
// public autograd ops that route to these live in mixedprec/ops.py; the Python module init is
// module.cpp.
#include <torch/library.h>

#include "cpu/code_decode.h"
#include "cpu/winograd_conv3x3.h"

TORCH_LIBRARY(mixedprec, m) {
  // bit-sharing fake-quant: (y, residual_mean) and (grad_x, sums = [dL/dv, sum grad_y T_j ...]);
  // given a residual_mean (e.g. reduced over ranks from bit_sharing_quant_stats, the float64
  // sums of |r_j|) the forward takes its gates from it instead of from x
  m.def("bit_sharing_quant_fwd(Tensor x, Tensor clip, Tensor thresholds, int[] bits, bool signed, "
        "Tensor? residual_mean=None) -> (Tensor, Tensor)");
  m.def("bit_sharing_quant_bwd(Tensor grad_y, Tensor x, Tensor clip, Tensor gates, int[] bits, bool signed) -> (Tensor, Tensor)");
  m.def("bit_sharing_quant_stats(Tensor x, Tensor clip, int[] bits, bool signed) -> Tensor");
  // OPQ codebook fake-quant: y (the backward is a select in mixedprec/ops.py)
  m.def("codebook_quant_fwd(Tensor weight, Tensor codebook, Tensor channel_scale, Tensor keep_mask) -> Tensor");
  // the CUDA kernel sources executed on the CPU under SIMT emulation (for tests)
  m.def("simt_bit_sharing_quant_fwd(Tensor x, Tensor clip, Tensor thresholds, int[] bits, bool signed, "
        "Tensor? residual_mean=None) -> (Tensor, Tensor)");
  m.def("simt_bit_sharing_quant_bwd(Tensor grad_y, Tensor x, Tensor clip, Tensor gates, int[] bits, bool signed) -> (Tensor, Tensor)");
  m.def("simt_bit_sharing_quant_stats(Tensor x, Tensor clip, int[] bits, bool signed) -> Tensor");
  m.def("simt_codebook_quant_fwd(Tensor weight, Tensor codebook, Tensor channel_scale, Tensor keep_mask) -> Tensor");
  // lowbit_linear (packed low-bit weight, mixedprec/formats.py): y = x W^T and grad_x = grad_y W,
  // float32 (M, in) / (M, out); keep_bitmap and group_code_offsets are None for a dense weight
  m.def("lowbit_linear_fwd(Tensor x, Tensor codebook, Tensor channel_scale, Tensor codes, Tensor? keep_bitmap, "
        "Tensor row_code_offsets, Tensor? group_code_offsets, int in_features, int bits) -> Tensor");
  m.def("lowbit_linear_bwd(Tensor grad_y, Tensor codebook, Tensor channel_scale, Tensor codes, Tensor? keep_bitmap, "
        "Tensor row_code_offsets, Tensor? group_code_offsets, int in_features, int bits) -> Tensor");
  m.def("simt_lowbit_linear_fwd(Tensor x, Tensor codebook, Tensor channel_scale, Tensor codes, Tensor? keep_bitmap, "
        "Tensor row_code_offsets, Tensor? group_code_offsets, int in_features, int bits) -> Tensor");
  m.def("simt_lowbit_linear_bwd(Tensor grad_y, Tensor codebook, Tensor channel_scale, Tensor codes, Tensor? keep_bitmap, "
        "Tensor row_code_offsets, Tensor? group_code_offsets, int in_features, int bits) -> Tensor");
  // selects the CPU kernels' AVX-512 code decode (true) or its scalar twin; returns the previous choice
  m.def("set_cpu_simd(bool enabled) -> bool", [](bool enabled) { return mixedprec::cpu_simd.exchange(enabled); });
  // selects lut_conv2d's CPU Winograd F(2x2, 3x3) path where it applies (true) or the direct
  // convolution everywhere; returns the previous choice
  m.def("set_cpu_winograd(bool enabled) -> bool", [](bool enabled) { return mixedprec::cpu_winograd.exchange(enabled); });
}

TORCH_LIBRARY_FRAGMENT(mixedprec, m) {
  // lut_conv2d: conv2d through a packed codebook weight (mixedprec/formats.py); y and grad_x
  // (the transposed convolution). `keep_bitmap` is None when nothing is pruned.
  m.def("lut_conv2d_fwd(Tensor x, Tensor codes, Tensor codebook, Tensor channel_scale, Tensor? keep_bitmap, int bits, "
        "int[] weight_shape, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("lut_conv2d_bwd(Tensor grad_y, Tensor codes, Tensor codebook, Tensor channel_scale, Tensor? keep_bitmap, "
        "int bits, int[] weight_shape, int[] input_shape, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("simt_lut_conv2d_fwd(Tensor x, Tensor codes, Tensor codebook, Tensor channel_scale, Tensor? keep_bitmap, int bits, "
        "int[] weight_shape, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("simt_lut_conv2d_bwd(Tensor grad_y, Tensor codes, Tensor codebook, Tensor channel_scale, Tensor? keep_bitmap, "
        "int bits, int[] weight_shape, int[] input_shape, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
}
