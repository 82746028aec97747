"""Fault tolerance through `dfl-train`: kill -9 then `ckpt_path=last`, and SIGTERM saving a checkpoint."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tests.test_train import TINY, dfl_train

STEPS_PER_EPOCH = 4  # data.n_train=4, batch size 1


def start(*overrides):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "dfl.cli.train", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


def load(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def balancer(ckpt):
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("LossWeightBalancer"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_cache")


def run_args(run_dir, cache, *extra):
    # lr 1e-2: large enough steps that a different data order would show in the final weights
    return [f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", *TINY, "data.n_val=1", "test=false",
            "system.lr=1e-2", *extra]


def test_kill_9_then_ckpt_path_last_equals_an_uninterrupted_run(tmp_path, cache):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # 2 persistent worker processes: the resumed run's first iterator prefetches its indices
    # before Lightning's set_epoch, so it must already be built for the right epoch
    epochs = ("trainer.max_epochs=6", "data.num_workers=2")  # tiny epochs: room to kill the run before its end
    dfl_train(*run_args(full, cache, *epochs))

    proc = start(*run_args(killed, cache, *epochs))
    wait_for(killed / "checkpoints" / "last.ckpt", proc)  # then kill at once: in a later epoch
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted = load(killed)
    assert interrupted["epoch"] < 5

    dfl_train(*run_args(killed, cache, *epochs, "ckpt_path=last"))
    a, b = load(full), load(killed)
    assert b["global_step"] == a["global_step"] == 6 * STEPS_PER_EPOCH
    # same weights (balancer state, optimizer state and data order all restored)
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    torch.testing.assert_close(balancer(b)["frozen_weights"], balancer(a)["frozen_weights"])
    exp_avg = lambda c: [s["exp_avg"] for s in c["optimizer_states"][0]["state"].values()]  # noqa: E731
    torch.testing.assert_close(exp_avg(b), exp_avg(a), rtol=1e-5, atol=1e-8)
    # the resumed metrics.csv holds the killed run's rows then the resumed ones: the uninterrupted run's
    # rows, none twice (rows the killed run wrote after its last checkpoint were dropped)
    full_rows, resumed_rows = csv_rows(full), csv_rows(killed)
    assert [row_shape(r) for r in resumed_rows] == [row_shape(r) for r in full_rows]
    for ra, rb in zip(full_rows, resumed_rows):
        for key in ("train/loss", "val/loss", "val/enhanced/si_sdr"):
            if ra.get(key):
                assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-4, abs=1e-6), (key, ra["step"])


def csv_rows(run_dir):
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def row_shape(row):
    """A metrics.csv row's epoch, step and which columns it fills (timings and values differ between runs)."""
    return row["epoch"], row["step"], sorted(k for k, v in row.items() if v)


@pytest.mark.parametrize("workers", [0, 1], ids=["scores_in_process", "scores_overlapping_training"])
def test_sigterm_saves_last_ckpt_and_exits_cleanly_then_resumes(tmp_path, cache, workers):
    run = tmp_path / "preempted"
    proc = start(*run_args(run, cache, "trainer.max_epochs=1000", f"system.metric_workers={workers}"))
    wait_for(run / "checkpoints" / "epoch_000.ckpt", proc)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved" in out
    assert not list((run / "checkpoints").glob(".*tmp"))  # written atomically, nothing left over

    saved = load(run)
    step, epoch = saved["global_step"], saved["epoch"]
    original = {name: (run / name).read_text() for name in ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml")}
    rows_before = [r for r in csv_rows(run) if int(r["step"]) < step]
    assert step >= STEPS_PER_EPOCH and saved["optimizer_states"] and balancer(saved)["frozen_at_epoch"] == 1
    assert epoch * STEPS_PER_EPOCH <= step <= (epoch + 1) * STEPS_PER_EPOCH  # stopped within (or at the end of) `epoch`
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] >= 1

    dfl_train(*run_args(run, cache, f"trainer.max_epochs={epoch + 2}", f"system.metric_workers={workers}", "ckpt_path=last"))
    resumed = load(run)
    assert resumed["global_step"] == (epoch + 2) * STEPS_PER_EPOCH  # continued, did not start over
    torch.testing.assert_close(balancer(resumed)["frozen_weights"], balancer(saved)["frozen_weights"])
    # the original record stays; the resumed invocation is recorded beside it
    assert {name: (run / name).read_text() for name in original} == original
    (record,) = (run / ".hydra").glob("resume-*")
    assert "ckpt_path=last" in (record / "overrides.yaml").read_text()
    assert "ckpt_path=last" not in original[".hydra/overrides.yaml"]
    assert (record / "config.yaml").is_file() and "max_epochs: " + str(epoch + 2) in (record / "config_resolved.yaml").read_text()
    # and metrics.csv continues: the rows logged before the checkpoint, then the resumed epochs'
    rows = csv_rows(run)
    assert rows[: len(rows_before)] == rows_before and len(rows_before) >= STEPS_PER_EPOCH
    assert {r["epoch"] for r in rows if r.get("val/loss")} == {str(e) for e in range(epoch + 2)}
    # every epoch's metrics, also one whose scores were still in the worker when SIGTERM came
    assert {r["epoch"] for r in rows if r.get("val/enhanced/si_sdr")} == {str(e) for e in range(epoch + 2)}
    assert not list((run / "checkpoints").glob(".*pending"))


