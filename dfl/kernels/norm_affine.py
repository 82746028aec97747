"""The per-channel arithmetic of the models' norms, defined once for every fast path.

A layer's norm is the adaptive batch norm (:class:`~dfl.models.adaptive_bn.AdaptiveBatchNorm`)

    Γ(z) = α·z + β·(γ·(z − μ)/√(σ² + ε) + b)

(a plain ``BatchNorm``: α = 0, β = 1; no norm, ``nn.Identity``: α = 1, β = 0). For given statistics μ, σ²
(the batch's or the running ones) it is a per-channel affine map ``scale·z + offset``:

    gain = β·γ,  shift = β·b,  s = 1/√(σ² + ε),
    scale = α + gain·s,  offset = shift − gain·s·μ.

:func:`norm_coefficients` gives (α, gain, shift), :func:`inv_std` s, :func:`affine` (scale, offset), and
:func:`fold_into_conv` the conv that computes ``scale·conv(x) + offset`` by itself. The compiled
``dfl_norm_forward`` (:meth:`dfl.kernels.native.CpuKernels.norm_forward`) computes :func:`affine` in C
(float64); ``tests/test_native.py`` checks the two against each other.
"""

from __future__ import annotations

import torch
from torch import nn

from dfl.models.adaptive_bn import AdaptiveBatchNorm, BatchNorm


def norm_parts(norm: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, BatchNorm]:
    """``(α, β, bn)`` of ``α·z + β·bn(z)``: an ``AdaptiveBatchNorm``'s own parameters (gradients reach them),
    or ``(0, 1, norm)`` for a ``BatchNorm`` (scalars like ``like``)."""
    if isinstance(norm, AdaptiveBatchNorm):
        return norm.alpha, norm.beta, norm.bn
    if isinstance(norm, BatchNorm):
        return like.new_zeros(()), like.new_ones(()), norm
    raise TypeError(f"need AdaptiveBatchNorm or BatchNorm, got {type(norm).__name__}")


def gain_shift(
    beta: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gain, shift) = (β·γ, β·b)``: the weight and bias of BN whose output is ``β·BN(z)``."""
    return beta * gamma, beta * bias


def norm_coefficients(
    norm: nn.Module, channels: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BatchNorm | None]:
    """``(α, gain, shift, bn)``, the first three ``[channels]`` in ``dtype`` (detached), of a norm module:
    an ``AdaptiveBatchNorm``, a ``BatchNorm`` or ``nn.Identity`` (α = 1, gain = shift = 0, bn None)."""
    ones = torch.ones(channels, dtype=dtype)
    if isinstance(norm, nn.Identity):
        zeros = torch.zeros(channels, dtype=dtype)
        return ones, zeros, zeros, None
    alpha, beta, bn = norm_parts(norm, ones)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else ones
    gain, shift = gain_shift(beta.detach().to(dtype), gamma, bn.bias.detach().to(dtype))
    return alpha.detach().to(dtype) * ones, gain, shift, bn


def inv_std(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``s = 1/√(σ² + ε)``."""
    return torch.rsqrt(var + eps)


def running_inv_std(bn: BatchNorm, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s`` of ``bn``'s running variance, in ``dtype``."""
    return inv_std(bn.running_var.detach().to(dtype), bn.eps)


def affine(
    mean: torch.Tensor, inv_std: torch.Tensor, alpha: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm as per-channel ``(scale, offset)`` for statistics ``mean``, ``inv_std = 1/√(var + eps)``:
    ``scale = α + gain·s``, ``offset = shift − gain·s·mean``."""
    gs = gain * inv_std
    return alpha + gs, shift - gs * mean


def running_affine(
    norm: nn.Module, channels: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` of a norm module with its running statistics (``nn.Identity``: ``(1, 0)``)."""
    alpha, gain, shift, bn = norm_coefficients(norm, channels, dtype)
    if bn is None:
        return alpha, shift
    return affine(bn.running_mean.detach().to(dtype), running_inv_std(bn, dtype), alpha, gain, shift)


def fold_into_conv(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight', bias')`` of the conv computing ``scale·conv(x) + offset`` for a conv ``weight [Cout, Cin, k]``
    and ``bias`` (None: zero)."""
    folded_bias = offset if bias is None else scale * bias + offset
    return weight * scale[:, None, None], folded_bias
