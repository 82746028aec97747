"""Conv → (adaptive) BN → leaky ReLU layers with hand-written backward on channels-last buffers (CPU training).

The plain layer runs a dilated ``Conv1d``, BN, the adaptive mix (two muls and an add) and a leaky
ReLU on ``[batch, channels, time]`` tensors: eight or so passes over memory forward and as many
backward, plus a padding copy and oneDNN's slow dilated-conv weight gradient. Here activations live
as ``[batch, time, channels]`` buffers, and BN + adaptive mix is one per-channel affine map
``scale·z + offset`` (batch or running statistics; the arithmetic is :mod:`dfl.kernels.norm_affine`'s).
Two implementations:

* **Deferred-norm layers** (:func:`conv_deferred_norm`, where the compiled kernels of :mod:`dfl.kernels.native`
  apply, channels a multiple of 8). A layer keeps only its conv output ``z`` and hands its norm on as
  ``scale``, ``offset`` for the next layer to apply while reading: each op takes the layer below's ``z``
  and that layer's ``scale``, ``offset``; the Winograd F(4,3) conv (:mod:`dfl.kernels.winograd`: half the
  GEMM FLOPs) applies ``leaky_relu(scale·z + offset)`` to its input rows as it reads them, so activations
  are never stored.
  It returns its own ``z`` and its norm as ``scale``, ``offset``, from the batch moments the conv kernel
  sums from rows still in cache (:meth:`~dfl.kernels.native.CpuKernels.norm_forward`: the per-channel math in one
  call, not a dozen small autograd ops, each slow after a kernel has flushed the caches). Backward gets
  ∂L/∂scale and ∂L/∂offset, turns them into the norm parameters' gradients and the gradient through BN's
  statistics (:meth:`~dfl.kernels.native.CpuKernels.norm_backward`), then runs one kernel per layer: it forms
  the conv's output gradient ``dz = g + b·z + e`` on the fly, computes the weight gradient and hands the
  layer below its z-gradient ``scale·dy`` with ``Σdy`` and ``Σdy·z`` (that layer's offset and scale
  gradients). Per layer that is one pass over memory forward and one backward, besides the GEMMs.
  The waveform layer (one input channel, zero-padded to 8) runs a direct conv (:meth:`~dfl.kernels.native.CpuKernels.direct_conv`)
  and, when its input needs no gradient, computes only its weight gradient; the output conv (1×1 to one
  channel) reads the last layer's ``z`` through its norm the same way (:func:`output_conv_deferred_norm`).
* **Per-layer ops** (:func:`conv_norm_act`, the PyTorch fallback): direct GEMMs over row-shifted views
  (no padding copy), PyTorch's channels-last BN kernels, the activation stored in a buffer whose zero
  margins are the next layer's padding.

Same parameters, running statistics and results as the plain layer, to float rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dfl.kernels import norm_affine, winograd

# Below this many input channels the forward conv runs direct: Winograd's transforms round more than a
# 3-term sum, which shows on the waveform layer (1 channel, padded to 8), where a direct conv is cheap anyway.
WINOGRAD_MIN_CHANNELS = 16


def _conv3(x: torch.Tensor, weight: torch.Tensor, d: int, out: torch.Tensor) -> list | None:
    """``out[b, t] = Σ_k x[b, t + k·d] @ weight[:, :, k]ᵀ`` for a buffer ``x`` padded by ``d`` on both sides.

    With the compiled kernels: Winograd F(4,3) (:mod:`dfl.kernels.winograd`), or for fewer input channels
    a direct conv; both return each batch item's ``(rows, moments)`` (merged by :meth:`dfl.kernels.native.CpuKernels.norm_forward`).
    Without them: direct GEMMs, and None.
    """
    n, c_in = out.shape[1], x.shape[-1]
    kernels = winograd.compiled_kernels_for(x, out)
    if kernels is not None:
        wino_weights = kernels.winograd_weights(weight) if c_in >= WINOGRAD_MIN_CHANNELS else None
        parts = []
        for b in range(x.shape[0]):
            moments = torch.empty(2, out.shape[-1], dtype=torch.float64)
            if wino_weights is not None:
                winograd.conv3(kernels, x[b], d, wino_weights, out[b], 0, n, d, moments=moments)
            else:
                kernels.direct_conv(x[b], weight, out[b], n, d, moments)
            parts.append((n, moments))
        return parts
    taps = weight.permute(2, 1, 0).contiguous()  # [3, Cin, Cout]
    for b in range(x.shape[0]):
        if c_in <= 8:  # the 3 taps side by side, one GEMM: the output is written once
            cols = x[b].as_strided((n, 3, c_in), (c_in, d * c_in, 1)).reshape(n, 3 * c_in)
            torch.mm(cols, taps.reshape(3 * c_in, -1), out=out[b])
            continue
        torch.mm(x[b, :n], taps[0], out=out[b])
        out[b].addmm_(x[b, d : d + n], taps[1])
        out[b].addmm_(x[b, 2 * d : 2 * d + n], taps[2])
    return None


def _as_nchw_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]`` contiguous → the same memory as a channels-last ``[B, C, T, 1]`` tensor."""
    return t.permute(0, 2, 1).unsqueeze(-1)


