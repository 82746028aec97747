"""``report.html``: one self-contained page per ``dfl-eval`` run to read *and* listen.

The page (no CDN, no network; a few lines of inline JavaScript) holds the summary table, one sortable
row per file, and for a bounded set of files (the best, worst and some random ones by PESQ improvement)
audio players for noisy / enhanced / clean and their spectrograms on one colour scale. The audio and
images are 16-bit copies under ``report/`` next to the page, linked relatively, so the run folder can be
copied or opened from disk anywhere.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np

from dfl.audio import atomic_write, write_audio
from dfl.metrics import MetricFailure

KINDS = ("noisy", "enhanced", "clean")
ASSETS = "report"  # folder next to report.html
# Metrics tried in turn to rank files for listening (the first one evaluated wins).
RANK_METRICS = ("pesq", "si_sdr", "stoi", "snr")

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#1b1b1b;background:#fff}
h1{font-size:1.45em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .4em}
.meta{color:#555;margin:0 0 1em}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d0d0;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f1f3f6}td.name,th.name{text-align:left}
table.sortable thead th[data-col]{cursor:pointer;user-select:none}
table.sortable thead th[data-col]:hover{background:#e2e8f0}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.better{color:#0b6b1f}td.worse{color:#a3120e}td.na{color:#999}
.scroll{overflow-x:auto;max-width:100%}
#files td.name{position:sticky;left:0;background:#fff}
tr.detail td{text-align:left;background:#fafbfc;white-space:normal}
.detail-box{display:flex;gap:1.2em;align-items:flex-start;flex-wrap:wrap;margin:.3em 0}
.players{display:flex;flex-direction:column;gap:.5em}
img.plot{max-width:420px;height:auto}
.players label{display:flex;flex-direction:column;font-weight:600}
.players audio{width:260px}
img.spec{max-width:100%;height:auto;border:1px solid #ddd}
button.listen{font:inherit;padding:0 .5em;cursor:pointer}
.tag{font-size:.8em;padding:0 .4em;border-radius:3px;color:#fff}
.tag.best{background:#17803d}.tag.worst{background:#b42318}.tag.random{background:#5b6576}.tag.all{background:#5b6576}
.controls{margin:.4em 0 .6em;display:flex;gap:1em;align-items:center;flex-wrap:wrap}
.note{color:#555;font-size:.92em}
"""

# Sort by a header click (again: reverse); cells carry their value in data-v, empty = missing (always last).
# A "file group" is one <tbody> (main row + optional detail row), so details move with their row.
SORT_JS = r"""
function dflSortable(table){
  const heads = table.querySelectorAll('thead th[data-col]');
  heads.forEach(th => th.addEventListener('click', () => {
    const col = +th.dataset.col, numeric = th.dataset.type !== 'text';
    const dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
    heads.forEach(h => h.removeAttribute('aria-sort'));
    th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
    const groups = Array.from(table.tBodies);
    const key = g => g.rows[0].cells[col].dataset.v;
    groups.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === '' || y === '') return (x === '') - (y === '');
      return dir * (numeric ? (+x) - (+y) : x.localeCompare(y));
    });
    groups.forEach(g => table.appendChild(g));
  }));
}
document.querySelectorAll('table.sortable').forEach(dflSortable);
"""

