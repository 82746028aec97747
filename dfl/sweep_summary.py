"""After ``dfl-train -m ...``: one table comparing the sweep's runs (``summary.csv``, ``summary.md``, the console, W&B).

A Hydra callback (``hydra.callbacks.sweep_summary`` in ``conf/train.yaml``), run once when every job
of the multirun has returned, whatever the sweeper (basic grid, Optuna) or launcher.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

KINDS = ("noisy", "enhanced")


def run_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's run folders (those Hydra recorded), in job order."""
    def job_number(p: Path) -> tuple:
        head = p.name.split("_", 1)[0]
        return (int(head), p.name) if head.isdigit() else (1 << 30, p.name)

    return sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()), key=job_number)


def _overrides(run: Path) -> dict[str, str]:
    from dfl.hydra_resolvers import _parse

    parsed = _parse(yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or [])
    return {o.get_key_element(): o.get_value_element_as_str() for o in parsed}


def swept_keys(per_run: list[dict[str, str]], declared: set[str]) -> list[str]:
    """The sweep's settings: those declared swept (command line, sweeper params) and any that differ between runs."""
    keys: list[str] = []
    for overrides in per_run:
        for key in overrides:
            values = {o.get(key) for o in per_run}
            if key not in keys and (key in declared or len(values) > 1):
                keys.append(key)
    return keys


def summary_rows(sweep_dir: Path, declared: set[str] = frozenset()) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)``: one row per run — swept settings, test metrics noisy/enhanced, best epoch, folder.

    A run without ``metrics.json`` (failed, or ``test=false``) has empty metric cells.
    """
    runs = run_dirs(sweep_dir)
    per_run = [_overrides(r) for r in runs]
    keys = swept_keys(per_run, set(declared))
    results = []
    for run in runs:
        path = run / "metrics.json"
        results.append(json.loads(path.read_text()) if path.is_file() else {})
    metrics = sorted({m for res in results for k in KINDS for m in res.get(k, {})})
    columns = [*keys, *(f"{k}/{m}" for m in metrics for k in KINDS), "best_epoch", "run"]
    rows = []
    for run, overrides, res in zip(runs, per_run, results):
        row: dict[str, Any] = {k: overrides.get(k, "") for k in keys}
        for m in metrics:
            for k in KINDS:
                row[f"{k}/{m}"] = res.get(k, {}).get(m)
        row["best_epoch"] = res.get("best_epoch")
        row["run"] = run.name
        rows.append(row)
    return columns, rows


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def to_markdown(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, columns: list[str], rows: list[dict]) -> str:
    """Write ``summary.csv`` and ``summary.md`` into the sweep folder (atomically); returns the markdown."""
    from dfl.audio import atomic_write

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({c: _cell(r[c]) for c in columns} for r in rows)

    markdown = to_markdown(columns, rows)
    atomic_write(sweep_dir / "summary.csv", write_csv)
    atomic_write(sweep_dir / "summary.md", lambda p: p.write_text(f"# Sweep {sweep_dir.name}\n\n{markdown}"))
    return markdown


def _wandb_settings(config: DictConfig) -> dict | None:
    entry = OmegaConf.select(config, "logger.wandb", default=None)
    if entry is None or "WandbLogger" not in str(entry.get("_target_", "")):
        return None
    return {k: OmegaConf.select(entry, k, default=None) for k in ("project", "entity", "offline", "tags")}


def log_to_wandb(settings: dict, sweep_dir: Path, group: str, columns: list[str], rows: list[dict]) -> None:
    """The same table as a W&B run of the sweep's group (job type ``sweep_summary``)."""
    import wandb

    run = wandb.init(project=settings.get("project"), entity=settings.get("entity"), group=group,
                     name=f"{group}-summary", job_type="sweep_summary", dir=str(sweep_dir),
                     mode="offline" if settings.get("offline") else None, reinit=True)
    run.log({"sweep/summary": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})
    run.finish()


class SweepSummary(Callback):
    """Writes the sweep folder's ``summary.csv`` / ``summary.md``, prints the table, logs it to W&B with ``logger=wandb``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from dfl.hydra_resolvers import _parse

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        declared = {o.get_key_element() for o in _parse(config.hydra.overrides.task) if o.is_sweep_override()}
        declared |= set(OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})
        columns, rows = summary_rows(sweep_dir, declared)
        if not rows:
            return
        markdown = write_summary(sweep_dir, columns, rows)
        print(f"\nSweep summary ({sweep_dir / 'summary.csv'}):\n{markdown}")
        settings = _wandb_settings(config)
        if settings is not None:
            try:
                log_to_wandb(settings, sweep_dir, f"{config.hydra.job.name}-{sweep_dir.name}", columns, rows)
            except Exception as exc:  # the files are written; W&B trouble must not fail the finished sweep
                log.warning("sweep summary not logged to W&B: %s", exc)
