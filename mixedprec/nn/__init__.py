"""Deployed (packed) layers, packing of SBS/OPQ-finetuned models, and packed-model files."""
from mixedprec.nn.packed_linear import PackedLinear
from mixedprec.nn.pack import pack
from mixedprec.nn.serialization import load, save

__all__ = ["PackedLinear", "pack", "save", "load"]
