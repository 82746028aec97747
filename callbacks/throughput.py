"""Training throughput per epoch: audio seconds processed per wall-clock second, validation excluded."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback


class TrainingThroughput(Callback):
    """Logs ``perf/train_seconds`` and ``perf/audio_seconds_per_second`` at the end of each training epoch.

    Audio is counted without padding (a batch's ``lengths`` when it has them) at ``sample_rate``.
    The clock runs from the epoch's start to its end, minus the time spent in validation; on CUDA
    the device is synchronised first, so queued work is counted. Under DDP, audio seconds per
    second is the sum over ranks (the job's throughput) and the seconds are the slowest rank's.
    The first epoch also pays for warm-up (cuDNN autotuning, worker start-up): compare later ones.
    """

    def __init__(self, sample_rate: int = 16_000) -> None:
        if sample_rate <= 0:
            raise ValueError(f"TrainingThroughput.sample_rate must be > 0, got {sample_rate}")
        self.sample_rate = sample_rate
        self._start: float | None = None
        self._validation = 0.0
        self._validation_start: float | None = None
        self._samples: int | torch.Tensor = 0

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._validation, self._samples = self._now(pl_module), 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        lengths = batch.get("lengths") if isinstance(batch, dict) else None
        # summed as a tensor where the lengths are: reading a GPU value each step would wait for the device
        self._samples = self._samples + (lengths.sum() if lengths is not None else batch["noisy"].numel())

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._start is not None:
            self._validation_start = self._now(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._validation_start is not None:
            self._validation += self._now(pl_module) - self._validation_start
            self._validation_start = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        samples = int(self._samples)
        if self._start is None or samples == 0:
            return
        seconds = self._now(pl_module) - self._start - self._validation
        self._start = None
        audio = samples / self.sample_rate
        pl_module.log("perf/train_seconds", seconds, sync_dist=True, reduce_fx="max")
        pl_module.log("perf/audio_seconds_per_second", audio / seconds, sync_dist=True, reduce_fx="sum")
