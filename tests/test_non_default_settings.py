"""Every configurable setting reaches the fast paths: each at a NON-default value, fast path against plain path.

The other fast-path tests mostly run the defaults (leaky slope 0.2, BN momentum 0.1, 16 or 64 channels), so a
constant hard-coded where a setting belongs would pass them. Here each setting is moved far enough from its
default that ignoring it changes the result:

- training through the fused layers (``dfl.kernels.accelerate(model, "training")``) against the plain PyTorch layers;
- the frozen loss network's fast path against the module;
- the fast inference path (``FoldedInferenceNet``) against the plain model.
"""

from __future__ import annotations

import pytest
import torch

from dfl.kernels import accelerate, frozen_loss_network, winograd
from dfl.kernels.folded_inference import FoldedInferenceNet
from dfl.losses import FeatureLoss
from dfl.models import ContextAggregationNet, LossNetwork
from dfl.models.adaptive_bn import AdaptiveBatchNorm

DILATIONS = [1, 3, 2, 5, 1]  # not powers of two


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())


def _bns(net):
    return [n.bn if isinstance(n, AdaptiveBatchNorm) else n for n in net.norms]


def _randomised(net, seed: int = 0):
    """Parameters and running statistics away from their initial values (α, β, γ, biases matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        for bn in _bns(net):
            if hasattr(bn, "running_mean"):
                bn.running_mean.normal_(0, 0.2, generator=gen)
                bn.running_var.uniform_(0.05, 0.5, generator=gen)  # small: eps weighs in
    return net


# Each row moves one or more settings off its default; `momentum` is the BN modules' attribute.
DENOISER_SETTINGS = [
    pytest.param(dict(negative_slope=0.37), {}, id="slope-0.37"),
    pytest.param(dict(negative_slope=0.0), {}, id="slope-0-relu"),
    pytest.param(dict(bn_eps=0.3), {}, id="bn-eps-0.3"),
    pytest.param(dict(channels=24), {}, id="24-channels"),
    pytest.param(dict(channels=12), {}, id="12-channels-not-a-multiple-of-8"),
    pytest.param(dict(bn_scale=False, normalization="batch", negative_slope=0.05, bn_eps=0.1), {}, id="plain-bn-no-gamma"),
    pytest.param(dict(), dict(momentum=0.45), id="bn-momentum-0.45"),
    pytest.param(dict(negative_slope=0.37, bn_eps=0.3, batch_stats_at_eval=True, padding="tf_authors"), {},
                 id="authors-style-slope-eps"),
]


def _denoiser(fused: bool, config: dict, attrs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = ContextAggregationNet(**{"dilations": DILATIONS, "channels": 16, **config})
    _randomised(net, seed)
    for bn in _bns(net):
        for k, v in attrs.items():
            setattr(bn, k, v)
    if fused:
        fast = accelerate(net, "training", verify=False)
        assert fast is not net
        return fast
    return net


@pytest.fixture(params=["winograd", "direct"])
def conv_path(request, monkeypatch):
    if request.param == "direct":
        monkeypatch.setattr(winograd, "compiled_kernels_for", lambda *tensors: None)
    return request.param


@pytest.mark.parametrize("config, attrs", DENOISER_SETTINGS)
def test_fused_training_follows_the_settings(config, attrs, conv_path):
    """Output, every parameter's gradient and the running statistics of a training step, fused as plain."""
    plain, fused = _denoiser(False, config, attrs), _denoiser(True, config, attrs)
    x = torch.randn(3, 613, generator=torch.Generator().manual_seed(4))
    y_plain, y_fused = plain.train()(x), fused.train()(x)
    assert _rel(y_fused, y_plain) < 1e-5
    target = torch.randn(y_plain.shape, generator=torch.Generator().manual_seed(5))
    (y_plain - target).pow(2).mean().backward()
    (y_fused - target).pow(2).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert _rel(q.grad, p.grad) < 1e-4, name
    for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        assert _rel(fused.eval()(x), plain.eval()(x)) < 1e-5