def channels_last_batch_stats(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch ``(mean, 1/√(var + eps))`` of a ``[B, T, C]`` tensor.

    By PyTorch's channels-last BN kernel: ``torch.var_mean`` over the leading dims is ~8× slower.
    """
    _, mean, invstd = torch.ops.aten.native_batch_norm(
        _as_nchw_channels_last(z.contiguous()), None, None, None, None, True, 0.0, eps
    )
    return mean, invstd


class _ConvNormActSpec(NamedTuple):
    """The non-tensor arguments of :class:`_ConvNormAct` (see :func:`conv_norm_act`)."""

    dilation: int
    length: int  # output rows kept
    rows: int  # rows the conv and BN compute (≥ length: the authors' padding)
    front: int  # zero rows before the output in its buffer
    back: int  # and after it
    eps: float
    momentum: float
    negative_slope: float
    batch_stats: bool  # normalise with the batch's statistics (else the running ones)
    update_running: bool  # update the running statistics (training)


def _backward_torch(grad_out, act, x, weight, z, mean, invstd, run_mean, run_var, alpha, gain, spec: _ConvNormActSpec):
    """``(dx, ∂L/∂weight [Cout, Cin, 3], Σdy·x̂, Σdy)``: BN's channels-last backward kernel, then direct GEMMs."""
    d, n, rows, front = spec.dilation, spec.length, spec.rows, spec.front
    taps = weight.permute(2, 1, 0)  # [3, Cin, Cout]
    bsz, _, cout = z.shape
    dy = torch.ops.aten.leaky_relu_backward(grad_out[:, front : front + n], act, spec.negative_slope, True)
    if rows > n:  # the cut rows get no gradient, but BN's statistics saw them
        dy = torch.cat([dy, dy.new_zeros(bsz, rows - n, cout)], dim=1)
    dy = dy.contiguous()
    # BN backward with weight gain = β·γ gives β·∂BN/∂z; its sums Σ dy·x̂ and Σ dy give every parameter grad.
    gi, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        _as_nchw_channels_last(dy),
        _as_nchw_channels_last(z),
        gain.expand(cout).contiguous(),
        run_mean,
        run_var,
        mean,
        invstd,
        spec.batch_stats,
        spec.eps,
        [True, True, True],
    )
    # dz = β·∂BN/∂z + α·dy, in a buffer with d zero rows on each side: the input gradient's padding
    dz_padded = z.new_zeros(bsz, d + rows + d, cout)
    dz = dz_padded[:, d : d + rows]
    torch.add(gi.squeeze(-1).permute(0, 2, 1), dy, alpha=float(alpha), out=dz)
    dx = x.new_zeros(x.shape)
    dtaps = x.new_zeros(taps.shape)
    for b in range(bsz):  # the conv with the taps flipped and transposed, over the rows x holds
        torch.mm(dz_padded[b, 2 * d : 2 * d + n], taps[0].t(), out=dx[b, d : d + n])
        dx[b, d : d + n].addmm_(dz_padded[b, d : d + n], taps[1].t())
        dx[b, d : d + n].addmm_(dz_padded[b, :n], taps[2].t())
        for k in range(3):
            dtaps[k].addmm_(x[b, k * d : k * d + rows].t(), dz[b])
    return dx, dtaps.permute(2, 1, 0), sum_dy_xhat, sum_dy


