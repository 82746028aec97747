"""Dilated 3-tap convs on channels-last buffers by Winograd F(4,3) along time (CPU, float32).

A conv with dilation d gives outputs t, t+d, t+2d, t+3d from inputs t−d … t+4d. Winograd F(4,3)
computes those 4 outputs from 6 channel-mixing GEMM products instead of 12 (3 taps × 4), so
the conv, its input gradient (the same conv with the taps flipped and transposed) and its weight
gradient each take half the GEMM FLOPs of direct convolution. Transforms and GEMMs run together in
the compiled kernels of :mod:`dfl.kernels.native`, a few dozen outputs at a time, so operands never leave
the cache.

Time splits into blocks of 4d rows; within a block, phase p (0 ≤ p < d) owns the 4 outputs
p, p+d, p+2d, p+3d. A last, partial block reads its missing inputs as zero and writes only the
outputs that exist, so every row goes through Winograd.
"""

from __future__ import annotations

import torch

from dfl.kernels.native import CpuKernels, cpu_kernels


def compiled_kernels_for(*tensors: torch.Tensor) -> CpuKernels | None:
    """The compiled kernels if they apply to these tensors (CPU float32, channels multiple of 8)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.shape[-1] % 8 == 0 for t in tensors):
        return None
    return cpu_kernels()


def conv3(
    kernels: CpuKernels,
    x: torch.Tensor,
    x_row: int,
    weights: torch.Tensor,
    y: torch.Tensor,
    y_row: int,
    rows: int,
    d: int,
    bias: torch.Tensor | None = None,
    negative_slope: float | None = None,
    moments: torch.Tensor | None = None,
) -> None:
    """``y[y_row + t] = act(Σ_k x[x_row + t + (k−1)·d] @ W_k + bias)`` for ``t < rows``.

    ``x``, ``y``: 2-D ``[rows, channels]`` buffers (``x`` zero where the conv pads, ``d`` rows each
    side); ``weights``: :meth:`CpuKernels.winograd_weights` of the ``[Cout, Cin, 3]`` conv weight;
    ``act`` is a leaky ReLU unless ``negative_slope`` is None; ``moments``: see
    :meth:`CpuKernels.winograd_conv`.
    """
    kernels.winograd_conv(x, x_row, weights, y, y_row, rows, d, bias, negative_slope, moments)
