"""CSIG / CBAK / COVL: the composite measures of Hu & Loizou (2008).

Y. Hu and P. Loizou, "Evaluation of objective quality measures for speech
enhancement", IEEE TASLP 16(1), 2008, eqs. (18)-(20) via their reference code
``composite.m`` (Loizou, *Speech Enhancement: Theory and Practice*, 2nd ed.).
Every step below follows that code:

1. ``clean + eps``, ``estimate + eps`` (MATLAB ``eps``), so silent frames stay finite;
2. WSS (Klatt 1982) per frame, mean of the best 95 % of frames;
3. LLR per frame (LPC order 10 below 10 kHz, 16 above), mean of the best 95 % of frames;
4. segmental SNR per frame clipped to [-10, 35] dB, plain mean;
5. PESQ: at 16 kHz ``composite.m``'s ``pesq.m`` runs the wide-band P.862.2 and returns its
   MOS-LQO; at 8 kHz it returns the raw P.862 score (the MOS mapping removed: "this is
   what was used to derive the composite measures"). We do the same with the ``pesq``
   package, undoing its P.862.1 mapping at 8 kHz;
6. the published regressions, each score clamped to [1, 5].
"""

from __future__ import annotations

import numpy as np

from dfl.metrics.base import MetricError
from dfl.metrics.frames import frame_length, windowed_frames
from dfl.metrics.pesq_stoi import pesq_score
from dfl.metrics.sdr import segmental_snr_frames

TRIM_ALPHA = 0.95  # composite.m ``alpha``: keep the best 95 % of WSS and LLR frames
_EPS = np.finfo(np.float64).eps

# Regression coefficients, Hu & Loizou (2008) eqs. (18)-(20) (= composite.m):
#   Csig = 3.093 - 1.029 LLR + 0.603 PESQ - 0.009 WSS
#   Cbak = 1.634 + 0.478 PESQ - 0.007 WSS + 0.063 segSNR
#   Covl = 1.594 + 0.805 PESQ - 0.512 LLR - 0.007 WSS
CSIG = dict(const=3.093, llr=-1.029, pesq=0.603, wss=-0.009)
CBAK = dict(const=1.634, pesq=0.478, wss=-0.007, segsnr=0.063)
COVL = dict(const=1.594, pesq=0.805, llr=-0.512, wss=-0.007)
SCORE_RANGE = (1.0, 5.0)  # MOS scale the regressions were fitted on; composite.m clamps to it

# WSS constants (Klatt 1982; wss.m): 25 critical bands (centre Hz, bandwidth Hz).
WSS_CENTRE_HZ = (
    50.0, 120.0, 190.0, 260.0, 330.0, 400.0, 470.0, 540.0, 617.372, 703.378, 798.717, 904.128,
    1020.38, 1148.30, 1288.72, 1442.54, 1610.70, 1794.16, 1993.93, 2211.08, 2446.71, 2701.97,
    2978.04, 3276.17, 3597.63,
)  # fmt: skip
WSS_BANDWIDTH_HZ = (
    70.0, 70.0, 70.0, 70.0, 70.0, 70.0, 70.0, 77.3724, 86.0056, 95.3398, 105.411, 116.256,
    127.914, 140.423, 153.823, 168.154, 183.457, 199.776, 217.153, 235.631, 255.255, 276.072,
    298.126, 321.465, 346.136,
)  # fmt: skip
WSS_KMAX = 20.0  # global-peak weight constant, Klatt p. 1280
WSS_KLOCMAX = 1.0  # local-peak weight constant, Klatt p. 1280
WSS_FILTER_FLOOR = np.exp(-30.0 / (2.0 * 2.303))  # Gaussian filters cut at their -30 dB point
WSS_GAUSS = 11.0  # filter shape exp(-11 ((k - f0) / bw)^2)


def _trimmed_mean(values: np.ndarray) -> float:
    """Mean of the smallest ``round(0.95 n)`` values (MATLAB ``round``: half away from zero)."""
    keep = int(np.floor(len(values) * TRIM_ALPHA + 0.5))
    return float(np.mean(np.sort(values)[:keep]))


def _critical_band_filters(sample_rate: int, n_fft: int) -> np.ndarray:
    half = n_fft // 2
    max_freq = sample_rate / 2
    bins = np.arange(half)
    filters = np.empty((len(WSS_CENTRE_HZ), half))
    for i, (fc, bw_hz) in enumerate(zip(WSS_CENTRE_HZ, WSS_BANDWIDTH_HZ, strict=True)):
        f0 = np.floor(fc / max_freq * half)
        bw = bw_hz / max_freq * half
        norm = np.log(WSS_BANDWIDTH_HZ[0]) - np.log(bw_hz)  # narrowest band has gain 1
        f = np.exp(-WSS_GAUSS * ((bins - f0) / bw) ** 2 + norm)
        filters[i] = f * (f > WSS_FILTER_FLOOR)
    return filters


