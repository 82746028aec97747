"""A short real training through `dfl-train` improves the denoiser: the loss falls and SI-SDR rises.

Generated data (speech-like utterances in white noise at 0 dB), a narrowed identity-initialised ``can_paper``
and the waveform L2 loss, whose optimum is the SNR-best estimate, so ~100 steps give several dB. About a
minute on two CPU cores; marked ``slow`` (``make test-full`` runs it, ``make test`` does not).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO
from tests.helpers.metric_signals import noisy_version, speech_like

pytestmark = pytest.mark.slow


def write_data(root: Path) -> Path:
    for split, n, seed in (("train", 24, 0), ("val", 3, 100), ("test", 4, 200)):
        for kind in ("noisy", "clean"):
            (root / f"{split}set_{kind}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            clean = speech_like(1.0 + 0.1 * (i % 5), seed=seed + i)
            noisy = noisy_version(clean, 0.0, seed=seed + i + 1000)
            sf.write(root / f"{split}set_clean/u{i}.wav", clean, 16000, subtype="FLOAT")
            sf.write(root / f"{split}set_noisy/u{i}.wav", noisy, 16000, subtype="FLOAT")
    return root


def test_short_training_lowers_the_loss_and_raises_si_sdr(tmp_path):
    data = write_data(tmp_path / "data")
    run = tmp_path / "run"
    overrides = [
        f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", "data=paired_folder", f"data.root={data}",
        "data.num_workers=0", "data.crop_seconds=0.25", "data.batch_size=4",
        "model.dilations=[1,2,4,8,16,1]", "model.channels=16", "model.init=identity",
        "loss=l2", "system.lr=2e-3", "trainer.max_epochs=16", "trainer.check_val_every_n_epoch=4",
        "trainer.log_every_n_steps=1", "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "dfl.cli.train", *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses, val_si_sdr = defaultdict(list), {}
    for row in rows:
        if row.get("train/loss"):
            losses[int(row["epoch"])].append(float(row["train/loss"]))
        if row.get("val/enhanced/si_sdr"):
            val_si_sdr[int(row["epoch"])] = float(row["val/enhanced/si_sdr"])
    epoch_loss = [np.mean(losses[e]) for e in sorted(losses)]
    assert len(epoch_loss) == 16
    # the loss falls: each quarter of the training below the one before, the last well below the first
    quarters = [np.mean(epoch_loss[i : i + 4]) for i in range(0, 16, 4)]
    assert all(b < a for a, b in zip(quarters, quarters[1:])), quarters
    assert quarters[-1] < 0.5 * quarters[0], quarters
    # SI-SDR rises from validation to validation (epochs 3, 7, 11, 15)
    si_sdr = [val_si_sdr[e] for e in sorted(val_si_sdr)]
    assert len(si_sdr) == 4 and si_sdr[-1] > si_sdr[0] + 2.0, si_sdr
    assert all(b > a - 0.5 for a, b in zip(si_sdr, si_sdr[1:])), si_sdr
    # and the test split of the best checkpoint beats the noisy input clearly (0 dB white noise)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["enhanced"]["si_sdr"] > metrics["noisy"]["si_sdr"] + 5.0, metrics
    assert metrics["enhanced"]["pesq"] > metrics["noisy"]["pesq"], metrics
