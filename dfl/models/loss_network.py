"""The loss network: a VGG-like strided conv stack whose activations define the feature loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfl.models.adaptive_bn import make_norm
from dfl.models.conv import Conv1d
from dfl.models.padding import tf_same_padding


class LossNetwork(nn.Module):
    """``n_layers`` k-tap convs, stride 2 except the last, BN + leaky ReLU.

    Layer ``i`` has ``base_channels · 2^(i // channel_block)`` channels. ``forward``
    returns every layer's activation ``[batch, channels, time_i]``. Optional
    classifier heads (1×1 convs on the time-averaged last layer) serve the
    pretraining tasks; ``heads`` maps a head name to its number of outputs.
    """

    def __init__(
        self,
        n_layers: int = 15,
        base_channels: int = 32,
        channel_block: int = 5,
        kernel_size: int = 3,
        stride: int = 2,
        normalization: str = "batch",
        batch_stats_at_eval: bool = False,
        bn_eps: float = 1e-5,
        bn_scale: bool = True,
        negative_slope: float = 0.2,
        heads: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.config = dict(
            n_layers=n_layers,
            base_channels=base_channels,
            channel_block=channel_block,
            kernel_size=kernel_size,
            stride=stride,
            normalization=normalization,
            batch_stats_at_eval=batch_stats_at_eval,
            bn_eps=bn_eps,
            bn_scale=bn_scale,
            negative_slope=negative_slope,
            heads=dict(heads or {}),
        )
        self.kernel_size = kernel_size
        self.negative_slope = negative_slope
        self.strides = [stride] * (n_layers - 1) + [1]
        self.channels = [base_channels * 2 ** (i // channel_block) for i in range(n_layers)]
        bias = normalization == "none"
        bn = dict(eps=bn_eps, scale=bn_scale, batch_stats_at_eval=batch_stats_at_eval)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        cin = 1
        for cout, s in zip(self.channels, self.strides):
            self.convs.append(Conv1d(cin, cout, kernel_size, stride=s, bias=bias))
            self.norms.append(make_norm(normalization, cout, **bn))
            cin = cout
        self.heads = nn.ModuleDict({name: Conv1d(cin, n, 1) for name, n in (heads or {}).items()})

    @property
    def n_layers(self) -> int:
        return len(self.convs)

    @property
    def min_input_length(self) -> int:
        """Shortest crop the pretraining uses: 2^(layers+1) − 1 samples (the authors' rule)."""
        return 2 ** (self.n_layers + 1) - 1

    def forward(self, wav: torch.Tensor, n_layers: int | None = None) -> list[torch.Tensor]:
        """Activations of the first ``n_layers`` layers (all by default) for ``[batch, time]`` audio."""
        x = wav.unsqueeze(1) if wav.dim() == 2 else wav
        if x.dim() != 3:
            raise ValueError(f"expected [batch, time] or [batch, 1, time], got shape {tuple(wav.shape)}")
        feats = []
        for conv, norm, s in zip(self.convs[: n_layers or None], self.norms, self.strides):
            x = F.pad(x, tf_same_padding(x.shape[-1], self.kernel_size, s))
            x = F.leaky_relu(norm(conv(x)), self.negative_slope)
            feats.append(x)
        return feats

    def classify(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head, ``{name: [batch, n_outputs]}``, from the time-averaged last layer."""
        if not self.heads:
            raise RuntimeError("this LossNetwork was built without classifier heads")
        pooled = self(wav)[-1].mean(dim=-1, keepdim=True)
        return {name: head(pooled).squeeze(-1) for name, head in self.heads.items()}
