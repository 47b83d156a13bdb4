"""Deployed (packed) layers, packing of SBS/OPQ-finetuned models, and packed-model files."""
from mixedprec.nn.packed_conv import PackedConv2d
from mixedprec.nn.packed_linear import PackedLinear
from mixedprec.nn.pack import pack
from mixedprec.nn.serialization import load, save

__all__ = ["PackedConv2d", "PackedLinear", "pack", "save", "load"]
