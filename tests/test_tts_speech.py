"""The demo's realistic data: eSpeak NG sentences, coloured noise, TTS and café babble, layered noises in the corpus."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader", reason="the TTS speech needs the espeakng-loader package")

from datamodules.synthetic_speech import (  # noqa: E402
    MARKER,
    generate_paired_corpus,
    recording_eq,
    recording_floor,
    synthesize_noise,
    synthesize_utterance,
)
from datamodules.tts_speech import WORDS, random_sentence, tts_plan, tts_utterance  # noqa: E402

SR = 16_000


def _band_fraction(x, lo, hi, sr=SR):
    spec = np.abs(np.fft.rfft(np.asarray(x, np.float64))) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return spec[(f >= lo) & (f < hi)].sum() / spec.sum()


def test_plan_is_exact_by_seed_and_varies_with_it():
    a, b = tts_plan(np.random.default_rng(4), 2.0), tts_plan(np.random.default_rng(4), 2.0)
    assert a == b
    plans = [tts_plan(np.random.default_rng(s), 2.0) for s in range(8)]
    assert len({p["text"] for p in plans}) == 8 and len({p["voice"] for p in plans}) > 3
    for p in plans:
        assert 130 <= p["rate"] <= 210 and 25 <= p["pitch"] <= 75
        # enough words to fill 2 s at the drawn rate (words per minute)
        assert len(p["text"].split()) >= 2.0 * p["rate"] / 60


def test_sentence_uses_the_word_list():
    text = random_sentence(np.random.default_rng(0), 12)
    words = text.rstrip(".?!").replace(",", "").split()
    assert len(words) == 12 and set(words) <= set(WORDS)


def test_utterance_shape_level_and_speech_activity():
    x = tts_utterance(np.random.default_rng(1), SR, 1.7)
    assert x.dtype == np.float32 and x.shape == (int(1.7 * SR),)
    assert np.isfinite(x).all() and np.abs(x).max() <= 0.9 + 1e-6
    rms_db = 10 * np.log10(np.mean(x.astype(np.float64) ** 2))
    assert -30.5 <= rms_db <= -19.5 or np.abs(x).max() >= 0.9 - 1e-6
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    active = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-20) > rms_db - 15
    assert 0.3 < active.mean() < 1.0, "speech with pauses, not silence or a constant tone"


def test_same_seed_gives_near_identical_audio():
    # eSpeak NG keeps some state between calls (and adds breath noise): compare energy envelopes.
    a = tts_utterance(np.random.default_rng(9), SR, 1.5).astype(np.float64)
    b = tts_utterance(np.random.default_rng(9), SR, 1.5).astype(np.float64)
    c = tts_utterance(np.random.default_rng(10), SR, 1.5).astype(np.float64)

    def envelope(x):
        return np.log(np.mean(x[: len(x) // 400 * 400].reshape(-1, 400) ** 2, axis=1) + 1e-10)

    assert np.corrcoef(envelope(a), envelope(b))[0, 1] > 0.9
    assert np.corrcoef(envelope(a), envelope(c))[0, 1] < np.corrcoef(envelope(a), envelope(b))[0, 1]


def test_tts_speech_has_energy_across_the_band():
    """Real speech keeps ~1-3 % of its power above 3 kHz (fricatives, F3-F5); the source-filter
    generator alone has far less, which is what let the demo's models learn a low-pass filter."""
    tts = np.concatenate([tts_utterance(np.random.default_rng(s), SR, 2.0) for s in range(6)])
    old = np.concatenate([synthesize_utterance(np.random.default_rng(s), SR, 2.0) for s in range(6)])
    above_3k = _band_fraction(tts, 3000, 8000)
    assert 0.01 < above_3k < 0.3
    assert above_3k > 2 * _band_fraction(old, 3000, 8000)
    assert _band_fraction(tts, 100, 1500) > 0.4, "most of the power stays in the voiced low band"


def test_coloured_noise_is_deterministic_and_its_spectrum_varies_by_seed():
    a = synthesize_noise("coloured", np.random.default_rng(3), SR)
    np.testing.assert_array_equal(a, synthesize_noise("coloured", np.random.default_rng(3), SR))
    assert a.shape == (SR,) and np.sqrt(np.mean(a.astype(np.float64) ** 2)) == pytest.approx(0.1, rel=1e-3)
    tilts = [
        _band_fraction(synthesize_noise("coloured", np.random.default_rng(s), SR), 3000, 8000) for s in range(6)
    ]
    assert max(tilts) > 3 * min(tilts), "different seeds give differently coloured noises"


def test_tts_babble_is_speech_band_noise():
    x = synthesize_noise("tts_babble", np.random.default_rng(2), SR)
    assert x.shape == (SR,) and np.isfinite(x).all()
    assert _band_fraction(x, 100, 4000) > 0.8


