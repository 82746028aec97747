"""Loss-network pretraining: EER metric, PretrainSystem, and a short `dfl-pretrain` run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules.synthetic_scenes import SyntheticScenesDataModule
from dfl.checkpoints import load_model, safe_load
from dfl.metrics.eer import EqualErrorRate, equal_error_rate
from dfl.models import LossNetwork
from dfl.systems.pretrain import PretrainSystem

REPO = Path(__file__).resolve().parents[1]
TINY_NET = dict(n_layers=4, base_channels=4, channel_block=2, heads={"scene": 15, "tags": 7})


# ------------------------------------------------------------------------------------------ EER
@pytest.mark.parametrize(
    "scores, targets, expected",
    [
        # ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1): FPR = FNR = 0.5 on the flat segment
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.5),
        # threshold 0.7: 1 false positive of 3, 1 missed positive of 3
        ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 0, 1, 1, 0, 0], 1 / 3),
        # a positive and a negative tied at 0.5: ROC segment (0,.5)-(.5,1) crosses fpr = 1 - tpr at .25
        ([0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0], 0.25),
        ([3.0, 2.0, -1.0, -2.0], [1, 1, 0, 0], 0.0),  # separable (logits are fine)
        ([-3.0, -2.0, 1.0, 2.0], [1, 1, 0, 0], 1.0),  # inverted
    ],
)
def test_eer_matches_hand_computed_values(scores, targets, expected):
    assert equal_error_rate(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(expected, abs=1e-6)


def test_eer_undefined_and_invalid_inputs():
    assert math.isnan(equal_error_rate(torch.tensor([0.1, 0.2]), torch.tensor([0, 0])))
    assert math.isnan(equal_error_rate(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="NaN or Inf"):
        equal_error_rate(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0 or 1"):
        equal_error_rate(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))


def test_eer_metric_accumulates_batches_per_label():
    g = torch.Generator().manual_seed(0)
    scores, targets = torch.randn(40, 3, generator=g), (torch.rand(40, 3, generator=g) > 0.5).long()
    targets[:, 2] = 0  # label without positives: undefined
    metric = EqualErrorRate(num_labels=3)
    metric.update(scores[:25], targets[:25])
    metric.update(scores[25:], targets[25:])
    eer = metric.compute()
    for k in range(2):
        assert eer[k].item() == pytest.approx(equal_error_rate(scores[:, k], targets[:, k]))
    assert math.isnan(eer[2])
    with pytest.raises(ValueError, match=r"\[batch, 3\]"):
        metric.update(scores[:, :2], targets[:, :2])


# -------------------------------------------------------------------------------------- system
def _batch(n_scene: int, n_tags: int, length: int = 400) -> dict:
    g = torch.Generator().manual_seed(1)
    n = n_scene + n_tags
    is_scene = torch.arange(n) < n_scene
    return {
        "wav": torch.randn(n, length, generator=g),
        "scene": torch.where(is_scene, torch.randint(15, (n,), generator=g), -1),
        "tags": torch.where(is_scene[:, None], 0.0, (torch.rand(n, 7, generator=g) > 0.5).float()),
        "is_scene": is_scene,
        "is_tags": ~is_scene,
    }


def test_heads_shapes_and_masked_losses():
    system = PretrainSystem(LossNetwork(**TINY_NET), mode="mixed")
    batch = _batch(3, 2)
    logits = system(batch["wav"])
    assert logits["scene"].shape == (5, 15) and logits["tags"].shape == (5, 7)
    losses, _ = system._losses(batch)
    # each task's loss covers only its own examples
    torch.testing.assert_close(losses["scene"], F.cross_entropy(logits["scene"][:3], batch["scene"][:3]))
    torch.testing.assert_close(
        losses["tags"], F.binary_cross_entropy_with_logits(logits["tags"][3:], batch["tags"][3:])
    )
    assert set(system._losses(_batch(2, 0))[0]) == {"scene"}


def test_training_step_rejects_batches_of_the_other_mode():
    with pytest.raises(ValueError, match="data.mode"):
        PretrainSystem(LossNetwork(**TINY_NET), mode="alternate").training_step(_batch(2, 2), 0)
    with pytest.raises(ValueError, match="data.mode"):
        PretrainSystem(LossNetwork(**TINY_NET), mode="mixed").training_step({"scene": _batch(2, 0)}, 0)


def test_system_rejects_networks_without_the_heads():
    with pytest.raises(ValueError, match="'scene' head"):
        PretrainSystem(LossNetwork(n_layers=3, base_channels=4, heads={"tags": 7}))
    with pytest.raises(ValueError, match="7 tag names"):
        PretrainSystem(LossNetwork(n_layers=3, base_channels=4, heads={"scene": 15, "tags": 5}))
    with pytest.raises(ValueError, match="system.mode"):
        PretrainSystem(LossNetwork(**TINY_NET), mode="both")
    with pytest.raises(ValueError, match="system.lr_schedule"):
        PretrainSystem(LossNetwork(**TINY_NET), lr_schedule="step")


@torch.no_grad()
def test_bn_reestimation_gives_each_layer_the_statistics_the_exported_network_sees():
    from dfl.systems.pretrain import reestimate_bn_statistics

    torch.manual_seed(0)
    net = LossNetwork(n_layers=4, base_channels=4, channel_block=2)
    g = torch.Generator().manual_seed(1)
    clips = [torch.randn(n, generator=g) * scale + shift for n, scale, shift in ((900, 1.0, 0.0), (1500, 3.0, 0.5), (700, 0.2, -1.0))]
    params = {k: v.clone() for k, v in net.named_parameters()}
    net.train()
    assert reestimate_bn_statistics(net, lambda: iter(clips)) == 3
    assert net.training  # mode restored
    # independently: the plain eval-mode forward, every BN's input pooled over all frames of all clips
    net.eval()
    seen = {i: [] for i in range(4)}
    hooks = [norm.register_forward_pre_hook(lambda m, inp, i=i: seen[i].append(inp[0][0].double()))
             for i, norm in enumerate(net.norms)]  # fmt: skip
    for clip in clips:
        net(clip[None])  # parameters require grad: the plain path, which calls every BN
    for h in hooks:
        h.remove()
    for i, norm in enumerate(net.norms):
        frames = torch.cat(seen[i], dim=1)
        assert frames.shape[1] == sum(-(-len(c) // 2 ** min(i + 1, 3)) for c in clips)
        torch.testing.assert_close(norm.running_mean, frames.mean(1).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.running_var, frames.var(1).float(), rtol=1e-5, atol=1e-6)
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
    before = net.norms[0].running_mean.clone()
    assert reestimate_bn_statistics(net, lambda: iter([])) == 0 and torch.equal(net.norms[0].running_mean, before)


def test_alternate_mode_gives_each_task_its_own_adam(tmp_path):
    L.seed_everything(0)
    net = LossNetwork(**TINY_NET)
    dm = SyntheticScenesDataModule(
        tmp_path / "syn", scenes_train_per_class=1, scenes_val_per_class=1, scene_seconds=0.2,
        chunks_train=8, chunks_val=8, chunk_seconds=0.25, mode="alternate", batch_size=4,
        min_crop_length=net.min_input_length,
    )  # fmt: skip
    system = PretrainSystem(net, mode="alternate", lr=1e-2)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(system, datamodule=dm)
    scene_opt, tags_opt = trainer.optimizers
    heads = {name: [p for n, p in net.named_parameters() if n.startswith(f"heads.{name}.")] for name in ("scene", "tags")}
    trunk = [p for n, p in net.named_parameters() if n.startswith("convs.")]
    for opt, own, other in ((scene_opt, "scene", "tags"), (tags_opt, "tags", "scene")):
        assert all(int(opt.state[p]["step"]) == 2 for p in trunk + heads[own])  # 2 steps, one update each
        assert not any(p in opt.state for p in heads[other])  # never saw the other task's gradients
    assert not torch.equal(scene_opt.state[trunk[0]]["exp_avg"], tags_opt.state[trunk[0]]["exp_avg"])
    # shared: one Adam; mixed batches cannot have one per task
    assert len(PretrainSystem(LossNetwork(**TINY_NET), mode="alternate", optimizer_per_task=False).tasks) == 1
    assert len(PretrainSystem(LossNetwork(**TINY_NET), mode="mixed").tasks) == 1
    with pytest.raises(ValueError, match="optimizer_per_task=true needs system.mode=alternate"):
        PretrainSystem(LossNetwork(**TINY_NET), mode="mixed", optimizer_per_task=True)


@pytest.mark.parametrize("mode, lr_schedule", [("alternate", "cosine"), ("mixed", "constant")])
def test_fit_updates_both_heads_and_logs_metrics(tmp_path, mode, lr_schedule):
    L.seed_everything(0)
    net = LossNetwork(**TINY_NET)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    system = PretrainSystem(net, mode=mode, lr=1e-2, lr_schedule=lr_schedule)
    dm = SyntheticScenesDataModule(
        tmp_path / "syn", scenes_train_per_class=1, scenes_val_per_class=1, scene_seconds=0.2,
        chunks_train=8, chunks_val=8, chunk_seconds=0.25, mode=mode, batch_size=4,
        min_crop_length=net.min_input_length,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=2,
    )  # fmt: skip
    trainer.fit(system, datamodule=dm)
    # alternate: one update per task per step (2 steps x 2); mixed: one per step
    assert trainer.global_step == 4
    final_lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert final_lr == (pytest.approx(0.0, abs=1e-9) if lr_schedule == "cosine" else 1e-2)
    after = net.state_dict()
    for name in ("heads.scene.weight", "heads.tags.weight", "convs.0.weight"):
        assert not torch.equal(before[name], after[name]), name
    m = system.last_val_metrics
    assert 0 <= m["val/scene_acc"] <= 1 and 0 <= m["val/tags_eer_mean"] <= 1
    assert m["val/score"] == pytest.approx((m["val/scene_acc"] + 1 - m["val/tags_eer_mean"]) / 2)
    assert {f"val/tags_eer_{t}" for t in "cmfvpbo"} <= set(m)


# ------------------------------------------------------------------------------ dfl-pretrain
def test_dfl_pretrain_writes_checkpoints_and_a_loadable_lossnet(tmp_path):
    run = tmp_path / "run"
    export = tmp_path / "models" / "lossnet_test.pt"
    cmd = [
        sys.executable, "-m", "dfl.cli.pretrain", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}",
        "net.n_layers=4", "net.base_channels=4", "data.scenes_train_per_class=1", "data.scenes_val_per_class=1",
        "data.scene_seconds=0.2", "data.chunks_train=8", "data.chunks_val=8", "data.chunk_seconds=0.25",
        "data.batch_size=4", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", f"export_path={export}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "lossnet.pt", "metrics.json", "config.yaml"):
        assert (run / f).is_file(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["scene_acc"] <= 1 and 0 <= metrics["tags_eer_mean"] <= 1
    assert metrics["exported"].endswith("best.ckpt") and set(metrics["tags_eer"]) == set("cmfvpbo")
    assert export.read_bytes() == (run / "lossnet.pt").read_bytes()
    assert "glibc keeps freed buffers for reuse" in (run / "pretrain.log").read_text()  # keep_freed_memory: true

    wav = torch.randn(2, 500)
    nets = {f: load_model(run / f, "lossnet") for f in ("lossnet.pt", "checkpoints/best.ckpt")}
    for net in nets.values():
        assert (
            isinstance(net, LossNetwork)
            and net.n_layers == 4
            and net.config["heads"] == {"scene": 15, "tags": 7}
        )
        net.eval()
    # lossnet.pt is the best checkpoint's network, its BN statistics re-estimated over the 38 training clips
    # (15 scenes x 2 channels + 8 tagging chunks)
    exported, best = (safe_load(run / f) for f in ("lossnet.pt", "checkpoints/best.ckpt"))
    best = best["dfl_models"]["lossnet"]["state_dict"]
    for key, value in exported["state_dict"].items():
        if "running_" in key:
            assert not torch.equal(value, best[key]), key
        else:
            torch.testing.assert_close(value, best[key], rtol=0, atol=0, msg=key)
    assert "re-estimated layer by layer over 38 training clips" in (run / "pretrain.log").read_text()
    with torch.no_grad():
        a = nets["lossnet.pt"].classify(wav)
    assert a["scene"].shape == (2, 15) and a["tags"].shape == (2, 7)
    meta = safe_load(run / "lossnet.pt")["meta"]
    assert meta["tags"] == list("cmfvpbo") and len(meta["scenes"]) == 15
    assert meta["val"]["scene_acc"] == pytest.approx(metrics["scene_acc"])
    assert load_model(run / "checkpoints/last.ckpt", "lossnet").n_layers == 4


def test_dfl_pretrain_mixed_mode_exports_the_final_weights(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "dfl.cli.pretrain", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}",
        "mode=mixed", "export_from=last", "num_threads=1", "reestimate_bn=false", "net.n_layers=3", "net.base_channels=4",
        "data.scenes_train_per_class=1", "data.scenes_val_per_class=1", "data.scene_seconds=0.2",
        "data.chunks_train=8", "data.chunks_val=8", "data.chunk_seconds=0.25", "data.batch_size=4",
        "trainer.max_steps=5", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "~logger",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["exported"] == "final weights" and metrics["global_step"] == 5
    exported = safe_load(run / "lossnet.pt")["state_dict"]
    last = safe_load(run / "checkpoints" / "last.ckpt")["dfl_models"]["lossnet"]["state_dict"]
    assert exported.keys() == last.keys()
    for key in exported:
        torch.testing.assert_close(exported[key], last[key], msg=key)
