"""Real short trainings through the `dfl-train` entry point."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

TINY = [
    "data.n_train=4", "data.n_val=2", "data.n_test=2", "data.min_seconds=1.5", "data.max_seconds=2.0",
    "model.channels=4", "model.dilations=[1,2,4,1]", "lossnet.n_layers=4", "lossnet.base_channels=4",
    "trainer.max_epochs=2", "callbacks.loss_weight_balancer.epochs=1", "trainer.log_every_n_steps=1",
    "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false",
    "system.metric_workers=0",  # in-process metrics: no worker start-up per tiny run (tests/test_metric_pool.py covers the pool)
]


def dfl_train(*overrides, cwd=REPO, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "dfl.cli.train", *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    run_dir = base / "run"
    proc = dfl_train(f"hydra.run.dir={run_dir}", f"paths.cache_dir={base / 'cache'}", *TINY, "tf32=false", "cuda_conv=gemm")
    return run_dir, proc


def test_two_epoch_training_writes_outputs(tiny_run):
    run_dir, proc = tiny_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("epoch_") for p in (run_dir / "checkpoints").iterdir())
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    csv_text = (run_dir / "csv" / "metrics.csv").read_text()
    for column in ("train/loss", "train/feature/layer_0", "val/enhanced/pesq", "val/noisy/si_sdr", "loss_weights/layer_3",
                   "perf/audio_seconds_per_second", "perf/train_seconds"):
        assert column in csv_text.splitlines()[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for kind in ("noisy", "enhanced"):
        assert set(metrics[kind]) == {"pesq", "stoi", "si_sdr"}
        assert all(isinstance(v, float) for v in metrics[kind].values())
    assert 1.0 <= metrics["noisy"]["pesq"] <= 4.7
    assert "Test split" in proc.stdout


def test_tf32_setting_reaches_the_run_and_sets_both_backends(tiny_run):
    from dfl.run_setup import set_tf32

    run_dir, _ = tiny_run
    lines = (run_dir / "config.yaml").read_text().splitlines()
    assert "tf32: false" in lines and "cuda_conv: gemm" in lines
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        set_tf32(False)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        set_tf32(True)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_lightning_messages_are_logged_once_and_into_the_run_log(tiny_run):
    run_dir, proc = tiny_run
    console = proc.stdout + proc.stderr
    assert console.count("`Trainer.fit` stopped") == 1
    assert "`Trainer.fit` stopped" in (run_dir / "train.log").read_text()
    assert "glibc keeps freed buffers for reuse" in (run_dir / "train.log").read_text()  # keep_freed_memory: true


def test_random_loss_network_is_announced(tiny_run):
    _, proc = tiny_run
    assert (proc.stdout + proc.stderr).count("RANDOMLY INITIALISED") == 1  # once, not as a log line and a warning


def test_checkpoint_rebuilds_denoiser_safely(tiny_run):
    from dfl.checkpoints import load_model

    run_dir, _ = tiny_run
    net = load_model(run_dir / "checkpoints" / "last.ckpt", "denoiser")
    assert net.dilations == [1, 2, 4, 1] and net.config["channels"] == 4
    lossnet = load_model(run_dir / "checkpoints" / "last.ckpt", "lossnet")
    assert lossnet.n_layers == 4
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 800)).shape == (1, 800)


def test_bad_data_root_is_a_clear_error(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "dfl.cli.train", "data=paired_folder", f"data.root={tmp_path / 'missing'}",
         f"hydra.run.dir={tmp_path / 'run'}", *TINY[5:]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert f"data.root={tmp_path / 'missing'}: directory not found" in proc.stderr


def test_authors_recipe_runs_end_to_end_on_a_tiny_set(tmp_path):
    """experiment=authors_fl, narrowed: no validation speakers (the test set validates, loss only),
    checkpoints by epoch, the final weights tested, an imported-style loss network on its first layers."""
    from dfl.checkpoints import save_model
    from dfl.models import LossNetwork
    from tests.conftest import write_pair_tree

    data = write_pair_tree(tmp_path / "pairs", splits=("train", "test"), n=2, seconds=0.5)
    lossnet = tmp_path / "loss_model.pt"
    torch.manual_seed(0)
    save_model(lossnet, "lossnet", LossNetwork(n_layers=7, base_channels=4, bn_eps=1e-3, bn_scale=False,
                                               batch_stats_at_eval=True), {"source": "tensorflow"})  # fmt: skip
    run_dir = tmp_path / "run"
    dfl_train(
        "experiment=authors_fl", f"data.root={data}", f"lossnet.checkpoint={lossnet}", f"hydra.run.dir={run_dir}",
        "data.manifest_dir=null", "data.num_workers=0", "model.channels=4", "model.dilations=[1,2,1]",
        "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1",
        "callbacks.loss_weight_balancer.epochs=1",
        "callbacks.model_checkpoint.every_n_epochs=2", "system.metrics=[si_sdr]",
        "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
    )  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["checkpoint"] == "final weights" and set(metrics["enhanced"]) == {"si_sdr"}
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/loss" in header and not [c for c in header if c.startswith("val/enhanced")]  # loss only
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*")) == ["epoch_001.ckpt"]
    assert {f"train/feature/layer_{i}" for i in range(6)} <= set(header) and "train/feature/layer_6" not in header


def test_debug_trainer_runs_a_few_batches_quietly(tmp_path):
    """trainer=debug: a few batches, no checkpoints; the run directory said at start and end; no third-party
    tips, Lightning's duplicate test table, "Total FLOPs: 0" or a doubled random-loss-network warning."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline"}  # warnings shown, as a user sees them
    proc = subprocess.run(
        [sys.executable, "-m", "dfl.cli.train", "trainer=debug", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}",
         "data.n_train=4", "data.n_val=2", "data.n_test=2", "model.channels=4", "model.dilations=[1,2,1]",
         "lossnet.n_layers=4", "lossnet.base_channels=4", "trainer.enable_progress_bar=false",
         "trainer.limit_train_batches=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"run directory: {run_dir}" in out and f"outputs in {run_dir}" in out
    assert "litlogger" not in out and "Test metric" not in out and "Test split" in out
    assert out.count("RANDOMLY INITIALISED") == 1
    assert "Trainable params" in out and "flops" not in out.lower()  # the summary, without "Total FLOPs: 0"
    assert "logging interval" not in out and "already configured with model summary" not in out
    assert not (run_dir / "checkpoints").exists() and (run_dir / "metrics.json").is_file()
    steps = [r for r in (run_dir / "csv" / "metrics.csv").read_text().splitlines()[1:] if r]
    assert json.loads((run_dir / "metrics.json").read_text())["checkpoint"] == "final weights"
    assert steps  # logged at least the epoch's values