def _frame_db(x, frame=320):
    x = np.asarray(x, np.float64)
    return 10 * np.log10(np.mean(x[: len(x) // frame * frame].reshape(-1, frame) ** 2, axis=1) + 1e-20)


def test_room_reverb_has_its_direct_to_reverberant_ratio_and_decay():
    from datamodules.synthetic_speech import _room_reverb

    impulse = np.zeros(2 * SR)
    impulse[0] = 1.0
    for rt60, drr_db in ((0.3, 6.0), (0.6, -3.0), (1.0, -12.0)):
        y = _room_reverb(np.random.default_rng(0), impulse, SR, rt60, drr_db)
        assert y.shape == impulse.shape and y[0] == 1.0
        assert np.sum(y[1:] ** 2) == pytest.approx(10 ** (-drr_db / 10), rel=1e-9)

        early, late = (10 * np.log10(np.sum(y[int(t * SR) : int((t + 0.05) * SR)] ** 2)) for t in (0.01, 0.01 + rt60 / 2))
        # 60 dB of decay per RT60: half of it between two windows rt60/2 apart
        assert early - late == pytest.approx(30.0, abs=3.0)


def test_cafe_noise_is_distant_reverberant_babble_over_room_tone():
    n = 2 * SR
    cafe = [synthesize_noise("cafe", np.random.default_rng(s), n) for s in range(6)]
    dry = [synthesize_noise("tts_babble", np.random.default_rng(s), n) for s in range(6)]
    for x in cafe:
        assert x.shape == (n,) and x.dtype == np.float32 and np.isfinite(x).all()
        assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) == pytest.approx(0.1, rel=1e-3)
        assert _band_fraction(x, 100, 4000) > 0.85, "talkers: most power in the speech band"
        # many reverberant talkers over room tone: a continuous murmur, no frame 25 dB below the mean level
        assert _frame_db(x).min() > 10 * np.log10(np.mean(x.astype(np.float64) ** 2)) - 25
    # far talkers are dull (first-order low-pass at 2.5-7 kHz): under a third of close babble's power above 5 kHz
    assert np.mean([_band_fraction(x, 5000, 8000) for x in cafe]) < 0.3 * np.mean(
        [_band_fraction(x, 5000, 8000) for x in dry]
    )
    # the same seed gives the same talkers, levels and room (eSpeak NG adds slight noise: compare envelopes)
    again = synthesize_noise("cafe", np.random.default_rng(3), n)
    assert np.corrcoef(_frame_db(cafe[3]), _frame_db(again))[0, 1] > 0.95
    assert np.corrcoef(_frame_db(cafe[3]), _frame_db(cafe[4]))[0, 1] < 0.6


def test_corpus_with_tts_and_noise_layers(tmp_path):
    settings = dict(
        n_train=4, n_val=1, n_test=1, min_seconds=0.6, max_seconds=0.9, snr_range=(0.0, 20.0),
        noise_kinds=["pink", "coloured", "hum"], tts_fraction=1.0, max_noise_layers=2,
    )  # fmt: skip
    root = generate_paired_corpus(tmp_path / "synth", seed=1, **settings)
    rows = list(csv.DictReader((root / "manifest.csv").open()))
    assert len(rows) == 6 and {r["speech"] for r in rows} == {"tts"}
    for r in rows:
        parts = r["noise"].split("+")
        assert 1 <= len(parts) <= 2 and set(parts) <= {"pink", "coloured", "hum"}
        assert 0.0 <= float(r["snr_db"]) <= 20.0
        x, _ = sf.read(root / f"{r['split']}_noisy" / r["name"])
        s, _ = sf.read(root / f"{r['split']}_clean" / r["name"])
        snr = 10 * np.log10(np.sum(s**2) / np.sum((x - s) ** 2))
        assert snr == pytest.approx(float(r["snr_db"]), abs=0.01)
    assert json.loads((root / MARKER).read_text())["settings"]["tts_fraction"] == 1.0
    # Same settings: the cached corpus is reused as is (eSpeak NG output is not regenerated).
    before = (root / "trainset_clean" / rows[0]["name"]).read_bytes()
    generate_paired_corpus(tmp_path / "synth", seed=1, **settings)
    assert (root / "trainset_clean" / rows[0]["name"]).read_bytes() == before


def test_defaults_keep_the_settings_of_older_corpora(tmp_path):
    root = generate_paired_corpus(
        tmp_path / "synth", seed=0, n_train=1, n_val=1, n_test=1, min_seconds=0.5, max_seconds=0.5
    )
    settings = json.loads((root / MARKER).read_text())["settings"]
    assert not {"tts_fraction", "max_noise_layers", "recording_eq", "clean_floor_db"} & set(settings)
    rows = list(csv.DictReader((root / "manifest.csv").open()))
    assert {r["speech"] for r in rows} == {"source_filter"}


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(tts_fraction=1.5), "tts_fraction"),
        (dict(max_noise_layers=0), "max_noise_layers"),
        (dict(recording_eq="yes"), "recording_eq"),
        (dict(noise_kinds=["rain"]), "unknown noise kind"),
        (dict(clean_floor_db=[40, 30]), "clean_floor_db"),
        (dict(clean_floor_db=[-5, 30]), "clean_floor_db"),
        (dict(clean_floor_db=30), "clean_floor_db"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        generate_paired_corpus(tmp_path / "synth", n_train=1, n_val=1, n_test=1, **bad)


def test_recording_eq_boosts_the_lows_and_keeps_level_and_length():
    x = 0.05 * np.random.default_rng(1).standard_normal(2 * SR)
    outs = [recording_eq(np.random.default_rng(seed), x, SR) for seed in range(20)]
    for y in outs:
        assert y.shape == x.shape and np.isfinite(y).all()
        assert np.sqrt(np.mean(y**2)) == pytest.approx(np.sqrt(np.mean(x**2)), rel=1e-9)
        # the low shelf is 0..+12 dB, the high shelf -9..+3 dB: below 100 Hz never loses to 5-8 kHz
        assert _band_fraction(y, 20, 100) / _band_fraction(y, 5000, 8000) >= (
            _band_fraction(x, 20, 100) / _band_fraction(x, 5000, 8000)
        ) * 10 ** (-3 / 10)
    low_gain = [_band_fraction(y, 20, 100) / _band_fraction(x, 20, 100) for y in outs]
    assert max(low_gain) > 3.0 and len({round(g, 6) for g in low_gain}) == len(outs)  # up to +12 dB, varied
    np.testing.assert_array_equal(recording_eq(np.random.default_rng(3), x, SR), recording_eq(np.random.default_rng(3), x, SR))
    loud = recording_eq(np.random.default_rng(0), 0.85 * np.sign(x), SR)
    assert np.max(np.abs(loud)) <= 0.9 + 1e-12  # the peak limit holds even when the colouring raises peaks


def test_recording_eq_colours_the_clean_speech_and_changes_nothing_else(tmp_path):
    settings = dict(n_train=3, n_val=1, n_test=1, min_seconds=0.6, max_seconds=0.9, snr_range=(0.0, 20.0),
                    noise_kinds=["pink", "hum"])  # fmt: skip
    plain = generate_paired_corpus(tmp_path / "plain", seed=2, **settings)
    coloured = generate_paired_corpus(tmp_path / "eq", seed=2, recording_eq=True, **settings)
    assert json.loads((coloured / MARKER).read_text())["settings"]["recording_eq"] is True
    rows_plain = list(csv.DictReader((plain / "manifest.csv").open()))
    rows_eq = list(csv.DictReader((coloured / "manifest.csv").open()))
    assert rows_plain == rows_eq  # same utterances, noises and SNRs
    for r in rows_eq:
        a, _ = sf.read(plain / f"{r['split']}_clean" / r["name"])
        b, _ = sf.read(coloured / f"{r['split']}_clean" / r["name"])
        x, _ = sf.read(coloured / f"{r['split']}_noisy" / r["name"])
        assert a.shape == b.shape and not np.allclose(a, b)
        assert np.sqrt(np.mean(b**2)) == pytest.approx(np.sqrt(np.mean(a**2)), rel=1e-4)
        snr = 10 * np.log10(np.sum(b**2) / np.sum((x - b) ** 2))
        assert snr == pytest.approx(float(r["snr_db"]), abs=0.01)  # mixed at the SNR after colouring


def test_recording_floor_is_a_steady_floor_at_its_level_under_the_speech():
    x = synthesize_utterance(np.random.default_rng(0), SR, 2.0).astype(np.float64)
    x_db = 10 * np.log10(np.mean(x**2))
    levels, slopes = [], []
    for seed in range(12):
        y = recording_floor(np.random.default_rng(seed), x, SR, (25.0, 50.0))
        floor = y - x
        assert y.shape == x.shape and np.isfinite(y).all()
        levels.append(x_db - 10 * np.log10(np.mean(floor**2)))
        assert np.ptp(_frame_db(floor, 1600)) < 6.0, "stationary: 100-ms frames within a few dB"
        slopes.append(_band_fraction(floor, 2000, 8000))
    assert all(25.0 - 1e-9 <= v <= 50.0 + 1e-9 for v in levels) and np.ptp(levels) > 10
    assert max(slopes) > 3 * min(slopes), "white to pinker floors"
    np.testing.assert_array_equal(
        recording_floor(np.random.default_rng(3), x, SR, (30, 40)), recording_floor(np.random.default_rng(3), x, SR, (30, 40))
    )


def test_clean_floor_fills_the_pauses_of_the_clean_speech_and_keeps_the_mix(tmp_path):
    settings = dict(n_train=3, n_val=1, n_test=1, min_seconds=1.0, max_seconds=1.5, snr_range=(0.0, 20.0),
                    noise_kinds=["pink", "hum"])  # fmt: skip
    silent = generate_paired_corpus(tmp_path / "silent", seed=2, **settings)
    floored = generate_paired_corpus(tmp_path / "floor", seed=2, clean_floor_db=[30, 30], **settings)
    assert json.loads((floored / MARKER).read_text())["settings"]["clean_floor_db"] == [30.0, 30.0]
    rows = list(csv.DictReader((floored / "manifest.csv").open()))
    assert rows == list(csv.DictReader((silent / "manifest.csv").open()))  # same utterances, noises and SNRs
    for r in rows:
        a, _ = sf.read(silent / f"{r['split']}_clean" / r["name"])
        b, _ = sf.read(floored / f"{r['split']}_clean" / r["name"])
        x, _ = sf.read(floored / f"{r['split']}_noisy" / r["name"])
        # the floor sits 30 dB under the speech; the silent corpus's pauses are far below that
        floor_db = 10 * np.log10(np.mean((b - a) ** 2)) - 10 * np.log10(np.mean(a**2))
        assert floor_db == pytest.approx(-30.0, abs=0.05)
        assert _frame_db(b).min() > _frame_db(a).min() + 20
        snr = 10 * np.log10(np.sum(b**2) / np.sum((x - b) ** 2))
        assert snr == pytest.approx(float(r["snr_db"]), abs=0.01)  # mixed at the SNR of the floored speech
    # source-filter speech only: the same settings give the same bytes
    again = generate_paired_corpus(tmp_path / "again", seed=2, clean_floor_db=[30, 30], **settings)
    name = rows[0]["name"]
    assert (again / "trainset_clean" / name).read_bytes() == (floored / "trainset_clean" / name).read_bytes()


def test_tts_speech_tags_put_voices_over_the_whole_band():
    from datamodules.synthetic_scenes import synthesize_tagging_chunk

    n = 2 * SR
    for tag in ("c", "m", "f"):
        babble = synthesize_tagging_chunk([tag], np.random.default_rng(4), n)[0]
        spoken = synthesize_tagging_chunk([tag], np.random.default_rng(4), n, tts=True)[0]
        assert spoken.shape == babble.shape == (n,) and np.isfinite(spoken).all()
        # eSpeak's fricatives and bursts reach far above the formant babble's ~3 kHz
        assert _band_fraction(spoken, 4000, 8000) > 3 * _band_fraction(babble, 4000, 8000)
    # the tags keep their voices apart: male sentences are lower than the child-like ones
    low = [_band_fraction(synthesize_tagging_chunk([t], np.random.default_rng(s), n, tts=True)[0], 60, 200)
           for t in ("m", "c") for s in range(3)]  # fmt: skip
    assert min(low[:3]) > max(low[3:])


def test_tts_speech_tags_are_a_setting_of_the_scene_set(tmp_path):
    from datamodules.synthetic_scenes import SyntheticScenesDataModule

    settings = dict(scenes_train_per_class=1, scenes_val_per_class=1, scene_seconds=0.2, chunks_train=3,
                    chunks_val=1, chunk_seconds=0.5, tag_probability=0.9)  # fmt: skip
    plain = SyntheticScenesDataModule(tmp_path / "plain", **settings)
    spoken = SyntheticScenesDataModule(tmp_path / "tts", tts_speech_tags=True, **settings)
    assert "tts_speech_tags" not in plain.generator_settings  # older sets keep their hash
    plain.prepare_data(), spoken.prepare_data()
    chunks = sorted((tmp_path / "plain" / "chime_home" / "chunks").glob("*.wav"))
    assert chunks and [c.name for c in chunks] == sorted(c.name for c in (tmp_path / "tts" / "chime_home" / "chunks").glob("*.wav"))
    for chunk in chunks:  # same labels, different speech
        label = chunk.with_name(chunk.name.replace(".16kHz.wav", ".csv"))
        assert label.read_text() == (tmp_path / "tts" / "chime_home" / "chunks" / label.name).read_text()
    assert json.loads((tmp_path / "tts" / ".complete").read_text())["settings"]["tts_speech_tags"] is True
    with pytest.raises(ValueError, match="data.tts_speech_tags must be true or false, got 'yes'"):
        SyntheticScenesDataModule(tmp_path / "bad", tts_speech_tags="yes", **settings)
