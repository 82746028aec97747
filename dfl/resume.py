"""``dfl-train ... ckpt_path=last``: find the checkpoint, check it fits the configuration, keep the run's record.

- ``ckpt_path=last`` is ``<checkpoints folder>/last.ckpt`` of the run directory; without it the run
  stops with an error naming the folder (never a silent fresh start).
- A checkpoint whose network does not fit the composed configuration is refused with the settings
  that differ (and the original run's overrides missing from this command), in a few lines.
- Hydra's record of the original invocation (``.hydra/``) stays; a resume in the same run directory
  records its own under ``.hydra/resume-<time>/`` (see :func:`hydra_output_subdir`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RESUME_PREFIX = "resume-"


class ResumeError(ValueError):
    """A resume that cannot go ahead; the message says why and what to do."""


_chosen_output_subdir: str | None = None  # this process's choice, read back by resumed_record_dir


def hydra_output_subdir(output_dir: str, ckpt_path, stamp: str) -> str:
    """Where Hydra writes this invocation's config: ``.hydra``, or ``.hydra/resume-<stamp>`` for a resume in a
    run directory that already has a record (so the original config and overrides are not overwritten).

    The ``hydra.output_subdir`` resolver (``conf/hydra/default.yaml``).
    """
    global _chosen_output_subdir
    subdir = ".hydra"
    if ckpt_path not in (None, "") and (Path(output_dir) / ".hydra" / "overrides.yaml").is_file():
        subdir = f".hydra/{RESUME_PREFIX}{stamp}"
    _chosen_output_subdir = subdir
    return subdir


def resumed_record_dir(output_dir: Path) -> Path | None:
    """``.hydra/resume-<time>`` when this invocation resumes in an existing run directory, else None."""
    subdir = _chosen_output_subdir
    if subdir and Path(subdir).name.startswith(RESUME_PREFIX):
        return output_dir / subdir
    return None


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint file ``ckpt_path`` names (``last``: the run directory's ``last.ckpt``), or None."""
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, ""):
        return None
    if str(ckpt) == "last":
        folder = OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath", default=None)
        folder = Path(folder) if folder else Path(cfg.paths.output_dir) / "checkpoints"
        path = folder / "last.ckpt"
        if not path.is_file():
            raise ResumeError(
                f"ckpt_path=last: no last.ckpt in {folder}; nothing to resume (give hydra.run.dir=<the run's "
                "folder>, or ckpt_path=<a checkpoint file>, or leave ckpt_path out to start afresh)"
            )
        return str(path)
    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        raise ResumeError(f"ckpt_path={ckpt}: no such checkpoint file")
    return str(path)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_differences(saved: dict, current: dict, prefix: str) -> list[str]:
    a, b = _flat(saved), _flat(current)
    return [f"{prefix}.{k}: {a.get(k, '(not set)')} in the checkpoint, {b.get(k, '(not set)')} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _missing_overrides(output_dir: Path) -> list[str]:
    """Overrides of the run directory's original invocation that this invocation does not repeat."""
    import yaml
    from hydra.core.hydra_config import HydraConfig

    original = output_dir / ".hydra" / "overrides.yaml"
    if not original.is_file() or not HydraConfig.initialized():
        return []
    now = set(HydraConfig.get().overrides.task)
    ignore = ("ckpt_path=", "hydra.run.dir=", "trainer.max_epochs=")
    return [o for o in yaml.safe_load(original.read_text()) or []
            if o not in now and not str(o).startswith(ignore)]


def check_checkpoint_matches(ckpt_path: str, system, output_dir: Path, max_lines: int = 6) -> dict:
    """Refuse a checkpoint whose weights do not fit ``system`` (a :class:`ResumeError` in a few lines).

    Returns the checkpoint (loaded with ``weights_only=True``) for the caller's other uses.
    """
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    saved = ckpt.get("state_dict", {})
    current = system.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    reshaped = sorted(k for k in set(saved) & set(current) if tuple(saved[k].shape) != tuple(current[k].shape))
    if not (missing or unexpected or reshaped):
        return ckpt
    lines = []
    records = ckpt.get("dfl_models", {})
    for kind, module, key in (("denoiser", system.plain_denoiser, "model"),
                              ("lossnet", getattr(system.loss, "loss_network", None), "lossnet")):
        if kind in records and module is not None and hasattr(module, "config"):
            lines += _config_differences(records[kind].get("config", {}), dict(module.config), key)
    if not lines:
        for what, keys in (("missing from the checkpoint", missing), ("in the checkpoint only", unexpected),
                           ("of another shape", reshaped)):
            if keys:
                lines.append(f"{len(keys)} weight(s) {what}, e.g. {keys[0]}")
    omitted = _missing_overrides(output_dir)
    if omitted:
        lines.append(f"the original run's overrides not repeated now: {' '.join(omitted)}")
    shown = lines[:max_lines] + ([f"... and {len(lines) - max_lines} more"] if len(lines) > max_lines else [])
    raise ResumeError(f"{ckpt_path} does not match this configuration:\n  " + "\n  ".join(shown)
                      + "\nresume with the settings the checkpoint was trained with")
