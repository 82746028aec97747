"""``dfl-pretrain``: Hydra entry point that pretrains the loss network (scenes + tagging).

Wires the loss network, :class:`~dfl.systems.pretrain.PretrainSystem`, the data, callbacks,
loggers and trainer; then exports the chosen checkpoint's network as a dfl model file
(``lossnet.pt``) and its validation metrics (``metrics.json``) into the run directory.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dfl.run_setup import (
    CONF_DIR,
    apply_process_settings,
    import_lightning,
    instantiate_group,
    instantiate_trainer,
    log_config,
)

log = logging.getLogger(__name__)


def summarize(metrics: dict[str, float], tag_names) -> dict:
    """The validation numbers reported in ``metrics.json`` and the model file's meta."""
    return {
        "scene_acc": metrics.get("val/scene_acc"),
        "tags_eer_mean": metrics.get("val/tags_eer_mean"),
        "tags_eer": {t: metrics.get(f"val/tags_eer_{t}") for t in tag_names},
        "score": metrics.get("val/score"),
    }


def reestimation_clips(datamodule, limit: int | None = None, seed: int = 0):
    """A function returning the same whole training clips on every call: each task's clips in a seeded
    random order, interleaved (scene, tag, scene, ...), at most ``limit`` in all."""
    import itertools

    import numpy as np

    if getattr(datamodule, "train_sets", None) is None:
        datamodule.setup("fit")
    rng = np.random.default_rng(seed)
    per_task = [[(ds, int(i)) for i in rng.permutation(len(ds))] for ds in datamodule.train_sets.values()]
    picks = [pick for group in itertools.zip_longest(*per_task) for pick in group if pick is not None]
    picks = picks[:limit] if limit else picks
    return lambda: (ds[i]["wav"] for ds, i in picks)


def pretrain(cfg: DictConfig) -> dict:
    """Fit, validate the exported checkpoint, write ``lossnet.pt`` + ``metrics.json``; returns the metrics."""
    import_lightning()
    from hydra.utils import instantiate

    from dfl.audio import atomic_write
    from dfl.checkpoints import save_model
    from dfl.systems.pretrain import reestimate_bn_statistics

    if cfg.export_from not in ("best", "last"):
        raise ValueError(f"export_from must be 'best' or 'last', got {cfg.export_from!r}")
    apply_process_settings(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(cfg, resolve=True)))

    net = instantiate(cfg.net, _convert_="all")
    system = instantiate(cfg.system, net=net, _convert_="all")
    # Training crops start at the network's minimum input length (2^(layers+1) - 1 samples).
    datamodule = instantiate(cfg.data, min_crop_length=net.min_input_length, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer = instantiate_trainer(cfg, callbacks, loggers)
    log_config(loggers, cfg)

    trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    best_cb = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor), None)
    best = best_cb.best_model_path if best_cb else ""
    if cfg.export_from == "best" and best:
        source = best
        trainer.validate(system, datamodule=datamodule, ckpt_path=best, verbose=False)  # loads its weights
    else:  # the final weights, as in checkpoints/last.ckpt
        source = "final weights"
        if system.last_val_step != trainer.global_step:
            trainer.validate(system, datamodule=datamodule, verbose=False)

    if cfg.get("reestimate_bn"):
        clips = reestimation_clips(datamodule, cfg.get("reestimate_bn_clips"))
        n = reestimate_bn_statistics(system.net, clips)
        log.info("BN running statistics re-estimated layer by layer over %d training clips (whole clips, all frames)", n)
        trainer.validate(system, datamodule=datamodule, verbose=False)  # the metrics of the exported network

    tag_names = list(getattr(datamodule, "tag_names", system.tag_names))
    metrics = summarize(system.last_val_metrics, tag_names)
    metrics.update(exported=source, global_step=trainer.global_step, epoch=trainer.current_epoch)
    if trainer.is_global_zero:
        meta = {
            "trained_by": "dfl-pretrain",
            "data": cfg.data._target_,
            "scenes": list(getattr(datamodule, "scene_names", [])),
            "tags": tag_names,
            "val": summarize(system.last_val_metrics, tag_names),
        }
        model_file = save_model(out_dir / "lossnet.pt", "lossnet", system.net, meta)
        atomic_write(out_dir / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
        if cfg.get("export_path"):
            export = atomic_write(Path(cfg.export_path), lambda p: shutil.copyfile(model_file, p))
            log.info("exported the loss network to %s", export)
        log.info(
            "loss network %s: val scene accuracy %s, mean tagging EER %s",
            model_file, metrics["scene_acc"], metrics["tags_eer_mean"],
        )  # fmt: skip
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pretrain")
def main(cfg: DictConfig) -> float | None:
    return pretrain(cfg).get("score")


if __name__ == "__main__":
    main()
