"""Energy-ratio metrics: SI-SDR, SNR and segmental SNR (all in dB)."""

from __future__ import annotations

import numpy as np

from dfl.metrics.base import MetricError
from dfl.metrics.frames import windowed_frames

# Segmental SNR limits of Hu & Loizou (2008) / ``composite.m``: frames are clipped to
# [-10, 35] dB so silent frames (no signal) and perfect frames (no noise) do not dominate.
SEG_SNR_MIN_DB = -10.0
SEG_SNR_MAX_DB = 35.0
_EPS = np.finfo(np.float64).eps  # MATLAB ``eps``
# A residual below 1e-25 of the target (> 250 dB) is float64 rounding of an exact copy, not a score.
_EXACT_COPY_RATIO = 1e-25


def si_sdr(clean: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant SDR (Le Roux et al. 2019), both signals made zero-mean first."""
    s = clean - clean.mean()
    e = estimate - estimate.mean()
    ss = float(np.dot(s, s))
    if ss == 0.0:
        raise MetricError("SI-SDR: the clean signal is constant (zero energy), the ratio is undefined")
    target = (np.dot(e, s) / ss) * s
    noise = e - target
    tt, nn = float(np.dot(target, target)), float(np.dot(noise, noise))
    if nn <= tt * _EXACT_COPY_RATIO:
        raise MetricError("SI-SDR: estimate is an exact scaled copy of clean, the ratio is infinite")
    if tt == 0.0:
        raise MetricError("SI-SDR: estimate is orthogonal to clean, the ratio is -infinite")
    return float(10 * np.log10(tt / nn))


def snr(clean: np.ndarray, estimate: np.ndarray) -> float:
    """Overall SNR ``10 log10(Σ clean² / Σ (clean - estimate)²)`` (the paper's "SNR", ``composite.m``)."""
    signal = float(np.dot(clean, clean))
    noise = float(np.sum((clean - estimate) ** 2))
    if signal == 0.0:
        raise MetricError("SNR: the clean signal is silent (zero energy), the ratio is undefined")
    if noise == 0.0:
        raise MetricError("SNR: estimate equals clean, the ratio is infinite")
    return float(10 * np.log10(signal / noise))


def segmental_snr_frames(clean: np.ndarray, estimate: np.ndarray, sample_rate: int) -> np.ndarray:
    """Per-frame SNR in dB, clipped to [-10, 35], exactly as ``snr.m`` in ``composite.m``."""
    c = windowed_frames(clean, sample_rate)
    e = windowed_frames(estimate, sample_rate)
    if len(c) == 0:
        raise MetricError(f"segmental SNR: signal shorter than one 30 ms frame pair ({len(clean)} samples)")
    signal = np.sum(c**2, axis=1)
    noise = np.sum((c - e) ** 2, axis=1)
    seg = 10 * np.log10(signal / (noise + _EPS) + _EPS)
    return np.clip(seg, SEG_SNR_MIN_DB, SEG_SNR_MAX_DB)


def seg_snr(clean: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    """Mean of the clipped per-frame SNRs (Hu & Loizou 2008)."""
    return float(np.mean(segmental_snr_frames(clean, estimate, sample_rate)))
