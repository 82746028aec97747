"""CombinedLoss, the MR-STFT loss, and every loss-ablation config instantiates and behaves."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from callbacks import LossWeightBalancer
from dfl.losses import CombinedLoss, FeatureLoss, MultiResolutionSTFTLoss, WaveformL1Loss, WaveformL2Loss
from dfl.models import LossNetwork
from dfl.run_setup import CONF_DIR, instantiate_group
from tests.helpers.tiny_training import RecordPerLayer, datamodule, make_trainer

SMALL_STFT = dict(fft_sizes=[256, 512], hop_sizes=[64, 128], win_lengths=[256, 400])


def signals(batch=2, n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(batch, n, generator=g) * 0.1
    return clean + 0.05 * torch.randn(batch, n, generator=g), clean


def test_mrstft_matches_auraloss_and_is_zero_for_identical_signals():
    from auraloss.freq import MultiResolutionSTFTLoss as Aura

    est, ref = signals()
    loss = MultiResolutionSTFTLoss(**SMALL_STFT)
    total, terms = loss(est, ref)
    expected = Aura(**SMALL_STFT)(est[:, None], ref[:, None])
    torch.testing.assert_close(total, expected)
    assert terms.numel() == 0 and total > 0
    assert loss(ref, ref)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_mrstft_gradient_flows_and_padding_is_masked():
    est, ref = signals(batch=2, n=4000)
    lengths = torch.tensor([4000, 2500])
    padded_est, padded_ref = est.clone(), ref.clone()
    padded_est[1, 2500:] = 3.0  # garbage in the padding must not matter
    padded_ref[1, 2500:] = 0.0
    loss = MultiResolutionSTFTLoss(**SMALL_STFT)
    padded_est.requires_grad_(True)
    total, _ = loss(padded_est, padded_ref, lengths=lengths)
    one_by_one = (loss(est[:1], ref[:1])[0] + loss(est[1:, :2500], ref[1:, :2500])[0]) / 2
    torch.testing.assert_close(total, one_by_one)
    total.backward()
    assert padded_est.grad[0].abs().sum() > 0 and padded_est.grad[1, 2500:].abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs, setting",
    [(dict(fft_sizes=[512], hop_sizes=[128, 64], win_lengths=[512]), "loss.fft_sizes"),
     (dict(fft_sizes=[256], hop_sizes=[64], win_lengths=[400]), "loss.win_lengths")],
)
def test_mrstft_bad_settings_are_clear_errors(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        MultiResolutionSTFTLoss(**kwargs)


def feature_loss(seed=0):
    torch.manual_seed(seed)
    return FeatureLoss(LossNetwork(n_layers=3, base_channels=4))


def test_combined_loss_is_feature_plus_weighted_extras():
    est, ref = signals()
    fl = feature_loss()
    fl.weights.copy_(torch.tensor([2.0, 0.5, 1.5]))
    combined = CombinedLoss(fl, {"l1": {"loss": WaveformL1Loss(), "weight": 10.0}, "l2": {"loss": WaveformL2Loss()}})
    total, per_layer = combined(est, ref)
    fl_total, fl_layers = fl(est, ref)
    l1 = (est - ref).abs().mean()
    l2 = ((est - ref) ** 2).mean()
    torch.testing.assert_close(total, fl_total + 10.0 * l1 + 1.0 * l2)
    torch.testing.assert_close(per_layer, fl_layers)
    assert combined.weights is fl.weights and combined.term_names == ["layer_0", "layer_1", "layer_2"]
    assert combined.loss_network is fl.loss_network
    torch.testing.assert_close(combined.last_extra["l1"], l1)


def test_combined_loss_passes_lengths_to_every_term():
    est, ref = signals(n=3000)
    lengths = torch.tensor([3000, 2000])
    est[1, 2000:] = 0.0
    fl = feature_loss()
    combined = CombinedLoss(fl, {"l1": {"loss": WaveformL1Loss(), "weight": 3.0}})
    total, _ = combined(est, ref, lengths=lengths)
    expected = fl(est, ref, lengths=lengths)[0] + 3.0 * WaveformL1Loss()(est, ref, lengths=lengths)[0]
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize(
    "feature, extra, match",
    [(WaveformL1Loss(), None, "loss.feature"),
     (None, {"l1": {"weight": 1.0}}, "loss.extra.l1"),
     (None, {"l1": {"loss": WaveformL1Loss(), "weight": -1.0}}, "loss.extra.l1.weight")],
)
def test_combined_loss_bad_settings_are_clear_errors(feature, extra, match):
    with pytest.raises(ValueError, match=match):
        CombinedLoss(feature if feature is not None else feature_loss(), extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.conftest import write_pair_tree

    return write_pair_tree(tmp_path_factory.mktemp("abl") / "pairs", splits=("train", "val"), n=4)


def test_balancer_balances_the_feature_part_of_a_combined_loss(tmp_path, data):
    from dfl.models import ContextAggregationNet
    from dfl.systems import DenoisingSystem

    torch.manual_seed(0)
    loss = CombinedLoss(feature_loss(), {"l1": {"loss": WaveformL1Loss(), "weight": 5.0}})
    system = DenoisingSystem(ContextAggregationNet(dilations=[1, 2, 1], channels=4), loss, lr=1e-2, metrics=[])
    record, balancer = RecordPerLayer(), LossWeightBalancer(epochs=1)
    make_trainer(tmp_path, 2, [balancer, record], enable_checkpointing=False).fit(system, datamodule=datamodule(data))
    first_epoch = torch.tensor([v for e, v in record.rows if e == 0], dtype=torch.float64)
    torch.testing.assert_close(loss.weights, (1.0 / first_epoch.mean(0)).float())
    assert balancer.frozen_at_epoch == 1 and loss.extra_weights == {"l1": 5.0}


def test_balancer_leaves_a_waveform_loss_alone(tmp_path, data):
    from dfl.models import ContextAggregationNet
    from dfl.systems import DenoisingSystem

    torch.manual_seed(0)
    system = DenoisingSystem(ContextAggregationNet(dilations=[1, 2, 1], channels=4), MultiResolutionSTFTLoss(**SMALL_STFT), metrics=[])
    balancer = LossWeightBalancer(epochs=1)
    make_trainer(tmp_path, 2, [balancer], enable_checkpointing=False).fit(system, datamodule=datamodule(data))
    assert not balancer.frozen and system.global_step == 8


# -- configs ------------------------------------------------------------------------------------
SMALL_LOSSNET = ["lossnet.n_layers=7", "lossnet.base_channels=2"]


def compose_train(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(
    "name, cls, n_layers",
    [("l1", WaveformL1Loss, 0), ("l2", WaveformL2Loss, 0), ("fl", FeatureLoss, 7), ("fl_all", FeatureLoss, 7),
     ("fl_first6", FeatureLoss, 6), ("fl_unbalanced", FeatureLoss, 7), ("fl_random", FeatureLoss, 7),
     ("fl_l1", CombinedLoss, 7), ("fl_mrstft", CombinedLoss, 7), ("mrstft", MultiResolutionSTFTLoss, 0)],
)
def test_every_loss_config_instantiates(name, cls, n_layers):
    cfg = compose_train(f"loss={name}", *SMALL_LOSSNET)
    loss = instantiate(cfg.loss, _convert_="all")
    assert type(loss) is cls
    assert len(getattr(loss, "term_names", [])) == n_layers
    est, ref = signals(batch=1, n=6000)
    total, per_layer = loss(est, ref)
    assert torch.isfinite(total) and per_layer.numel() == n_layers


def test_layers_k_selects_the_first_k_layers():
    loss = instantiate(compose_train("loss=fl", "loss.layers=3", *SMALL_LOSSNET).loss, _convert_="all")
    assert loss.layers == [0, 1, 2]


def test_fl_unbalanced_drops_the_balancer_and_keeps_the_other_callbacks(tmp_path):
    cfg = compose_train("loss=fl_unbalanced", f"paths.output_dir={tmp_path}", *SMALL_LOSSNET)
    callbacks = instantiate_group(cfg.callbacks)
    assert not any(isinstance(c, LossWeightBalancer) for c in callbacks)
    assert {type(c).__name__ for c in callbacks} >= {"ModelCheckpoint", "CheckpointOnSigterm"}
    assert any(isinstance(c, LossWeightBalancer) for c in instantiate_group(compose_train("loss=fl", f"paths.output_dir={tmp_path}").callbacks))


def test_fl_random_ignores_a_given_checkpoint(tmp_path):
    cfg = compose_train("loss=fl_random", f"lossnet.checkpoint={tmp_path / 'does_not_exist.ckpt'}", *SMALL_LOSSNET)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        loss = instantiate(cfg.loss, _convert_="all")
    assert loss.loss_network.pretrained_from is None and loss.loss_network.n_layers == 7
    # the same override with the normal feature loss does load (and fails on the missing file)
    with pytest.raises(Exception, match="does_not_exist"):
        instantiate(compose_train("loss=fl", f"lossnet.checkpoint={tmp_path / 'does_not_exist.ckpt'}").loss)
