import pytest
import torch
from torch import nn

from dfl.losses import FeatureLoss, WaveformL1Loss, WaveformL2Loss, build_loss_network
from dfl.models import ContextAggregationNet, LossNetwork


class TwoLayerNet(nn.Module):
    """A loss network whose activations are known by hand: [x, 2x]."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Identity(), nn.Identity()])
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, n_layers=None):
        return [x, self.scale * x][: n_layers or None]


def test_feature_loss_hand_checked_values():
    loss = FeatureLoss(TwoLayerNet(), weights=[1.0, 0.5])
    est = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    ref = torch.tensor([[0.0, 2.0, 5.0, 4.0]])
    total, per_layer = loss(est, ref)
    # layer 0: mean|[1,0,-2,0]| = 0.75 ; layer 1: mean|2*[1,0,-2,0]| = 1.5
    torch.testing.assert_close(per_layer, torch.tensor([0.75, 1.5]))
    torch.testing.assert_close(total, torch.tensor(0.75 * 1.0 + 1.5 * 0.5))


def test_layer_selection():
    net = LossNetwork(n_layers=5, base_channels=4)
    assert FeatureLoss(net).layers == [0, 1, 2, 3, 4]
    assert FeatureLoss(net, layers=3).layers == [0, 1, 2]
    assert FeatureLoss(net, layers=[1, 4]).term_names == ["layer_1", "layer_4"]
    with pytest.raises(ValueError, match="does not select"):
        FeatureLoss(net, layers=[7])
    with pytest.raises(ValueError, match="weights"):
        FeatureLoss(net, layers=2, weights=[1, 2, 3])


def test_loss_network_frozen_but_gradients_reach_denoiser():
    torch.manual_seed(0)
    lossnet = LossNetwork(n_layers=4, base_channels=4)
    before = {k: v.clone() for k, v in lossnet.state_dict().items()}
    denoiser = ContextAggregationNet(dilations=[1, 2, 1], channels=4)
    loss = FeatureLoss(lossnet)
    loss.train()
    assert not lossnet.training, "BN of the frozen network must stay in inference mode"
    opt = torch.optim.Adam([p for p in [*denoiser.parameters(), *loss.parameters()] if p.requires_grad], lr=1e-2)
    for _ in range(3):
        noisy, clean = torch.randn(2, 400), torch.randn(2, 400)
        total, _ = loss(denoiser(noisy), clean)
        opt.zero_grad()
        total.backward()
        grads = [p.grad for p in denoiser.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in lossnet.parameters())
        opt.step()
    after = lossnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_waveform_losses():
    a, b = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 1.0]])
    assert WaveformL1Loss()(a, b)[0].item() == pytest.approx(1.5)
    assert WaveformL2Loss()(a, b)[0].item() == pytest.approx(2.5)


def test_random_loss_network_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        net = build_loss_network(n_layers=3, base_channels=4)
    assert net.pretrained_from is None


def test_loss_network_checkpoint_is_loaded(tmp_path):
    from dfl.checkpoints import save_model

    src = LossNetwork(n_layers=3, base_channels=4)
    with torch.no_grad():
        src.convs[0].weight.fill_(0.25)
    save_model(tmp_path / "ln.pt", "lossnet", src)
    net = build_loss_network(checkpoint=str(tmp_path / "ln.pt"), n_layers=15)
    assert net.n_layers == 3 and torch.equal(net.convs[0].weight, src.convs[0].weight)
    assert net.pretrained_from.endswith("ln.pt")
