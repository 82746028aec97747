"""An exponential moving average of the denoiser's weights: what validation, checkpoints and the tested model use."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback

from dfl.checkpoints import WEIGHT_AVERAGE_KEY


class DenoiserWeightAverage(Callback):
    """Keep ``average = decay * average + (1 - decay) * weights`` after every optimiser step.

    Only the denoiser is averaged (its parameters and floating-point buffers, e.g. BN running statistics;
    integer buffers are copied): the frozen loss network, the metric workers and the optimiser are not
    duplicated. The average starts at the weights the fit starts from and spans about ``1 / (1 - decay)``
    steps (0.995: the last ~200).

    - Validation runs on the average (swapped in at each validation epoch's start, swapped back at its end),
      so the best checkpoint is chosen on the averaged model's scores.
    - Checkpoints hold the average as their weights (``state_dict`` and the ``dfl_models`` record that
      ``dfl-eval``/``dfl-denoise`` load) and the training weights under ``dfl_weight_average``: a run resumed
      with ``ckpt_path`` trains on from the training weights with the average restored, as if uninterrupted.
    - When fitting ends the model holds the average.

    Under DDP every rank averages its own (identical) parameters: nothing is communicated.

    Args:
        decay: weight of the old average per step, in [0, 1); 0 keeps the latest weights (no averaging).
    """

    def __init__(self, decay: float = 0.995) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"callbacks.weight_average.decay must be a number in [0, 1), e.g. 0.995; got {decay!r}")
        self.decay = float(decay)
        self.average: dict[str, torch.Tensor] | None = None  # the denoiser's state_dict keys
        self.updates = 0
        self._updated_at_step = -1
        self._swapped = False

    @staticmethod
    def _denoiser(pl_module) -> torch.nn.Module:
        denoiser = getattr(pl_module, "plain_denoiser", None)
        if denoiser is None:
            raise RuntimeError("DenoiserWeightAverage needs a system with a `plain_denoiser` (DenoisingSystem)")
        return denoiser

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._denoiser(pl_module)
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "save_weights_only", False):
                # weights-only saves skip the callbacks' hooks: they would hold the training weights
                raise ValueError(
                    f"callbacks.weight_average cannot write the averaged weights into {type(cb).__name__}'s "
                    "weights-only checkpoints (save_weights_only=true); set it to false or drop the averaging"
                )
        self.average, self.updates, self._updated_at_step, self._swapped = None, 0, -1, False

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.average is None:  # a fresh run, or a resumed one whose checkpoint had no average
            self.average = {k: v.detach().clone() for k, v in self._denoiser(pl_module).state_dict().items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._updated_at_step:  # no optimiser step (gradient accumulation)
            return
        self._updated_at_step = trainer.global_step
        self.updates += 1
        for name, value in self._denoiser(pl_module).state_dict().items():
            average = self.average[name]
            if average.is_floating_point():
                average.lerp_(value.detach(), 1.0 - self.decay)
            else:
                average.copy_(value)

    @torch.no_grad()
    def _swap(self, pl_module) -> None:
        for name, value in self._denoiser(pl_module).state_dict().items():
            held = value.clone()
            value.copy_(self.average[name])
            self.average[name].copy_(held)
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.average is not None and trainer.state.fn == "fit" and not self._swapped:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped and trainer.state.fn == "fit":
            self._swap(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # the model keeps the average from now on; the training weights stay here for checkpoints saved after this
        if self.average is not None and not self._swapped:
            self._swap(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.average is None:
            return
        denoiser = self._denoiser(pl_module)
        swapped = self._swapped  # during validation or after fitting: the model holds the average, self.average the training weights
        prefix = pl_module.denoiser_state_prefix
        training = {}
        for name, value in denoiser.state_dict().items():
            live, other = value.detach().cpu().clone(), self.average[name].detach().cpu().clone()
            averaged, trained = (live, other) if swapped else (other, live)
            checkpoint["state_dict"][prefix + name] = averaged
            training[name] = trained
        checkpoint[WEIGHT_AVERAGE_KEY] = {"decay": self.decay, "updates": self.updates, "training_state_dict": training}

    @torch.no_grad()
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(WEIGHT_AVERAGE_KEY)
        if saved is None or trainer.state.fn != "fit":
            return  # its weights are the model's (and, resuming, the average's start)
        denoiser = self._denoiser(pl_module)
        # the model was loaded from state_dict, which holds the average: keep it, then train on from the training weights
        self.average = {k: v.detach().clone() for k, v in denoiser.state_dict().items()}
        denoiser.load_state_dict(saved["training_state_dict"])
        self.updates = int(saved["updates"])

    def state_dict(self) -> dict:
        return {"decay": self.decay}  # the tensors travel in the checkpoint's own entries (see on_save_checkpoint)

