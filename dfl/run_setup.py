"""What the Hydra entry points (``dfl-train``, ``dfl-pretrain``) share: Lightning imported quietly, the run's
process settings (threads, TF32, seed, ...), and callbacks, loggers and trainer instantiated from the config."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from dfl import hydra_resolvers

hydra_resolvers.register()

CONF_DIR = hydra_resolvers.CONF_DIR


def import_lightning():
    """``import lightning``, logging through Hydra's handlers only.

    The ``lightning`` package adds its own console handler to its logger, which also propagates to
    the root logger Hydra configured (console + the run's log file): every message came out twice.

    Returns:
        The ``lightning`` module.
    """
    import lightning

    if logging.getLogger().handlers:
        for handler in list(logging.getLogger("lightning").handlers):
            if type(handler) is logging.StreamHandler:
                logging.getLogger("lightning").removeHandler(handler)
    # an advertisement for a hosted logger on every run, not information about this one
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())
    return lightning


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa) for float32 convolutions and matrix products on NVIDIA GPUs, or not.

    PyTorch's default: TF32 for cuDNN convolutions, full float32 for matrix products. On an H200 the
    gradients of a ``can_paper`` feature-loss step with TF32 were 3.1e-2 (relative) from the same step
    without it; ``tf32=false`` when that matters more than speed.

    Args:
        enabled: allow TF32 for both convolutions and matrix products.
    """
    import torch

    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def apply_process_settings(cfg: DictConfig) -> None:
    """Apply the run's process-wide settings that are given: ``num_threads``, ``tf32``, ``keep_freed_memory``,
    ``cuda_conv`` and ``seed`` (Lightning's ``seed_everything``, workers included).

    Args:
        cfg: the composed run config; absent or null keys leave the process as it is.
    """
    if cfg.get("num_threads"):  # small convs on a busy CPU often run faster on fewer threads
        import torch

        torch.set_num_threads(int(cfg.num_threads))
    if cfg.get("tf32") is not None:
        set_tf32(bool(cfg.tf32))
    from dfl.memory import configure_freed_memory

    configure_freed_memory(bool(cfg.get("keep_freed_memory")))
    if cfg.get("cuda_conv") is not None:
        from dfl.models.conv import set_cuda_conv

        set_cuda_conv(cfg.cuda_conv)
    if cfg.get("seed") is not None:
        import_lightning().seed_everything(cfg.seed, workers=True)


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` of a dict-like group (callbacks, loggers).

    Args:
        cfg: the group's config (e.g. ``cfg.callbacks``); ``None`` or empty gives ``[]``.

    Returns:
        The instantiated objects, in the group's order; null entries are skipped.
    """
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(c, _convert_="all") for c in cfg.values() if c is not None and "_target_" in c]


def instantiate_trainer(cfg: DictConfig, callbacks: list, loggers: list):
    """The Lightning ``Trainer`` of ``cfg.trainer`` with these callbacks and loggers.

    Args:
        cfg: the composed run config.
        callbacks: from ``instantiate_group(cfg.callbacks)``.
        loggers: from ``instantiate_group(cfg.logger)``; none turns Lightning's default logger off.

    Returns:
        The trainer.
    """
    from hydra.utils import instantiate

    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")


def log_config(loggers: list, cfg: DictConfig) -> None:
    """The composed, resolved config next to every logger's metrics.

    Args:
        loggers: the run's Lightning loggers.
        cfg: the composed run config.
    """
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))


def is_global_zero() -> bool:
    """Rank 0 of a (possibly distributed) run, known before the Trainer exists (from the launcher's env).

    Returns:
        True on rank 0 or without distribution.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
