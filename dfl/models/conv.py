"""``Conv1d``: PyTorch's, with an optional single-matrix-product path on CUDA.

cuDNN builds an execution plan for every new input shape (about 70 ms for a ``can_paper`` +
loss-network training step) and PyTorch keeps 10 000 of them, so training on whole utterances of
all different lengths pays that on almost every step. As one ``matmul`` over the stacked taps a
convolution needs no plan: on an H200 a batch-1 step on new lengths took 17.7 ms this way against
80.6 ms through cuDNN (12.4 ms through cuDNN when the length repeats). The matmul path is full
float32 (PyTorch does not use TF32 for matmuls by default). ``set_cuda_conv("gemm")`` turns it on
(``dfl-train cuda_conv=gemm``); parameters, checkpoints and CPU behaviour are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CUDA_CONV_BACKENDS = ("cudnn", "gemm")
_gemm_on_cuda = False


def set_cuda_conv(backend: str) -> None:
    """How :class:`Conv1d` runs on CUDA tensors: ``"cudnn"`` (PyTorch's default) or ``"gemm"``."""
    global _gemm_on_cuda
    if backend not in CUDA_CONV_BACKENDS:
        raise ValueError(f"cuda_conv must be one of {', '.join(CUDA_CONV_BACKENDS)}; got {backend!r}")
    _gemm_on_cuda = backend == "gemm"


def conv1d_as_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1, dilation: int = 1
) -> torch.Tensor:
    """``F.conv1d`` (no padding, one group) as one matrix product: ``[c_out, k·c_in] @ [batch, k·c_in, t]``."""
    k = weight.shape[-1]
    t = (x.shape[-1] - dilation * (k - 1) - 1) // stride + 1
    taps = [x[..., i * dilation : i * dilation + (t - 1) * stride + 1 : stride] for i in range(k)]
    cols = taps[0] if k == 1 else torch.cat(taps, dim=1)  # row i·c_in + c holds tap i of channel c
    y = torch.matmul(weight.permute(0, 2, 1).reshape(weight.shape[0], -1), cols)
    return y if bias is None else y + bias[:, None]


class Conv1d(nn.Conv1d):
    """:class:`torch.nn.Conv1d` (same parameters and results) that follows :func:`set_cuda_conv`."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            _gemm_on_cuda
            and x.is_cuda
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and x.shape[-1] + 2 * self.padding[0] >= self.dilation[0] * (self.kernel_size[0] - 1) + 1
        ):
            if self.padding[0]:
                x = F.pad(x, (self.padding[0], self.padding[0]))
            return conv1d_as_matmul(x, weight, bias, self.stride[0], self.dilation[0])
        return super()._conv_forward(x, weight, bias)
