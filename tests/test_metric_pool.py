"""Validation metrics off the training path: the metric pool, `system.metric_workers`, `val_metrics_every_n_epochs`."""

import csv
import json
from concurrent.futures import Future
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch.callbacks import Callback

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
        assert [r["id"] for r in a] == [r["id"] for r in b] == ["u0", "u1", "u2"]
        for x, y in zip(a, b):  # single-threaded workers: SI-SDR's dot products may round differently (~1e-15)
            assert x["values"] == pytest.approx(y["values"], rel=1e-12)
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
    val = {}  # epoch -> its logged values (metrics scored after the epoch come in a row of their own)
    for r in csv.DictReader((run / "csv" / "metrics.csv").open()):
        if any(k.startswith("val/") and v for k, v in r.items()):
            val.setdefault(int(r["epoch"]), {}).update({k: v for k, v in r.items() if v})
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


def val_rows(run):
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    loss = {int(r["epoch"]): r for r in rows if r.get("val/loss")}
    scores = {int(r["epoch"]): r for r in rows if r.get("val/enhanced/pesq")}
    return loss, scores


def test_scores_that_overlap_the_next_epoch_equal_scores_merged_at_once(tmp_path):
    """system.val_metrics_overlap: epoch e's metrics are scored while epoch e+1 trains, logged at e's own
    epoch and step, and the best checkpoint is chosen on them: the same numbers and the same file as
    with the metrics merged before the epoch ends."""
    # one torch thread in both runs, so that they train bit-identically (with 2 the overlapping run trains
    # on 1 while the worker scores: different float sums; test_training_yields_a_core... covers that)
    common = [f"paths.cache_dir={tmp_path / 'cache'}", *TINY, "data.n_val=3", "trainer.max_epochs=3", "num_threads=1",
              "system.metric_workers=1", "system.lr=3e-3", "model.batch_stats_at_eval=true"]
    runs = {}
    for overlap in ("true", "false"):
        run = tmp_path / f"overlap_{overlap}"
        proc = dfl_train(f"hydra.run.dir={run}", *common, f"system.val_metrics_overlap={overlap}")
        runs[overlap] = (run, proc.stdout + proc.stderr + (run / "train.log").read_text())
    (over, over_log), (once, once_log) = runs["true"], runs["false"]
    assert "scored after it ended" in over_log and "scored after it ended" not in once_log
    for run in (over, once):
        loss, scores = val_rows(run)
        assert sorted(loss) == sorted(scores) == [0, 1, 2]
        for epoch in scores:  # at the step of the epoch they belong to
            assert scores[epoch]["step"] == loss[epoch]["step"]
        files = sorted(p.name for p in (run / "checkpoints").iterdir())
        best = max(scores, key=lambda e: float(scores[e]["val/enhanced/pesq"]))
        assert files == sorted(["last.ckpt", f"epoch_{best:03d}.ckpt"])  # no snapshot left behind
        assert json.loads((run / "metrics.json").read_text())["best_epoch"] == best
    (_, over_scores), (_, once_scores) = val_rows(over), val_rows(once)
    for epoch in range(3):
        noisy = ("val/noisy/pesq",) if epoch == 0 else ()  # the noisy input is scored once
        for key in ("val/enhanced/pesq", "val/enhanced/stoi", "val/enhanced/si_sdr", *noisy):
            assert float(over_scores[epoch][key]) == pytest.approx(float(once_scores[epoch][key]), rel=1e-6), (epoch, key)
    over_metrics, once_metrics = (json.loads((r / "metrics.json").read_text()) for r in (over, once))
    assert over_metrics["best_epoch"] == once_metrics["best_epoch"]
    assert over_metrics["enhanced"]["pesq"] == pytest.approx(once_metrics["enhanced"]["pesq"], rel=1e-6)


def test_a_plain_model_checkpoint_gets_the_scores_before_the_epoch_ends(tmp_path):
    """Lightning's own ModelCheckpoint on val/enhanced/pesq cannot wait for late scores: no overlap then."""
    run = tmp_path / "run"
    proc = dfl_train(f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", *TINY, "system.metric_workers=1",
                     "callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint")
    assert "scored after it ended" not in proc.stdout + proc.stderr + (run / "train.log").read_text()
    loss, scores = val_rows(run)
    assert sorted(scores) == [0, 1]


class RecordThreads(Callback):
    def __init__(self):
        self.at_first_batch: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.at_first_batch[trainer.current_epoch] = torch.get_num_threads()


