"""Compression accounting: the packed-format byte formula section by section, the papers' bit
count, and reports of float and compressed models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mixedprec.metrics import compression_report, packed_layer_bytes, paper_layer_bits


def test_packed_bytes_section_by_section():
    # 1000 weights, 10 channels, 300 kept at 3 bits, fp16 scales
    sections = packed_layer_bytes(1000, 10, 300, 3)
    assert sections == (64, 16, 32, 128, 128)  # header; 8*2 -> 16; 10*2 -> 32; 125 -> 128; 113 -> 128
    assert sections.total == 368
    dense = packed_layer_bytes(1000, 10, 1000, 3, torch.float32)
    assert dense == (64, 16, 48, 0, 384)  # no bitmap when nothing is pruned; 40 -> 48; 375 -> 384
    assert packed_layer_bytes(1000, 10, 0, 8).codes == 0 and packed_layer_bytes(1000, 10, 0, 8).codebook == 512
    assert packed_layer_bytes(1000, 10, 300, 3, codebook_dtype=torch.float32).codebook == 32  # 8 * 4


def test_packed_bytes_take_arrays_of_candidates():
    totals = packed_layer_bytes(1000, 10, np.array([300, 1000]), np.array([3, 3])).total
    assert totals.tolist() == [368, 64 + 16 + 32 + 384]


def test_paper_bits_count_kept_codes_only():
    assert int(paper_layer_bits(300, 3)) == 900


@pytest.mark.parametrize("args, match", [
    ((1000, 10, 1001, 3), "kept"), ((1000, 10, -1, 3), "kept"), ((1000, 10, 5, 9), "bits"),
    ((1000, 7, 5, 2), "out_channels"), ((1000, 10, 5, 2, torch.bfloat16), "scale_dtype"),
    ((1000, 10, 5, 2, torch.float16, torch.float64), "codebook_dtype"),
])
def test_packed_bytes_refuse_bad_counts(args, match):
    with pytest.raises(ValueError, match=match):
        packed_layer_bytes(*args)


def test_float_model_report_is_1x_and_lists_other_parameters():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    report = compression_report(model)
    assert report.real_rate == 1.0 and report.paper_rate == 1.0
    assert report.float_bytes == 4 * (8 * 27 + 16)
    assert report.other_float_bytes == 4 * (8 + 8 * 4 + 2)  # conv bias, BN (4 tensors), linear bias
    assert "total" in report.table()


def test_report_refuses_a_model_without_layers():
    with pytest.raises(ValueError, match="no Conv or Linear"):
        compression_report(nn.Sequential(nn.ReLU()))
