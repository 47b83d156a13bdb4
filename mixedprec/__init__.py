"""mixedprec: joint pruning + mixed-precision quantization (SBS and OPQ) with fused kernels."""
from mixedprec import ops
from mixedprec.nn import fold_batchnorm, load, pack, save

__all__ = ["ops", "pack", "fold_batchnorm", "save", "load"]
__version__ = "0.1.0"
