"""Composition of the experiment, trainer, logger, launcher and search configs (no training)."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from dfl.cli.train import check_required
from dfl.run_setup import CONF_DIR


def compose_train(*overrides, hydra=False):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def test_paper_fl_is_the_papers_recipe():
    cfg = compose_train("experiment=paper_fl")
    assert cfg.task_name == "paper_fl"
    assert cfg.data._target_ == "datamodules.PairedFolderDataModule"
    assert str(cfg.data.root).endswith("/voicebank") and cfg.data.batch_size == 1
    assert cfg.model.channels == 64 and len(cfg.model.dilations) == 15  # can_paper
    assert cfg.loss._target_ == "dfl.losses.FeatureLoss" and cfg.loss.layers is None
    assert cfg.lossnet.n_layers == 15
    assert cfg.callbacks.loss_weight_balancer.epochs == 10
    assert cfg.system.lr == pytest.approx(1e-4) and cfg.trainer.max_epochs == 320
    assert list(cfg.required_settings) == ["lossnet.checkpoint"]


def test_paper_fl_without_a_pretrained_loss_network_is_a_clear_error():
    with pytest.raises(ValueError, match=r"lossnet.checkpoint must be set.*lossnet.checkpoint=PATH"):
        check_required(compose_train("experiment=paper_fl"))
    check_required(compose_train("experiment=paper_fl", "lossnet.checkpoint=models/lossnet.ckpt"))


@pytest.mark.parametrize("name, target", [("paper_l1", "WaveformL1Loss"), ("paper_l2", "WaveformL2Loss")])
def test_paper_baselines(name, target):
    cfg = compose_train(f"experiment={name}")
    assert cfg.loss._target_ == f"dfl.losses.{target}" and cfg.task_name == name
    assert cfg.trainer.max_epochs == 320 and cfg.data.root.endswith("/voicebank")
    check_required(cfg)  # no loss network needed


@pytest.mark.parametrize(
    "trainer, expected",
    [("cpu", dict(accelerator="cpu", devices=1)), ("gpu", dict(accelerator="gpu", devices=1)),
     ("ddp", dict(accelerator="gpu", strategy="ddp", num_nodes=1, use_distributed_sampler=True)),
     ("ddp_sim", dict(accelerator="cpu", strategy="ddp", devices=2))],
)
def test_trainer_configs(trainer, expected):
    cfg = compose_train(f"trainer={trainer}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert {k: cfg.trainer[k] for k in expected} == expected


def test_ddp_sim_builds_a_two_process_gloo_trainer(tmp_path):
    cfg = compose_train("trainer=ddp_sim", f"paths.output_dir={tmp_path}")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.num_devices == 2 and type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.strategy._get_process_group_backend() == "gloo"


def test_submitit_slurm_launcher_follows_the_trainer():
    cfg = compose_train("hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                        "hydra.launcher.partition=gpu", hydra=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.partition == "gpu" and launcher.signal_delay_s > 0


def test_optuna_search_maximises_the_optimized_metric():
    cfg = compose_train("hparams_search=optuna", hydra=True)
    sweeper = cfg.hydra.sweeper
    assert get_class(sweeper._target_).__name__ == "OptunaSweeper"
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "test/enhanced/pesq"
    assert set(sweeper.params) == {"system.lr", "loss.layers"}


def test_wandb_logger_adds_the_media_callback_and_keeps_csv(tmp_path):
    cfg = compose_train("logger=wandb", f"paths.output_dir={tmp_path}")
    assert set(cfg.logger) == {"csv", "wandb"}
    assert cfg.callbacks.wandb_media._target_ == "callbacks.WandbMediaLogger"
    assert "loss_weight_balancer" in cfg.callbacks and "model_checkpoint" in cfg.callbacks
    assert "wandb_media" not in compose_train("logger=csv").callbacks


def test_sweep_runs_get_their_own_directory_and_a_shared_wandb_group():
    from dfl.hydra_resolvers import register

    register()
    cfg = compose_train("logger=wandb", hydra=True)
    assert "${hydra.job.num}" in OmegaConf.to_container(cfg.hydra.sweep)["subdir"]
    raw = OmegaConf.to_container(cfg.logger.wandb)
    assert raw["group"] == "${dfl_sweep_group:}" and raw["name"].startswith("${dfl_run_name:")


def test_authors_fl_is_the_authors_released_recipe():
    cfg = compose_train("experiment=authors_fl", "lossnet.checkpoint=models/loss_model.pt")
    check_required(cfg)
    with pytest.raises(ValueError, match="lossnet.checkpoint must be set"):
        check_required(compose_train("experiment=authors_fl"))
    # senet_train.py: 13 dilated layers 2^0..2^12, one more 3-tap layer, 64 channels, their norm and padding
    assert list(cfg.model.dilations) == [2**i for i in range(13)] + [1] and cfg.model.channels == 64
    assert cfg.model.padding == "tf_authors" and cfg.model.batch_stats_at_eval is True
    assert (cfg.model.bn_eps, cfg.model.bn_scale, cfg.model.init) == (1e-3, False, "xavier")
    # their 14-layer loss network, first 6 layers, each branch with its own batch statistics
    assert (cfg.lossnet.n_layers, cfg.lossnet.base_channels, cfg.lossnet.channel_block) == (14, 32, 5)
    assert cfg.lossnet.batch_stats_at_eval is True and cfg.loss.layers == 6
    # balancing on epoch 10 alone, Adam 1e-4, batch 1 whole utterances, 320 epochs
    assert (cfg.callbacks.loss_weight_balancer.epochs, cfg.callbacks.loss_weight_balancer.window) == (10, "last")
    assert cfg.system.lr == pytest.approx(1e-4) and tuple(cfg.system.betas) == (0.9, 0.999)
    assert cfg.data.batch_size == 1 and cfg.data.crop_seconds is None and not cfg.data.bucket
    assert cfg.trainer.max_epochs == 320
    # all 28 speakers train, the test set validates (loss only, every 10 epochs), the final model is reported
    assert cfg.data.val_split == "test" and list(cfg.system.val_metrics) == []
    assert cfg.trainer.check_val_every_n_epoch == 10
    assert cfg.callbacks.model_checkpoint.monitor is None and cfg.test_checkpoint == "last"


def test_the_authors_loss_network_is_never_used_whole_by_accident(tmp_path):
    from dfl.checkpoints import save_model
    from dfl.losses import FeatureLoss, build_loss_network
    from dfl.models import LossNetwork

    imported = tmp_path / "loss_model.pt"
    save_model(imported, "lossnet", LossNetwork(n_layers=14, base_channels=4), {"source": "tensorflow"})
    with pytest.raises(ValueError, match=r"first 6 layers: use loss=fl_authors .* or loss.layers=all"):
        FeatureLoss(build_loss_network(str(imported)))  # what paper_fl's loss=fl would do
    assert len(FeatureLoss(build_loss_network(str(imported)), layers="all").layers) == 14  # said on purpose
    assert FeatureLoss(build_loss_network(str(imported)), layers=6).layers == list(range(6))
    own = tmp_path / "lossnet.pt"  # a dfl-pretrain network: every layer by default, as the paper says
    save_model(own, "lossnet", LossNetwork(n_layers=5, base_channels=4), {"trained_by": "dfl-pretrain"})
    assert len(FeatureLoss(build_loss_network(str(own))).layers) == 5


def test_pretrain_authors_is_the_authors_pretraining():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("pretrain", overrides=["pretrain/experiment=authors", "pretrain/data=dcase2016"])
    assert (cfg.net.n_layers, cfg.net.base_channels, cfg.net.channel_block) == (14, 32, 5)
    assert cfg.mode == "alternate" and cfg.system.optimizer_per_task is True
    assert cfg.system.lr == pytest.approx(1e-4) and cfg.system.lr_schedule == "constant"
    assert cfg.data.batch_size == 1 and cfg.data.max_crop_length is None
    assert cfg.trainer.max_epochs == 2500 and cfg.trainer.check_val_every_n_epoch == 25
