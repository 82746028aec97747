"""Every shipped model, lossnet, loss and experiment config builds the documented network and settings.

The expected values come from the method's documented facts (README, the paper, the authors' release as
described in ../shared/README.md), written as rules (``2**i for i in range(13)``), not copied from the
YAML: a changed dilation, width, slope or layer count in a config that users train is caught here.
The networks are built and their modules inspected, so a config key the code ignored would show too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dfl.hydra_resolvers import CONF_DIR
from dfl.losses import CombinedLoss, FeatureLoss, MultiResolutionSTFTLoss, WaveformL1Loss, WaveformL2Loss
from dfl.models import ContextAggregationNet, LossNetwork
from dfl.models.adaptive_bn import AdaptiveBatchNorm, BatchNorm

# -- the documented facts -------------------------------------------------------------------------
# The paper's context-aggregation network (Germain, Chen & Koltun 2019; docs/training.md "Named configs"): 16 layers,
# a 3-tap conv, 13 dilated 3-tap convs with dilation 2^0 .. 2^12, a 3-tap conv, then a 1x1 output conv;
# 64 channels, adaptive BN, leaky ReLU 0.2, receptive field 16 387 samples (1.02 s at 16 kHz).
PAPER_DILATED = [2**i for i in range(13)]
# The authors' release (se_model.ckpt: se_conv_0..12 with dilations 1..4096, se_conv_last, se_fc_last):
# no first undilated layer; TF-slim BN (beta only, eps 1e-3), batch statistics at inference.
FACTS_MODEL = {
    "can_paper": dict(
        dilations=[1, *PAPER_DILATED, 1], channels=64, kernel=3, slope=0.2, norm=AdaptiveBatchNorm,
        bn_eps=1e-5, bn_gamma=True, batch_stats_at_eval=False, keeps_length_of=[1000, 1001], receptive_field=16387,
    ),
    "can_authors": dict(
        dilations=[*PAPER_DILATED, 1], channels=64, kernel=3, slope=0.2, norm=AdaptiveBatchNorm,
        bn_eps=1e-3, bn_gamma=False, batch_stats_at_eval=True, keeps_length_of=[1000, 1001],
        receptive_field=1 + 2 * (2**13 - 1 + 1),
    ),
}
# The loss network (paper: 15 layers, 14 of them stride 2, the last stride 1; 32 channels doubling every
# 5 layers; BN + leaky ReLU 0.2); the authors' release: 14 layers, same rule, TF-slim BN, batch statistics.
FACTS_LOSSNET = {
    "paper": dict(n_layers=15, base=32, every=5, kernel=3, slope=0.2, bn_eps=1e-5, bn_gamma=True, batch_stats=False),
    "authors": dict(n_layers=14, base=32, every=5, kernel=3, slope=0.2, bn_eps=1e-3, bn_gamma=False, batch_stats=True),
}
# Loss configs (docs/training.md "Named configs" / "Sweeps and loss ablations"): which terms, which layers of which network.
# The MR-STFT resolutions are Parallel WaveGAN's (Yamamoto et al. 2020): FFT 512/1024/2048 with hop 50/120/240
# and window 240/600/1200.
PWG_RESOLUTIONS = {(512, 50, 240), (1024, 120, 600), (2048, 240, 1200)}
ALL = "all"
FACTS_LOSS = {
    "fl": dict(kind=FeatureLoss, layers=ALL, lossnet="paper", balanced=True),
    "fl_all": dict(kind=FeatureLoss, layers=ALL, lossnet="paper", balanced=True),
    "fl_first6": dict(kind=FeatureLoss, layers=6, lossnet="paper", balanced=True),
    "fl_authors": dict(kind=FeatureLoss, layers=6, lossnet="authors", balanced=True),
    "fl_unbalanced": dict(kind=FeatureLoss, layers=ALL, lossnet="paper", balanced=False),
    "fl_random": dict(kind=FeatureLoss, layers=ALL, lossnet="paper", balanced=True, random=True),
    "fl_l1": dict(kind=CombinedLoss, layers=ALL, lossnet="paper", balanced=True, extra={"l1": WaveformL1Loss}),
    "fl_mrstft": dict(kind=CombinedLoss, layers=ALL, lossnet="paper", balanced=True,
                      extra={"mrstft": MultiResolutionSTFTLoss}),
    "l1": dict(kind=WaveformL1Loss),
    "l2": dict(kind=WaveformL2Loss),
    "mrstft": dict(kind=MultiResolutionSTFTLoss),
}


def compose_train(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def shipped(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def build(cfg_node):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loud "random loss network" warning
        return instantiate(cfg_node, _convert_="all")


def test_every_shipped_config_has_its_facts_here():
    """A new config must come with its documented facts (this table), not slip in untested."""
    assert shipped("model") == sorted(FACTS_MODEL)
    assert shipped("lossnet") == sorted(FACTS_LOSSNET)
    assert shipped("loss") == sorted(FACTS_LOSS)
    assert shipped("experiment") == sorted(FACTS_EXPERIMENT)


def check_denoiser(net: ContextAggregationNet, facts: dict, channels: int | None = None) -> None:
    channels = channels or facts["channels"]
    convs = list(net.convs)
    assert [c.dilation[0] for c in convs] == facts["dilations"]
    assert [c.kernel_size[0] for c in convs] == [facts["kernel"]] * len(convs)
    assert [tuple(c.weight.shape[:2]) for c in convs] == [(channels, 1)] + [(channels, channels)] * (len(convs) - 1)
    out = net.output
    assert tuple(out.weight.shape) == (1, channels, 1) and out.bias is not None  # the 1x1 output conv
    for norm in net.norms:
        assert type(norm) is facts["norm"]
        bn = norm.bn if isinstance(norm, AdaptiveBatchNorm) else norm
        assert bn.eps == pytest.approx(facts["bn_eps"]) and (bn.weight is not None) == facts["bn_gamma"]
        assert bn.batch_stats_at_eval == facts["batch_stats_at_eval"]
    assert net.negative_slope == pytest.approx(facts["slope"])
    assert net.receptive_field == facts["receptive_field"]
    net.eval()
    with torch.no_grad():
        for n in facts["keeps_length_of"]:
            assert net(0.1 * torch.randn(1, n)).shape == (1, n)


@pytest.mark.parametrize("name", sorted(FACTS_MODEL))
def test_model_config_builds_the_documented_denoiser(name):
    cfg = compose_train(f"model={name}")
    check_denoiser(build(cfg.model), FACTS_MODEL[name])


def test_can_paper_has_sixteen_layers_and_a_one_second_receptive_field():
    """The documented figures for the default denoiser, from its built modules."""
    net = build(compose_train().model)
    assert len(net.convs) + 1 == 16
    assert net.receptive_field / 16000 == pytest.approx(1.02, abs=0.005)


def test_can_authors_with_the_released_weights_reproduces_the_authors_output(shared_dir):
    """model=can_authors, built from the config, loaded with se_model.ckpt, gives their TF graph's output."""
    import soundfile as sf

    from dfl.tf_import import TFCheckpoint
    from dfl.tf_import.mapping import apply_rules, denoiser_rules

    authors = shared_dir / "reference" / "authors_tf"
    net = build(compose_train("model=can_authors").model)
    apply_rules(TFCheckpoint(authors / "se_model.ckpt"), net, denoiser_rules(net))  # every variable, every shape
    noisy, _ = sf.read(shared_dir / "data" / "vbdmd_sample" / "noisy" / "p287_001.wav", dtype="float32")
    expected, _ = sf.read(authors / "enhanced" / "p287_001.wav", dtype="float64")
    with torch.no_grad():
        ours = net.eval()(torch.from_numpy(noisy)[None])[0].double().numpy()
    snr = 10 * np.log10(np.sum(expected**2) / np.sum((ours - expected) ** 2))
    assert snr > 80, f"{snr:.1f} dB"


