"""Waveform-domain losses with the same ``(total, terms)`` interface as ``FeatureLoss``."""

from __future__ import annotations

import torch
from torch import nn


class WaveformL1Loss(nn.Module):
    """mean |x̂ − x|."""

    term_names: list[str] = []

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (estimate - target).abs().mean(), estimate.new_zeros(0)


class WaveformL2Loss(nn.Module):
    """mean (x̂ − x)²."""

    term_names: list[str] = []

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ((estimate - target) ** 2).mean(), estimate.new_zeros(0)
