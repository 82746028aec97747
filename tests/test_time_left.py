"""make demo's wall-clock budget: the training time left after the install and the pretraining (dfl.cli.time_left)."""

from __future__ import annotations

import time

import pytest
from lightning.pytorch.callbacks import Timer

from dfl.cli.time_left import lightning_duration, main, training_seconds


def test_training_gets_what_is_left_of_the_budget_less_the_reserve():
    # 15 minutes, 5.5 of them spent installing and pretraining, 2 kept for the test and the report
    assert training_seconds(start=1000, now=1330, budget=900, reserve=120, floor=120) == 450
    # a fast machine: the training may run the rest (its epochs end sooner)
    assert training_seconds(start=1000, now=1060, budget=900, reserve=120, floor=120) == 720


def test_an_overspent_budget_still_trains_its_floor():
    assert training_seconds(start=1000, now=1850, budget=900, reserve=120, floor=120) == 120
    assert training_seconds(start=1000, now=5000, budget=900, reserve=120, floor=60) == 60
    with pytest.raises(ValueError, match="--floor must be > 0"):
        training_seconds(start=0, now=0, budget=900, reserve=0, floor=0)


@pytest.mark.parametrize("seconds", [0, 59, 479, 3600 + 61, 2 * 86400 + 5])
def test_the_duration_is_what_lightning_reads(seconds):
    text = lightning_duration(seconds)
    assert len(text.split(":")) == 4
    assert Timer(duration=text)._duration == seconds


def test_cli_prints_max_time_and_says_why(capsys):
    assert main(["--start", str(time.time() - 330), "--budget", "900", "--reserve", "120"]) == 0
    out, err = capsys.readouterr()
    days, hours, minutes, seconds = map(int, out.strip().split(":"))
    assert days == hours == 0 and 448 <= 60 * minutes + seconds <= 450  # a second or two pass in the call
    assert "330 s of the 900 s budget used" in err
    main(["--start", str(time.time() - 2000), "--budget", "900", "--floor", "90"])
    out, err = capsys.readouterr()
    assert out.strip() == "00:00:01:30"
    assert "gets its floor of 90 s" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--start", "0", "--budget", "900", "--floor", "0"])
    assert exit_info.value.code == 2
    assert "--floor must be > 0" in capsys.readouterr().err
