"""The system's validation and test metrics are dfl.metrics of (reference=clean, estimate=output) per file.

Computed here directly from the files, independently of the system and the datamodule, then compared
with what the system logs: swapped reference and estimate (PESQ, STOI and SNR are
asymmetric), a metric of the wrong signal, or files mixed up between noisy and clean would all differ.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules import PairedFolderDataModule
from dfl.losses import WaveformL1Loss
from dfl.metrics import compute_many
from dfl.systems import DenoisingSystem
from tests.helpers.metric_signals import noisy_version, speech_like

SR = 16000
METRICS = ["pesq", "stoi", "si_sdr", "snr"]
ASYMMETRIC = ["pesq", "stoi", "snr"]  # SI-SDR is symmetric: cos² / sin² of the angle between the signals


class Smoother(torch.nn.Module):
    """A fixed 'denoiser' (a 5-tap low-pass): an output unlike both the noisy input and the clean target."""

    def __init__(self) -> None:
        super().__init__()
        self.taps = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1]))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv1d(wav[:, None], self.taps.view(1, 1, -1), padding=2)[:, 0]


def write_split(root: Path, prefix: str, seeds: list[int]) -> None:
    for kind in ("noisy", "clean"):
        (root / f"{prefix}_{kind}").mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        clean = speech_like(1.5 + 0.25 * i, SR, seed=seed)
        sf.write(root / f"{prefix}_clean/f{i}.wav", clean, SR, subtype="FLOAT")
        sf.write(root / f"{prefix}_noisy/f{i}.wav", noisy_version(clean, 5.0, seed=seed + 100), SR, subtype="FLOAT")


def expected_means(root: Path, prefix: str) -> dict[str, float]:
    """Mean over files of every metric, computed here from the files: (clean, output) and (clean, noisy)."""
    rows = []
    for clean_path in sorted((root / f"{prefix}_clean").glob("*.wav")):
        clean = sf.read(clean_path, dtype="float32")[0].astype(np.float64)
        noisy32 = sf.read(root / f"{prefix}_noisy" / clean_path.name, dtype="float32")[0]
        with torch.no_grad():
            enhanced = Smoother()(torch.from_numpy(noisy32)[None])[0].numpy().astype(np.float64)
        row = {f"enhanced/{k}": v for k, v in compute_many(METRICS, clean, enhanced, SR).items()}
        row.update({f"noisy/{k}": v for k, v in compute_many(METRICS, clean, noisy32.astype(np.float64), SR).items()})
        rows.append(row)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_pairs")
    write_split(root, "valset", [1, 2])
    write_split(root, "testset", [3, 4, 5])
    return root


def test_the_metrics_here_tell_reference_from_estimate(tree):
    """Swapping reference and estimate changes PESQ, STOI and SNR (so the test below sees a swap)."""
    clean = sf.read(tree / "testset_clean/f0.wav", dtype="float32")[0].astype(np.float64)
    noisy = sf.read(tree / "testset_noisy/f0.wav", dtype="float32")[0].astype(np.float64)
    with torch.no_grad():
        enhanced = Smoother()(torch.from_numpy(noisy).float()[None])[0].double().numpy()
    right, swapped = compute_many(METRICS, clean, enhanced, SR), compute_many(METRICS, enhanced, clean, SR)
    for name in ASYMMETRIC:
        assert abs(right[name] - swapped[name]) > 1e-3 * max(1.0, abs(right[name])), name


@pytest.mark.parametrize("stage", ["val", "test"])
def test_logged_metrics_are_dfl_metrics_of_clean_and_output(tree, stage, tmp_path):
    system = DenoisingSystem(Smoother(), WaveformL1Loss(), metrics=METRICS)
    dm = PairedFolderDataModule(tree, batch_size=1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    (trainer.validate if stage == "val" else trainer.test)(system, datamodule=dm)
    logged = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
    expected = expected_means(tree, {"val": "valset", "test": "testset"}[stage])
    assert set(expected) <= set(logged)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    # the output is really scored, not the input: the smoothing moved these metrics (STOI barely)
    for name in ("pesq", "si_sdr", "snr"):
        assert expected[f"enhanced/{name}"] != pytest.approx(expected[f"noisy/{name}"], rel=1e-3), name
