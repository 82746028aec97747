"""Real multirun sweeps through `dfl-train -m`: a loss sweep and an Optuna search of 2 trials."""

import csv
import json

import pytest
import yaml

from tests.test_train import TINY, dfl_train

ONE_EPOCH = [*TINY, "trainer.max_epochs=1", "data.n_val=1", "data.n_test=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep_cache")


def run_dirs(sweep_dir):
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir())


def test_loss_sweep_writes_one_directory_per_run(tmp_path, cache):
    sweep = tmp_path / "sweep"
    proc = dfl_train("-m", "loss=l1,fl", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}", *ONE_EPOCH,
                     "logger=wandb")
    runs = run_dirs(sweep)
    assert [p.name.split("_", 1)[0] for p in runs] == ["0", "1"]
    assert "loss=l1" in runs[0].name and "loss=fl" in runs[1].name
    targets = []
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(metrics["enhanced"]) == {"pesq", "stoi", "si_sdr"}
        assert (run / "checkpoints" / "last.ckpt").is_file()
        targets.append(yaml.safe_load((run / "config.yaml").read_text())["loss"]["_target_"])
    assert targets == ["dfl.losses.WaveformL1Loss", "dfl.losses.FeatureLoss"]
    # the feature-loss run logged its per-layer terms, the L1 run has none
    header = lambda run: (run / "csv" / "metrics.csv").read_text().splitlines()[0]  # noqa: E731
    assert "train/feature/layer_0" in header(runs[1]) and "train/feature/layer_0" not in header(runs[0])

    # the sweep's table: one row per run with its swept setting, test metrics, best epoch and folder
    with (sweep / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:1] == ["loss"] and list(rows[0])[-2:] == ["best_epoch", "run"]
    assert [r["loss"] for r in rows] == ["l1", "fl"] and [r["run"] for r in rows] == [p.name for p in runs]
    for row, run in zip(rows, runs):
        metrics = json.loads((run / "metrics.json").read_text())
        assert row["best_epoch"] == "0" == str(metrics["best_epoch"])
        for kind in ("noisy", "enhanced"):
            for name in ("pesq", "stoi", "si_sdr"):
                assert float(row[f"{kind}/{name}"]) == pytest.approx(metrics[kind][name], abs=1e-4)
    md = (sweep / "summary.md").read_text()
    assert "| loss | noisy/pesq | enhanced/pesq |" in md and f"| {runs[1].name} |" in md
    assert "Sweep summary" in proc.stdout and f"| {runs[0].name} |" in proc.stdout
    # and the same table on W&B (offline): a summary run in the sweep's group
    tables = list((sweep / "wandb").glob("offline-run-*/files/media/table/sweep/summary*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == list(rows[0]) and len(table["data"]) == 2


def test_optuna_search_of_two_trials_maximises_the_metric(tmp_path, cache):
    sweep = tmp_path / "optuna"
    dfl_train(
        "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}",
        *ONE_EPOCH, "lossnet.n_layers=15", "lossnet.base_channels=2",  # the search tries loss.layers up to 15
    )
    runs = run_dirs(sweep)
    assert len(runs) == 2
    trial_values = [json.loads((r / "metrics.json").read_text())["enhanced"]["pesq"] for r in runs]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(trial_values), abs=1e-6)
    assert set(results["best_params"]) == {"system.lr", "loss.layers"}
    assert 1e-5 <= results["best_params"]["system.lr"] <= 1e-3
    with (sweep / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"system.lr", "loss.layers"} <= set(rows[0])
    assert [float(r["enhanced/pesq"]) for r in rows] == pytest.approx(trial_values, abs=1e-4)
