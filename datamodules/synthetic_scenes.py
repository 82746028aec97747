"""The embedded pretraining default: synthetic acoustic scenes and domestic audio tagging clips.

Pure numpy/scipy signals, seed-deterministic, written once per settings into a cache
directory in the layouts of the real datasets (see :mod:`datamodules.dcase2016`), then
read back through the very same datasets and datamodule:

* scenes: 15 classes (named after the TUT Acoustic Scenes 2016 labels) = 5 spectral
  textures (low rumble, mains-like hum, mid-band noise, high hiss, pink broadband)
  × 3 temporal patterns (stationary, slow swells, random bursts); stereo clips whose
  channels are different realisations; random per-clip jitter of the spectral
  parameters, level, and a faint distractor noise.
* tagging: 4 s chunks (like CHiME-Home) over a low background, with each of the 7 event
  types present independently with probability ``tag_probability``, each over 60-100 % of
  the chunk (so that random training crops rarely miss it): ``c``/``m``/``f``
  voiced babble with child / adult male / adult female pitch ranges, ``v`` beep
  melodies (video game/TV), ``p`` impacts, ``b`` broadband noise, ``o`` frequency sweeps.
  A chunk without events is labelled ``S`` (silence), as in CHiME-Home. With ``tts_speech_tags``
  the ``c``/``m``/``f`` events are eSpeak NG sentences of child-like / male / female voices instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
from scipy import fft as sp_fft
from scipy import signal

from datamodules.dcase2016 import SCENES, TAGS, DCASE2016DataModule
from dfl.audio import write_audio

# Bump when the generated signals change, so cached sets are regenerated.
GENERATOR_VERSION = 3
MARKER = ".complete"
SPECTRA = ("rumble", "hum", "midband", "hiss", "pink")
PATTERNS = ("stationary", "swells", "bursts")
# scene label -> (spectral texture, temporal pattern)
SCENE_RECIPES = {scene: (SPECTRA[i // 3], PATTERNS[i % 3]) for i, scene in enumerate(SCENES)}
PITCH_RANGES = {"c": (290.0, 400.0), "m": (85.0, 135.0), "f": (170.0, 240.0)}
# tts_speech_tags: eSpeak NG voice variants and pitch settings (0-99) for the child / male / female tags
TTS_VOICES = {
    "c": (("f1", "f2", "f3", "f4", "f5"), (85, 99)),
    "m": (("m1", "m2", "m3", "m4", "m5", "m6", "m7"), (15, 50)),
    "f": (("f1", "f2", "f3", "f4", "f5"), (45, 75)),
}


# ------------------------------------------------------------------------------------- signals
def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _shaped_noise(rng: np.random.Generator, n: int, sr: int, magnitude) -> np.ndarray:
    """White noise whose spectrum is multiplied by ``magnitude(freqs)``; unit RMS."""
    m = sp_fft.next_fast_len(n, real=True)  # odd event lengths would make the FFT slow
    spectrum = sp_fft.rfft(rng.standard_normal(m, dtype=np.float32))  # float32: twice as fast
    freqs = sp_fft.rfftfreq(m, 1 / sr).astype(np.float32)
    return _unit_rms(sp_fft.irfft(spectrum * magnitude(np.maximum(freqs, 1.0)), m)[:n])


def _texture(kind: str, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    j = rng.uniform(0.85, 1.18)  # per-clip jitter of the texture's frequencies
    if kind == "rumble":
        fc = 200 * j
        return _shaped_noise(rng, n, sr, lambda f: 1 / np.sqrt(1 + (f / fc) ** 8) / np.sqrt(f))
    if kind == "hum":
        f0 = rng.choice([50.0, 60.0]) * j
        t = np.arange(n) / sr
        tones = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 8))
        return _unit_rms(_unit_rms(tones) + 0.3 * _shaped_noise(rng, n, sr, lambda f: 1 / f))
    if kind == "midband":
        fc = 1000 * j
        return _shaped_noise(rng, n, sr, lambda f: np.exp(-0.5 * (np.log2(f / fc) / 0.35) ** 2))
    if kind == "hiss":
        fc = 3500 * j
        return _shaped_noise(rng, n, sr, lambda f: 1 / np.sqrt(1 + (fc / f) ** 8))
    if kind == "pink":
        return _shaped_noise(rng, n, sr, lambda f: 1 / np.sqrt(f))
    raise ValueError(f"unknown texture {kind!r}")


def _pattern(kind: str, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    if kind == "stationary":
        return np.ones(n)
    if kind == "swells":
        rate = rng.uniform(0.6, 1.5)
        return 0.1 + 0.9 * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))) ** 2
    if kind == "bursts":
        env = np.full(n, 0.03)
        onsets = np.flatnonzero(rng.random(n) < rng.uniform(4, 10) / sr)
        decay = np.exp(-np.arange(int(0.25 * sr)) / (rng.uniform(0.02, 0.06) * sr))
        for start in onsets:
            seg = env[start : start + len(decay)]
            seg += rng.uniform(0.5, 1.0) * decay[: len(seg)]
        return env
    raise ValueError(f"unknown temporal pattern {kind!r}")


def synthesize_scene(scene: str, rng: np.random.Generator, n: int, sr: int = 16_000, channels: int = 2):
    """One scene clip ``[channels, n]`` of class ``scene`` (each channel its own realisation)."""
    spectrum, pattern = SCENE_RECIPES[scene]
    level = 10 ** (rng.uniform(-32, -20) / 20)
    out = []
    for _ in range(channels):
        x = _unit_rms(_texture(spectrum, rng, n, sr) * _pattern(pattern, rng, n, sr))
        x = x + 10 ** (rng.uniform(-30, -18) / 20) * _shaped_noise(rng, n, sr, lambda f: f**-0.5)
        out.append(level * _unit_rms(x))
    return _limit(np.stack(out))


def _babble(rng: np.random.Generator, n: int, sr: int, pitch: tuple[float, float]) -> np.ndarray:
    """Voiced speech-like babble: a pitch-gliding pulse train through formant resonators,
    chopped into 3-6 Hz syllables."""
    t = np.arange(n) / sr
    f0 = rng.uniform(*pitch) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.3, 2) * t + rng.uniform(0, 6)))
    phase = np.cumsum(f0) / sr
    source = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal cycle
    source = signal.lfilter([1.0], [1.0, -0.9], source)  # glottal roll-off
    x = np.zeros(n)
    scale = pitch[0] / 120 if pitch[0] > 150 else 1.0  # shorter vocal tract for higher voices
    for fc, bw in ((rng.uniform(350, 800), 90), (rng.uniform(1000, 2200), 130), (2700, 200)):
        sos = _resonator(fc * min(scale, 1.3), bw, sr)
        x += signal.sosfilt(sos, source)
    syllable = rng.uniform(3, 6)
    env = np.clip(np.sin(2 * np.pi * syllable * t / 2 + rng.uniform(0, 6)) ** 2 * 1.5 - 0.2, 0, 1)
    return _unit_rms(x * env)


def _resonator(fc: float, bw: float, sr: int) -> np.ndarray:
    """One second-order section: a resonance at ``fc`` Hz with bandwidth ``bw`` Hz."""
    r = np.exp(-np.pi * bw / sr)
    return np.array([[1 - r, 0.0, 0.0, 1.0, -2 * r * np.cos(2 * np.pi * fc / sr), r * r]])


def _beeps(rng, n, sr):
    x = np.zeros(n)
    start = 0
    notes = rng.uniform(500, 3000, size=4)
    while start < n:
        length = int(rng.uniform(0.08, 0.25) * sr)
        t = np.arange(min(length, n - start)) / sr
        f = rng.choice(notes)
        x[start : start + len(t)] = np.sin(2 * np.pi * f * t) + 0.3 * np.sin(6 * np.pi * f * t)
        start += len(t) + int(rng.uniform(0.02, 0.15) * sr)
    return _unit_rms(x)


def _impacts(rng, n, sr):
    x = np.zeros(n)
    m = int(0.3 * sr)
    for start in rng.integers(0, max(1, n - m), size=max(1, int(rng.uniform(2, 4) * n / sr))):
        tt = np.arange(m) / sr
        knock = np.exp(-tt / rng.uniform(0.01, 0.04)) * (
            rng.standard_normal(m) * 0.5 + np.sin(2 * np.pi * rng.uniform(100, 400) * tt)
        )
        x[start : start + m] += knock[: n - start]
    return _unit_rms(x)


def _sweeps(rng, n, sr):
    x = np.zeros(n)
    for _ in range(max(1, int(rng.uniform(1, 2) * n / sr))):
        m = min(n, int(rng.uniform(0.3, 0.9) * sr))
        start = int(rng.integers(0, max(1, n - m)))
        f_start, f_end = sorted(rng.uniform(300, 4000, size=2))[:: rng.choice([1, -1])]
        x[start : start + m] += signal.chirp(np.arange(m) / sr, f_start, m / sr, f_end) * np.hanning(m)
    return _unit_rms(x)


def _event(tag: str, rng: np.random.Generator, n: int, sr: int, tts: bool = False) -> np.ndarray:
    if tag in PITCH_RANGES and tts:
        from datamodules.tts_speech import tts_utterance

        variants, pitch = TTS_VOICES[tag]
        return _unit_rms(tts_utterance(rng, sr, n / sr, variants, pitch).astype(np.float64)[:n])
    if tag in PITCH_RANGES:
        return _babble(rng, n, sr, PITCH_RANGES[tag])
    if tag == "v":
        return _beeps(rng, n, sr)
    if tag == "p":
        return _impacts(rng, n, sr)
    if tag == "b":
        return _shaped_noise(rng, n, sr, lambda f: np.ones_like(f))
    if tag == "o":
        return _sweeps(rng, n, sr)
    raise ValueError(f"unknown tag {tag!r}")


def synthesize_tagging_chunk(tags: list[str], rng: np.random.Generator, n: int, sr: int = 16_000, tts: bool = False):
    """One mono chunk ``[1, n]``: a low background plus each event of ``tags`` in a random span; with
    ``tts`` the speech tags (``c``, ``m``, ``f``) are eSpeak NG sentences, speech over the whole band."""
    x = 0.1 * _shaped_noise(rng, n, sr, lambda f: 1 / f)
    for tag in tags:
        length = int(rng.uniform(0.6, 1.0) * n)  # most of the chunk: random crops rarely miss it
        start = int(rng.integers(0, n - length + 1))
        fade = np.ones(length)
        ramp = min(length // 4, int(0.02 * sr))
        fade[:ramp], fade[length - ramp :] = np.linspace(0, 1, ramp), np.linspace(1, 0, ramp)
        x[start : start + length] += 10 ** (rng.uniform(-4, 4) / 20) * _event(tag, rng, length, sr, tts) * fade
    return _limit(10 ** (rng.uniform(-30, -20) / 20) * _unit_rms(x)[None])


def _limit(x: np.ndarray, peak: float = 0.95) -> np.ndarray:
    top = np.abs(x).max()
    return (x * (peak / top) if top > peak else x).astype(np.float32)


# ----------------------------------------------------------------------------------- the cache
def _rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _write_set(root: Path, s: dict) -> None:
    sr, seed = s["sample_rate"], s["seed"]
    for split, key, per_class in (("development", 0, s["scenes_train_per_class"]), ("evaluation", 1, s["scenes_val_per_class"])):  # fmt: skip
        directory = root / f"TUT-acoustic-scenes-2016-{split}"
        lines = []
        for c, scene in enumerate(SCENES):
            for i in range(per_class):
                rel = f"audio/{split[:3]}_{c:02d}_{i:03d}.wav"
                wav = synthesize_scene(scene, _rng(seed, 0, key, c, i), int(s["scene_seconds"] * sr), sr)
                write_audio(directory / rel, wav, sr)
                lines.append(f"{rel}\t{scene}\n")
        (directory / "meta.txt").write_text("".join(lines))
    chime = root / "chime_home"
    for split, key, count in (("development", 0, s["chunks_train"]), ("evaluation", 1, s["chunks_val"])):
        rows = []
        for i in range(count):
            rng = _rng(seed, 1, key, i)
            tags = [t for t in TAGS if rng.random() < s["tag_probability"]]
            chunk = f"synthetic_{split[:3]}_chunk{i}"
            wav = synthesize_tagging_chunk(tags, rng, int(s["chunk_seconds"] * sr), sr, s.get("tts_speech_tags", False))
            write_audio(chime / "chunks" / f"{chunk}.16kHz.wav", wav, sr)
            vote = "".join(tags) or "S"
            (chime / "chunks" / f"{chunk}.csv").write_text(
                f"segmentname,{chunk}\nchunkname,{chunk}\nannotator_a,{vote}\nmajorityvote,{vote}\n"
            )
            rows.append(f"{i},{chunk}\n")
        (chime / f"{split}_chunks_refined.csv").write_text("".join(rows))


def generate_synthetic_dcase(root: str | os.PathLike, **settings) -> Path:
    """Write (or reuse) the synthetic scene + tagging set at ``root``; returns ``root``.

    A ``.complete`` marker records a hash of the settings: a matching set is reused;
    otherwise the set is written to a temporary sibling and renamed into place, so
    ``root`` never holds half a set. A non-empty ``root`` without the marker is refused.
    """
    settings = {"version": GENERATOR_VERSION, **settings}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    root = Path(root)
    if _marker_hash(root) == digest:
        return root
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / MARKER).exists())):
        raise ValueError(
            f"{root}: exists and is not a synthetic scene set (no {MARKER}); refusing to overwrite it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-", dir=root.parent))
    try:
        _write_set(tmp, settings)
        (tmp / MARKER).write_text(
            json.dumps({"hash": digest, "settings": settings}, sort_keys=True, indent=1)
        )
        old = root.with_name(f"{root.name}.old-{uuid.uuid4().hex[:8]}") if root.exists() else None
        if old is not None:
            os.rename(root, old)
        try:
            os.rename(tmp, root)
        except OSError:
            if _marker_hash(root) != digest:  # not another process that finished first
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _marker_hash(root: Path) -> str | None:
    try:
        return json.loads((root / MARKER).read_text())["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------- datamodule
class SyntheticScenesDataModule(DCASE2016DataModule):
    """Generates the synthetic set under ``root`` (once per settings, from ``generator_seed``)
    and then behaves exactly like :class:`DCASE2016DataModule` on it.

    Args:
        root: where the set is written (and read from).
        generator_seed: the set (same seed and settings: same files, not regenerated).
        scenes_train_per_class: training clips per scene class.
        scenes_val_per_class: validation clips per scene class.
        scene_seconds: length of a scene clip.
        chunks_train: training tagging chunks.
        chunks_val: validation tagging chunks.
        chunk_seconds: length of a tagging chunk.
        tag_probability: the chance that each tag is present in a chunk, in (0, 1).
        tts_speech_tags: the child / male / female speech events are eSpeak NG sentences (speech over
            the whole band) instead of formant babble below ~3 kHz.
        **datamodule_kwargs: the loading settings of :class:`DCASE2016DataModule`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        generator_seed: int = 0,
        scenes_train_per_class: int = 16,
        scenes_val_per_class: int = 4,
        scene_seconds: float = 5.0,
        chunks_train: int = 400,
        chunks_val: int = 200,
        chunk_seconds: float = 4.0,
        tag_probability: float = 0.25,
        tts_speech_tags: bool = False,
        **datamodule_kwargs,
    ) -> None:
        super().__init__(root=root, **datamodule_kwargs)
        for name, value in (("scenes_train_per_class", scenes_train_per_class), ("scenes_val_per_class", scenes_val_per_class), ("chunks_train", chunks_train), ("chunks_val", chunks_val)):  # fmt: skip
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if not 0 < tag_probability < 1:
            raise ValueError(f"data.tag_probability must be in (0, 1), got {tag_probability}")
        if not isinstance(tts_speech_tags, (bool, np.bool_)):
            raise ValueError(f"data.tts_speech_tags must be true or false, got {tts_speech_tags!r}")
        self.generator_settings = dict(
            seed=generator_seed,
            scenes_train_per_class=scenes_train_per_class,
            scenes_val_per_class=scenes_val_per_class,
            scene_seconds=float(scene_seconds),
            chunks_train=chunks_train,
            chunks_val=chunks_val,
            chunk_seconds=float(chunk_seconds),
            tag_probability=float(tag_probability),
            sample_rate=self.sample_rate,
        )
        if tts_speech_tags:  # absent when off: older sets keep their hash
            self.generator_settings["tts_speech_tags"] = True

    def prepare_data(self) -> None:
        generate_synthetic_dcase(self.root, **self.generator_settings)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # a no-op when the cache is up to date; lets setup() be used alone
        super().setup(stage)