class _ConvNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, alpha, beta, gamma, bn_bias, running_mean, running_var, spec: _ConvNormActSpec):
        d, n, rows, front, back = spec.dilation, spec.length, spec.rows, spec.front, spec.back
        bsz = x.shape[0]
        z = x.new_empty(bsz, rows, weight.shape[0])
        _conv3(x, weight, d, z)
        out = x.new_empty(bsz, front + n + back, weight.shape[0])
        out[:, :front].zero_()
        out[:, front + n :].zero_()
        act = out[:, front : front + n]  # rows beyond n (tf_authors padding) are cut after the activation
        gain, shift = norm_affine.gain_shift(beta, gamma, bn_bias)
        if spec.batch_stats:
            # PyTorch's channels-last BN kernel: batch statistics (and F.batch_norm's running update),
            # with weight gain = β·γ and bias shift = β·b its output is β·BN(z); α·z is added on the way out.
            bn_out, mean, invstd = torch.ops.aten.native_batch_norm(
                _as_nchw_channels_last(z),
                gain.expand(z.shape[-1]).contiguous(),
                shift.expand(z.shape[-1]).contiguous(),
                running_mean if spec.update_running else None,
                running_var if spec.update_running else None,
                True,
                spec.momentum,
                spec.eps,
            )
            torch.add(bn_out.squeeze(-1).permute(0, 2, 1)[:, :n], z[:, :n], alpha=float(alpha), out=act)
        else:  # running statistics: a per-channel affine map scale·z + offset
            mean, var = running_mean.clone(), running_var.clone()
            invstd = norm_affine.inv_std(var, spec.eps)
            scale, offset = norm_affine.affine(mean, invstd, alpha, gain, shift)
            torch.addcmul(offset, z[:, :n], scale, out=act)
        F.leaky_relu_(act, spec.negative_slope)
        ctx.spec = spec
        running = (mean, var) if not spec.batch_stats else (None, None)
        ctx.save_for_backward(x, weight, z, out, mean, invstd, *running, alpha, beta, gamma, bn_bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, z, out, mean, invstd, run_mean, run_var, alpha, beta, gamma, bn_bias = ctx.saved_tensors
        spec = ctx.spec
        act = out[:, spec.front : spec.front + spec.length]
        gain, _ = norm_affine.gain_shift(beta, gamma, bn_bias)
        dx, dweight, sum_dy_xhat, sum_dy = _backward_torch(grad_out, act, x, weight, z, mean, invstd, run_mean, run_var,
                                                           alpha, gain, spec)  # fmt: skip
        need = ctx.needs_input_grad
        grads = [None] * 9
        if need[0]:
            grads[0] = dx
        if need[1]:
            grads[1] = dweight
        if need[2]:  # Σ dy·z = Σ dy·(x̂σ + μ)
            grads[2] = (sum_dy_xhat / invstd + mean * sum_dy).sum().reshape(alpha.shape)
        if need[3]:  # Σ dy·BN(z) = Σ dy·(γx̂ + b)
            grads[3] = (gamma * sum_dy_xhat + bn_bias * sum_dy).sum().reshape(beta.shape)
        if need[4]:
            grads[4] = (beta * sum_dy_xhat).reshape(gamma.shape)
        if need[5]:
            grads[5] = (beta * sum_dy).reshape(bn_bias.shape)
        return tuple(grads)


def _check_batch_values(batch_stats: bool, x: torch.Tensor, weight: torch.Tensor, rows: int) -> None:
    if batch_stats and x.shape[0] * rows <= 1:  # as F.batch_norm: one value has no variance (NaN statistics)
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {(x.shape[0], weight.shape[0], rows)}"
        )


