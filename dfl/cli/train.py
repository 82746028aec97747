"""``dfl-train``: Hydra entry point that wires data, denoiser, loss, callbacks, loggers and trainer."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dfl.resume import check_checkpoint_matches, resolve_ckpt_path, resumed_record_dir
from dfl.run_setup import (
    CONF_DIR,
    apply_process_settings,
    import_lightning,
    instantiate_group,
    instantiate_trainer,
    is_global_zero,
    log_config,
)

log = logging.getLogger(__name__)


def collect_test_metrics(callback_metrics: dict) -> dict:
    """``{"noisy": {...}, "enhanced": {...}}`` from the ``test/<kind>/<metric>`` logged values."""
    out: dict[str, dict[str, float]] = {"noisy": {}, "enhanced": {}}
    for key, value in callback_metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "test" and parts[1] in out:
            out[parts[1]][parts[2]] = float(value)
    return out


def print_metrics_table(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Test split (mean over utterances)")
    table.add_column("metric")
    for col in ("noisy", "enhanced", "Δ"):
        table.add_column(col, justify="right")
    for name in sorted(set(metrics["noisy"]) | set(metrics["enhanced"])):
        n, e = metrics["noisy"].get(name), metrics["enhanced"].get(name)
        delta = f"{e - n:+.3f}" if n is not None and e is not None else "—"
        table.add_row(name, f"{n:.3f}" if n is not None else "—", f"{e:.3f}" if e is not None else "—", delta)
    Console().print(table)


def check_required(cfg: DictConfig) -> None:
    """Every key in ``required_settings`` (set by experiments) must be given a non-null value."""
    missing = [k for k in cfg.get("required_settings") or [] if OmegaConf.select(cfg, k) in (None, "")]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} must be set for this configuration (required_settings); "
            f"add e.g. {missing[0]}=PATH to the command line"
        )


def close_wandb_runs(loggers: list) -> None:
    """Finish the W&B run of this job, so the next job of an in-process sweep starts its own."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()


def train(cfg: DictConfig) -> dict:
    """Fit, then test the best checkpoint (or the final weights: ``test_checkpoint=last``); returns the test
    metrics (written to metrics.json)."""
    import_lightning()
    from hydra.utils import instantiate

    from dfl.audio import atomic_write

    # The frozen loss network is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning internals vs torch 2.11
    warnings.filterwarnings("ignore", message=r".*RANDOMLY INITIALISED.*")  # logged once by build_loss_network

    check_required(cfg)
    if cfg.get("test_checkpoint", "best") not in ("best", "last"):
        raise ValueError(f"test_checkpoint must be 'best' or 'last', got {cfg.test_checkpoint!r}")
    apply_process_settings(cfg)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg)  # before any file is written: a missing checkpoint is an error
    record_dir = resumed_record_dir(out_dir)  # resuming in place: the original config.yaml stays
    if is_global_zero():  # DDP ranks > 0 re-run this script: only rank 0 writes files
        log.info("run directory: %s", out_dir.resolve())
        out_dir.mkdir(parents=True, exist_ok=True)
        config_file = out_dir / "config.yaml" if record_dir is None else record_dir / "config_resolved.yaml"
        atomic_write(config_file, lambda p: p.write_text(OmegaConf.to_yaml(cfg, resolve=True)))

    datamodule = instantiate(cfg.data, _convert_="all")
    if getattr(datamodule, "resumes_mid_epoch", False):  # Lightning cannot tell; see datamodules/resume.py
        warnings.filterwarnings("ignore", message=r".*checkpoint that ended before the epoch ended.*")
    system = instantiate(
        cfg.system, denoiser=instantiate(cfg.model, _convert_="all"), loss=instantiate(cfg.loss, _convert_="all"),
        _convert_="all",
    )
    resumed_step = None
    if ckpt_path is not None:  # a mismatch in a few lines, not Lightning's state_dict error
        resumed_step = int(check_checkpoint_matches(ckpt_path, system, out_dir).get("global_step", 0))
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if resumed_step is not None:
        continue_logs(loggers, resumed_step)
    trainer = instantiate_trainer(cfg, callbacks, loggers)

    try:
        log_config(loggers, cfg)
        return fit_and_test(cfg, trainer, system, datamodule, out_dir, ckpt_path)
    finally:
        close_wandb_runs(loggers)


def continue_logs(loggers: list, resumed_step: int) -> None:
    """Resuming from a checkpoint at ``resumed_step``: the loggers continue the run's earlier record.

    CSV keeps the rows logged before that step (later ones were logged after the checkpoint and are
    logged again); TensorBoard purges its events from that step on (``purge_step``); W&B continues
    the run directory's last W&B run (same run id; W&B cannot drop what was logged after the checkpoint).
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from dfl.loggers import CSVLogger, last_wandb_run_id

    for lg in loggers:
        if isinstance(lg, CSVLogger):
            lg.keep_before_step = resumed_step
        elif isinstance(lg, TensorBoardLogger) and hasattr(lg, "_kwargs"):
            lg._kwargs.setdefault("purge_step", resumed_step)
        elif isinstance(lg, WandbLogger) and hasattr(lg, "_wandb_init") and not lg._wandb_init.get("id"):
            run_id = last_wandb_run_id(Path(lg.save_dir or ".") / "wandb")
            if run_id:
                lg._wandb_init.update(id=run_id, resume="allow")
                lg._id = run_id


def best_checkpoint_facts(ckpt_cb, best: str) -> dict:
    """The best checkpoint's epoch and the validation value it was chosen on (for metrics.json, sweep tables)."""
    if not best:
        return {}
    import torch

    score = getattr(ckpt_cb, "best_model_score", None)
    return {
        "best_epoch": int(torch.load(best, map_location="cpu", weights_only=True, mmap=True)["epoch"]),
        "chosen_on": {str(ckpt_cb.monitor): float(score)} if score is not None and ckpt_cb.monitor else None,
    }


def fit_and_test(cfg: DictConfig, trainer, system, datamodule, out_dir: Path, ckpt_path: str | None = None) -> dict:
    from dfl.audio import atomic_write

    trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)

    results: dict = {}
    if cfg.get("test", True):
        ckpt_cb = getattr(trainer, "checkpoint_callback", None)
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb else ""
        if cfg.get("test_checkpoint", "best") == "last":
            best = ""  # the final weights, in memory (the authors reported their final model)
        trainer.test(system, datamodule=datamodule, ckpt_path=best or None, verbose=False)  # our table below
        results = collect_test_metrics(trainer.callback_metrics)
        results["checkpoint"] = best or "final weights"
        results.update(best_checkpoint_facts(ckpt_cb, best))
        if trainer.is_global_zero:
            atomic_write(out_dir / "metrics.json", lambda p: p.write_text(json.dumps(results, indent=2)))
            print_metrics_table(results)
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    if is_global_zero():
        log.info("outputs in %s", Path(cfg.paths.output_dir).resolve())
    # The value Optuna / other sweepers optimise.
    objective = cfg.get("optimized_metric")
    if objective:
        stage, kind, name = objective.split("/")
        return results.get(kind, {}).get(name)
    return None


if __name__ == "__main__":
    main()
