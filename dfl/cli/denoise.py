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
import signal
import sys
import threading
import time
from pathlib import Path

from dfl.audio import AudioError
from dfl.denoise_files import (
    Job,
    check_outdir,
    check_outputs,
    collect_jobs,
    denoise_file,
    existing_outputs,
    stale_parts,
    total_seconds,
)


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
    for stale in stale_parts(jobs, args.outdir):  # left by a run killed mid-write (kill -9, power loss)
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
        total=round(total_seconds(jobs), 2),
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
    rtf = f"real-time factor {elapsed / seconds:.3f}" if seconds else "no audio denoised"
    print(
        f"denoised {done} file(s), {seconds / 3600:.3f} h of audio in {elapsed:.1f} s "
        f"({rtf}); {len(failed)} failed; "
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
