"""The frozen loss network's channels-last fast path (dfl.kernels.frozen_loss_network, reached through
``dfl.kernels.accelerate``) against the module."""

from __future__ import annotations

import pytest
import torch

from dfl.kernels import accelerate, frozen_loss_network
from dfl.losses import FeatureLoss
from dfl.models import LossNetwork


def _frozen(**config) -> LossNetwork:
    torch.manual_seed(0)
    net = LossNetwork(**config)
    for norm in net.norms:  # statistics and affine parameters away from their defaults, so folding matters
        if hasattr(norm, "running_mean"):
            norm.running_mean.normal_(0, 0.1)
            norm.running_var.uniform_(0.5, 2.0)
            if norm.weight is not None:
                norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.normal_(0, 0.1)
    for conv in net.convs:
        if conv.bias is not None:
            conv.bias.data.normal_(0, 0.1)
    net.eval().requires_grad_(False)
    return net


@pytest.fixture
def calls(monkeypatch):
    """How often the fast path ran."""
    seen = []
    original = frozen_loss_network._FrozenFeatures.apply
    monkeypatch.setattr(frozen_loss_network._FrozenFeatures, "apply", lambda *a: seen.append(1) or original(*a))
    return seen


def _features_and_grad(net, wav, n_layers, fast: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(frozen_loss_network, "applies", lambda *a: False)
        x = wav.clone().requires_grad_()
        feats = accelerate(net, verify=False)(x, n_layers=n_layers)
        gen = torch.Generator().manual_seed(1)
        # a smooth loss (no L1 kink): its input gradient measures the backward, not float ties
        loss = sum((f * torch.randn(f.shape, generator=gen)).sum() for f in feats)
        loss.backward()
    return [f.detach() for f in feats], x.grad


@pytest.mark.parametrize(
    "config, n_layers, shape",
    [
        pytest.param({"n_layers": 6}, 6, (2, 4001), id="paper-6-layers-batch-2"),
        pytest.param({"n_layers": 14}, None, (1, 3001), id="14-layers-stride-1-last"),
        pytest.param({"n_layers": 4, "normalization": "none"}, 3, (1, 778), id="no-norm-conv-bias"),
        pytest.param({"n_layers": 3, "bn_scale": False, "bn_eps": 1e-3}, 3, (1, 5), id="tf-slim-bn-5-samples"),
    ],
)
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pytorch"])
def test_fast_path_matches_the_module(config, n_layers, shape, compiled, calls, monkeypatch):
    """Features and input gradient as the module's, with the compiled strided convs and without them."""
    if not compiled:
        monkeypatch.setattr(frozen_loss_network, "cpu_kernels", lambda: None)
    net = _frozen(**config)
    wav = 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    fast, fast_grad = _features_and_grad(net, wav, n_layers, True, monkeypatch)
    assert calls == [1]
    plain, plain_grad = _features_and_grad(net, wav, n_layers, False, monkeypatch)
    assert len(fast) == len(plain) == (n_layers or config["n_layers"])
    for a, b in zip(fast, plain):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * b.abs().max().item())
    torch.testing.assert_close(fast_grad, plain_grad, rtol=0, atol=2e-6 * plain_grad.abs().max().item())


def test_feature_loss_with_lengths_matches_the_module(monkeypatch):
    loss = accelerate(FeatureLoss(_frozen(n_layers=6), layers=[0, 2, 5]), verify=False)
    gen = torch.Generator().manual_seed(3)
    est, ref = 0.1 * torch.randn(2, 3000, generator=gen), 0.1 * torch.randn(2, 3000, generator=gen)
    lengths = torch.tensor([3000, 2100])
    fast = loss.distances(est, ref, lengths)
    monkeypatch.setattr(frozen_loss_network, "applies", lambda *a: False)
    torch.testing.assert_close(fast, loss.distances(est, ref, lengths), rtol=1e-5, atol=0)


