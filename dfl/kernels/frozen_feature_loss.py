"""The feature loss and its loss network through the frozen network's fast path (:mod:`dfl.kernels.frozen_loss_network`)."""

from __future__ import annotations

import torch
from torch import nn

# the module, not its names: tests switch the fast path off through frozen_loss_network.applies
from dfl.kernels import frozen_loss_network


class FrozenFeaturesNet(nn.Module):
    """A frozen ``LossNetwork``'s activations through channels-last buffers (the same features, faster).

    Where the fast path does not apply (training mode, unfrozen, not CPU float32, batch statistics) the
    network's own forward runs.

    Args:
        net: the plain ``LossNetwork``; shared, not copied.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, wav: torch.Tensor, n_layers: int | None = None) -> list[torch.Tensor]:
        """Activations of the first ``n_layers`` layers (all by default) for ``[batch, time]`` audio."""
        x = wav.unsqueeze(1) if wav.dim() == 2 else wav
        if x.dim() == 3 and x.shape[1] == 1 and frozen_loss_network.applies(self.net, x):
            return frozen_loss_network.frozen_features(self.net, x[:, 0], n_layers or self.net.n_layers)
        return self.net(wav, n_layers=n_layers)


class FrozenFeatureLoss(nn.Module):
    """A ``FeatureLoss`` whose distances run as one op through its frozen loss network where that applies.

    Same ``forward``/``distances`` signatures and results as the wrapped loss; its ``weights`` (what
    ``LossWeightBalancer`` sets) and ``term_names`` are the wrapped loss's.

    Args:
        loss: the plain ``FeatureLoss``; shared, not copied.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.features = FrozenFeaturesNet(loss.loss_network)

    @property
    def weights(self) -> torch.Tensor:
        return self.loss.weights

    @property
    def term_names(self) -> list[str]:
        return self.loss.term_names

    @property
    def loss_network(self) -> nn.Module:
        return self.loss.loss_network

    @property
    def layers(self) -> list[int]:
        return self.loss.layers

    def distances(
        self, estimate: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw per-layer distances, shape ``[n_layers]`` (see ``FeatureLoss.distances``)."""
        net = self.loss.loss_network
        if (
            lengths is None
            and estimate.dim() == 2
            and estimate.shape == target.shape
            and target.dtype == estimate.dtype
            and frozen_loss_network.applies(net, estimate)
        ):
            return frozen_loss_network.frozen_distances(net, estimate, target, self.loss.layers)
        return self.loss.distances(estimate, target, lengths, loss_network=self.features)

    def forward(
        self, estimate: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_layer = self.distances(estimate, target, lengths)
        return (self.loss.weights * per_layer).sum(), per_layer
