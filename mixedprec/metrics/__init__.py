"""Model metrics: bit-operations (BOPs), packed bytes and compression rates, latency, and the one
report model of every form of a model (``metrics.report``)."""
from mixedprec.metrics.bops import (LayerBops, bops_table, count_bops, differentiable_bops, format_bops_table,
                                    layer_bops, output_positions)
from mixedprec.metrics.compression import PackedLayerBytes, packed_layer_bytes, paper_layer_bits
from mixedprec.metrics.latency import Latency, model_latency, models_latency, time_calls, time_rounds
from mixedprec.metrics.report import (LayerRow, LayerWeight, ModelReport, NoReference, Reference, ReportsWeight,
                                      compression_report, model_report)

__all__ = ["Latency", "LayerBops", "LayerRow", "LayerWeight", "ModelReport", "NoReference", "PackedLayerBytes",
           "Reference", "ReportsWeight", "bops_table", "compression_report", "count_bops", "differentiable_bops",
           "format_bops_table", "layer_bops", "model_latency", "model_report", "models_latency", "output_positions",
           "packed_layer_bytes", "paper_layer_bits", "time_calls", "time_rounds"]
