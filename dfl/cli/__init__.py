"""What the argparse tools (dfl-denoise, dfl-export, dfl-import-tf) share: an output that already exists
is the user's, and is replaced only when they say so."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def refuse_existing_output(parser: argparse.ArgumentParser, option: str, path: Path, overwrite: bool) -> None:
    """Exit with a usage error (code 2) when the file ``path`` exists and ``overwrite`` (``--overwrite``) is
    false, or when ``path`` is a folder."""
    if path.is_dir():
        parser.error(f"{option} {path} is a folder; give the path of the file to write")
    if os.path.lexists(path) and not overwrite:
        parser.error(f"{option} {path} already exists; pass --overwrite to replace it")
