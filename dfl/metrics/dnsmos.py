"""DNSMOS P.835 (Reddy et al. 2022): reference-free SIG / BAK / OVRL.

Runs the ONNX models bundled in the ``speechmos`` wheel with onnxruntime (offline),
through speechmos' own ``DNSMOS`` class so the scores are exactly speechmos'.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dfl.metrics.base import MetricError

DNSMOS_SAMPLE_RATE = 16_000
_scorer = None  # one onnxruntime session pair per process, built on first use


def _get_scorer():
    global _scorer
    if _scorer is None:
        import speechmos
        from speechmos.dnsmos import DNSMOS

        models = Path(speechmos.__file__).parent / "dnsmos_models"
        primary, p808 = models / "sig_bak_ovr.onnx", models / "model_v8.onnx"
        for f in (primary, p808):
            if not f.is_file():
                raise MetricError(f"DNSMOS: model file {f} missing from the speechmos install")
        _scorer = DNSMOS(str(primary), str(p808))
    return _scorer


def dnsmos(estimate: np.ndarray, sample_rate: int) -> dict[str, float]:
    """``{"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"}`` of a 16 kHz waveform in [-1, 1]."""
    if sample_rate != DNSMOS_SAMPLE_RATE:
        raise MetricError(f"DNSMOS needs {DNSMOS_SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    peak = float(np.max(np.abs(estimate)))
    if peak > 1.0:
        raise MetricError(f"DNSMOS needs samples in [-1, 1], peak is {peak:.3f}")
    if peak == 0.0:
        raise MetricError("DNSMOS: the signal is all zeros")
    out = _get_scorer()(estimate.astype(np.float32), sample_rate, False)
    return {
        "dnsmos_sig": float(out["sig_mos"]),
        "dnsmos_bak": float(out["bak_mos"]),
        "dnsmos_ovrl": float(out["ovrl_mos"]),
    }
