"""Embedded default data: speech-like clean utterances mixed with varied noises.

Pure numpy/scipy (no torch, no Lightning). A source-filter model makes the
clean signal: a glottal-pulse train (Rosenberg pulse, differentiated: rich in
harmonics) whose pitch follows per-talker intonation (declination, word
accents, phrase-final fall or rise, drift, jitter) is filtered by a cascade of
second-order formant resonators whose frequencies move from vowel to vowel
through consonant loci; syllables (3-6 Hz) get raised-cosine envelopes, words
are separated by pauses, and consonants add unvoiced noise (band-passed
fricatives, plosive closures and bursts) or nasal murmurs.

:func:`generate_paired_corpus` writes the paired-folder layout
(``root/{trainset,valset,testset}_{noisy,clean}/<name>.wav``) that
``PairedFolderDataModule`` reads; the same seed and settings give
byte-identical files, and a settings-hash marker makes it a cache.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import fft as sp_fft
from scipy import signal

from dfl.audio import atomic_write

# Bump when the generated signals change, so cached corpora are regenerated.
GENERATOR_VERSION = 1
NOISE_KINDS = ("white", "pink", "brown", "babble", "hum", "clicks", "bursts")
# Kinds chosen by name only (not in the default set): noise with a random smooth spectral
# envelope, babble of eSpeak NG talkers, and distant reverberant babble over room tone (the last two
# need ``espeakng-loader``).
EXTRA_NOISE_KINDS = ("coloured", "tts_babble", "cafe")
SPLITS = ("trainset", "valset", "testset")
MARKER = ".complete"
MANIFEST = "manifest.csv"
MIN_UTTERANCE_SECONDS = 0.25

# Adult-male formant targets F1..F4 in Hz (Peterson & Barney / Hillenbrand averages).
_VOWELS = np.array(
    [
        [270, 2290, 3010, 3500],  # i
        [390, 1990, 2550, 3500],  # I
        [530, 1840, 2480, 3500],  # E
        [660, 1720, 2410, 3500],  # ae
        [730, 1090, 2440, 3500],  # a
        [570, 840, 2410, 3500],  # O
        [440, 1020, 2240, 3500],  # U
        [300, 870, 2240, 3500],  # u
        [640, 1190, 2390, 3500],  # V
        [490, 1350, 1690, 3500],  # 3r
        [500, 1500, 2500, 3500],  # schwa
    ],
    dtype=np.float64,
)
_BANDWIDTHS = np.array([70.0, 100.0, 140.0, 220.0, 300.0])
_F5 = 4500.0  # fixed fifth pole: keeps energy above F4 like real speech
# F2 loci of consonant places of articulation (labial, alveolar, velar).
_F2_LOCI = (800.0, 1800.0, 2300.0)
# Fricative noise bands in Hz (s, sh, f/th, h-like broad band).
_FRICATIVE_BANDS = ((4000.0, 7800.0), (2000.0, 6000.0), (1200.0, 7800.0), (600.0, 4500.0))


@dataclass(frozen=True)
class Talker:
    """Voice settings of one synthetic talker."""

    f0: float  # mean pitch in Hz
    pitch_range: float  # intonation excursion scale (1 = typical)
    formant_scale: float  # vocal-tract length factor (1 = adult male)
    open_quotient: float  # open fraction of the glottal cycle
    breathiness: float  # aspiration noise relative to voicing
    rate: float  # speaking-rate factor (1 = typical)


def random_talker(rng: np.random.Generator) -> Talker:
    """Draw a talker: male, female or child-like voice with matching vocal tract."""
    kind = rng.choice(3, p=(0.45, 0.45, 0.10))
    f0 = (rng.uniform(85, 155), rng.uniform(165, 255), rng.uniform(250, 340))[kind]
    scale = (rng.uniform(0.92, 1.05), rng.uniform(1.08, 1.2), rng.uniform(1.2, 1.32))[kind]
    return Talker(
        f0=float(f0),
        pitch_range=float(rng.uniform(0.5, 1.6)),
        formant_scale=float(scale),
        open_quotient=float(rng.uniform(0.45, 0.75)),
        breathiness=float(rng.uniform(0.02, 0.25)),
        rate=float(rng.uniform(0.85, 1.2)),
    )


# ----------------------------------------------------------------------------- clean speech


def _raised_cosine_window(n: int, attack: int, release: int) -> np.ndarray:
    """Flat-top window of length ``n`` with raised-cosine attack and release."""
    w = np.ones(n)
    attack, release = min(attack, n // 2), min(release, n - n // 2)
    if attack > 0:
        w[:attack] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(attack) + 0.5) / attack)
    if release > 0:
        w[n - release :] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(release) + 0.5) / release)
    return w


def _add_window(track: np.ndarray, start: int, n: int, gain: float, attack: int, release: int) -> None:
    """Add ``gain`` times a raised-cosine window of length ``n`` at ``start`` (clipped to the track)."""
    lo, hi = max(start, 0), min(start + n, len(track))
    if hi > lo:
        track[lo:hi] += gain * _raised_cosine_window(n, attack, release)[lo - start : hi - start]


@lru_cache(maxsize=64)
def _bandpass_sos(low: float, high: float, sample_rate: int) -> np.ndarray:
    nyq = sample_rate / 2
    high = min(high, 0.95 * nyq)
    low = min(low, 0.5 * high)
    return signal.butter(4, [low / nyq, high / nyq], btype="bandpass", output="sos")


@lru_cache(maxsize=8)
def _highpass_sos(cutoff: float, sample_rate: int, order: int = 2) -> np.ndarray:
    return signal.butter(order, cutoff / (sample_rate / 2), btype="highpass", output="sos")


def _plan_syllables(rng: np.random.Generator, seconds: float, rate: float) -> list[dict]:
    """Lay out words of 1-3 syllables with pauses; each syllable has an optional onset
    consonant, a vowel nucleus and an optional fricative coda. Times in seconds."""
    syllables: list[dict] = []
    t = rng.uniform(0.05, 0.2)
    end = seconds - rng.uniform(0.05, 0.15)
    word = 0
    while True:
        n_syll = int(rng.integers(1, 4))
        stressed = int(rng.integers(0, n_syll))
        for k in range(n_syll):
            dur = 1.0 / (rng.uniform(3.0, 6.0) * rate)
            if t + dur > end:
                if not syllables:  # very short utterance: one syllable that fits
                    dur = max(end - t, 0.08)
                else:
                    return syllables
            onset = rng.choice(["none", "fricative", "plosive", "nasal"], p=(0.3, 0.3, 0.25, 0.15))
            cons = {
                "none": 0.0,
                "fricative": rng.uniform(0.05, 0.11),
                "plosive": rng.uniform(0.035, 0.07),
                "nasal": rng.uniform(0.04, 0.08),
            }[onset]
            cons = min(cons, 0.4 * dur)
            coda = dur - cons > 0.16 and rng.random() < 0.2
            coda_dur = rng.uniform(0.04, 0.08) if coda else 0.0
            syllables.append(
                dict(
                    word=word,
                    start=t,
                    onset=str(onset),
                    onset_dur=cons,
                    vowel=int(rng.integers(len(_VOWELS))),
                    vowel_start=t + cons,
                    vowel_end=t + dur - coda_dur,
                    coda_dur=coda_dur,
                    end=t + dur,
                    stressed=k == stressed,
                    gain=rng.uniform(0.8, 1.0) if k == stressed else rng.uniform(0.4, 0.75),
                    fricative=int(rng.integers(len(_FRICATIVE_BANDS))),
                    locus=_F2_LOCI[int(rng.integers(len(_F2_LOCI)))],
                )
            )
            t += dur
            if len(syllables) == 1 and t > end:
                return syllables
        word += 1
        # Pauses between words: mostly short, sometimes a phrase break.
        t += rng.uniform(0.06, 0.3) if rng.random() < 0.8 else rng.uniform(0.3, 0.6)
        if t >= end - 0.1:
            return syllables


def _pitch_track(rng, talker: Talker, syllables: list[dict], times: np.ndarray, seconds: float) -> np.ndarray:
    """f0 in Hz at ``times``: declination, word accents, final fall/rise, drift, jitter."""
    r = talker.pitch_range
    st = -rng.uniform(1.5, 4.0) * r * times / seconds  # declination over the utterance
    for s in syllables:
        if s["stressed"]:
            centre = 0.5 * (s["vowel_start"] + s["vowel_end"])
            width = rng.uniform(0.06, 0.15)
            st += rng.uniform(1.0, 4.0) * r * np.exp(-0.5 * ((times - centre) / width) ** 2)
    last_end = syllables[-1]["end"]
    final = np.clip((times - (last_end - 0.3)) / 0.3, 0.0, 1.0)
    st += (rng.uniform(3.0, 6.0) if rng.random() < 0.25 else -rng.uniform(1.5, 4.0)) * r * final
    for _ in range(2):  # slow drift
        st += rng.uniform(0.1, 0.5) * np.sin(
            2 * np.pi * rng.uniform(0.3, 2.0) * times + rng.uniform(0, 2 * np.pi)
        )
    st += 0.01 * np.cumsum(rng.normal(0.0, 1.0, len(times)))  # slow random wander
    return talker.f0 * 2.0 ** (st / 12.0)


def _formant_tracks(rng, talker: Talker, syllables: list[dict], times: np.ndarray) -> np.ndarray:
    """F1..F4 at ``times``: vowel targets held through the nucleus, consonant loci between."""
    key_t, key_f = [], []
    for s in syllables:
        vowel = _VOWELS[s["vowel"]] * rng.uniform(0.95, 1.05, 4)
        if s["onset"] != "none":
            locus = vowel.copy()
            locus[0] = 250.0 if s["onset"] == "nasal" else rng.uniform(250, 350)
            locus[1] = s["locus"]
            key_t.append(s["start"] + 0.5 * s["onset_dur"])
            key_f.append(locus)
        vdur = s["vowel_end"] - s["vowel_start"]
        key_t += [s["vowel_start"] + 0.3 * vdur, s["vowel_end"] - 0.25 * vdur]
        key_f += [vowel, vowel]
    key_t, key_f = np.asarray(key_t), np.asarray(key_f) * talker.formant_scale
    order = np.argsort(key_t, kind="stable")
    key_t, key_f = key_t[order], key_f[order]
    return np.stack([np.interp(times, key_t, key_f[:, k]) for k in range(4)], axis=1)


def _resonator_response(freqs: np.ndarray, bws: np.ndarray, sample_rate: int, n_fft: int) -> np.ndarray:
    """Frequency response of a cascade of Klatt resonators (each unity gain at DC),
    y[n] = A x[n] + B y[n-1] + C y[n-2]; ``freqs``/``bws`` are ``[frames, K]``."""
    c = -np.exp(-2 * np.pi * bws / sample_rate)
    b = 2 * np.exp(-np.pi * bws / sample_rate) * np.cos(2 * np.pi * freqs / sample_rate)
    a = 1 - b - c
    # Denominator polynomial in z^-1 per frame (product of the K quadratics), evaluated
    # on the unit circle by one FFT: far cheaper than K complex divisions per bin.
    den = np.zeros((freqs.shape[0], 2 * freqs.shape[1] + 1))
    den[:, 0] = 1.0
    for k in range(freqs.shape[1]):
        quad = (1.0, -b[:, k, None], -c[:, k, None])
        den = (
            den * quad[0]
            + np.pad(den[:, :-1], ((0, 0), (1, 0))) * quad[1]
            + np.pad(den[:, :-2], ((0, 0), (2, 0))) * quad[2]
        )
    return np.prod(a, axis=1)[:, None] / sp_fft.rfft(den, n_fft)


def _formant_frames(sample_rate: int) -> tuple[int, int]:
    """(FFT size, hop) of the time-varying filter: >= 64 ms FFTs (the resonators ring out
    inside them), 8 hops per FFT (8 ms at 16 kHz: formants move over tens of ms)."""
    n_fft = 1 << int(np.ceil(np.log2(0.064 * sample_rate)))
    return n_fft, n_fft // 8


def _time_varying_formants(x: np.ndarray, freqs_at, bws: np.ndarray, sample_rate: int) -> np.ndarray:
    """Filter ``x`` with formants that move over time, vectorised: the excitation is cut
    into Hann-windowed pieces (2 hops long, summing to one), each piece is filtered with
    the formants at its time (zero-padded FFT: the full impulse response, no wrap-around)
    and the outputs are overlap-added. ``freqs_at(times) -> [frames, K]`` in Hz."""
    n = len(x)
    n_fft, hop = _formant_frames(sample_rate)
    win_len = 2 * hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_len) / win_len)  # periodic Hann
    padded = np.concatenate([np.zeros(hop), x, np.zeros(win_len + hop)])
    n_frames = (len(padded) - win_len) // hop + 1
    frames = np.lib.stride_tricks.sliding_window_view(padded, win_len)[::hop][:n_frames] * window
    centres = np.arange(n_frames) * hop / sample_rate  # frame j is centred on x[j * hop]
    freqs = np.minimum(freqs_at(centres), 0.45 * sample_rate)
    spec = sp_fft.rfft(frames, n_fft) * _resonator_response(
        freqs, np.broadcast_to(bws, freqs.shape), sample_rate, n_fft
    )
    pieces = sp_fft.irfft(spec, n_fft).reshape(n_frames, n_fft // hop, hop)
    out = np.zeros((n_frames + n_fft // hop, hop))
    for m in range(n_fft // hop):  # overlap-add, one hop-offset at a time
        out[m : m + n_frames] += pieces[:, m]
    return out.reshape(-1)[hop : hop + n]


def synthesize_utterance(
    rng: np.random.Generator,
    sample_rate: int = 16_000,
    seconds: float | None = None,
    *,
    talker: Talker | None = None,
) -> np.ndarray:
    """One clean speech-like utterance, float32 ``[time]``.

    ``seconds`` defaults to a random 1-3 s; ``talker`` to :func:`random_talker`.
    The level varies between utterances (RMS -30 to -20 dBFS, peak at most 0.9).
    """
    sample_rate = _check_sample_rate(sample_rate)
    if seconds is None:
        seconds = float(rng.uniform(1.0, 3.0))
    if not np.isfinite(seconds) or seconds < MIN_UTTERANCE_SECONDS:
        raise ValueError(f"seconds must be at least {MIN_UTTERANCE_SECONDS}, got {seconds}")
    talker = talker if talker is not None else random_talker(rng)
    n = int(round(seconds * sample_rate))
    block = max(1, int(round(0.005 * sample_rate)))  # control tracks (pitch, formants) every 5 ms
    n_blocks = -(-n // block)
    syllables = _plan_syllables(rng, n / sample_rate, talker.rate)
    t_blocks = (np.arange(n_blocks) + 0.5) * block / sample_rate
    t = np.arange(n) / sample_rate

    # Glottal source: Rosenberg flow pulse per pitch period, differentiated.
    f0 = np.interp(t, t_blocks, _pitch_track(rng, talker, syllables, t_blocks, n / sample_rate))
    f0 = np.minimum(f0, sample_rate / 8)
    phase = np.cumsum(f0 / sample_rate) + rng.uniform()
    frac = phase - np.floor(phase)
    tp, tn = 0.65 * talker.open_quotient, 0.35 * talker.open_quotient
    flow = np.where(
        frac < tp,
        0.5 * (1 - np.cos(np.pi * frac / tp)),
        np.where(frac < tp + tn, np.cos(0.5 * np.pi * (frac - tp) / tn), 0.0),
    )
    voiced_source = np.diff(flow, prepend=flow[0]) * (sample_rate / f0)
    aspiration = rng.standard_normal(n) * (0.2 + flow) * talker.breathiness

    # Envelopes: voicing per vowel nucleus (and nasal murmur), noise per consonant.
    voicing = np.zeros(n)
    unvoiced = np.zeros(n)
    ms = sample_rate / 1000
    for s in syllables:
        v0, v1 = int(s["vowel_start"] * sample_rate), int(s["vowel_end"] * sample_rate)
        _add_window(
            voicing, v0, v1 - v0, s["gain"], int(rng.uniform(15, 40) * ms), int(rng.uniform(30, 70) * ms)
        )
        c0, cn = int(s["start"] * sample_rate), int(s["onset_dur"] * sample_rate)
        if s["onset"] == "nasal":
            _add_window(voicing, c0, cn + int(10 * ms), 0.3 * s["gain"], int(10 * ms), int(10 * ms))
        elif s["onset"] == "fricative":
            band = _FRICATIVE_BANDS[s["fricative"]]
            _add_noise_event(unvoiced, rng, c0, cn, 0.35 * s["gain"], band, sample_rate)
        elif s["onset"] == "plosive":  # closure (silence) then a short burst before the vowel
            burst = int(rng.uniform(8, 20) * ms)
            _add_noise_event(
                unvoiced, rng, c0 + cn - burst, burst, 0.6 * s["gain"], (500.0, 7800.0), sample_rate
            )
        if s["coda_dur"] > 0:
            band = _FRICATIVE_BANDS[int(rng.integers(len(_FRICATIVE_BANDS)))]
            _add_noise_event(
                unvoiced, rng, v1, int(s["coda_dur"] * sample_rate), 0.25 * s["gain"], band, sample_rate
            )

    # Vocal tract: moving F1..F4 plus a fixed F5, as a cascade of resonators.
    formants = _formant_tracks(rng, talker, syllables, t_blocks)
    f5 = _F5 * talker.formant_scale

    def freqs_at(times):
        f = np.stack([np.interp(times, t_blocks, formants[:, k]) for k in range(4)], axis=1)
        return np.concatenate([f, np.full((len(times), 1), f5)], axis=1)

    bws = _BANDWIDTHS * rng.uniform(0.8, 1.25, 5) * np.sqrt(talker.formant_scale)
    speech = _time_varying_formants(voicing * (voiced_source + aspiration), freqs_at, bws, sample_rate)
    speech = signal.sosfilt(_highpass_sos(60.0, sample_rate), speech)  # no DC/subsonic drift
    # Match the noise consonants to the vowels' level, then set the utterance level.
    speech = (
        speech / (np.sqrt(np.mean(speech[voicing > 0.5] ** 2)) + 1e-12) if np.any(voicing > 0.5) else speech
    )
    speech = speech + unvoiced
    # A faint floor (75 dB below the speech) so pauses are quiet, not digital zero.
    speech += 10 ** (-75 / 20) * np.sqrt(np.mean(speech**2)) * rng.standard_normal(n)
    return _set_level(speech, rng.uniform(-30.0, -20.0), peak=0.9)


def _add_noise_event(track, rng, start: int, n: int, gain: float, band, sample_rate: int) -> None:
    """Add ``n`` samples of band-passed noise with a raised-cosine envelope at ``start``."""
    lo, hi = max(start, 0), min(start + n, len(track))
    if n <= 4 or hi <= lo:
        return
    pad = 64  # let the band-pass filter settle before the event
    noise = signal.sosfilt(_bandpass_sos(band[0], band[1], sample_rate), rng.standard_normal(n + pad))[pad:]
    noise /= np.sqrt(np.mean(noise**2)) + 1e-12
    attack = int(rng.uniform(0.2, 0.5) * n)
    shaped = gain * _raised_cosine_window(n, attack, n - attack) * noise
    track[lo:hi] += shaped[lo - start : hi - start]


def _set_level(x: np.ndarray, rms_db: float, peak: float) -> np.ndarray:
    rms = np.sqrt(np.mean(x**2))
    if rms <= 0:
        return x.astype(np.float32)
    x = x * (10 ** (rms_db / 20) / rms)
    m = np.max(np.abs(x))
    if m > peak:
        x = x * (peak / m)
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- noises


def _spectral_shape(rng, n: int, sample_rate: int, exponent: float, f_min: float) -> np.ndarray:
    """Gaussian noise with power ∝ 1/f**exponent (flat below ``f_min``), no DC."""
    spec = sp_fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spec *= np.maximum(f, f_min) ** (-exponent / 2)
    spec[0] = 0.0
    return sp_fft.irfft(spec, n)


def _at_random_offset(rng, talk, n):
    """``talk`` padded to ``n`` samples and rotated to a random start: talkers of a babble start anywhere."""
    return np.roll(np.pad(talk, (0, n - len(talk))), int(rng.integers(n)))


def _babble(rng, n, sample_rate):
    seconds = max(n / sample_rate, MIN_UTTERANCE_SECONDS)
    out = np.zeros(n)
    for _ in range(int(rng.integers(3, 7))):
        talk = synthesize_utterance(rng, sample_rate, seconds).astype(np.float64)[:n]
        talk = _at_random_offset(rng, talk, n)
        out += rng.uniform(0.5, 1.0) * talk / (np.sqrt(np.mean(talk**2)) + 1e-12)
    return out


def _hum(rng, n, sample_rate):
    t = np.arange(n) / sample_rate
    mains = float(rng.choice([50.0, 60.0]))
    # Slow wander of the mains frequency (±0.1 %), integrated into the phase.
    wobble = 0.001 * mains * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * (mains * t + np.cumsum(wobble) / sample_rate)
    out = np.sin(phase + rng.uniform(0, 2 * np.pi))
    for k in range(2, int(rng.integers(5, 13)) + 1):
        if k * mains >= 0.45 * sample_rate:
            break
        amp = rng.uniform(0.1, 0.6) / np.sqrt(k) * (1.5 if k % 2 else 1.0)  # transformer buzz: odd emphasis
        out += min(amp, 0.8) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out + 0.01 * rng.standard_normal(n)


def _clicks(rng, n, sample_rate):
    rate = rng.uniform(3.0, 30.0)  # clicks per second
    count = max(1, int(rng.poisson(rate * n / sample_rate)))
    impulses = np.zeros(n)
    where = rng.integers(0, n, count)
    impulses[where] = rng.choice([-1.0, 1.0], count) * 10 ** (rng.uniform(-20, 0, count) / 20)
    klen = max(4, int(rng.uniform(0.5, 3.0) * sample_rate / 1000))
    kernel = rng.standard_normal(klen) * np.exp(-np.arange(klen) / (0.25 * klen))
    kernel[0] = 1.0
    out = signal.fftconvolve(impulses, kernel)[:n]
    return out + 1e-3 * np.max(np.abs(out)) * rng.standard_normal(n)


def _bursts(rng, n, sample_rate):
    """Non-stationary band noise: random bursts with smooth edges over a faint floor."""
    out = 0.03 * rng.standard_normal(n)
    for _ in range(int(rng.integers(1, 4))):
        low = rng.uniform(100.0, 2000.0)
        band = signal.sosfilt(
            _bandpass_sos(low, low * 2 ** rng.uniform(1, 3), sample_rate), rng.standard_normal(n)
        )
        band /= np.sqrt(np.mean(band**2)) + 1e-12
        env = np.zeros(n)
        count = max(1, int(rng.poisson(rng.uniform(1.0, 4.0) * n / sample_rate)))
        for _ in range(count):
            length = int(rng.uniform(0.05, 0.6) * sample_rate)
            edge = int(rng.uniform(0.1, 0.4) * length)
            _add_window(env, int(rng.integers(-length // 2, n)), length, rng.uniform(0.3, 1.0), edge, edge)
        # Amplitude modulation inside bursts (2-12 Hz), like machinery or traffic.
        t = np.arange(n) / sample_rate
        env *= 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 12) * t + rng.uniform(0, 2 * np.pi))
        out += band * env
    return out


def _coloured(rng, n, sample_rate):
    """Stationary-ish noise with a random smooth spectrum: a 1/f**a slope (a in 0..2.5) times a
    random envelope of ~8 bumps across the band (fans, rooms, traffic, vents), slowly modulated."""
    spec = sp_fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sample_rate)
    slope = np.maximum(f, 30.0) ** (-rng.uniform(0.0, 2.5) / 2)
    knots = np.linspace(0, sample_rate / 2, 10)
    envelope_db = np.interp(f, knots, rng.uniform(-12.0, 12.0, len(knots)))
    spec *= slope * 10 ** (envelope_db / 20)
    spec[0] = 0.0
    x = sp_fft.irfft(spec, n)
    t = np.arange(n) / sample_rate
    depth = rng.uniform(0.0, 0.6)  # level changes like passing traffic or a fan's surge
    return x * (1 + depth * np.sin(2 * np.pi * rng.uniform(0.1, 1.5) * t + rng.uniform(0, 2 * np.pi)))


def _tts_babble(rng, n, sample_rate):
    from datamodules.tts_speech import tts_utterance

    seconds = max(n / sample_rate, MIN_UTTERANCE_SECONDS)
    out = np.zeros(n)
    for _ in range(int(rng.integers(2, 7))):
        talk = tts_utterance(rng, sample_rate, seconds).astype(np.float64)[:n]
        talk = _at_random_offset(rng, talk, n)
        out += rng.uniform(0.5, 1.0) * talk / (np.sqrt(np.mean(talk**2)) + 1e-12)
    return out


def _room_reverb(rng, x, sample_rate, rt60, drr_db):
    """``x`` in a diffuse room: a direct path plus an exponentially decaying Gaussian tail (energy falls
    60 dB in ``rt60`` seconds) whose energy is ``drr_db`` below the direct path's; 0-5 ms pre-delay."""
    length = int(1.2 * rt60 * sample_rate)
    t = np.arange(length) / sample_rate
    tail = rng.standard_normal(length) * 10 ** (-3.0 * t / rt60)
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))
    ir = np.concatenate([[1.0], np.zeros(int(rng.uniform(0, 0.005) * sample_rate)), tail])
    return signal.fftconvolve(x, ir)[: len(x)]