def conv_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm: torch.nn.Module,
    dilation: int,
    length: int,
    margins: tuple[int, int],
    negative_slope: float,
    rows: int | None = None,
) -> torch.Tensor:
    """One layer on a ``[batch, dilation + length + back, channels_in]`` buffer with zero margins.

    The conv and BN run over ``rows`` output rows (default ``length``; more for the authors' padding to
    a multiple of the dilation, whose extra rows BN sees and the output drops), so the back margin
    must hold at least ``rows - length + dilation`` zeros. Returns ``[batch, front + length + back,
    channels_out]`` for ``margins = (front, back)``, margins zero: the next layer's padding.
    ``norm`` is an ``AdaptiveBatchNorm`` or a ``BatchNorm``; it uses batch statistics (and updates its
    running ones) in training mode, running statistics in eval mode unless ``batch_stats_at_eval``.
    """
    alpha, beta, bn = norm_affine.norm_parts(norm, x)
    rows = length if rows is None else int(rows)
    if rows < length or x.shape[1] < rows + 2 * dilation:
        raise ValueError(f"buffer of {x.shape[1]} rows too short for {rows} rows at dilation {dilation}")
    gamma = bn.weight if bn.weight is not None else x.new_ones(weight.shape[0])
    batch_stats = bn.training or bn.batch_stats_at_eval
    _check_batch_values(batch_stats, x, weight, rows)
    spec = _ConvNormActSpec(dilation=int(dilation), length=int(length), rows=rows, front=int(margins[0]),
                            back=int(margins[1]), eps=float(bn.eps), momentum=float(bn.momentum),
                            negative_slope=float(negative_slope), batch_stats=bool(batch_stats),
                            update_running=bool(bn.training))  # fmt: skip
    return _ConvNormAct.apply(x, weight, alpha, beta, gamma, bn.bias, bn.running_mean, bn.running_var, spec)


class _DeferredConvSpec(NamedTuple):
    """The non-tensor arguments of :class:`_ConvDeferredNorm` (see :func:`conv_deferred_norm`)."""

    dilation: int
    length: int  # rows of the layer below read (its output rows; past them: zero padding)
    rows: int  # rows the conv and its norm's statistics cover
    negative_slope: float  # of the activation the layer below's z is read through
    shift: torch.Tensor | None  # the layer below's mean (its sums are taken about it), None: no layer below
    eps: float
    momentum: float | None  # None: the running statistics are not updated
    batch_stats: bool  # normalise with the batch's statistics (else the running ones)


