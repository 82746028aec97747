"""The best checkpoint, also when an epoch's validation metrics arrive while the next epoch trains."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from weakref import proxy

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, for metrics that ``DenoisingSystem`` scores an epoch late.

    With ``system.val_metrics_overlap`` an epoch's PESQ/STOI are scored in worker processes while the
    next epoch trains. At that epoch's validation end this callback writes the model to a hidden
    snapshot (``.epoch_NNN.ckpt.pending``) instead of deciding; when the system merges the scores it
    calls :meth:`on_validation_scores`, and the snapshot becomes the top-k checkpoint under
    ``filename`` if its score ranks (else it is deleted): the same files, chosen on the same numbers,
    as with the scores merged at once. A monitor the system logs at once (``val/loss``) and runs
    without overlap go through ``ModelCheckpoint`` unchanged.

    A run stopped between an epoch's validation and the merge loses that epoch's scores; its leftover
    snapshot is deleted when the run is resumed (that epoch is then no candidate).
    """

    _snapshot: str | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._snapshots: dict[int, str] = {}
        if stage == "fit" and trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for stale in Path(self.dirpath).glob(".*.ckpt.pending"):
                log.warning("deleting %s: its epoch's validation scores were lost when the run stopped", stale)
                stale.unlink()

    def _scores_pending(self, pl_module) -> bool:
        deferred = self.monitor is not None and self.monitor.startswith("val/") and self.monitor != "val/loss"
        return deferred and getattr(pl_module, "_pending_val", None) is not None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._scores_pending(pl_module):
            return super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_snapshot(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._scores_pending(pl_module):
            return super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_snapshot(trainer)

    def _save_snapshot(self, trainer) -> None:
        epoch = trainer.current_epoch
        if self._should_skip_saving_checkpoint(trainer) or epoch in self._snapshots:
            return
        if self._every_n_epochs >= 1 and (epoch + 1) % self._every_n_epochs == 0:
            path = os.path.join(self.dirpath, f".epoch_{epoch:03d}.ckpt.pending")
            trainer.save_checkpoint(path, self.save_weights_only)  # every rank takes part; rank 0 writes
            self._snapshots[epoch] = path

    def on_validation_scores(self, trainer, pl_module, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """``metrics`` (``{"val/enhanced/pesq": ...}``) of ``epoch`` arrived: rank its snapshot."""
        path = self._snapshots.pop(epoch, None)
        if path is None:
            return
        candidates = dict(self._monitor_candidates(trainer))
        candidates.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
        candidates.update(epoch=torch.tensor(epoch), step=torch.tensor(step))
        self._snapshot = path
        try:
            self._save_topk_checkpoint(trainer, candidates)
        finally:
            self._snapshot = None
            if trainer.is_global_zero and os.path.exists(path):
                os.remove(path)  # not among the best

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if self._snapshot is None:
            return super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:  # the scored epoch's model, not the current one, with this callback's new state
            from dfl.audio import atomic_write

            checkpoint = torch.load(self._snapshot, map_location="cpu", weights_only=True)
            checkpoint["callbacks"][self.state_key] = self.state_dict()
            atomic_write(filepath, lambda tmp: torch.save(checkpoint, tmp))
            os.remove(self._snapshot)
        trainer.strategy.barrier("BestCheckpoint")
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