def _cafe(rng, n, sample_rate):
    """Distant babble in a reverberant room (cafés, canteens, open offices): 3-12 talkers (eSpeak NG
    sentences or source-filter speech), each at its own level (-12..0 dB) and distance (direct-to-reverberant
    ratio -12..+6 dB) in one room (RT60 0.3-1.0 s), dulled by distance (first-order low-pass at 2.5-7 kHz),
    over room tone (1/f to 1/f² noise, 10-30 dB below the talkers)."""
    from datamodules.tts_speech import tts_utterance

    seconds = max(n / sample_rate, MIN_UTTERANCE_SECONDS)
    rt60 = rng.uniform(0.3, 1.0)
    out = np.zeros(n)
    for _ in range(int(rng.integers(3, 13))):
        make = tts_utterance if rng.random() < 0.5 else synthesize_utterance
        talk = make(rng, sample_rate, seconds).astype(np.float64)[:n]
        talk = _at_random_offset(rng, talk, n)
        talk = _room_reverb(rng, talk, sample_rate, rt60, rng.uniform(-12.0, 6.0))
        out += 10 ** (rng.uniform(-12.0, 0.0) / 20) * talk / (np.sqrt(np.mean(talk**2)) + 1e-12)
    out = signal.sosfilt(signal.butter(1, rng.uniform(2500.0, 7000.0), fs=sample_rate, output="sos"), out)
    tone = _spectral_shape(rng, n, sample_rate, rng.uniform(1.0, 2.0), 20.0)
    tone *= np.sqrt(np.mean(out**2) / (np.mean(tone**2) + 1e-24)) * 10 ** (-rng.uniform(10.0, 30.0) / 20)
    return out + tone


