"""Adaptive batch normalisation Γ(x) = α·x + β·BN(x) (Germain et al.)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchNorm(nn.Module):
    """Batch norm over ``[batch, channels, time]`` with the two options the method needs.

    ``scale=False`` drops γ (TF-slim's default: centre only).
    ``batch_stats_at_eval=True`` always normalises with the batch's own
    statistics, as the authors' release does. The running statistics are still
    kept as buffers (tracked in training mode, never used for normalising) so a
    state dict — e.g. TF moving statistics from ``dfl-import-tf`` — loads
    strictly whichever way this flag is set.
    """

    def __init__(
        self,
        channels: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        scale: bool = True,
        batch_stats_at_eval: bool = False,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.batch_stats_at_eval = batch_stats_at_eval
        self.weight = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.batch_stats_at_eval:
            # training: batch statistics, running ones updated; plain eval: running statistics
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
            )
        # batch statistics at inference, running statistics left untouched
        return F.batch_norm(x, None, None, self.weight, self.bias, True, self.momentum, self.eps)


class AdaptiveBatchNorm(nn.Module):
    """Γ(x) = α·x + β·BN(x) with learnable scalars α (init 1) and β (init 0): identity at init."""

    def __init__(self, channels: int, **bn_kwargs) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.zeros(()))
        self.bn = BatchNorm(channels, **bn_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta * self.bn(x)


def make_norm(kind: str, channels: int, **bn_kwargs) -> nn.Module:
    """``adaptive`` (the method), ``batch`` (plain BN) or ``none``."""
    if kind == "adaptive":
        return AdaptiveBatchNorm(channels, **bn_kwargs)
    if kind == "batch":
        return BatchNorm(channels, **bn_kwargs)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"normalization must be 'adaptive', 'batch' or 'none', got {kind!r}")