class _ConvDeferredNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, in_scale, in_offset, weight, alpha, beta, gamma, bias, running_mean, running_var,
                spec: _DeferredConvSpec):  # fmt: skip
        """``x``: ``[B, rows_below, Cin]`` z of the layer below (read through ``in_scale``, ``in_offset``), or,
        with ``in_scale`` None, an activation buffer with ``d`` zero rows of padding each side. Returns the
        conv output ``z`` and its norm as ``scale·z + offset`` with the ``mean`` it normalises with."""
        d, rows = spec.dilation, spec.rows
        kernels = winograd.compiled_kernels_for(x)
        bsz, c_out = x.shape[0], weight.shape[0]
        z = x.new_empty(bsz, rows, c_out)
        if in_scale is None:  # an activation buffer (the waveform): _conv3 picks Winograd or a direct conv
            parts = _conv3(x, weight, d, z)
            moments = parts[0][1].unsqueeze(0) if bsz == 1 else torch.stack([m for _, m in parts])
        else:
            weights = kernels.winograd_weights(weight)
            moments = torch.empty(bsz, 2, c_out, dtype=torch.float64)
            x_norm = (in_scale, in_offset, spec.negative_slope, spec.length)
            for b in range(bsz):
                kernels.winograd_conv(x[b], 0, weights, z[b], 0, rows, d, None, None, moments[b], x_norm=x_norm)
        # norm_affine.affine in C, from the moments (or the running statistics), the running update included
        norm, stats = kernels.norm_forward(moments if spec.batch_stats else None, rows, alpha, beta, gamma, bias,
                                           spec.eps, running_mean, running_var, spec.momentum)  # fmt: skip
        scale, offset, mean = norm.unbind(0)
        ctx.spec = spec
        ctx.save_for_backward(x, in_scale, in_offset, weight, beta, gamma, bias, z, stats)
        ctx.mark_non_differentiable(mean)
        return z, scale, offset, mean

    @staticmethod
    def backward(ctx, grad_z, grad_scale, grad_offset, _):
        x, in_scale, in_offset, weight, beta, gamma, bias, z, stats = ctx.saved_tensors
        spec = ctx.spec
        d, n, rows = spec.dilation, spec.length, spec.rows
        kernels = winograd.compiled_kernels_for(x)
        bsz, c_in, c_out = x.shape[0], x.shape[-1], z.shape[-1]
        grads64, coefficients = kernels.norm_backward(
            stats, bsz * rows, beta, gamma, bias, spec.eps, spec.batch_stats,
            None if grad_scale is None else grad_scale.contiguous(), None if grad_offset is None else grad_offset.contiguous(),
        )  # fmt: skip
        # the norm's parameters: α, β, γ, bias
        grads = grads64.float()
        param_grads = (grads[0], grads[1], grads[2 : 2 + c_out] if gamma is not None else None,
                       grads[2 + c_out :])  # fmt: skip
        # the conv output's gradient: dz = g + b·z + e, g read for rows < n
        g = grad_z.contiguous() if grad_z is not None else z.new_zeros(bsz, n, c_out)
        b, e = coefficients.unbind(0)
        if in_scale is None and c_in < WINOGRAD_MIN_CHANNELS and not ctx.needs_input_grad[0]:
            # the waveform layer of a model whose input needs no gradient: the direct conv's weight gradient only
            taps_grad = torch.zeros(3, c_in, c_out, dtype=torch.float64)
            for bi in range(bsz):
                kernels.direct_conv_weight_grad(g[bi, :n], z[bi], rows, (b, e), x[bi], d, taps_grad)
            return None, None, None, taps_grad.permute(2, 1, 0).float(), *param_grads, None, None, None
        wino_grad = x.new_zeros(6, c_in, c_out)
        flipped = kernels.winograd_weights(weight, flipped=True)
        sums = torch.zeros(2, c_in, dtype=torch.float64) if in_scale is not None else None
        dx = x.new_empty(x.shape)
        for bi in range(bsz):
            if in_scale is None:
                dx[bi, :d].zero_()
                dx[bi, d + n :].zero_()
                kernels.winograd_conv_backward(g[bi, :n], z[bi], rows, (b, e), x[bi], flipped, dx[bi], wino_grad, d)
            else:
                dx[bi, n:].zero_()
                kernels.winograd_conv_backward(g[bi, :n], z[bi], rows, (b, e), x[bi], flipped, dx[bi], wino_grad, d,
                                               x_norm=(in_scale, in_offset, spec.negative_slope, n),
                                               below=(spec.shift, sums))  # fmt: skip
        grad_scale, grad_offset = kernels.norm_grads(sums, spec.shift) if sums is not None else (None, None)
        return (dx, grad_scale, grad_offset, kernels.winograd_taps_grad(wino_grad), *param_grads, None, None, None)


