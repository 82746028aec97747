"""Explicit audio I/O: soundfile for reading/writing, torchaudio for resampling.

Waveforms are float32 numpy arrays shaped ``[channels, time]``.
"""

from __future__ import annotations

import os
import tempfile
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
