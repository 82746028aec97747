"""Small denoisers with non-trivial weights and BN statistics, saved as dfl model files (inference tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from dfl.checkpoints import save_model
from dfl.models import ContextAggregationNet

# narrow stand-ins for can_paper (running statistics) and can_authors (batch statistics, tf padding)
RUNNING_STATS = dict(dilations=[1, 1, 2, 4, 8, 16, 1], channels=8)
BATCH_STATS = dict(
    dilations=[1, 2, 4, 8, 1], channels=8, padding="tf_authors", batch_stats_at_eval=True, bn_eps=1e-3, bn_scale=False
)


def small_denoiser(seed: int = 0, **config) -> ContextAggregationNet:
    """A model whose adaptive-BN scalars and running statistics are far from their initial values."""
    torch.manual_seed(seed)
    model = ContextAggregationNet(**{**RUNNING_STATS, **config})
    with torch.no_grad():
        for norm in model.norms:
            if hasattr(norm, "alpha"):
                norm.alpha.uniform_(0.5, 1.0)
                norm.beta.uniform_(0.3, 0.8)
        model.train()
        for _ in range(3):
            model(0.2 * torch.randn(2, 3000))
    return model.eval()


def saved_denoiser(path: Path, seed: int = 0, **config) -> Path:
    save_model(path, "denoiser", small_denoiser(seed, **config))
    return path
