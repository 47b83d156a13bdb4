"""OPQ: one-shot analytical pruning + quantization with unified channel-wise codebooks.

    plan = allocate(model, target_rate=20)    # masks, bitwidths, codebooks from the weights alone
    print(plan.table()); plan.save("plan.json")
    model = convert(model, plan)              # OPQConv2d / OPQLinear with frozen compression
    finetune(model, train_set, epochs=10)     # latent weights only, straight-through

The derivation and its checks: docs/opq.md.
"""
from mixedprec.opq.allocation import BIT_CHOICES, COST_KINDS, allocate, allocate_uniform
from mixedprec.opq.codebooks import LEVEL_KINDS, layer_codebook, magnitude_levels, quantization_error
from mixedprec.opq.finetune import finetune
from mixedprec.opq.layers import OPQConv2d, OPQLinear, convert
from mixedprec.opq import packing  # noqa: F401  (registers the OPQ packer with mixedprec.nn.pack)
from mixedprec.opq.plan import LayerPlan, Plan

__all__ = [
    "BIT_CHOICES", "COST_KINDS", "LEVEL_KINDS", "LayerPlan", "OPQConv2d", "OPQLinear", "Plan", "allocate",
    "allocate_uniform", "convert", "finetune", "layer_codebook", "magnitude_levels", "quantization_error",
]
