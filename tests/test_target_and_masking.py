"""The training target is the clean signal (not the noisy one), and the padding of batches is masked.

Independent of the other guards (tests/test_bucketing.py): these go through ``DenoisingSystem`` and, for the
target, through a whole Lightning fit on files.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules import PairedFolderDataModule
from datamodules.paired_folder import collate_pairs
from dfl.losses import FeatureLoss, WaveformL1Loss, WaveformL2Loss
from dfl.models import ContextAggregationNet, LossNetwork
from dfl.systems import DenoisingSystem

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


class Gain(torch.nn.Module):
    """y = g·x: the least-squares g for clean = c·noisy is c."""

    def __init__(self, g: float = 1.0) -> None:
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(g))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.g * wav


def test_training_step_compares_the_output_with_clean():
    gen = torch.Generator().manual_seed(0)
    noisy, clean = torch.randn(2, 400, generator=gen), torch.randn(2, 400, generator=gen)
    system = DenoisingSystem(Gain(0.5), WaveformL1Loss(), metrics=[])
    batch = {"noisy": noisy, "clean": clean, "lengths": torch.tensor([400, 400])}
    loss = system.training_step(batch, 0)["loss"]
    torch.testing.assert_close(loss, (0.5 * noisy - clean).abs().mean())
    # not the noisy input (0.5·|noisy|), not the clean one through the model (0.5·|clean|)
    assert not torch.isclose(loss, (0.5 * noisy - noisy).abs().mean())
    assert not torch.isclose(loss, (0.5 * clean - clean).abs().mean())


def _scaled_pairs(root: Path, factor: float) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for kind in ("noisy", "clean"):
            (root / f"{split}set_{kind}").mkdir(parents=True, exist_ok=True)
        for i in range(4):
            noisy = (0.2 * rng.standard_normal(1200 + 300 * i)).astype(np.float32)
            sf.write(root / f"{split}set_noisy/u{i}.wav", noisy, 16000, subtype="FLOAT")
            sf.write(root / f"{split}set_clean/u{i}.wav", factor * noisy, 16000, subtype="FLOAT")
    return root


@pytest.mark.parametrize("data", [dict(batch_size=1), dict(batch_size=2, crop_seconds=0.05),
                                  dict(batch_size=3, bucket=True)], ids=["whole", "crops", "buckets"])
def test_training_on_files_learns_the_clean_target(tmp_path, data):
    """clean = 0.3·noisy in the files: a gain trained through the datamodule and Trainer converges to 0.3
    (1.0 would mean it learned the noisy input, 1/0.3 that noisy and clean were swapped)."""
    root = _scaled_pairs(tmp_path / "pairs", 0.3)
    system = DenoisingSystem(Gain(1.0), WaveformL2Loss(), lr=0.05, metrics=[])
    trainer = L.Trainer(accelerator="cpu", max_epochs=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(system, datamodule=PairedFolderDataModule(root, seed=0, **data))
    assert system.denoiser.g.item() == pytest.approx(0.3, abs=0.02)


def _padded_batch(lengths: list[int], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    items = [{"noisy": 0.2 * torch.randn(n, generator=gen), "clean": 0.2 * torch.randn(n, generator=gen),
              "length": n, "name": f"u{i}"} for i, n in enumerate(lengths)]
    return collate_pairs(items)


def _system(loss) -> DenoisingSystem:
    torch.manual_seed(0)
    # One hidden layer, no normalisation: each utterance is processed on its own, and the valid outputs see
    # only zeros beyond the end, as alone (deeper nets would carry the padding's activations inwards, an
    # edge effect of any padded batch); the biases write non-zero values into the padding.
    denoiser = ContextAggregationNet(dilations=[1], channels=8, normalization="none")
    return DenoisingSystem(denoiser, loss, metrics=[])


def _step(system: DenoisingSystem, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    system.zero_grad()
    out = system.training_step(batch, 0)
    out["loss"].backward()
    return out["loss"].detach(), out["per_layer"], [p.grad.clone() for p in system.denoiser.parameters()]


@pytest.mark.parametrize("loss", ["feature", "l1"])
def test_a_padded_batch_trains_like_its_utterances_one_by_one(loss):
    """Loss terms and gradients of a zero-padded batch = the mean over its utterances taken alone.

    Even lengths keep the loss network's first layer on the same sampling grid (tf SAME padding), where
    batched and alone agree exactly; the padding, which the denoiser fills with its bias, must not count.
    """
    torch.manual_seed(1)
    if loss == "feature":
        lossnet = LossNetwork(n_layers=2, base_channels=4)
        with torch.no_grad():  # running statistics away from 0/1
            for norm in lossnet.norms:
                norm.running_mean.normal_(0, 0.1), norm.running_var.uniform_(0.5, 2)
        loss_fn = FeatureLoss(lossnet, layers=[0])
    else:
        loss_fn = WaveformL1Loss()
    system = _system(loss_fn)
    lengths = [900, 600, 350 * 2]
    batch = _padded_batch(lengths)
    assert batch["padded"] and batch["noisy"].shape[-1] == 900
    with torch.no_grad():
        assert system.denoiser(batch["noisy"])[1, 600:].abs().min() > 0  # the padding is filled
    batched_loss, batched_terms, batched_grads = _step(system, batch)
    alone = [_step(system, {"noisy": batch["noisy"][i : i + 1, :n], "clean": batch["clean"][i : i + 1, :n],
                            "lengths": torch.tensor([n]), "padded": False}) for i, n in enumerate(lengths)]
    torch.testing.assert_close(batched_loss, torch.stack([t for t, _, _ in alone]).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(batched_terms, torch.stack([t for _, t, _ in alone]).mean(0), rtol=1e-5, atol=0)
    for j, g in enumerate(batched_grads):
        torch.testing.assert_close(g, torch.stack([grads[j] for _, _, grads in alone]).mean(0), rtol=1e-4, atol=1e-7)
