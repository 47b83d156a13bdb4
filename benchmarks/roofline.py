"""The time each CUDA kernel should reach on an H100 SXM (the roofline of its benchmark shape):
max(bytes moved / HBM bandwidth, FLOPs / peak). Bytes are what the kernels must read and write
(csrc/ops/*/*.cu, their header comments), counted once; FLOPs count a multiply-add as two.

    python benchmarks/roofline.py

A model for judging measured GPU times, not a measurement (no GPU was lent to this project yet).
"""
from __future__ import annotations

from dataclasses import dataclass

HBM_BYTES_PER_S = 3.35e12  # H100 SXM5, HBM3
FP32_FLOPS = 67e12         # CUDA cores, FMA (the kernels' math; no tensor-core path yet)
TF32_FLOPS = 495e12        # dense tensor cores, for the conv's future tensor-core path


@dataclass
class Kernel:
    name: str
    shape: str
    bytes: float
    flops: float = 0.0

    def bound_us(self, flops_per_s: float = FP32_FLOPS) -> tuple[float, str]:
        memory, compute = self.bytes / HBM_BYTES_PER_S, self.flops / flops_per_s
        return max(memory, compute) * 1e6, "memory" if memory >= compute else "compute"


def kernels() -> list[Kernel]:
    n = 4 << 20  # bench_bit_sharing: 4M float32 elements
    out = [
        Kernel("bit_sharing stats", "4M fp32", 4 * n),
        Kernel("bit_sharing apply", "4M fp32", 8 * n),
        Kernel("bit_sharing backward", "4M fp32", 12 * n),
    ]
    w = 1024 * 4096  # bench_codebook_quant: weight, bool keep mask, output
    out.append(Kernel("codebook_quant", "1024x4096, 50% kept", 9 * w))
    rows = cols = 4096  # bench_lowbit_linear
    for batch in (1, 16):
        for label, bits, kept in (("dense 4-bit", 4, 1.0), ("75%-sparse 4-bit", 4, 0.25), ("75%-sparse 2-bit", 2, 0.25)):
            weights = rows * cols
            packed = weights * kept * bits / 8 + (weights / 8 + rows * cols / 32 * 4 if kept < 1 else 0) + rows * 8
            io = 4 * batch * (rows + cols)
            out.append(Kernel(f"lowbit_linear fwd {label}", f"4096x4096 batch {batch}", packed + io,
                              2 * batch * weights * kept))
    for channels, size in ((64, 56), (128, 28), (256, 14), (512, 7)):  # bench_lut_conv2d, 4-bit dense
        for batch in (1, 32):
            weights = channels * channels * 9
            activations = 4 * batch * channels * size * size  # x read, y written: equal sizes
            out.append(Kernel(f"lut_conv2d fwd {channels}x{size}x{size}", f"batch {batch}",
                              weights / 2 + 2 * activations, 2 * batch * weights * size * size))
    return out


def main() -> None:
    print(f"H100 SXM: {HBM_BYTES_PER_S / 1e12:.2f} TB/s, {FP32_FLOPS / 1e12:.0f} TFLOP/s fp32 "
          f"({TF32_FLOPS / 1e12:.0f} TF32 tensor cores)")
    print(f"{'kernel':38s} {'shape':22s} {'MB moved':>9s} {'GFLOP':>7s} {'fp32 us':>8s} {'bound':>8s} {'tf32 us':>8s}")
    for k in kernels():
        fp32, bound = k.bound_us()
        tf32, _ = k.bound_us(TF32_FLOPS)
        print(f"{k.name:38s} {k.shape:22s} {k.bytes / 1e6:9.2f} {k.flops / 1e9:7.2f} {fp32:8.1f} {bound:>8s} {tf32:8.1f}")


if __name__ == "__main__":
    main()
