"""A feature loss plus weighted extra terms (waveform L1, multi-resolution STFT, ...)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn


def _accepts_lengths(module: nn.Module) -> bool:
    return "lengths" in inspect.signature(module.forward).parameters


class CombinedLoss(nn.Module):
    """``feature(x̂, x) + Σ_k weight_k · extra_k(x̂, x)``.

    The feature part keeps its per-layer ``weights`` buffer, exposed here as ``weights`` /
    ``term_names``, so ``LossWeightBalancer`` balances the feature layers exactly as for a plain
    ``FeatureLoss``; the extra terms keep their fixed ``weight``. ``forward`` returns
    ``(total, per_layer)`` with the feature part's raw per-layer distances; the extra terms' last
    raw values are in ``last_extra`` (for logging).

    Args:
        feature: a ``FeatureLoss`` (or any module returning ``(total, per_layer)`` with ``weights``).
        extra: ``{name: {"loss": module, "weight": float}}``; each module returns ``(total, terms)``.
    """

    def __init__(self, feature: nn.Module, extra: Mapping[str, Mapping] | None = None) -> None:
        super().__init__()
        if not hasattr(feature, "weights"):
            raise ValueError("loss.feature must be a FeatureLoss (a loss with per-layer `weights`)")
        self.feature = feature
        self.extra = nn.ModuleDict()
        self.extra_weights: dict[str, float] = {}
        for name, spec in (extra or {}).items():
            if not isinstance(spec, Mapping) or "loss" not in spec:
                raise ValueError(f"loss.extra.{name} must be a mapping with a `loss` (and optional `weight`)")
            weight = float(spec.get("weight", 1.0))
            if not weight >= 0:
                raise ValueError(f"loss.extra.{name}.weight must be >= 0, got {spec.get('weight')}")
            self.extra[name] = spec["loss"]
            self.extra_weights[name] = weight
        self.last_extra: dict[str, torch.Tensor] = {}

    @property
    def weights(self) -> torch.Tensor:
        return self.feature.weights

    @property
    def term_names(self) -> list[str]:
        return self.feature.term_names

    @property
    def loss_network(self) -> nn.Module | None:  # so checkpoints record the loss network
        return getattr(self.feature, "loss_network", None)

    def forward(
        self, estimate: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def call(module):
            if lengths is not None and _accepts_lengths(module):
                return module(estimate, target, lengths=lengths)
            return module(estimate, target)

        total, per_layer = call(self.feature)
        self.last_extra = {}
        for name, module in self.extra.items():
            value, _ = call(module)
            self.last_extra[name] = value.detach()
            total = total + self.extra_weights[name] * value
        return total, per_layer