def test_fast_path_only_where_it_applies(calls):
    wav = torch.randn(1, 500)
    net = _frozen(n_layers=3)
    fast = accelerate(net, verify=False)
    fast(wav)
    assert len(calls) == 1
    fast.double()(wav.double())  # float64
    fast.float().train()(wav)  # training: batch statistics, moving running ones
    net.eval().convs[0].weight.requires_grad_(True)  # not frozen: the weights need gradients
    fast(wav)
    assert len(calls) == 1
    net(wav)  # the module itself never takes the fast path
    net.requires_grad_(False)(wav)
    assert len(calls) == 1
    accelerate(_frozen(n_layers=3, batch_stats_at_eval=True), verify=False)(wav)  # the authors' release
    accelerate(_frozen(n_layers=3, normalization="adaptive"), verify=False)(wav)
    assert len(calls) == 1


def _signals_without_split_ties(net, layers, monkeypatch):
    """``(est, ref, weights)`` whose L1 terms have the same signs on both paths.

    Where est's and ref's features (nearly) tie, the two paths may round to different sides, and
    ``sign(est − ref)`` differs over that element's receptive field: a float tie, not a backward bug.
    Which seeds hit one depends on the CPU's rounding, so the first seed without one is taken.
    """
    depth = max(layers) + 1
    for seed in range(4, 24):
        gen = torch.Generator().manual_seed(seed)
        est, ref = 0.1 * torch.randn(2, 3001, generator=gen), 0.1 * torch.randn(2, 3001, generator=gen)
        signs = []
        for fast in (True, False):
            with monkeypatch.context() as m, torch.no_grad():
                if not fast:
                    m.setattr(frozen_loss_network, "applies", lambda *a: False)
                fast = accelerate(net, verify=False)
                fe, fr = fast(est, n_layers=depth), fast(ref, n_layers=depth)
                signs.append([(fe[i] - fr[i]).sign() for i in layers])
        if all(torch.equal(a, b) for a, b in zip(*signs)):
            return est, ref, torch.rand(len(layers), generator=gen) + 0.5
    pytest.fail("every seed gave a feature tie the two paths round apart")


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pytorch"])
@pytest.mark.parametrize("layers", [[0, 2, 5], [3, 1, 3]], ids=["paper-subset", "repeated-layer"])
def test_feature_loss_distances_in_one_op_match_the_module(layers, compiled, monkeypatch):
    """FeatureLoss runs its distances through frozen_distances: values and input gradient as the module's,
    with the compiled distance and gradient kernels and without them."""
    if not compiled:
        monkeypatch.setattr(frozen_loss_network, "cpu_kernels", lambda: None)
    loss = accelerate(FeatureLoss(_frozen(n_layers=6), layers=layers), verify=False)
    est, ref, weights = _signals_without_split_ties(loss.loss_network, layers, monkeypatch)
    seen = []
    original = frozen_loss_network._FrozenDistances.apply
    monkeypatch.setattr(frozen_loss_network._FrozenDistances, "apply", lambda *a: seen.append(1) or original(*a))

    saved = []

    def run():
        x = est.clone().requires_grad_()
        dist = loss.distances(x, ref)
        if not saved:  # the one op's
            saved.append(len(dist.grad_fn.saved_tensors))
        (weights * dist).sum().backward()
        return dist.detach(), x.grad

    fast, fast_grad = run()
    assert seen == [1] and fast.shape == (len(layers),)
    # kept for the backward: every layer's features, and the reference's (or the difference) only where a loss is
    assert saved == [max(layers) + 1 + (len(set(layers)) if compiled else len(layers))]
    monkeypatch.setattr(frozen_loss_network, "applies", lambda *a: False)
    plain, plain_grad = run()
    assert seen == [1]
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=0, atol=1e-6 * plain_grad.abs().max().item())
    assert fast_grad.abs().sum() > 0


def test_frozen_distances_checks_its_inputs():
    net = _frozen(n_layers=3)
    with pytest.raises(ValueError, match="same"):
        frozen_loss_network.frozen_distances(net, torch.randn(1, 500), torch.randn(1, 400), [0])
    loss = accelerate(FeatureLoss(net, layers=2), verify=False)
    # [batch, 1, time] signals take the module's path, with the same values
    est, ref = torch.randn(2, 1, 600), torch.randn(2, 1, 600)
    torch.testing.assert_close(loss.distances(est, ref), loss.distances(est[:, 0], ref[:, 0]), rtol=1e-6, atol=0)
