"""Loss-network pretraining: DCASE 2016 acoustic scene classification + domestic audio tagging."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dfl.checkpoints import model_record
from dfl.metrics.eer import EqualErrorRate

MODES = ("alternate", "mixed")
TASKS = ("scene", "tags")
LR_SCHEDULES = ("constant", "cosine")


@torch.no_grad()
def reestimate_bn_statistics(net: nn.Module, clips: Callable[[], Iterable[torch.Tensor]]) -> int:
    """Set every BN layer's running statistics of a :class:`~dfl.models.LossNetwork` to those of ``clips``.

    Training leaves running statistics that are an exponential average over the last few batches
    (momentum 0.1: about ten), and the frozen feature loss then normalises with them. This replaces
    them, layer by layer, with the mean and (unbiased) variance of that layer's conv output over every
    frame of every clip, as the network in evaluation mode computes it: layer ``l`` is measured with
    layers ``0 … l−1`` already normalised by their new statistics, so the result is exactly what the
    exported network sees (one pass over the clips per layer). Each clip runs whole and alone.
    Parameters never change; the network's mode is restored.

    Args:
        net: a ``LossNetwork`` (``convs``, ``norms``, ``strides``, ``kernel_size``, ``negative_slope``).
        clips: returns a fresh iterable of 1-D waveforms each time it is called (one call per layer).

    Returns:
        The number of clips used (0 leaves the statistics as they were).
    """
    from dfl.models.padding import tf_same_padding

    was_training = net.training
    net.eval()
    n_clips = 0
    try:
        for layer, norm in enumerate(net.norms):
            if not isinstance(getattr(norm, "running_mean", None), torch.Tensor):
                continue  # no normalisation in this layer
            frames, total, total_sq, n_clips = 0, 0.0, 0.0, 0
            for clip in clips():
                x = torch.as_tensor(clip, dtype=torch.float32).reshape(1, 1, -1)
                for conv, upstream, s in zip(net.convs[: layer + 1], net.norms, net.strides):
                    z = conv(F.pad(x, tf_same_padding(x.shape[-1], net.kernel_size, s)))
                    x = F.leaky_relu(upstream(z), net.negative_slope)
                z = z[0].to(torch.float64)  # [channels, frames] of this layer's conv output
                frames += z.shape[1]
                total, total_sq = total + z.sum(1), total_sq + z.square().sum(1)
                n_clips += 1
            if not frames:
                return 0
            mean = total / frames
            var = (total_sq / frames - mean.square()).clamp_min(0) * (frames / max(frames - 1, 1))
            norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
            norm.running_var.copy_(var.to(norm.running_var.dtype))
    finally:
        net.train(was_training)
    return n_clips


class PretrainSystem(L.LightningModule):
    """A :class:`~dfl.models.LossNetwork` trunk with a ``scene`` head (softmax cross-entropy)
    and a ``tags`` head (sigmoid binary cross-entropy), trained together with Adam.

    ``mode="alternate"`` (the authors' scheme): each step receives ``{"scene": batch,
    "tags": batch}`` and makes one optimiser update per task in turn.
    ``mode="mixed"``: each batch mixes both tasks' examples (``is_scene``/``is_tags``
    flags); one update on the weighted sum of both losses.

    ``optimizer_per_task`` (default: on in alternate mode): each task updates the network with its own
    Adam (its own moment estimates), as the authors' ``lossnet_train.py`` did; off, both tasks share one.

    ``lr_schedule``: ``constant`` (the authors) or ``cosine`` decay to 0 over the run.

    Logged: ``train|val/{scene_loss,tags_loss}``, ``val/scene_acc``, ``val/tags_eer_<tag>``
    per tag, ``val/tags_eer_mean`` (DCASE 2016 task 4) and ``val/score`` =
    (scene accuracy + 1 − mean EER) / 2, which checkpoint selection maximises.
    """

    def __init__(
        self,
        net: nn.Module,
        mode: str = "alternate",
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        scene_weight: float = 1.0,
        tags_weight: float = 1.0,
        grad_clip: float | None = None,
        lr_schedule: str = "constant",
        tag_names: Sequence[str] = ("c", "m", "f", "v", "p", "b", "o"),
        optimizer_per_task: bool | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"system.mode must be one of {MODES}, got {mode!r}")
        if optimizer_per_task is None:
            optimizer_per_task = mode == "alternate"
        if optimizer_per_task and mode != "alternate":
            raise ValueError("system.optimizer_per_task=true needs system.mode=alternate (one update per task)")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"system.lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        heads = getattr(net, "heads", {})
        for head in ("scene", "tags"):
            if head not in heads:
                raise ValueError(
                    f"the loss network needs a {head!r} head (net.heads), it has {sorted(heads)}"
                )
        n_scenes, n_tags = heads["scene"].out_channels, heads["tags"].out_channels
        if n_tags != len(tag_names):
            raise ValueError(f"net.heads.tags has {n_tags} outputs but there are {len(tag_names)} tag names")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.mode = mode
        self.tasks = TASKS if optimizer_per_task else ("shared",)
        self.tag_names = list(tag_names)
        self.automatic_optimization = False  # alternate = two updates per step; one code path for both
        self.train_acc = MulticlassAccuracy(num_classes=n_scenes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n_scenes, average="micro")
        self.val_eer = EqualErrorRate(num_labels=n_tags)
        self.val_scene_loss, self.val_tags_loss = MeanMetric(), MeanMetric()
        # The latest validation's metrics (floats) and the global step it ran at.
        self.last_val_metrics: dict[str, float] = {}
        self.last_val_step: int | None = None

    def forward(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head logits ``{"scene": [batch, 15], "tags": [batch, 7]}`` for ``[batch, time]`` audio."""
        return self.net.classify(wav)

    # -- losses -------------------------------------------------------------------------------
    def _losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-task mean losses over the examples of that task in the batch, and the logits."""
        logits = self(batch["wav"])
        losses = {}
        if batch["is_scene"].any():
            sel = batch["is_scene"]
            losses["scene"] = F.cross_entropy(logits["scene"][sel], batch["scene"][sel])
        if batch["is_tags"].any():
            sel = batch["is_tags"]
            losses["tags"] = F.binary_cross_entropy_with_logits(logits["tags"][sel], batch["tags"][sel])
        return losses, logits

    def _weighted(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = {"scene": self.hparams.scene_weight, "tags": self.hparams.tags_weight}
        return sum(weights[task] * loss for task, loss in losses.items())

    def _optimizer_index(self, losses: dict[str, torch.Tensor]) -> int:
        return self.tasks.index(next(iter(losses))) if len(self.tasks) > 1 else 0

    def _update(self, loss: torch.Tensor, index: int = 0) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite pretraining loss {loss.item()} at step {self.global_step}")
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        opt = optimizers[index] if isinstance(optimizers, list) else optimizers
        scheduler = schedulers[index] if isinstance(schedulers, list) else schedulers
        opt.zero_grad(set_to_none=True)  # the other task's head keeps None grads: Adam skips it
        self.manual_backward(loss)
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        if scheduler is not None:
            scheduler.step()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if ("wav" in batch) == (self.mode == "alternate"):
            raise ValueError(
                f"system.mode={self.mode} does not match the data's batches "
                f"({'one mixed batch' if 'wav' in batch else 'one batch per task'}); set data.mode to the same mode"
            )
        batches = list(batch.values()) if self.mode == "alternate" else [batch]
        for b in batches:
            losses, logits = self._losses(b)
            self._update(self._weighted(losses), self._optimizer_index(losses))
            n = len(b["wav"])
            for task, loss in losses.items():
                self.log(f"train/{task}_loss", loss.detach(), batch_size=n, prog_bar=True)
            if "scene" in losses:
                sel = b["is_scene"]
                self.train_acc(logits["scene"][sel].detach(), b["scene"][sel])
                self.log("train/scene_acc", self.train_acc, batch_size=int(sel.sum()))

    def configure_optimizers(self):
        # One Adam per task (the authors) or one shared; each over every parameter, since the other
        # task's head gets no gradient (None) and Adam leaves it alone.
        optimizers = [
            torch.optim.Adam(
                self.net.parameters(),
                lr=self.hparams.lr,
                betas=tuple(self.hparams.betas),
                weight_decay=self.hparams.weight_decay,
            )
            for _ in self.tasks
        ]
        if self.hparams.lr_schedule == "constant":
            return optimizers if len(optimizers) > 1 else optimizers[0]
        # cosine decay to 0 over each optimiser's updates (alternate mode: two per step, one per task)
        updates = self.trainer.max_steps
        if updates is None or updates < 0:
            updates = self.trainer.estimated_stepping_batches * (2 if self.mode == "alternate" else 1)
        updates = int(updates) // len(optimizers)
        return [
            {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, updates))}
            for opt in optimizers
        ]

    # -- validation ---------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        losses, logits = self._losses(batch)
        if "scene" in losses:
            sel = batch["is_scene"]
            self.val_acc.update(logits["scene"][sel], batch["scene"][sel])
            self.val_scene_loss.update(losses["scene"], weight=int(sel.sum()))
        if "tags" in losses:
            sel = batch["is_tags"]
            self.val_eer.update(logits["tags"][sel], batch["tags"][sel])
            self.val_tags_loss.update(losses["tags"], weight=int(sel.sum()))

    def on_validation_epoch_end(self) -> None:
        metrics = {}
        if self.val_acc.update_count:
            metrics["val/scene_acc"] = self.val_acc.compute()
            metrics["val/scene_loss"] = self.val_scene_loss.compute()
        if self.val_eer.update_count:
            eer = self.val_eer.compute()
            undefined = [t for t, e in zip(self.tag_names, eer.tolist()) if math.isnan(e)]
            if undefined and not self.trainer.sanity_checking:
                warnings.warn(
                    f"tagging EER undefined for tag(s) {undefined}: the validation split lacks positive "
                    "or negative examples of them; val/tags_eer_mean averages the other tags",
                    stacklevel=1,
                )
            for tag, value in zip(self.tag_names, eer):
                metrics[f"val/tags_eer_{tag}"] = value
            metrics["val/tags_eer_mean"] = eer.nanmean() if len(undefined) < len(eer) else eer.mean()
            metrics["val/tags_loss"] = self.val_tags_loss.compute()
        if "val/scene_acc" in metrics and "val/tags_eer_mean" in metrics:
            metrics["val/score"] = (metrics["val/scene_acc"] + 1 - metrics["val/tags_eer_mean"]) / 2
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()})
        if not self.trainer.sanity_checking:
            self.last_val_metrics = {k: float(v) for k, v in metrics.items()}
            self.last_val_step = self.global_step
        for metric in (self.val_acc, self.val_eer, self.val_scene_loss, self.val_tags_loss):
            metric.reset()

    # -- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A plain record so `dfl-train lossnet.checkpoint=last.ckpt` rebuilds the network safely.
        checkpoint["dfl_models"] = {"lossnet": model_record("lossnet", self.net, {"tags": self.tag_names})}
