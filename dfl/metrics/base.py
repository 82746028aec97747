"""Shared pieces of every metric: the error type, the failure record and input checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class MetricError(ValueError):
    """A metric that cannot be computed on this input; the message says why."""


@dataclass(frozen=True)
class MetricFailure:
    """A metric left missing for one file, with the reason (a failure is never scored as 0)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def as_signal(x, what: str) -> np.ndarray:
    """A mono float64 1-D array; bad shapes or non-finite samples are clear errors."""
    arr = np.asarray(x)
    if arr.ndim == 2 and 1 in arr.shape:  # [1, T] or [T, 1] is still mono
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a mono 1-D waveform, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what}: waveform is empty")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what}: expected float samples in [-1, 1], got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: waveform contains NaN or Inf samples")
    return arr


def as_pair(clean, estimate) -> tuple[np.ndarray, np.ndarray]:
    """Check a (clean, estimate) pair: both mono, same length."""
    c = as_signal(clean, "clean")
    e = as_signal(estimate, "estimate")
    if c.shape != e.shape:
        raise ValueError(
            f"clean and estimate differ in length ({c.size} vs {e.size} samples); "
            "metrics compare sample-aligned signals of equal length"
        )
    return c, e
