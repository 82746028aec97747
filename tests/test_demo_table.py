"""`make compare`'s table: dfl-eval summaries side by side."""

from __future__ import annotations

import json

import pytest

from dfl.cli.demo_table import main, table


def _summary(folder, pesq_noisy, pesq_enhanced):
    folder.mkdir(parents=True)
    stats = {"noisy": {"mean": pesq_noisy}, "enhanced": {"mean": pesq_enhanced},
             "difference": {"mean": pesq_enhanced - pesq_noisy}}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps({"num_files": 3, "metrics": {"pesq": stats}}))
    return folder


def test_one_row_per_run_and_metric(tmp_path):
    a = _summary(tmp_path / "fl", 1.5, 1.9)
    b = _summary(tmp_path / "l1", 1.5, 1.4)
    lines = table([("fl", a), ("l1", b)]).splitlines()
    assert lines[2] == "| fl | 3 | pesq | 1.500 | 1.900 | +0.400 |"
    assert lines[3] == "| l1 | 3 | pesq | 1.500 | 1.400 | -0.100 |"


def test_missing_summary_is_named(tmp_path, capsys):
    assert main([f"fl={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere/summary.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["no-label"])
