"""Save ``checkpoints/last.ckpt`` when the run is stopped by SIGTERM (SLURM pre-emption, ``kill``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnSigterm(Callback):
    """On SIGTERM, Lightning finishes the current training batch and raises ``SIGTERMException``
    on every rank (rank 0's signal is broadcast); this callback then writes the full training
    state (model, optimizer, balancer, loop progress) to ``dirpath/filename`` atomically (temporary
    file + rename) and the process exits with status 0. Resume with
    ``hydra.run.dir=<the run> ckpt_path=last``.

    On SLURM with auto-requeue Lightning itself checkpoints and requeues on the requeue signal
    (SIGUSR1 by default, ``#SBATCH --signal=SIGUSR1@90``); this covers a plain SIGTERM.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        merge = getattr(pl_module, "merge_pending_val_scores", None)
        if merge is not None:  # the last epoch's scores, still in the metric workers: into this checkpoint's record
            merge()
        tmp = self.path.with_name(f".{self.path.name}.sigterm.tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)  # every rank takes part; only rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
            log.warning(
                "SIGTERM: saved %s at epoch %d, step %d; resume with ckpt_path=last in the same run directory",
                self.path, trainer.current_epoch, trainer.global_step,
            )
