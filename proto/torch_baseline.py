# torch baselines for the proto tables: F.linear fp32 / bf16 and _weight_int4pack_mm_for_cpu (dense 4-bit).
# /work/main/.venv/bin/python proto/torch_baseline.py [reps]
import sys, time, statistics, torch
import torch.nn.functional as F
torch.set_num_threads(2)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 15
O = I = 4096
W = torch.randn(O, I)
def t(f):
    f()
    ts = []
    for _ in range(reps):
        a = time.perf_counter(); f(); ts.append((time.perf_counter() - a) * 1e3)
    return statistics.median(ts)
gs = 128
wq = torch.randint(0, 16, (O, I), dtype=torch.int32)
packed = torch._convert_weight_to_int4pack_for_cpu(wq, 1)
sz = torch.rand(I // gs, O, 2)  # scales_and_zeros (groups, out, 2), fp32 for fp32 activations
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {reps}")
print("| batch | F.linear fp32 ms | F.linear bf16 ms | int4pack_mm (g=128) ms |")
print("|---|---|---|---|")
for M in (1, 16):
    x = torch.randn(M, I)
    f32 = t(lambda: F.linear(x, W))
    xb, Wb = x.bfloat16(), W.bfloat16()
    bf = t(lambda: F.linear(xb, Wb))
    try:
        i4 = t(lambda: torch._weight_int4pack_mm_for_cpu(x, packed, gs, sz))
    except Exception as e:
        i4 = float("nan"); print("int4pack failed:", e)
    print(f"| {M} | {f32:.3f} | {bf:.3f} | {i4:.3f} |")
