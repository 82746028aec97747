"""`logger=wandb` offline: the run directory holds the audio, spectrograms, metrics and config."""

import json

import numpy as np
import pytest
import soundfile as sf

from tests.helpers.wandb_offline import records, summarise
from tests.test_train import TINY, dfl_train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("wandb_cache")


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    dfl_train(f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", "logger=wandb", *TINY)
    (offline,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    return run_dir, offline


def run_record(offline):
    (path,) = offline.glob("run-*.wandb")
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


def test_audio_and_spectrograms_of_every_validation_epoch(wandb_run, cache):
    _, offline = wandb_run
    media = offline / "files" / "media"
    for kind in ("noisy", "enhanced", "clean"):
        wavs = sorted((media / "audio" / "val_media").glob(f"{kind}_*.wav"))
        assert len(wavs) == 2 * 2, wavs  # 2 validation utterances x 2 epochs
    pngs = sorted((media / "images" / "val_media").glob("spectrogram_*.png"))
    assert len(pngs) == 2 * 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # the logged clean audio is the validation set's clean utterance
    clean_refs = [sf.read(p)[0] for p in sorted((cache / "synthetic_speech").rglob("valset_clean/*.wav"))]
    logged = [sf.read(p)[0] for p in sorted((media / "audio" / "val_media").glob("clean_*.wav"))]
    assert any(np.allclose(logged[0], ref, atol=1e-4) for ref in clean_refs if len(ref) == len(logged[0]))


def test_metrics_terms_weights_and_config_reach_wandb(wandb_run):
    run_dir, offline = wandb_run
    (path,) = offline.glob("run-*.wandb")
    run = summarise(path)
    rows = run["history"]
    keys = set().union(*rows)
    for key in ("train/loss", "train/feature/layer_0", "train/feature/layer_3", "val/enhanced/pesq",
                "val/noisy/si_sdr", "test/enhanced/stoi", "loss_weights/layer_2", "loss_weights/frozen_at_epoch"):
        assert key in keys, key
    weights_row = next(r for r in rows if "loss_weights/layer_0" in r)
    assert weights_row["loss_weights/frozen_at_epoch"] == 1.0
    # the same weights the balancer saved in the checkpoint
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    frozen = next(v for k, v in ckpt["callbacks"].items() if k.startswith("LossWeightBalancer"))["frozen_weights"]
    logged = [weights_row[f"loss_weights/layer_{i}"] for i in range(4)]
    np.testing.assert_allclose(logged, frozen.tolist(), rtol=1e-6)
    media_rows = [r for r in rows if "val_media/spectrogram/count" in r]
    assert [r["val_media/noisy/count"] for r in media_rows] == [2, 2]
    # the composed config
    assert run["config"]["loss"]["_target_"] == "dfl.losses.FeatureLoss"
    assert run["config"]["trainer"]["max_epochs"] == 2 and run["config"]["model"]["channels"] == 4
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test_row = next(r for r in rows if "test/enhanced/pesq" in r)
    assert test_row["test/enhanced/pesq"] == pytest.approx(metrics["enhanced"]["pesq"], rel=1e-5)
    record = run_record(offline)
    assert record.run_group == "" and record.display_name == "train"


def test_runs_of_one_sweep_share_a_group_and_log_checkpoints(tmp_path, cache):
    sweep = tmp_path / "sweep"
    dfl_train("-m", "loss=l1,l2", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}", "logger=wandb", "test=false",
              "logger.wandb.log_model=true", *TINY, "trainer.max_epochs=1", "data.n_val=1")
    runs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())  # sweep/wandb: the summary's run
    offline = [next((r / "wandb").glob("offline-run-*")) for r in runs]
    records_ = [run_record(o) for o in offline]
    assert [r.display_name for r in records_] == ["loss=l1", "loss=l2"]
    assert records_[0].run_group == records_[1].run_group == f"train-{sweep.name}"
    for o in offline:  # log_model: the checkpoints went to the run as model artifacts
        (path,) = o.glob("run-*.wandb")
        artifacts = [r.artifact for r in records(path) if r.WhichOneof("record_type") == "artifact"]
        assert artifacts and all(a.type == "model" for a in artifacts)
        assert {e.path for a in artifacts for e in a.manifest.contents} == {"model.ckpt"}


def test_a_resumed_run_continues_its_wandb_run(tmp_path, cache):
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", f"paths.cache_dir={cache}", "logger=wandb", "test=false", *TINY, "data.n_val=1"]
    dfl_train(*args, "trainer.max_epochs=1")
    (first,) = (run / "wandb").glob("offline-run-*")
    dfl_train(*args, "trainer.max_epochs=2", "ckpt_path=last")
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and offline[0] == first
    ids = [run_record(o).run_id for o in offline]
    assert ids[0] == ids[1] == first.name.rsplit("-", 1)[1]  # `wandb sync` appends the resumed part to the run
