"""The deep feature loss: weighted L1 distance between loss-network activations."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from dfl.losses.masking import masked_mean
from dfl.models import LossNetwork

log = logging.getLogger(__name__)

RANDOM_LOSSNET_WARNING = (
    "The loss network is RANDOMLY INITIALISED (no lossnet.checkpoint given). This is a valid "
    "ablation, not the deep-feature-loss method: pretrain one with `dfl-pretrain` (or import the "
    "authors' with `dfl-import-tf lossnet`) and pass lossnet.checkpoint=PATH."
)


def build_loss_network(checkpoint: str | None = None, **config) -> LossNetwork:
    """A frozen-to-be ``LossNetwork``: loaded from ``checkpoint`` if given, else random (with a loud warning).

    A checkpoint carries its own architecture; it wins over ``config`` (differences are logged).
    """
    if checkpoint:
        from dfl.checkpoints import build_model, load_record

        path = os.path.expanduser(str(checkpoint))
        record = load_record(path, "lossnet")
        net = build_model(record, path)
        net.meta = dict(record.get("meta") or {})
        differs = {k: (v, net.config.get(k)) for k, v in config.items() if k in net.config and net.config[k] != v}
        if differs:
            log.info("lossnet.checkpoint=%s defines the architecture; config values ignored: %s", checkpoint, differs)
        net.pretrained_from = str(checkpoint)
        return net
    net = LossNetwork(**config)
    net.pretrained_from = None
    log.warning(RANDOM_LOSSNET_WARNING)
    import warnings

    warnings.warn(RANDOM_LOSSNET_WARNING, UserWarning, stacklevel=2)
    return net


class FeatureLoss(nn.Module):
    """Σ_l w_l · mean|φ_l(estimate) − φ_l(target)| over the selected loss-network layers.

    The loss network is frozen (no parameter gets a gradient or changes, BN stays in
    inference mode unless the network itself normalises with batch statistics), yet
    gradients flow through it to ``estimate``.

    Args:
        loss_network: the network φ; ``forward`` must return a list of activations.
        layers: ``None`` or ``"all"`` = every layer, an int ``k`` = the first ``k`` layers, or a list of
            indices. ``None`` is refused for the authors' imported loss network, which their training
            uses with its first 6 layers (``"all"`` says every layer on purpose).
        weights: initial per-layer weights (default 1); usually set by ``LossWeightBalancer``.

    ``forward`` returns ``(total, per_layer)`` where ``per_layer`` holds the raw (unweighted)
    per-layer distances — what the balancer averages.
    """

    def __init__(
        self,
        loss_network: nn.Module,
        layers: int | Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.loss_network = loss_network
        n_total = len(loss_network.convs) if hasattr(loss_network, "convs") else None
        if layers is None and getattr(loss_network, "meta", {}).get("source") == "tensorflow":
            raise ValueError(
                f"loss.layers is unset (every layer) but lossnet.checkpoint={loss_network.pretrained_from} is the "
                "authors' imported loss network, which their training uses with its first 6 layers: use "
                "loss=fl_authors (or loss.layers=6), or loss.layers=all to use all its layers on purpose"
            )
        if layers == "all":
            layers = None
        if layers is None:
            if n_total is None:
                raise ValueError("layers must be given for a loss network without a .convs list")
            idx = list(range(n_total))
        elif isinstance(layers, int):
            idx = list(range(layers))
        else:
            idx = [int(i) for i in layers]
        if not idx or (n_total is not None and (max(idx) >= n_total or min(idx) < 0)):
            raise ValueError(f"loss.layers={layers!r} does not select layers of a {n_total}-layer loss network")
        self.layers = idx
        w = torch.ones(len(idx)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (len(idx),):
            raise ValueError(f"loss.weights has {w.numel()} values for {len(idx)} layers")
        self.register_buffer("weights", w.clone())
        for p in self.loss_network.parameters():
            p.requires_grad_(False)
        self.loss_network.eval()

    def train(self, mode: bool = True) -> FeatureLoss:
        super().train(mode)
        self.loss_network.eval()  # frozen: running statistics must never move
        return self

    @property
    def term_names(self) -> list[str]:
        return [f"layer_{i}" for i in self.layers]

    def distances(
        self,
        estimate: torch.Tensor,
        target: torch.Tensor,
        lengths: torch.Tensor | None = None,
        loss_network: nn.Module | None = None,
    ) -> torch.Tensor:
        """Raw per-layer mean absolute differences, shape ``[n_layers]``.

        With ``lengths`` (a zero-padded batch), layer ``l`` is averaged over each utterance's valid
        frames only — ``ceil(length / (s_0 · … · s_l))`` for strides ``s`` — then over the batch.
        This matches the utterances taken one at a time up to the convolution edges: the frame
        that straddles an utterance's end, the activations of the padding leaking into deeper
        layers' receptive fields near the end, and TF-SAME padding, which shifts the sampling grid
        by a sample when an utterance's length parity at some layer differs from the batch's.
        The difference shrinks with utterance length relative to the layer's stride; see
        ``tests/test_bucketing.py``.

        Args:
            estimate: ``[batch, time]`` denoised audio (gradients flow to it).
            target: ``[batch, time]`` clean audio.
            lengths: valid samples per utterance of a zero-padded batch, or None.
            loss_network: computes the activations instead of ``self.loss_network`` (the same network
                run another way, e.g. :class:`dfl.kernels.frozen_feature_loss.FrozenFeaturesNet`).

        Returns:
            ``[n_layers]`` distances, unweighted.
        """
        net = self.loss_network if loss_network is None else loss_network
        depth = max(self.layers) + 1
        feats_est = net(estimate, n_layers=depth)
        with torch.no_grad():
            feats_ref = net(target, n_layers=depth)
        if lengths is None:
            # sum / count, not mean(): mean's backward materialises a [batch, channels, time] tensor, slow
            # against features in another memory layout (the frozen fast path's channels-last views)
            return torch.stack([(feats_est[i] - feats_ref[i]).abs().sum() / feats_est[i].numel() for i in self.layers])
        lengths = torch.as_tensor(lengths, device=estimate.device).to(torch.long)
        hops = self._layer_hops(estimate.shape[-1], [f.shape[-1] for f in feats_est])
        return torch.stack(
            [masked_mean((feats_est[i] - feats_ref[i]).abs(), -(-lengths // hops[i])) for i in self.layers]
        )

    def _layer_hops(self, n_samples: int, frames: list[int]) -> list[int]:
        """Input samples per frame of each layer: the product of the strides up to it."""
        strides = getattr(self.loss_network, "strides", None)
        if strides is None:  # a network without declared strides: infer from the shapes
            return [max(1, round(n_samples / t)) for t in frames]
        hops, hop = [], 1
        for s in strides[: len(frames)]:
            hop *= s
            hops.append(hop)
        return hops

    def forward(
        self, estimate: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_layer = self.distances(estimate, target, lengths)
        return (self.weights * per_layer).sum(), per_layer
