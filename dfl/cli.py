"""What the argparse tools (dfl-denoise, dfl-export, dfl-import-tf) share: an output that already exists
is the user's, and is replaced only when they say so."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_overwrite_flag(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} that already exists")


def refuse_existing_output(parser: argparse.ArgumentParser, option: str, path: Path, overwrite: bool) -> None:
    """Exit with a usage error (code 2) when ``path`` exists and ``--overwrite`` was not given."""
    if path.exists() and not overwrite:
        kind = "a folder" if path.is_dir() else "a file"
        parser.error(f"{option} {path} is {kind} that already exists; pass --overwrite to replace it")
