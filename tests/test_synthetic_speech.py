"""The embedded synthetic speech corpus: signals, noises, mixing and the cached paired layout."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from datamodules.synthetic_speech import (
    MARKER,
    NOISE_KINDS,
    SPLITS,
    Talker,
    generate_paired_corpus,
    mix_at_snr,
    synthesize_noise,
    synthesize_utterance,
    write_float_wav,
)

SR = 16_000
SMALL = dict(n_train=3, n_val=2, n_test=2, min_seconds=0.5, max_seconds=0.8)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _band_power(x, lo, hi, sr=SR):
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return spec[(f >= lo) & (f < hi)].mean()


def _frame_db(x, frame=320):
    frames = x[: len(x) // frame * frame].reshape(-1, frame).astype(np.float64)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-20)


# ----------------------------------------------------------------------------- clean speech


def test_utterance_is_deterministic_and_seed_dependent():
    a = synthesize_utterance(_rng(1), SR, 1.0)
    b = synthesize_utterance(_rng(1), SR, 1.0)
    c = synthesize_utterance(_rng(2), SR, 1.0)
    assert a.dtype == np.float32 and a.shape == (SR,)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_utterance_level_is_bounded_and_varies():
    levels = []
    for seed in range(4):
        x = synthesize_utterance(_rng(seed), SR, 1.0)
        assert np.isfinite(x).all()
        assert np.abs(x).max() <= 0.9 + 1e-6
        levels.append(20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2))))
    assert all(-31 < lv < -19 for lv in levels)
    assert max(levels) - min(levels) > 0.5


def test_utterance_voiced_frames_are_periodic_at_the_talkers_pitch():
    talker = Talker(
        f0=120.0, pitch_range=1.0, formant_scale=1.0, open_quotient=0.6, breathiness=0.05, rate=1.0
    )
    x = synthesize_utterance(_rng(3), SR, 1.5, talker=talker).astype(np.float64)
    frame = 640  # 40 ms
    db = _frame_db(x, frame)
    lags_checked = 0
    for i in np.argsort(db)[::-1][:3]:  # the loudest frames are vowels
        seg = x[i * frame : (i + 1) * frame]
        seg = seg - seg.mean()
        ac = np.correlate(seg, seg, "full")[frame - 1 :]
        ac /= ac[0]
        lo, hi = SR // 400, SR // 60  # search 60-400 Hz
        lag = lo + int(np.argmax(ac[lo:hi]))
        assert ac[lag] > 0.5, "voiced frame should be strongly periodic"
        # Pitch within the intonation range around the talker's 120 Hz.
        assert 120 * 2 ** (-9 / 12) < SR / lag < 120 * 2 ** (9 / 12)
        lags_checked += 1
    assert lags_checked == 3
    # White noise of the same length is not periodic: the check can fail.
    noise = _rng(0).standard_normal(frame)
    ac = np.correlate(noise, noise, "full")[frame - 1 :]
    assert (ac[SR // 400 : SR // 60] / ac[0]).max() < 0.3


def test_utterance_has_pauses_and_syllable_modulation():
    x = synthesize_utterance(_rng(5), SR, 2.5)
    db = _frame_db(x)  # 20 ms frames
    quiet = db < db.max() - 40
    assert quiet.mean() > 0.1, "pauses/closures should give low-energy frames"
    assert (~quiet).mean() > 0.3, "most of the utterance should be speech"
    # Envelope modulation: energy in 2-8 Hz of the frame-energy envelope dominates 15-25 Hz.
    env = np.sqrt(10 ** (db / 10))
    env = env - env.mean()
    spec = np.abs(np.fft.rfft(env, 1024)) ** 2
    f = np.fft.rfftfreq(1024, 0.02)
    assert spec[(f >= 2) & (f <= 8)].mean() > 3 * spec[(f >= 15) & (f <= 25)].mean()


def test_utterance_has_unvoiced_high_frequency_energy_and_formant_peaks():
    x = synthesize_utterance(_rng(7), SR, 2.0).astype(np.float64)
    # Fricatives put energy above 4 kHz, but speech power is concentrated below 1.5 kHz.
    assert _band_power(x, 4000, 7800) > 1e-5 * _band_power(x, 100, 1500)
    assert _band_power(x, 100, 1500) > 10 * _band_power(x, 4000, 7800)


@pytest.mark.parametrize("seconds", [0.1, float("nan")])
def test_utterance_rejects_bad_length(seconds):
    with pytest.raises(ValueError, match="seconds"):
        synthesize_utterance(_rng(), SR, seconds)


# ----------------------------------------------------------------------------- noises


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_each_noise_kind_is_finite_non_silent_and_deterministic(kind):
    a = synthesize_noise(kind, _rng(4), SR, SR)
    b = synthesize_noise(kind, _rng(4), SR, SR)
    assert a.shape == (SR,) and a.dtype == np.float32
    assert np.isfinite(a).all()
    assert np.sqrt(np.mean(a.astype(np.float64) ** 2)) == pytest.approx(0.1, rel=1e-3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, synthesize_noise(kind, _rng(5), SR, SR))


def test_coloured_noises_have_their_spectral_slopes():
    white, pink, brown = (
        synthesize_noise(k, _rng(0), 4 * SR, SR).astype(np.float64) for k in ("white", "pink", "brown")
    )
    for lo in (100, 400):  # one octave band vs the one a decade up
        r_white = _band_power(white, lo, 2 * lo) / _band_power(white, 10 * lo, 20 * lo)
        r_pink = _band_power(pink, lo, 2 * lo) / _band_power(pink, 10 * lo, 20 * lo)
        r_brown = _band_power(brown, lo, 2 * lo) / _band_power(brown, 10 * lo, 20 * lo)
        assert 0.7 < r_white < 1.4  # flat
        assert 6 < r_pink < 16  # 1/f: x10 per decade
        assert 60 < r_brown < 160  # 1/f^2: x100 per decade


def test_hum_peaks_at_the_mains_frequency_with_harmonics():
    x = synthesize_noise("hum", _rng(2), 2 * SR, SR).astype(np.float64)
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SR)
    peak = f[np.argmax(spec)]
    assert min(abs(peak - 50), abs(peak - 60)) < 1.0
    # Harmonics: the band around 3x the fundamental stands far above the floor.
    assert _band_power(x, 3 * peak - 2, 3 * peak + 2) > 100 * _band_power(x, 3.5 * peak, 4 * peak - 5)


def test_clicks_are_impulsive_and_bursts_are_non_stationary():
    clicks = synthesize_noise("clicks", _rng(1), SR, SR).astype(np.float64)
    kurtosis = np.mean(clicks**4) / np.mean(clicks**2) ** 2
    assert kurtosis > 20  # Gaussian noise: 3
    bursts = synthesize_noise("bursts", _rng(1), 2 * SR, SR)
    db = _frame_db(bursts)
    assert db.max() - np.percentile(db, 10) > 10
    white_db = _frame_db(synthesize_noise("white", _rng(1), 2 * SR, SR))
    assert white_db.max() - np.percentile(white_db, 10) < 3


def test_babble_is_speech_like_and_denser_than_one_talker():
    babble = synthesize_noise("babble", _rng(3), 2 * SR, SR)
    one = synthesize_utterance(_rng(3), SR, 2.0)
    assert (_frame_db(babble) < _frame_db(babble).max() - 40).mean() < (
        _frame_db(one) < _frame_db(one).max() - 40
    ).mean()
    # Speech-shaped: most power below 1.5 kHz.
    assert _band_power(babble, 100, 1500) > 10 * _band_power(babble, 4000, 7800)


def test_unknown_noise_kind_is_named():
    with pytest.raises(ValueError, match="rain"):
        synthesize_noise("rain", _rng(), 100, SR)


# ----------------------------------------------------------------------------- mixing


@pytest.mark.parametrize("snr", [-5.0, 0.0, 7.3, 20.0])
def test_mix_at_snr_is_exact(snr):
    clean = synthesize_utterance(_rng(0), SR, 0.5).astype(np.float64)
    noise = synthesize_noise("pink", _rng(1), len(clean), SR).astype(np.float64)
    noisy = mix_at_snr(clean, noise, snr)
    residual = noisy - clean
    measured = 10 * np.log10(np.sum(clean**2) / np.sum(residual**2))
    assert measured == pytest.approx(snr, abs=1e-9)
    np.testing.assert_allclose(residual / np.linalg.norm(residual), noise / np.linalg.norm(noise), atol=1e-12)


def test_mix_at_snr_rejects_bad_input():
    x = np.ones(10)
    with pytest.raises(ValueError, match="shape"):
        mix_at_snr(x, np.ones(11), 0.0)
    with pytest.raises(ValueError, match="silent"):
        mix_at_snr(x, np.zeros(10), 0.0)
    with pytest.raises(ValueError, match="snr_db"):
        mix_at_snr(x, x, float("inf"))


# ----------------------------------------------------------------------------- corpus


def _read(path):
    data, sr = sf.read(str(path), dtype="float32")
    return data, sr


def _all_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_float_wav_has_no_timestamped_peak_chunk(tmp_path):
    x = _rng(0).standard_normal(100).astype(np.float32) * 0.1
    write_float_wav(tmp_path / "a.wav", x, SR)
    raw = (tmp_path / "a.wav").read_bytes()
    assert b"PEAK" not in raw
    y, sr = _read(tmp_path / "a.wav")
    assert sr == SR
    np.testing.assert_array_equal(y, x)


def test_corpus_layout_pairing_lengths_and_snr(tmp_path):
    root = generate_paired_corpus(tmp_path / "synth", seed=3, **SMALL)
    assert root == tmp_path / "synth"
    counts = {"trainset": 3, "valset": 2, "testset": 2}
    manifest = {(r["split"], r["name"]): r for r in csv.DictReader((root / "manifest.csv").open())}
    assert len(manifest) == 7
    for split in SPLITS:
        noisy = sorted(p.name for p in (root / f"{split}_noisy").glob("*.wav"))
        clean = sorted(p.name for p in (root / f"{split}_clean").glob("*.wav"))
        assert noisy == clean and len(noisy) == counts[split]
        for name in noisy:
            x, sr_x = _read(root / f"{split}_noisy" / name)
            s, sr_s = _read(root / f"{split}_clean" / name)
            assert sr_x == sr_s == SR
            assert x.shape == s.shape and 0.5 * SR <= len(s) <= 0.8 * SR
            assert np.abs(x).max() <= 0.99 + 1e-6
            row = manifest[(split, name)]
            assert row["noise"] in NOISE_KINDS and int(row["samples"]) == len(s)
            snr = 10 * np.log10(np.sum(s.astype(np.float64) ** 2) / np.sum((x.astype(np.float64) - s) ** 2))
            assert snr == pytest.approx(float(row["snr_db"]), abs=0.01)
            assert -5 <= float(row["snr_db"]) <= 20
    marker = json.loads((root / MARKER).read_text())
    assert marker["settings"]["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "synth"], "no temporary directories left behind"


def test_corpus_is_byte_identical_for_the_same_seed_and_differs_otherwise(tmp_path):
    a = generate_paired_corpus(tmp_path / "a", seed=11, **SMALL)
    b = generate_paired_corpus(tmp_path / "b", seed=11, **SMALL)
    c = generate_paired_corpus(tmp_path / "c", seed=12, **SMALL)
    files = _all_files(a)
    assert files == _all_files(b) == _all_files(c)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    wavs = [rel for rel in files if rel.suffix == ".wav"]
    assert all((a / rel).read_bytes() != (c / rel).read_bytes() for rel in wavs)


def test_splits_are_independent_and_prefix_stable(tmp_path):
    a = generate_paired_corpus(tmp_path / "a", seed=5, **SMALL)
    b = generate_paired_corpus(tmp_path / "b", seed=5, **{**SMALL, "n_train": 1})
    # Utterance 0 of the train split does not depend on how many are generated.
    name = sorted((a / "trainset_clean").glob("*.wav"))[0].name
    assert (a / "trainset_clean" / name).read_bytes() == (b / "trainset_clean" / name).read_bytes()
    for split in ("valset", "testset"):
        for p in (a / f"{split}_noisy").glob("*.wav"):
            assert p.read_bytes() == (b / f"{split}_noisy" / p.name).read_bytes()
    # Different splits hold different audio.
    train0 = _read(sorted((a / "trainset_clean").glob("*.wav"))[0])[0]
    val0 = _read(sorted((a / "valset_clean").glob("*.wav"))[0])[0]
    assert train0.shape != val0.shape or not np.allclose(train0, val0)


def test_matching_marker_reuses_and_changed_settings_regenerate(tmp_path):
    root = tmp_path / "synth"
    generate_paired_corpus(root, seed=1, **SMALL)
    sentinel = root / "trainset_clean" / "sentinel.txt"
    sentinel.write_text("kept while the settings match")
    generate_paired_corpus(root, seed=1, **SMALL)
    assert sentinel.exists(), "a matching corpus is reused, not regenerated"

    generate_paired_corpus(root, seed=1, **{**SMALL, "n_val": 1})
    assert not sentinel.exists(), "changed settings regenerate the corpus"
    assert len(list((root / "valset_noisy").glob("*.wav"))) == 1
    assert json.loads((root / MARKER).read_text())["settings"]["n_val"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.txt").write_text("precious")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        generate_paired_corpus(root, **SMALL)
    assert (root / "thesis.txt").read_text() == "precious"


def test_failed_generation_leaves_no_partial_corpus(tmp_path, monkeypatch):
    import datamodules.synthetic_speech as mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "write_float_wav", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_paired_corpus(tmp_path / "synth", **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, setting",
    [
        ({"n_train": 0}, "n_train"),
        ({"n_val": -1}, "n_val"),
        ({"n_test": 1.5}, "n_test"),
        ({"min_seconds": 2.0, "max_seconds": 1.0}, "min_seconds"),
        ({"min_seconds": 0.0}, "min_seconds"),
        ({"snr_range": (10, 0)}, "snr_range"),
        ({"snr_range": 5}, "snr_range"),
        ({"noise_kinds": ("white", "rain")}, "rain"),
        ({"noise_kinds": ()}, "noise_kinds"),
        ({"sample_rate": 4000}, "sample_rate"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_settings_name_the_setting(tmp_path, override, setting):
    with pytest.raises(ValueError, match=setting):
        generate_paired_corpus(tmp_path / "synth", **{**SMALL, **override})
    assert not (tmp_path / "synth").exists()


def test_time_varying_formant_filter_equals_the_resonator_cascade_when_formants_hold_still():
    from scipy import signal

    from datamodules.synthetic_speech import _time_varying_formants

    x = _rng(0).standard_normal(4000)
    freqs = np.array([500.0, 1500.0, 2500.0, 3500.0, 4500.0])
    bws = np.array([60.0, 90.0, 120.0, 200.0, 300.0])
    y = _time_varying_formants(x, lambda t: np.tile(freqs, (len(t), 1)), bws, SR)
    c = -np.exp(-2 * np.pi * bws / SR)
    b = 2 * np.exp(-np.pi * bws / SR) * np.cos(2 * np.pi * freqs / SR)
    sos = np.stack([1 - b - c, 0 * b, 0 * b, np.ones(5), -b, -c], axis=1)
    ref = signal.sosfilt(sos, x)
    assert np.max(np.abs(y - ref)) < 1e-4 * np.max(np.abs(ref))


def test_noise_kinds_restrict_the_noises_used(tmp_path):
    root = generate_paired_corpus(tmp_path / "synth", seed=2, noise_kinds=["hum"], **SMALL)
    rows = list(csv.DictReader((root / "manifest.csv").open()))
    assert len(rows) == 7 and {r["noise"] for r in rows} == {"hum"}
