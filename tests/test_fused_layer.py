"""The fused CPU layers (dfl.kernels.fused_layer) against the plain PyTorch layers."""

import pytest
import torch

from dfl.kernels import accelerate, winograd
from dfl.kernels.fused_layer import conv_norm_act, output_conv_deferred_norm
from dfl.models import ContextAggregationNet, LossNetwork

DILATIONS = [1, 1, 2, 4, 8, 1]


def _pair(**config):
    """The same randomised network twice: plain layers, and a copy through the fused layers
    (``dfl.kernels.accelerate``; its ``.model`` is the copy)."""
    torch.manual_seed(0)
    plain = ContextAggregationNet(dilations=DILATIONS, channels=16, **config)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.3 * torch.randn_like(p))  # α, β, γ, b away from their identity initialisation
    copy = ContextAggregationNet(dilations=DILATIONS, channels=16, **config)
    copy.load_state_dict(plain.state_dict())
    fused = accelerate(copy, "training", verify=False)
    assert fused is not copy
    return plain, fused


def _graph_ops(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return {type(f).__name__ for f in seen}


FUSED_OPS = {"_ConvNormActBackward", "_ConvDeferredNormBackward"}


def _fused(t: torch.Tensor) -> bool:
    """Whether the graph of ``t`` ran through the fused layers (per-layer or deferred-norm)."""
    return bool(FUSED_OPS & _graph_ops(t))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())


# the deferred-norm layers' kernels, the output conv's included
SPIED = ("winograd_conv", "winograd_conv_backward", "output_conv_deferred_norm", "output_conv_deferred_norm_backward",
         "direct_conv")


