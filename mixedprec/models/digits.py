"""A small CNN for 8x8 inputs (the embedded digits data set)."""
from __future__ import annotations

from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Sequential:
    """conv(1->w) conv(w->2w) pool conv(2w->4w) conv(4w->4w) avgpool linear; 8x8 -> logits."""
    w = width
    return nn.Sequential(
        *_conv_bn_relu(in_channels, w),
        *_conv_bn_relu(w, 2 * w),
        nn.MaxPool2d(2),
        *_conv_bn_relu(2 * w, 4 * w),
        *_conv_bn_relu(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )
