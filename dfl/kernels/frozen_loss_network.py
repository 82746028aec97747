"""The frozen loss network's features and their input gradient on the CPU: channels-last, BN folded in.

A frozen :class:`~dfl.models.loss_network.LossNetwork` in eval mode with running statistics computes
``leaky_relu(BN(conv(x)))`` per layer, and BN is then a fixed per-channel affine map: folded into the
conv's taps and a bias, each layer is a few matrix products on ``[batch, time, channels]`` buffers
plus the activation. oneDNN's path for these strided 1-D convs reorders every tensor to a 2-D layout
and back, and BN adds a pass forward and backward; here a layer reads its padded input through strided
views (no copies) and writes its output once. With the compiled kernels (:mod:`dfl.kernels.native`) a layer is one
pass: an output's taps lie side by side in its input buffer, so they are one GEMM operand, and bias and
activation are applied as the products are stored. Only the input gradient is computed: the network is
frozen. Same results as the module's own forward, to float32 rounding.

:func:`frozen_distances` is the deep feature loss's part in one op (what ``FeatureLoss`` runs when this path
applies): both signals through the layers with one set of folded weights, the per-layer mean absolute
differences without an autograd graph, and a backward that adds each layer's ``sign(est − ref) / count`` as
it reaches that layer. With the compiled kernels (:mod:`dfl.kernels.native`) each distance is one pass that never
writes ``est − ref``, and the backward forms the sign term, adds the gradient from above and applies the
leaky ReLU's gradient in one pass per layer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dfl.kernels import norm_affine
from dfl.kernels.native import cpu_kernels
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


class _FrozenSpec(NamedTuple):
    """The frozen layers as :func:`_features` and :func:`_input_grad` run them."""

    layers: tuple  # per layer, (taps [k, Cin, Cout], bias [Cout]) with the norm folded in (_folded)
    strides: tuple
    kernel_size: int
    negative_slope: float


def _folded(conv, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(taps [k, Cin, Cout], bias [Cout])`` of ``norm(conv(x))``, folded in float64."""
    w = conv.weight.detach().double()
    if isinstance(norm, BatchNorm):
        w, bias = norm_affine.fold_into_conv(w, None, *norm_affine.running_affine(norm, w.shape[0], torch.float64))
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


def _geometry(n: int, strides, kernel: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Each layer's input length (and the last one's output length) and TF-SAME padding."""
    lengths = [n]
    for s in strides:
        lengths.append(-(-lengths[-1] // s))  # TF SAME: ceil(length / stride)
    return lengths, [tf_same_padding(length, kernel, s) for length, s in zip(lengths, strides)]


def _features(wav: torch.Tensor, spec: _FrozenSpec, lengths, pads) -> list[torch.Tensor]:
    """The layers' activations ``[batch, time_i, channels_i]``, each a view of the next layer's padded input."""
    layers, strides, slope = spec.layers, spec.strides, spec.negative_slope
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
        kernels = cpu_kernels() if taps.shape[2] % 16 == 0 else None
        for b in range(batch):
            if kernels is not None:  # conv, bias and activation in one pass, the taps one GEMM operand
                kernels.strided_conv(x[b], taps, bias, stride, slope, y[b])
            else:
                _conv_into(x[b], taps, bias, stride, y[b])
        if kernels is None:
            F.leaky_relu_(y, slope)
        feats.append(y)
        x = buf
    return feats


def _leaky_relu_grad(feats, outside, slope: float):
    """The ``activation_grad`` of :func:`_input_grad` for gradients ``outside(i)`` (shaped like ``feats[i]``, or
    None) reaching the layers' activations from outside the network: added to the one from above, through
    the leaky ReLU."""

    def grad(i: int, dh: torch.Tensor | None) -> torch.Tensor | None:
        extra = outside(i)
        if extra is not None:
            dh = extra if dh is None else dh.add_(extra)  # dh from above: _input_grad's own buffer
        return None if dh is None else torch.ops.aten.leaky_relu_backward(dh, feats[i], slope, True)

    return grad


def _input_grad(activation_grad, spec: _FrozenSpec, lengths, pads) -> torch.Tensor | None:
    """``∂L/∂wav`` ``[batch, time]`` through the frozen layers. ``activation_grad(i, dh)``: the gradient at the
    input of layer i's leaky ReLU given ``dh``, the gradient reaching its output from the layers above
    (None: none), or None when there is none."""
    layers, strides, kernel = spec.layers, spec.strides, spec.kernel_size
    dh = None
    for i in reversed(range(len(layers))):
        dy = activation_grad(i, dh)
        if dy is None:
            continue
        taps, _ = layers[i]
        (left, right), length, stride = pads[i], lengths[i], strides[i]
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
        dh = dx[:, left : left + length]
    return None if dh is None else dh[..., 0]


class _FrozenFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wav, spec: _FrozenSpec):
        lengths, pads = _geometry(wav.shape[-1], spec.strides, spec.kernel_size)
        feats = _features(wav, spec, lengths, pads)
        ctx.spec, ctx.pads, ctx.lengths = spec, pads, lengths
        ctx.set_materialize_grads(False)  # layers outside the loss get no gradient: None, not zeros
        ctx.save_for_backward(*feats)
        return tuple(feats)

    @staticmethod
    def backward(ctx, *grads):
        activation_grad = _leaky_relu_grad(ctx.saved_tensors, grads.__getitem__, ctx.spec.negative_slope)
        return _input_grad(activation_grad, ctx.spec, ctx.lengths, ctx.pads), None


class _FrozenDistances(torch.autograd.Function):
    @staticmethod
    def forward(ctx, estimate, target, spec: _FrozenSpec, selected):
        lengths, pads = _geometry(estimate.shape[-1], spec.strides, spec.kernel_size)
        feats = _features(estimate, spec, lengths, pads)
        refs = _features(target, spec, lengths, pads)
        kernels = cpu_kernels()
        ctx.spec, ctx.pads, ctx.lengths, ctx.selected, ctx.kernels = spec, pads, lengths, selected, kernels
        if kernels is not None:
            # Σ|est − ref| per layer in one pass each, the difference never written; the backward redoes the sign
            sums = [sum(kernels.abs_diff_sum(feats[i][b], refs[i][b]) for b in range(estimate.shape[0])) for i in selected]
            ctx.ref_layers = tuple(sorted(set(selected)))  # only these refs are needed again
            ctx.save_for_backward(*feats, *(refs[i] for i in ctx.ref_layers))
            return torch.tensor([t / feats[i].numel() for t, i in zip(sums, selected)], dtype=estimate.dtype)
        diffs = [torch.sub(feats[i], refs[i]) for i in selected]
        # Σ|est − ref| / count per layer, with no autograd graph for the subtraction and the sum
        ctx.save_for_backward(*feats, *diffs)
        return torch.stack([d.abs().sum() / d.numel() for d in diffs])

    @staticmethod
    def backward(ctx, grad):
        saved, selected, slope, kernels = ctx.saved_tensors, ctx.selected, ctx.spec.negative_slope, ctx.kernels
        # ∂(Σ|est − ref| / count)/∂est = sign(est − ref) / count, for each time a layer is listed
        weights: dict[int, np.float32] = {}
        for i, g in zip(selected, grad.tolist()):
            weights[i] = weights.get(i, np.float32(0)) + np.float32(g / saved[i].numel())
        if kernels is None:
            feats, diffs = saved[: len(saved) - len(selected)], saved[len(saved) - len(selected) :]
            signs: dict[int, torch.Tensor] = {i: d.sign() for i, d in zip(selected, diffs)}

            def outside(i):
                return signs[i].mul_(float(weights[i])) if i in signs else None

            return _input_grad(_leaky_relu_grad(feats, outside, slope), ctx.spec, ctx.lengths, ctx.pads), None, None, None
        depth = len(saved) - len(ctx.ref_layers)
        feats, refs = saved[:depth], dict(zip(ctx.ref_layers, saved[depth:]))

        def activation_grad(i, dh):  # the sign term, the gradient from above and the leaky ReLU in one pass
            if i not in weights:
                return None if dh is None else torch.ops.aten.leaky_relu_backward(dh, feats[i], slope, True)
            out = feats[i].new_empty(feats[i].shape)
            for b in range(out.shape[0]):
                kernels.feature_grad(None if dh is None else dh[b], feats[i][b], refs[i][b], float(weights[i]), slope,
                                     out=out[b])  # fmt: skip
            return out

        return _input_grad(activation_grad, ctx.spec, ctx.lengths, ctx.pads), None, None, None


def _spec(net, n_layers: int) -> _FrozenSpec:
    folded = tuple(_folded(conv, norm) for conv, norm in zip(net.convs[:n_layers], net.norms))
    return _FrozenSpec(layers=folded, strides=tuple(net.strides[:n_layers]), kernel_size=int(net.kernel_size),
                       negative_slope=float(net.negative_slope))  # fmt: skip


def frozen_distances(net, estimate: torch.Tensor, target: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """``[len(layers)]`` mean absolute differences between the activations of ``net`` (see :func:`applies`) for
    ``[batch, time]`` ``estimate`` and ``target`` at the given layers, differentiable in ``estimate``: the deep
    feature loss's distances in one op. Both signals run through the layers once, the folded weights are
    shared, and the backward forms each layer's ``sign(est − ref) / count`` as it reaches it."""
    if estimate.shape != target.shape or estimate.dim() != 2:
        raise ValueError(f"estimate {tuple(estimate.shape)} and target {tuple(target.shape)} must be the same [batch, time]")
    depth = max(layers) + 1
    return _FrozenDistances.apply(estimate.contiguous(), target.detach().contiguous(), _spec(net, depth), tuple(layers))


def frozen_features(net, wav: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    """The first ``n_layers`` activations ``[batch, channels, time_i]`` of ``net`` for ``[batch, time]``
    audio (see :func:`applies`); views of channels-last buffers, differentiable in ``wav``."""
    return [f.transpose(1, 2) for f in _FrozenFeatures.apply(wav.contiguous(), _spec(net, n_layers))]
