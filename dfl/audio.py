"""Explicit audio I/O: soundfile for reading/writing, torchaudio for resampling.

Waveforms are float32 numpy arrays shaped ``[channels, time]``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


class AudioError(ValueError):
    """A file that cannot be used as audio; the message names the file."""


def read_audio(path: str | os.PathLike, *, always_2d: bool = True) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 ``[channels, time]`` and its sample rate.

    Raises :class:`AudioError` naming the file when it is unreadable, empty or
    holds NaN/Inf samples.
    """
    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types
        raise AudioError(f"{path}: cannot read audio ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioError(f"{path}: audio file is empty (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or Inf samples")
    data = np.ascontiguousarray(data.T)
    return (data if always_2d else data[0]), int(sr)


def resample(wav: np.ndarray | torch.Tensor, orig_sr: int, new_sr: int):
    """Resample along the last axis (band-limited sinc, torchaudio). Keeps the input type."""
    if orig_sr == new_sr:
        return wav
    import torchaudio.functional as AF

    is_np = isinstance(wav, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(wav)) if is_np else wav
    out = AF.resample(t.float(), orig_sr, new_sr)
    return out.numpy() if is_np else out


class StreamResampler:
    """:func:`resample` for a signal that arrives in blocks: the outputs, concatenated, equal resampling it whole.

    torchaudio's sinc resampler (rates divided by their gcd into ``orig``/``new``) computes output group
    ``k`` (``new`` samples) from the inputs ``[k*orig - width, (k+1)*orig + width)``. Each call resamples a
    window that starts on a group boundary at least ``width`` before the first group kept and ends where
    the last group kept has all its inputs, so every kept sample sees exactly what it sees in the whole
    signal (zero padding only at the signal's real ends).
    """

    def __init__(self, orig_sr: int, new_sr: int) -> None:
        g = math.gcd(int(orig_sr), int(new_sr))
        self.orig_sr, self.new_sr = int(orig_sr), int(new_sr)
        self.orig, self.new = self.orig_sr // g, self.new_sr // g
        # torchaudio's kernel half-width for its defaults (lowpass_filter_width=6, rolloff=0.99), plus slack
        self.width = math.ceil(6 * self.orig / (0.99 * min(self.orig, self.new))) + 1
        self._back = math.ceil(self.width / self.orig)  # groups of input kept before the next group out
        self._buf = np.zeros(0, np.float32)
        self._buf_start = 0  # input index of _buf[0], a multiple of orig
        self._received = 0
        self._next_group = 0  # first output group not yet returned

    def output_length(self, input_length: int) -> int:
        """Samples :func:`resample` returns for ``input_length`` inputs."""
        return -(-input_length * self.new // self.orig)

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed the next input samples; returns the output samples that are now final."""
        x = np.asarray(x, dtype=np.float32)
        if self.orig == self.new:
            return x
        self._buf = np.concatenate([self._buf, x])
        self._received += len(x)
        ready = max(0, (self._received - self.width) // self.orig)
        return self._emit(ready) if ready > self._next_group else np.zeros(0, np.float32)

    def finish(self) -> np.ndarray:
        """The remaining output samples once the input has ended."""
        if self.orig == self.new:
            return np.zeros(0, np.float32)
        return self._emit(None)

    def _emit(self, end_group: int | None) -> np.ndarray:
        first = self._next_group
        start = max(0, first - self._back) * self.orig
        stop = None if end_group is None else end_group * self.orig + self.width - self._buf_start
        out = resample(self._buf[start - self._buf_start : stop], self.orig_sr, self.new_sr)
        skip = (first - start // self.orig) * self.new
        if end_group is None:  # the window reaches the real end: torchaudio's own trimming applies
            self._buf = np.zeros(0, np.float32)
            return np.ascontiguousarray(out[skip:])
        self._next_group = end_group
        keep_from = max(0, end_group - self._back) * self.orig
        self._buf = self._buf[keep_from - self._buf_start :].copy()
        self._buf_start = keep_from
        return np.ascontiguousarray(out[skip : skip + (end_group - first) * self.new])


def read_blocks(path: str | os.PathLike, frames: int) -> Iterator[np.ndarray]:
    """Read an audio file as float32 ``[channels, frames]`` blocks (the last may be shorter).

    Raises :class:`AudioError` naming the file, as :func:`read_audio` does (unreadable, empty, NaN/Inf).
    """
    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as f:
            if f.frames == 0:
                raise AudioError(f"{path}: audio file is empty (0 samples)")
            while True:
                block = f.read(frames, dtype="float32", always_2d=True)
                if len(block) == 0:
                    return
                if not np.isfinite(block).all():
                    raise AudioError(f"{path}: audio contains NaN or Inf samples")
                yield np.ascontiguousarray(block.T)
    except AudioError:
        raise
    except Exception as exc:  # soundfile raises several types
        raise AudioError(f"{path}: cannot read audio ({exc})") from exc


def load_mono(path: str | os.PathLike, sample_rate: int = 16_000) -> np.ndarray:
    """Read a file as a mono float32 vector at ``sample_rate`` (channels averaged)."""
    data, sr = read_audio(path)
    mono = data.mean(axis=0) if data.shape[0] > 1 else data[0]
    return np.ascontiguousarray(resample(mono, sr, sample_rate), dtype=np.float32)


def atomic_write(path: str | os.PathLike, writer) -> Path:
    """Call ``writer(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_audio(
    path: str | os.PathLike,
    wav: np.ndarray | torch.Tensor,
    sample_rate: int,
    *,
    subtype: str | None = None,
    format: str | None = None,
) -> Path:
    """Write ``[channels, time]`` (or ``[time]``) audio atomically.

    ``format`` defaults to the one implied by the extension; ``subtype`` to
    soundfile's default for that format (PCM_16 for wav).
    """
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 1:
        wav = wav[None]
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: refusing to write NaN or Inf samples")
    path = Path(path)
    fmt = format or path.suffix.lstrip(".").upper()
    if not fmt:
        raise AudioError(f"{path}: no file extension to choose an audio format from")

    def _write(tmp: Path) -> None:
        sf.write(str(tmp), wav.T, sample_rate, subtype=subtype, format=fmt)

    return atomic_write(path, _write)
