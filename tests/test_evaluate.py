"""dfl-eval: per-file CSV, summaries, paper table, plots, W&B, errors, serial == parallel."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from dfl.audio import write_audio
from dfl.cli.evaluate import CONF_DIR, evaluate, score_all
from dfl.metrics import MetricFailure
from tests.helpers.metric_signals import noisy_version, speech_like

SR = 16_000
FAST_METRICS = ["pesq", "stoi", "snr", "si_sdr", "seg_snr", "csig", "cbak", "covl"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """3 pairs in the paired layout + an enhanced folder whose last file is silent (PESQ fails)."""
    root = tmp_path_factory.mktemp("data")
    enhanced = root / "enhanced"
    for i in range(3):
        clean = speech_like(1.5, seed=10 + i)
        noisy = noisy_version(clean, 5.0 + 5 * i, seed=20 + i)
        write_audio(root / "testset_clean" / f"u{i}.wav", clean, SR, subtype="FLOAT")
        write_audio(root / "testset_noisy" / f"u{i}.wav", noisy, SR, subtype="FLOAT")
        enh = noisy_version(clean, 20.0, seed=30 + i) if i < 2 else np.zeros_like(clean)
        write_audio(enhanced / f"u{i}.wav", enh, SR, subtype="FLOAT")
    return root, enhanced


def _cfg(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("eval", overrides=[f"paths.output_dir={out}", "progress=false", *overrides])


def _metrics_arg(names) -> str:
    return f"metrics=[{','.join(names)}]"


@pytest.fixture(scope="module")
def enhanced_run(dataset, tmp_path_factory):
    root, enhanced = dataset
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(out, f"data_dir={root}", f"enhanced_dir={enhanced}", _metrics_arg(FAST_METRICS),
               "num_workers=2", "paper_table=true", "plots.num_spectrograms=2")
    return out, evaluate(cfg)


def test_per_file_csv_has_one_row_per_file_and_missing_reasons(enhanced_run):
    out, _ = enhanced_run
    with open(out / "per_file.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["u0.wav", "u1.wav", "u2.wav"]
    assert set(rows[0]) == {"file", "missing", *(f"{k}_{m}" for k in ("noisy", "enhanced") for m in FAST_METRICS)}
    # SNR of the noisy files is the mixing SNR: 5, 10, 15 dB
    assert [float(r["noisy_snr"]) for r in rows] == pytest.approx([5.0, 10.0, 15.0], abs=1e-3)
    assert float(rows[0]["enhanced_snr"]) == pytest.approx(20.0, abs=1e-3)
    # the silent enhanced file: PESQ and composite missing (empty cells, never 0), with the reason
    assert rows[2]["enhanced_pesq"] == "" and rows[2]["enhanced_csig"] == ""
    assert "enhanced_pesq: PESQ wb" in rows[2]["missing"] and "all zeros" in rows[2]["missing"]
    assert rows[0]["missing"] == "" and float(rows[0]["enhanced_pesq"]) > float(rows[0]["noisy_pesq"])


def test_summaries_report_means_cis_and_missing(enhanced_run):
    out, summary = enhanced_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["num_files"] == 3 and on_disk["metrics"] == json.loads(json.dumps(summary))
    with open(out / "per_file.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    snr_noisy = [float(r["noisy_snr"]) for r in rows]
    s = summary["snr"]
    assert s["noisy"]["mean"] == pytest.approx(np.mean(snr_noisy))
    # 95 % t interval, n = 3: t(0.975, 2) = 4.3027
    assert s["noisy"]["ci95"] == pytest.approx(4.3027 * np.std(snr_noisy, ddof=1) / np.sqrt(3), rel=1e-4)
    diffs = [float(r["enhanced_snr"]) - float(r["noisy_snr"]) for r in rows]
    assert s["difference"]["mean"] == pytest.approx(np.mean(diffs)) and s["difference"]["n"] == 3
    p = summary["pesq"]
    assert p["enhanced"]["n"] == 2 and p["enhanced"]["missing"] == 1 and p["difference"]["n"] == 2
    assert list(p["enhanced"]["missing_reasons"].values()) == [1]
    assert p["noisy"]["missing"] == 0
    md = (out / "summary.md").read_text()
    assert "| pesq |" in md and "| 0 / 1 |" in md and "## Missing values" in md
    table = (out / "paper_table.md").read_text().splitlines()
    assert "| | SNR | SIG | BAK | OVL | PESQ | STOI |" in table
    noisy_row = next(line for line in table if line.startswith("| Noisy |"))
    assert noisy_row.split("|")[2].strip() == f"{np.mean(snr_noisy):.2f}"


def test_plots_are_non_empty_pngs(enhanced_run):
    out, _ = enhanced_run
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["pesq_improvement.png", "spectrogram_u0.png", "spectrogram_u1.png"]
    for p in (out / "plots").glob("*.png"):
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_serial_and_parallel_give_identical_numbers(dataset):
    root, enhanced = dataset
    jobs = [(f"u{i}.wav", root / "testset_noisy" / f"u{i}.wav", root / "testset_clean" / f"u{i}.wav",
             enhanced / f"u{i}.wav", ["pesq", "stoi", "csig", "si_sdr"], SR) for i in range(3)]
    serial = score_all(jobs, 1, progress=False)
    parallel = score_all(jobs, 2, progress=False)
    assert serial == parallel
    assert isinstance(serial[0]["enhanced"]["pesq"], float)


def test_mismatched_rate_or_length_are_errors(dataset, tmp_path):
    root, enhanced = dataset
    bad_rate = tmp_path / "rate"
    bad_len = tmp_path / "len"
    for i in range(3):
        x = speech_like(1.5, seed=10 + i)
        write_audio(bad_rate / f"u{i}.wav", x[::2], 8000, subtype="FLOAT")
        write_audio(bad_len / f"u{i}.wav", x[:-100], SR, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"rate/u0.wav: sample rate 8000 Hz, expected 16000"):
        evaluate(_cfg(tmp_path / "o1", f"data_dir={root}", f"enhanced_dir={bad_rate}", "metrics=[snr]",
                      "num_workers=0"))
    with pytest.raises(ValueError, match=r"len/u0.wav: 23900 samples but its clean reference"):
        evaluate(_cfg(tmp_path / "o2", f"data_dir={root}", f"enhanced_dir={bad_len}", "metrics=[snr]",
                      "num_workers=0"))
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        evaluate(_cfg(tmp_path / "o3", f"data_dir={root}", "metrics=[snr]"))
    with pytest.raises(ValueError, match="enhanced file missing"):
        evaluate(_cfg(tmp_path / "o4", f"data_dir={root}", f"enhanced_dir={tmp_path}", "metrics=[snr]"))
    with pytest.raises(ValueError, match="report.per_group must be >= 1, got 0"):
        evaluate(_cfg(tmp_path / "o6", f"data_dir={root}", f"enhanced_dir={enhanced}", "report.per_group=0"))
    with pytest.raises(ValueError, match=r"metrics: unknown metric 'nope'; valid: pesq, .*dnsmos \(= dnsmos_sig/"):
        evaluate(_cfg(tmp_path / "o5", f"data_dir={root}", f"enhanced_dir={enhanced}", "metrics=[nope]"))


def test_model_checkpoint_is_run_and_scored(dataset, tmp_path):
    import torch

    from dfl.checkpoints import save_model
    from dfl.models import ContextAggregationNet

    root, _ = dataset
    torch.manual_seed(0)
    model = ContextAggregationNet(dilations=[1, 2], channels=4)
    ckpt = save_model(tmp_path / "tiny.pt", "denoiser", model)
    out = tmp_path / "run"
    summary = evaluate(_cfg(out, f"data_dir={root}", f"checkpoint={ckpt}", "metrics=[snr,si_sdr]", "num_workers=0",
                            "plots.num_spectrograms=1"))
    written = sorted(p.name for p in (out / "enhanced").glob("*.wav"))
    assert written == ["u0.wav", "u1.wav", "u2.wav"]
    # the enhanced files are the model's output on each whole noisy file
    from dfl.audio import load_mono

    noisy = load_mono(root / "testset_noisy" / "u1.wav")
    with torch.inference_mode():
        expected = model.eval()(torch.from_numpy(noisy)[None])[0].numpy()
    np.testing.assert_allclose(load_mono(out / "enhanced" / "u1.wav"), expected, atol=1e-6)
    assert summary["snr"]["enhanced"]["n"] == 3


def test_cli_with_wandb_offline(dataset, tmp_path):
    root, enhanced = dataset
    out = tmp_path / "cli"
    env_cmd = [sys.executable, "-m", "dfl.cli.evaluate", f"data_dir={root}", f"enhanced_dir={enhanced}",
               "metrics=[snr,pesq]", "num_workers=0", "progress=false", "logger=wandb", f"hydra.run.dir={out}"]
    import os

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    res = subprocess.run(env_cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "per_file.csv").is_file() and (out / "summary.md").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = [p.name for p in runs[0].rglob("*") if p.is_file()]
    assert any(n.endswith(".png") for n in media), media
    assert any("per_file" in n and n.endswith(".table.json") for n in media), media


@pytest.mark.parametrize("frames", [1, 100, 400])
def test_stoi_of_a_very_short_signal_is_missing_with_its_reason(frames):
    from dfl.metrics import compute_many

    clean = speech_like(1.0, seed=1)[:frames]
    got = compute_many(["stoi", "estoi", "snr"], clean, noisy_version(clean, 10.0, seed=2), SR)
    for name in ("stoi", "estoi"):
        assert isinstance(got[name], MetricFailure) and "shorter than one analysis frame" in got[name].reason
        assert f"{frames} samples" in got[name].reason
    assert isinstance(got["snr"], float)


def test_a_file_too_short_for_some_metrics_does_not_abort_the_run(dataset, tmp_path):
    root, enhanced = dataset
    data = tmp_path / "data"
    for kind in ("clean", "noisy"):
        (data / f"testset_{kind}").mkdir(parents=True)
        for i in range(2):
            (data / f"testset_{kind}" / f"u{i}.wav").symlink_to(root / f"testset_{kind}" / f"u{i}.wav")
    enh = tmp_path / "enhanced"
    enh.mkdir()
    for i in range(2):
        (enh / f"u{i}.wav").symlink_to(enhanced / f"u{i}.wav")
    clean = speech_like(1.0, seed=5)[:300]  # 19 ms: too short for STOI, PESQ and the spectrogram
    write_audio(data / "testset_clean" / "a_short.wav", clean, SR, subtype="FLOAT")
    write_audio(data / "testset_noisy" / "a_short.wav", noisy_version(clean, 5.0, seed=6), SR, subtype="FLOAT")
    write_audio(enh / "a_short.wav", noisy_version(clean, 20.0, seed=7), SR, subtype="FLOAT")
    out = tmp_path / "run"
    summary = evaluate(_cfg(out, f"data_dir={data}", f"enhanced_dir={enh}", _metrics_arg(["pesq", "stoi", "snr"]),
                            "num_workers=0", "plots.num_spectrograms=2"))
    with open(out / "per_file.csv", newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    assert rows["a_short.wav"]["enhanced_stoi"] == "" and rows["a_short.wav"]["enhanced_pesq"] == ""
    assert "shorter than one analysis frame" in rows["a_short.wav"]["missing"]
    assert float(rows["a_short.wav"]["enhanced_snr"]) == pytest.approx(20.0, abs=1e-3)
    assert summary["stoi"]["enhanced"]["n"] == 2 and summary["stoi"]["enhanced"]["missing"] == 1
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["pesq_improvement.png", "spectrogram_u0.png"]  # the short file's spectrogram skipped
    assert "spectrogram of a_short.wav skipped: 300 samples" in (out / "plots" / "NOTES.txt").read_text()


def test_metric_families_are_accepted_by_name(dataset, tmp_path):
    from dfl.metrics import expand_metric_names

    assert expand_metric_names(["pesq", "dnsmos"]) == ["pesq", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"]
    assert expand_metric_names(["composite", "csig"]) == ["csig", "cbak", "covl"]
    root, enhanced = dataset
    summary = evaluate(_cfg(tmp_path / "run", f"data_dir={root}", f"enhanced_dir={enhanced}", "metrics=[dnsmos,snr]",
                            "num_workers=0", "max_files=1", "plots.num_spectrograms=0"))
    assert list(summary) == ["dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "snr"]
    assert 1.0 < summary["dnsmos_ovrl"]["enhanced"]["mean"] < 5.0


def test_checkpoint_folder_without_a_checkpoint_is_an_error(tmp_path):
    from dfl.cli.evaluate import resolve_checkpoint

    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"checkpoint=.*/run: a folder without metrics.json's checkpoint"):
        resolve_checkpoint(tmp_path / "run")
    assert resolve_checkpoint(tmp_path / "model.pt") == tmp_path / "model.pt"


def test_checkpoint_route_and_denoise_then_enhanced_dir_route_give_one_answer(tmp_path):
    """16-bit noisy files (as VoiceBank): `dfl-eval checkpoint=` scores what `dfl-denoise` writes (16-bit)."""
    import soundfile as sf
    import torch

    from dfl.checkpoints import save_model
    from dfl.cli.denoise import main as dfl_denoise
    from dfl.models import ContextAggregationNet

    root = tmp_path / "data"
    for i in range(3):
        clean = speech_like(1.5, seed=40 + i)
        write_audio(root / "testset_clean" / f"u{i}.wav", clean, SR, subtype="PCM_16")
        write_audio(root / "testset_noisy" / f"u{i}.wav", noisy_version(clean, 5.0, seed=50 + i), SR,
                    subtype="PCM_16")
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "tiny.pt", "denoiser", ContextAggregationNet(dilations=[1, 2], channels=4))
    metrics = _metrics_arg(FAST_METRICS)
    a = evaluate(_cfg(tmp_path / "a", f"data_dir={root}", f"checkpoint={ckpt}", metrics, "num_workers=0",
                      "plots.num_spectrograms=0"))
    assert dfl_denoise([str(root / "testset_noisy"), "-o", str(tmp_path / "denoised"), "--model", str(ckpt),
                        "--quiet"]) == 0
    b = evaluate(_cfg(tmp_path / "b", f"data_dir={root}", f"enhanced_dir={tmp_path / 'denoised'}", metrics,
                      "num_workers=0", "plots.num_spectrograms=0"))
    assert a == b and isinstance(a["csig"]["enhanced"]["mean"], float)
    assert (tmp_path / "a" / "per_file.csv").read_text() == (tmp_path / "b" / "per_file.csv").read_text()
    for i in range(3):
        mine, theirs = tmp_path / "a" / "enhanced" / f"u{i}.wav", tmp_path / "denoised" / f"u{i}.wav"
        assert sf.info(str(mine)).subtype == "PCM_16"
        assert np.array_equal(sf.read(mine, dtype="int16")[0], sf.read(theirs, dtype="int16")[0])
