"""dfl-compare: runs x metrics and every run's enhanced audio of the same utterances, from run folders."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf

from dfl.audio import load_mono, write_audio
from dfl.cli import compare
from dfl.cli.evaluate import evaluate
from tests.helpers.browser import Browser
from tests.helpers.metric_signals import noisy_version, speech_like
from tests.test_evaluate import _cfg
from tests.test_report import CHROMIUM, _click, check_media, needs_chromium

SR = 16_000


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two dfl-eval runs (better / no enhancement) and a dfl-train-like run with a tiny model checkpoint."""
    import torch

    from dfl.checkpoints import save_model
    from dfl.models import ContextAggregationNet

    base = tmp_path_factory.mktemp("cmp")
    root = base / "data"
    for i in range(5):
        clean = speech_like(1.0 + 0.25 * i, seed=70 + i)
        write_audio(root / "testset_clean" / f"c{i}.wav", clean, SR, subtype="FLOAT")
        write_audio(root / "testset_noisy" / f"c{i}.wav", noisy_version(clean, 3.0 * i, seed=80 + i), SR,
                    subtype="FLOAT")
        write_audio(root / "good" / f"c{i}.wav", noisy_version(clean, 25.0, seed=90 + i), SR, subtype="FLOAT")
    metrics = "metrics=[snr,si_sdr]"
    good, same = base / "sweep" / "0_loss=fl", base / "sweep" / "1_loss=l1"  # named like a Hydra sweep's runs
    for run, enhanced in ((good, root / "good"), (same, root / "testset_noisy")):
        evaluate(_cfg(base / "tmp_run", f"data_dir={root}", f"enhanced_dir={enhanced}", metrics, "num_workers=0",
                      "report.enabled=false"))
        run.parent.mkdir(exist_ok=True)
        (base / "tmp_run").rename(run)
    trained = base / "sweep" / "2_loss=l2"
    torch.manual_seed(0)
    model = ContextAggregationNet(dilations=[1, 2], channels=4)
    ckpt = save_model(trained / "checkpoints" / "best.pt", "denoiser", model)
    (trained / "metrics.json").write_text(json.dumps({"noisy": {"snr": 6.0}, "enhanced": {"snr": 7.5},
                                                      "checkpoint": str(ckpt)}))
    return root, [good, same, trained], model


def test_compare_page_holds_every_run_and_their_audio(runs, tmp_path):
    import torch

    root, run_dirs, model = runs
    out = tmp_path / "page"
    assert compare.main([*map(str, run_dirs), "-o", str(out), "--utterances", "3", "--data-dir", str(root)]) == 0
    html = (out / "compare.html").read_text()
    assert [m for m in re.findall(r'<td class="name" data-v="([^"]+)"', html)] == ["0_loss=fl", "1_loss=l1",
                                                                                "2_loss=l2"]
    # the runs' numbers: eval runs from summary.json, the train run from metrics.json (its delta computed)
    summary = json.loads((run_dirs[0] / "summary.json").read_text())["metrics"]
    assert f'data-v="{summary["snr"]["enhanced"]["mean"]!r}"' in html and 'data-v="1.5"' in html
    # 3 utterances spread over the 5 files, each: noisy, 3 runs, clean
    audio = sorted((out / "compare_files" / "audio").glob("*.wav"))
    assert len(audio) == 3 * 5 and html.count("<audio ") == 15
    assert {p.name.split("_")[1] for p in audio} == {"c0", "c2", "c4"}
    # run 0's audio is its enhanced file; run 2's is its model run now on the noisy file
    np.testing.assert_allclose(sf.read(out / "compare_files/audio/0001_c2_run0.wav")[0],
                               load_mono(root / "good" / "c2.wav"), atol=1.5 / 2**15)
    with torch.inference_mode():
        expected = model.eval()(torch.from_numpy(load_mono(root / "testset_noisy" / "c2.wav"))[None])[0].numpy()
    got = sf.read(out / "compare_files/audio/0001_c2_run2.wav")[0]
    gain = float(got @ expected / (expected @ expected))  # one gain per utterance, < 1 only against clipping
    assert 0.5 < gain <= 1.0
    np.testing.assert_allclose(got, expected * gain, atol=1.5 / 2**15)
    # chosen files by name; an unknown one is an error naming it; an existing page is kept unless --overwrite
    with pytest.raises(SystemExit):
        compare.main([str(run_dirs[0]), "-o", str(out)])
    assert compare.main([str(run_dirs[0]), "-o", str(out), "--overwrite", "--files", "c1.wav"]) == 0
    assert (out / "compare.html").read_text().count("<audio ") == 3


def test_bad_runs_and_files_are_clear_errors(runs, tmp_path, capsys):
    root, run_dirs, _ = runs
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert compare.main([str(empty), "-o", str(tmp_path / "o1")]) == 1
    assert f"{empty}: neither summary.json (dfl-eval) nor metrics.json (dfl-train)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(run_dirs[0]), "-o", str(tmp_path / "o2"), "--files", "nope.wav"])
    assert "--files: ['nope.wav'] not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a train run alone does not say where its test data is
        compare.main([str(run_dirs[2]), "-o", str(tmp_path / "o3")])
    assert "give --data-dir ROOT" in capsys.readouterr().err
    assert not (tmp_path / "o1" / "compare.html").exists()


def test_train_run_finds_its_test_data_in_its_config_and_same_names_get_their_sweep(runs, tmp_path):
    import shutil

    root, run_dirs, _ = runs
    sweeps = []
    for name in ("sweep_a", "sweep_b"):  # two sweeps' "2_loss=l2", each with its resolved config.yaml
        run = tmp_path / name / "2_loss=l2"
        shutil.copytree(run_dirs[2], run)
        (run / "config.yaml").write_text(f"data:\n  root: {root}\n")
        sweeps.append(run)
    out = tmp_path / "page"
    assert compare.main([*map(str, sweeps), "-o", str(out), "--utterances", "1"]) == 0
    html = (out / "compare.html").read_text()
    assert 'data-v="sweep_a/2_loss=l2"' in html and 'data-v="sweep_b/2_loss=l2"' in html
    assert html.count("<audio ") == 4 and "c0.wav" in html


@needs_chromium
def test_compare_page_in_chromium(runs, tmp_path):
    root, run_dirs, _ = runs
    out = tmp_path / "page"
    assert compare.main([*map(str, run_dirs), "-o", str(out), "--utterances", "2", "--data-dir", str(root)]) == 0
    with Browser(CHROMIUM) as browser:
        browser.open((out / "compare.html").as_uri())
        col = browser.evaluate("""Array.from(document.querySelectorAll('#runs thead tr:last-child th'))
            .find(th => th.cellIndex === 1).dataset.col""")  # the first metric's "enhanced" column
        _click(browser, f'#runs th[data-col="{col}"]')
        _click(browser, f'#runs th[data-col="{col}"]')  # descending: best snr first
        order = browser.evaluate("Array.from(document.querySelectorAll('#runs tbody td.name')).map(t => t.dataset.v)")
        values = {d.name: json.loads((d / "summary.json").read_text())["metrics"]["snr"]["enhanced"]["mean"]
                  if (d / "summary.json").is_file() else 7.5 for d in run_dirs}
        assert order == sorted(values, key=values.get, reverse=True)
        media = browser.load_media()
        assert browser.errors() == []
    check_media(media, out)
    assert len(media["audio"]) == 2 * 5 and len(media["images"]) == 2
