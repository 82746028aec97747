"""``dfl-export CKPT --format onnx|torchscript -o FILE``: ship a trained denoiser to other runtimes.

What the exported graph is and which metadata travel with it: :mod:`dfl.export`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfl import SAMPLE_RATE
from dfl.cli import refuse_existing_output
from dfl.export import FORMATS, export_onnx, export_torchscript


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfl-export", description="ship a trained denoiser to other runtimes (ONNX or TorchScript)")
    parser.add_argument("checkpoint", type=Path, help="dfl model file or dfl-train checkpoint")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx (for ONNX Runtime and dfl-denoise --backend onnxruntime) or torchscript "
                        "(torch.jit.load, no dfl needed)")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, type=Path, help="file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it already exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from dfl.checkpoints import CheckpointError, load_model

    if args.output.resolve() == args.checkpoint.resolve():
        parser.error(f"--output {args.output} would overwrite the checkpoint")
    refuse_existing_output(parser, "--output", args.output, args.overwrite)
    try:
        model = load_model(args.checkpoint, "denoiser")
    except CheckpointError as exc:
        print(f"dfl-export: {exc}", file=sys.stderr)
        return 2
    exporter = export_onnx if args.format == "onnx" else export_torchscript
    try:
        path = exporter(model, args.output)
    except OSError as exc:
        print(f"dfl-export: cannot write --output {args.output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.format} model to {path} (input 'waveform' [batch, time] at {SAMPLE_RATE} Hz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
