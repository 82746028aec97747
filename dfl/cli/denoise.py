"""`dfl-denoise INPUT... -o OUTDIR --model CKPT`: denoise files, folders (recursive) and globs.

Each output keeps its input's path relative to the folder (or glob prefix) it
came from, its sample rate, channel count, format and subtype. Models with
running BN statistics stream each file in blocks (memory independent of its
length); batch-statistics models read it whole. Outputs are
written atomically and never replace an input; outputs that already exist are
the user's, so the run is refused unless --overwrite (replace them) or
--skip-existing (keep them: resumes an interrupted run) is given. A bad input
is reported with its input and output path and skipped, and the exit code is 1
when any file failed (2 for unusable arguments, checked before the model
loads). ``**`` globs enter each real folder once (link loops end); files below
OUTDIR are never inputs. Ctrl-C and SIGTERM stop with one line, and the
``.NAME.XXXXXXXX.part`` files of a killed run are removed by the next one.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import re
import signal
import sys
import threading
import time
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


def _stale_parts(jobs: list[Job], outdir: Path) -> list[Path]:
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


def _total_seconds(jobs: list[Job]) -> float:
    total = 0.0
    for job in jobs:
        try:
            info = sf.info(str(job.source))
            total += info.frames / info.samplerate * info.channels
        except Exception:  # reported when the file is processed
            pass
    return total


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfl-denoise", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders or globs")
    parser.add_argument("-o", "--outdir", required=True, type=Path,
                        help="folder for the outputs, each at its input's relative path")  # fmt: skip
    parser.add_argument("--model", required=True, type=Path, help="dfl model file, dfl-train checkpoint or .onnx")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)")
    parser.add_argument("--batch-size", type=int, default=1, help="chunks processed together (default 1)")
    parser.add_argument(
        "--chunk-seconds", type=float, default=20.0, help="chunk length; 0 = whole files (default 20)"
    )
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"),
                        help="torch, or onnxruntime for a dfl-export .onnx model (default torch)")  # fmt: skip
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    existing.add_argument("--skip-existing", action="store_true",
                          help="keep outputs that already exist and denoise only the other inputs (outputs are "
                          "written atomically, so an existing one is complete: this resumes an interrupted run)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C (the output being written is removed) and exits cleanly."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run dfl-denoise; Ctrl-C and SIGTERM stop it with a one-line message, no partial output left."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    progress = {"done": 0}
    try:
        return _run(args, progress)
    except (KeyboardInterrupt, Terminated) as exc:
        what = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"dfl-denoise: {what} after {progress['done']} file(s); the file being written was removed, "
              "rerun with --skip-existing to go on", file=sys.stderr)  # fmt: skip
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args, progress: dict) -> int:
    from tqdm import tqdm

    from dfl.checkpoints import CheckpointError
    from dfl.inference import Denoiser

    refusal = check_outdir(args.outdir)
    if refusal:
        print(f"dfl-denoise: refusing to run: {refusal}", file=sys.stderr)
        return 2
    jobs, errors = collect_jobs(args.inputs, args.outdir)
    for message in errors:
        print(f"dfl-denoise: {message}", file=sys.stderr)
    if not jobs:
        print("dfl-denoise: nothing to denoise", file=sys.stderr)
        return 2
    refusal = check_outputs(jobs, args.outdir)
    if refusal:
        print(f"dfl-denoise: refusing to run: {refusal}", file=sys.stderr)
        return 2
    for stale in _stale_parts(jobs, args.outdir):  # left by a run killed mid-write (kill -9, power loss)
        stale.unlink(missing_ok=True)
    present = existing_outputs(jobs, args.outdir)
    if present and not (args.overwrite or args.skip_existing):
        print(f"dfl-denoise: refusing to run: {len(present)} output(s) already exist, e.g. "
              f"{args.outdir / present[0].relative}; pass --overwrite to replace them or --skip-existing to keep "
              "them and denoise the other inputs", file=sys.stderr)  # fmt: skip
        return 2
    skipped = len(present) if args.skip_existing else 0
    if skipped:
        kept = set(present)
        jobs = [job for job in jobs if job not in kept]
        if not jobs:
            print(f"nothing to denoise: all {skipped} output(s) already exist in {args.outdir}")
            return 1 if errors else 0
    try:
        denoiser = Denoiser.from_checkpoint(
            args.model,
            device=args.device,
            backend=args.backend,
            chunk_seconds=args.chunk_seconds,
            batch_size=args.batch_size,
        )
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"dfl-denoise: {exc}", file=sys.stderr)
        return 2
    if denoiser.batch_stats:
        print(
            "dfl-denoise: this model normalises with batch statistics (the authors' release): "
            "each file is processed whole, --chunk-seconds is ignored",
            file=sys.stderr,
        )

    bar = tqdm(
        total=round(_total_seconds(jobs), 2),
        desc="denoising",
        unit="s audio",
        disable=args.quiet,
        file=sys.stderr,
    )
    failed, seconds = list(errors), 0.0
    start = time.perf_counter()
    for job in jobs:
        bar.set_postfix_str(str(job.relative), refresh=False)
        try:
            seconds += denoise_file(
                denoiser, job, args.outdir, lambda n: bar.update(max(min(round(n / 16_000, 2), bar.total - bar.n), 0))
            )
            progress["done"] += 1
        except (AudioError, OSError, RuntimeError) as exc:
            failed.append(_failure(job, args.outdir, exc))
            bar.write(f"FAILED {failed[-1]}", file=sys.stderr)
    bar.close()
    done = progress["done"]
    elapsed = time.perf_counter() - start
    rtf = elapsed / seconds if seconds else float("nan")
    print(
        f"denoised {done} file(s), {seconds / 3600:.3f} h of audio in {elapsed:.1f} s "
        f"(real-time factor {rtf:.3f}); {len(failed)} failed; "
        + (f"{skipped} skipped (output already there); " if skipped else "")
        + f"outputs in {args.outdir}"
    )
    for message in failed:
        print(f"  failed: {message}")
    return 1 if failed else 0


def _failure(job: Job, outdir: Path, exc: Exception) -> str:
    """One failed file as ``INPUT: reason (output OUTPUT)``, the input named once."""
    reason = str(exc)
    if reason.startswith(f"{job.source}: "):
        reason = reason[len(f"{job.source}: "):]
    return f"{job.source}: {reason} (output {outdir / job.relative})"


if __name__ == "__main__":
    sys.exit(main())
