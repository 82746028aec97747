"""Waveform-domain losses with the same ``(total, terms)`` interface as ``FeatureLoss``.

With ``lengths`` (padded batches) each utterance is averaged over its own samples, then the
batch: exactly the mean of the utterances' losses taken one at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from dfl.losses.masking import masked_mean


class WaveformL1Loss(nn.Module):
    """mean |x̂ − x|."""

    term_names: list[str] = []

    def forward(
        self, estimate: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        diff = (estimate - target).abs()
        return (diff.mean() if lengths is None else masked_mean(diff, lengths)), estimate.new_zeros(0)


class WaveformL2Loss(nn.Module):
    """mean (x̂ − x)²."""

    term_names: list[str] = []

    def forward(
        self, estimate: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        diff = (estimate - target) ** 2
        return (diff.mean() if lengths is None else masked_mean(diff, lengths)), estimate.new_zeros(0)