def test_training_yields_a_core_to_the_scoring_workers_and_takes_it_back(tmp_path):
    """On the CPU, while epoch e's scores are in the worker, epoch e+1 trains on one thread fewer."""
    from callbacks import BestCheckpoint
    from dfl.losses import WaveformL1Loss
    from dfl.metric_pool import CoreShare
    from dfl.models import ContextAggregationNet
    from dfl.systems import DenoisingSystem
    from tests.conftest import write_pair_tree
    from tests.helpers.tiny_training import datamodule

    data = write_pair_tree(tmp_path / "pairs", splits=("train", "val"), n=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        torch.manual_seed(0)
        system = DenoisingSystem(ContextAggregationNet(dilations=[1, 2, 1], channels=4), WaveformL1Loss(),
                                 metrics=["si_sdr"], metric_workers=1)
        # a worker still scoring when the next epoch starts (a real one may be done first: then nothing is yielded)
        system._metric_pool, system._cores = SlowPool(1), CoreShare(1)
        record = RecordThreads()
        best = BestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/enhanced/si_sdr", mode="max", filename="epoch_{epoch}")
        trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=3, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[record, best])
        trainer.fit(system, datamodule=datamodule(data))
        assert record.at_first_batch == {0: 3, 1: 2, 2: 2}
        assert torch.get_num_threads() == 3  # taken back
        assert best.best_model_path.endswith(".ckpt") and ".pending" not in best.best_model_path
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [Path(best.best_model_path).name]
    finally:
        torch.set_num_threads(threads)


class LateFuture(Future):
    """A metric future that stays pending until its result is asked for (a worker still scoring)."""

    def __init__(self, value):
        super().__init__()
        self._value = value

    def result(self, timeout=None):
        if not self.done():
            self.set_result(self._value)
        return super().result(timeout)


class SlowPool(MetricPool):
    """Scores here but leaves every future pending until it is waited for: a worker slower than the model."""

    def __init__(self, num_workers: int) -> None:
        super().__init__(num_workers)
        self.submitted = 0

    def submit(self, fn, job):
        self.submitted += 1
        return LateFuture(fn(job))


def test_core_share_yields_while_scores_are_pending_and_reclaims_when_done():
    from dfl.metric_pool import CoreShare

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        cores, futures = CoreShare(workers=3), []
        cores.update(futures)
        assert torch.get_num_threads() == 4 and not cores.yielded  # nothing to score: all threads
        futures.append(Future())
        cores.update(futures)
        assert torch.get_num_threads() == 1 and cores.yielded  # 4 - 3 workers
        futures.append(Future())
        futures[0].set_result(None)
        cores.update(futures)
        assert torch.get_num_threads() == 1  # one still pending
        futures[1].set_result(None)
        cores.update(futures)
        assert torch.get_num_threads() == 4 and not cores.yielded
        cores.update([Future()])  # a new list is watched from its start
        assert torch.get_num_threads() == 1
        cores.reclaim()
        assert torch.get_num_threads() == 4
        big = CoreShare(workers=8)  # more workers than threads: the model keeps one
        big.update([Future()])
        assert torch.get_num_threads() == 1
        big.reclaim()
        assert torch.get_num_threads() == 4
        CoreShare(workers=0).update([Future()])  # scoring in-process: nothing to give
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


class ModelRunsSeen(torch.nn.Module):
    """A denoiser that records, each time validation runs it, torch's threads and the jobs submitted so far."""

    def __init__(self, pool: SlowPool):
        super().__init__()
        from dfl.models import ContextAggregationNet

        self.net = ContextAggregationNet(dilations=[1, 2, 1], channels=4)
        self.pool = pool
        self.seen: list[tuple[int, int]] = []

    def forward(self, x):
        if not self.training:
            self.seen.append((torch.get_num_threads(), self.pool.submitted))
        return self.net(x)


def test_on_the_cpu_the_workers_start_when_the_model_has_run_on_the_whole_split(tmp_path):
    """The model takes every core while it runs; scoring next to it would oversubscribe them (both slower)."""
    from dfl.losses import WaveformL1Loss
    from dfl.metric_pool import CoreShare
    from dfl.systems import DenoisingSystem
    from tests.conftest import write_pair_tree
    from tests.helpers.tiny_training import datamodule

    data = write_pair_tree(tmp_path / "pairs", splits=("train", "val", "test"), n=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        pool = SlowPool(1)
        denoiser = ModelRunsSeen(pool)
        system = DenoisingSystem(denoiser, WaveformL1Loss(), metrics=["si_sdr"], metric_workers=1, cpu_kernels=False)
        system._metric_pool, system._cores = pool, CoreShare(1)
        trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        (val,) = trainer.validate(system, datamodule=datamodule(data))
        assert denoiser.seen == [(3, 0)] * 3 and pool.submitted == 3  # all threads, nothing scored meanwhile
        assert torch.get_num_threads() == 3
        denoiser.pool = system._metric_pool = SlowPool(1)  # the pool is closed after each stage
        (test,) = trainer.test(system, datamodule=datamodule(data))
        assert denoiser.seen[3:] == [(3, 0)] * 3 and denoiser.pool.submitted == 3
        system._metric_pool = MetricPool(0)  # scored in this process as each utterance is run: the same means
        (val_in_process,) = trainer.validate(system, datamodule=datamodule(data))
        assert val_in_process["val/enhanced/si_sdr"] == val["val/enhanced/si_sdr"]
        assert np.isfinite(test["test/enhanced/si_sdr"])
    finally:
        torch.set_num_threads(threads)
