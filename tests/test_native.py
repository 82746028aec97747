"""The compiled Winograd kernels (dfl.kernels.native): results, bounds checks, caching and the fallback."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from dfl.kernels import native, norm_affine
from dfl.kernels.folded_inference import FoldedInferenceNet
from dfl.models import AdaptiveBatchNorm, BatchNorm
from tests.helpers.small_denoisers import small_denoiser


@pytest.fixture
def kernels():
    k = native.cpu_kernels()
    assert k is not None, "the Winograd kernels should compile wherever the tests run (gcc builds pesq)"
    return k


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """An empty kernel cache and a cleared loader, restored afterwards."""
    monkeypatch.setenv("DFL_CACHE_DIR", str(tmp_path / "cache"))
    native.cpu_kernels.cache_clear()
    yield tmp_path / "cache" / "native"
    native.cpu_kernels.cache_clear()


def reference_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, d: int, slope: float | None):
    """[time, Cin] → [time, Cout], 'same' zero padding, float64."""
    y = F.conv1d(F.pad(x.double().t()[None], (d, d)), weight.double(), bias.double(), dilation=d)[0].t()
    return y if slope is None else F.leaky_relu(y, slope)


def _conv_case(d: int, c_in: int = 16, c_out: int = 24):
    """A zero-margined ``[time, Cin]`` buffer: several kernel groups (48 items) and a partial last block."""
    torch.manual_seed(d)
    margin = 2 * d
    length = 4 * d * (100 // d + 1) + d + 3  # the last block: d + 3 of its 4d rows
    x = torch.zeros(margin + length + 2 * margin, c_in)
    x[margin : margin + length] = torch.randn(length, c_in)
    return x, torch.randn(c_out, c_in, 3), margin, length


@pytest.mark.parametrize("d", [1, 3, 5, 16])
@pytest.mark.parametrize("slope", [0.2, None], ids=["leaky_relu", "linear"])
def test_kernels_compute_a_dilated_conv_layer(kernels, d, slope):
    x, weight, margin, length = _conv_case(d)  # 24 output channels: one full and one half panel of 16
    bias = torch.randn(weight.shape[0])
    y = torch.full((x.shape[0], weight.shape[0]), float("nan"))
    x[margin + length + d :] = float("nan")  # past the conv's padding: must not be read
    kernels.winograd_conv(x, margin, kernels.winograd_weights(weight), y, margin, length, d, bias, slope)

    expected = reference_layer(x[margin : margin + length], weight, bias, d, slope)
    torch.testing.assert_close(y[margin : margin + length].double(), expected, atol=1e-4, rtol=1e-5)
    assert y[:margin].isnan().all() and y[margin + length :].isnan().all()  # nothing written outside the rows


@pytest.mark.parametrize("d", [1, 3, 5, 16])
def test_conv_reads_the_previous_layers_activation_through_its_norm(kernels, d):
    """``x_norm``: the input rows are the previous layer's conv output ``z`` (no padding in the buffer),
    read as ``leaky_relu(scale·z + offset)``, zero outside the valid rows: the same as the conv of the
    materialised activation."""
    x, weight, margin, length = _conv_case(d)
    z = torch.randn(length + 5, x.shape[1])  # 5 rows past the valid ones (cut rows): must read as zero
    scale, offset = torch.randn(x.shape[1]), torch.randn(x.shape[1])
    act = torch.zeros(length + 2 * d, x.shape[1])
    kernels.affine_leaky_relu(z[:length], scale, offset, 0.2, out=act[d : d + length])  # the forward's own pass
    torch.testing.assert_close(act[d : d + length], F.leaky_relu(z[:length] * scale + offset, 0.2))
    weights, bias = kernels.winograd_weights(weight), torch.randn(weight.shape[0])
    expected = torch.empty(length, weight.shape[0])
    kernels.winograd_conv(act, d, weights, expected, 0, length, d, bias, None)
    y = torch.empty(length, weight.shape[0])
    kernels.winograd_conv(z, 0, weights, y, 0, length, d, bias, None, x_norm=(scale, offset, 0.2, length))
    assert torch.equal(y, expected)  # the same activation bits (the same inline expression), the same sums
    with pytest.raises(ValueError, match=r"x: rows \[0, 200\) fall outside"):
        kernels.winograd_conv(z[:150], 0, weights, y, 0, length, d, bias, None, x_norm=(scale, offset, 0.2, 200))


@pytest.mark.parametrize("d", [1, 3, 5, 16])
def test_conv_moments_are_those_of_its_outputs(kernels, d):
    """The conv's batch-norm moments: mean and squared deviations of the rows it wrote, in float64, without
    cancellation for a mean far from zero; batch items merge pairwise (``merge_moments``)."""
    x, weight, margin, length = _conv_case(d)
    bias = 1e4 + torch.randn(weight.shape[0])  # the mean ~10⁴ standard deviations from zero
    weights = kernels.winograd_weights(weight * 1e-3)
    ys, parts = [], []
    for rows in (length, length - d - 1):  # two "batch items" of different lengths
        y = torch.zeros(x.shape[0], weight.shape[0])
        moments = torch.full((2, weight.shape[0]), float("nan"), dtype=torch.float64)
        kernels.winograd_conv(x, margin, weights, y, margin, rows, d, bias, None, moments)
        ys.append(y[margin : margin + rows].double())
        parts.append((rows, moments))
        torch.testing.assert_close(moments[0], ys[-1].mean(0), rtol=1e-9, atol=0)
        torch.testing.assert_close(moments[1], (ys[-1] - ys[-1].mean(0)).square().sum(0), rtol=1e-3, atol=0)
    mean, var = kernels.merge_moments(parts)
    both = torch.cat(ys)
    torch.testing.assert_close(mean, both.mean(0), rtol=1e-9, atol=0)
    torch.testing.assert_close(var, both.var(0, unbiased=False), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match=r"moments must .* shape \(2, 24\)"):
        kernels.winograd_conv(x, margin, weights, y, margin, 5, d, bias, None, torch.zeros(2, 16, dtype=torch.float64))


@pytest.mark.parametrize("d", [1, 3, 5, 16])
def test_kernels_compute_the_conv_backward(kernels, d):
    """dz = g + b·z + e (g: the gradient from above, b, e: batch norm's), then the conv's dx and weight gradient."""
    x, weight, margin, n = _conv_case(d)
    xb = x[margin - d :].contiguous()  # row d: the first input row; zeros from row d + n on
    rows = n + 3  # 3 cut rows: in BN's statistics, without gradient from above
    c_in, c_out = weight.shape[1], weight.shape[0]
    z, grad = torch.randn(rows, c_out), torch.randn(n, c_out)
    b, e = torch.randn(c_out), torch.randn(c_out)
    xb[rows + 2 * d :] = float("nan")  # past the conv's padding: must not be read
    dx = torch.full((xb.shape[0], c_in), float("nan"))
    wgrad = torch.ones(6, c_in, c_out)  # the kernel adds to what is there
    flipped = kernels.winograd_weights(weight, flipped=True)
    assert torch.equal(flipped, kernels.winograd_weights(weight.flip(-1).transpose(0, 1).contiguous()))
    kernels.winograd_conv_backward(grad, z, rows, (b, e), xb, flipped, dx, wgrad, d)

    g = torch.cat([grad, torch.zeros(rows - n, c_out)]).double()
    dz = g + b.double() * z.double() + e.double()
    xs = xb[d : d + rows].double().requires_grad_()
    w64 = weight.double().requires_grad_()
    y = F.conv1d(F.pad(xs.t()[None], (d, d)), w64, dilation=d)[0].t()
    (y * dz).sum().backward()
    torch.testing.assert_close(dx[d : d + n].double(), xs.grad[:n], atol=1e-4 * xs.grad.abs().max().item(), rtol=0)
    assert dx[:d].isnan().all() and dx[d + n :].isnan().all()  # nothing written outside the input rows
    weight_grad = kernels.winograd_taps_grad(wgrad - 1)  # the conv's [Cout, Cin, 3]
    torch.testing.assert_close(weight_grad.double(), w64.grad, atol=1e-3 * w64.grad.abs().max().item(), rtol=0)


@pytest.mark.parametrize("d", [1, 3, 5, 16])
def test_backward_through_the_layer_below(kernels, d):
    """With ``x_norm`` and ``below``, the input is the layer below's z read through its norm + leaky ReLU,
    and the kernel returns that layer's z-gradient ``scale·dy`` with ``Σdy`` and ``Σdy·(z − shift)``."""
    _, weight, _, n = _conv_case(d)
    rows = n + 3  # 3 cut rows of this layer: in BN's statistics, without gradient
    c_in, c_out = weight.shape[1], weight.shape[0]
    z_below = torch.randn(n + 4, c_in)  # 4 rows past the valid ones: never read
    z_below[n:] = float("nan")
    b_scale, b_offset, b_shift = torch.rand(c_in) + 0.5, torch.randn(c_in), torch.randn(c_in)
    z, grad = torch.randn(rows, c_out), torch.randn(n, c_out)
    b, e = torch.randn(c_out), torch.randn(c_out)
    dz_below = torch.full((n + 4, c_in), float("nan"))
    wgrad, sums = torch.zeros(6, c_in, c_out), torch.ones(2, c_in, dtype=torch.float64)  # sums: added to
    kernels.winograd_conv_backward(grad, z, rows, (b, e), z_below, kernels.winograd_weights(weight, flipped=True),
                                   dz_below, wgrad, d, x_norm=(b_scale, b_offset, 0.3, n), below=(b_shift, sums))  # fmt: skip

    dz = torch.cat([grad, torch.zeros(rows - n, c_out)]).double() + b.double() * z.double() + e.double()
    zs = z_below[:n].double().requires_grad_()
    b_pre = zs * b_scale.double() + b_offset.double()
    act = F.pad(F.leaky_relu(b_pre, 0.3), (0, 0, 0, rows - n))  # the cut rows read as zero
    w64 = weight.double().requires_grad_()
    act.retain_grad()
    y = F.conv1d(F.pad(act.t()[None], (d, d)), w64, dilation=d)[0].t()
    (y * dz).sum().backward()
    dy_below = torch.where(b_pre > 0, act.grad[:n], 0.3 * act.grad[:n]).detach()
    tol = 1e-4 * zs.grad.abs().max().item()
    torch.testing.assert_close(dz_below[:n].double(), zs.grad, atol=tol, rtol=0)
    assert dz_below[n:].isnan().all()  # nothing written past the valid rows
    torch.testing.assert_close(sums[0] - 1, dy_below.sum(0), atol=1e-4 * dy_below.abs().sum().item() / c_in, rtol=0)
    torch.testing.assert_close(sums[1] - 1, (dy_below * (zs.detach() - b_shift.double())).sum(0),
                               atol=1e-4 * (dy_below * zs.detach()).abs().sum().item() / c_in, rtol=0)  # fmt: skip
    weight_grad = kernels.winograd_taps_grad(wgrad)
    torch.testing.assert_close(weight_grad.double(), w64.grad, atol=1e-3 * w64.grad.abs().max().item(), rtol=0)
    with pytest.raises(ValueError, match="below needs x_norm"):
        kernels.winograd_conv_backward(grad, z, rows, (b, e), z_below, kernels.winograd_weights(weight, flipped=True),
                                       dz_below, wgrad, d, below=(b_shift, sums))  # fmt: skip


def test_batch_norm_kernels(kernels):
    z = 3 * torch.randn(1000, 16) + 5
    sums = torch.zeros(2, 16, dtype=torch.float64)
    shift = torch.full((16,), 4.0)
    kernels.channel_moments(z, sums, shift)
    kernels.channel_moments(z[:10], sums, shift)  # adds
    both = torch.cat([z, z[:10]]).double() - 4.0
    torch.testing.assert_close(sums[0], both.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums[1], both.square().sum(0), rtol=1e-6, atol=1e-6)
    # mean and variance without cancellation, even for a mean 10⁴ standard deviations from zero
    far = 1e-3 * torch.randn(3, 4000, 16) + 10.0
    mean, var = native.channel_mean_var(kernels, far)
    torch.testing.assert_close(mean, far.double().mean((0, 1)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var, far.double().var((0, 1), unbiased=False), rtol=1e-4, atol=0)

    scale, offset = torch.randn(16), torch.randn(16)
    expected = F.leaky_relu(z * scale + offset, 0.2)
    assert kernels.affine_leaky_relu(z, scale, offset, 0.2) is z
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"sums must .* shape \(2, 16\)"):
        kernels.channel_moments(z, torch.zeros(2, 8, dtype=torch.float64), shift)
    with pytest.raises(ValueError, match="offset must be 16"):
        kernels.affine_leaky_relu(z, scale, offset[:8], 0.2)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.affine_leaky_relu(z[:, :8], scale[:8], offset[:8], 0.2)


def _moments(z: torch.Tensor) -> torch.Tensor:
    """``[B, rows, C]`` → the float64 ``[B, 2, C]`` moments (mean, squared deviations) the conv kernels write."""
    z = z.double()
    mean = z.mean(1)
    return torch.stack([mean, (z - mean[:, None]).square().sum(1)], 1)


@pytest.mark.parametrize("adaptive", [True, False])
def test_norm_kernels_are_adaptive_batch_norm_and_its_backward(kernels, adaptive):
    """α·z + β·BN(z) as scale·z + offset from batch moments, the running update, and the backward: the
    parameters' gradients and b·z + e, the gradient reaching z through the batch statistics."""
    torch.manual_seed(0)
    bsz, rows, c = 3, 500, 16
    z = 2 * torch.randn(bsz, rows, c, dtype=torch.float64) + torch.linspace(-3, 3, c, dtype=torch.float64)
    alpha = torch.tensor(0.7 if adaptive else 0.0)
    beta = torch.tensor(1.3 if adaptive else 1.0)
    gamma, bias = torch.rand(c) + 0.5, torch.randn(c)
    running_mean, running_var = torch.randn(c), torch.rand(c) + 0.5
    bn = torch.nn.BatchNorm1d(c, eps=1e-5, momentum=0.2).double().train()
    bn.running_mean.copy_(running_mean), bn.running_var.copy_(running_var)
    bn.weight.data.copy_(gamma), bn.bias.data.copy_(bias)

    norm, stats = kernels.norm_forward(_moments(z), rows, alpha, beta, gamma, bias, 1e-5, running_mean, running_var, 0.2)
    scale, offset, mean = norm
    expected = alpha.double() * z + beta.double() * bn(z.reshape(-1, c)).reshape(z.shape)
    torch.testing.assert_close((scale * z + offset), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), z.mean((0, 1)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats[1], z.var((0, 1), unbiased=False), rtol=1e-12, atol=0)
    torch.testing.assert_close(running_mean.double(), bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(running_var.double(), bn.running_var, rtol=1e-6, atol=1e-7)

    # backward against autograd in float64 for a loss through scale and offset only (the conv output z
    # itself is held fixed: its direct gradient is the caller's)
    params = [t.double().requires_grad_() for t in (alpha, beta, gamma, bias)]
    zz = z.clone().requires_grad_()
    m, v = zz.mean((0, 1)), zz.var((0, 1), unbiased=False)
    g = params[2] / torch.sqrt(v + 1e-5)
    s, o = params[0] + params[1] * g, params[1] * (params[3] - g * m)
    grad_scale, grad_offset = torch.randn(c), torch.randn(c)
    torch.autograd.backward([s, o], [grad_scale.double(), grad_offset.double()])
    grads, (b, e) = kernels.norm_backward(stats, bsz * rows, beta, gamma, bias, 1e-5, True, grad_scale, grad_offset)
    for got, want in zip((grads[0], grads[1], grads[2 : 2 + c], grads[2 + c :]), params):
        torch.testing.assert_close(got, want.grad.reshape(got.shape), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(b.double() * z + e.double(), zz.grad, rtol=1e-5, atol=1e-9)

    # running statistics: nothing flows to z, and γ None is 1
    norm, stats = kernels.norm_forward(None, rows, alpha, beta, None, bias, 1e-5, running_mean, running_var)
    g = 1 / torch.sqrt(running_var.double() + 1e-5)
    torch.testing.assert_close(norm[0].double(), alpha.double() + beta.double() * g)
    torch.testing.assert_close(norm[1].double(), beta.double() * (bias.double() - g * running_mean.double()))
    grads, coefficients = kernels.norm_backward(stats, rows, beta, None, bias, 1e-5, False, None, grad_offset)
    assert coefficients.abs().max() == 0 and grads[0] == 0
    torch.testing.assert_close(grads[2 + c :], beta.double() * grad_offset.double())


@pytest.mark.parametrize("kind", ["adaptive", "batch_norm", "batch_norm_without_scale"])
def test_norm_forward_is_norm_affine(kernels, kind):
    """The C norm (``dfl_norm_forward``) is :func:`dfl.kernels.norm_affine.affine` with the coefficients of
    :func:`~dfl.kernels.norm_affine.norm_coefficients`: random moments and parameters, batch and running statistics."""
    gen = torch.Generator().manual_seed(11)
    bsz, rows, c, eps = 3, 40, 24, 1e-3
    if kind == "adaptive":
        norm = AdaptiveBatchNorm(c, eps=eps)
    else:
        norm = BatchNorm(c, eps=eps, scale=kind == "batch_norm")
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        bn = norm.bn if kind == "adaptive" else norm
        bn.running_mean.copy_(3 * torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.1)
    moments = torch.stack([3 * torch.randn(bsz, c, generator=gen, dtype=torch.float64),
                           rows * (torch.rand(bsz, c, generator=gen, dtype=torch.float64) + 0.1)], 1)  # fmt: skip
    alpha, beta, _ = norm_affine.norm_parts(norm, torch.ones(()))
    params = (alpha.detach(), beta.detach(), None if bn.weight is None else bn.weight.detach(), bn.bias.detach())
    coefficients = norm_affine.norm_coefficients(norm, c, torch.float64)[:3]
    for batch_stats in (True, False):
        out, stats = kernels.norm_forward(moments if batch_stats else None, rows, *params, eps, bn.running_mean,
                                          bn.running_var)  # fmt: skip
        mean, var = stats.unbind(0)
        if batch_stats:  # the merge of the parts' moments
            mean_b, sq_b = moments.unbind(1)
            torch.testing.assert_close(mean, mean_b.mean(0), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(var, (sq_b.sum(0) + rows * (mean_b - mean).square().sum(0)) / (bsz * rows))
            scale, offset = norm_affine.affine(mean, norm_affine.inv_std(var, eps), *coefficients)
        else:
            torch.testing.assert_close(var, bn.running_var.double(), rtol=0, atol=0)
            scale, offset = norm_affine.running_affine(norm, c, torch.float64)
        # float32 rounding of the same float64 values (the two orders of operations differ by float64 rounding)
        size = ((scale - coefficients[0]) * mean).abs().max() + coefficients[2].abs().max()  # the terms of offset
        torch.testing.assert_close(out[0].double(), scale, rtol=1e-7, atol=1e-12 * scale.abs().max())
        torch.testing.assert_close(out[1].double(), offset, rtol=1e-7, atol=1e-12 * size)
        torch.testing.assert_close(out[2].double(), mean, rtol=1e-7, atol=0)


def test_norm_grads_are_the_scale_and_offset_gradients(kernels):
    """From a reader's Σdy and Σdy·(z − shift) to ∂L/∂scale = Σdy·z and ∂L/∂offset = Σdy."""
    dy, z, shift = torch.randn(300, 8, dtype=torch.float64), torch.randn(300, 8) + 4, torch.full((8,), 4.0)
    sums = torch.stack([dy.sum(0), (dy * (z.double() - 4)).sum(0)])
    grad_scale, grad_offset = kernels.norm_grads(sums, shift)
    torch.testing.assert_close(grad_scale.double(), (dy * z.double()).sum(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_offset.double(), dy.sum(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shift must be 8"):
        kernels.norm_grads(sums, shift.double())


def test_feature_loss_kernels(kernels):
    """Σ|a − b| without writing a − b, and (grad + w·sign(a − b)) through the leaky ReLU whose output is a:
    the values PyTorch gives, on sizes with a partial vector and block at the end."""
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(3001, 5, generator=gen), torch.randn(3001, 5, generator=gen)
    b[::7] = a[::7]  # ties: sign 0
    grad = torch.randn(3001, 5, generator=gen)
    assert kernels.abs_diff_sum(a, b) == pytest.approx((a.double() - b.double()).abs().sum().item(), rel=1e-6)
    for g in (grad, None):
        expected = torch.ops.aten.leaky_relu_backward((0 if g is None else g) + 0.3 * (a - b).sign(), a, 0.2, True)
        assert torch.equal(kernels.feature_grad(g, a, b, 0.3, 0.2), expected)
    out = torch.empty_like(a)
    assert kernels.feature_grad(grad, a, b, 0.3, 0.2, out=out) is out
    with pytest.raises(ValueError, match=r"b must be a contiguous float32 CPU tensor of shape \(3001, 5\)"):
        kernels.abs_diff_sum(a, b[:, :4])
    with pytest.raises(ValueError, match="grad must be a contiguous"):
        kernels.feature_grad(grad.t(), a.t().contiguous(), b.t().contiguous(), 0.3, 0.2)


@pytest.mark.parametrize("stride, c_in, c_out, n_out", [(2, 1, 32, 601), (2, 32, 64, 37), (1, 64, 64, 5)])
def test_strided_conv_is_the_loss_networks_layer(kernels, stride, c_in, c_out, n_out):
    """leaky_relu(bias + strided conv) of a padded buffer, all three taps one GEMM operand; output counts that
    leave a partial tile at the end, whose rows past the input are never read."""
    gen = torch.Generator().manual_seed(6)
    rows = stride * (n_out - 1) + 3
    x = torch.randn(rows, c_in, generator=gen)
    taps, bias = torch.randn(3, c_in, c_out, generator=gen), torch.randn(c_out, generator=gen)
    out = torch.full((n_out, c_out), float("nan"))
    kernels.strided_conv(x, taps, bias, stride, 0.2, out)
    expected = F.leaky_relu(F.conv1d(x.double().t()[None], taps.double().permute(2, 1, 0), bias.double(),
                                     stride=stride)[0].t(), 0.2)  # fmt: skip
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    with pytest.raises(ValueError, match=r"x: rows \[0, \d+\) fall outside"):
        kernels.strided_conv(x[:-1], taps, bias, stride, 0.2, out)
    with pytest.raises(ValueError, match="Cout a multiple of 16"):
        kernels.strided_conv(x, taps[:, :, :8].contiguous(), bias[:8], stride, 0.2, out[:, :8].contiguous())


def test_norm_kernels_refuse_bad_inputs(kernels):
    c, ones, zeros = 8, torch.ones(8), torch.zeros(8)
    one = torch.ones(())
    moments = _moments(torch.randn(1, 10, c))
    with pytest.raises(ValueError, match=r"moments must be .* \[B, 2, 8\]"):
        kernels.norm_forward(moments.float(), 10, one, one, ones, zeros, 1e-5, zeros.clone(), ones.clone())
    with pytest.raises(ValueError, match="gamma must be 8"):
        kernels.norm_forward(moments, 10, one, one, ones[:4], zeros, 1e-5, zeros.clone(), ones.clone())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        kernels.norm_forward(moments[:, :, :], 1, one, one, ones, zeros, 1e-5, zeros.clone(), ones.clone(), 0.1)
    with pytest.raises(ValueError, match="from batch moments only"):
        kernels.norm_forward(None, 10, one, one, ones, zeros, 1e-5, zeros.clone(), ones.clone(), 0.1)
    with pytest.raises(ValueError, match=r"stats must .* shape \(2, 8\)"):
        kernels.norm_backward(torch.zeros(2, 4, dtype=torch.float64), 10, one, ones, zeros, 1e-5, True, ones, ones)
    with pytest.raises(ValueError, match="grad_offset must be 8"):
        kernels.norm_backward(torch.zeros(2, 8, dtype=torch.float64), 10, one, ones, zeros, 1e-5, True, ones, ones[:2])


def test_output_conv_deferred_norm_is_the_output_conv_of_the_activation(kernels):
    """``output_conv_deferred_norm``: the 1×1 output conv of ``leaky_relu(scale·z + offset)``; its backward gives the z-gradient
    ``scale·dy``, ``Σdy``, ``Σdy·(z − shift)`` and the weight gradient, rows past ``n`` untouched."""
    torch.manual_seed(5)
    n, c = 1000, 24
    z = torch.randn(n + 3, c)
    z[n:] = float("nan")  # rows past n: never read
    scale, offset, shift = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    weight, bias = torch.randn(c), torch.randn(1)
    y = torch.empty(n)
    kernels.output_conv_deferred_norm(z, n, scale, offset, 0.3, weight, bias, y)
    zs = z[:n].double().requires_grad_()
    pre = zs * scale.double() + offset.double()
    act = F.leaky_relu(pre, 0.3)
    act.retain_grad()
    w64 = weight.double().requires_grad_()
    y64 = act @ w64 + bias.double()
    torch.testing.assert_close(y.double(), y64.detach(), atol=1e-5 * y64.abs().max().item(), rtol=0)
    grad = torch.randn(n)
    (y64 * grad.double()).sum().backward()
    dz = torch.full((n + 3, c), float("nan"))
    sums, weight_grad = torch.ones(2, c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)  # added to
    kernels.output_conv_deferred_norm_backward(grad, z, scale, offset, 0.3, weight, shift, dz, sums, weight_grad)
    dy = torch.where(pre > 0, act.grad, 0.3 * act.grad).detach()
    torch.testing.assert_close(dz[:n].double(), zs.grad, atol=1e-5 * zs.grad.abs().max().item(), rtol=0)
    assert dz[n:].isnan().all()
    torch.testing.assert_close(sums[0] - 1, dy.sum(0), atol=1e-5 * dy.abs().sum().item() / c, rtol=0)
    torch.testing.assert_close(sums[1] - 1, (dy * (zs.detach() - shift.double())).sum(0),
                               atol=1e-5 * (dy * zs.detach()).abs().sum().item() / c, rtol=0)  # fmt: skip
    torch.testing.assert_close(weight_grad - 1, w64.grad, atol=1e-5 * act.detach().abs().sum().item() / c, rtol=0)
    with pytest.raises(ValueError, match=r"n = 1004 rows outside z's 1003"):
        kernels.output_conv_deferred_norm(z, n + 4, scale, offset, 0.3, weight, bias, torch.empty(n + 4))
    with pytest.raises(ValueError, match="weight must be 24"):
        kernels.output_conv_deferred_norm(z, n, scale, offset, 0.3, weight[:8], bias, y)
    with pytest.raises(ValueError, match="y must be 1000"):
        kernels.output_conv_deferred_norm(z, n, scale, offset, 0.3, weight, bias, y[:10])
    with pytest.raises(ValueError, match=r"dz: rows \[0, 1000\) fall outside its 10 rows"):
        kernels.output_conv_deferred_norm_backward(grad, z, scale, offset, 0.3, weight, shift, dz[:10], sums, weight_grad)
    with pytest.raises(ValueError, match="weight_grad must be 24 contiguous float64"):
        kernels.output_conv_deferred_norm_backward(grad, z, scale, offset, 0.3, weight, shift, dz, sums, weight_grad.float())


@pytest.mark.parametrize("d", [1, 5])
def test_direct_conv_and_its_weight_gradient(kernels, d):
    """The waveform layer's direct conv (one real input channel, zero-padded to 8) with its moments, and the
    weight gradient of ``dz = g + b·z + e``, against float64."""
    torch.manual_seed(d)
    rows, n, c_in, c_out = 1000, 997, 8, 24  # 3 cut rows: in the statistics, without gradient from above
    x = torch.zeros(rows + 2 * d + 2, c_in)
    x[d : d + rows, 0] = torch.randn(rows) + 3.0  # a mean far from zero
    weight = torch.randn(c_out, c_in, 3)
    y, moments = torch.full((rows + 2, c_out), float("nan")), torch.empty(2, c_out, dtype=torch.float64)
    kernels.direct_conv(x, weight, y, rows, d, moments)
    expected = reference_layer(x[d : d + rows], weight, torch.zeros(c_out), d, None)
    torch.testing.assert_close(y[:rows].double(), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
    assert y[rows:].isnan().all()
    mean, var = kernels.merge_moments([(rows, moments)])
    torch.testing.assert_close(mean, expected.mean(0), atol=1e-6 * expected.abs().max().item(), rtol=0)
    torch.testing.assert_close(var, expected.var(0, unbiased=False), rtol=1e-4, atol=0)

    z, g, b, e = torch.randn(rows, c_out), torch.randn(n, c_out), torch.randn(c_out), torch.randn(c_out)
    dz = torch.cat([g, torch.zeros(rows - n, c_out)]).double() + b.double() * z.double() + e.double()
    w64 = weight.double().requires_grad_()
    out = F.conv1d(x[: rows + 2 * d].double().t()[None], w64, dilation=d)[0].t()
    (out * dz).sum().backward()
    taps_grad = torch.ones(3, c_in, c_out, dtype=torch.float64)  # added to
    kernels.direct_conv_weight_grad(g, z, rows, (b, e), x, d, taps_grad)
    torch.testing.assert_close(taps_grad.permute(2, 1, 0) - 1, w64.grad, atol=1e-5 * w64.grad.abs().max().item(), rtol=0)
    with pytest.raises(ValueError, match=r"x: rows \[0, \d+\) fall outside its 1000 rows"):
        kernels.direct_conv(x[:1000], weight, y, rows, d + 1, moments)
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.direct_conv(x, weight[:12], y[:, :12].contiguous(), rows, d)
    with pytest.raises(ValueError, match=r"weight_grad must be .* shape \(3, 8, 24\)"):
        kernels.direct_conv_weight_grad(g, z, rows, (b, e), x, d, taps_grad.float())


def test_results_do_not_depend_on_the_thread_count(kernels):
    # threads take fixed chunks of work dynamically and sums are added chunk by chunk in order, so every
    # output, moment and gradient is bitwise the same with 1, 2 or 3 threads
    torch.manual_seed(6)
    n, c, d = 5000, 16, 8
    z_below, z, grad = torch.randn(n, c), torch.randn(n, c), torch.randn(n, c)
    scale, offset, shift = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    weight, w_out = torch.randn(c, c, 3), torch.randn(c)
    b, e = torch.randn(c), torch.randn(c)

    def run():
        y, moments = torch.empty(n, c), torch.empty(2, c, dtype=torch.float64)
        kernels.winograd_conv(z_below, 0, kernels.winograd_weights(weight), y, 0, n, d, None, None, moments,
                              x_norm=(scale, offset, 0.2, n))  # fmt: skip
        dz, wgrad, sums = torch.empty(n, c), torch.zeros(6, c, c), torch.zeros(2, c, dtype=torch.float64)
        kernels.winograd_conv_backward(grad, z, n, (b, e), z_below, kernels.winograd_weights(weight, flipped=True), dz,
                                       wgrad, d, x_norm=(scale, offset, 0.2, n), below=(shift, sums))  # fmt: skip
        out, dz2 = torch.empty(n), torch.empty(n, c)
        sums2, w_grad = torch.zeros(2, c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        kernels.output_conv_deferred_norm(z, n, scale, offset, 0.2, w_out, torch.zeros(1), out)
        kernels.output_conv_deferred_norm_backward(grad[:, 0].contiguous(), z, scale, offset, 0.2, w_out, shift, dz2, sums2, w_grad)
        channel_sums = torch.zeros(2, c, dtype=torch.float64)
        kernels.channel_moments(z, channel_sums, shift)
        wave = F.pad(z_below[:, :8], (0, 0, d, d))  # the direct conv's zero-padded input
        y3, moments3, taps_grad = torch.empty(n, c), torch.empty(2, c, dtype=torch.float64), torch.zeros(3, 8, c, dtype=torch.float64)
        kernels.direct_conv(wave, weight[:, :8], y3, n, d, moments3)
        kernels.direct_conv_weight_grad(grad, z, n, (b, e), wave, d, taps_grad)
        return y, moments, dz, wgrad, sums, out, dz2, sums2, w_grad, channel_sums, y3, moments3, taps_grad

    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


def test_backward_mask_matches_the_forward_activation_exactly(kernels):
    # the backward recomputes the layer below's leaky-ReLU mask from scale·z + offset (the activation is never
    # stored): it must agree with the forward's activation on every element, zeros and near-zeros included
    torch.manual_seed(3)
    n = 20_000
    z = torch.cat([1e-3 * torch.randn(n - 64, 16), torch.zeros(64, 16)])
    scale, offset = torch.randn(16), 1e-3 * torch.randn(16)
    offset[:4] = 0.0  # scale·0 + 0: exactly zero before the activation
    act = kernels.affine_leaky_relu(z, scale, offset, 0.5, out=torch.empty_like(z))
    weight = torch.zeros(16, 16, 3)
    weight[:, :, 1] = torch.eye(16)  # the input gradient is the output gradient (to Winograd's rounding): 1
    sums = torch.zeros(2, 16, dtype=torch.float64)
    kernels.winograd_conv_backward(torch.ones(n, 16), torch.zeros(n, 16), n, (torch.zeros(16), torch.zeros(16)), z,
                                   kernels.winograd_weights(weight, flipped=True), torch.empty(n, 16),
                                   torch.zeros(6, 16, 16), 4, x_norm=(scale, offset, 0.5, n),
                                   below=(torch.zeros(16), sums))  # fmt: skip
    expected = torch.where(act > 0, 1.0, 0.5).double().sum(0)  # Σdy: one mismatched element moves it by 0.5
    torch.testing.assert_close(sums[0], expected, atol=0.05, rtol=0)


def test_kernels_refuse_rows_outside_the_buffer(kernels):
    x, y, bias = torch.zeros(100, 8), torch.zeros(100, 8), torch.zeros(8)
    weights, grad = torch.zeros(6, 8, 8), torch.zeros(6, 8, 8)
    with pytest.raises(ValueError, match=r"x: rows \[-2, "):
        kernels.winograd_conv(x, 0, weights, y, 10, 5, 2, bias, 0.2)  # reads 2 rows before the buffer
    with pytest.raises(ValueError, match=r"x: rows .* outside its 100 rows"):
        kernels.winograd_conv(x, 94, weights, y, 10, 5, 2, bias, 0.2)  # needs rows up to 101
    with pytest.raises(ValueError, match=r"y: rows .* outside its 100 rows"):
        kernels.winograd_conv(x, 10, weights, y, 96, 5, 2, bias, 0.2)
    g, z, coefficients = torch.zeros(5, 8), torch.zeros(5, 8), (bias, bias)
    with pytest.raises(ValueError, match=r"dx: rows \[2, 7\) fall outside its 6 rows"):  # writes dx rows d … d + 5
        kernels.winograd_conv_backward(g, z, 5, coefficients, x, weights, y[:6], grad, 2)
    with pytest.raises(ValueError, match=r"z: rows \[0, 7\) fall outside its 5 rows"):
        kernels.winograd_conv_backward(g, z, 7, coefficients, x, weights, y, grad, 2)
    with pytest.raises(ValueError, match="cannot be fewer"):
        kernels.winograd_conv_backward(g, z[:4], 4, coefficients, x, weights, y, grad, 2)
    with pytest.raises(ValueError, match=r"x: rows \[0, 9\) fall outside its 8 rows"):
        kernels.winograd_conv_backward(g, z, 5, coefficients, x[:8], weights, y, grad, 2)
    with pytest.raises(ValueError, match=r"weights must have shape \(6, 8, 8\)"):
        kernels.winograd_conv(x, 10, torch.zeros(6, 8, 16), y, 10, 5, 2, bias, 0.2)
    with pytest.raises(ValueError, match=r"weights_grad must have shape \(6, 8, 8\)"):
        kernels.winograd_conv_backward(g, z, 5, coefficients, x, weights, y, grad[:3], 2)
    with pytest.raises(ValueError, match="float32"):
        kernels.winograd_conv(x.double(), 10, weights, y, 10, 5, 2, bias, 0.2)
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.winograd_conv(torch.zeros(100, 6), 10, torch.zeros(6, 6, 8), y, 10, 5, 2, bias, 0.2)
    with pytest.raises(ValueError, match="bias"):
        kernels.winograd_conv(x, 10, weights, y, 10, 5, 2, torch.zeros(7), 0.2)


def test_library_is_built_once_into_the_cache(fresh_native):
    first = native.build()
    assert first.parent == fresh_native and first.suffix == ".so"
    assert sorted(p.name for p in fresh_native.iterdir()) == [first.name]  # no temporary files left
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp
    assert native.cpu_kernels() is not None


def test_a_library_others_can_write_is_not_loaded(fresh_native, caplog):
    library = native.build()
    library.chmod(0o666)  # anyone could have replaced it
    with pytest.raises(RuntimeError, match="refusing to load .*others can write"):
        native.build()
    with caplog.at_level(logging.WARNING, logger="dfl.kernels.native"):
        assert native.cpu_kernels() is None
    assert "refusing to load" in caplog.text
    library.chmod(0o644)
    assert native.build() == library


def test_library_is_keyed_by_the_source(fresh_native, monkeypatch, caplog):
    """Another source (a kernel renamed) builds another library, never loaded in place of the current one; and
    a library lacking a kernel the wrappers need is not used: the PyTorch path runs."""
    current = native.build()
    old = native.build(native.SOURCE_TEXT.replace("dfl_output_conv_deferred_norm", "dfl_previous_name"))
    assert old != current and old.exists() and current.exists()
    monkeypatch.setattr(native, "build", lambda: old)
    with caplog.at_level(logging.WARNING, logger="dfl.kernels.native"):
        assert native.cpu_kernels() is None
    assert "dfl_output_conv_deferred_norm" in caplog.text


def test_library_is_keyed_by_the_cpu(fresh_native, monkeypatch):
    first = native.build()
    monkeypatch.setattr(native, "_cpu_identity", lambda: "model name: another CPU\nflags: sse2\n")
    second = native.build()
    assert second != first and second.exists() and first.exists()


def test_without_a_compiler_the_pytorch_path_is_used(fresh_native, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken-cc 1.0 && exit 0\necho 'cc: error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(RuntimeError, match="could not compile .*kernels.c"):
        native.build()
    assert not fresh_native.exists() or not any(fresh_native.iterdir())  # failed builds leave nothing

    with caplog.at_level(logging.WARNING, logger="dfl.kernels.native"):
        assert native.cpu_kernels() is None
    assert "using the PyTorch path" in caplog.text
    model = small_denoiser()
    x = 0.3 * torch.randn(1, 500)
    with torch.inference_mode():
        expected = model(x)
    torch.testing.assert_close(FoldedInferenceNet(model).forward_cpu(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="winograd=True"):
        FoldedInferenceNet(model, winograd=True).forward_cpu(x)


def test_native_kernels_can_be_switched_off(fresh_native, monkeypatch):
    monkeypatch.setenv("DFL_NATIVE", "0")
    assert native.cpu_kernels() is None
    assert not fresh_native.exists()  # nothing compiled


def test_one_openmp_runtime_in_the_process(kernels):
    # OpenMP in the kernels shares the libgomp PyTorch loaded: one runtime in the process
    maps = {line.split()[-1] for line in open(f"/proc/{os.getpid()}/maps") if "libgomp" in line}
    assert len(maps) <= 1, maps


def test_merge_moments_is_the_norms_merge(kernels):
    """merge_moments and norm_forward's batch statistics are one merge: the same bits; and bad parts are refused."""
    gen = torch.Generator().manual_seed(7)
    c = 16
    parts = [(100, torch.stack([torch.randn(c, generator=gen, dtype=torch.float64) + 50,
                                torch.rand(c, generator=gen, dtype=torch.float64) * 100])) for _ in range(3)]  # fmt: skip
    mean, var = kernels.merge_moments(parts)
    one = torch.ones(1)
    _, stats = kernels.norm_forward(torch.stack([m for _, m in parts]), 100, one, one, None, torch.zeros(c), 1e-5,
                                    torch.zeros(c), torch.ones(c))  # fmt: skip
    assert torch.equal(stats[0], mean) and torch.equal(stats[1], var)
    rows = torch.tensor([100.0] * 3, dtype=torch.float64)
    means, m2 = torch.stack([m[0] for _, m in parts]), torch.stack([m[1] for _, m in parts])
    torch.testing.assert_close(mean, means.mean(0), rtol=1e-12, atol=0)
    total_var = (m2.sum(0) + (rows[:, None] * (means - means.mean(0)).square()).sum(0)) / rows.sum()
    torch.testing.assert_close(var, total_var, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="at least one part"):
        kernels.merge_moments([])
    with pytest.raises(ValueError, match="float64"):
        kernels.merge_moments([(10, torch.zeros(2, c))])
    with pytest.raises(ValueError, match=r"shape \(2, C\)"):
        kernels.merge_moments([(10, torch.zeros(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="every part needs rows"):
        kernels.merge_moments([(0, torch.zeros(2, c, dtype=torch.float64))])