def test_ckpt_path_last_without_a_checkpoint_is_an_error_naming_the_folder(tmp_path, cache):
    run = tmp_path / "typo"
    proc = start(*run_args(run, cache, "ckpt_path=last"))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert f"ckpt_path=last: no last.ckpt in {run / 'checkpoints'}" in out
    assert not (run / "csv").exists()  # nothing trained


def test_a_checkpoint_of_another_configuration_is_refused_in_a_few_lines(tmp_path, cache):
    run = tmp_path / "run"
    dfl_train(*run_args(run, cache, "trainer.max_epochs=1"))
    # resume leaving out one of the original overrides (model.channels=4; the default is 64)
    args = [a for a in run_args(run, cache, "trainer.max_epochs=2", "ckpt_path=last") if a != "model.channels=4"]
    proc = start(*args)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    message = out[out.index("does not match this configuration"):]
    assert "model.channels: 4 in the checkpoint, 64 now" in message
    assert "the original run's overrides not repeated now: model.channels=4" in message
    assert "size mismatch" not in out and len(message.splitlines()) < 12


def test_mid_epoch_checkpoint_resumes_the_epoch_where_it_stopped(tmp_path, cache):
    """A checkpoint inside epoch 1 (after 2 of its 4 batches), resumed in a fresh process, ends where an
    uninterrupted run ends: the resumed epoch trains on its last 2 batches, not its first 2 again."""
    mid = [
        "+callbacks.mid_epoch._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.mid_epoch.every_n_train_steps=6", "+callbacks.mid_epoch.save_top_k=-1",
        "+callbacks.mid_epoch.save_on_train_epoch_end=false",
    ]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("trainer.max_epochs=3", "data.num_workers=2", "callbacks.loss_weight_balancer.epochs=2")
    dfl_train(*run_args(full, cache, *common, *mid, f"+callbacks.mid_epoch.dirpath={full}/mid"))
    step6 = full / "mid" / "epoch=1-step=6.ckpt"
    saved = torch.load(step6, weights_only=True)
    progress = saved["loops"]["fit_loop"]
    assert saved["epoch"] == 1 and progress["epoch_loop.batch_progress"]["current"]["processed"] == 2

    dfl_train(*run_args(resumed, cache, *common, *mid, f"+callbacks.mid_epoch.dirpath={resumed}/mid",
                        f"ckpt_path='{step6}'"))  # fmt: skip
    a, b = load(full), load(resumed)
    assert b["global_step"] == a["global_step"] == 3 * STEPS_PER_EPOCH
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    # the balancer's epoch-1 means include exactly the epoch's 4 batches
    torch.testing.assert_close(balancer(b)["frozen_weights"], balancer(a)["frozen_weights"])


def _indices(loader):
    return [int(i) for batch in loader for i in batch["names"]]


class _IndexDataset(torch.utils.data.Dataset):
    """Items named by the index the sampler gave (``epoch * n + index``)."""

    lengths = [1] * 10

    def __len__(self):
        return 10

    def __getitem__(self, index):
        x = torch.zeros(1)
        return {"noisy": x, "clean": x, "length": 1, "name": str(index)}


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_skips_the_trained_batches_of_its_epoch_only(workers):
    from datamodules.paired_folder import audio_loader

    dataset = _IndexDataset()
    kw = dict(batch_size=3, shuffle=True, seed=7, num_workers=workers)
    plain = audio_loader(dataset, epoch=4, **kw)
    full_epoch = _indices(plain)
    resumed = audio_loader(dataset, epoch=4, skip_batches=2, **kw)
    assert len(resumed) == len(plain) == 4  # the fit loop still sees a whole epoch
    assert _indices(resumed) == full_epoch[6:]  # batches 0 and 1 were trained on before the checkpoint
    for loader in (plain, resumed):
        loader.sampler.set_epoch(5)  # the next epoch is whole again
    assert _indices(resumed) == _indices(plain) and len(_indices(resumed)) == 10


