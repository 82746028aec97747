"""`dfl-train trainer=ddp_sim` (2 CPU processes, gloo) against a single-process run on the same data.

What can be compared exactly: with ``system.lr=0`` the denoiser never changes, so every training
utterance's per-layer feature distances are the same whichever rank computes them. The balancer's
weights (1 / mean over ALL ranks' distances, all-reduced) must then equal the single-process
weights, and the test metrics must equal the single-process means. The validation and test splits
hold an odd number of utterances (3), so Lightning's distributed sampler pads them with a repeat of
the first; the per-utterance results are gathered by utterance id and the repeat dropped, so every
mean must also equal the exact mean over the 3 files computed directly with dfl.metrics. The adaptive BN uses batch statistics at eval
(``model.batch_stats_at_eval=true``) so that the DDP ranks' different running statistics cannot
matter. With lr > 0 the runs legitimately differ (DDP averages gradients of 2 utterances per step).
"""

import csv
import json

import numpy as np
import pytest
import torch

from tests.test_train import TINY, dfl_train

SAME_DATA = [*TINY, "trainer.max_epochs=1", "data.n_train=4", "data.n_test=3", "data.n_val=3",
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


def exact_means(run_dir, split, model=None):
    """Mean PESQ/STOI/SI-SDR over the split's files, computed directly (noisy, or the model's outputs)."""
    import soundfile as sf

    from dfl.metrics import compute_many

    root = run_dir.parent / "cache" / "synthetic_speech"
    noisy_files = sorted((root / f"{split}set_noisy").glob("*.wav"))
    assert len(noisy_files) == 3
    rows = []
    for noisy_path in noisy_files:
        noisy = sf.read(noisy_path, dtype="float32")[0]
        clean = sf.read(root / f"{split}set_clean" / noisy_path.name, dtype="float32")[0]
        est = noisy
        if model is not None:
            with torch.no_grad():
                est = model(torch.from_numpy(noisy)[None])[0].numpy()
        rows.append(compute_many(["pesq", "stoi", "si_sdr"], clean.astype(np.float64), est.astype(np.float64)))
    return {name: float(np.mean([r[name] for r in rows])) for name in rows[0]}


def test_ddp_means_are_exact_over_an_odd_number_of_files(runs):
    from dfl.checkpoints import load_model

    _, ddp, _ = runs
    d = json.loads((ddp / "metrics.json").read_text())
    # the denoiser as the system validates with it (through the CPU kernels seam)
    from dfl.kernels import accelerate

    model = accelerate(load_model(d["checkpoint"], "denoiser")).eval()
    for kind, want in (("noisy", exact_means(ddp, "test")), ("enhanced", exact_means(ddp, "test", model))):
        for name, value in want.items():
            np.testing.assert_allclose(d[kind][name], value, rtol=1e-4, err_msg=f"test/{kind}/{name}")
    # validation (what the best checkpoint is chosen on): the noisy means are model-independent
    rows = list(csv.DictReader((ddp / "csv" / "metrics.csv").open()))
    val = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/noisy/") and v}
    for name, value in exact_means(ddp, "val").items():
        np.testing.assert_allclose(val[f"val/noisy/{name}"], value, rtol=1e-4, err_msg=f"val/noisy/{name}")


def test_repeated_utterances_count_once():
    from dfl.metrics import MetricFailure
    from dfl.systems.scoring import means, unique_by_id

    rank0 = [{"id": "batch:a", "loss": 1.0, "n": 1}, {"id": "a", "values": {"enhanced/pesq": 1.0}},
             {"id": "batch:c", "loss": 3.0, "n": 1}, {"id": "c", "values": {"enhanced/pesq": 3.0}}]
    rank1 = [{"id": "batch:b", "loss": 2.0, "n": 1},
             {"id": "b", "values": {"enhanced/pesq": MetricFailure("pesq", "no utterance")}},
             {"id": "batch:a", "loss": 1.0, "n": 1}, {"id": "a", "values": {"enhanced/pesq": 1.0}}]  # the padding
    got = means(unique_by_id(rank0 + rank1))
    assert got == {"loss": 2.0, "enhanced/pesq": 2.0}  # a once; b's failed PESQ left out, not 0


def test_scores_merged_while_the_next_epoch_trains_are_exact_under_ddp(runs, tmp_path):
    """system.val_metrics_overlap with 2 ranks: each epoch's scores are gathered at the next validation's start
    (or at the end) on both ranks, and equal the exact means over the 3 files (lr=0: the model never changes)."""
    from dfl.checkpoints import load_model
    from dfl.kernels import accelerate

    single, _, _ = runs
    run = tmp_path / "ddp_overlap"
    proc = dfl_train(f"hydra.run.dir={run}", f"paths.cache_dir={single.parent / 'cache'}", "trainer=ddp_sim",
                     *SAME_DATA, "trainer.max_epochs=2", "system.metric_workers=1")
    assert "scored after it ended" in (run / "train.log").read_text() + proc.stdout + proc.stderr
    model = accelerate(load_model(run / "checkpoints" / "last.ckpt", "denoiser")).eval()
    want = {"noisy": exact_means(single, "val"), "enhanced": exact_means(single, "val", model)}
    val = {}
    for r in csv.DictReader((run / "csv" / "metrics.csv").open()):
        if r.get("val/enhanced/pesq"):
            val[int(r["epoch"])] = r
    assert sorted(val) == [0, 1]
    for epoch, row in val.items():
        for kind in ("noisy", "enhanced") if epoch == 0 else ("enhanced",):
            for name, value in want[kind].items():
                np.testing.assert_allclose(float(row[f"val/{kind}/{name}"]), value, rtol=1e-4, err_msg=f"{epoch} {kind}/{name}")
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(files) == 2 and "last.ckpt" in files and not any("pending" in f for f in files)
