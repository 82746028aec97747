"""Small synthetic speech-like test signals shared by the metric and dfl-eval tests."""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter


def speech_like(seconds: float = 2.0, sample_rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Glottal-like harmonic source at a drifting pitch, two formant resonators, 4 Hz syllables."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    source = sum(np.sin(k * phase) / k for k in range(1, 30))
    x = source
    for fc, bw in ((700 + 100 * rng.standard_normal(), 90), (1500 + 200 * rng.standard_normal(), 120)):
        r = np.exp(-np.pi * bw / sample_rate)
        x = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * fc / sample_rate), r * r], x)
    envelope = np.clip(np.sin(2 * np.pi * 2.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    # breath noise in syllables and a -70 dB floor between them, as in a real recording (digital
    # silence makes the LPC fits of the LLR measure ill-conditioned)
    x = x * envelope + 1e-3 * rng.standard_normal(n) * envelope
    x = x / np.max(np.abs(x)) + 3e-4 * rng.standard_normal(n)
    return (0.5 * x / np.max(np.abs(x))).astype(np.float32)


def noisy_version(clean: np.ndarray, snr_db: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(clean.size)
    noise *= np.sqrt(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (clean + noise).astype(np.float32)
