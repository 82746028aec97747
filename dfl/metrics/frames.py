"""The analysis frames of Loizou's objective measures (``composite.m``: wss, llr, snr).

30 ms frames, hop a quarter of that, periodic-free Hann ``0.5(1 - cos(2πn/(L+1)))``,
n = 1..L, and ``floor(len/hop - L/hop)`` frames (MATLAB's ``for k = 1:num_frames``
with a non-integer ``num_frames``).
"""

from __future__ import annotations

import numpy as np

FRAME_MS = 30  # window length in ms
HOP_DIVISOR = 4  # skiprate = floor(winlength / 4): 75 % overlap


def frame_length(sample_rate: int) -> int:
    return int(round(FRAME_MS * sample_rate / 1000))


def windowed_frames(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """``[num_frames, winlength]`` Hann-windowed frames as in Loizou's code."""
    win = frame_length(sample_rate)
    hop = win // HOP_DIVISOR
    num_frames = int(np.floor(len(x) / hop - win / hop))
    if num_frames < 1:
        return np.zeros((0, win))
    n = np.arange(1, win + 1)
    window = 0.5 * (1 - np.cos(2 * np.pi * n / (win + 1)))
    idx = np.arange(num_frames)[:, None] * hop + np.arange(win)[None, :]
    return x[idx] * window
