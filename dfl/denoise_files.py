"""Denoising audio files: finding the inputs, planning the outputs, denoising one file.

The library behind ``dfl-denoise`` (:mod:`dfl.cli.denoise`) and ``dfl-eval checkpoint=``
(:func:`dfl.cli.evaluate.enhance_with_model`), so both write the same files. Each output keeps its
input's path relative to the folder (or glob prefix) it came from, its sample rate, channel count,
format and subtype; it is written atomically (:func:`dfl.audio.atomic_write`).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from dfl.audio import AudioError, atomic_write, read_audio, read_blocks, write_audio

AUDIO_SUFFIXES = {f".{ext.lower()}" for ext in sf.available_formats()} | {".ogg", ".opus", ".mp3"}
FLOAT_SUBTYPES = {"FLOAT", "DOUBLE", "VORBIS", "OPUS", "MPEG_LAYER_III"}
BLOCK_FRAMES = 1 << 16  # frames read and written at a time when streaming (~4 s at 16 kHz)
# dfl.audio.atomic_write's temporary files (tempfile.mkstemp: 8 random characters)
STALE_PART = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.part$")


@dataclass(frozen=True)
class Job:
    """One input file and its output path below the output folder."""

    source: Path
    relative: Path  # output path below OUTDIR


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard (outputs keep paths relative to it)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def walk_files(root: Path, *, follow_links: bool) -> list[Path]:
    """Every file below ``root`` (sorted), each real folder visited once.

    With ``follow_links`` links to folders are followed, but a folder already
    seen (a link loop, two links to one place) is not entered again, so the
    walk ends and lists each file once, under the first path found.
    """
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # unreadable or vanished: nothing to list
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=follow_links):
                    subfolders.append(folder / entry.name)
                elif entry.is_file():
                    files.append(folder / entry.name)
            except OSError:
                continue
        pending += reversed(subfolders)  # depth first, in name order
    return sorted(files)


def _matches(parts: list[str], names: tuple[str, ...]) -> bool:
    """glob's rules for one relative path: ``**`` spans folders, wildcards skip hidden names."""
    if not parts:
        return not names
    part = parts[0]
    if part == "**":
        if _matches(parts[1:], names):
            return True
        return bool(names) and not names[0].startswith(".") and _matches(parts, names[1:])
    if not names:
        return False
    name = names[0]
    if glob.has_magic(part) and name.startswith(".") and not part.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, part) and _matches(parts[1:], names[1:])


def expand_glob(pattern: str) -> list[Path]:
    """The files a glob matches (``**`` recursive), without ever looping through links to folders."""
    if "**" not in pattern:
        return sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
    root = _glob_root(pattern)
    parts = list(Path(pattern).parts[len(root.parts) if root != Path(".") else 0:])
    if not root.is_dir():
        return []
    return [p for p in walk_files(root, follow_links=True) if _matches(parts, p.relative_to(root).parts)]


def collect_jobs(inputs: list[str], outdir: Path | None = None) -> tuple[list[Job], list[str]]:
    """Expand files, folders (recursively, audio suffixes only) and globs; returns (jobs, errors).

    When ``outdir`` lies inside a folder (or a glob's folder), the files below
    it are not taken as inputs: they are outputs of this or an earlier run.
    """
    jobs, errors = [], []
    outputs = outdir.resolve() if outdir is not None else None

    def not_an_output(p: Path, root: Path) -> bool:
        real_root = root.resolve()
        if outputs is None or outputs == real_root or not outputs.is_relative_to(real_root):
            return True  # OUTDIR is the input folder or outside it: check_outputs decides
        return not p.resolve().is_relative_to(outputs)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [p for p in walk_files(path, follow_links=False)
                     if p.suffix.lower() in AUDIO_SUFFIXES and not_an_output(p, path)]  # fmt: skip
            if not found:
                errors.append(f"{path}: folder holds no audio files")
            jobs += [Job(p, p.relative_to(path)) for p in found]
        elif path.is_file():
            jobs.append(Job(path, Path(path.name)))
        elif glob.has_magic(item):
            root = _glob_root(item)
            found = [p for p in expand_glob(item) if not_an_output(p, root)]
            if not found:
                errors.append(f"{item}: glob matches no files")
            jobs += [Job(p, p.relative_to(root)) for p in found]
        else:
            errors.append(f"{path}: no such file or folder")
    return jobs, errors


def check_outdir(outdir: Path) -> str | None:
    """Why ``outdir`` cannot hold the outputs (it is a file, or lies under one), checked before any work."""
    path = outdir
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    if path == outdir and not outdir.is_dir():
        return f"-o {outdir} is a file, not a folder; give the folder to write the outputs into"
    if not path.is_dir():
        return f"-o {outdir} lies under {path}, which is a file, not a folder"
    return None


