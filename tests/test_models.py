import math

import pytest
import torch

from dfl.models import AdaptiveBatchNorm, ContextAggregationNet, LossNetwork
from dfl.models.padding import tf_same_padding

PAPER_DILATIONS = [1, *[2**i for i in range(13)], 1]


def test_can_paper_layout_and_receptive_field():
    net = ContextAggregationNet()
    assert net.dilations == PAPER_DILATIONS  # 15 3-tap layers + the 1x1 output = 16 layers
    assert len(net.convs) == 15 and net.output.kernel_size == (1,)
    assert all(c.out_channels == 64 for c in net.convs)
    assert net.receptive_field == 1 + 2 * (1 + (2**13 - 1) + 1) == 16387


def test_receptive_field_is_exact():
    torch.manual_seed(0)
    net = ContextAggregationNet(dilations=[1, 2, 4, 1], channels=4, normalization="none").eval()
    x = torch.zeros(1, 200, requires_grad=True)
    net(x)[0, 100].backward()
    touched = (x.grad[0] != 0).nonzero().flatten()
    assert net.receptive_field == 1 + 2 * (1 + 2 + 4 + 1) == 17
    assert touched.min().item() == 100 - 8 and touched.max().item() == 100 + 8


def test_ten_seconds_in_ten_seconds_out():
    net = ContextAggregationNet(channels=8).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 160_000)).shape == (1, 160_000)
        assert net(torch.randn(2, 1, 1234)).shape == (2, 1, 1234)


def test_authors_padding_keeps_length_for_lengths_not_multiple_of_dilation():
    net = ContextAggregationNet(dilations=[1, 2, 4, 8, 1], channels=4, padding="tf_authors", batch_stats_at_eval=True)
    for n in (37, 64, 101):
        assert net(torch.randn(1, n)).shape == (1, n)


def test_adaptive_bn_is_identity_at_init():
    bn = AdaptiveBatchNorm(5)
    x = torch.randn(3, 5, 40) * 7 + 2
    assert torch.equal(bn(x), x)
    assert bn.alpha.item() == 1.0 and bn.beta.item() == 0.0


def test_adaptive_bn_combines_identity_and_normalised():
    bn = AdaptiveBatchNorm(2, scale=False, eps=1e-3)
    with torch.no_grad():
        bn.alpha.fill_(0.5)
        bn.beta.fill_(2.0)
    x = torch.randn(4, 2, 30)
    mean = x.mean(dim=(0, 2), keepdim=True)
    var = x.var(dim=(0, 2), unbiased=False, keepdim=True)
    expected = 0.5 * x + 2.0 * (x - mean) / torch.sqrt(var + 1e-3)
    torch.testing.assert_close(bn(x), expected)


def test_batch_stats_at_eval_ignores_running_statistics():
    torch.manual_seed(0)
    net = ContextAggregationNet(dilations=[1, 2], channels=4, batch_stats_at_eval=True)
    with torch.no_grad():
        for n in net.norms:
            n.beta.fill_(1.0)
    x = torch.randn(1, 300)
    train_out = net.train()(x)
    eval_out = net.eval()(x)
    torch.testing.assert_close(train_out, eval_out)
    with torch.no_grad():  # running statistics are kept (for strict loading) but never used
        for n in net.norms:
            n.bn.running_mean.fill_(5.0)
            n.bn.running_var.fill_(9.0)
    torch.testing.assert_close(net.eval()(x), eval_out)
    std = ContextAggregationNet(dilations=[1, 2], channels=4)
    std.load_state_dict(net.state_dict())
    with torch.no_grad():
        std.norms[0].beta.fill_(1.0)
    assert not torch.allclose(std.eval()(x), eval_out)


def test_loss_network_channels_strides_and_tf_same_lengths():
    net = LossNetwork(n_layers=14, base_channels=32, channel_block=5)
    assert [c.out_channels for c in net.convs] == [32] * 5 + [64] * 5 + [128] * 4
    assert net.strides == [2] * 13 + [1]
    feats = net(torch.randn(2, 1001))
    lengths = [f.shape[-1] for f in feats]
    expected, n = [], 1001
    for s in net.strides:
        n = -(-n // s)
        expected.append(n)
    assert lengths == expected
    assert all(f.shape[0] == 2 for f in feats)


def test_paper_loss_network_has_15_layers_last_stride_1():
    net = LossNetwork()
    assert net.n_layers == 15 and net.strides[-1] == 1 and net.strides[:-1] == [2] * 14
    assert net.min_input_length == 2**16 - 1


@pytest.mark.parametrize("length,expected", [(10, (0, 1)), (11, (1, 1)), (1, (1, 1))])
def test_tf_same_padding_stride2(length, expected):
    assert tf_same_padding(length, 3, 2) == expected


def test_loss_network_heads():
    net = LossNetwork(n_layers=4, base_channels=4, heads={"scene": 15, "tags": 7})
    out = net.classify(torch.randn(3, 500))
    assert out["scene"].shape == (3, 15) and out["tags"].shape == (3, 7)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="padding"):
        ContextAggregationNet(padding="valid")
    with pytest.raises(ValueError, match="normalization"):
        ContextAggregationNet(normalization="layer")
    with pytest.raises(ValueError, match="expected"):
        ContextAggregationNet(channels=4)(torch.randn(5))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identity_init_outputs_the_input(mode):
    torch.manual_seed(0)
    net = ContextAggregationNet(dilations=[1, 1, 2, 4, 1], channels=6, init="identity")
    getattr(net, mode)()
    x = torch.randn(3, 700) * 0.3
    # exact up to the leak of the opposite sign through 5 leaky ReLUs: 0.2**5 * |x|
    assert (net(x) - x).abs().max() <= 0.2**5 * x.abs().max() + 1e-6
    # the other channels start random, so training can use them
    assert net.convs[1].weight[2:].abs().sum() > 0
    default = ContextAggregationNet(dilations=[1, 1, 2, 4, 1], channels=6)
    assert (default(x) - x).abs().max() > 0.1
    with pytest.raises(ValueError, match="init"):
        ContextAggregationNet(init="zeros")


def test_xavier_init_is_tf_slims_default():
    torch.manual_seed(0)
    net = ContextAggregationNet(channels=64, init="xavier", normalization="none")  # biases exist without BN
    for conv in [*net.convs, net.output]:
        c_out, c_in, taps = conv.weight.shape
        bound = math.sqrt(6 / (taps * c_in + taps * c_out))  # glorot_uniform, fans as TF counts them
        assert conv.weight.abs().max() <= bound
        if conv.weight.numel() > 1000:  # uniform on [-bound, bound]: std bound/sqrt(3)
            assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    # the untrained authors' network passes far more of its input than PyTorch's default init does
    x = torch.randn(1, 16_000)
    authors = dict(dilations=[2**i for i in range(13)] + [1], bn_eps=1e-3, bn_scale=False, batch_stats_at_eval=True,
                   padding="tf_authors")  # fmt: skip
    with torch.no_grad():
        ratio = {init: (ContextAggregationNet(**authors, init=init).eval()(x).std() / x.std()).item()
                 for init in ("default", "xavier")}  # fmt: skip
    assert ratio["xavier"] > 10 * ratio["default"]
