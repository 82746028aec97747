"""DenoisingSystem: a non-finite training loss stops the run with an error naming the batch."""

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks import LossWeightBalancer
from dfl.losses import WaveformL1Loss as L1Loss
from dfl.models import ContextAggregationNet
from dfl.systems import DenoisingSystem
from tests.conftest import write_pair_tree
from tests.helpers.tiny_training import datamodule, make_system, make_trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pair_tree(tmp_path_factory.mktemp("nan") / "pairs", splits=("train", "val"), n=6)


class PoisonBatch(Callback):
    """Puts a NaN into the noisy input of one batch; records every batch that ran."""

    def __init__(self, epoch: int, batch: int):
        self.at, self.ran = (epoch, batch), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            batch["noisy"][0, 10] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ran.append((trainer.current_epoch, batch_idx))


def test_nan_loss_on_the_cpu_stops_at_that_batch(tmp_path, data):
    poison = PoisonBatch(epoch=1, batch=2)
    trainer = make_trainer(tmp_path, 3, [poison], enable_checkpointing=False)
    with pytest.raises(FloatingPointError, match=r"training loss became nan at epoch 1, batch 2") as err:
        trainer.fit(make_system(), datamodule=datamodule(data))
    assert poison.ran[-1] == (1, 1)  # raised inside batch 2's step: its end never came
    assert "lower system.lr (now 0.01)" in str(err.value)  # the setting's real name


@pytest.mark.parametrize("log_every, last_ran", [(2, (1, 3)), (50, (1, 5))], ids=["every_2_steps", "epoch_end"])
def test_nan_loss_on_a_gpu_is_read_in_batches_but_names_its_batch(tmp_path, data, monkeypatch, log_every, last_ran):
    # Reading a GPU loss waits for the device: the losses are read every log_every_n_steps and at
    # the epoch's last batch. Here the CPU plays the GPU.
    monkeypatch.setattr(DenoisingSystem, "_reading_waits_for_device", staticmethod(lambda t: True))
    poison, balancer = PoisonBatch(epoch=1, batch=2), LossWeightBalancer(epochs=2)
    trainer = make_trainer(tmp_path, 3, [poison, balancer], enable_checkpointing=True, log_every_n_steps=log_every)
    with pytest.raises(FloatingPointError, match=r"training loss became nan at epoch 1, batch 2"):
        trainer.fit(make_system(), datamodule=datamodule(data))
    assert poison.ran[-1] == last_ran
    # stopped before the epoch ended: the balancer never froze NaN weights, no checkpoint of epoch 1
    assert balancer.frozen_at_epoch is None
    assert not list(tmp_path.rglob("epoch=1*.ckpt"))


def test_finite_losses_are_all_read_and_nothing_is_held(tmp_path, data, monkeypatch):
    monkeypatch.setattr(DenoisingSystem, "_reading_waits_for_device", staticmethod(lambda t: True))
    system = make_system()
    make_trainer(tmp_path, 2, [], enable_checkpointing=False, log_every_n_steps=4).fit(system, datamodule=datamodule(data))
    assert system._unchecked_losses == []
    assert system.trainer.global_step == 12


def test_per_layer_terms_reach_the_logger_on_its_steps_with_their_values(tmp_path, data):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from tests.helpers.tiny_training import RecordPerLayer

    record, system = RecordPerLayer(), make_system()
    logger = CSVLogger(tmp_path, name="", version="")
    trainer = make_trainer(tmp_path, 2, [record], enable_checkpointing=False, log_every_n_steps=4, logger=logger)
    trainer.fit(system, datamodule=datamodule(data))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    names = [f"train/feature/{n}" for n in system.loss.term_names]
    assert [int(r["step"]) for r in rows] == [3, 7, 11]  # 12 steps, written every 4th
    for r in rows:  # each written step has every term, with that step's own values
        assert [float(r[n]) for n in names] == pytest.approx(record.rows[int(r["step"])][1], rel=1e-6)


def test_adam_is_fused_on_the_cpu_with_the_same_updates():
    import torch

    from dfl.systems.denoising import adam

    system = make_system()
    optimizer = system.configure_optimizers()
    assert optimizer.defaults["fused"] is True
    params = [p for p in system.denoiser.parameters() if p.requires_grad]
    assert [p for group in optimizer.param_groups for p in group["params"]] == params
    # three steps of the fused update against PyTorch's per-tensor loop, from the same start and gradients
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = []
    for fused in (True, False):
        ps = [p.clone().requires_grad_() for p in start]
        opt = adam(ps, lr=1e-2, weight_decay=1e-3) if fused else torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3)
        assert bool(opt.defaults["fused"]) is fused
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        results.append(ps)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0][0], start[0])  # it moved
    meta = torch.zeros(2, device="meta", requires_grad=True)
    assert not adam([meta], lr=1e-3).defaults["fused"]  # where PyTorch has no fused kernel: the loop


