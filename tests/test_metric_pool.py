"""Validation metrics off the training path: the metric pool, `system.metric_workers`, `val_metrics_every_n_epochs`."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from dfl.metric_pool import MetricPool, result, score_utterance
from tests.helpers.metric_signals import noisy_version, speech_like
from tests.test_train import TINY, dfl_train

SR = 16_000


def jobs():
    out = []
    for i in range(3):
        clean = speech_like(1.2, seed=60 + i).astype(np.float64)
        out.append((f"u{i}", clean, {"enhanced": noisy_version(clean, 15.0, seed=70 + i).astype(np.float64),
                                     "noisy": noisy_version(clean, 0.0, seed=80 + i).astype(np.float64)},
                    ["pesq", "stoi", "si_sdr"], SR))
    return out


def test_pooled_scores_equal_in_process_scores_and_errors_come_back():
    with MetricPool(0) as serial, MetricPool(2) as pooled:
        a = serial.map(score_utterance, jobs())
        b = pooled.map(score_utterance, jobs())
        assert a == b and [r["id"] for r in a] == ["u0", "u1", "u2"]
        assert set(a[0]["values"]) == {f"{k}/{m}" for k in ("enhanced", "noisy") for m in ("pesq", "stoi", "si_sdr")}
        assert a[0]["values"]["enhanced/pesq"] > a[0]["values"]["noisy/pesq"]
        bad = ("short", np.zeros(SR), {"enhanced": np.zeros(SR // 2)}, ["si_sdr"], SR)
        with pytest.raises(ValueError):
            result(pooled.submit(score_utterance, bad))


def test_metrics_every_second_epoch_in_worker_processes_are_exact(tmp_path):
    """metric_workers=2, val_metrics_every_n_epochs=2, 2 epochs: the loss every epoch, the metrics in
    epoch 1 only, equal to the mean computed directly; the best checkpoint is that epoch's."""
    from dfl.checkpoints import load_model
    from dfl.metrics import compute_many

    run = tmp_path / "run"
    dfl_train(f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", *TINY, "data.n_val=3",
              "system.metric_workers=2", "system.val_metrics_every_n_epochs=2", "model.batch_stats_at_eval=true")
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    val = {int(r["epoch"]): r for r in rows if r.get("val/loss")}
    assert sorted(val) == [0, 1]
    assert not val[0].get("val/enhanced/pesq") and not val[0].get("val/noisy/pesq")
    # the denoiser as the system validates with it (through the CPU kernels seam)
    from dfl.kernels import accelerate

    model = accelerate(load_model(run / "checkpoints" / "last.ckpt", "denoiser")).eval()
    root = tmp_path / "cache" / "synthetic_speech"
    want = {"noisy": [], "enhanced": []}
    for path in sorted((root / "valset_noisy").glob("*.wav")):
        noisy = sf.read(path, dtype="float32")[0]
        clean = sf.read(root / "valset_clean" / path.name, dtype="float32")[0].astype(np.float64)
        with torch.no_grad():
            enhanced = model(torch.from_numpy(noisy)[None])[0].numpy()
        for kind, x in (("noisy", noisy), ("enhanced", enhanced)):
            want[kind].append(compute_many(["pesq", "stoi", "si_sdr"], clean, x.astype(np.float64)))
    for kind, per_file in want.items():
        assert len(per_file) == 3
        for name in ("pesq", "stoi", "si_sdr"):
            expected = np.mean([r[name] for r in per_file])
            assert float(val[1][f"val/{kind}/{name}"]) == pytest.approx(expected, rel=1e-4), f"{kind}/{name}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and metrics["checkpoint"].endswith("epoch_001.ckpt")
    assert metrics["chosen_on"]["val/enhanced/pesq"] == pytest.approx(float(val[1]["val/enhanced/pesq"]), rel=1e-6)
