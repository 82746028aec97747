import json
import os
import subprocess
import sys

import pytest
import torch

from callbacks import LossWeightBalancer
from tests.conftest import REPO, write_pair_tree
from tests.helpers.tiny_training import RecordPerLayer, datamodule, make_system, make_trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pair_tree(tmp_path_factory.mktemp("bal") / "pairs", splits=("train", "val"), n=4)


def independent_weights(rows, epochs, window):
    keep = [v for e, v in rows if (e < epochs if window == "all" else e == epochs - 1)]
    means = torch.tensor(keep, dtype=torch.float64).mean(0)
    return (1.0 / means).float()


@pytest.mark.parametrize("window", ["all", "last"])
def test_weights_are_inverse_means_after_n_epochs(tmp_path, data, window):
    record, balancer = RecordPerLayer(), LossWeightBalancer(epochs=2, window=window)
    system = make_system()
    trainer = make_trainer(tmp_path, 3, [balancer, record], enable_checkpointing=False)
    trainer.fit(system, datamodule=datamodule(data))
    expected = independent_weights(record.rows, 2, window)
    torch.testing.assert_close(system.loss.weights, expected)
    assert balancer.frozen_at_epoch == 2
    # weights were 1 during the balancing epochs, and the epoch-3 loss used the frozen weights
    assert len(record.rows) == 3 * 4


def test_weights_stay_one_before_n_and_the_run_is_warned_at_start(tmp_path, data):
    system = make_system()
    with pytest.warns(UserWarning, match=r"max_epochs=2 ends the run before .*loss_weight_balancer.epochs=3"):
        make_trainer(tmp_path, 2, [LossWeightBalancer(epochs=3)], enable_checkpointing=False).fit(
            system, datamodule=datamodule(data)
        )
    assert torch.equal(system.loss.weights, torch.ones(3))


def test_no_warning_when_the_balancer_freezes_within_the_run(tmp_path, data, recwarn):
    make_trainer(tmp_path, 2, [LossWeightBalancer(epochs=2)], enable_checkpointing=False).fit(
        make_system(), datamodule=datamodule(data)
    )
    assert not [w for w in recwarn if "balancer" in str(w.message)]


def test_resume_matches_uninterrupted_run(tmp_path, data):
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = make_system()
    make_trainer(tmp_path / "full", 4, [LossWeightBalancer(epochs=3)], enable_checkpointing=False).fit(
        full, datamodule=datamodule(data)
    )

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    first = make_system()
    make_trainer(tmp_path / "a", 2, [LossWeightBalancer(epochs=3), ckpt_cb]).fit(first, datamodule=datamodule(data))
    assert torch.equal(first.loss.weights, torch.ones(3))
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("LossWeightBalancer"))
    assert saved["count"] == 2 * 4 and saved["frozen_weights"] is None

    resumed_balancer = LossWeightBalancer(epochs=3)
    resumed = make_system(seed=99)  # different init: everything must come from the checkpoint
    make_trainer(tmp_path / "b", 4, [resumed_balancer]).fit(
        resumed, datamodule=datamodule(data), ckpt_path=str(tmp_path / "ck" / "last.ckpt")
    )
    torch.testing.assert_close(resumed.loss.weights, full.loss.weights)
    assert resumed_balancer.frozen_at_epoch == 3


def test_weights_identical_across_two_ddp_processes(tmp_path, data):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.tiny_training", str(data), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    all_rows = ranks[0]["rows"] + ranks[1]["rows"]
    assert len(ranks[0]["rows"]) == len(ranks[1]["rows"]) == 3 * 2  # 4 files split over 2 ranks
    torch.testing.assert_close(torch.tensor(ranks[0]["weights"]), independent_weights(all_rows, 2, "all"))
    # each rank alone would have given different weights: the reduction really happened
    assert not torch.allclose(torch.tensor(ranks[0]["weights"]), independent_weights(ranks[0]["rows"], 2, "all"))


def test_bad_settings():
    with pytest.raises(ValueError, match="window"):
        LossWeightBalancer(window="first")
    with pytest.raises(ValueError, match="epochs"):
        LossWeightBalancer(epochs=0)
