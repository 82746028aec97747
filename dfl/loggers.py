"""Loggers that keep a run's record across ``ckpt_path=...`` resumes."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` keeps its rows logged before ``keep_before_step``.

    Lightning's writer deletes the file when it starts. Rows at or after the resumed checkpoint's
    step were logged after that checkpoint (a run killed later than its last checkpoint): the resumed
    run logs those steps again, so they are dropped rather than kept twice.
    """

    def __init__(self, log_dir: str, keep_before_step: int) -> None:
        super().__init__(log_dir)
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            kept = [row for row in reader if _step(row) < keep_before_step]

        def write(tmp) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=sorted(header))
                writer.writeheader()
                writer.writerows(kept)

        from dfl.audio import atomic_write

        atomic_write(self.metrics_file_path, write)
        self.metrics_keys = sorted(header)

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's deletes metrics.csv here


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger``; with ``keep_before_step`` set (``dfl-train`` sets it when resuming),
    ``metrics.csv`` continues the earlier rows instead of starting afresh."""

    def __init__(self, *args, keep_before_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        if self.keep_before_step is None:
            return super().experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ContinuingWriter(self.log_dir, self.keep_before_step)
        return self._experiment


def last_wandb_run_id(wandb_dir: Path) -> str | None:
    """The id of the latest W&B run under ``wandb_dir`` (``run-<time>-<id>`` / ``offline-run-<time>-<id>``)."""
    import re

    found = []
    for p in wandb_dir.glob("*run-*") if wandb_dir.is_dir() else []:
        match = re.fullmatch(r"(?:offline-)?run-(\d{8}_\d{6})-(\w+)", p.name)
        if match and p.is_dir():
            found.append(match.groups())
    return max(found)[1] if found else None
