"""OmegaConf resolvers used by the configs (registered when ``dfl.cli.train`` is imported)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

# The Hydra configs ship inside the package (``dfl/conf`` links to the top-level ``conf/``, their
# source; a wheel holds a copy), so the entry points work from any directory and from a wheel.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


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
    """A sweep run's swept settings (``loss=l1``), else ``default``."""
    from hydra.types import RunMode

    hc = _hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return default
    return sweep_run_dirname()


def safe_dirname(text: str, max_len: int = 120) -> str:
    """``text`` usable as one directory name: no path separators, at most ``max_len`` characters."""
    text = str(text).replace("/", "_").replace("\\", "_").replace("~", "del-") or "run"
    return text if len(text) <= max_len else text[: max_len - 9] + "~" + format(hash_text(text), "08x")


def hash_text(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


def _parse(overrides) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([str(o) for o in overrides])
    except Exception:  # not Hydra overrides (e.g. a launcher's own argv): nothing swept
        return []


def swept_keys() -> set[str]:
    """Keys a sweep varies: sweep overrides on the command line (``loss=l1,fl``) and the sweeper's params."""
    import sys

    keys = {o.get_key_element() for o in _parse(a for a in sys.argv[1:] if "=" in a) if o.is_sweep_override()}
    hc = _hydra_config()
    params = hc.sweeper.get("params") if hc is not None else None
    return keys | set(params or {})


def sweep_run_dirname() -> str:
    """``<key=value,...>`` of the swept settings of this run (all its overrides if none is known)."""
    hc = _hydra_config()
    if hc is None:
        return "run"
    keys = swept_keys()
    task = _parse(hc.overrides.task)
    chosen = [o for o in task if o.get_key_element() in keys] or task
    text = ",".join(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in chosen)
    return safe_dirname(text or "run")


def rank_zero_path(path: str) -> str:
    """``path`` on rank 0, the null device on the other ranks of a distributed run (only rank 0 writes)."""
    import os

    # The launchers' rank variables, read here rather than through Lightning: this resolver runs while
    # Hydra sets up logging, and importing Lightning before the root logger has handlers makes it add
    # its own console handler (every Lightning message printed twice, and missing from the log file).
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):  # Lightning's order
        if os.environ.get(key):
            return path if int(os.environ[key]) == 0 else os.devnull
    return path


def hydra_output_subdir(output_dir: str, ckpt_path, stamp: str) -> str:
    from dfl.resume import hydra_output_subdir as choose

    return choose(output_dir, ckpt_path, stamp)


def register() -> None:
    OmegaConf.register_new_resolver("dfl_hydra_output_subdir", hydra_output_subdir, replace=True)
    OmegaConf.register_new_resolver("dfl_sweep_group", sweep_group, replace=True)
    OmegaConf.register_new_resolver("dfl_run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("dfl_rank_zero_path", rank_zero_path, replace=True)
    OmegaConf.register_new_resolver("dfl_sweep_run_dirname", sweep_run_dirname, replace=True)
