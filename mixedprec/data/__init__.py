"""Data sets: the embedded digits, and a reader for a local copy of CIFAR-100 (nothing is downloaded)."""
from mixedprec.data.cifar import Cifar100
from mixedprec.data.digits import DigitsSplit, load_digits

__all__ = ["Cifar100", "DigitsSplit", "load_digits"]
