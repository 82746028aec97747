"""Freeze the feature-loss layer weights at 1 / (mean per-layer L1) after the first N epochs."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback

log = logging.getLogger(__name__)


class LossWeightBalancer(Callback):
    """The paper's loss-weight balancing.

    For the first ``epochs`` epochs every weight is 1 and the callback keeps the running
    mean of each layer's raw L1 distance (from the training step's ``per_layer`` output).
    At the end of epoch ``epochs`` it sets ``weight_l = 1 / mean_l`` on the system's loss
    and keeps it fixed. ``window="last"`` averages only epoch N (what the authors' code did).

    Sums and counts are all-reduced across DDP ranks, so every rank holds identical weights.
    The state is saved in checkpoints, so a resumed run behaves like an uninterrupted one.
    """

    def __init__(self, epochs: int = 10, window: str = "all", eps: float = 1e-12) -> None:
        if window not in ("all", "last"):
            raise ValueError(f"LossWeightBalancer.window must be 'all' or 'last', got {window!r}")
        if epochs < 1:
            raise ValueError(f"LossWeightBalancer.epochs must be >= 1, got {epochs}")
        self.epochs = int(epochs)
        self.window = window
        self.eps = eps
        self.sums: torch.Tensor | None = None  # float64 sums of raw per-layer distances
        self.count = 0
        self.frozen_weights: torch.Tensor | None = None
        self.frozen_at_epoch: int | None = None

    @staticmethod
    def _loss(pl_module):
        loss = getattr(pl_module, "loss", None)
        if loss is None or not hasattr(loss, "weights"):
            raise RuntimeError("LossWeightBalancer needs a system whose `loss` has per-layer `weights` (FeatureLoss)")
        return loss

    @property
    def frozen(self) -> bool:
        return self.frozen_weights is not None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.frozen:
            return
        if self.window == "last" and trainer.current_epoch == self.epochs - 1:
            self.sums, self.count = None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.frozen or trainer.current_epoch >= self.epochs:
            return
        per_layer = outputs.get("per_layer") if isinstance(outputs, dict) else None
        if per_layer is None or per_layer.numel() == 0:
            return
        values = per_layer.detach().to(torch.float64)  # summed where it is: no GPU sync per step
        self.sums = values.clone() if self.sums is None else self.sums.to(values.device) + values
        self.count += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.frozen or trainer.current_epoch != self.epochs - 1:
            return
        if not hasattr(getattr(pl_module, "loss", None), "weights"):
            log.info("LossWeightBalancer: the loss has no per-layer weights (waveform loss); nothing to balance")
            return
        loss = self._loss(pl_module)
        n = loss.weights.numel()
        sums = self.sums.cpu() if self.sums is not None else torch.zeros(n, dtype=torch.float64)
        packed = torch.cat([sums, torch.tensor([float(self.count)], dtype=torch.float64)])
        packed = pl_module.all_gather(packed.to(pl_module.device)).reshape(-1, n + 1).sum(0).cpu()
        total_sums, total_count = packed[:n], packed[n].item()
        if total_count == 0:
            raise RuntimeError("LossWeightBalancer saw no training batches before freezing the weights")
        means = total_sums / total_count
        weights = (1.0 / means.clamp_min(self.eps)).to(torch.float32)
        self.freeze(loss, weights, trainer.current_epoch + 1)
        for name, w in zip(loss.term_names, weights.tolist()):
            pl_module.log(f"loss_weights/{name}", w, rank_zero_only=True)
        pl_module.log("loss_weights/frozen_at_epoch", float(self.frozen_at_epoch), rank_zero_only=True)
        log.info("Feature-loss weights frozen after epoch %d: %s", self.frozen_at_epoch, weights.tolist())

    def freeze(self, loss, weights: torch.Tensor, epoch: int) -> None:
        self.frozen_weights = weights.clone()
        self.frozen_at_epoch = epoch
        loss.weights.copy_(weights.to(loss.weights.device))

    def on_fit_start(self, trainer, pl_module) -> None:
        # A resumed run: the loss buffer is restored with the model, but re-apply to be sure.
        if self.frozen:
            self._loss(pl_module).weights.copy_(self.frozen_weights.to(pl_module.device))
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and 0 <= max_epochs < self.epochs and hasattr(getattr(pl_module, "loss", None), "weights"):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"trainer.max_epochs={max_epochs} ends the run before the loss-weight balancer freezes the weights "
                f"(after callbacks.loss_weight_balancer.epochs={self.epochs}): every layer keeps weight 1. Lower "
                "callbacks.loss_weight_balancer.epochs or raise trainer.max_epochs."
            )

    def state_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "window": self.window,
            "sums": None if self.sums is None else self.sums.cpu(),
            "count": self.count,
            "frozen_weights": self.frozen_weights,
            "frozen_at_epoch": self.frozen_at_epoch,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.sums = state_dict["sums"]
        self.count = int(state_dict["count"])
        self.frozen_weights = state_dict["frozen_weights"]
        self.frozen_at_epoch = state_dict["frozen_at_epoch"]