def conv_deferred_norm(x, below: tuple | None, weight, norm, dilation: int, length: int, rows: int,
                       negative_slope: float):  # fmt: skip
    """One deferred-norm layer: ``(z, scale, offset, mean)`` for the conv of ``x`` (see :class:`_ConvDeferredNorm`),
    its norm as ``scale·z + offset`` (applied by the next layer as it reads ``z``) and the mean it normalises
    with; ``below`` is the layer below's ``(scale, offset, mean)``, or None when ``x`` is an activation buffer
    with zero margins."""
    alpha, beta, bn = norm_affine.norm_parts(norm, x)
    batch_stats = bn.training or bn.batch_stats_at_eval
    _check_batch_values(batch_stats, x, weight, rows)
    in_scale, in_offset, shift = (None, None, None) if below is None else (below[0].contiguous(), below[1].contiguous(),
                                                                          below[2].detach().contiguous())  # fmt: skip
    spec = _DeferredConvSpec(dilation=int(dilation), length=int(length), rows=int(rows),
                             negative_slope=float(negative_slope), shift=shift, eps=float(bn.eps),
                             momentum=float(bn.momentum) if bn.training else None,
                             batch_stats=bool(batch_stats))  # fmt: skip
    return _ConvDeferredNorm.apply(x, in_scale, in_offset, weight, alpha, beta, bn.weight, bn.bias,
                                   bn.running_mean, bn.running_var, spec)  # fmt: skip


class _OutputConvSpec(NamedTuple):
    """The non-tensor arguments of :class:`_OutputConvDeferredNorm` (see :func:`output_conv_deferred_norm`)."""

    length: int  # output rows
    negative_slope: float  # of the activation the last layer's z is read through
    shift: torch.Tensor  # that layer's mean (its sums are taken about it)


class _OutputConvDeferredNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, scale, offset, weight, bias, spec: _OutputConvSpec):
        kernels = winograd.compiled_kernels_for(z)
        y = z.new_empty(z.shape[0], spec.length)
        w = weight.detach().reshape(-1)
        for b in range(z.shape[0]):
            kernels.output_conv_deferred_norm(z[b], spec.length, scale, offset, spec.negative_slope, w, bias.detach(),
                                              y[b])  # fmt: skip
        ctx.spec = spec
        ctx.save_for_backward(z, scale, offset, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, scale, offset, weight = ctx.saved_tensors
        spec = ctx.spec
        kernels = winograd.compiled_kernels_for(z)
        g = grad_y.contiguous()
        dz = z.new_empty(z.shape)
        sums = torch.zeros(2, z.shape[-1], dtype=torch.float64)
        weight_grad = torch.zeros(z.shape[-1], dtype=torch.float64)
        for b in range(z.shape[0]):
            # rows past the output's (the authors' padding) get gradient from BN's statistics only
            dz[b, spec.length :].zero_()
            kernels.output_conv_deferred_norm_backward(g[b], z[b], scale, offset, spec.negative_slope,
                                                       weight.detach().reshape(-1), spec.shift, dz[b], sums,
                                                       weight_grad)  # fmt: skip
        grad_scale, grad_offset = kernels.norm_grads(sums, spec.shift)
        # numpy's pairwise sum: the same at any thread count (torch's float sum splits by threads, and the CPU
        # training's threads change while metric workers score: the run would not repeat)
        bias_grad = g.new_tensor([np.sum(g.numpy(), dtype=np.float64)])
        return dz, grad_scale, grad_offset, weight_grad.float().view_as(weight), bias_grad, None


def output_conv_deferred_norm(z: torch.Tensor, below: tuple, output: torch.nn.Conv1d, length: int,
                              negative_slope: float):  # fmt: skip
    """The output conv (1×1, to one channel) of the activation of a deferred-norm layer's ``z``, its norm applied
    as ``z`` is read: ``[batch, length]``. ``below``: that layer's ``(scale, offset, mean)`` (see
    :func:`conv_deferred_norm`)."""
    if output.weight.shape[0] != 1 or output.weight.shape[2] != 1 or output.bias is None:
        raise ValueError(f"output_conv_deferred_norm needs a 1×1 conv to one channel with a bias, got {output}")
    scale, offset, mean = (t.contiguous() for t in below)
    spec = _OutputConvSpec(length=int(length), negative_slope=float(negative_slope), shift=mean.detach())
    return _OutputConvDeferredNorm.apply(z, scale, offset, output.weight, output.bias, spec)