_NOISES = {
    "white": lambda rng, n, sr: rng.standard_normal(n),
    "pink": lambda rng, n, sr: _spectral_shape(rng, n, sr, 1.0, 20.0),
    "brown": lambda rng, n, sr: _spectral_shape(rng, n, sr, 2.0, 20.0),
    "babble": _babble,
    "hum": _hum,
    "clicks": _clicks,
    "bursts": _bursts,
    "coloured": _coloured,
    "tts_babble": _tts_babble,
    "cafe": _cafe,
}
assert tuple(_NOISES) == NOISE_KINDS + EXTRA_NOISE_KINDS


def synthesize_noise(kind: str, rng: np.random.Generator, n: int, sample_rate: int = 16_000) -> np.ndarray:
    """``n`` samples of noise ``kind`` (one of :data:`NOISE_KINDS` or :data:`EXTRA_NOISE_KINDS`),
    float32 at RMS 0.1."""
    if kind not in _NOISES:
        raise ValueError(f"unknown noise kind {kind!r}; choose from {', '.join(_NOISES)}")
    if int(n) < 1:
        raise ValueError(f"noise length n must be at least 1 sample, got {n}")
    sample_rate = _check_sample_rate(sample_rate)
    x = _NOISES[kind](rng, int(n), sample_rate)
    return (0.1 * x / (np.sqrt(np.mean(x**2)) + 1e-12)).astype(np.float32)


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``clean + g * noise`` with ``g`` chosen so that the SNR is exactly ``snr_db`` (float64 math)."""
    clean, noise = np.asarray(clean, dtype=np.float64), np.asarray(noise, dtype=np.float64)
    if clean.shape != noise.shape:
        raise ValueError(f"clean and noise must have the same shape, got {clean.shape} and {noise.shape}")
    if not np.isfinite(snr_db):
        raise ValueError(f"snr_db must be finite, got {snr_db}")
    p_clean, p_noise = np.mean(clean**2), np.mean(noise**2)
    if not (np.isfinite(p_clean) and np.isfinite(p_noise)):
        raise ValueError("clean and noise must hold finite samples")
    if p_clean <= 0 or p_noise <= 0:
        raise ValueError("clean and noise must not be silent (zero power): the SNR is undefined")
    return clean + np.sqrt(p_clean / (p_noise * 10 ** (snr_db / 10))) * noise


# ----------------------------------------------------------------------------- corpus


def _check_sample_rate(sample_rate) -> int:
    if int(sample_rate) != sample_rate or int(sample_rate) < 8000:
        raise ValueError(f"sample_rate must be an integer of at least 8000 Hz, got {sample_rate}")
    return int(sample_rate)


def _settings(
    seed,
    n_train,
    n_val,
    n_test,
    min_seconds,
    max_seconds,
    snr_range,
    sample_rate,
    noise_kinds,
    tts_fraction=0.0,
    max_noise_layers=1,
    recording_eq=False,
    clean_floor_db=None,
) -> dict:
    """Validate the corpus settings; return them normalised (JSON-friendly)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    counts = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
    min_seconds, max_seconds = float(min_seconds), float(max_seconds)
    if not (np.isfinite(min_seconds) and min_seconds >= MIN_UTTERANCE_SECONDS):
        raise ValueError(f"min_seconds must be at least {MIN_UTTERANCE_SECONDS}, got {min_seconds}")
    if not np.isfinite(max_seconds) or min_seconds > max_seconds:
        raise ValueError(f"min_seconds ({min_seconds}) must not exceed max_seconds ({max_seconds})")
    try:
        lo, hi = (float(v) for v in snr_range)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"snr_range must be two numbers (low, high) in dB, got {snr_range!r}") from exc
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise ValueError(f"snr_range must be finite with low <= high, got {snr_range!r}")
    kinds = (noise_kinds,) if isinstance(noise_kinds, str) else tuple(str(k) for k in noise_kinds)
    if not kinds:
        raise ValueError(f"noise_kinds must name at least one of {', '.join(NOISE_KINDS)}")
    unknown = [k for k in kinds if k not in _NOISES]
    if unknown:
        raise ValueError(f"noise_kinds: unknown noise kind(s) {unknown}; choose from {', '.join(_NOISES)}")
    tts_fraction = float(tts_fraction)
    if not 0.0 <= tts_fraction <= 1.0:
        raise ValueError(f"tts_fraction must be in [0, 1], got {tts_fraction}")
    if isinstance(max_noise_layers, bool) or not isinstance(max_noise_layers, (int, np.integer)) or max_noise_layers < 1:
        raise ValueError(f"max_noise_layers must be an integer of at least 1, got {max_noise_layers!r}")
    if not isinstance(recording_eq, (bool, np.bool_)):
        raise ValueError(f"recording_eq must be true or false, got {recording_eq!r}")
    extra = {}
    if tts_fraction > 0 or max_noise_layers > 1:  # absent at the defaults: older corpora keep their hash
        extra = dict(tts_fraction=tts_fraction, max_noise_layers=int(max_noise_layers))
    if recording_eq:
        extra["recording_eq"] = True
    if clean_floor_db is not None:
        try:
            below = [float(v) for v in clean_floor_db]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"clean_floor_db must be null or [low, high] in dB, got {clean_floor_db!r}") from exc
        if len(below) != 2 or not all(np.isfinite(below)) or not 0 <= below[0] <= below[1]:
            raise ValueError(f"clean_floor_db must be [low, high] in dB with 0 <= low <= high, got {clean_floor_db!r}")
        extra["clean_floor_db"] = below
    return dict(
        generator_version=GENERATOR_VERSION,
        seed=int(seed),
        **{k: int(v) for k, v in counts.items()},
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        snr_range=[lo, hi],
        sample_rate=_check_sample_rate(sample_rate),
        noise_kinds=list(kinds),
        **extra,
    )


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _marker_matches(root: Path, digest: str) -> bool:
    try:
        return json.loads((root / MARKER).read_text())["hash"] == digest
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_float_wav(path: Path, wav: np.ndarray, sample_rate: int) -> Path:
    """Atomically write mono float32 WAV with no PEAK chunk (it holds a timestamp),
    so equal samples give byte-identical files."""

    def _write(tmp: Path) -> None:
        with sf.SoundFile(str(tmp), "w", sample_rate, 1, subtype="FLOAT", format="WAV") as f:
            try:  # SFC_SET_ADD_PEAK_CHUNK = 0x1050, SF_FALSE
                sf._snd.sf_command(f._file, 0x1050, sf._ffi.NULL, 0)
            except AttributeError:  # other soundfile builds: samples stay identical
                pass
            f.write(np.asarray(wav, dtype=np.float32))

    return atomic_write(path, _write)


