"""Fault tolerance through `dfl-train`: kill -9 then `ckpt_path=last`, and SIGTERM saving a checkpoint."""

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
    return subprocess.Popen([sys.executable, "-m", "dfl.train", *overrides], cwd=REPO, env=env,
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


def test_sigterm_saves_last_ckpt_and_exits_cleanly_then_resumes(tmp_path, cache):
    run = tmp_path / "preempted"
    proc = start(*run_args(run, cache, "trainer.max_epochs=1000"))
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
    assert step >= STEPS_PER_EPOCH and saved["optimizer_states"] and balancer(saved)["frozen_at_epoch"] == 1
    assert epoch * STEPS_PER_EPOCH <= step <= (epoch + 1) * STEPS_PER_EPOCH  # stopped within (or at the end of) `epoch`
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] >= 1

    dfl_train(*run_args(run, cache, f"trainer.max_epochs={epoch + 2}", "ckpt_path=last"))
    resumed = load(run)
    assert resumed["global_step"] == (epoch + 2) * STEPS_PER_EPOCH  # continued, did not start over
    torch.testing.assert_close(balancer(resumed)["frozen_weights"], balancer(saved)["frozen_weights"])
