"""dfl.metrics against independent values: the reference packages called directly, hand-computed
cases, and a literal re-implementation of Loizou's MATLAB ``composite.m`` for CSIG/CBAK/COVL."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg import solve_toeplitz, toeplitz

from dfl.metrics import METRIC_NAMES, MetricError, MetricFailure, compute, compute_many
from dfl.metrics import composite as comp
from tests.helpers.metric_signals import noisy_version, speech_like

SR = 16_000
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def pair():
    clean = speech_like(2.0, seed=3)
    return clean, noisy_version(clean, 15.0, seed=4)


# ---------------------------------------------------------------- PESQ / STOI: the packages directly
def test_pesq_and_stoi_equal_the_packages(pair):
    from pesq import pesq
    from pystoi import stoi

    clean, noisy = pair
    assert compute("pesq", clean, noisy, SR) == pytest.approx(pesq(SR, clean, noisy, "wb"), abs=1e-6)
    assert compute("pesq_nb", clean, noisy, SR) == pytest.approx(pesq(SR, clean, noisy, "nb"), abs=1e-6)
    assert compute("stoi", clean, noisy, SR) == pytest.approx(stoi(clean, noisy, SR, extended=False), abs=1e-9)
    assert compute("estoi", clean, noisy, SR) == pytest.approx(stoi(clean, noisy, SR, extended=True), abs=1e-9)
    assert 1.0 < compute("pesq", clean, noisy, SR) < compute("pesq", clean, clean, SR)


def test_pesq_on_silence_is_a_metric_error_and_recorded_as_missing(pair):
    clean, _ = pair
    silence = np.zeros_like(clean)
    with pytest.raises(MetricError, match="PESQ wb"):
        compute("pesq", silence, silence, SR)
    out = compute_many(["pesq", "snr", "stoi"], clean, silence + 1e-4 * clean, SR)
    assert isinstance(out["snr"], float) and isinstance(out["stoi"], float)
    # PESQ of an almost silent estimate still scores; the all-zero *reference* cannot
    out = compute_many(["pesq", "si_sdr", "stoi"], silence, clean, SR)
    for name in ("pesq", "si_sdr", "stoi"):
        assert isinstance(out[name], MetricFailure), name
        assert out[name].reason and out[name].name == name
    assert "zero" in out["si_sdr"].reason


def test_pesq_wide_band_needs_16k(pair):
    clean, noisy = pair
    with pytest.raises(MetricError, match="sample rate"):
        compute("pesq", clean, noisy, 22_050)


# ---------------------------------------------------------------- SI-SDR / SNR / segSNR: by hand
def _orthogonal_pair(n=16_000, cycles=50):
    t = np.arange(n) / n
    return np.sin(2 * np.pi * cycles * t), np.cos(2 * np.pi * cycles * t)  # zero mean, orthogonal


def test_si_sdr_hand_computed():
    s, q = _orthogonal_pair()
    # estimate = 2 s + 0.1 q: the projection on s is 2 s, the residual 0.1 q (equal norms of s, q)
    # SI-SDR = 10 log10(2² / 0.1²) = 26.0206 dB, whatever the overall gain of the estimate
    expected = 10 * math.log10(4 / 0.01)
    assert compute("si_sdr", s, 2 * s + 0.1 * q) == pytest.approx(expected, abs=1e-9)
    assert compute("si_sdr", s, 7 * (2 * s + 0.1 * q)) == pytest.approx(expected, abs=1e-9)
    # an offset does not count (both signals are made zero-mean)
    assert compute("si_sdr", s, 2 * s + 0.1 * q + 0.3) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(MetricError, match="infinite"):
        compute("si_sdr", s, 3 * s)


def test_si_sdr_matches_torchmetrics(pair):
    import torch
    from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio as tm_si_sdr

    clean, noisy = pair
    ref = tm_si_sdr(torch.from_numpy(noisy).double(), torch.from_numpy(clean).double(), zero_mean=True)
    assert compute("si_sdr", clean, noisy) == pytest.approx(float(ref), abs=1e-6)


def test_snr_hand_computed():
    s, q = _orthogonal_pair()
    # error = 0.1 q: Σ s² / Σ (0.1 q)² = 100 → 20 dB; unlike SI-SDR a gain error counts
    assert compute("snr", s, s + 0.1 * q) == pytest.approx(20.0, abs=1e-9)
    # estimate 0.5 s: error 0.5 s → 10 log10(1 / 0.25) = 6.0206 dB
    assert compute("snr", s, 0.5 * s) == pytest.approx(10 * math.log10(4), abs=1e-9)
    with pytest.raises(MetricError, match="infinite"):
        compute("snr", s, s)


def test_segmental_snr_hand_computed_and_clipped():
    from dfl.metrics.sdr import segmental_snr_frames

    x = speech_like(1.0, seed=5).astype(np.float64) + 0.01  # no silent frame
    # 30 ms = 480 samples, hop 120: floor(16000/120 - 480/120) = floor(129.33) = 129 frames
    assert segmental_snr_frames(x, 1.1 * x, SR).shape == (129,)
    # estimate = (1 + g) x: every frame has noise energy g² × signal energy → -20 log10(g)
    assert compute("seg_snr", x, 1.1 * x) == pytest.approx(20.0, abs=1e-6)
    assert compute("seg_snr", x, 1.001 * x) == pytest.approx(35.0)  # 60 dB, clipped to 35
    assert compute("seg_snr", x, 11.0 * x) == pytest.approx(-10.0)  # -20 dB, clipped to -10


# ---------------------------------------------------------------- composite: literal composite.m port
def _matlab_frames(x, sr):
    """Frame loop of wss.m / llr.m / snr.m, written out as in the MATLAB."""
    winlength = round(30 * sr / 1000)
    skiprate = math.floor(winlength / 4)
    num_frames = len(x) / skiprate - (winlength / skiprate)
    window = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, winlength + 1) / (winlength + 1)))
    start, frames = 0, []
    frame_count = 1
    while frame_count <= num_frames:  # MATLAB: for frame_count = 1:num_frames
        frames.append(x[start : start + winlength] * window)
        start += skiprate
        frame_count += 1
    return frames


def _matlab_llr(clean, processed, sr):
    p = 10 if sr < 10000 else 16
    out = []
    for c, d in zip(_matlab_frames(clean, sr), _matlab_frames(processed, sr), strict=True):
        def lpc(frame):
            n = len(frame)
            r = np.array([np.sum(frame[: n - k] * frame[k:]) for k in range(p + 1)])
            a = solve_toeplitz(r[:p], r[1 : p + 1])  # normal equations instead of Levinson-Durbin
            return r, np.concatenate([[1.0], -a])

        rc, ac = lpc(c)
        _, ap = lpc(d)
        out.append(math.log((ap @ toeplitz(rc) @ ap) / (ac @ toeplitz(rc) @ ac)))
    return np.array(out)


# Klatt's critical bands, typed from wss.m (cent_freq / bandwidth)
_CENT = [50, 120, 190, 260, 330, 400, 470, 540, 617.372, 703.378, 798.717, 904.128, 1020.38, 1148.30,
         1288.72, 1442.54, 1610.70, 1794.16, 1993.93, 2211.08, 2446.71, 2701.97, 2978.04, 3276.17, 3597.63]
_BW = [70, 70, 70, 70, 70, 70, 70, 77.3724, 86.0056, 95.3398, 105.411, 116.256, 127.914, 140.423, 153.823,
       168.154, 183.457, 199.776, 217.153, 235.631, 255.255, 276.072, 298.126, 321.465, 346.136]


def _matlab_wss(clean, processed, sr):
    winlength = round(30 * sr / 1000)
    num_crit, kmax, klocmax = 25, 20, 1
    n_fft = 2 ** math.ceil(math.log2(2 * winlength))
    half = n_fft // 2
    min_factor = math.exp(-30.0 / (2.0 * 2.303))
    crit = np.zeros((num_crit, half))
    for i in range(num_crit):
        f0 = _CENT[i] / (sr / 2) * half
        bw = _BW[i] / (sr / 2) * half
        norm = math.log(_BW[0]) - math.log(_BW[i])
        j = np.arange(half)
        crit[i] = np.exp(-11 * ((j - math.floor(f0)) / bw) ** 2 + norm)
        crit[i] *= crit[i] > min_factor
    out = []
    for c, d in zip(_matlab_frames(clean, sr), _matlab_frames(processed, sr), strict=True):
        energies, slopes, peaks = [], [], []
        for frame in (c, d):
            spec = np.abs(np.fft.fft(frame, n_fft)) ** 2
            e = np.array([np.sum(spec[:half] * crit[i]) for i in range(num_crit)])
            e = 10 * np.log10(np.maximum(e, 1e-10))
            # 1-based copies so the loops read exactly like wss.m
            E = np.concatenate([[np.nan], e])
            S = np.concatenate([[np.nan], E[2:] - E[1:-1]])
            peak = np.zeros(num_crit)
            for i in range(1, num_crit):
                if S[i] > 0:
                    n = i
                    while n < num_crit and S[n] > 0:
                        n += 1
                    peak[i] = E[n - 1]
                else:
                    n = i
                    while n > 0 and S[n] <= 0:
                        n -= 1
                    peak[i] = E[n + 1]
            energies.append(E)
            slopes.append(S)
            peaks.append(peak)
        w = []
        for E, peak in zip(energies, peaks, strict=True):
            wmax = kmax / (kmax + np.max(E[1:]) - E[1:num_crit])
            wloc = klocmax / (klocmax + peak[1:] - E[1:num_crit])
            w.append(wmax * wloc)
        W = (w[0] + w[1]) / 2
        out.append(np.sum(W * (slopes[0][1:] - slopes[1][1:]) ** 2) / np.sum(W))
    return np.array(out)


def _matlab_segsnr(clean, processed, sr):
    eps = np.finfo(float).eps
    seg = []
    for c, d in zip(_matlab_frames(clean, sr), _matlab_frames(processed, sr), strict=True):
        v = 10 * math.log10(np.sum(c**2) / (np.sum((c - d) ** 2) + eps) + eps)
        seg.append(min(max(v, -10), 35))
    return np.array(seg)


def _matlab_trimmed(v, alpha=0.95):
    v = np.sort(v)
    return float(np.mean(v[: int(math.floor(len(v) * alpha + 0.5))]))


def test_composite_components_match_a_literal_port_of_composite_m():
    clean = speech_like(0.6, seed=7).astype(np.float64)
    est = noisy_version(speech_like(0.6, seed=7), 12.0, seed=8).astype(np.float64)
    eps = np.finfo(float).eps
    c, e = clean + eps, est + eps  # composite.m: data1 = data1(1:len) + eps
    ours = comp.components(clean, est, SR)
    np.testing.assert_allclose(comp.llr_frames(c, e, SR), _matlab_llr(c, e, SR), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(comp.wss_frames(c, e, SR), _matlab_wss(c, e, SR), rtol=1e-9, atol=1e-9)
    assert ours["llr"] == pytest.approx(_matlab_trimmed(_matlab_llr(c, e, SR)), rel=1e-7)
    assert ours["wss"] == pytest.approx(_matlab_trimmed(_matlab_wss(c, e, SR)), rel=1e-9)
    assert ours["segsnr"] == pytest.approx(float(np.mean(_matlab_segsnr(c, e, SR))), rel=1e-9)
    assert ours["llr"] > 0 and ours["wss"] > 0


def test_composite_regressions_are_hu_loizou_2008():
    # Hu & Loizou (2008), IEEE TASLP 16(1), eqs. (18)-(20), typed here independently of the code
    parts = {"llr": 0.6, "wss": 40.0, "segsnr": 5.0, "pesq": 2.5}
    csig = 3.093 - 1.029 * 0.6 + 0.603 * 2.5 - 0.009 * 40.0
    cbak = 1.634 + 0.478 * 2.5 - 0.007 * 40.0 + 0.063 * 5.0
    covl = 1.594 + 0.805 * 2.5 - 0.512 * 0.6 - 0.007 * 40.0
    got = comp.scores_from_components(parts)
    assert got == pytest.approx({"csig": csig, "cbak": cbak, "covl": covl}, abs=1e-12)
    # every score is clamped to the 1-5 MOS scale
    assert comp.scores_from_components({"llr": 0.0, "wss": 0.0, "segsnr": 35.0, "pesq": 4.64}) == {
        "csig": 5.0, "cbak": 5.0, "covl": 5.0}
    assert comp.scores_from_components({"llr": 2.0, "wss": 150.0, "segsnr": -10.0, "pesq": 1.0}) == {
        "csig": 1.0, "cbak": 1.0, "covl": 1.0}


def test_composite_end_to_end(pair):
    from pesq import pesq

    clean, noisy = pair
    scores = compute_many(["csig", "cbak", "covl"], clean, noisy, SR)
    parts = comp.components(clean.astype(np.float64), noisy.astype(np.float64), SR)
    assert parts["pesq"] == pytest.approx(pesq(SR, clean, noisy, "wb"), abs=1e-5)
    assert scores == pytest.approx(comp.scores_from_components(parts))
    assert all(1.0 < v < 5.0 for v in scores.values())
    better = compute_many(["csig", "cbak", "covl"], clean, noisy_version(clean, 30.0, seed=4), SR)
    assert all(better[k] > scores[k] for k in scores)
    # identical signals: LLR and WSS are 0
    same = comp.components(clean.astype(np.float64), clean.astype(np.float64), SR)
    assert same["llr"] == pytest.approx(0.0, abs=1e-9) and same["wss"] == pytest.approx(0.0, abs=1e-9)


def test_composite_at_8k_uses_raw_p862():
    from pesq import pesq

    clean = speech_like(2.0, sample_rate=8000, seed=2)
    noisy = noisy_version(clean, 15.0, seed=2)
    raw = comp.components(clean.astype(np.float64), noisy.astype(np.float64), 8000)["pesq"]
    # P.862.1 maps the raw score to MOS-LQO; the pesq package returns the mapped one
    mapped = 0.999 + 4.0 / (1.0 + math.exp(-1.4945 * raw + 4.6607))
    assert mapped == pytest.approx(pesq(8000, clean, noisy, "nb"), abs=1e-4)
    assert abs(raw - mapped) > 0.05  # the mapping really was undone


# ---------------------------------------------------------------- DNSMOS: speechmos directly
def test_dnsmos_equals_speechmos():
    from speechmos import dnsmos

    x = noisy_version(speech_like(4.6, seed=9), 10.0)  # 4.6 s: speechmos tiles it to 9.2 s, one window
    ref = dnsmos.run(x, SR)
    got = compute_many(["dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"], None, x, SR)
    assert got["dnsmos_sig"] == pytest.approx(ref["sig_mos"], abs=1e-6)
    assert got["dnsmos_bak"] == pytest.approx(ref["bak_mos"], abs=1e-6)
    assert got["dnsmos_ovrl"] == pytest.approx(ref["ovrl_mos"], abs=1e-6)
    with pytest.raises(MetricError, match="16000"):
        compute("dnsmos_ovrl", None, x, 8000)
    with pytest.raises(MetricError, match=r"\[-1, 1\]"):
        compute("dnsmos_ovrl", None, 2 * x / np.abs(x).max(), SR)


# ---------------------------------------------------------------- input checks
def test_bad_inputs_are_clear_errors(pair):
    clean, noisy = pair
    with pytest.raises(ValueError, match="differ in length"):
        compute("snr", clean, noisy[:-1])
    with pytest.raises(ValueError, match="differ in length"):
        compute_many(["snr", "pesq"], clean, noisy[:-5])
    with pytest.raises(ValueError, match="unknown metric 'pesq_xx'"):
        compute("pesq_xx", clean, noisy)
    with pytest.raises(ValueError, match="mono"):
        compute("snr", np.stack([clean, clean]), np.stack([noisy, noisy]))
    with pytest.raises(ValueError, match="NaN"):
        compute("snr", clean, np.full_like(noisy, np.nan))
    with pytest.raises(ValueError, match="sample_rate"):
        compute("snr", clean, noisy, 0)
    assert set(METRIC_NAMES) == {"pesq", "pesq_nb", "stoi", "estoi", "si_sdr", "snr", "seg_snr", "csig", "cbak",
                                 "covl", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"}


# ---------------------------------------------------------------- real VoiceBank-DEMAND samples
def test_vbdmd_sample_values_from_the_shared_readme():
    root = SHARED / "data" / "vbdmd_sample"
    enhanced_dir = SHARED / "reference" / "authors_tf" / "enhanced"
    if not root.is_dir() or not enhanced_dir.is_dir():
        pytest.skip(f"{root} or {enhanced_dir} absent (reference data lives outside the repo)")
    from dfl.audio import load_mono

    # values measured by the data provider, stated in shared/README.md
    expected = {"p287_001.wav": (1.762, 2.621, 0.846, 0.868), "p287_002.wav": (1.340, 2.284, 0.862, 0.923)}
    for name, (pn, pe, sn, se) in expected.items():
        clean = load_mono(root / "clean" / name)
        noisy = load_mono(root / "noisy" / name)
        enh = load_mono(enhanced_dir / name)
        got = compute_many(["pesq", "stoi"], clean, noisy)
        assert got["pesq"] == pytest.approx(pn, abs=5e-4) and got["stoi"] == pytest.approx(sn, abs=5e-4)
        got = compute_many(["pesq", "stoi", "snr", "csig"], clean, enh)
        assert got["pesq"] == pytest.approx(pe, abs=5e-4) and got["stoi"] == pytest.approx(se, abs=5e-4)
        assert got["snr"] > compute("snr", clean, noisy)


def test_scores_do_not_depend_on_the_callers_blas_threads():
    # A metric worker runs with one BLAS thread, the training process with all cores: the same numbers.
    from threadpoolctl import threadpool_limits

    clean = speech_like(10.0, seed=5)
    noisy = noisy_version(clean, 5.0, seed=6)
    names = ["si_sdr", "snr", "stoi", "pesq"]
    with threadpool_limits(4):
        many = compute_many(names, clean, noisy, SR)
    with threadpool_limits(1):
        one = compute_many(names, clean, noisy, SR)
    assert many == one
    assert all(isinstance(v, float) for v in one.values())
