"""``python -m dfl.cli.demo_table LABEL=EVAL_DIR ...``: one markdown table of ``dfl-eval`` summaries.

`make compare` uses it to print the losses side by side: one row per (label, metric), the noisy and
enhanced means and their paired difference, read from each ``EVAL_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def table(runs: list[tuple[str, Path]]) -> str:
    """The markdown table of ``runs`` (label, dfl-eval folder).

    Args:
        runs: (label, folder holding a dfl-eval ``summary.json``) pairs, in row order.

    Returns:
        The table: columns run, metric, noisy, enhanced, difference (means over files).

    Raises:
        ValueError: a folder has no readable ``summary.json`` (the message names it).
    """
    lines = ["| run | files | metric | noisy | enhanced | difference |", "|---|---:|---|---:|---:|---:|"]
    for label, folder in runs:
        path = Path(folder) / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a dfl-eval summary ({exc})") from exc
        for metric, stats in summary["metrics"].items():
            cells = [stats.get(kind, {}).get("mean") for kind in ("noisy", "enhanced", "difference")]
            text = ["n/a" if v is None else f"{v:+.3f}" if i == 2 else f"{v:.3f}" for i, v in enumerate(cells)]
            lines.append(f"| {label} | {summary.get('num_files', '')} | {metric} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=EVAL_DIR (a dfl-eval output folder)")
    args = parser.parse_args(argv)
    runs = []
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected LABEL=EVAL_DIR")
        runs.append((label, Path(folder)))
    try:
        print(table(runs))
    except ValueError as exc:
        print(f"demo_table: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