def recording_floor(
    rng: np.random.Generator, x: np.ndarray, sample_rate: int, below_db: tuple[float, float]
) -> np.ndarray:
    """``x`` plus a recording's noise floor (microphone self-noise, room tone): stationary noise with
    power ∝ 1/f**a (a in 0..1.5, flat below 20 Hz), ``below_db`` (low, high; drawn uniformly) dB under
    ``x``'s RMS.

    Real "clean" recordings are never silent; a denoiser trained on digitally silent targets scrubs that
    floor from real speech (measured in docs/demo_results.md).
    """
    x = np.asarray(x, dtype=np.float64)
    floor = _spectral_shape(rng, len(x), sample_rate, rng.uniform(0.0, 1.5), 20.0)
    gain = np.sqrt(np.mean(x**2) / (np.mean(floor**2) + 1e-24)) * 10 ** (-rng.uniform(*below_db) / 20)
    return x + gain * floor


def recording_eq(rng: np.random.Generator, x: np.ndarray, sample_rate: int) -> np.ndarray:
    """``x`` coloured like one microphone and room: a low shelf of 0 to +12 dB below 100-250 Hz (close
    microphones' proximity effect, voices whose fundamental carries much of their energy) and a high shelf
    of -9 to +3 dB above 2-5 kHz (duller or brighter microphones), both smooth first-order shapes applied
    with zero phase; the RMS and the peak limit (0.9) are kept.

    Real voices carry much more of their energy below 250 Hz than the generated speech: without this, a
    denoiser learns that low frequencies are noise and thins real voices (measured in docs/demo_results.md).
    """
    x = np.asarray(x, dtype=np.float64)
    f = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    low_db, low_fc = rng.uniform(0.0, 12.0), rng.uniform(100.0, 250.0)
    high_db, high_fc = rng.uniform(-9.0, 3.0), rng.uniform(2000.0, 5000.0)
    gain_db = low_db / (1 + (f / low_fc) ** 2) + high_db * (f / high_fc) ** 2 / (1 + (f / high_fc) ** 2)
    y = sp_fft.irfft(sp_fft.rfft(x) * 10 ** (gain_db / 20), len(x))
    rms_x, rms_y = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y**2))
    if rms_y > 0:
        y *= rms_x / rms_y
    peak = np.max(np.abs(y)) if len(y) else 0.0
    if peak > 0.9:
        y *= 0.9 / peak
    return y


