"""callbacks.DenoiserWeightAverage: the average's value, what validation and checkpoints see, resume."""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks import DenoiserWeightAverage
from dfl.checkpoints import WEIGHT_AVERAGE_KEY, load_model
from tests.conftest import write_pair_tree
from tests.helpers.tiny_training import datamodule, make_system, make_trainer

DECAY = 0.8  # short memory: a few steps of the tiny run move the average visibly


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pair_tree(tmp_path_factory.mktemp("avg") / "pairs", splits=("train", "val"), n=4)


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class RecordWeights(Callback):
    """The denoiser's weights after every optimiser step and at every validation epoch's start."""

    def __init__(self):
        self.steps, self.validated = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(weights(pl_module.plain_denoiser))

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append(weights(pl_module.plain_denoiser))


def moving_average(start: dict, steps: list[dict], decay: float) -> dict:
    average = {k: v.double() if v.is_floating_point() else v for k, v in start.items()}
    for step in steps:
        for k, v in step.items():
            average[k] = decay * average[k] + (1 - decay) * v.double() if v.is_floating_point() else v
    return {k: v.float() if v.is_floating_point() else v for k, v in average.items()}


def assert_weights_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_the_model_after_fitting_is_the_moving_average_of_every_step(tmp_path, data):
    system = make_system()
    start = weights(system.plain_denoiser)
    record, average = RecordWeights(), DenoiserWeightAverage(decay=DECAY)
    make_trainer(tmp_path, 2, [record, average], enable_checkpointing=False).fit(system, datamodule=datamodule(data))
    assert len(record.steps) == 2 * 4
    expected = moving_average(start, record.steps, DECAY)
    assert_weights_close(weights(system.plain_denoiser), expected)
    assert average.updates == 8
    # and not the last step's weights: the average really differs from them
    assert not torch.allclose(expected["convs.0.weight"], record.steps[-1]["convs.0.weight"])


def test_validation_and_checkpoints_hold_the_average_and_training_continues_from_its_own_weights(tmp_path, data):
    system = make_system()
    start = weights(system.plain_denoiser)
    record, average = RecordWeights(), DenoiserWeightAverage(decay=DECAY)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    # the recorder after the averaging callback: it sees what validation runs on
    trainer = make_trainer(tmp_path, 2, [average, record, ckpt], limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(system, datamodule=datamodule(data))
    for epoch, seen in enumerate(record.validated):
        assert_weights_close(seen, moving_average(start, record.steps[: 4 * (epoch + 1)], DECAY))
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    expected = moving_average(start, record.steps, DECAY)
    assert_weights_close({k[len("denoiser."):]: v for k, v in saved["state_dict"].items() if k.startswith("denoiser.")}, expected)
    assert_weights_close(saved["dfl_models"]["denoiser"]["state_dict"], expected)
    assert_weights_close(weights(load_model(tmp_path / "ck" / "last.ckpt", "denoiser")), expected)
    assert_weights_close(saved[WEIGHT_AVERAGE_KEY]["training_state_dict"], record.steps[-1])
    # the step after a validation starts from the training weights, not the average
    assert not torch.allclose(record.steps[4]["convs.0.weight"], record.validated[0]["convs.0.weight"])


def test_resume_matches_an_uninterrupted_run(tmp_path, data):
    full = make_system()
    make_trainer(tmp_path / "full", 4, [DenoiserWeightAverage(decay=DECAY)], enable_checkpointing=False).fit(
        full, datamodule=datamodule(data)
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    make_trainer(tmp_path / "a", 2, [DenoiserWeightAverage(decay=DECAY), ckpt]).fit(make_system(), datamodule=datamodule(data))
    resumed, average = make_system(seed=99), DenoiserWeightAverage(decay=DECAY)  # everything must come from the checkpoint
    make_trainer(tmp_path / "b", 4, [average]).fit(resumed, datamodule=datamodule(data), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert average.updates == 4 * 4
    assert_weights_close(weights(resumed.plain_denoiser), weights(full.plain_denoiser))


def test_bad_settings(tmp_path, data):
    for decay in (1.0, -0.1, "0.9", True):
        with pytest.raises(ValueError, match=r"callbacks.weight_average.decay"):
            DenoiserWeightAverage(decay=decay)
    weights_only = ModelCheckpoint(dirpath=tmp_path / "ck", save_weights_only=True)
    trainer = make_trainer(tmp_path, 1, [DenoiserWeightAverage(), weights_only])
    with pytest.raises(ValueError, match="save_weights_only"):
        trainer.fit(make_system(), datamodule=datamodule(data))


def test_dfl_train_with_the_averaging_checkpoints_and_tests_the_average(tmp_path):
    from tests.test_train import TINY, dfl_train

    run = tmp_path / "run"
    dfl_train(*TINY, f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}",
              "callbacks=[default,weight_average]", "callbacks.weight_average.decay=0.5", "system.lr=1e-2")
    best = next((run / "checkpoints").glob("epoch_*.ckpt"))
    for path in (best, run / "checkpoints" / "last.ckpt"):
        saved = torch.load(path, weights_only=True)
        averaged = {k[len("denoiser."):]: v for k, v in saved["state_dict"].items() if k.startswith("denoiser.")}
        assert_weights_close(saved["dfl_models"]["denoiser"]["state_dict"], averaged)
        training = saved[WEIGHT_AVERAGE_KEY]["training_state_dict"]
        assert not torch.allclose(training["convs.0.weight"], averaged["convs.0.weight"]), path
    assert Path(json.loads((run / "metrics.json").read_text())["checkpoint"]).name == best.name  # tested: the average


def test_resuming_an_averaged_checkpoint_without_the_callback_is_warned(tmp_path, data):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    make_trainer(tmp_path / "a", 1, [DenoiserWeightAverage(decay=DECAY), ckpt]).fit(make_system(), datamodule=datamodule(data))
    with pytest.warns(UserWarning, match=r"callbacks=\[default,weight_average\]"):
        make_trainer(tmp_path / "b", 2, []).fit(make_system(), datamodule=datamodule(data), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