def check_outputs(jobs: list[Job], outdir: Path) -> str | None:
    """Why writing these jobs into ``outdir`` is refused (overwrites an input, two share a path, or a
    file stands where a folder or the output must go)."""
    sources = {job.source.resolve() for job in jobs}
    seen: dict[Path, Path] = {}
    for job in jobs:
        target = (outdir / job.relative).resolve()
        if target in sources:
            return f"output {target} would overwrite an input; choose an OUTDIR outside the inputs"
        if target in seen:
            return f"{seen[target]} and {job.source} would both be written to {target}"
        seen[target] = job.source
        if target.is_dir():
            return f"{job.source}: its output {outdir / job.relative} is a folder"
        for parent in (outdir / job.relative).parents:
            if parent == outdir:
                break
            if os.path.lexists(parent) and not parent.is_dir():
                return f"{job.source}: its output {outdir / job.relative} lies under {parent}, which is a file"
    return None


def stale_parts(jobs: list[Job], outdir: Path) -> list[Path]:
    """Hidden ``.NAME.XXXXXXXX.part`` files that an earlier, killed run left next to these jobs' outputs."""
    stale = []
    for folder, names in _by_folder(jobs, outdir).items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            match = STALE_PART.match(entry)
            if match and match.group(1) in names:
                stale.append(folder / entry)
    return stale


def _by_folder(jobs: list[Job], outdir: Path) -> dict[Path, set[str]]:
    folders: dict[Path, set[str]] = {}
    for job in jobs:
        target = outdir / job.relative
        folders.setdefault(target.parent, set()).add(target.name)
    return folders


def existing_outputs(jobs: list[Job], outdir: Path) -> list[Job]:
    """The jobs whose output is already there (the user's, unless they say otherwise)."""
    return [job for job in jobs if os.path.lexists(outdir / job.relative)]


def denoise_file(denoiser, job: Job, outdir: Path, progress, block_frames: int | None = None) -> float:
    """Denoise one file into ``outdir``; returns its duration in seconds. Raises AudioError naming it.

    Chunked models stream the file (read, denoise and write ``block_frames`` at a time: memory does not
    grow with its length); batch-statistics models, ``--chunk-seconds 0`` and MP3 read it whole.
    """
    try:
        info = sf.info(str(job.source))
    except Exception as exc:
        raise AudioError(f"{job.source}: cannot read audio ({exc})") from exc
    # MP3 frame counts can be estimates, and the chunk plan needs the exact length up front
    if denoiser.chunk_seconds is None or info.format == "MPEG":
        _denoise_whole(denoiser, job, outdir, progress, info)
    else:
        _denoise_streaming(denoiser, job, outdir, progress, info, block_frames or BLOCK_FRAMES)
    return info.frames / info.samplerate


def _denoise_whole(denoiser, job: Job, outdir: Path, progress, info) -> None:
    wav, sr = read_audio(job.source)
    try:
        out = np.empty_like(wav)  # filled channel by channel: no extra whole-file copy
        for i, channel in enumerate(wav):
            out[i] = denoiser.denoise_channel(channel, sr, progress)
    except (ValueError, FloatingPointError) as exc:
        raise AudioError(f"{job.source}: {exc}") from exc
    if info.subtype not in FLOAT_SUBTYPES:
        np.clip(out, -1.0, 1.0, out=out)  # integer PCM would wrap around
    write_audio(outdir / job.relative, out, sr, subtype=info.subtype, format=info.format)


def _denoise_streaming(denoiser, job: Job, outdir: Path, progress, info, block_frames: int) -> None:
    # every channel advances in lockstep: their streams return equally long pieces, written interleaved
    streams = [denoiser.stream_channel(info.frames, info.samplerate, progress) for _ in range(info.channels)]

    def write(tmp: Path) -> None:
        with sf.SoundFile(
            str(tmp), "w", info.samplerate, info.channels, subtype=info.subtype, format=info.format
        ) as out:
            try:
                for block in read_blocks(job.source, block_frames):
                    _write_block(out, [s.push(c) for s, c in zip(streams, block)], info)
                _write_block(out, [s.finish() for s in streams], info)
            except (ValueError, FloatingPointError) as exc:
                if isinstance(exc, AudioError):
                    raise
                raise AudioError(f"{job.source}: {exc}") from exc

    atomic_write(outdir / job.relative, write)


def _write_block(out: sf.SoundFile, channels: list[np.ndarray], info) -> None:
    if not len(channels[0]):
        return
    block = np.stack(channels, axis=1)  # finite: inputs are checked, ChunkStream checks the model's outputs
    if info.subtype not in FLOAT_SUBTYPES:
        np.clip(block, -1.0, 1.0, out=block)  # integer PCM would wrap around
    out.write(block)


def total_seconds(jobs: list[Job]) -> float:
    total = 0.0
    for job in jobs:
        try:
            info = sf.info(str(job.source))
            total += info.frames / info.samplerate * info.channels
        except Exception:  # reported when the file is processed
            pass
    return total
