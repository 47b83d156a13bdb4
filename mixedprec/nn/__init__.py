"""Deployed (packed) layers, packing of SBS/OPQ-finetuned models, and packed-model files."""
from mixedprec.nn.attention import LinearMultiheadAttention, unfuse_attention
from mixedprec.nn.fold import FoldedBatchNorm, fold_batchnorm
from mixedprec.nn.int8 import set_int8
from mixedprec.nn.packed_conv import PackedConv2d
from mixedprec.nn.packed_linear import PackedLinear
from mixedprec.nn.pack import pack
from mixedprec.nn.serialization import load, save

__all__ = ["FoldedBatchNorm", "LinearMultiheadAttention", "PackedConv2d", "PackedLinear", "fold_batchnorm", "pack",
           "save", "load", "set_int8", "unfuse_attention"]
