"""Formant text-to-speech utterances (eSpeak NG) for the embedded demo's clean speech.

eSpeak NG's formant synthesiser gives what the source-filter generator in
:mod:`datamodules.synthetic_speech` only approximates: real English phoneme
sequences, coarticulated formant movement, fricatives and plosives up to 8 kHz,
and word/phrase prosody. The library and its voice data come from the
``espeakng-loader`` wheel (no system install) and are driven with ctypes.

Each utterance is drawn from its own ``numpy`` generator: a random sentence
from :data:`WORDS`, an English accent, a voice variant (male, female, Klatt
voices), speaking rate, pitch and pitch range. The 22.05 kHz output is
resampled to the requested rate. eSpeak NG is deterministic for a given text
and settings, so the same generator state gives the same samples.
"""

from __future__ import annotations

import ctypes
import threading
from functools import lru_cache

import numpy as np
from scipy import signal

# A few hundred everyday English words (function words weighted by repetition) from which
# sentences are drawn: enough phonetic variety for every English phoneme.
WORDS = tuple(
    """
    the the the a a an and and of of to to in in is is it it that that was he she they we you
    i my your his her their our this these those there here what when where which who why how
    not no yes all some many few more most very just only also then than now still again
    time year day week night morning evening today people man woman child family friend
    house home room door window table chair kitchen garden street road city town village
    country world water fire air earth light sound music voice word story letter book paper
    school class teacher student work office money price market shop bank business company
    car bus train plane ship bicycle station airport bridge river lake sea mountain forest
    field tree flower grass leaf stone sand snow rain wind sun moon star cloud weather
    dog cat horse bird fish cow sheep chicken bread cheese apple orange coffee tea milk
    dinner lunch breakfast food drink glass bottle plate knife spoon box bag shoe shirt
    coat hat hand head face eye ear mouth nose hair arm leg foot heart blood doctor hospital
    say said tell told ask asked speak spoke call called think thought know knew feel felt
    want wanted need needed like liked love loved hope hoped try tried help helped
    go went come came take took make made give gave get got see saw look looked find found
    walk walked run ran drive drove fly flew swim swam sit sat stand stood sleep slept
    eat ate read wrote write play played watch watched listen listened open opened close
    closed start started stop stopped turn turned move moved live lived leave left bring
    brought buy bought sell sold pay paid send sent build built break broke fix fixed
    good bad new old young big small long short high low fast slow early late hot cold warm
    cool dark bright quiet loud soft hard easy difficult happy sad angry tired busy free
    full empty clean dirty strong weak rich poor safe dangerous important possible simple
    beautiful different same other next last first second third best better worse whole
    red blue green yellow white black brown grey purple pink orange silver golden
    one two three four five six seven eight nine ten twenty hundred thousand half dozen
    always never often sometimes usually really probably perhaps certainly quickly slowly
    about above across after against along among around before behind below beside between
    beyond during except inside near outside over through under until without because
    although however therefore while unless whether since though either neither both each
    every please thank sorry hello goodbye question answer problem reason idea plan chance
    change choice decision example fact group number part place point side thing way
    """.split()
)

# Voice variants of eSpeak NG's data ("!v" folder): male, female and Klatt-synthesiser voices.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4",
)  # fmt: skip
ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029")
TTS_SAMPLE_RATE = 22050

# espeak_AUDIO_OUTPUT: synchronous playback to the callback only.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
# espeak_PARAMETER ids.
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_POS_CHARACTER = 1
_CHARS_AUTO = 0
_EVENT_T = ctypes.c_int
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class TTSUnavailableError(RuntimeError):
    """The eSpeak NG library could not be loaded (``espeakng-loader`` missing or broken)."""


