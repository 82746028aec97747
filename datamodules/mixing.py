"""On-the-fly mixing: clean speech + noise at random SNRs, gains, crops and optional reverberation.

Every mixture is a pure function of ``(seed, epoch, index)``: the
:class:`~datamodules.paired_folder.EpochSampler` encodes the epoch into the index, so mixtures
are reproducible in worker processes and after a resume, differ from epoch to epoch, and DDP
ranks (which Lightning gives disjoint index sets) see disjoint mixtures. File lists come from
cached manifests (:mod:`datamodules.manifest`), so directories of any size start quickly, and
only the needed segment of a long noise file is read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import oaconvolve
from torch.utils.data import Dataset

from datamodules.manifest import AudioEntry, DataError, require_usable, scan_audio_dir
from datamodules.paired_folder import SPLITS, PairedAudioDataset, SplitDataModule, _polarity_flag, gained_pair
from dfl.audio import AudioError, load_mono

log = logging.getLogger(__name__)

_POWER_FLOOR = 1e-10  # silent segments: avoid dividing by zero, leave them (almost) silent


def read_segment(entry: AudioEntry, start: int, frames: int, sample_rate: int) -> np.ndarray:
    """Mono float32 samples ``[start, start + frames)`` of a file, at ``sample_rate``.

    Files already at ``sample_rate`` are read partially (long noise recordings); others are
    loaded whole and resampled. NaN/Inf samples raise :class:`AudioError` naming the file.
    """
    if entry.sample_rate != sample_rate:
        return load_mono(entry.path, sample_rate)[start : start + frames]
    try:
        data = sf.read(str(entry.path), start=start, frames=frames, dtype="float32", always_2d=True)[0]
    except Exception as exc:
        raise AudioError(f"{entry.path}: cannot read audio ({exc})") from exc
    if not np.isfinite(data).all():
        raise AudioError(f"{entry.path}: audio contains NaN or Inf samples")
    return np.ascontiguousarray(data.mean(axis=1), dtype=np.float32)


def _power(x: np.ndarray) -> float:
    return max(float(np.mean(np.square(x, dtype=np.float64))), _POWER_FLOOR)


class MixtureDataset(Dataset):
    """``n_items`` mixtures per epoch of ``clean`` files with ``noise`` files (and ``rirs``).

    Item ``i`` of an epoch uses clean file ``i mod n_clean`` (in an order fixed by ``seed``), so an
    epoch of ``n_clean`` items visits every clean file once; noise file, noise offset, crop, SNR
    (uniform in ``snr_range`` dB), gain (uniform in ``gain_db_range`` dB, applied to noisy and
    clean alike), polarity (inverted with probability 1/2 if ``random_polarity``) and reverberation
    (with probability ``rir_prob``) are drawn from
    ``default_rng([seed, epoch, i])``, always in the same order, so changing one option does
    not change the other draws. ``fixed=True`` ignores the epoch: a fixed validation/test set.

    The SNR is that of the speech as it appears in the mixture (reverberant when reverberated)
    to the noise, over the whole item. The clean target is the reverberant speech (denoising
    only) unless ``dereverberate``, when it is the dry speech.
    """

    def __init__(
        self,
        clean: Sequence[AudioEntry],
        noise: Sequence[AudioEntry],
        rirs: Sequence[AudioEntry] = (),
        *,
        n_items: int | None = None,
        sample_rate: int = 16_000,
        crop_samples: int | None = None,
        snr_range: Sequence[float] = (-5.0, 20.0),
        gain_db_range: Sequence[float] = (-6.0, 6.0),
        rir_prob: float = 0.0,
        dereverberate: bool = False,
        random_polarity: bool = False,
        seed: int = 0,
        fixed: bool = False,
    ) -> None:
        if not clean or not noise:
            raise ValueError("MixtureDataset needs at least one clean and one noise file")
        if rir_prob > 0 and not rirs:
            raise ValueError("rir_prob > 0 needs impulse responses (data.rir_dir)")
        self.clean, self.noise, self.rirs = list(clean), list(noise), list(rirs)
        self.n_items = n_items or len(self.clean)
        self.sample_rate = sample_rate
        self.crop_samples = crop_samples
        self.snr_range = tuple(float(v) for v in snr_range)
        self.gain_db_range = tuple(float(v) for v in gain_db_range)
        self.rir_prob = rir_prob
        self.dereverberate = dereverberate
        self.random_polarity = random_polarity
        self.seed = seed
        self.fixed = fixed
        self.clean_order = np.random.default_rng([seed, 0x5EED]).permutation(len(self.clean))
        # lengths known from the headers: what length bucketing sorts by
        self.lengths = [self._clean_entry(i).frames_at(sample_rate) for i in range(self.n_items)]
        if crop_samples:
            self.lengths = [min(n, crop_samples) for n in self.lengths]

    def __len__(self) -> int:
        return self.n_items

    def _clean_entry(self, index: int) -> AudioEntry:
        return self.clean[self.clean_order[index % len(self.clean)]]

    def __getitem__(self, raw_index: int) -> dict:
        epoch, index = divmod(int(raw_index), self.n_items)
        if self.fixed:
            epoch = 0
        rng = np.random.default_rng([self.seed, epoch, index])
        # every draw, always, in this order (see the class docstring)
        noise_entry = self.noise[int(rng.integers(len(self.noise)))]
        snr_db = float(rng.uniform(*self.snr_range))
        gain_db = float(rng.uniform(*self.gain_db_range))
        reverberate = bool(rng.random() < self.rir_prob)
        rir_entry = self.rirs[int(rng.integers(len(self.rirs)))] if self.rirs else None
        crop_at, noise_at = rng.random(), rng.random()
        invert = bool(rng.random() < 0.5)

        clean_entry = self._clean_entry(index)
        dry = self._clean_segment(clean_entry, crop_at)
        speech = self._reverberate(dry, rir_entry) if reverberate else dry
        noise = self._noise_segment(noise_entry, len(dry), noise_at)
        noise *= np.sqrt(_power(speech) / (_power(noise) * 10 ** (snr_db / 10)))
        noisy = speech + noise
        target = dry if self.dereverberate else speech

        noisy, target = gained_pair(noisy, target, gain_db)
        if self.random_polarity and invert:
            noisy, target = -noisy, -target
        return {
            "noisy": torch.from_numpy(noisy),
            "clean": torch.from_numpy(target),
            "length": len(dry),
            "name": f"{index:06d}_{Path(clean_entry.relpath).stem}",
            "snr_db": snr_db,
            "reverberant": reverberate,
        }

    def _clean_segment(self, entry: AudioEntry, crop_at: float) -> np.ndarray:
        total = entry.frames_at(self.sample_rate)
        n = min(total, self.crop_samples or total)
        start = int(crop_at * (total - n + 1))
        return read_segment(entry, start, n, self.sample_rate).astype(np.float64)

    def _noise_segment(self, entry: AudioEntry, n: int, noise_at: float) -> np.ndarray:
        total = entry.frames_at(self.sample_rate)
        if total >= n:
            return read_segment(entry, int(noise_at * (total - n + 1)), n, self.sample_rate).astype(np.float64)
        # a noise shorter than the speech: loop it from a random offset
        whole = read_segment(entry, 0, total, self.sample_rate).astype(np.float64)
        return np.resize(np.roll(whole, -int(noise_at * total)), n)

    def _reverberate(self, dry: np.ndarray, entry: AudioEntry) -> np.ndarray:
        rir = load_mono(entry.path, self.sample_rate).astype(np.float64)
        # align on the direct path at unit gain, so reverberant speech = dry speech + reflections
        peak = int(np.argmax(np.abs(rir)))
        if rir[peak] == 0:
            raise AudioError(f"{entry.path}: impulse response is silent")
        rir = rir[peak:] / rir[peak]
        return oaconvolve(dry, rir)[: len(dry)]


class MixingDataModule(SplitDataModule):
    """Training mixtures made on the fly from ``clean_dir`` × ``noise_dir`` (recursive, wav/flac).

    Training: ``epoch_size`` mixtures per epoch (default: one per clean file), crops of
    ``crop_seconds`` (``null`` = whole utterances), ``batch_size`` per batch, optionally
    length-bucketed (``bucket``). Validation/test: whole-utterance paired folders from
    ``val_root`` (``valset_*``/``testset_*``) when given, otherwise fixed sets of ``n_val`` /
    ``n_test`` mixtures drawn with ``val_seed`` / ``test_seed`` from ``val_clean_dir`` /
    ``val_noise_dir`` (default: the training directories — then the numbers are optimistic,
    which is logged).

    Args:
        clean_dir: clean speech, searched recursively for wav/flac.
        noise_dir: noise recordings, searched recursively.
        rir_dir: impulse responses to convolve the speech with; ``None``: no reverberation.
        rir_prob: the probability that a mixture is reverberated.
        dereverberate: the target is the dry speech (``True``) or the reverberant speech (``False``).
        snr_range: ``[low, high]`` mixing SNR in dB, drawn uniformly.
        gain_db_range: ``[low, high]`` gain in dB applied to noisy and clean alike (rescaled if it would clip).
        crop_seconds: training crop length; ``None``: whole utterances.
        epoch_size: mixtures per epoch; ``None``: one per clean file.
        batch_size: training mixtures per batch.
        bucket: batch whole utterances of similar length (needs ``crop_seconds=None``).
        bucket_window: how many batches' worth of utterances are sorted by length together.
        val_root: a paired folder (``valset_*``/``testset_*``) for validation and test.
        val_clean_dir: clean speech of the drawn validation/test mixtures; ``None``: ``clean_dir``.
        val_noise_dir: noise of the drawn validation/test mixtures; ``None``: ``noise_dir``.
        n_val: drawn validation mixtures.
        n_test: drawn test mixtures.
        val_seed: the drawn validation mixtures.
        test_seed: the drawn test mixtures.
        num_workers: DataLoader worker processes.
        sample_rate: the rate the audio is read and mixed at.
        seed: the training mixtures, deterministic per ``(seed, epoch, index)``.
        pin_memory: pin batches in page-locked memory.
        manifest_dir: where the file lists with their lengths are cached; ``None``: not cached.
        pad_to_multiple: zero-pad training batches to a multiple of this many samples.
        random_polarity: invert half of the training mixtures (noisy and clean alike), drawn per item.
    """

    def __init__(
        self,
        clean_dir: str | Path,
        noise_dir: str | Path,
        rir_dir: str | Path | None = None,
        rir_prob: float = 0.0,
        dereverberate: bool = False,
        snr_range: Sequence[float] = (-5.0, 20.0),
        gain_db_range: Sequence[float] = (-6.0, 6.0),
        crop_seconds: float | None = 2.0,
        epoch_size: int | None = None,
        batch_size: int = 1,
        bucket: bool = False,
        bucket_window: int = 50,
        val_root: str | Path | None = None,
        val_clean_dir: str | Path | None = None,
        val_noise_dir: str | Path | None = None,
        n_val: int = 32,
        n_test: int = 32,
        val_seed: int = 1,
        test_seed: int = 2,
        num_workers: int = 0,
        sample_rate: int = 16_000,
        seed: int = 0,
        pin_memory: bool = False,
        manifest_dir: str | Path | None = None,
        pad_to_multiple: int = 1,
        random_polarity: bool = False,
    ) -> None:
        super().__init__()
        if pad_to_multiple < 1:
            raise ValueError(f"data.pad_to_multiple must be >= 1, got {pad_to_multiple}")
        for name, (lo, hi) in (("snr_range", snr_range), ("gain_db_range", gain_db_range)):
            if not lo <= hi:
                raise ValueError(f"data.{name} must be [low, high] with low <= high, got {list((lo, hi))}")
        if not 0.0 <= rir_prob <= 1.0:
            raise ValueError(f"data.rir_prob must be in [0, 1], got {rir_prob}")
        if rir_prob > 0 and not rir_dir:
            raise ValueError(f"data.rir_prob={rir_prob} needs data.rir_dir (a directory of impulse responses)")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if bucket and crop_seconds:
            raise ValueError("data.bucket=true batches whole utterances by length; set data.crop_seconds=null")
        for name, n in (("epoch_size", epoch_size), ("n_val", n_val), ("n_test", n_test)):
            if n is not None and n < 1:
                raise ValueError(f"data.{name} must be >= 1, got {n}")
        self.dirs = {"clean_dir": clean_dir, "noise_dir": noise_dir, "rir_dir": rir_dir,
                     "val_clean_dir": val_clean_dir or clean_dir, "val_noise_dir": val_noise_dir or noise_dir}
        self.val_root = Path(val_root).expanduser() if val_root else None
        self.mix_options = dict(
            sample_rate=sample_rate, snr_range=tuple(snr_range), gain_db_range=tuple(gain_db_range),
            rir_prob=rir_prob, dereverberate=dereverberate,
        )
        self.crop_samples = int(round(crop_seconds * sample_rate)) if crop_seconds else None
        self.random_polarity = _polarity_flag(random_polarity)
        self.epoch_size = epoch_size
        self.batch_size, self.bucket, self.bucket_window = batch_size, bucket, bucket_window
        self.n_eval = {"val": n_val, "test": n_test}
        self.eval_seeds = {"val": val_seed, "test": test_seed}
        self.num_workers, self.sample_rate, self.seed, self.pin_memory = num_workers, sample_rate, seed, pin_memory
        self.manifest_dir = manifest_dir
        self.pad_to_multiple = pad_to_multiple
        self.datasets: dict[str, Dataset] = {}
        self._files: dict[str, list[AudioEntry]] = {}

    def files(self, setting: str) -> list[AudioEntry]:
        """The usable audio files of ``data.<setting>``, from its (cached) manifest."""
        if setting not in self._files:
            directory = self.dirs[setting]
            if not directory:
                return []
            directory = Path(directory).expanduser()
            if not directory.is_dir():
                raise DataError(f"data.{setting}={directory}: directory not found")
            entries = scan_audio_dir(directory, recursive=True, cache_dir=self.manifest_dir)
            if not entries:
                raise DataError(f"data.{setting}={directory}: no .wav/.flac files (searched recursively)")
            self._files[setting] = [require_usable(e) for e in entries]
        return self._files[setting]

    def dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            self.datasets[split] = self._build(split)
        return self.datasets[split]

    def _build(self, split: str) -> Dataset:
        rirs = self.files("rir_dir") if self.mix_options["rir_prob"] > 0 else []
        if split == "train":
            return MixtureDataset(
                self.files("clean_dir"), self.files("noise_dir"), rirs, n_items=self.epoch_size,
                crop_samples=self.crop_samples, seed=self.seed, random_polarity=self.random_polarity,
                **self.mix_options,
            )
        if self.val_root:
            prefix = SPLITS[split]
            return PairedAudioDataset(
                self.val_root / f"{prefix}_noisy", self.val_root / f"{prefix}_clean",
                sample_rate=self.sample_rate, manifest_dir=self.manifest_dir,
            )
        if self.dirs["val_clean_dir"] == self.dirs["clean_dir"] or self.dirs["val_noise_dir"] == self.dirs["noise_dir"]:
            log.warning(
                "data=mix: %s mixtures reuse the training clean/noise files; give data.val_clean_dir and "
                "data.val_noise_dir (or data.val_root) for held-out numbers", split,
            )
        return MixtureDataset(
            self.files("val_clean_dir"), self.files("val_noise_dir"), rirs, n_items=self.n_eval[split],
            crop_samples=None, seed=self.eval_seeds[split], fixed=True, **self.mix_options,
        )
