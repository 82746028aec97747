"""Audio file lists with lengths, scanned once and cached, so start-up on 100k files takes seconds.

A manifest lists every audio file under a directory (optionally recursive) with its frame count,
sample rate and channel count, read from the file headers. It is cached as JSON in a cache
directory, keyed by the directory's absolute path and the scan options; each entry remembers the
file's size and modification time, so a later scan re-reads only the headers of files that were
added or changed (and forgets removed ones). Listing 100k files is a ``stat`` each — fast — and the
slow part, opening every file, happens once.

Like git's index, an entry whose modification time is not safely older than the scan itself is
re-read next time ("racily clean"): a file rewritten within the same clock tick with the same size
would otherwise look unchanged.

Unreadable or empty files are recorded with their error rather than raised here, so each caller
raises its own clear error in its own order (see :func:`require_usable`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import soundfile as sf

from dfl.audio import atomic_write

AUDIO_SUFFIXES = (".wav", ".flac")
MANIFEST_VERSION = 1
RACY_NS = 2_000_000_000  # entries modified within 2 s of the scan are re-read next time
PARALLEL_HEADER_READS = 8  # header reads are I/O bound (network file systems): a few threads help


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file or directory at fault."""


class AudioEntry(NamedTuple):
    """One audio file: ``relpath`` under the scanned directory ``root``, and its header facts.

    A named tuple with a lazily joined ``path``: building 100k ``Path`` objects up front would
    cost more than the whole cached scan.
    """

    root: Path
    relpath: str
    frames: int
    sample_rate: int
    channels: int
    error: str | None = None  # why the header could not be read, if it could not

    @property
    def path(self) -> Path:
        return self.root / self.relpath

    def frames_at(self, sample_rate: int) -> int:
        """Length after resampling to ``sample_rate`` (the length ``dfl.audio.resample`` returns)."""
        if self.sample_rate == sample_rate:
            return self.frames
        return -(-self.frames * sample_rate // self.sample_rate)


def require_usable(entry: AudioEntry) -> AudioEntry:
    """Raise :class:`DataError` naming the file when it is unreadable or empty."""
    if entry.error is not None:
        raise DataError(f"{entry.path}: unreadable audio file ({entry.error})")
    if entry.frames == 0:
        raise DataError(f"{entry.path}: audio file is empty (0 samples)")
    return entry


def _list_audio(directory: Path, recursive: bool) -> dict[str, os.stat_result]:
    """``{relative path: stat}`` of the audio files (dot-files skipped: editor/OS debris like ``._x.wav``)."""
    found: dict[str, os.stat_result] = {}
    seen_dirs: set[tuple[int, int]] = set()
    stack = [(directory, "")]
    while stack:
        folder, prefix = stack.pop()
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if recursive:
                        stack.append((Path(entry.path), f"{prefix}{entry.name}/"))
                elif entry.name.lower().endswith(AUDIO_SUFFIXES) and entry.is_file():
                    found[prefix + entry.name] = entry.stat()
    return found


def _read_header(path: Path) -> tuple[int, int, int, str | None]:
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises several types
        return 0, 0, 0, str(exc)
    return int(info.frames), int(info.samplerate), int(info.channels), None


def manifest_path(cache_dir: str | Path, directory: Path, recursive: bool) -> Path:
    key = hashlib.sha1(f"{directory}\0{recursive}\0{','.join(AUDIO_SUFFIXES)}".encode()).hexdigest()[:20]
    return Path(cache_dir).expanduser() / f"{directory.name or 'root'}-{key}.json"


def _load_cached(path: Path, directory: Path, recursive: bool) -> dict[str, list]:
    """Previously scanned rows ``{relpath: [size, mtime_ns, frames, sr, channels, error]}``; {} if unusable."""
    try:
        data = json.loads(path.read_text())
        if data["version"] != MANIFEST_VERSION or data["directory"] != str(directory) or data["recursive"] != recursive:
            return {}
        trusted_before = int(data["scanned_at_ns"]) - RACY_NS
        return {rel: row for rel, *row in data["files"] if row[1] < trusted_before}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}  # missing or corrupt cache: rescan


def scan_audio_dir(
    directory: str | Path, *, recursive: bool = False, cache_dir: str | Path | None = None
) -> list[AudioEntry]:
    """Every audio file under ``directory`` with its header facts, sorted by relative path.

    With ``cache_dir``, headers come from the cached manifest when the file's size and mtime are
    unchanged, and the refreshed manifest is written back atomically. Without it, every header is read.
    """
    directory = Path(directory).expanduser().absolute()
    if not directory.is_dir():
        raise DataError(f"{directory}: directory not found")
    started_ns = time.time_ns()
    listed = _list_audio(directory, recursive)
    cache = manifest_path(cache_dir, directory, recursive) if cache_dir else None
    cached = _load_cached(cache, directory, recursive) if cache else {}

    rows: dict[str, list] = {}
    stale = []
    for rel, st in listed.items():
        row = cached.get(rel)
        if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            rows[rel] = row
        else:
            stale.append((rel, st))
    if stale:
        paths = [directory / rel for rel, _ in stale]
        if len(paths) > 64:
            with ThreadPoolExecutor(PARALLEL_HEADER_READS) as pool:
                headers = list(pool.map(_read_header, paths))
        else:
            headers = [_read_header(p) for p in paths]
        for (rel, st), header in zip(stale, headers):
            rows[rel] = [st.st_size, st.st_mtime_ns, *header]

    if cache and (stale or len(rows) != len(cached) or not cache.is_file()):
        payload = {
            "version": MANIFEST_VERSION,
            "directory": str(directory),
            "recursive": recursive,
            "scanned_at_ns": started_ns,
            "files": [[rel, *rows[rel]] for rel in sorted(rows)],
        }
        atomic_write(cache, lambda p: p.write_text(json.dumps(payload, separators=(",", ":"))))

    return [
        AudioEntry(directory, rel, frames, sr, channels, error)
        for rel, (_, _, frames, sr, channels, error) in sorted(rows.items())
    ]
