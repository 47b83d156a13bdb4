"""Whole models, packed against float, at the batches users run: torchvision ResNet-18, ResNet-50
and MobileNetV2 at 224x224 (batch 1 and 8), each packed after OPQ at 8x and 20x real bytes and
after an SBS configuration (bits {2,4,8}, 8-bit activations, a quarter of the prunable filter
groups removed), and a Llama-shaped decoder stack (2 blocks, d=2048, SwiGLU 5632, nn.Linear only)
decoding one token at batch 1 against a 128-token cache, against fp32 and bf16, packed after OPQ
at 8x (SBS's export needs a torch.fx trace, which this stack's cache code does not give). SBS
models run their layers as int8 convolutions (``mixedprec.nn.set_int8``); "sbs float path" is
the same model with that switched off. Weights are random: speed does not
depend on their values, only on the bits and sparsity the methods choose for them. The CNNs run
in both layouts: NCHW, and channels-last (model and input moved with
``memory_format=torch.channels_last``, torch's advice for CPU inference), each packed model
against the float model in the same layout and against the float model in NCHW. The packed CNNs
are deployed as inference runs them: their BatchNorms folded into the packed convs
(``mixedprec.fold_batchnorm``); the float models keep theirs, as torchvision builds them.
`pytest benchmarks/bench_e2e.py` (pytest-benchmark; CI runs each case once as a smoke test on
small inputs), or run this file for the table: ms per forward and the speedup of each packed
model over its float original, timed in the same run (`--quick`: small inputs, for a try)."""
from __future__ import annotations

import argparse
import copy
import functools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixedprec
from mixedprec import opq, sbs
from timing import elapsed_ms  # benchmarks/timing.py

torchvision = pytest.importorskip("torchvision")

