"""The LightningModule that trains a denoiser with a (feature) loss and validates it with PESQ/STOI/SI-SDR."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch import nn

from dfl.checkpoints import WEIGHT_AVERAGE_KEY, model_record
from dfl.losses.masking import zero_padding

DEFAULT_METRICS = ("pesq", "stoi", "si_sdr")
LR_SCHEDULES = ("constant", "cosine")

log = logging.getLogger(__name__)


def adam(params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam, fused (one kernel for all parameters) where PyTorch has it: float parameters on CPU or CUDA.

    Same update as the per-tensor loop; on a CPU it takes ~0.5 ms a step instead of ~3.5 for ``can_paper``.
    """
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def _positive_number(setting: str, value, example: str, zero_ok: bool = False) -> float:
    """``value`` as a float, or a ValueError naming ``setting`` (e.g. ``system.lr=abc``)."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if ok and np.isfinite(value) and (value > 0 or (zero_ok and value == 0)):
        return float(value)
    need = "a number >= 0" if zero_ok else "a positive number"
    raise ValueError(f"{setting}={value!r}: expected {need}, e.g. {setting}={example}")


class DenoisingSystem(L.LightningModule):
    """Denoiser + loss (+ its frozen loss network), Adam, and quality metrics.

    Batches are dicts with ``noisy`` and ``clean`` ``[batch, time]`` tensors (and
    ``lengths``). Validation/test batches are whole utterances; metrics are computed per
    utterance with :mod:`dfl.metrics`, gathered from every DDP rank by utterance id and
    averaged over the distinct utterances (:mod:`dfl.systems.scoring`: exact for any world size).
    The unprocessed noisy input is scored once, under ``<stage>/noisy/*``, so the improvement is
    visible next to ``<stage>/enhanced/*``.

    The metrics run in ``metric_workers`` worker processes (:class:`~dfl.metric_pool.MetricPool`;
    None: this host's cores shared by its training processes, one left to each; 0: in this process)
    while the model runs on the next utterances (on a GPU; on the CPU, whose cores the model takes, once
    it has run on the whole split). ``val_metrics_overlap`` (with workers, while fitting): an
    epoch's scores are also left to the workers while the next epoch trains (on the CPU on one thread fewer
    per worker until they are done), and merged at the next
    validation's start or when fitting ends; they are then logged at the epoch and step they belong to, and
    :class:`~callbacks.BestCheckpoint` decides on that epoch's snapshot (the same best checkpoint as
    without overlap). Without it they are merged at the end of the epoch, before it is logged and
    checkpointed. ``val_metrics_every_n_epochs``: validation epochs whose number + 1 is a
    multiple of it compute the metrics; the others the loss only. ``cpu_kernels``: training and
    validation run the denoiser and the loss through :func:`dfl.kernels.accelerate` (the same results,
    faster on the CPU); False runs the plain modules. ``lr_schedule``: ``constant`` (the paper) or
    ``cosine`` decay to 0 over the run's optimiser steps.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        loss: nn.Module,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        metrics: Sequence[str] = DEFAULT_METRICS,
        sample_rate: int = 16_000,
        compile: bool = False,
        val_metrics: Sequence[str] | None = None,
        val_metrics_every_n_epochs: int = 1,
        metric_workers: int | None = None,
        val_metrics_overlap: bool = True,
        cpu_kernels: bool = True,
        lr_schedule: str = "constant",
    ) -> None:
        from dfl.kernels import accelerate
        from dfl.metrics import expand_metric_names

        super().__init__()
        lr = _positive_number("system.lr", lr, "1e-4", zero_ok=True)  # 0: evaluate without learning
        weight_decay = _positive_number("system.weight_decay", weight_decay, "0.0", zero_ok=True)
        if not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"system.betas={betas!r}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")
        betas = [_positive_number("system.betas", b, "[0.9, 0.999]", zero_ok=True) for b in betas]
        if not all(b < 1 for b in betas):
            raise ValueError(f"system.betas={list(betas)}: each must be in [0, 1), e.g. [0.9, 0.999]")
        metrics = expand_metric_names(metrics, "system.metrics")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"system.lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if val_metrics_every_n_epochs < 1:
            raise ValueError(f"system.val_metrics_every_n_epochs must be >= 1, got {val_metrics_every_n_epochs}")
        self.save_hyperparameters(ignore=["denoiser", "loss"])
        self.hparams.update(lr=lr, weight_decay=weight_decay, betas=betas, metrics=metrics)
        self.denoiser = torch.compile(denoiser) if compile else denoiser
        self.loss = loss
        # What training and validation run: dfl.kernels' fast modules where they apply, sharing the parameters,
        # kept out of the module tree (state_dict, hooks) like the plain modules' aliases they are.
        self.__dict__["_run_denoiser"] = accelerate(self.denoiser) if cpu_kernels else self.denoiser
        self.__dict__["_run_loss"] = accelerate(loss) if cpu_kernels else loss
        self.metric_names = list(metrics)
        # validation's metrics (None: the same as the test's); [] validates the loss alone
        self.val_metric_names = (
            self.metric_names if val_metrics is None else expand_metric_names(val_metrics, "system.val_metrics")
        )
        self._epoch_records: dict[str, list[dict]] = {}  # per stage: every rank's records of the last epoch
        self._noisy_scored: set[str] = set()
        self._records: dict[str, list[dict]] = {}  # per stage: this rank's per-utterance results (dfl.systems.scoring)
        self._scoring: dict[str, list] = {}  # per stage: futures of per-utterance metric records (dfl.metric_pool)
        self._held_jobs: dict[str, list] = {}  # per stage: metric jobs for the workers once the model is done (CPU)
        self._metric_pool = None
        self._pending_val: dict | None = None  # an epoch's validation scores still in the workers (val_metrics_overlap)
        self._cores = None  # dfl.metric_pool.CoreShare: training's threads while the workers score (CPU)
        self.evaluated_utterances: dict[str, int] = {}  # per stage: distinct utterances in the last epoch's means
        self._unchecked_losses: list[tuple[int, torch.Tensor]] = []  # (batch, loss) not yet read: see _check_finite
        self._written_step = True  # this step's values go to the loggers: see _loggers_write_this_step

    @property
    def plain_denoiser(self) -> nn.Module:
        return getattr(self.denoiser, "_orig_mod", self.denoiser)

    @property
    def denoiser_state_prefix(self) -> str:
        """The prefix of the plain denoiser's entries in this system's state_dict (torch.compile adds ``_orig_mod.``)."""
        return "denoiser._orig_mod." if self.plain_denoiser is not self.denoiser else "denoiser."

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return self._run_denoiser(noisy)

    # -- training -----------------------------------------------------------------------------
    def _loss(self, enhanced: torch.Tensor, clean: torch.Tensor, lengths: torch.Tensor | None, padded: bool | None = None):
        """The loss with the padding of variable-length batches masked out.

        The denoiser's output beyond each utterance's length is zeroed (it is padding, and a
        convolutional net fills it with non-zero values), and ``lengths`` goes to the loss.
        ``padded`` comes with dfl's batches (``collate_pairs``); without it the lengths are looked
        at, which on a GPU waits for the device.
        """
        if padded is None:
            padded = lengths is not None and not bool((lengths >= enhanced.shape[-1]).all())
        if lengths is None or not padded:
            return self._run_loss(enhanced, clean)  # no padding: every loss works
        if "lengths" not in inspect.signature(self.loss.forward).parameters:
            raise ValueError(
                f"loss {type(self.loss).__name__} cannot mask the padding of variable-length batches "
                "(its forward has no `lengths`); use data.batch_size=1 or data.crop_seconds"
            )
        return self._run_loss(zero_padding(enhanced, lengths), clean, lengths=lengths)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        enhanced = self(batch["noisy"])
        total, per_layer = self._loss(enhanced, batch["clean"], batch.get("lengths"), batch.get("padded"))
        self._check_finite(total, batch_idx)
        bs = batch["noisy"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        self._written_step = self._loggers_write_this_step()
        if self._written_step:
            for name, value in zip(getattr(self.loss, "term_names", []), per_layer):
                self.log(f"train/feature/{name}", value, batch_size=bs)
        return {"loss": total, "per_layer": per_layer.detach()}

    def _loggers_write_this_step(self) -> bool:
        """Whether Lightning writes this training step's values to the loggers (its `log_every_n_steps` rule).

        Each `self.log` costs about half a millisecond of host time, and step values logged between
        writes are dropped, so the per-layer terms are logged only on the steps that are written.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        every = trainer.log_every_n_steps
        written = every > 0 and (self.global_step + 1) % every == 0
        return written or trainer.should_stop or bool(trainer.fast_dev_run)

    # A non-finite loss stops training with an error naming the batch. Reading a GPU loss waits for
    # the device (CONTRIBUTING: no waits in a GPU step), so there the losses are read on the steps
    # Lightning writes to the loggers (it waits then anyway) and with the epoch's last batch, before
    # the balancer or a checkpoint sees the epoch.
    @staticmethod
    def _reading_waits_for_device(t: torch.Tensor) -> bool:
        return t.device.type != "cpu"

    def _check_finite(self, total: torch.Tensor, batch_idx: int) -> None:
        self._unchecked_losses.append((batch_idx, total.detach()))
        if not self._reading_waits_for_device(total):
            self._read_unchecked_losses()

    def _read_unchecked_losses(self) -> None:
        if not self._unchecked_losses:
            return
        values = torch.stack([v.float() for _, v in self._unchecked_losses]).cpu()
        batches = [b for b, _ in self._unchecked_losses]
        self._unchecked_losses = []
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise FloatingPointError(
                f"training loss became {values[i].item()} at epoch {self.current_epoch}, batch {batches[i]}; "
                f"lower system.lr (now {self.hparams.lr}) or check the data"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        trainer = self._trainer
        last = trainer is not None and batch_idx + 1 >= trainer.num_training_batches
        if self._written_step or last:
            self._read_unchecked_losses()
        if self._pending_val is not None and self._cores is not None and self._cores.yielded:
            self._cores.update(self._pending_val["futures"])  # scores done: threads back (merged at the next validation)

    def on_train_epoch_end(self) -> None:
        self._read_unchecked_losses()

    def configure_optimizers(self):
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        optimizer = adam(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay)
        if self.hparams.get("lr_schedule", "constant") == "constant":
            return optimizer
        # cosine decay to 0 over the run's optimiser steps (max_epochs × batches, or max_steps); a run that
        # trainer.max_time stops early ends above 0
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ---------------------------------------------------------------------------
    def _utterance_ids(self, batch: dict, batch_idx: int) -> list[str]:
        """The ids results are gathered by: the datamodule's ``names`` (unique within a split).

        Batches without names get ids unique to this rank and batch: nothing is deduplicated then, so a
        padded distributed sampler's repeats would count (every dfl datamodule names its utterances).
        """
        names = batch.get("names")
        if names is not None:
            return [str(n) for n in names]
        return [f"rank{self.global_rank}/batch{batch_idx}/{i}" for i in range(batch["noisy"].shape[0])]

    def _metrics_due(self, stage: str) -> bool:
        if stage != "val" or self._trainer is None or self.trainer.sanity_checking:
            return True
        return (self.current_epoch + 1) % self.hparams.val_metrics_every_n_epochs == 0

    def _pool(self):
        if self._metric_pool is None:
            from dfl.metric_pool import CoreShare, MetricPool, default_workers

            workers = self.hparams.metric_workers
            if workers is None:  # this host's cores shared by its training processes, one left to each
                local = getattr(self._trainer, "num_devices", 1) if self._trainer is not None else 1
                workers = default_workers(local)
            self._metric_pool = MetricPool(int(workers))
            self._cores = CoreShare(self._metric_pool.num_workers)
        return self._metric_pool

    def _share_cores(self, futures: list) -> None:
        """On the CPU, training runs on the cores the metric workers leave while they score ``futures``."""
        if self.device.type == "cpu" and self._cores is not None:
            self._cores.update(futures)

    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        from dfl.metric_pool import score_utterance

        noisy, clean = batch["noisy"], batch["clean"]
        enhanced = self(noisy)
        total, _ = self._loss(enhanced, clean, batch.get("lengths"), batch.get("padded"))
        ids = self._utterance_ids(batch, batch_idx)
        self._records.setdefault(stage, []).append({"id": "batch:" + "|".join(ids), "loss": float(total), "n": len(ids)})
        if not self._metrics_due(stage):
            return
        lengths = batch.get("lengths", torch.full((noisy.shape[0],), noisy.shape[-1]))
        kinds = {"enhanced": enhanced} if stage in self._noisy_scored else {"enhanced": enhanced, "noisy": noisy}
        # the model takes every core of a CPU: the workers start when it is done (_release_held_jobs); the
        # held copies stay float32 (half the memory; the same float64 values once converted)
        hold = self.device.type == "cpu" and self._pool().num_workers > 0
        dtype = np.float32 if hold else np.float64
        as_numpy = lambda t, i, n: t[i, :n].float().cpu().numpy().astype(dtype)  # noqa: E731 (a copy)
        names = self.val_metric_names if stage == "val" else self.metric_names
        for i, uid in enumerate(ids) if names else ():
            n = int(lengths[i])
            job = (uid, as_numpy(clean, i, n), {k: as_numpy(x, i, n) for k, x in kinds.items()},
                   names, self.hparams.sample_rate)
            if hold:
                self._held_jobs.setdefault(stage, []).append(job)
            else:  # scored in a worker while this process runs the model on the next utterances
                self._scoring.setdefault(stage, []).append(self._pool().submit(score_utterance, job))

    def _release_held_jobs(self, stage: str) -> None:
        from dfl.metric_pool import score_utterance

        futures = self._scoring.setdefault(stage, [])
        for uid, clean, estimates, names, sample_rate in self._held_jobs.pop(stage, []):
            job = (uid, clean.astype(np.float64), {k: x.astype(np.float64) for k, x in estimates.items()},
                   names, sample_rate)
            futures.append(self._pool().submit(score_utterance, job))

    def _log_epoch_means(self, stage: str, futures: list | None = None) -> dict[str, float]:
        """Wait for this rank's metrics, gather every rank's records, drop repeated utterances, log one
        mean per metric (the same on all ranks). ``futures``: this stage's metric futures (default: all
        pending ones; ``[]`` logs the loss alone)."""
        from dfl.metric_pool import result

        futures = self._scoring.pop(stage, []) if futures is None else futures
        try:
            scores = [result(f) for f in futures]
        finally:
            self._reclaim_cores()  # the workers are done with this stage
        results = self._merge(stage, self._records.pop(stage, []) + scores)
        for key, value in results.items():
            # identical on every rank already: their mean is the value itself
            self.log(f"{stage}/{key}", value, batch_size=1, sync_dist=True)
        return results

    def _merge(self, stage: str, mine: list[dict]) -> dict[str, float]:
        from dfl.systems.scoring import gather_records, means, unique_by_id

        records = unique_by_id(gather_records(mine))
        self._epoch_records[stage] = records
        self.evaluated_utterances[stage] = sum(1 for r in records if "values" in r)
        return means(records)

    # -- validation scores that overlap the next epoch's training (val_metrics_overlap) ---------------
    def _overlaps_training(self) -> bool:
        trainer = self._trainer
        if not (self.hparams.get("val_metrics_overlap", False) and trainer is not None and trainer.state.fn == "fit"
                and not trainer.sanity_checking and self._pool().num_workers > 0):
            return False
        # a callback that reads a metric at the epoch's end (Lightning's ModelCheckpoint, EarlyStopping) needs it then
        return all(
            hasattr(cb, "on_validation_scores") for cb in trainer.callbacks
            if isinstance(getattr(cb, "monitor", None), str) and cb.monitor.startswith("val/") and cb.monitor != "val/loss"
        )

    def _defer_val_scores(self) -> None:
        """Log the validation loss now; leave the metrics to the workers while the next epoch trains."""
        self._log_epoch_means("val", futures=[])
        # the step Lightning logs this validation's loss at (the loggers' x axis), not global_step
        step = getattr(self.trainer.fit_loop.epoch_loop, "_batches_that_stepped", self.global_step)
        self._pending_val = {"epoch": self.current_epoch, "step": step, "futures": self._scoring.pop("val", [])}
        self._share_cores(self._pending_val["futures"])  # the next epoch trains on the cores the workers leave

    def _reclaim_cores(self) -> None:
        if self._cores is not None:
            self._cores.reclaim()

    def merge_pending_val_scores(self) -> dict[str, float] | None:
        """Wait for a deferred epoch's scores, log them at that epoch's step, hand them to the checkpoint
        callbacks (``on_validation_scores``). Every rank calls this at the same point (a collective gather)."""
        from dfl.metric_pool import result

        pending, self._pending_val = self._pending_val, None
        if pending is None:
            return None
        try:
            mine = [result(f) for f in pending["futures"]]
        finally:
            self._reclaim_cores()
        results = {f"val/{k}": v for k, v in self._merge("val", mine).items() if k != "loss"}
        if self.global_rank == 0:
            log.info("validation metrics of epoch %d, scored after it ended: %s", pending["epoch"],
                     ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        records = self._epoch_records.get("val", [])
        self._check_monitored_metrics(records)
        self._noisy_scored.add("val")
        trainer = self.trainer
        for logger in trainer.loggers:
            logger.log_metrics({**results, "epoch": pending["epoch"]}, step=pending["step"])
        # the progress bar and callbacks that read them (EarlyStopping: one epoch late)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in results.items()})
        for cb in trainer.callbacks:
            hook = getattr(cb, "on_validation_scores", None)
            if hook is not None:
                hook(trainer, self, pending["epoch"], pending["step"], results)
        return results

    def on_train_end(self) -> None:
        self.merge_pending_val_scores()  # the last validation's: before the best checkpoint is tested

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def on_validation_epoch_start(self) -> None:
        self.merge_pending_val_scores()  # the previous epoch's, scored while this one trained
        self._records["val"], self._scoring["val"], self._held_jobs["val"] = [], [], []

    def on_test_epoch_start(self) -> None:
        self._records["test"], self._scoring["test"], self._held_jobs["test"] = [], [], []

    def on_validation_epoch_end(self) -> None:
        self._release_held_jobs("val")
        scored = self._metrics_due("val")
        if scored and self.val_metric_names and self._overlaps_training():
            self._defer_val_scores()
            return
        self._log_epoch_means("val")
        if scored and not self.trainer.sanity_checking:
            self._check_monitored_metrics(self._epoch_records.get("val", []))
            self._noisy_scored.add("val")

    def _check_monitored_metrics(self, records: list[dict]) -> None:
        """A metric that a callback monitors but no validation file could be scored with is a clear error.

        (Otherwise ModelCheckpoint / EarlyStopping fail with "could not find the monitored key".) ``records``
        are every rank's, so every rank decides the same.
        """
        from dfl.metrics import MetricFailure

        monitored = {
            cb.monitor: type(cb).__name__ for cb in self.trainer.callbacks
            if isinstance(getattr(cb, "monitor", None), str) and cb.monitor.startswith("val/enhanced/")
        }
        for key in sorted(monitored):
            name = key.rsplit("/", 1)[1]
            values = [r["values"].get(f"enhanced/{name}") for r in records if "values" in r]
            count = sum(1 for v in values if v is not None and not isinstance(v, MetricFailure))
            missing: dict[str, int] = {}
            for v in values:
                if isinstance(v, MetricFailure):
                    missing[v.reason] = missing.get(v.reason, 0) + 1
            if name not in self.val_metric_names:
                setting = "system.metrics" if self.hparams.get("val_metrics") is None else "system.val_metrics"
                raise ValueError(
                    f"{monitored[key]} monitors {key}, but {setting}={self.val_metric_names} does not compute "
                    f"{name}; add it to {setting} or monitor another metric (e.g. val/enhanced/"
                    f"{self.val_metric_names[0] if self.val_metric_names else 'pesq'} or val/loss)"
                )
            if count == 0:
                reasons = "; ".join(f"{r} ({n} files)" for r, n in missing.items()) or "no files"
                raise ValueError(
                    f"{name} is undefined for every validation file, so {monitored[key]} has no {key} to monitor "
                    f"(reasons: {reasons}). Check the validation data (silent or very short files?), or monitor "
                    "another metric, e.g. callbacks.model_checkpoint.monitor=val/loss callbacks.model_checkpoint.mode=min"
                )

    def on_test_epoch_end(self) -> None:
        self._release_held_jobs("test")
        self._log_epoch_means("test")
        self._noisy_scored.add("test")

    def teardown(self, stage: str) -> None:
        self._pending_val = None  # scores of an interrupted fit (merged ones were logged)
        self._held_jobs.clear()
        self._reclaim_cores()
        if self._metric_pool is not None:  # after fit / test, and after an exception
            self._metric_pool.close()
            self._metric_pool = None

    # -- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain records so `dfl-denoise --model last.ckpt` rebuilds the network safely; the weights are the
        # checkpoint's (a callback may have put others there, e.g. callbacks.DenoiserWeightAverage's average).
        prefix = self.denoiser_state_prefix
        weights = {k: checkpoint["state_dict"][prefix + k] for k in self.plain_denoiser.state_dict()}
        records = {"denoiser": model_record("denoiser", self.plain_denoiser, state_dict=weights)}
        lossnet = getattr(self.loss, "loss_network", None)
        if lossnet is not None and hasattr(lossnet, "config"):
            records["lossnet"] = model_record("lossnet", lossnet)
        checkpoint["dfl_models"] = records
        checkpoint["dfl_noisy_scored"] = sorted(self._noisy_scored)  # a resumed run does not rescore them

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._noisy_scored |= set(checkpoint.get("dfl_noisy_scored", []))
        trainer = self._trainer
        if WEIGHT_AVERAGE_KEY in checkpoint and trainer is not None and trainer.state.fn == "fit" and not any(
            type(cb).__name__ == "DenoiserWeightAverage" for cb in trainer.callbacks
        ):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                "this checkpoint's weights are an average (callbacks.weight_average); without that callback training "
                "goes on from the average, not from the weights it was training. Add callbacks=[default,weight_average] "
                "to resume as if uninterrupted."
            )
