"""`dfl-denoise INPUT... -o OUTDIR --model CKPT`: denoise files, folders (recursive) and globs.

Each output keeps its input's path relative to the folder (or glob prefix) it
came from, its sample rate, channel count, format and subtype. Models with
running BN statistics stream each file in blocks (memory independent of its
length); batch-statistics models read it whole. Outputs are
written atomically and never replace an input; outputs that already exist are
the user's, so the run is refused unless --overwrite (replace them) or
--skip-existing (keep them: resumes an interrupted run) is given. A bad input
is reported with its path and skipped, and the exit code is 1 when any file
failed (2 for unusable arguments).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from dfl.audio import AudioError, atomic_write, read_audio, read_blocks, write_audio

AUDIO_SUFFIXES = {f".{ext.lower()}" for ext in sf.available_formats()} | {".ogg", ".opus", ".mp3"}
FLOAT_SUBTYPES = {"FLOAT", "DOUBLE", "VORBIS", "OPUS", "MPEG_LAYER_III"}
BLOCK_FRAMES = 1 << 16  # frames read and written at a time when streaming (~4 s at 16 kHz)


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


def collect_jobs(inputs: list[str]) -> tuple[list[Job], list[str]]:
    """Expand files, folders (recursively, audio suffixes only) and globs; returns (jobs, errors)."""
    jobs, errors = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                errors.append(f"{path}: folder holds no audio files")
            jobs += [Job(p, p.relative_to(path)) for p in found]
        elif path.is_file():
            jobs.append(Job(path, Path(path.name)))
        elif glob.has_magic(item):
            root = _glob_root(item)
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                errors.append(f"{item}: glob matches no files")
            jobs += [Job(p, p.relative_to(root)) for p in found]
        else:
            errors.append(f"{path}: no such file or folder")
    return jobs, errors


def check_outputs(jobs: list[Job], outdir: Path) -> str | None:
    """Why writing these jobs into ``outdir`` is refused (overwrites an input, or two share a path)."""
    sources = {job.source.resolve() for job in jobs}
    seen: dict[Path, Path] = {}
    for job in jobs:
        target = (outdir / job.relative).resolve()
        if target in sources:
            return f"output {target} would overwrite an input; choose an OUTDIR outside the inputs"
        if target in seen:
            return f"{seen[target]} and {job.source} would both be written to {target}"
        seen[target] = job.source
    return None


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")

    from tqdm import tqdm

    from dfl.checkpoints import CheckpointError
    from dfl.inference import Denoiser

    jobs, errors = collect_jobs(args.inputs)
    for message in errors:
        print(f"dfl-denoise: {message}", file=sys.stderr)
    if not jobs:
        print("dfl-denoise: nothing to denoise", file=sys.stderr)
        return 2
    refusal = check_outputs(jobs, args.outdir)
    if refusal:
        print(f"dfl-denoise: refusing to run: {refusal}", file=sys.stderr)
        return 2
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
    done, failed, seconds = 0, list(errors), 0.0
    start = time.perf_counter()
    for job in jobs:
        bar.set_postfix_str(str(job.relative), refresh=False)
        try:
            seconds += denoise_file(
                denoiser, job, args.outdir, lambda n: bar.update(max(min(round(n / 16_000, 2), bar.total - bar.n), 0))
            )
            done += 1
        except (AudioError, OSError, RuntimeError) as exc:
            failed.append(str(exc))
            bar.write(f"FAILED {exc}", file=sys.stderr)
    bar.close()
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


if __name__ == "__main__":
    sys.exit(main())