def test_resumable_loader_skips_after_distributed_sharding():
    """Under DDP Lightning re-creates the loader around a distributed sampler: each rank skips its own batches."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader

    from datamodules.paired_folder import audio_loader

    dataset = _IndexDataset()
    with _replace_dunder_methods(DataLoader, "dataset"):  # as in Lightning's *_dataloader hooks
        loader = audio_loader(dataset, batch_size=2, shuffle=True, seed=1, epoch=3, skip_batches=1)
    shards = []
    for rank in (0, 1):
        sharded, whole = (
            _update_dataloader(loader, DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=rank))
            for _ in range(2)
        )
        whole.skip_batches = 0
        # Lightning's order: the epoch's iterator is built before set_epoch reaches the new sampler
        first = iter(sharded)
        for dl in (sharded, whole):
            dl.sampler.set_epoch(3)
        assert isinstance(sharded, type(loader)) and len(sharded) == len(whole) == 3
        assert _indices(first) == _indices(whole)[2:]  # this rank's first batch is skipped
        assert _indices(sharded) == _indices(whole)  # and the next epoch is whole
        shards.append(_indices(whole))
    assert sorted(shards[0] + shards[1]) == list(range(30, 40))  # the two ranks cover epoch 3 once


def test_interrupted_epoch_position_reads_the_restored_loop_progress():
    from types import SimpleNamespace as NS

    from datamodules.resume import interrupted_epoch_position

    def trainer(started, processed, batches):
        return NS(fit_loop=NS(epoch_progress=NS(current=NS(started=started, processed=processed)),
                              epoch_loop=NS(batch_progress=NS(current=NS(processed=batches)))))  # fmt: skip

    assert interrupted_epoch_position(trainer(3, 2, 5)) == (2, 5)  # inside epoch 2, 5 batches trained
    assert interrupted_epoch_position(trainer(3, 3, 8)) == (-1, 0)  # epoch 2 finished: nothing to skip
    assert interrupted_epoch_position(trainer(0, 0, 0)) == (-1, 0)  # a fresh run
    assert interrupted_epoch_position(None) == (-1, 0)


def test_mid_epoch_resume_under_ddp_equals_an_uninterrupted_ddp_run(tmp_path, cache):
    """trainer=ddp_sim (2 CPU processes): each rank skips its own trained batches of the interrupted epoch."""
    mid = ["+callbacks.mid_epoch._target_=lightning.pytorch.callbacks.ModelCheckpoint",
           "+callbacks.mid_epoch.every_n_train_steps=6", "+callbacks.mid_epoch.save_top_k=-1",
           "+callbacks.mid_epoch.save_on_train_epoch_end=false"]  # fmt: skip
    common = ("trainer=ddp_sim", "trainer.max_epochs=2", "data.n_train=8")  # 4 steps per epoch on each rank
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    dfl_train(*run_args(full, cache, *common, *mid, f"+callbacks.mid_epoch.dirpath={full}/mid"))
    step6 = full / "mid" / "epoch=1-step=6.ckpt"
    assert torch.load(step6, weights_only=True)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"][
        "processed"] == 2  # fmt: skip
    dfl_train(*run_args(resumed, cache, *common, f"ckpt_path='{step6}'"))
    a, b = load(full), load(resumed)
    assert b["global_step"] == a["global_step"] == 8
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_csv_logger_continues_the_rows_before_the_resumed_step(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from dfl.cli.train import continue_logs
    from dfl.loggers import CSVLogger

    first = CSVLogger(tmp_path, name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    resumed, tb = CSVLogger(tmp_path, name="csv", version=""), TensorBoardLogger(tmp_path / "tb", name=None, version="")
    continue_logs([resumed, tb], resumed_step=4)  # steps 4 and 5 were logged after the checkpoint
    assert tb._kwargs["purge_step"] == 4
    resumed.log_metrics({"train/loss": 40.0, "val/loss": 1.5}, step=4)
    resumed.save()
    rows = csv_rows(tmp_path)
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("0", "0.0", ""), ("1", "1.0", ""), ("2", "2.0", ""), ("3", "3.0", ""), ("4", "40.0", "1.5")]
    fresh = CSVLogger(tmp_path, name="csv", version="")  # not resuming: Lightning's behaviour, a new file
    fresh.log_metrics({"x": 1.0}, step=0)
    fresh.save()
    assert [r["x"] for r in csv_rows(tmp_path)] == ["1.0"]