NETWORKS = ("resnet18", "resnet50", "mobilenet_v2")
LAYOUTS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}
BATCHES = (1, 8)
OPQ_RATES = (8, 20)
SBS_BITS = (2, 4, 8)
SBS_PRUNED = 0.25
FULL = dict(image=224, d=2048, hidden=5632, heads=16, blocks=2, cache=128)
QUICK = dict(image=32, d=128, hidden=352, heads=4, blocks=2, cache=8)  # CI's smoke runs


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class DecoderBlock(nn.Module):
    """A Llama block: attention over a fixed cache (the decoding step of one new token) and SwiGLU."""

    def __init__(self, d: int, hidden: int, heads: int, cache: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.register_buffer("k_cache", torch.randn(1, heads, cache, d // heads))
        self.register_buffer("v_cache", torch.randn(1, heads, cache, d // heads))

    def split(self, t):
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, S, d / heads)

    def forward(self, x):  # x: (B, 1, d)
        h = self.attn_norm(x)
        b = x.shape[0]
        k = torch.cat([self.k_cache.expand(b, -1, -1, -1).to(h.dtype), self.split(self.k(h))], 2)
        v = torch.cat([self.v_cache.expand(b, -1, -1, -1).to(h.dtype), self.split(self.v(h))], 2)
        a = F.scaled_dot_product_attention(self.split(self.q(h)), k, v)
        x = x + self.o(a.transpose(1, 2).flatten(-2))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def decoder(size: dict) -> nn.Module:
    torch.manual_seed(0)
    blocks = [DecoderBlock(size["d"], size["hidden"], size["heads"], size["cache"]) for _ in range(size["blocks"])]
    return nn.Sequential(*blocks).eval()


def network(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()


def opq_packed(model: nn.Module, rate: float) -> nn.Module:
    plan = opq.allocate(model, rate, quiet=True)
    return mixedprec.pack(opq.convert(model, plan)).eval()


def sbs_packed(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """SBS as a search leaves it: weight bits cycling through {2,4,8} over the layers, 8-bit
    activations, a quarter of every prunable layer's filter groups pruned; exported and packed."""
    net = sbs.convert(model, sbs.SBSPolicy())
    with torch.no_grad():
        net(example)  # the first pass sets the activation clip values from data
    for i, layer in enumerate(sbs.sbs_layers(net).values()):
        if layer.prune_gate is not None:
            keep = layer.prune_gate.keep
            keep[: math.floor(SBS_PRUNED * keep.numel())] = False
        layer.fix(SBS_BITS[i % len(SBS_BITS)] if layer.w_quant.enabled else None, 8 if layer.a_quant.enabled else None)
    return mixedprec.pack(sbs.export(net.eval()).model).eval()


def image(batch: int, size: dict) -> torch.Tensor:
    return torch.randn(batch, 3, size["image"], size["image"], generator=torch.Generator().manual_seed(batch))


def token(size: dict) -> torch.Tensor:
    return torch.randn(1, 1, size["d"], generator=torch.Generator().manual_seed(1))


DECODER = "llama decoder"


@functools.cache
def rows(quick: bool, models: tuple[str, ...] = (*NETWORKS, DECODER)) -> dict:
    """(name, layout) -> (float model, {variant: model}, inputs per batch) of ``models``; models
    are built once per run."""
    size = QUICK if quick else FULL
    found = {}
    for name in (n for n in NETWORKS if n in models):
        model = network(name)
        variants = {**{f"opq {r}x": opq_packed(model, r) for r in OPQ_RATES}, **sbs_variants(model, image(2, size))}
        for variant, packed in variants.items():
            if variant != "sbs float path":  # wraps "sbs"'s model, folded already
                mixedprec.fold_batchnorm(packed)
        for layout, memory_format in LAYOUTS.items():
            def moved(m: nn.Module) -> nn.Module:
                return copy.deepcopy(m).to(memory_format=memory_format)
            found[name, layout] = (moved(model), {v: moved(m) for v, m in variants.items()},
                                   {b: image(b, size).contiguous(memory_format=memory_format) for b in BATCHES})
    if DECODER in models:
        stack = decoder(size)
        found[DECODER, "-"] = (stack, {"bf16": stack_bf16(stack), "opq 8x": opq_packed(stack, 8)}, {1: token(size)})
    return found


class FloatPath(nn.Module):
    """``model`` with the int8 path of its SBS layers switched off (the fake-quant and float kernels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        previous = mixedprec.nn.set_int8(False)
        try:
            return self.model(x)
        finally:
            mixedprec.nn.set_int8(previous)


def sbs_variants(model: nn.Module, example: torch.Tensor) -> dict:
    packed = sbs_packed(model, example)
    return {"sbs": packed, "sbs float path": FloatPath(packed)}


def stack_bf16(stack: nn.Module) -> nn.Module:
    """The stack in bfloat16, taking and returning float32 like the others."""
    return nn.Sequential(Cast(torch.bfloat16), copy.deepcopy(stack).to(torch.bfloat16), Cast(torch.float32))


class Cast(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


NETWORK_VARIANTS = ("float", *(f"opq {r}x" for r in OPQ_RATES), "sbs", "sbs float path")
CASES = ([(n, layout, v, b) for n in NETWORKS for layout in LAYOUTS for v in NETWORK_VARIANTS for b in BATCHES]
         + [(DECODER, "-", v, 1) for v in ("float", "bf16", "opq 8x")])


@pytest.mark.parametrize("name,layout,variant,batch", CASES, ids=lambda v: str(v))
def test_e2e(benchmark, name, layout, variant, batch):
    model, variants, inputs = rows(quick=True)[name, layout]
    fn = model if variant == "float" else variants[variant]
    with torch.inference_mode():
        benchmark(fn, inputs[batch])


def measure(quick: bool, repeats: int, models: tuple[str, ...]) -> dict:
    """Median ms per (model, layout, variant, batch) over ``repeats`` rounds; each round takes the
    float model and each of its variants in turn and times the second of two back-to-back calls
    (what a served model sees: its weights as warm in the caches as its own previous call left
    them). A slow phase of a shared machine then reaches every model of a row alike, rather than
    whichever one was being timed (a block of calls per model gave cells 0.65x in one run and
    1.1x in the next)."""
    times = {}
    with torch.inference_mode():
        for (name, layout), (model, variants, inputs) in rows(quick, models).items():
            models = {"float": model, **variants}
            for batch, x in inputs.items():
                samples = {v: [] for v in models}
                for _ in range(repeats):
                    for v, m in models.items():
                        m(x)
                        samples[v].append(elapsed_ms(lambda: m(x)))
                times.update({(name, layout, v, batch): statistics.median(s) for v, s in samples.items()})
    return times


def print_table(times: dict) -> None:
    """Speedups over the float model in the same layout, and over the float model in NCHW (the
    model as users first run it): a channels-last packed model against both."""
    print("| model | batch | layout | variant | ms | over float, same layout | over float NCHW |")
    print("|---|---|---|---|---|---|---|")
    for (name, layout, variant, batch), t in sorted(times.items(),
                                                    key=lambda kv: (kv[0][0], kv[0][3], kv[0][1], kv[0][2] != "float")):
        base, nchw = times[name, layout, "float", batch], times.get((name, "nchw", "float", batch))
        over_nchw = "" if nchw is None or layout == "nchw" else f"{nchw / t:.2f}x"
        print(f"| {name} | {batch} | {layout} | {variant} | {t:.2f} | {base / t:.2f}x | {over_nchw} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small inputs and decoder (CI's smoke sizes)")
    parser.add_argument("--models", nargs="+", choices=(*NETWORKS, DECODER), default=(*NETWORKS, DECODER),
                        help="the rows to build and time (default: all)")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    print(f"{torch.get_num_threads()} threads, cpu, {size}, median of {args.repeats} rounds, each timing every model "
          f"of a row once, after an untimed call")
    print_table(measure(args.quick, args.repeats, tuple(args.models)))


if __name__ == "__main__":
    main()
