"""PESQ (ITU-T P.862 via the ``pesq`` package) and (extended) STOI via ``pystoi``."""

from __future__ import annotations

import warnings

import numpy as np

from dfl.metrics.base import MetricError

# P.862.2 wide band is only defined at 16 kHz; narrow band (P.862 + P.862.1 mapping) at 8 or 16 kHz.
PESQ_RATES = {"wb": (16_000,), "nb": (8_000, 16_000)}
STOI_RATE, STOI_FRAME = 10_000, 256  # pystoi resamples to 10 kHz and analyses 256-sample frames


def pesq_score(clean: np.ndarray, estimate: np.ndarray, sample_rate: int, mode: str = "wb") -> float:
    """PESQ MOS-LQO: ``wb`` (P.862.2) or ``nb`` (P.862 with the P.862.1 mapping)."""
    from pesq import PesqError, pesq

    if sample_rate not in PESQ_RATES[mode]:
        raise MetricError(f"PESQ {mode} needs a sample rate in {PESQ_RATES[mode]}, got {sample_rate}")
    if not (np.any(clean) and np.any(estimate)):
        raise MetricError(f"PESQ {mode}: a signal is all zeros, no utterance to score")
    try:
        return float(pesq(sample_rate, clean, estimate, mode))
    except PesqError as exc:  # e.g. NoUtterancesError on silence
        raise MetricError(f"PESQ {mode}: {type(exc).__name__}: {exc}") from exc


def stoi_score(clean: np.ndarray, estimate: np.ndarray, sample_rate: int, extended: bool = False) -> float:
    """STOI (Taal et al. 2011) or extended STOI (Jensen & Taal 2016)."""
    from pystoi import stoi

    name = "ESTOI" if extended else "STOI"
    if not np.any(clean):
        raise MetricError(f"{name}: the clean signal is all zeros, intelligibility is undefined")
    frame = int(np.ceil(STOI_FRAME * sample_rate / STOI_RATE))
    if clean.size < frame:  # pystoi fails with a bare numpy AxisError here
        raise MetricError(
            f"{name}: signal of {clean.size} samples is shorter than one analysis frame "
            f"({frame} samples = {1000 * STOI_FRAME / STOI_RATE:.1f} ms)"
        )
    # pystoi only *warns* and returns 1e-5 when too few non-silent frames remain; that
    # number is not a score, so it becomes a failure with pystoi's reason.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = float(stoi(clean, estimate, sample_rate, extended=extended))
        except (ValueError, IndexError) as exc:  # numpy/scipy errors on degenerate input
            raise MetricError(f"{name}: {type(exc).__name__}: {exc} ({clean.size} samples)") from exc
    for w in caught:
        if "Not enough STFT frames" in str(w.message):
            raise MetricError(f"{name}: {w.message}")
    if not np.isfinite(value):
        raise MetricError(f"{name}: result is not finite ({value})")
    return value