FILES_JS = r"""
(function(){
  const table = document.getElementById('files');
  if (!table) return;
  table.addEventListener('click', e => {
    const b = e.target.closest('button.listen');
    if (!b) return;
    const detail = b.closest('tbody').querySelector('tr.detail');
    detail.hidden = !detail.hidden;
    b.setAttribute('aria-expanded', String(!detail.hidden));
  });
  const filter = document.getElementById('filter');
  filter.addEventListener('change', () => {
    for (const g of table.tBodies) {
      const grp = g.dataset.group || '';
      g.hidden = !(filter.value === 'all' || (filter.value === 'listen' ? grp !== '' : grp === filter.value));
    }
  });
  document.getElementById('open-all').addEventListener('click', () => {
    table.querySelectorAll('tr.detail').forEach(d => { d.hidden = false; });
    table.querySelectorAll('button.listen').forEach(b => b.setAttribute('aria-expanded', 'true'));
  });
})();
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, scripts: tuple[str, ...] = (SORT_JS,)) -> str:
    """A whole HTML document: inline CSS and scripts only (works from disk, offline)."""
    js = "".join(f"<script>{s}</script>\n" for s in scripts)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n{body}\n{js}</body></html>\n")


def fmt_stat(stat: dict) -> str:
    if stat.get("mean") is None:
        return "—"
    return f"{stat['mean']:.3f}" + (f" ± {stat['ci95']:.3f}" if stat.get("ci95") is not None else "")


def safe_stem(index: int, name: str) -> str:
    """A file-system and URL safe asset name for the ``index``-th file (names may hold anything)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)[:60]
    return f"{index:04d}_{stem}"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header (for the <img> box, so the page does not jump)."""
    head = Path(path).read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def improvement(row: dict, metric: str) -> float | None:
    a, b = row["noisy"][metric], row["enhanced"][metric]
    if isinstance(a, MetricFailure) or isinstance(b, MetricFailure):
        return None
    return float(b) - float(a)


def rank_metric(metrics: list[str]) -> str:
    return next((m for m in RANK_METRICS if m in metrics), metrics[0])


def select_for_listening(rows: list[dict], metric: str, per_group: int = 20, seed: int = 0) -> dict[int, str]:
    """Row index -> ``"best"`` / ``"worst"`` / ``"random"``: the ``per_group`` files with the largest and the
    smallest improvement of ``metric`` and ``per_group`` others drawn with ``seed``. Sets of at most
    ``3 * per_group`` files are listened to whole (``"all"``)."""
    if len(rows) <= 3 * per_group:
        return {i: "all" for i in range(len(rows))}
    scored = sorted((g, i) for i, r in enumerate(rows) if (g := improvement(r, metric)) is not None)
    chosen = {i: "best" for _, i in scored[::-1][:per_group]}
    for _, i in scored[:per_group]:
        chosen.setdefault(i, "worst")
    rest = [i for i in range(len(rows)) if i not in chosen]
    rng = np.random.default_rng(seed)
    for i in rng.choice(rest, size=min(per_group, len(rest)), replace=False):
        chosen[int(i)] = "random"
    return chosen


def write_listening_assets(out_dir: Path, stem: str, signals: dict[str, np.ndarray], sample_rate: int,
                           title: str) -> dict:
    """16-bit wav copies of the signals (scaled together, only when they would clip) and their spectrogram
    under ``out_dir/report/``; returns relative links, the gain applied (dB) and the image size."""
    from dfl.eval_report import spectrogram_png

    peak = max(float(np.abs(x).max()) for x in signals.values())
    gain = 0.99 / peak if peak > 0.99 else 1.0
    links = {}
    for kind, x in signals.items():
        rel = f"{ASSETS}/audio/{stem}_{kind}.wav"
        write_audio(out_dir / rel, np.asarray(x, dtype=np.float32) * gain, sample_rate, subtype="PCM_16")
        links[kind] = rel
    spec = f"{ASSETS}/spectrograms/{stem}.png"
    spectrogram_png(out_dir / spec, signals, sample_rate, title, dpi=72)
    return {"audio": links, "spectrogram": spec, "gain_db": 20 * np.log10(gain),
            "size": png_size(out_dir / spec), "seconds": len(next(iter(signals.values()))) / sample_rate}


def players_html(assets: dict, labels: dict[str, str] | None = None) -> str:
    cells = []
    for kind, rel in assets["audio"].items():
        label = (labels or {}).get(kind, kind)
        cells.append(f'<label>{esc(label)}<audio controls preload="metadata" src="{esc(rel)}" '
                     f'data-seconds="{assets["seconds"]:.6f}"></audio></label>')
    note = (f'<span class="note">played {assets["gain_db"]:.1f} dB quieter (all three alike) to avoid '
            "clipping</span>" if assets.get("gain_db", 0.0) < -0.05 else "")
    return f'<div class="players">{"".join(cells)}{note}</div>'


def image_html(rel: str, size: tuple[int, int], alt: str, cls: str = "spec") -> str:
    w, h = size
    return f'<img class="{cls}" src="{esc(rel)}" width="{w}" height="{h}" loading="lazy" alt="{esc(alt)}">'


def _value_cell(value, metric: str, delta: bool = False) -> str:
    if value is None or isinstance(value, MetricFailure):
        reason = value.reason if isinstance(value, MetricFailure) else "a value is missing"
        return f'<td class="na" data-v="" title="{esc(reason)}">—</td>'
    v = float(value)
    cls = ""
    if delta:
        cls = ' class="better"' if v > 0 else (' class="worse"' if v < 0 else "")
    return f'<td{cls} data-v="{v!r}">{v:+.3f}</td>' if delta else f'<td data-v="{v!r}">{v:.3f}</td>'


def summary_table_html(summary: dict) -> str:
    rows = []
    for m, s in summary.items():
        rows.append(f'<tr><td class="name">{esc(m)}</td><td>{fmt_stat(s["noisy"])}</td>'
                    f'<td>{fmt_stat(s["enhanced"])}</td><td>{fmt_stat(s["difference"])}</td>'
                    f'<td>{s["noisy"]["missing"]} / {s["enhanced"]["missing"]}</td></tr>')
    return ('<table id="summary"><thead><tr><th class="name">metric</th><th>noisy</th><th>enhanced</th>'
            '<th>difference (enhanced − noisy)</th><th>missing (noisy / enhanced)</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def files_table_html(rows: list[dict], metrics: list[str], chosen: dict[int, str], assets: dict[int, dict]) -> str:
    head1 = ['<th class="name" rowspan="2" data-col="0" data-type="text">file</th>',
             '<th rowspan="2" data-col="1" data-type="text">listen</th>']
    head2 = []
    col = 2
    for m in metrics:
        head1.append(f'<th colspan="3">{esc(m)}</th>')
        for label in ("noisy", "enhanced", "Δ"):
            title = f"{m} improvement (enhanced − noisy)" if label == "Δ" else f"{m} of the {label} file"
            head2.append(f'<th data-col="{col}" title="{esc(title)}">{label}</th>')
            col += 1
    ncols = col
    bodies = []
    for i, row in enumerate(rows):
        group = chosen.get(i, "")
        listen = (f'<td data-v="{group}"><button class="listen" aria-expanded="false">▶ '
                  f'<span class="tag {group}">{"play" if group == "all" else group}</span></button></td>'
                  if group else '<td data-v=""></td>')
        cells = [f'<td class="name" data-v="{esc(row["file"])}">{esc(row["file"])}</td>', listen]
        for m in metrics:
            cells += [_value_cell(row["noisy"][m], m), _value_cell(row["enhanced"][m], m),
                      _value_cell(improvement(row, m), m, delta=True)]
        body = f'<tbody data-group="{group}"><tr class="main">{"".join(cells)}</tr>'
        if i in assets:
            a = assets[i]
            body += (f'<tr class="detail" hidden><td colspan="{ncols}"><div class="detail-box">{players_html(a)}'
                     f'{image_html(a["spectrogram"], a["size"], "spectrograms of " + row["file"])}</div></td></tr>')
        bodies.append(body + "</tbody>")
    return (f'<div class="scroll"><table id="files" class="sortable"><thead><tr>{"".join(head1)}</tr>'
            f'<tr>{"".join(head2)}</tr></thead>\n' + "\n".join(bodies) + "\n</table></div>")


def write_eval_report(out_dir: Path, rows: list[dict], metrics: list[str], summary: dict, signals_of,
                      sample_rate: int, source: str, per_group: int = 20, seed: int = 0,
                      extra_images: list[Path] = ()) -> Path:
    """Write ``out_dir/report.html`` and its assets under ``out_dir/report/``.

    Args:
        out_dir: the run folder.
        rows: per-file metric rows (``file``, ``noisy``/``enhanced`` dicts), in file order.
        metrics: metric names, in column order.
        summary: :func:`dfl.eval_report.summarize` of the rows.
        signals_of: ``index -> {"noisy": wave, "enhanced": wave, "clean": wave}`` (read only for the files
            that get players).
        sample_rate: Hz.
        source: what the enhanced files are (checkpoint or folder name), for the title.
        per_group: files per listening group (best / worst / random by improvement).
        seed: draws the random group.
        extra_images: run-folder PNGs shown under the summary (e.g. the improvement histogram).

    Returns:
        The path of ``report.html`` (written last, atomically).
    """
    out_dir = Path(out_dir)
    ranker = rank_metric(metrics)
    chosen = select_for_listening(rows, ranker, per_group, seed)
    assets = {}
    for i in sorted(chosen):
        name = rows[i]["file"]
        assets[i] = write_listening_assets(out_dir, safe_stem(i, name), signals_of(i), sample_rate, name)
    if len(chosen) == len(rows):
        listen_note = "Every file has players and spectrograms (▶ in the listen column)"
    else:
        listen_note = (f"The {per_group} best, {per_group} worst and {per_group} random files by {esc(ranker)} "
                       f"improvement have players and spectrograms (▶ in the listen column); "
                       f"the table holds all {len(rows)} files")
    images = "".join(
        f'<p>{image_html(p.relative_to(out_dir).as_posix(), png_size(p), p.stem, "plot")}</p>' for p in extra_images
    )
    body = f"""<h1>dfl-eval: {len(rows)} files</h1>
