"""dfl's Conv1d: the matmul formulation equals F.conv1d, and the CUDA switch is validated."""

import pytest
import torch
import torch.nn.functional as F

from dfl.models import ContextAggregationNet, LossNetwork
from dfl.models.conv import Conv1d, conv1d_as_matmul, set_cuda_conv


@pytest.mark.parametrize("k,stride,dilation,length", [(3, 1, 1, 50), (3, 1, 16, 97), (3, 2, 1, 101), (3, 2, 1, 100),
                                                      (1, 1, 1, 40), (1, 2, 1, 41), (5, 3, 2, 64)])
def test_matmul_convolution_equals_conv1d(k, stride, dilation, length):
    g = torch.Generator().manual_seed(k * 100 + stride * 10 + dilation)
    x = torch.randn(3, 8, length, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(16, 8, k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, generator=g, requires_grad=True)
    ref = F.conv1d(x, w, b, stride=stride, dilation=dilation)
    out = conv1d_as_matmul(x, w, b, stride, dilation)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad(out, (x, w, b), dy)
    ref_grads = torch.autograd.grad(ref, (x, w, b), dy)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_models_use_dfls_conv_with_unchanged_state_dicts():
    net, lossnet = ContextAggregationNet(dilations=[1, 2, 1], channels=4), LossNetwork(n_layers=3, heads={"scene": 15})
    for model in (net, lossnet):
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
        assert convs and all(type(m) is Conv1d for m in convs)
    assert "convs.0.weight" in net.state_dict() and "heads.scene.weight" in lossnet.state_dict()


def test_cuda_conv_switch_leaves_the_cpu_alone():
    conv = Conv1d(4, 6, 3, dilation=2, padding=2).double()
    x = torch.randn(2, 4, 30, dtype=torch.float64)
    try:
        set_cuda_conv("gemm")  # CPU tensors keep PyTorch's convolution
        torch.testing.assert_close(conv(x), F.conv1d(x, conv.weight, conv.bias, padding=2, dilation=2))
        with pytest.raises(ValueError, match="cuda_conv must be one of cudnn, gemm; got 'cublas'"):
            set_cuda_conv("cublas")
    finally:
        set_cuda_conv("cudnn")
