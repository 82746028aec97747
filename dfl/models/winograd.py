"""Dilated 3-tap convs on channels-last buffers by Winograd F(4,3) along time (CPU, float32).

A conv with dilation d gives outputs t, t+d, t+2d, t+3d from inputs t−d … t+4d. Winograd F(4,3)
computes those 4 outputs from 6 channel-mixing GEMM products instead of 12 (3 taps × 4), so
the conv, its input gradient (the same conv with the taps flipped and transposed) and its weight
gradient each take half the GEMM FLOPs of direct convolution. The small transforms run in the
compiled kernels of :mod:`dfl.native`; the GEMMs are PyTorch's.

Time splits into blocks of 4d rows; within a block, phase p (0 ≤ p < d) owns the 4 outputs
p, p+d, p+2d, p+3d. A work tile is several whole blocks (small d) or a run of phases of one block
(large d), about :data:`TILE_OUTPUTS` outputs, so its operands stay in cache. Only whole blocks are
done here: callers finish the last ``rows mod 4d`` rows with direct GEMMs.
"""

from __future__ import annotations

import threading

import torch

from dfl.native import CpuKernels, cpu_kernels

TILE_OUTPUTS = 8192
_local = threading.local()


def kernels_for(*tensors: torch.Tensor) -> CpuKernels | None:
    """The compiled kernels if they apply to these tensors (CPU float32, channels multiple of 8)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.shape[-1] % 8 == 0 for t in tensors):
        return None
    return cpu_kernels()


def _workspace(numel: int) -> torch.Tensor:
    """A per-thread scratch buffer of at least ``2·numel`` floats (reused: no page faults per call)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < 2 * numel:
        with torch.inference_mode(False):  # a normal tensor: usable by inference and by training alike
            buf = _local.buf = torch.empty(2 * numel)
    return buf


def whole_block_rows(rows: int, d: int) -> int:
    """How many of ``rows`` output rows the Winograd tiles cover (whole blocks of 4d)."""
    return rows // (4 * d) * 4 * d


def _tiles(rows: int, d: int, tile_outputs: int, c_in: int, c_out: int):
    """Each work tile's (first output row, blocks, phases, ``[6, k, c_in]`` and ``[6, k, c_out]`` scratch)."""
    blocks = rows // (4 * d)
    items = max(1, tile_outputs // 4)
    phase_step, block_step = min(d, items), max(1, items // d)
    work = _workspace(6 * items * max(c_in, c_out))
    half = work.numel() // 2
    for b0 in range(0, blocks, block_step):
        for p0 in range(0, d, phase_step):
            nb, n_phases = min(block_step, blocks - b0), min(phase_step, d - p0)
            k = nb * n_phases
            first = work[: 6 * k * c_in].view(6, k, c_in)
            second = work[half : half + 6 * k * c_out].view(6, k, c_out)
            yield 4 * d * b0 + p0, nb, n_phases, first, second


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
    tile_outputs: int = TILE_OUTPUTS,
) -> int:
    """``y[y_row + t] = act(Σ_k x[x_row + t + (k−1)·d] @ W_k + bias)`` for the whole blocks of ``rows``.

    ``x``, ``y``: 2-D ``[rows, channels]`` buffers (``x`` zero where the conv pads); ``weights``:
    :meth:`CpuKernels.winograd_weights` of the ``[Cout, Cin, 3]`` conv weight; ``act`` is a leaky
    ReLU unless ``negative_slope`` is None. Returns the number of output rows done.
    """
    bias = y.new_zeros(y.shape[1]) if bias is None else bias
    for t0, nb, n_phases, operands, products in _tiles(rows, d, tile_outputs, x.shape[1], y.shape[1]):
        kernels.winograd_input(x, x_row + t0, nb, n_phases, d, operands)
        torch.bmm(operands, weights, out=products)
        kernels.winograd_output(products, y, y_row + t0, nb, n_phases, d, bias, negative_slope)
    return whole_block_rows(rows, d)


def weight_grad(
    kernels: CpuKernels,
    x: torch.Tensor,
    x_row: int,
    dy: torch.Tensor,
    dy_row: int,
    rows: int,
    d: int,
    grad: torch.Tensor,
    tile_outputs: int = TILE_OUTPUTS,
) -> int:
    """Adds the whole blocks' ``∂L/∂(winograd weights)`` to ``grad [6, Cin, Cout]`` (see :func:`conv3`).

    With operands ``U = Bᵀx`` and ``V = A·dy`` per tile, ``∂L/∂Wᵢ += Uᵢᵀ Vᵢ``; :func:`taps_grad` maps
    the 6 back to the 3 taps. Returns the number of output rows done.
    """
    for t0, nb, n_phases, operands, grads in _tiles(rows, d, tile_outputs, x.shape[1], dy.shape[1]):
        kernels.winograd_input(x, x_row + t0, nb, n_phases, d, operands)
        kernels.winograd_output_grad(dy, dy_row + t0, nb, n_phases, d, grads)
        grad.baddbmm_(operands.transpose(1, 2), grads)
    return whole_block_rows(rows, d)


def taps_grad(grad: torch.Tensor) -> torch.Tensor:
    """``∂L/∂(winograd weights) [6, Cin, Cout]`` → ``∂L/∂taps [3, Cin, Cout]`` (the chain rule through G)."""
    six, c_in, c_out = grad.shape  # float64: the 6 terms cancel to much smaller taps gradients
    return (CpuKernels.G.t() @ grad.reshape(six, c_in * c_out).double()).view(3, c_in, c_out).to(grad.dtype)
