"""``dfl-import-tf {denoiser,lossnet} CKPT_PREFIX -o OUT``: the authors' TF checkpoints → dfl model files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfl.cli import refuse_existing_output
from dfl.tf_import.bundle import CheckpointFormatError
from dfl.tf_import.convert import IMPORTERS, convert
from dfl.tf_import.mapping import TFImportError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfl-import-tf",
        description="Convert the authors' TensorFlow 1.x checkpoints (se_model.ckpt, loss_model.ckpt) "
        "into dfl model files usable by dfl-denoise and dfl-train lossnet.checkpoint=...",
    )
    p.add_argument("kind", choices=sorted(IMPORTERS), help="which network the checkpoint holds")
    p.add_argument(
        "prefix",
        help="TF checkpoint prefix, e.g. models/se_model.ckpt (the .index and .data-00000-of-00001 "
        "files must be next to it)",
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="dfl model file to write, e.g. se_model.pt")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it already exists")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_existing_output(parser, "--output", args.output, args.overwrite)
    try:
        path = convert(args.kind, args.prefix, args.output)
    except (FileNotFoundError, CheckpointFormatError, TFImportError, OSError) as exc:
        print(f"dfl-import-tf: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.kind} model {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
