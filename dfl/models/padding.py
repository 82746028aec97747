"""Padding rules shared by the networks (and by the TF import's parity)."""

from __future__ import annotations

import torch.nn.functional as F


def tf_same_padding(length: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding: output ceil(L/stride); an odd extra zero goes at the end."""
    out = -(-length // stride)
    effective = (kernel_size - 1) * dilation + 1
    total = max((out - 1) * stride + effective - length, 0)
    return total // 2, total - total // 2


def pad_to_multiple(x, multiple: int):
    """Zero-pad the time axis at the end to a multiple of ``multiple``; returns (padded, original length)."""
    length = x.shape[-1]
    extra = (-length) % multiple
    return (F.pad(x, (0, extra)) if extra else x), length
