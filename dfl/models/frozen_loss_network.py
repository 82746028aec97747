"""The frozen loss network's features and their input gradient on the CPU: channels-last, BN folded in.

A frozen :class:`~dfl.models.loss_network.LossNetwork` in eval mode with running statistics computes
``leaky_relu(BN(conv(x)))`` per layer, and BN is then a fixed per-channel affine map: folded into the
conv's taps and a bias, each layer is a few matrix products on ``[batch, time, channels]`` buffers
plus the activation. oneDNN's path for these strided 1-D convs reorders every tensor to a 2-D layout
and back, and BN adds a pass forward and backward; here a layer reads its padded input through strided
views (no copies) and writes its output once. Only the input gradient is computed: the network is
frozen. Same results as the module's own forward, to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfl.models.adaptive_bn import BatchNorm
from dfl.models.padding import tf_same_padding


def applies(net, x: torch.Tensor) -> bool:
    """Whether :func:`frozen_features` runs ``net`` on ``x``: eval mode, frozen, plain BN with running
    statistics (or no norm), float32 on the CPU, outside autocast and ``torch.compile``."""
    return (
        not net.training
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not any(p.requires_grad for p in net.parameters())
        and all(
            (isinstance(norm, BatchNorm) and not norm.batch_stats_at_eval and conv.bias is None)
            or (isinstance(norm, torch.nn.Identity) and conv.bias is not None)
            for conv, norm in zip(net.convs, net.norms)
        )
    )


def _folded(conv, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(taps [k, Cin, Cout], bias [Cout])`` of ``norm(conv(x))``, folded in float64."""
    w = conv.weight.detach().double()
    if isinstance(norm, BatchNorm):
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach().double()
        bias = norm.bias.detach().double() - norm.running_mean.double() * scale
        w = w * scale[:, None, None]
    else:
        bias = conv.bias.detach().double()
    return w.permute(2, 1, 0).float().contiguous(), bias.float()


def _tap_groups(x: torch.Tensor, n_out: int, stride: int, kernel: int):
    """``(first tap, input rows as [n_out, taps·Cin])`` per group of up to ``stride`` consecutive taps of a
    ``[rows, Cin]`` buffer: output row ``t`` reads rows ``stride·t + tap``, so a group's rows lie side by side
    in memory and one strided view (leading dimension ``stride·Cin``) serves all outputs."""
    c_in = x.shape[1]
    for j in range(0, kernel, stride):
        width = min(stride, kernel - j)
        yield j, x.as_strided((n_out, width * c_in), (stride * c_in, 1), x.storage_offset() + j * c_in)


def _conv_into(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, stride: int, out: torch.Tensor) -> None:
    """``out[t] = bias + Σ_j x[stride·t + j] @ taps[j]`` (``out [n_out, Cout]``) for a padded ``[rows, Cin]``
    buffer ``x``."""
    kernel, c_in = taps.shape[0], taps.shape[1]
    for j, cols in _tap_groups(x, out.shape[0], stride, kernel):
        w = taps[j : j + cols.shape[1] // c_in].reshape(-1, taps.shape[2])
        if j == 0:
            torch.addmm(bias, cols, w, out=out)
        else:
            out.addmm_(cols, w)


def _padded(like: torch.Tensor, batch: int, rows: int, pad: tuple[int, int], channels: int) -> torch.Tensor:
    """An uninitialised ``[batch, left + rows + right, channels]`` buffer with zero margins."""
    left, right = pad
    buf = like.new_empty(batch, left + rows + right, channels)
    buf[:, :left].zero_()
    buf[:, left + rows :].zero_()
    return buf


class _FrozenFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wav, cfg):
        layers, strides, kernel, slope = cfg
        lengths = [wav.shape[-1]]
        for s in strides:
            lengths.append(-(-lengths[-1] // s))  # TF SAME: ceil(length / stride)
        pads = [tf_same_padding(n, kernel, s) for n, s in zip(lengths, strides)]
        batch = wav.shape[0]
        x = _padded(wav, batch, lengths[0], pads[0], 1)
        x[:, pads[0][0] : pads[0][0] + lengths[0], 0] = wav
        feats = []
        for i, ((taps, bias), stride) in enumerate(zip(layers, strides)):
            n_out = lengths[i + 1]
            # written straight into the next layer's padded input buffer
            pad = pads[i + 1] if i + 1 < len(layers) else (0, 0)
            buf = _padded(x, batch, n_out, pad, taps.shape[2])
            y = buf[:, pad[0] : pad[0] + n_out]
            for b in range(batch):
                _conv_into(x[b], taps, bias, stride, y[b])
            F.leaky_relu_(y, slope)
            feats.append(y)
            x = buf
        ctx.cfg, ctx.pads, ctx.lengths = cfg, pads, lengths
        ctx.set_materialize_grads(False)  # layers outside the loss get no gradient: None, not zeros
        ctx.save_for_backward(*feats)
        return tuple(feats)

    @staticmethod
    def backward(ctx, *grads):
        layers, strides, kernel, slope = ctx.cfg
        feats = ctx.saved_tensors
        dh, own = None, False
        for i in reversed(range(len(feats))):
            if grads[i] is not None:
                if dh is None:
                    dh, own = grads[i], False
                elif own:
                    dh.add_(grads[i])
                else:
                    dh = dh + grads[i]
            if dh is None:
                continue
            taps, _ = layers[i]
            dy = torch.ops.aten.leaky_relu_backward(dh, feats[i], slope, True)
            (left, right), length, stride = ctx.pads[i], ctx.lengths[i], strides[i]
            c_in, n_out = taps.shape[1], dy.shape[1]
            dx = dy.new_empty(dy.shape[0], left + length + right, c_in)
            flipped = taps.transpose(1, 2)  # [k, Cout, Cin]: the input gradient's conv
            for b in range(dy.shape[0]):
                dxb, dyb = dx[b], dy[b].contiguous()
                covered = n_out * stride if kernel >= stride else 0
                if covered:  # the first `stride` taps write rows 0 … n_out·stride once, side by side
                    torch.mm(dyb, flipped[:stride].transpose(0, 1).reshape(-1, stride * c_in),
                             out=dxb[:covered].view(n_out, stride * c_in))  # fmt: skip
                dxb[covered:].zero_()
                for j, cols in _tap_groups(dxb, n_out, stride, kernel):
                    if j >= stride or not covered:
                        cols.addmm_(dyb, flipped[j : j + cols.shape[1] // c_in].transpose(0, 1).reshape(-1, cols.shape[1]))
            dh, own = dx[:, left : left + length], True
        return (None if dh is None else dh[..., 0]), None


def frozen_features(net, wav: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    """The first ``n_layers`` activations ``[batch, channels, time_i]`` of ``net`` for ``[batch, time]``
    audio (see :func:`applies`); views of channels-last buffers, differentiable in ``wav``."""
    folded = tuple(_folded(conv, norm) for conv, norm in zip(net.convs[:n_layers], net.norms))
    cfg = (folded, tuple(net.strides[:n_layers]), net.kernel_size, float(net.negative_slope))
    return [f.transpose(1, 2) for f in _FrozenFeatures.apply(wav.contiguous(), cfg)]