def _local_peaks(energy: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """wss.m's nearest local peak for each band 0..23, per frame (``[frames, bands]``).

    Rising slope: search right while the slope rises and take ``energy[n - 1]`` (the
    reference code's choice, kept as is); falling: search left, take ``energy[n + 1]``.
    """
    frames, nslope = slope.shape
    peaks = np.empty((frames, nslope))
    rows = np.arange(frames)
    for i in range(nslope):
        rising = slope[:, i] > 0
        n = np.full(frames, i)
        # search right (rising frames): stop at the first non-positive slope or the last band
        for _ in range(nslope):
            move = rising & (n < nslope) & (slope[rows, np.minimum(n, nslope - 1)] > 0)
            if not move.any():
                break
            n = n + move
        right = energy[rows, np.maximum(n - 1, 0)]
        m = np.full(frames, i)
        # search left (falling frames): stop at the first positive slope or below band 0
        for _ in range(nslope + 1):
            move = ~rising & (m >= 0) & (slope[rows, np.maximum(m, 0)] <= 0)
            if not move.any():
                break
            m = m - move
        left = energy[rows, m + 1]
        peaks[:, i] = np.where(rising, right, left)
    return peaks


def wss_frames(clean: np.ndarray, estimate: np.ndarray, sample_rate: int) -> np.ndarray:
    """Weighted spectral slope distance per frame (Klatt 1982, as in wss.m)."""
    win = frame_length(sample_rate)
    n_fft = int(2 ** np.ceil(np.log2(2 * win)))
    filters = _critical_band_filters(sample_rate, n_fft)

    def band_energy(x):
        spec = np.abs(np.fft.fft(windowed_frames(x, sample_rate), n_fft, axis=1)) ** 2
        return 10 * np.log10(np.maximum(spec[:, : n_fft // 2] @ filters.T, 1e-10))

    ec, ep = band_energy(clean), band_energy(estimate)
    sc, sp = np.diff(ec, axis=1), np.diff(ep, axis=1)
    nb = ec.shape[1] - 1

    def weights(e, s):
        wmax = WSS_KMAX / (WSS_KMAX + e.max(axis=1, keepdims=True) - e[:, :nb])
        wloc = WSS_KLOCMAX / (WSS_KLOCMAX + _local_peaks(e, s) - e[:, :nb])
        return wmax * wloc

    w = (weights(ec, sc) + weights(ep, sp)) / 2.0
    # Normalising by the weight sum is not in Klatt's paper; wss.m does it.
    return np.sum(w * (sc - sp) ** 2, axis=1) / np.sum(w, axis=1)


def _lpc(frames: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Autocorrelation R[0..order] and LPC polynomial ``[1, -a]`` per frame (Levinson-Durbin, lpcoeff.m)."""
    n = frames.shape[1]
    r = np.stack([np.sum(frames[:, : n - k] * frames[:, k:], axis=1) for k in range(order + 1)], axis=1)
    a = np.zeros((len(frames), order))
    err = r[:, 0].copy()
    for i in range(order):
        prev = a[:, :i].copy()
        acc = np.sum(prev * r[:, i:0:-1], axis=1)
        k = (r[:, i + 1] - acc) / err
        a[:, i] = k
        a[:, :i] = prev - k[:, None] * prev[:, ::-1]
        err = (1 - k * k) * err
    return r, np.concatenate([np.ones((len(frames), 1)), -a], axis=1)


def llr_frames(clean: np.ndarray, estimate: np.ndarray, sample_rate: int) -> np.ndarray:
    """Log-likelihood ratio per frame, ``log(a_p R_c a_pᵀ / a_c R_c a_cᵀ)`` (llr.m)."""
    order = 10 if sample_rate < 10_000 else 16
    fc = windowed_frames(clean, sample_rate)
    fp = windowed_frames(estimate, sample_rate)
    rc, ac = _lpc(fc, order)
    _, ap = _lpc(fp, order)
    lags = np.abs(np.arange(order + 1)[:, None] - np.arange(order + 1)[None, :])
    toeplitz = rc[:, lags]  # [frames, order+1, order+1]
    num = np.einsum("fi,fij,fj->f", ap, toeplitz, ap)
    den = np.einsum("fi,fij,fj->f", ac, toeplitz, ac)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(num / den)


def _pesq_for_composite(clean: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    if sample_rate == 16_000:
        return pesq_score(clean, estimate, sample_rate, "wb")
    if sample_rate == 8_000:
        mos_lqo = pesq_score(clean, estimate, sample_rate, "nb")
        # invert P.862.1: MOS-LQO = 0.999 + 4 / (1 + exp(-1.4945 x + 4.6607))
        return float((4.6607 - np.log(4.0 / (mos_lqo - 0.999) - 1.0)) / 1.4945)
    raise MetricError(f"composite measures need PESQ, which needs 8 or 16 kHz audio, got {sample_rate} Hz")


def components(clean: np.ndarray, estimate: np.ndarray, sample_rate: int) -> dict[str, float]:
    """The four inputs of the regressions: trimmed-mean LLR and WSS, segSNR, PESQ."""
    c, e = clean + _EPS, estimate + _EPS
    llr = llr_frames(c, e, sample_rate)
    if len(llr) == 0:
        raise MetricError(f"composite measures: signal shorter than two 30 ms frames ({len(clean)} samples)")
    if not np.isfinite(llr).all():
        raise MetricError("composite measures: LLR is not finite on some frame (degenerate LPC fit)")
    return {
        "llr": _trimmed_mean(llr),
        "wss": _trimmed_mean(wss_frames(c, e, sample_rate)),
        "segsnr": float(np.mean(segmental_snr_frames(c, e, sample_rate))),
        "pesq": _pesq_for_composite(clean, estimate, sample_rate),
    }


def _apply(coef: dict[str, float], parts: dict[str, float]) -> float:
    value = coef["const"] + sum(w * parts[k] for k, w in coef.items() if k != "const")
    return float(np.clip(value, *SCORE_RANGE))


def scores_from_components(parts: dict[str, float]) -> dict[str, float]:
    return {"csig": _apply(CSIG, parts), "cbak": _apply(CBAK, parts), "covl": _apply(COVL, parts)}


def composite(clean: np.ndarray, estimate: np.ndarray, sample_rate: int) -> dict[str, float]:
    """``{"csig", "cbak", "covl"}`` for one pair of signals."""
    return scores_from_components(components(clean, estimate, sample_rate))
