"""``python -m dfl.cli.time_left``: the training time left in a wall-clock budget, as ``trainer.max_time``.

`make demo` promises its result within a wall-clock budget (the Makefile's ``DEMO_BUDGET_S``), the install and the
loss network's pretraining included, and those take longer on a slower machine. So it counts from its own start and
gives the training what is left, less a reserve for what runs besides it (the corpus generation before the
training's clock starts, the test, the report), and at least ``--floor``.

    python -m dfl.cli.time_left --start "$(date +%s)" --budget 900 --reserve 120   # ~13 minutes for the training
    00:00:12:59
"""

from __future__ import annotations

import argparse
import sys
import time


def training_seconds(start: float, now: float, budget: float, reserve: float, floor: float) -> int:
    """Seconds the training may run.

    Args:
        start: when the budget began (seconds since the epoch).
        now: the time now, same clock.
        budget: the whole budget in seconds.
        reserve: seconds kept for what runs besides the training.
        floor: the least it is given, even past the budget (a model must come out of it).

    Returns:
        ``budget − (now − start) − reserve``, at least ``floor``, in whole seconds.
    """
    if not floor > 0:
        raise ValueError(f"--floor must be > 0 seconds; got {floor}")
    return int(max(floor, budget - (now - start) - reserve))


def lightning_duration(seconds: int) -> str:
    """``DD:HH:MM:SS``, the form of Lightning's ``Trainer(max_time=...)``."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfl.cli.time_left", description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=float, required=True, help="when the budget began (seconds since the epoch)")
    parser.add_argument("--budget", type=float, required=True, help="the whole budget, seconds")
    parser.add_argument("--reserve", type=float, default=0.0, help="seconds kept for what runs besides the training")
    parser.add_argument("--floor", type=float, default=60.0, help="the least the training is given, seconds")
    args = parser.parse_args(argv)
    elapsed = time.time() - args.start
    try:
        seconds = training_seconds(args.start, args.start + elapsed, args.budget, args.reserve, args.floor)
    except ValueError as exc:
        parser.error(str(exc))
    left = args.budget - elapsed - args.reserve
    if left < args.floor:
        print(
            f"time_left: {elapsed:.0f} s of the {args.budget:.0f} s budget went before the training (install, "
            f"pretraining); it gets its floor of {args.floor:.0f} s and the whole run will take longer",
            file=sys.stderr,
        )
    else:
        print(f"time_left: {elapsed:.0f} s of the {args.budget:.0f} s budget used; training for at most {seconds} s",
              file=sys.stderr)  # fmt: skip
    print(lightning_duration(seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
