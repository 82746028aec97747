"""The denoiser: a context-aggregation network on the raw waveform (no training logic)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfl.models.adaptive_bn import make_norm
from dfl.models.conv import Conv1d
from dfl.models.padding import pad_to_multiple

INITS = ("default", "xavier", "identity")


class ContextAggregationNet(nn.Module):
    """Stack of 3-tap dilated convs, each followed by (adaptive) BN and leaky ReLU, then a 1×1 conv.

    Args:
        dilations: dilation of each k-tap layer, in order (the 1×1 output layer is added after).
        channels: width of every hidden layer.
        kernel_size: taps per conv (odd).
        normalization: ``adaptive`` (α·x + β·BN(x)), ``batch`` or ``none``.
        batch_stats_at_eval: BN always uses the batch's own statistics (the authors' release).
        bn_eps, bn_scale: BN epsilon and whether BN has a γ (TF-slim: 1e-3, no γ).
        negative_slope: leaky ReLU slope.
        init: ``default`` (PyTorch's conv initialisation), ``xavier`` (TF-slim's default, as in the
            authors' release: Xavier-uniform weights, zero biases) or ``identity``: two channels carry
            +x and −x through every layer (so leaky ReLU loses nothing) and the output conv
            recombines them, so the untrained network outputs its input; the other channels
            start random. Training then starts from "no processing" instead of from silence,
            the identity initialisation of context-aggregation networks (Chen et al., 2017).
        padding: ``same`` (symmetric zero padding, output length = input length) or
            ``tf_authors``: each dilated layer runs on the signal zero-padded at the end to a
            multiple of its dilation, BN sees that padded length, and the tail is cut after the
            activation — exactly the authors' TensorFlow graph.
    """

    def __init__(
        self,
        dilations: Sequence[int] = (1, *[2**i for i in range(13)], 1),
        channels: int = 64,
        kernel_size: int = 3,
        in_channels: int = 1,
        normalization: str = "adaptive",
        batch_stats_at_eval: bool = False,
        bn_eps: float = 1e-5,
        bn_scale: bool = True,
        negative_slope: float = 0.2,
        padding: str = "same",
        init: str = "default",
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if padding not in ("same", "tf_authors"):
            raise ValueError(f"padding must be 'same' or 'tf_authors', got {padding!r}")
        if init not in INITS:
            raise ValueError(f"model.init must be one of {INITS}, got {init!r}")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty list of positive integers, got {list(dilations)}")
        self.config = dict(
            dilations=[int(d) for d in dilations],
            channels=channels,
            kernel_size=kernel_size,
            in_channels=in_channels,
            normalization=normalization,
            batch_stats_at_eval=batch_stats_at_eval,
            bn_eps=bn_eps,
            bn_scale=bn_scale,
            negative_slope=negative_slope,
            padding=padding,
            init=init,
        )  # the architecture (what checkpoints record; dfl.kernels recognises it)
        self.dilations = self.config["dilations"]
        self.kernel_size = kernel_size
        self.negative_slope = negative_slope
        self.padding = padding
        bias = normalization == "none"
        bn = dict(eps=bn_eps, scale=bn_scale, batch_stats_at_eval=batch_stats_at_eval)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        cin = in_channels
        for d in self.dilations:
            self.convs.append(Conv1d(cin, channels, kernel_size, dilation=d, bias=bias))
            self.norms.append(make_norm(normalization, channels, **bn))
            cin = channels
        self.output = Conv1d(channels, 1, 1, bias=True)
        if init == "identity":
            self._identity_init()
        elif init == "xavier":
            self._xavier_init()

    @torch.no_grad()
    def _xavier_init(self) -> None:
        # TF-slim conv2d's defaults: xavier_initializer() (uniform, fan_in = taps·c_in, fan_out = taps·c_out),
        # zeros for biases; PyTorch's fan computation for [c_out, c_in, taps] weights is the same.
        for conv in [*self.convs, self.output]:
            nn.init.xavier_uniform_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    @torch.no_grad()
    def _identity_init(self) -> None:
        if self.config["channels"] < 2 or self.config["in_channels"] != 1:
            raise ValueError("init='identity' needs channels >= 2 and in_channels == 1")
        centre = self.kernel_size // 2
        for i, conv in enumerate(self.convs):
            conv.weight[:2].zero_()  # the +x/−x rows read only themselves
            if i == 0:
                conv.weight[0, 0, centre], conv.weight[1, 0, centre] = 1.0, -1.0
            else:
                conv.weight[0, 0, centre], conv.weight[1, 1, centre] = 1.0, 1.0
            if conv.bias is not None:
                conv.bias[:2].zero_()
        self.output.weight.zero_()
        self.output.weight[0, 0, 0], self.output.weight[0, 1, 0] = 1.0, -1.0
        self.output.bias.zero_()

    @property
    def receptive_field(self) -> int:
        """Input samples that influence one output sample."""
        return 1 + sum((self.kernel_size - 1) * d for d in self.dilations)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """``[batch, time]`` or ``[batch, 1, time]`` waveform → waveform of the same shape."""
        squeeze = wav.dim() == 2
        x = wav.unsqueeze(1) if squeeze else wav
        if x.dim() != 3:
            raise ValueError(f"expected [batch, time] or [batch, 1, time], got shape {tuple(wav.shape)}")
        half = self.kernel_size // 2
        for conv, norm, d in zip(self.convs, self.norms, self.dilations):
            if self.padding == "tf_authors" and d > 1:
                x, length = pad_to_multiple(x, d)
                x = F.leaky_relu(norm(conv(F.pad(x, (half * d, half * d)))), self.negative_slope)
                x = x[..., :length]
            else:
                x = F.leaky_relu(norm(conv(F.pad(x, (half * d, half * d)))), self.negative_slope)
        x = self.output(x)
        return x.squeeze(1) if squeeze else x
