"""``dfl-compare``: one page to compare runs (e.g. the losses of a sweep) by numbers and by ear.

    dfl-compare multirun/train/2026-01-01_10-00-00/*/ -o compare
    dfl-compare outputs/eval/runs/A outputs/eval/runs/B --files p232_001.wav,p232_005.wav

Reads each run folder as it is: a ``dfl-eval`` run (``summary.json``, ``per_file.csv``, ``enhanced/`` or
its ``enhanced_dir``) or a ``dfl-train`` run (``metrics.json`` and its best checkpoint, which is run on the
chosen test files). Writes ``OUTPUT/compare.html`` (a table of runs x metrics, then for a fixed set of test
utterances noisy, clean and every run's enhanced audio side by side, with spectrograms on one colour
scale) and its audio/images under ``OUTPUT/compare_files/``; the folder works offline, copied anywhere.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dfl.cli import refuse_existing_output

ASSETS = "compare_files"


class RunError(ValueError):
    """A run folder that cannot be compared (the message names it and what is missing)."""


@dataclass
class Run:
    path: Path
    label: str
    kind: str  # "dfl-eval" or "dfl-train"
    metrics: dict  # metric -> {"noisy": stat, "enhanced": stat, "difference": stat}, stat = {"mean", "ci95"}
    num_files: int | None = None
    per_file: dict = field(default_factory=dict)  # file -> {"enhanced_<m>": float, "noisy_<m>": float}
    enhanced_dir: Path | None = None
    checkpoint: Path | None = None
    data_dir: Path | None = None
    split: str = "test"


def _config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):  # dfl-train's resolved one first
        if path.is_file():
            try:
                return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            except Exception:  # an unreadable config only loses the defaults it could give
                return {}
    return {}


def _label(run_dir: Path) -> str:
    """The sweep's ``<n>_<overrides>`` folder name says what differs; a plain run gets its path's tail."""
    name = run_dir.name
    return name if "=" in name else "/".join(run_dir.parts[-2:])


def _resolve(path: str | None, run_dir: Path) -> Path | None:
    if not path:
        return None
    p = Path(path)
    if p.exists():
        return p
    local = run_dir / "checkpoints" / p.name  # the run folder was moved: look next to it
    return local if local.exists() else None


def read_run(run_dir: Path) -> Run:
    """What a run folder holds: metrics, where its enhanced audio is (or the model that makes it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a folder")
    cfg = _config(run_dir)
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        run = Run(run_dir, _label(run_dir), "dfl-eval", summary["metrics"], summary.get("num_files"))
        if (run_dir / "per_file.csv").is_file():
            with open(run_dir / "per_file.csv", newline="") as f:
                run.per_file = {r["file"]: {k: float(v) for k, v in r.items() if k not in ("file", "missing") and v}
                                for r in csv.DictReader(f)}
        inputs = summary.get("inputs") or cfg  # summary.json says where its files were (older runs: the config)
        if (run_dir / "enhanced").is_dir():
            run.enhanced_dir = run_dir / "enhanced"
        elif inputs.get("enhanced_dir"):
            run.enhanced_dir = Path(inputs["enhanced_dir"])
        run.checkpoint = _resolve(inputs.get("checkpoint"), run_dir)
        run.data_dir = Path(inputs["data_dir"]) if inputs.get("data_dir") else None
        run.split = inputs.get("split") or "test"
        return run
    if (run_dir / "metrics.json").is_file():
        raw = json.loads((run_dir / "metrics.json").read_text())
        metrics = {}
        for m in raw.get("enhanced", {}):
            noisy, enhanced = raw.get("noisy", {}).get(m), raw["enhanced"][m]
            metrics[m] = {"noisy": {"mean": noisy}, "enhanced": {"mean": enhanced},
                          "difference": {"mean": None if noisy is None else enhanced - noisy}}
        run = Run(run_dir, _label(run_dir), "dfl-train", metrics)
        run.checkpoint = _resolve(raw.get("checkpoint"), run_dir) or _resolve("last.ckpt", run_dir)
        root = (cfg.get("data") or {}).get("root")
        run.data_dir = Path(root) if root and "${" not in str(root) else None
        return run
    raise RunError(f"{run_dir}: neither summary.json (dfl-eval) nor metrics.json (dfl-train) found")


def pick_files(names: list[str], count: int) -> list[str]:
    """``count`` names spread evenly over the sorted list (the same ones every time)."""
    names = sorted(names)
    if count >= len(names):
        return names
    return [names[int(i)] for i in np.linspace(0, len(names) - 1, count).round()]


def enhanced_signals(run: Run, pairs: list[tuple[str, Path, Path]], sample_rate: int) -> list[np.ndarray]:
    """Each run's enhanced version of the chosen files: its files when it has them, else its model run now."""
    from dfl.cli.evaluate import _load_checked

    if run.enhanced_dir is not None and all((run.enhanced_dir / name).is_file() for name, _, _ in pairs):
        return [_load_checked(run.enhanced_dir / name, sample_rate) for name, _, _ in pairs]
    if run.checkpoint is None:
        where = run.enhanced_dir or "no enhanced/ folder"
        raise RunError(f"{run.path}: enhanced audio of {[n for n, _, _ in pairs]} not found ({where}) and no "
                       "checkpoint to make it")
    import torch

    from dfl.checkpoints import load_model

    model = load_model(run.checkpoint, "denoiser").eval()
    out = []
    with torch.inference_mode():
        for _, noisy, _ in pairs:
            y = model(torch.from_numpy(_load_checked(noisy, sample_rate)).float()[None])[0].numpy()
            if not np.isfinite(y).all():
                raise RunError(f"{run.checkpoint}: the model produced NaN/Inf for {noisy}")
            out.append(y)
    return out


def _stat_cell(stat: dict | None, delta: bool = False) -> str:
    from dfl.html_report import esc

    if not stat or stat.get("mean") is None:
        return '<td class="na" data-v="">—</td>'
    v = float(stat["mean"])
    text = f"{v:+.3f}" if delta else f"{v:.3f}"
    ci = f' title="± {stat["ci95"]:.3f} (95 % CI)"' if stat.get("ci95") is not None else ""
    cls = (' class="better"' if v > 0 else ' class="worse"' if v < 0 else "") if delta else ""
    return f'<td{cls} data-v="{v!r}"{ci}>{esc(text)}</td>'


def runs_table_html(runs: list[Run], metrics: list[str]) -> str:
    from dfl.html_report import esc

    head1 = ['<th class="name" rowspan="2" data-col="0" data-type="text">run</th>',
             '<th rowspan="2" data-col="1" data-type="text">from</th>', '<th rowspan="2" data-col="2">files</th>']
    head2, col = [], 3
    for m in metrics:
        head1.append(f'<th colspan="3">{esc(m)}</th>')
        for label in ("noisy", "enhanced", "Δ"):
            head2.append(f'<th data-col="{col}">{label}</th>')
            col += 1
    bodies = []
    for r in runs:
        cells = [f'<td class="name" data-v="{esc(r.label)}" title="{esc(r.path)}">{esc(r.label)}</td>',
                 f'<td data-v="{r.kind}">{r.kind}</td>',
                 f'<td data-v="{r.num_files if r.num_files is not None else ""}">{r.num_files or "—"}</td>']
        for m in metrics:
            s = r.metrics.get(m, {})
            cells += [_stat_cell(s.get("noisy")), _stat_cell(s.get("enhanced")), _stat_cell(s.get("difference"), True)]
        bodies.append(f'<tbody><tr class="main">{"".join(cells)}</tr></tbody>')
    return (f'<div class="scroll"><table id="runs" class="sortable"><thead><tr>{"".join(head1)}</tr>'
            f'<tr>{"".join(head2)}</tr></thead>\n' + "\n".join(bodies) + "\n</table></div>")


def _per_file_note(run: Run, name: str, metrics: list[str]) -> str:
    values = run.per_file.get(name, {})
    shown = [f"{m} {values[f'enhanced_{m}']:.2f}" for m in metrics[:3] if f"enhanced_{m}" in values]
    return f'<span class="note">{", ".join(shown)}</span>' if shown else ""


def write_compare(runs: list[Run], pairs: list[tuple[str, Path, Path]], out_dir: Path, sample_rate: int = 16_000,
                  progress: bool = True) -> Path:
    """Write ``out_dir/compare.html`` and ``out_dir/compare_files/``; returns the page's path.

    Args:
        runs: the runs, in table order.
        pairs: ``(name, noisy, clean)`` of the test utterances to listen to.
        out_dir: output folder.
        sample_rate: Hz of every file.
        progress: print one line per run while making its audio.

    Returns:
        The path of ``compare.html`` (written last, atomically).
    """
    from dfl.audio import atomic_write, write_audio
    from dfl.cli.evaluate import _load_checked
    from dfl.eval_report import spectrogram_png
    from dfl.html_report import esc, image_html, page, png_size, safe_stem

    metrics = list(dict.fromkeys(m for r in runs for m in r.metrics))
    per_run = []
    for r in runs:
        if progress:
            print(f"dfl-compare: {r.label}", file=sys.stderr)
        per_run.append(enhanced_signals(r, pairs, sample_rate))
    sections = []
    for j, (name, noisy_path, clean_path) in enumerate(pairs):
        stem = safe_stem(j, name)
        signals = {"noisy": _load_checked(noisy_path, sample_rate)}
        labels = {"noisy": "noisy"}
        for i, r in enumerate(runs):
            signals[f"run{i}"] = per_run[i][j]
            labels[f"run{i}"] = r.label
        signals["clean"] = _load_checked(clean_path, sample_rate)
        labels["clean"] = "clean"
        peak = max(float(np.abs(x).max()) for x in signals.values())
        gain = 0.99 / peak if peak > 0.99 else 1.0  # one gain for all: loudness stays comparable
        players = []
        for key, x in signals.items():
            rel = f"{ASSETS}/audio/{stem}_{key}.wav"
            write_audio(out_dir / rel, np.asarray(x, np.float32) * gain, sample_rate, subtype="PCM_16")
            note = _per_file_note(runs[int(key[3:])], name, metrics) if key.startswith("run") else ""
            players.append(f'<label><span>{esc(labels[key])}</span><audio controls preload="metadata" '
                           f'src="{esc(rel)}" data-seconds="{len(x) / sample_rate:.6f}"></audio>{note}</label>')
        spec = f"{ASSETS}/spectrograms/{stem}.png"
        spectrogram_png(out_dir / spec, {labels[k][:28]: x for k, x in signals.items()}, sample_rate, name, dpi=72,
                        panel_height=1.3)
        gain_note = (f'<p class="note">all played {20 * np.log10(gain):.1f} dB quieter to avoid clipping</p>'
                     if gain < 1 else "")
        sections.append(f'<section class="utt"><h3>{esc(name)}</h3>{gain_note}<div class="grid">{"".join(players)}'
                        f'</div><details><summary>spectrograms</summary>'
                        f'{image_html(spec, png_size(out_dir / spec), "spectrograms of " + name)}</details></section>')
    style = ("<style>.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:.6em 1.2em}"
             ".grid label{display:flex;flex-direction:column;font-weight:600;overflow-wrap:anywhere}"
             ".grid audio{width:100%}section.utt{border-top:1px solid #ddd;margin-top:1em}</style>")
    body = f"""{style}<h1>dfl-compare: {len(runs)} runs</h1>
<h2>Metrics</h2>
{runs_table_html(runs, metrics)}
<p class="note">Test-set means (hover a value for its 95 % confidence interval where the run has one); Δ = enhanced −
noisy. Click a header to sort.</p>
<h2>Listen: {len(pairs)} test utterances, every run</h2>
<p class="note">The same files for every run; each utterance's players share one gain. Spectrograms share one
colour scale: dB relative to the clean file's loudest bin.</p>
{"".join(sections)}"""
    text = page(f"dfl-compare: {len(runs)} runs", body)
    return atomic_write(out_dir / "compare.html", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfl-compare", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run folders of dfl-eval (summary.json) or dfl-train (metrics.json), e.g. a sweep's")
    parser.add_argument("-o", "--output", type=Path, default=Path("compare"),
                        help="folder to write compare.html and compare_files/ into (default: ./compare)")
    parser.add_argument("--files", default=None,
                        help="comma-separated test file names to listen to (default: --utterances spread evenly)")
    parser.add_argument("--utterances", type=int, default=4, help="how many test files to listen to (default 4)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="paired folder ROOT of the test files (default: from the first run's config)")
    parser.add_argument("--split", default=None, help="split of --data-dir (default: the run's, else test)")
    parser.add_argument("--sample-rate", type=int, default=16_000, help="sample rate of every file (default 16000)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT/compare.html if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.utterances < 1:
        parser.error(f"--utterances must be >= 1, got {args.utterances}")
    refuse_existing_output(parser, "--output", args.output / "compare.html", args.overwrite)
    from dfl.cli.evaluate import list_pairs

    try:
        runs = [read_run(p) for p in args.runs]
        if len({r.label for r in runs}) < len(runs):  # e.g. "0_loss=l1" of two sweeps: say which sweep
            for r in runs:
                r.label = "/".join(r.path.resolve().parts[-2:])
        data_dir = args.data_dir or next((r.data_dir for r in runs if r.data_dir is not None), None)
        if data_dir is None:
            parser.error("no test data found in the runs' configs; give --data-dir ROOT")
        split = args.split or next((r.split for r in runs if r.data_dir is not None), "test")
        pairs = {name: (name, noisy, clean) for name, noisy, clean in list_pairs(data_dir, split)}
        if args.files:
            wanted = [n.strip() for n in args.files.split(",") if n.strip()]
            unknown = [n for n in wanted if n not in pairs]
            if unknown:
                parser.error(f"--files: {unknown} not in {data_dir} ({split} split)")
        else:
            wanted = pick_files(list(pairs), args.utterances)
        page_path = write_compare(runs, [pairs[n] for n in wanted], args.output, args.sample_rate)
    except (RunError, ValueError, OSError) as exc:
        print(f"dfl-compare: {exc}", file=sys.stderr)
        return 1
    print(f"Comparison (open in a browser): {page_path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