# messages that name the setting and say what to do (issue 26.7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr="abc"), r"system.lr='abc': expected a number >= 0, e.g. system.lr=1e-4"),
        (dict(lr=-1.0), r"system.lr=-1.0: expected a number >= 0"),
        (dict(lr=float("nan")), r"system.lr=nan"),
        (dict(weight_decay="x"), r"system.weight_decay='x': expected a number >= 0"),
        (dict(betas=[0.9]), r"system.betas=\[0.9\]: expected two numbers"),
        (dict(betas=[0.9, 1.5]), r"system.betas=\[0.9, 1.5\]: each must be in \[0, 1\)"),
        (dict(metrics=["pesq", "mosnet"]), r"system.metrics: unknown metric 'mosnet'; valid: .*dnsmos \(= dnsmos_sig/"),
    ],
)
def test_bad_system_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenoisingSystem(ContextAggregationNet(dilations=[1], channels=4), L1Loss(), **kwargs)


def test_bad_lr_from_the_command_line_names_the_setting():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from dfl.run_setup import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["system.lr=abc"])
    with pytest.raises(Exception, match=r"system.lr='abc': expected a number >= 0"):
        instantiate(cfg.system, denoiser=ContextAggregationNet(dilations=[1], channels=4), loss=L1Loss())


def test_metric_families_expand():
    system = DenoisingSystem(ContextAggregationNet(dilations=[1], channels=4), L1Loss(), metrics=["pesq", "dnsmos"])
    assert system.metric_names == ["pesq", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"]
    assert list(system.hparams.metrics) == system.metric_names  # what checkpoints record


def validating_trainer(root, checkpoint, **kw):
    return L.Trainer(default_root_dir=root, max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_train_batches=2, num_sanity_val_steps=0,
                     callbacks=[checkpoint], **kw)


def test_pesq_undefined_for_every_validation_file_is_a_clear_error(tmp_path, data):
    silent = write_pair_tree(tmp_path / "silent", splits=("train", "val"), n=2)
    for clean in (silent / "valset_clean").glob("*.wav"):
        sf.write(clean, np.zeros(8000, np.float32), 16_000, subtype="FLOAT")  # PESQ: no utterance to score
    torch.manual_seed(0)
    system = DenoisingSystem(ContextAggregationNet(dilations=[1, 2, 1], channels=4), L1Loss(), metrics=["pesq", "si_sdr"])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/enhanced/pesq", mode="max")
    trainer = validating_trainer(tmp_path, checkpoint)
    with pytest.raises(ValueError, match="pesq is undefined for every validation file") as err:
        trainer.fit(system, datamodule=datamodule(silent))
    message = str(err.value)
    assert "ModelCheckpoint has no val/enhanced/pesq to monitor" in message
    assert "all zeros" in message and "(2 files)" in message and "callbacks.model_checkpoint.monitor=" in message


def test_monitoring_a_metric_that_is_not_computed_is_a_clear_error(tmp_path, data):
    torch.manual_seed(0)
    system = DenoisingSystem(ContextAggregationNet(dilations=[1, 2, 1], channels=4), L1Loss(), metrics=["si_sdr"])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/enhanced/pesq", mode="max")
    trainer = validating_trainer(tmp_path, checkpoint, limit_val_batches=1)
    with pytest.raises(ValueError, match=r"does not compute pesq; add it to system.metrics"):
        trainer.fit(system, datamodule=datamodule(data))


class RecordLearningRate(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_decays_to_zero_over_the_run_when_cosine(tmp_path, data, schedule):
    record = RecordLearningRate()
    system = make_system()
    system.hparams.lr_schedule = schedule
    make_trainer(tmp_path, 2, [record], enable_checkpointing=False).fit(system, datamodule=datamodule(data))
    steps = len(record.lrs)
    assert steps == 12  # 6 training pairs, batch 1, 2 epochs
    if schedule == "constant":
        assert record.lrs == [0.01] * steps
    else:  # one step of the cosine per optimiser step: 0.01 at the start, half-way at the middle, → 0 at the end
        expected = [0.005 * (1 + np.cos(np.pi * k / steps)) for k in range(steps)]
        assert record.lrs == pytest.approx(expected, rel=1e-6)


def test_an_unknown_lr_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match=r"system.lr_schedule must be one of \('constant', 'cosine'\), got 'linear'"):
        DenoisingSystem(ContextAggregationNet(dilations=[1], channels=4), L1Loss(), lr_schedule="linear")
