"""Model metrics: bit-operations (BOPs) and compression reports."""
from mixedprec.metrics.bops import (LayerBops, bops_table, count_bops, differentiable_bops, format_bops_table,
                                    layer_bops, output_positions)

__all__ = ["LayerBops", "bops_table", "count_bops", "differentiable_bops", "format_bops_table", "layer_bops",
           "output_positions"]
from mixedprec.metrics.compression import *  # noqa: E402,F401,F403  (paper and real-bytes compression rates)