def check_lossnet(net: LossNetwork, facts: dict) -> None:
    n = facts["n_layers"]
    assert len(net.convs) == n
    assert [c.stride[0] for c in net.convs] == [2] * (n - 1) + [1]
    assert [c.kernel_size[0] for c in net.convs] == [facts["kernel"]] * n
    widths = [facts["base"] * 2 ** (i // facts["every"]) for i in range(n)]
    assert [c.weight.shape[0] for c in net.convs] == widths
    assert [c.weight.shape[1] for c in net.convs] == [1, *widths[:-1]]
    for norm in net.norms:
        assert type(norm) is BatchNorm
        assert norm.eps == pytest.approx(facts["bn_eps"]) and (norm.weight is not None) == facts["bn_gamma"]
        assert norm.batch_stats_at_eval == facts["batch_stats"]
    assert net.negative_slope == pytest.approx(facts["slope"])


@pytest.mark.parametrize("name", sorted(FACTS_LOSSNET))
def test_lossnet_config_builds_the_documented_loss_network(name):
    cfg = compose_train(f"lossnet={name}")
    check_lossnet(build(cfg.lossnet), FACTS_LOSSNET[name])


def feature_part(loss):
    return loss.feature if isinstance(loss, CombinedLoss) else loss


@pytest.mark.parametrize("name", sorted(FACTS_LOSS))
def test_loss_config_builds_the_documented_loss(name):
    facts = FACTS_LOSS[name]
    cfg = compose_train(f"loss={name}")
    loss = build(cfg.loss)
    assert type(loss) is facts["kind"]
    if "lossnet" in facts:
        fl = feature_part(loss)
        lossnet_facts = FACTS_LOSSNET[facts["lossnet"]]
        check_lossnet(fl.loss_network, lossnet_facts)
        n = lossnet_facts["n_layers"] if facts["layers"] == ALL else facts["layers"]
        assert fl.layers == list(range(n))
        assert fl.weights.tolist() == [1.0] * n  # the balancer sets them; they start equal
        has_balancer = cfg.callbacks.get("loss_weight_balancer") is not None
        assert has_balancer == facts["balanced"]
    if "extra" in facts:
        assert {k: type(v) for k, v in loss.extra.items()} == facts["extra"]
        assert all(w > 0 for w in loss.extra_weights.values())
    stft = [m for m in loss.modules() if isinstance(m, MultiResolutionSTFTLoss)]
    for m in stft:
        inner = m.inner.stft_losses
        assert {(s.fft_size, s.hop_size, s.win_length) for s in inner} == PWG_RESOLUTIONS


def test_fl_random_ignores_a_pretrained_checkpoint(tmp_path):
    """The control stays random even on top of a run that names a pretrained loss network."""
    cfg = compose_train("loss=fl_random", "lossnet.checkpoint=/nonexistent/lossnet.pt")
    loss = build(cfg.loss)  # would fail to load the missing file if the checkpoint reached it
    assert loss.loss_network.pretrained_from is None
    check_lossnet(loss.loss_network, FACTS_LOSSNET["paper"])
    cfg = compose_train("lossnet=authors", "loss=fl_random")
    check_lossnet(build(cfg.loss).loss_network, FACTS_LOSSNET["authors"])


# Experiments (docs/training.md and each experiment's header): the paper's recipe is VoiceBank-DEMAND, can_paper, the
# feature loss over every layer of the paper's loss network, 10 balancing epochs (mean over them), Adam 1e-4,
# batch size 1 whole utterances, 320 epochs; paper_l1/l2 swap the loss. The demo narrows can_paper to 32
# channels and 14 layers (dilations up to 1024: receptive field 4099 samples, 0.26 s), identity init, synthetic
# data in 1-s crops of 4, lr 1e-3, 2 balancing epochs, and validates/checkpoints an average of the weights
# (decay 0.995); the recipes do not.
PAPER_RECIPE = dict(data="voicebank", model="can_paper", channels=64, init="default", batch_size=1, crop=None,
                    lr=1e-4, epochs=320, balance_epochs=10, window="all", lossnet="paper")
FACTS_EXPERIMENT = {
    "paper_fl": dict(PAPER_RECIPE, loss="fl"),
    "paper_l1": dict(PAPER_RECIPE, loss="l1"),
    "paper_l2": dict(PAPER_RECIPE, loss="l2"),
    "demo": dict(data="synthetic", model="can_paper", channels=32, init="identity", batch_size=4, crop=1.0,
                 lr=1e-3, balance_epochs=2, lossnet="paper", loss="fl", weight_average=0.995,
                 model_facts=dict(dilations=[1, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1], receptive_field=4099)),
    "eval_voicebank": dict(eval=True, split="test", data_dir="voicebank", paper_table=True),
    # make demo's last step: the demo's synthetic test split
    "eval_demo": dict(eval=True, split="test", data_dir="synthetic_speech", paper_table=False),
    # the authors' release (senet_train.py; docs/recipes.md): can_authors with TF-slim init, their loss network's
    # first 6 layers, balanced on epoch 10 alone
    "authors_fl": dict(data="voicebank", model="can_authors", channels=64, init="xavier", batch_size=1, crop=None,
                       lr=1e-4, epochs=320, balance_epochs=10, window="last", lossnet="authors", loss="fl_authors"),
}
DATA_TARGET = {"voicebank": "datamodules.PairedFolderDataModule", "synthetic": "datamodules.SyntheticSpeechDataModule"}


@pytest.mark.parametrize("name", sorted(FACTS_EXPERIMENT))
def test_experiment_config_is_the_documented_recipe(name):
    facts = FACTS_EXPERIMENT[name]
    if facts.get("eval"):
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("eval", overrides=[f"experiment={name}", "checkpoint=x.ckpt"])
        assert cfg.split == facts["split"] and cfg.paper_table is facts["paper_table"]
        assert Path(cfg.data_dir).name == facts["data_dir"]
        return
    cfg = compose_train(f"experiment={name}")
    assert cfg.data._target_ == DATA_TARGET[facts["data"]]
    if facts["data"] == "voicebank":
        assert Path(cfg.data.root).name == "voicebank"
    assert cfg.data.batch_size == facts["batch_size"] and cfg.data.crop_seconds == facts["crop"]
    # the denoiser: the model's documented facts, at the experiment's width
    model_facts = dict(FACTS_MODEL[facts["model"]], **facts.get("model_facts", {}))
    net = build(cfg.model)
    check_denoiser(net, model_facts, channels=facts["channels"])
    assert net.config["init"] == facts["init"]
    assert cfg.system.lr == pytest.approx(facts["lr"])
    if "epochs" in facts:
        assert cfg.trainer.max_epochs == facts["epochs"]
    balancer = cfg.callbacks.loss_weight_balancer
    assert balancer.epochs == facts["balance_epochs"]
    assert OmegaConf.select(cfg, "callbacks.weight_average.decay") == facts.get("weight_average")
    if "window" in facts:
        assert balancer.window == facts["window"]
    loss_facts = FACTS_LOSS[facts["loss"]]
    assert cfg.loss._target_.rsplit(".", 1)[1] == loss_facts["kind"].__name__
    if loss_facts["kind"] is FeatureLoss:
        assert cfg.loss.layers == (None if loss_facts["layers"] == ALL else loss_facts["layers"])
        assert cfg.lossnet.n_layers == FACTS_LOSSNET[facts["lossnet"]]["n_layers"]
        lossnet_cfg = {k: v for k, v in cfg.lossnet.items() if k != "checkpoint"}
        check_lossnet(build(dict(lossnet_cfg)), FACTS_LOSSNET[facts["lossnet"]])
