"""OmegaConf resolvers used by the configs (registered when ``dfl.train`` is imported)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def sweep_group() -> str:
    """``<job name>-<sweep dir name>`` inside a multirun (so W&B groups one sweep's runs), else ``""``."""
    from hydra.types import RunMode

    hc = _hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return ""
    return f"{hc.job.name}-{Path(hc.runtime.output_dir).parent.name}"


def run_name(default: str) -> str:
    """A sweep run's overrides (``loss=l1,model.lr=0.001``), else ``default``."""
    hc = _hydra_config()
    overrides = hc.job.override_dirname if hc is not None else ""
    return overrides or default


def register() -> None:
    OmegaConf.register_new_resolver("dfl_sweep_group", sweep_group, replace=True)
    OmegaConf.register_new_resolver("dfl_run_name", run_name, replace=True)