def _make_pair(ss: np.random.SeedSequence, settings: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """One (noisy, clean) pair from its own seed sequence: clean and noise use independent
    streams, so an utterance does not change when only the noise choices do."""
    meta_rng, clean_rng, noise_rng = (np.random.default_rng(s) for s in ss.spawn(3))
    sr = settings["sample_rate"]
    n_min = int(np.ceil(settings["min_seconds"] * sr))
    n_max = int(np.floor(settings["max_seconds"] * sr))
    n = int(
        np.clip(
            int(meta_rng.uniform(settings["min_seconds"], settings["max_seconds"]) * sr),
            n_min,
            max(n_min, n_max),
        )
    )
    kinds = settings["noise_kinds"]
    kind = kinds[int(meta_rng.integers(len(kinds)))]
    snr = float(meta_rng.uniform(*settings["snr_range"]))
    tts_fraction = settings.get("tts_fraction", 0.0)
    # Drawn only when used, so corpora without TTS keep their exact streams.
    use_tts = tts_fraction > 0 and meta_rng.random() < tts_fraction
    n_layers = int(meta_rng.integers(1, settings.get("max_noise_layers", 1) + 1))
    if use_tts:
        from datamodules.tts_speech import tts_utterance

        clean = tts_utterance(clean_rng, sr, n / sr).astype(np.float64)[:n]
    else:
        clean = synthesize_utterance(clean_rng, sr, n / sr).astype(np.float64)[:n]
    clean = np.pad(clean, (0, n - len(clean)))
    if settings.get("recording_eq", False):  # its own stream: the other draws stay as they were
        clean = recording_eq(np.random.default_rng(ss.spawn(1)[0]), clean, sr)
    if settings.get("clean_floor_db"):  # its own stream too
        clean = recording_floor(np.random.default_rng(ss.spawn(1)[0]), clean, sr, settings["clean_floor_db"])
    noise = synthesize_noise(kind, noise_rng, n, sr).astype(np.float64)
    for _ in range(n_layers - 1):  # real scenes mix sources: add quieter layers of other kinds
        extra_kind = kinds[int(meta_rng.integers(len(kinds)))]
        noise += 10 ** (meta_rng.uniform(-15.0, 0.0) / 20) * synthesize_noise(extra_kind, noise_rng, n, sr)
        kind = f"{kind}+{extra_kind}"
    noisy = mix_at_snr(clean, noise, snr)
    peak = np.max(np.abs(noisy))
    if peak > 0.99:  # scale the pair together: keeps the SNR, avoids clipping if saved as PCM
        clean, noisy = clean * (0.99 / peak), noisy * (0.99 / peak)
    return (
        noisy.astype(np.float32),
        clean.astype(np.float32),
        dict(noise=kind, snr_db=round(snr, 4), samples=n, speech="tts" if use_tts else "source_filter"),
    )


def _write_corpus(tmp: Path, settings: dict) -> None:
    rows = []
    counts = (settings["n_train"], settings["n_val"], settings["n_test"])
    for split_index, (split, count) in enumerate(zip(SPLITS, counts, strict=True)):
        for i in range(count):
            # Splits are independent streams; utterance i of a split does not depend on the counts.
            ss = np.random.SeedSequence(settings["seed"], spawn_key=(split_index, i))
            noisy, clean, meta = _make_pair(ss, settings)
            name = f"synth_{split_index}_{i:05d}.wav"
            write_float_wav(tmp / f"{split}_noisy" / name, noisy, settings["sample_rate"])
            write_float_wav(tmp / f"{split}_clean" / name, clean, settings["sample_rate"])
            rows.append(dict(split=split, name=name, **meta))
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=["split", "name", "noise", "snr_db", "samples", "speech"], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    (tmp / MANIFEST).write_text(buf.getvalue())


def generate_paired_corpus(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 200,
    n_val: int = 20,
    n_test: int = 20,
    min_seconds: float = 1.0,
    max_seconds: float = 3.0,
    snr_range: tuple[float, float] = (-5.0, 20.0),
    sample_rate: int = 16_000,
    noise_kinds=NOISE_KINDS,
    tts_fraction: float = 0.0,
    max_noise_layers: int = 1,
    recording_eq: bool = False,
    clean_floor_db: tuple[float, float] | None = None,
) -> Path:
    """Write (or reuse) the synthetic corpus at ``root`` and return ``root``.

    Layout: ``root/{trainset,valset,testset}_{noisy,clean}/<name>.wav`` (mono
    float32 WAV, equal names and lengths per pair) plus ``root/manifest.csv``
    (noise kind, SNR and length of each pair). ``root/.complete`` records a hash
    of the settings: a matching corpus is reused as is; otherwise the corpus is
    generated into a temporary sibling directory and renamed into place, so
    ``root`` never holds a half-written corpus. A non-empty ``root`` that is not
    a corpus written here is never deleted.

    ``tts_fraction`` of the utterances (drawn per pair) are eSpeak NG sentences
    (:func:`datamodules.tts_speech.tts_utterance`) instead of source-filter speech;
    each pair's noise is 1 to ``max_noise_layers`` kinds summed (the extra ones 0-15 dB
    quieter); ``recording_eq`` colours each clean utterance like a microphone and room
    (:func:`recording_eq`); ``clean_floor_db`` (low, high) adds a recording's noise floor that many dB
    under it (:func:`recording_floor`), so the clean targets are never digitally silent. eSpeak NG's
    output can differ by a little breath noise between runs, so
    a corpus with TTS is reproducible in its texts, voices, noises and SNRs, and its
    files are reused through the settings hash rather than regenerated.
    """
    settings = _settings(
        seed,
        n_train,
        n_val,
        n_test,
        min_seconds,
        max_seconds,
        snr_range,
        sample_rate,
        noise_kinds,
        tts_fraction,
        max_noise_layers,
        recording_eq,
        clean_floor_db,
    )
    digest = settings_hash(settings)
    root = Path(root)
    if _marker_matches(root, digest):
        return root
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / MARKER).exists())):
        raise ValueError(
            f"{root}: exists and is not a synthetic corpus (no {MARKER} marker); "
            "refusing to overwrite it - choose another directory"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-", dir=root.parent))
    try:
        _write_corpus(tmp, settings)
        (tmp / MARKER).write_text(
            json.dumps({"hash": digest, "settings": settings}, sort_keys=True, indent=1)
        )
        old = None
        if root.exists():  # an outdated corpus (or an empty dir): move it aside, then replace
            old = root.with_name(f"{root.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(root, old)
            except FileNotFoundError:  # another process moved it meanwhile
                old = None
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process (e.g. another DDP rank) finished first.
            if _marker_matches(root, digest):
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
