"""`dfl-train trainer=ddp_sim` (2 CPU processes, gloo) against a single-process run on the same data.

What can be compared exactly: with ``system.lr=0`` the denoiser never changes, so every training
utterance's per-layer feature distances are the same whichever rank computes them. The balancer's
weights (1 / mean over ALL ranks' distances, all-reduced) must then equal the single-process
weights, and the test metrics (each rank scores half of the test utterances; means synchronised
across ranks) must equal the single-process means. The adaptive BN uses batch statistics at eval
(``model.batch_stats_at_eval=true``) so that the DDP ranks' different running statistics cannot
matter. With lr > 0 the runs legitimately differ (DDP averages gradients of 2 utterances per step).
"""

import json

import numpy as np
import pytest
import torch

from tests.test_train import TINY, dfl_train

SAME_DATA = [*TINY, "trainer.max_epochs=1", "data.n_train=4", "data.n_test=2", "data.n_val=2",
             "system.lr=0.0", "model.batch_stats_at_eval=true"]


def balancer_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("LossWeightBalancer"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    cache = base / "cache"
    dfl_train(f"hydra.run.dir={base / 'single'}", f"paths.cache_dir={cache}", "trainer=cpu", *SAME_DATA)
    ddp = dfl_train(f"hydra.run.dir={base / 'ddp'}", f"paths.cache_dir={cache}", "trainer=ddp_sim", *SAME_DATA)
    return base / "single", base / "ddp", ddp


def test_two_processes_really_ran(runs):
    _, ddp_dir, proc = runs
    out = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out
    ckpt = torch.load(ddp_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # 4 utterances, 2 ranks, batch 1: 2 steps per epoch


def test_balancer_weights_match_the_single_process_run(runs):
    single, ddp, _ = runs
    s, d = balancer_state(single), balancer_state(ddp)
    assert s["frozen_at_epoch"] == d["frozen_at_epoch"] == 1
    assert s["count"] == 4 and d["count"] == 2  # each rank saw half of the utterances
    torch.testing.assert_close(d["frozen_weights"], s["frozen_weights"], rtol=1e-5, atol=0)


def test_test_metrics_match_the_single_process_run(runs):
    single, ddp, _ = runs
    s = json.loads((single / "metrics.json").read_text())
    d = json.loads((ddp / "metrics.json").read_text())
    for kind in ("noisy", "enhanced"):
        assert set(s[kind]) == set(d[kind]) == {"pesq", "stoi", "si_sdr"}
        for name in s[kind]:
            np.testing.assert_allclose(d[kind][name], s[kind][name], rtol=1e-4, err_msg=f"{kind}/{name}")


def test_only_rank_zero_wrote_files(runs):
    single, ddp, _ = runs
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    ddp_files = names(ddp)
    assert not any("rank_1" in f or "rank1" in f for f in ddp_files)
    assert ddp_files.count("config.yaml") == 1 and "metrics.json" in ddp_files
    assert [f for f in ddp_files if f.startswith(".hydra/")] == [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"]
    assert set(ddp_files) - {"train.log"} <= set(names(single)) | {f for f in ddp_files if f.startswith("checkpoints/")}