def test_the_settings_change_the_result():
    """Each non-default setting above changes the plain network's output (else the comparison proves nothing)."""
    x = torch.randn(3, 613, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = _denoiser(False, {}, {}).train()(x)
        for param in DENOISER_SETTINGS:
            config, attrs = param.values
            if "channels" in config:
                continue  # another width is another network; its shapes are the check
            net = _denoiser(False, config, attrs).train()
            y = net(x)
            if attrs:  # momentum shows in the running statistics, not the training output
                net2 = _denoiser(False, config, {}).train()
                net2(x)
                assert not torch.allclose(_bns(net)[0].running_mean, _bns(net2)[0].running_mean), param.id
            else:
                assert _rel(y, base) > 1e-3, param.id


LOSSNET_SETTINGS = [
    pytest.param(dict(negative_slope=0.37), id="slope-0.37"),
    pytest.param(dict(bn_eps=0.3), id="bn-eps-0.3"),
    pytest.param(dict(base_channels=6, channel_block=2), id="6-channels-doubling-every-2"),
    pytest.param(dict(kernel_size=5), id="kernel-5"),
    pytest.param(dict(stride=3), id="stride-3"),
    pytest.param(dict(bn_scale=False, bn_eps=0.1, negative_slope=0.05), id="no-gamma"),
    pytest.param(dict(normalization="none", negative_slope=0.3), id="no-norm-slope-0.3"),
]


def _lossnet(config: dict) -> LossNetwork:
    torch.manual_seed(0)
    net = _randomised(LossNetwork(**{"n_layers": 5, "base_channels": 8, **config}))
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize("config", LOSSNET_SETTINGS)
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pytorch"])
def test_frozen_loss_network_follows_the_settings(config, compiled, monkeypatch):
    """Features, feature-loss distances and the input gradient of the fast path equal the module's."""
    if not compiled:
        monkeypatch.setattr(frozen_loss_network, "cpu_kernels", lambda: None)
    net = _lossnet(config)
    gen = torch.Generator().manual_seed(2)
    est, ref = 0.1 * torch.randn(2, 2501, generator=gen), 0.1 * torch.randn(2, 2501, generator=gen)

    def run(fast: bool):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(frozen_loss_network, "applies", lambda *a: False)
            assert frozen_loss_network.applies(net, est) is fast
            feats = [f.detach() for f in accelerate(net, verify=False)(est)]
            x = est.clone().requires_grad_()
            loss = accelerate(FeatureLoss(net, weights=[1.0, 0.5, 2.0, 1.0, 0.3]), verify=False)
            total, per_layer = loss(x, ref)
            total.backward()
        return feats, per_layer.detach(), x.grad

    (f_fast, d_fast, g_fast), (f_plain, d_plain, g_plain) = run(True), run(False)
    for a, b in zip(f_fast, f_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * b.abs().max().item())
    torch.testing.assert_close(d_fast, d_plain, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_fast, g_plain, rtol=0, atol=1e-5 * g_plain.abs().max().item())


def test_frozen_loss_network_settings_change_the_features():
    wav = 0.1 * torch.randn(2, 2501, generator=torch.Generator().manual_seed(2))
    base = _lossnet({})(wav)
    for param in LOSSNET_SETTINGS:
        feats = _lossnet(param.values[0])(wav)
        assert [f.shape for f in feats] != [f.shape for f in base] or _rel(feats[-1], base[-1]) > 1e-3, param.id


INFERENCE_SETTINGS = [
    pytest.param(dict(negative_slope=0.37), id="slope-0.37"),
    pytest.param(dict(bn_eps=0.3), id="bn-eps-0.3"),
    pytest.param(dict(channels=24), id="24-channels"),
    pytest.param(dict(channels=12), id="12-channels-not-a-multiple-of-8"),
    pytest.param(dict(bn_scale=False, normalization="batch", negative_slope=0.05, bn_eps=0.1), id="plain-bn-no-gamma"),
    pytest.param(dict(batch_stats_at_eval=True, negative_slope=0.37, bn_eps=0.3), id="batch-stats-slope-eps"),
    pytest.param(dict(batch_stats_at_eval=True, padding="tf_authors", bn_scale=False, negative_slope=0.05, bn_eps=0.2,
                      channels=24), id="authors-style-24-channels"),
]


@pytest.mark.parametrize("config", INFERENCE_SETTINGS)
@pytest.mark.parametrize("winograd_convs", [True, False], ids=["winograd", "direct"])
def test_fast_inference_follows_the_settings(config, winograd_convs):
    model = _denoiser(False, config, {}).eval()
    x = 0.3 * torch.randn(1 if config.get("batch_stats_at_eval") else 2, 1500, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = model(x)
    fast = FoldedInferenceNet(model, tile=256, winograd=winograd_convs)
    torch.testing.assert_close(fast.forward_cpu(x), expected, atol=2e-5 * expected.abs().max().item(), rtol=0)
    torch.testing.assert_close(fast(x), expected, atol=2e-5 * expected.abs().max().item(), rtol=0)
