"""report.html of dfl-eval: what is written (always) and what a real browser makes of it (headless Chromium,
skipped where none is installed)."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import soundfile as sf

from dfl.audio import write_audio
from dfl.html_report import select_for_listening
from dfl.metrics import MetricFailure
from tests.helpers.browser import Browser, find_chromium
from tests.helpers.metric_signals import noisy_version, speech_like
from tests.test_evaluate import _cfg

SR = 16_000
METRICS = ["pesq", "stoi", "si_sdr", "snr"]
SHARED_SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "vbdmd_sample"
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason=f"DFL_CHROMIUM={os.environ['DFL_CHROMIUM']} is not an executable" if os.environ.get("DFL_CHROMIUM")
    else "no Chromium binary on PATH (Debian: apt-get install chromium; or set DFL_CHROMIUM=/path/to/chrome)")


def _row(name, noisy, enhanced):
    return {"file": name, "noisy": {"pesq": noisy}, "enhanced": {"pesq": enhanced}}


def test_listening_set_is_best_worst_and_seeded_random():
    gains = [0.5, -0.3, 1.2, 0.0, 0.8, -1.0, 0.1, 0.3, None, 0.2]
    rows = [_row(f"f{i}", 1.0, MetricFailure("pesq", "silent") if g is None else 1.0 + g) for i, g in enumerate(gains)]
    chosen = select_for_listening(rows, "pesq", per_group=2, seed=0)
    assert {i for i, g in chosen.items() if g == "best"} == {2, 4}
    assert {i for i, g in chosen.items() if g == "worst"} == {5, 1}
    random = {i for i, g in chosen.items() if g == "random"}
    assert len(random) == 2 and not random & {1, 2, 4, 5}
    assert chosen == select_for_listening(rows, "pesq", per_group=2, seed=0)  # the same files every run
    # short sets: every file
    assert select_for_listening(rows[:6], "pesq", per_group=2) == {i: "all" for i in range(6)}


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """dfl-eval on 7 files (the last one's enhanced output silent), 2 files per listening group."""
    root = tmp_path_factory.mktemp("data")
    for i in range(7):
        clean = speech_like(1.0 + 0.25 * (i % 3), seed=40 + i)
        write_audio(root / "testset_clean" / f"utt {i}.wav", clean, SR, subtype="FLOAT")
        write_audio(root / "testset_noisy" / f"utt {i}.wav", noisy_version(clean, 2.0 * i, seed=50 + i), SR,
                    subtype="FLOAT")
        enh = noisy_version(clean, 8.0 + 3 * (i % 4), seed=60 + i) if i < 6 else np.zeros_like(clean)
        write_audio(root / "enhanced" / f"utt {i}.wav", enh, SR, subtype="FLOAT")
    out = tmp_path_factory.mktemp("run")
    from dfl.cli.evaluate import evaluate

    evaluate(_cfg(out, f"data_dir={root}", f"enhanced_dir={root / 'enhanced'}", f"metrics=[{','.join(METRICS)}]",
                  "num_workers=0", "report.per_group=2", "plots.num_spectrograms=0"))
    return root, out


def _links(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_report_is_written_with_relative_links_to_its_own_files(report_run):
    root, out = report_run
    html = (out / "report.html").read_text()
    # every file has a row; 2 best + 2 worst + 2 random have players (7 files > 3 x 2)
    assert html.count('<tr class="main">') == 7 and html.count('<tr class="detail" hidden>') == 6
    assert html.count("<audio ") == 18 and "utt 6.wav" in html
    links = _links(html)
    assert links and all(not re.match(r"^[a-z]+:|^/", link) for link in links), links  # no CDN, no absolute path
    for link in links:
        assert (out / unquote(link)).is_file(), link
    # the players' copies are the evaluated signals (16-bit) with their lengths
    for link in (s for s in links if s.endswith("_clean.wav")):
        name = re.sub(r"^\d{4}_(.*)_clean\.wav$", r"\1", Path(link).name).replace("_", " ") + ".wav"
        ref, _ = sf.read(root / "testset_clean" / name)
        copy, rate = sf.read(out / link)
        assert rate == SR and copy.shape == ref.shape
        np.testing.assert_allclose(copy, ref, atol=1.5 / 2**15)


def _python_order(out: Path, column: str, descending: bool) -> list[str]:
    with open(out / "per_file.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if column.startswith("delta_"):  # the page's improvement column: enhanced - noisy
        m = column.removeprefix("delta_")
        for r in rows:
            r[column] = "" if "" in (r[f"enhanced_{m}"], r[f"noisy_{m}"]) else float(r[f"enhanced_{m}"]) - float(
                r[f"noisy_{m}"])
    present = [r for r in rows if r[column] != ""]
    present.sort(key=lambda r: float(r[column]), reverse=descending)
    return [r["file"] for r in present] + [r["file"] for r in rows if r[column] == ""]


def _click(browser: Browser, selector: str) -> None:
    """A real mouse click (press + release) at the centre of the element."""
    box = browser.evaluate(f"""(() => {{ const e = document.querySelector({selector!r}); e.scrollIntoView();
        const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
    for kind in ("mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


def check_in_browser(run_dir: Path, shots: Path, sort_column: str | None) -> dict:
    """Open ``run_dir/report.html`` from disk and check it; returns what the page showed."""
    with Browser(CHROMIUM) as browser:
        browser.open((run_dir / "report.html").as_uri())
        assert browser.evaluate("document.querySelectorAll('#files tbody').length") > 0
        browser.screenshot(shots / "report_top.png")
        if sort_column is not None:
            col = browser.evaluate(f"""(() => {{ const names = ['file', 'listen'];
                document.querySelectorAll('#files thead tr:first-child th[colspan]').forEach(th =>
                    ['noisy', 'enhanced', 'delta'].forEach(k => names.push(k + '_' + th.textContent)));
                return names.indexOf({sort_column!r}); }})()""")
            order = "Array.from(document.querySelectorAll('#files tbody tr.main td.name')).map(td => td.textContent)"
            selector = f'#files th[data-col="{col}"]'
            _click(browser, selector)
            assert browser.evaluate(f"document.querySelector('{selector}').getAttribute('aria-sort')") == "ascending"
            assert browser.evaluate(order) == _python_order(run_dir, sort_column, descending=False)
            _click(browser, selector)
            assert browser.evaluate(order) == _python_order(run_dir, sort_column, descending=True)
        _click(browser, "#open-all")
        media = browser.load_media()
        browser.evaluate("document.querySelector('tr.detail:not([hidden])').scrollIntoView()")
        browser.screenshot(shots / "report_players.png")
        assert browser.errors() == []
    check_media(media, run_dir)
    return media


def check_media(media: dict, run_dir: Path) -> None:
    """Every audio element shown, its source a file inside ``run_dir`` with the duration the browser found;
    every image loaded from inside ``run_dir``."""
    assert media["audio"] and media["images"]
    for a in media["audio"]:
        path = Path(unquote(urlparse(a["src"]).path))
        assert a["error"] is None and a["visible"], a
        assert path.is_file() and path.is_relative_to(run_dir), a
        assert a["duration"] == pytest.approx(sf.info(str(path)).duration, abs=1e-3), a
    for img in media["images"]:
        path = Path(unquote(urlparse(img["src"]).path))
        assert img["ok"] and img["width"] > 100 and path.is_relative_to(run_dir), img


def _shots(tmp_path: Path) -> Path:
    """Screenshots go to $DFL_REPORT_SCREENSHOTS when set (to look at them), else the test's tmp folder."""
    where = Path(os.environ.get("DFL_REPORT_SCREENSHOTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


@needs_chromium
def test_report_works_in_chromium_from_a_copied_folder(report_run, tmp_path):
    root, out = report_run
    copied = tmp_path / "copied run"  # the run folder copied elsewhere (a space in the path, too)
    shutil.copytree(out, copied)
    shots = _shots(tmp_path)
    media = check_in_browser(copied, shots, sort_column="delta_pesq")
    assert len(media["audio"]) == 18 and len(media["images"]) == 6 + 1  # spectrograms + PESQ histogram
    # the durations are those of the test files
    assert sorted(round(a["duration"], 3) for a in media["audio"])[0] == 1.0
    shot = (shots / "report_top.png").read_bytes()
    assert shot.startswith(b"\x89PNG") and len(shot) > 20_000


@needs_chromium
def test_filter_shows_only_the_chosen_group(report_run):
    _, out = report_run
    with Browser(CHROMIUM) as browser:
        browser.open((out / "report.html").as_uri())
        shown = browser.evaluate("""(() => { const f = document.getElementById('filter'); f.value = 'worst';
            f.dispatchEvent(new Event('change'));
            return Array.from(document.querySelectorAll('#files tbody')).filter(b => !b.hidden)
                        .map(b => b.dataset.group); })()""")
        assert shown == ["worst", "worst"]
        assert browser.errors() == []


@needs_chromium
@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason=f"{SHARED_SAMPLE} (shared reference data) is absent")
def test_report_of_the_sample_pairs_in_chromium(tmp_path):
    """The two real VoiceBank-DEMAND pairs, enhanced by the authors' released model."""
    from dfl.cli.evaluate import evaluate

    root = tmp_path / "data"
    enhanced = SHARED_SAMPLE.parents[1] / "reference" / "authors_tf" / "enhanced"
    for kind in ("noisy", "clean"):
        (root / f"testset_{kind}").mkdir(parents=True)
        for wav in sorted((SHARED_SAMPLE / kind).glob("*.wav")):
            (root / f"testset_{kind}" / wav.name).symlink_to(wav.resolve())
    out = tmp_path / "run"
    evaluate(_cfg(out, f"data_dir={root}", f"enhanced_dir={enhanced}", "metrics=[pesq,stoi,si_sdr]",
                  "num_workers=0"))
    media = check_in_browser(out, _shots(tmp_path / "shots"), sort_column="enhanced_pesq")
    assert len(media["audio"]) == 6


def test_demo_last_step_prints_where_the_report_is(tmp_path):
    """`make demo`'s last command: dfl-eval experiment=eval_demo checkpoint=<train run folder>."""
    import json
    import subprocess
    import sys

    import torch

    from dfl.checkpoints import save_model
    from dfl.models import ContextAggregationNet

    cache = tmp_path / "cache"
    for i in range(2):
        clean = speech_like(1.0, seed=100 + i)
        write_audio(cache / "synthetic_speech" / "testset_clean" / f"s{i}.wav", clean, SR)
        write_audio(cache / "synthetic_speech" / "testset_noisy" / f"s{i}.wav", noisy_version(clean, 5.0, seed=i), SR)
    run = tmp_path / "demo_run"
    torch.manual_seed(0)
    best = save_model(run / "checkpoints" / "epoch_001.ckpt", "denoiser", ContextAggregationNet(dilations=[1, 2],
                                                                                              channels=4))
    save_model(run / "checkpoints" / "last.ckpt", "denoiser", ContextAggregationNet(dilations=[1], channels=2))
    (run / "metrics.json").write_text(json.dumps({"noisy": {}, "enhanced": {}, "checkpoint": str(best)}))
    proc = subprocess.run([sys.executable, "-m", "dfl.cli.evaluate", "experiment=eval_demo", f"checkpoint={run}",
                           f"hydra.run.dir={run / 'eval'}", "progress=false", "num_workers=0",
                           f"paths.cache_dir={cache}"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"Report (open in a browser): {run / 'eval' / 'report.html'}"
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["inputs"]["checkpoint"] == str(best) and set(summary["metrics"]) == {"pesq", "stoi", "si_sdr"}
    assert (run / "eval" / "report.html").read_text().count("<audio ") == 6  # 2 files <= 3 x 4: all