<p class="meta">enhanced = {esc(source)} · sample rate {sample_rate} Hz</p>
<h2>Summary</h2>
{summary_table_html(summary)}
<p class="note">Mean ± half-width of the 95 % confidence interval (Student t) over files; difference =
enhanced − noisy, paired per file. Per-file values: <a href="per_file.csv">per_file.csv</a>.</p>
{images}
<h2>Files</h2>
<p class="note">Click a column header to sort (again to reverse; missing values stay last). {listen_note}.
Spectrograms share one colour scale: dB relative to the clean file's loudest bin.</p>
<div class="controls"><label>show <select id="filter"><option value="all">all files</option>
<option value="listen">files with players</option><option value="best">best</option>
<option value="worst">worst</option><option value="random">random</option></select></label>
<button id="open-all" type="button">open all players</button></div>
{files_table_html(rows, metrics, chosen, assets)}
<script type="application/json" id="dfl-report-data">{json.dumps({"rank_metric": ranker, "files": len(rows),
                                                                     "with_players": len(chosen)})}</script>"""
    text = page(f"dfl-eval: {len(rows)} files, enhanced = {source}", body, (SORT_JS, FILES_JS))
    return atomic_write(out_dir / "report.html", lambda tmp: tmp.write_text(text, encoding="utf-8"))
