"""Log a few validation utterances (noisy / enhanced / clean) and their spectrograms to W&B."""

from __future__ import annotations

import logging

import numpy as np
import torch
from lightning.pytorch import Callback

log = logging.getLogger(__name__)

KINDS = ("noisy", "enhanced", "clean")


def spectrogram_image(waves: dict[str, np.ndarray], sample_rate: int, title: str) -> np.ndarray:
    """One RGB image with the noisy / enhanced / clean spectrograms stacked on one colour scale fixed
    relative to the clean reference, with a colour bar (a silent output is labelled, not just black),
    as ``uint8 [H, W, 3]``."""
    import matplotlib.pyplot as plt

    from dfl.spectrogram import spectrogram_figure

    fig = spectrogram_figure(waves, sample_rate, title, width=8.0, panel_height=2.0)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


class WandbMediaLogger(Callback):
    """Each validation epoch (not the sanity check), on rank 0: the first ``n_samples`` validation
    utterances as audio (noisy / enhanced / clean, at most ``max_seconds`` each) and one
    spectrogram image per utterance, logged to every ``WandbLogger`` of the trainer under
    ``val_media/<kind>`` and ``val_media/spectrogram`` at the current global step.
    Without a W&B logger it does nothing (and says so once).
    """

    def __init__(self, n_samples: int = 3, max_seconds: float = 10.0, sample_rate: int = 16_000) -> None:
        if n_samples < 1:
            raise ValueError(f"callbacks.wandb_media.n_samples must be >= 1, got {n_samples}")
        if max_seconds <= 0:
            raise ValueError(f"callbacks.wandb_media.max_seconds must be > 0, got {max_seconds}")
        self.n_samples = int(n_samples)
        self.max_samples = int(max_seconds * sample_rate)
        self.sample_rate = int(sample_rate)
        self._batches: list[tuple[torch.Tensor, torch.Tensor, str]] = []

    @staticmethod
    def _wandb_loggers(trainer) -> list:
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _active(self, trainer) -> bool:
        return trainer.is_global_zero and not trainer.sanity_checking and bool(self._wandb_loggers(trainer))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._batches = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx != 0 or len(self._batches) >= self.n_samples or not self._active(trainer):
            return
        lengths = batch.get("lengths", torch.full((batch["noisy"].shape[0],), batch["noisy"].shape[-1]))
        names = batch.get("names", [f"utt{batch_idx}_{i}" for i in range(batch["noisy"].shape[0])])
        for i in range(batch["noisy"].shape[0]):
            if len(self._batches) >= self.n_samples:
                break
            n = min(int(lengths[i]), self.max_samples)
            self._batches.append((batch["noisy"][i, :n].detach(), batch["clean"][i, :n].detach(), str(names[i])))

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._batches or not self._active(trainer):
            return
        import wandb

        audio: dict[str, list] = {k: [] for k in KINDS}
        images = []
        for noisy, clean, name in self._batches:
            enhanced = pl_module(noisy[None].to(pl_module.device))[0]
            waves = {
                "noisy": noisy.float().cpu().numpy(),
                "enhanced": enhanced.float().cpu().numpy(),
                "clean": clean.float().cpu().numpy(),
            }
            for kind, wave in waves.items():
                peak = float(np.abs(wave).max()) or 1.0  # wandb.Audio needs [-1, 1]
                audio[kind].append(wandb.Audio(wave / max(peak, 1.0), sample_rate=self.sample_rate, caption=name))
            title = f"{name} (epoch {trainer.current_epoch})"
            images.append(wandb.Image(spectrogram_image(waves, self.sample_rate, title), caption=name))
        payload = {f"val_media/{k}": v for k, v in audio.items()}
        payload["val_media/spectrogram"] = images
        for lg in self._wandb_loggers(trainer):
            lg.log_metrics(payload, step=trainer.global_step)
        self._batches = []