@pytest.fixture(params=["winograd", "direct"])
def conv_path(request, monkeypatch):
    """Runs a test with the Winograd convs (and checks they ran) or with the direct GEMMs only."""
    calls = []
    if request.param == "direct":
        monkeypatch.setattr(winograd, "compiled_kernels_for", lambda *tensors: None)
    else:
        from dfl.kernels.native import CpuKernels

        for name in SPIED:
            original = getattr(CpuKernels, name)
            monkeypatch.setattr(CpuKernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    yield request.param
    if request.param == "winograd":
        assert set(SPIED) <= set(calls)


CONFIGS = [
    pytest.param({}, id="adaptive"),
    pytest.param({"normalization": "batch"}, id="plain-bn"),
    pytest.param({"batch_stats_at_eval": True}, id="batch-stats-at-eval"),
    pytest.param({"bn_scale": False, "bn_eps": 1e-3}, id="tf-slim-bn"),
    pytest.param({"in_channels": 2}, id="two-input-channels"),
    pytest.param(  # can_authors: BN over the signal padded to a multiple of each dilation
        {"padding": "tf_authors", "batch_stats_at_eval": True, "bn_eps": 1e-3, "bn_scale": False}, id="authors"
    ),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_training_step_matches_plain_layers(config, conv_path):
    plain, fused = _pair(**config)
    shape = (3, config.get("in_channels", 1), 701) if "in_channels" in config else (3, 701)
    # A fixed input: where a pre-activation lies within float32 rounding of the leaky ReLU's kink, its
    # sign can differ between any two float32 implementations, and the gradients then differ by up to
    # ~1e-3 (seen for the direct and the Winograd convs alike, on a few inputs in ten). This one has no
    # such tie, so the comparison below measures the implementation, not the kink.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=gen)
    y_plain, y_fused = plain(x), fused(x)
    assert _fused(y_fused) and not _fused(y_plain)
    assert y_fused.shape == y_plain.shape
    assert _rel(y_fused, y_plain) < 1e-5
    target = torch.randn(y_plain.shape, generator=gen)
    (y_plain - target).abs().mean().backward()
    (y_fused - target).abs().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert _rel(q.grad, p.grad) < 1e-4, name
    for (name, b), c in zip(plain.named_buffers(), fused.buffers()):  # BN running statistics moved alike
        assert torch.allclose(c, b, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("config", CONFIGS)
def test_eval_mode_and_input_gradient_match_plain_layers(config, conv_path):
    plain, fused = _pair(**config)
    warm = torch.randn(2, config["in_channels"], 500) if "in_channels" in config else torch.randn(2, 500)
    with torch.no_grad():  # give the running statistics something to say
        plain.train()(warm)
    fused.model.load_state_dict(plain.state_dict())
    plain.eval(), fused.eval()
    shape = (2, config.get("in_channels", 1), 333) if "in_channels" in config else (2, 333)
    x1 = torch.randn(*shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    before = [b.clone() for b in fused.buffers()]
    y1, y2 = plain(x1), fused(x2)
    assert _rel(y2, y1) < 1e-5
    y1.pow(2).sum().backward()
    y2.pow(2).sum().backward()
    assert _rel(x2.grad, x1.grad) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(before, fused.buffers()))  # eval never moves them


def test_adam_steps_follow_the_plain_layers():
    """Three optimiser steps on a feature loss: same losses, same weights."""
    from dfl.losses import FeatureLoss

    plain, fused = _pair()
    loss_fn = FeatureLoss(LossNetwork(n_layers=4, base_channels=4), layers=3)
    opt_p = torch.optim.Adam(plain.parameters(), lr=1e-3)
    opt_f = torch.optim.Adam(fused.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        noisy, clean = torch.randn(2, 800, generator=gen), torch.randn(2, 800, generator=gen)
        losses = []
        for net, opt in ((plain, opt_p), (fused, opt_f)):
            opt.zero_grad()
            loss, _ = loss_fn(net(noisy), clean)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for p, q in zip(plain.parameters(), fused.parameters()):
        assert torch.allclose(q, p, rtol=1e-4, atol=1e-6)


def test_receptive_field_is_exact_on_the_fused_path():
    _, net = _pair()
    net.eval()
    x = torch.zeros(1, 200, requires_grad=True)
    y = net(x)
    assert _fused(y)
    y[0, 100].backward()
    # Winograd's transforms leave float32 rounding (~1e-9 here) where direct convolution gives exact zeros
    grad = x.grad[0].abs()
    touched = (grad > 1e-5 * grad.max()).nonzero().flatten()
    half = (net.receptive_field - 1) // 2
    assert touched.min().item() == 100 - half and touched.max().item() == 100 + half


def test_output_margins_are_zero_padding_for_the_next_layer():
    net = ContextAggregationNet(dilations=[1], channels=4).train()
    x = torch.nn.functional.pad(torch.randn(2, 1, 50), (1, 1)).transpose(1, 2).contiguous()
    out = conv_norm_act(x, net.convs[0].weight, net.norms[0], 1, 50, (5, 7), negative_slope=0.2)
    assert out.shape == (2, 62, 4)
    assert out[:, :5].abs().max() == 0 and out[:, -7:].abs().max() == 0
    assert out[:, 5:-7].abs().max() > 0
    with pytest.raises(ValueError, match="too short"):  # 60 rows need a margin of 11 behind them
        conv_norm_act(x, net.convs[0].weight, net.norms[0], 1, 50, (0, 0), negative_slope=0.2, rows=60)


def test_plain_layers_where_the_fused_path_does_not_apply():
    net = accelerate(ContextAggregationNet(dilations=[1, 2, 1], channels=4), "training")
    x = torch.randn(1, 300)
    assert _fused(net(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: PyTorch's own kernels
        assert not _fused(net(x))
    net.double()  # float64: PyTorch's own kernels
    assert not _fused(net(x.double()))
    plain = ContextAggregationNet(dilations=[1], channels=4, normalization="none")
    assert accelerate(plain, "training") is plain


def test_conv_norm_act_rejects_other_norms():
    with pytest.raises(TypeError, match="AdaptiveBatchNorm or BatchNorm"):
        conv_norm_act(torch.zeros(1, 4, 1), torch.zeros(2, 1, 3), torch.nn.Identity(), 1, 2, (0, 0), 0.2)


def test_waveform_layer_computes_only_its_weight_gradient_when_the_input_needs_none(monkeypatch):
    from dfl.kernels.native import CpuKernels

    calls = []
    original = CpuKernels.direct_conv_weight_grad
    monkeypatch.setattr(CpuKernels, "direct_conv_weight_grad", lambda *a: calls.append(1) or original(*a))
    plain, fused = _pair()
    x = torch.randn(2, 901, generator=torch.Generator().manual_seed(4))
    for net in (plain, fused):
        net(x).square().mean().backward()
    assert len(calls) == 2  # once per batch item
    assert _rel(fused.model.convs[0].weight.grad, plain.convs[0].weight.grad) < 1e-4
    fused.zero_grad()
    fused(x.clone().requires_grad_()).square().mean().backward()  # the input's gradient: the Winograd backward
    assert len(calls) == 2


def test_output_conv_deferred_norm_needs_a_one_channel_1x1_output_conv():
    below = (torch.ones(8), torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="1×1 conv to one channel"):
        output_conv_deferred_norm(torch.zeros(1, 4, 8), below, torch.nn.Conv1d(8, 2, 1), 4, 0.2)


def test_a_single_value_per_channel_is_an_error_as_in_plain_batch_norm():
    for fused, channels in ((False, 4), (True, 4), (True, 16)):  # 16: the deferred-norm layers
        plain = ContextAggregationNet(dilations=[1, 2], channels=channels).train()
        net = accelerate(plain, "training") if fused else plain
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            net(torch.randn(1, 1))
        assert torch.isfinite(plain.norms[0].bn.running_var).all()  # nothing half-updated


def test_checkpoints_record_the_architecture_not_how_it_runs(tmp_path):
    from dfl.checkpoints import load_model, save_model

    net = ContextAggregationNet(dilations=[1, 2, 1], channels=4)
    fused = accelerate(net, "training")
    assert fused.state_dict().keys() == {f"model.{k}" for k in net.state_dict()}  # it only wraps the model
    loaded = load_model(save_model(tmp_path / "m.pt", "denoiser", net), "denoiser")
    assert loaded.config == net.config and type(accelerate(loaded, "training")) is type(fused)
    x = torch.randn(1, 200)
    torch.testing.assert_close(loaded.eval()(x), net.eval()(x), rtol=1e-5, atol=1e-6)


def test_training_after_fast_inference_in_the_same_thread():
    # nothing the inference path leaves behind (an inference tensor, say) may break the next training step
    from dfl.kernels.folded_inference import FoldedInferenceNet

    plain, fused = _pair()
    FoldedInferenceNet(fused.model.eval(), winograd=True).forward_cpu(torch.randn(1, 4000))
    fused.train()
    y = fused(torch.randn(2, 9000))
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in fused.parameters())


def test_training_step_is_the_same_at_any_thread_count():
    # CPU training changes its thread count while metric workers score (dfl.metric_pool.CoreShare): a step that
    # depended on it would make two runs of one config differ. 4 x 16000 samples: large enough for torch to
    # split a sum between threads.
    _, fused = _pair()
    gen = torch.Generator().manual_seed(5)
    x, target = torch.randn(4, 16000, generator=gen), torch.randn(4, 16000, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fused.zero_grad()
            (fused(x) - target).abs().mean().backward()
            results.append([p.grad.clone() for p in fused.parameters()])
    finally:
        torch.set_num_threads(threads)
    names = [name for name, _ in fused.model.named_parameters()]
    for name, a, b in zip(names, *results):
        assert torch.equal(a, b), name
