"""A tiny, deterministic feature-loss training used by the balancer tests (and their DDP script)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks import LossWeightBalancer
from datamodules import PairedFolderDataModule
from dfl.losses import FeatureLoss
from dfl.models import ContextAggregationNet, LossNetwork
from dfl.systems import DenoisingSystem


class RecordPerLayer(Callback):
    """Independent record of every raw per-layer distance the training step returned."""

    def __init__(self):
        self.rows: list[tuple[int, list[float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((trainer.current_epoch, outputs["per_layer"].tolist()))


def make_system(seed: int = 0) -> DenoisingSystem:
    torch.manual_seed(seed)
    lossnet = LossNetwork(n_layers=3, base_channels=4)
    denoiser = ContextAggregationNet(dilations=[1, 2, 1], channels=4)
    return DenoisingSystem(denoiser, FeatureLoss(lossnet), lr=1e-2, metrics=[])


def make_trainer(root_dir: Path, max_epochs: int, callbacks, **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root_dir,
        max_epochs=max_epochs,
        accelerator=kw.pop("accelerator", "cpu"),
        logger=kw.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=kw.pop("limit_val_batches", 0),
        callbacks=callbacks,
        **kw,
    )


def datamodule(root: Path, batch_size: int = 1) -> PairedFolderDataModule:
    return PairedFolderDataModule(root, batch_size=batch_size, crop_seconds=0.25, num_workers=0, seed=0)


if __name__ == "__main__":  # DDP: python -m tests.helpers.tiny_training DATA OUT
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    L.seed_everything(0)
    record, balancer = RecordPerLayer(), LossWeightBalancer(epochs=2)
    trainer = make_trainer(out, 3, [balancer, record], devices=2, strategy="ddp", enable_checkpointing=False)
    system = make_system()
    trainer.fit(system, datamodule=datamodule(data))
    (out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"weights": system.loss.weights.tolist(), "rows": record.rows})
    )
