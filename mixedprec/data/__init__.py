"""Datasets that ship with the package's dependencies (no downloads at run time)."""
from mixedprec.data.digits import DigitsSplit, load_digits

__all__ = ["DigitsSplit", "load_digits"]
