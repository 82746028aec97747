"""A ContextAggregationNet's training forward through the fused CPU layers (:mod:`dfl.kernels.fused_layer`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfl.kernels import winograd
from dfl.kernels.fused_layer import conv_deferred_norm, conv_norm_act, output_conv_deferred_norm


def runs_fused(x: torch.Tensor) -> bool:
    """Whether the fused layers take this input: CPU float32, eager mode, outside autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class FusedTrainingNet(nn.Module):
    """Runs a ``ContextAggregationNet`` whose conv → norm → leaky ReLU layers go through fused channels-last
    CPU ops: the same parameters, running statistics and results to float rounding, about 3× faster training.

    Built by :func:`dfl.kernels.accelerate`; other inputs (GPU, other dtypes, autocast, ``torch.compile``)
    run the model's own forward.

    Args:
        model: the plain ``ContextAggregationNet`` (3-tap convs, a BN-based normalisation); it is shared, not copied.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> dict:
        """The wrapped model's architecture (what checkpoints record)."""
        return self.model.config

    @property
    def receptive_field(self) -> int:
        return self.model.receptive_field

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """``[batch, time]`` or ``[batch, 1, time]`` waveform → waveform of the same shape."""
        x = wav.unsqueeze(1) if wav.dim() == 2 else wav
        if x.dim() != 3 or not runs_fused(x):
            return self.model(wav)
        y = fused_forward(self.model, x)
        return y if wav.dim() == 2 else y.unsqueeze(1)


def fused_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[batch, channels, time]`` → ``[batch, time]`` through channels-last buffers."""
    d, n = model.dilations, x.shape[-1]
    channels = model.config["channels"]
    # rows each layer computes: the authors' padding extends dilated layers to a multiple of d
    rows = [n + ((-n) % di if model.padding == "tf_authors" and di > 1 else 0) for di in d]
    # input channels padded with zeros to a multiple of 8 (zero weights too), so the compiled kernels
    # take the 1-channel first layer as well: the same result, without PyTorch's slower path
    extra = (-x.shape[1]) % 8 if channels % 8 == 0 else 0
    buf = F.pad(x, (d[0], d[0] + rows[0] - n)).transpose(1, 2)
    buf = F.pad(buf, (0, extra)).contiguous()
    first_weight = F.pad(model.convs[0].weight, (0, 0, 0, extra)) if extra else model.convs[0].weight
    slope = model.negative_slope
    if winograd.compiled_kernels_for(buf) is not None and channels % 8 == 0:
        # the layers store only their conv outputs; each applies the norm of the one below as it reads
        # (dfl.kernels.fused_layer.conv_deferred_norm)
        below = None
        for i, (conv, norm) in enumerate(zip(model.convs, model.norms)):
            weight = first_weight if i == 0 else conv.weight
            buf, *below = conv_deferred_norm(buf, below, weight, norm, d[i], n, rows[i], slope)
        return output_conv_deferred_norm(buf, below, model.output, n, slope)
    for i, (conv, norm) in enumerate(zip(model.convs, model.norms)):
        weight = first_weight if i == 0 else conv.weight
        # zero margins: the next layer's padding
        margins = (d[i + 1], d[i + 1] + rows[i + 1] - n) if i + 1 < len(d) else (0, 0)
        buf = conv_norm_act(buf, weight, norm, d[i], n, margins, slope, rows=rows[i])
    return buf @ model.output.weight[0, :, 0] + model.output.bias
