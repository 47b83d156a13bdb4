"""mixedprec: joint pruning + mixed-precision quantization (SBS and OPQ) with fused kernels."""
from mixedprec import ops

__all__ = ["ops"]
__version__ = "0.1.0"
