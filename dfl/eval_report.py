"""What ``dfl-eval`` writes: per-file CSV, summaries (mean ± 95 % CI), paper table, plots."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from dfl.audio import atomic_write
from dfl.metrics import MetricFailure

KINDS = ("noisy", "enhanced")
# The method paper's table (Germain et al. 2019): SNR and the composite measures, plus PESQ/STOI.
SPECTROGRAM_FRAME = 512  # samples per STFT frame of the spectrogram plots
PAPER_COLUMNS = (("SNR", "snr"), ("SIG", "csig"), ("BAK", "cbak"), ("OVL", "covl"), ("PESQ", "pesq"), ("STOI", "stoi"))


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_per_file_csv(path: Path, rows: list[dict], metrics: list[str]) -> Path:
    """One row per file: ``file``, ``noisy_<m>``/``enhanced_<m>`` (empty when missing), ``missing``."""
    header = ["file"] + [f"{k}_{m}" for k in KINDS for m in metrics] + ["missing"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells, missing = [row["file"]], []
        for k in KINDS:
            for m in metrics:
                v = row[k][m]
                if isinstance(v, MetricFailure):
                    cells.append("")
                    missing.append(f"{k}_{m}: {v.reason}")
                else:
                    cells.append(repr(float(v)))
        writer.writerow(cells + ["; ".join(missing)])
    return _write_text(path, buf.getvalue())


def mean_ci95(values) -> dict:
    """Mean and the half-width of its 95 % Student-t confidence interval (None below 2 values)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": half, "n": n}


def summarize(rows: list[dict], metrics: list[str]) -> dict:
    """Per metric: noisy, enhanced and paired difference (mean, ci95, n), and missing counts with reasons."""
    out = {}
    for m in metrics:
        entry = {}
        for k in KINDS:
            vals = [r[k][m] for r in rows]
            ok = [float(v) for v in vals if not isinstance(v, MetricFailure)]
            reasons = Counter(v.reason for v in vals if isinstance(v, MetricFailure))
            entry[k] = {**mean_ci95(ok), "missing": sum(reasons.values()), "missing_reasons": dict(reasons)}
        diffs = [
            float(r["enhanced"][m]) - float(r["noisy"][m])
            for r in rows
            if not isinstance(r["enhanced"][m], MetricFailure) and not isinstance(r["noisy"][m], MetricFailure)
        ]
        entry["difference"] = mean_ci95(diffs)
        out[m] = entry
    return out


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.3f}" + (f" ± {stat['ci95']:.3f}" if stat["ci95"] is not None else "")


def summary_markdown(summary: dict, num_files: int, source: str) -> str:
    lines = [
        f"# dfl-eval: {num_files} files, enhanced = {source}",
        "",
        "Mean ± half-width of the 95 % confidence interval (Student t) over files;",
        "difference = enhanced − noisy, paired per file.",
        "",
        "| metric | noisy | enhanced | difference | missing (noisy / enhanced) |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, s in summary.items():
        lines.append(
            f"| {m} | {_fmt(s['noisy'])} | {_fmt(s['enhanced'])} | {_fmt(s['difference'])} "
            f"| {s['noisy']['missing']} / {s['enhanced']['missing']} |"
        )
    reasons = [
        f"- {m} ({k}): {count} × {reason}"
        for m, s in summary.items()
        for k in KINDS
        for reason, count in s[k]["missing_reasons"].items()
    ]
    if reasons:
        lines += ["", "## Missing values", "", *reasons]
    return "\n".join(lines) + "\n"


def paper_table_markdown(summary: dict, num_files: int, source: str) -> str:
    """The method paper's layout (SNR, SIG, BAK, OVL) plus PESQ and STOI: one row per condition."""
    cols = [(label, m) for label, m in PAPER_COLUMNS if m in summary]
    lines = [
        f"Test set: {num_files} files. SIG/BAK/OVL = CSIG/CBAK/COVL (Hu & Loizou 2008); "
        "PESQ = wide band (P.862.2); SNR in dB.",
        "",
        "| | " + " | ".join(label for label, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for kind, label in (("noisy", "Noisy"), ("enhanced", source)):
        cells = []
        for _, m in cols:
            mean = summary[m][kind]["mean"]
            cells.append("—" if mean is None else f"{mean:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summaries(out_dir: Path, summary: dict, num_files: int, source: str, paper_table: bool,
                    inputs: dict | None = None) -> list[Path]:
    """``summary.json`` (with ``inputs``: where the files came from, for ``dfl-compare``), ``summary.md`` and,
    when asked, ``paper_table.md``."""
    record = {"num_files": num_files, "enhanced": source, "metrics": summary}
    if inputs is not None:
        record["inputs"] = inputs
    written = [
        _write_text(out_dir / "summary.json", json.dumps(record, indent=2)),
        _write_text(out_dir / "summary.md", summary_markdown(summary, num_files, source)),
    ]
    if paper_table:
        written.append(_write_text(out_dir / "paper_table.md", paper_table_markdown(summary, num_files, source)))
    return written


def _save_png(fig, path: Path, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=dpi)

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)


def write_plot_notes(path: Path, notes: list[str]) -> Path:
    """Why plots were left out (e.g. a file shorter than one spectrogram frame), one line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_text(path, "".join(f"{note}\n" for note in notes))


def spectrogram_png(path: Path, signals: dict[str, np.ndarray], sample_rate: int, title: str,
                    dpi: int = 100, **figure_options) -> Path:
    """Stacked spectrograms on one colour scale fixed relative to the clean reference
    (:func:`dfl.spectrogram.spectrogram_figure`, which takes ``figure_options``), with a colour bar, as a PNG."""
    from dfl.spectrogram import spectrogram_figure

    fig = spectrogram_figure(signals, sample_rate, title, **figure_options)
    return _save_png(fig, path, dpi)


def improvement_histogram_png(path: Path, improvements: list[float], metric: str = "pesq") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(improvements, bins=max(5, min(40, len(improvements) // 3 or 1)), color="tab:blue", edgecolor="white")
    ax.axvline(0.0, color="black", lw=1)
    ax.set_xlabel(f"{metric} improvement (enhanced − noisy)")
    ax.set_ylabel("files")
    ax.set_title(f"Per-file {metric} improvement, {len(improvements)} files")
    fig.tight_layout()
    return _save_png(fig, path)
