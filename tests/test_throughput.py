"""TrainingThroughput: audio counted without padding, validation time left out of the epoch's clock."""

import types

import pytest
import torch

from callbacks import TrainingThroughput


class FakeModule:
    device = torch.device("cpu")

    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kw):
        self.logged[name] = (value, kw)


def test_throughput_counts_unpadded_audio_and_skips_validation(monkeypatch):
    clock = iter([100.0, 101.0, 104.0, 110.0])  # epoch start, validation start/end, epoch end
    monkeypatch.setattr("callbacks.throughput.time.perf_counter", lambda: next(clock))
    cb, module, trainer = TrainingThroughput(sample_rate=16_000), FakeModule(), types.SimpleNamespace()
    cb.on_train_epoch_start(trainer, module)
    padded = {"noisy": torch.zeros(2, 48_000), "lengths": torch.tensor([48_000, 32_000])}
    cb.on_train_batch_end(trainer, module, None, padded, 0)
    cb.on_train_batch_end(trainer, module, None, {"noisy": torch.zeros(1, 16_000)}, 1)  # no lengths: all of it
    cb.on_validation_start(trainer, module)
    cb.on_validation_end(trainer, module)
    cb.on_train_epoch_end(trainer, module)
    seconds, kw = module.logged["perf/train_seconds"]
    assert seconds == pytest.approx(10.0 - 3.0) and kw["reduce_fx"] == "max"
    speed, kw = module.logged["perf/audio_seconds_per_second"]
    assert speed == pytest.approx((3.0 + 2.0 + 1.0) / 7.0) and kw["reduce_fx"] == "sum"


def test_sanity_check_validation_before_the_epoch_is_not_subtracted(monkeypatch):
    clock = iter([1.0, 2.0])  # epoch start and end only
    monkeypatch.setattr("callbacks.throughput.time.perf_counter", lambda: next(clock))
    cb, module, trainer = TrainingThroughput(), FakeModule(), types.SimpleNamespace()
    cb.on_validation_start(trainer, module)  # Lightning's sanity check, before any epoch: ignored
    cb.on_validation_end(trainer, module)
    cb.on_train_epoch_start(trainer, module)
    cb.on_train_batch_end(trainer, module, None, {"noisy": torch.zeros(1, 32_000)}, 0)
    cb.on_train_epoch_end(trainer, module)
    assert module.logged["perf/train_seconds"][0] == pytest.approx(1.0)
    assert module.logged["perf/audio_seconds_per_second"][0] == pytest.approx(2.0)


def test_bad_sample_rate_is_rejected():
    with pytest.raises(ValueError, match="sample_rate"):
        TrainingThroughput(sample_rate=0)