class _ESpeak:
    """The process-wide eSpeak NG engine (the C library keeps global state: one voice at a time)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:  # pragma: no cover - the dependency is in pyproject
            raise TTSUnavailableError(
                "the demo's speech synthesis needs the 'espeakng-loader' package (pip install espeakng-loader)"
            ) from exc
        lib_path, data_path = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as exc:
            raise TTSUnavailableError(f"cannot load eSpeak NG from {lib_path}: {exc}") from exc
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if rate != TTS_SAMPLE_RATE:
            raise TTSUnavailableError(
                f"eSpeak NG initialisation failed (returned {rate}) with data at {data_path}"
            )
        self.chunks: list[np.ndarray] = []

        def collect(wav, numsamples, events):
            if wav and numsamples > 0:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
            return 0  # continue synthesis

        self._callback = _SYNTH_CALLBACK(collect)  # keep a reference: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        self.lock = threading.Lock()

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        """Samples of ``text`` spoken with ``voice`` (float64 in [-1, 1) at 22.05 kHz)."""
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"eSpeak NG has no voice {voice!r}")
            for param, value in ((_RATE, rate), (_VOLUME, 100), (_PITCH, pitch), (_RANGE, pitch_range)):
                self.lib.espeak_SetParameter(param, int(value), 0)
            self.chunks = []
            data = text.encode() + b"\0"
            err = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_AUTO, None, None)
            self.lib.espeak_Synchronize()
            if err != 0:
                raise RuntimeError(f"eSpeak NG synthesis failed (error {err}) for {text!r}")
            out = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
            self.chunks = []
        return out.astype(np.float64) / 32768.0


@lru_cache(maxsize=1)
def _engine() -> _ESpeak:
    return _ESpeak()


def tts_available() -> bool:
    """Whether eSpeak NG loads here (``espeakng-loader`` installed and working)."""
    try:
        _engine()
    except TTSUnavailableError:
        return False
    return True


def random_sentence(rng: np.random.Generator, n_words: int) -> str:
    """``n_words`` words of :data:`WORDS`, with a comma or two as phrase breaks and a final mark."""
    words = [WORDS[i] for i in rng.integers(len(WORDS), size=max(1, int(n_words)))]
    for _ in range(int(rng.integers(0, 3))):
        if len(words) > 3:
            k = int(rng.integers(1, len(words) - 1))
            words[k] += ","
    return " ".join(words) + str(rng.choice([".", ".", ".", "?", "!"]))


def tts_plan(
    rng: np.random.Generator, seconds: float, variants: tuple[str, ...] = VARIANTS, pitch: tuple[int, int] = (25, 75)
) -> dict:
    """What :func:`tts_utterance` says and how: text, voice, rate (words per minute), pitch, range.

    The sentence has enough words to fill ``seconds`` at the drawn rate (130-210 wpm); the voice is an
    accent with one of ``variants``, the pitch (eSpeak NG's 0-99 scale) drawn from ``pitch`` (inclusive).
    """
    rate = int(rng.integers(130, 211))
    voice = f"{ACCENTS[int(rng.integers(len(ACCENTS)))]}+{variants[int(rng.integers(len(variants)))]}"
    words = int(np.ceil(seconds * rate / 60 * 1.3)) + 1
    return dict(
        text=random_sentence(rng, words),
        voice=voice,
        rate=rate,
        pitch=int(rng.integers(pitch[0], pitch[1] + 1)),
        pitch_range=int(rng.integers(30, 91)),
    )


def tts_utterance(
    rng: np.random.Generator,
    sample_rate: int = 16_000,
    seconds: float | None = None,
    variants: tuple[str, ...] = VARIANTS,
    pitch: tuple[int, int] = (25, 75),
) -> np.ndarray:
    """One clean TTS utterance, float32 ``[time]`` of exactly ``seconds`` (default: its natural length).

    Args:
        rng: draws the :func:`tts_plan`, the silences, the level and the noise floor.
        sample_rate: output rate in Hz (eSpeak NG's 22.05 kHz is resampled to it).
        seconds: output length; the sentence is cut (with a 20 ms fade) or zero-padded to it.
        variants: the eSpeak NG voice variants drawn from (e.g. only the ``m*`` ones for male voices).
        pitch: the range of eSpeak NG's pitch setting (0-99) drawn from.

    Returns:
        float32 samples; leading/trailing silence trimmed to 50-250 ms each; level set like
        :func:`datamodules.synthetic_speech.synthesize_utterance` (RMS -30 to -20 dBFS, peak at most 0.9).
        The plan is exact by seed; eSpeak NG's samples may differ slightly between calls
        (its breath noise and internal state), so equal seeds give near-identical, not equal, audio.
    """
    from datamodules.synthetic_speech import _set_level

    plan = tts_plan(rng, seconds if seconds is not None else float(rng.uniform(1.0, 3.0)), variants, pitch)
    wav = _engine().synth(**plan)
    # Trim eSpeak's fixed silences, then keep a natural lead-in.
    loud = np.flatnonzero(np.abs(wav) > 10 ** (-50 / 20) * (np.max(np.abs(wav)) + 1e-12))
    if loud.size:
        wav = wav[loud[0] : loud[-1] + 1]
    g = np.gcd(int(sample_rate), TTS_SAMPLE_RATE)
    wav = signal.resample_poly(wav, int(sample_rate) // g, TTS_SAMPLE_RATE // g)
    lead = np.zeros(int(rng.uniform(0.05, 0.25) * sample_rate))
    wav = np.concatenate([lead, wav, np.zeros(int(rng.uniform(0.05, 0.25) * sample_rate))])
    if seconds is not None:
        n = int(round(seconds * sample_rate))
        wav = wav[:n] if len(wav) >= n else np.pad(wav, (0, n - len(wav)))
        fade = min(int(0.02 * sample_rate), n // 4)
        if fade > 0:  # no click where the sentence was cut
            wav[n - fade :] *= np.linspace(1.0, 0.0, fade)
    # A faint floor (75 dB below the speech) so pauses are quiet, not digital zero.
    wav = wav + 10 ** (-75 / 20) * np.sqrt(np.mean(wav**2) + 1e-20) * rng.standard_normal(len(wav))
    return _set_level(wav, rng.uniform(-30.0, -20.0), peak=0.9)
