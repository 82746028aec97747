"""Paired noisy/clean wav folders: ``root/{train,val,test}set_{noisy,clean}/*.wav``.

The layout of the authors' release and of VoiceBank-DEMAND (after ``dfl-prepare voicebank``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.bucketing import BucketBatchSampler
from datamodules.manifest import AudioEntry, DataError, require_usable, scan_audio_dir
from datamodules.resume import ResumableDataLoader, interrupted_epoch_position
from dfl.audio import AudioError, load_mono

log = logging.getLogger(__name__)

SPLITS = {"train": "trainset", "val": "valset", "test": "testset"}


def scan_pairs(
    noisy_dir: Path, clean_dir: Path, manifest_dir: str | Path | None = None
) -> list[tuple[Path, Path, int]]:
    """Validate a split's pairs from the file headers; returns ``(noisy, clean, frames)`` per pair.

    Headers come from cached manifests (:mod:`datamodules.manifest`) when ``manifest_dir`` is given.
    """
    return [(noisy_dir / n.relpath, clean_dir / c.relpath, n.frames) for n, c in scan_pair_entries(
        noisy_dir, clean_dir, manifest_dir
    )]


def scan_pair_entries(
    noisy_dir: Path, clean_dir: Path, manifest_dir: str | Path | None = None
) -> list[tuple[AudioEntry, AudioEntry]]:
    """:func:`scan_pairs` with the manifest entries (sample rates, channels) of both files."""
    for d in (noisy_dir, clean_dir):
        if not d.is_dir():
            raise DataError(f"{d}: directory not found")
    noisy = {e.relpath: e for e in scan_audio_dir(noisy_dir, cache_dir=manifest_dir)}
    clean = {e.relpath: e for e in scan_audio_dir(clean_dir, cache_dir=manifest_dir)}
    if not noisy:
        raise DataError(f"{noisy_dir}: empty split (no .wav/.flac files)")
    missing = sorted(set(noisy) - set(clean))
    if missing:
        raise DataError(
            f"{noisy_dir / missing[0]}: noisy file without its clean pair in {clean_dir}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    pairs = []
    for name, nentry in noisy.items():
        centry = clean[name]
        for entry in (nentry, centry):
            require_usable(entry)
        if (nentry.frames, nentry.sample_rate) != (centry.frames, centry.sample_rate):
            raise DataError(
                f"{noisy_dir / name}: {nentry.frames} samples at {nentry.sample_rate} Hz but its clean pair "
                f"{clean_dir / name} has "
                f"{centry.frames} samples at {centry.sample_rate} Hz; pairs must have the same length"
            )
        pairs.append((nentry, centry))
    return pairs


PEAK_LIMIT = 0.99  # a training gain never takes noisy or clean over this peak


def gained_pair(noisy: np.ndarray, clean: np.ndarray, gain_db: float) -> tuple[np.ndarray, np.ndarray]:
    """``noisy`` and ``clean`` scaled alike by ``gain_db`` dB, less where a peak would pass :data:`PEAK_LIMIT`."""
    scale = 10 ** (gain_db / 20)
    peak = scale * max(float(np.abs(noisy).max(initial=0.0)), float(np.abs(clean).max(initial=0.0)))
    if peak > PEAK_LIMIT:
        scale *= PEAK_LIMIT / peak
    return (noisy * scale).astype(np.float32), (clean * scale).astype(np.float32)


class PairedAudioDataset(Dataset):
    """Noisy/clean pairs as 16 kHz mono float32 tensors; optional random fixed-length crops, gains and polarity.

    Crops, gains and polarity are drawn per ``(seed, epoch, index)``, each from its own stream.
    """

    def __init__(
        self,
        noisy_dir: str | Path,
        clean_dir: str | Path,
        *,
        sample_rate: int = 16_000,
        crop_samples: int | None = None,
        seed: int = 0,
        manifest_dir: str | Path | None = None,
        gain_db_range: tuple[float, float] | None = None,
        random_polarity: bool = False,
    ) -> None:
        self.entries = scan_pair_entries(Path(noisy_dir), Path(clean_dir), manifest_dir)
        # utterance lengths at `sample_rate`, known from the headers: what length bucketing sorts by
        self.lengths = [n.frames_at(sample_rate) for n, _ in self.entries]
        self.sample_rate = sample_rate
        self.crop_samples = crop_samples
        self.seed = seed
        self.gain_db_range = gain_db_range
        self.random_polarity = random_polarity

    @property
    def pairs(self) -> list[tuple[Path, Path, int]]:
        """``(noisy, clean, frames)`` per pair (paths built on demand: cheap start-up on 100k files)."""
        return [(n.path, c.path, n.frames) for n, c in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        # EpochSampler encodes the epoch into the index so crops stay deterministic per
        # (seed, epoch, index) even inside persistent worker processes.
        epoch, index = divmod(int(index), len(self.entries))
        nentry, centry = self.entries[index]
        npath, cpath = nentry.path, centry.path
        noisy, clean = load_mono(npath, self.sample_rate), load_mono(cpath, self.sample_rate)
        if noisy.shape != clean.shape:  # both resampled from equal lengths; guard anyway
            raise AudioError(f"{npath}: length differs from {cpath} after resampling")
        # the true length, before a crop pads a short utterance: the padding is masked like any other
        length = min(len(noisy), self.crop_samples or len(noisy))
        if self.crop_samples:
            noisy, clean = self._crop(noisy, clean, index, epoch)
        if self.gain_db_range is not None:
            noisy, clean = self._gain(noisy, clean, index, epoch)
        if self.random_polarity and np.random.default_rng([self.seed, epoch, index, 2]).random() < 0.5:
            noisy, clean = -noisy, -clean
        return {
            "noisy": torch.from_numpy(noisy),
            "clean": torch.from_numpy(clean),
            "length": length,
            "name": str(nentry.relpath),  # unique within the split: validation results are gathered by it
        }

    def _crop(self, noisy: np.ndarray, clean: np.ndarray, index: int, epoch: int):
        n = self.crop_samples
        if len(noisy) <= n:
            pad = n - len(noisy)
            return np.pad(noisy, (0, pad)), np.pad(clean, (0, pad))
        # Deterministic per (seed, epoch, index): reproducible and resumable.
        rng = np.random.default_rng([self.seed, epoch, index])
        start = int(rng.integers(0, len(noisy) - n + 1))
        return noisy[start : start + n], clean[start : start + n]

    def _gain(self, noisy: np.ndarray, clean: np.ndarray, index: int, epoch: int):
        # its own stream (not the crop's): adding it leaves every crop where it was
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        return gained_pair(noisy, clean, rng.uniform(*self.gain_db_range))


class EpochSampler(Sampler[int]):
    """Seeded shuffling per epoch (Lightning calls ``set_epoch``); yields ``epoch * n + index``."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.arange(self.n)
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter((self.epoch * self.n + order).tolist())


def collate_pairs(items: list[dict], pad_to_multiple: int = 1) -> dict:
    """Stack (zero-padding to the longest, rounded up to ``pad_to_multiple`` samples) and keep the true lengths."""
    longest = max(it["noisy"].shape[-1] for it in items)
    longest = -(-longest // pad_to_multiple) * pad_to_multiple

    def stack(key):
        return torch.stack([torch.nn.functional.pad(it[key], (0, longest - it[key].shape[-1])) for it in items])

    return {
        "noisy": stack("noisy"),
        "clean": stack("clean"),
        "lengths": torch.tensor([it["length"] for it in items]),
        "padded": any(it["length"] < longest for it in items),  # known here without a GPU sync
        "names": [it["name"] for it in items],
    }


def next_train_epoch(trainer) -> int:
    """The epoch the next training iteration belongs to: the value Lightning passes to ``set_epoch``.

    Not ``trainer.current_epoch``: resuming from an end-of-epoch checkpoint (``last.ckpt``), the fit
    loop builds the train loader and its first iterator while ``current_epoch`` still names the
    finished epoch (it catches up only in the loop's ``on_run_start``). With worker processes that
    first iterator already draws ``prefetch_factor * num_workers`` indices from the sampler, so the
    stale epoch would replay the previous epoch's order.
    """
    if trainer is None:
        return 0
    fit_loop = getattr(trainer, "fit_loop", None)
    progress = getattr(getattr(fit_loop, "epoch_progress", None), "current", None)
    return int(progress.processed) if progress is not None else int(trainer.current_epoch)


def audio_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    bucket_window: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    epoch: int = 0,
    skip_batches: int = 0,
    pad_to_multiple: int = 1,
) -> DataLoader:
    """A loader over an epoch-encoding dataset: :class:`EpochSampler` order, padded batches with ``lengths``.

    ``epoch`` is the epoch the first iteration belongs to (:func:`next_train_epoch`): a resumed run
    builds its loader (and, with worker processes, its first iterator) before Lightning calls ``set_epoch``.

    ``skip_batches``: the first epoch starts after that many batches (resuming a mid-epoch checkpoint,
    :func:`~datamodules.resume.interrupted_epoch_position`).

    With ``bucket_window`` (and ``batch_size > 1``), batches group similar ``dataset.lengths``.
    ``pad_to_multiple``: see :class:`PairedFolderDataModule`.
    """
    if pad_to_multiple < 1:
        raise ValueError(f"data.pad_to_multiple must be >= 1, got {pad_to_multiple}")
    sampler = EpochSampler(len(dataset), shuffle, seed)
    sampler.set_epoch(epoch)
    collate = functools.partial(collate_pairs, pad_to_multiple=pad_to_multiple)
    common = dict(num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0, skip_batches=skip_batches)
    if bucket_window and batch_size > 1:
        batches = BucketBatchSampler(sampler, dataset.lengths, batch_size, seed=seed, window=bucket_window)
        return ResumableDataLoader(dataset, batch_sampler=batches, **common)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, **common)


class SplitDataModule(L.LightningDataModule):
    """train/val/test loaders over ``self.dataset(split)``: the training split shuffled per epoch
    (optionally length-bucketed), validation and test whole utterances one by one.

    Subclasses provide ``dataset(split)`` and the attributes ``batch_size``, ``seed``, ``bucket``,
    ``bucket_window``, ``num_workers``, ``pin_memory`` and ``pad_to_multiple`` (training batches only).
    """

    resumes_mid_epoch = True  # a mid-epoch checkpoint continues the epoch's order where it stopped

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        for split in wanted:
            self.dataset(split)

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        return audio_loader(
            self.dataset(split),
            batch_size=self.batch_size if train else 1,
            shuffle=train,
            seed=self.seed,
            bucket_window=self.bucket_window if train and self.bucket else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            epoch=next_train_epoch(self.trainer) if train else 0,
            skip_batches=interrupted_epoch_position(self.trainer)[1] if train else 0,
            pad_to_multiple=self.pad_to_multiple if train else 1,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def _gain_range(value) -> tuple[float, float] | None:
    """``data.gain_db_range`` checked: None, or ``[low, high]`` finite dB with low <= high."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"data.gain_db_range must be null or [low, high] in dB, got {value!r}") from None
    if not (np.isfinite(low) and np.isfinite(high)) or low > high:
        raise ValueError(f"data.gain_db_range must be finite [low, high] with low <= high, got {list(value)}")
    return low, high


def _polarity_flag(value) -> bool:
    """``data.random_polarity`` checked: a boolean (a string such as ``"false"`` would count as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"data.random_polarity must be true or false, got {value!r}")
    return value


class PairedFolderDataModule(SplitDataModule):
    """Train/val/test splits from ``root/{trainset,valset,testset}_{noisy,clean}/``.

    Training uses whole utterances with ``batch_size=1`` (the paper), random crops of
    ``crop_seconds`` for batching, or (``bucket=True``) batches of whole utterances of similar
    length (:class:`~datamodules.bucketing.BucketBatchSampler`), the padding masked out of the loss;
    validation and test always use whole utterances, one per batch. ``manifest_dir`` caches the
    file lists with their lengths (:mod:`datamodules.manifest`). ``val_split="test"`` validates on
    ``testset_*`` (the authors' protocol, for a training set prepared with every speaker).

    ``pad_to_multiple`` zero-pads training batches to a multiple of that many samples (masked out of
    the loss like any padding). On a GPU, cuDNN builds a plan for every new input length (~70 ms a
    step for can_paper + the loss network) and keeps 10 000 of them; rounding lengths up keeps the
    number of shapes small (4096 samples: ~60 for VoiceBank). Batch-statistics normalisation sees the
    padding zeros, as in any padded batch.

    Args:
        root: the folder holding ``{trainset,valset,testset}_{noisy,clean}/`` (same file names in each pair).
        batch_size: training utterances (or crops) per batch; validation and test use 1.
        crop_seconds: training crop length; ``None`` trains on whole utterances.
        num_workers: DataLoader worker processes.
        sample_rate: the rate the audio is read at (files at other rates are resampled).
        seed: the training order, crops, gains and polarity, per epoch.
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        bucket: batch whole utterances of similar length (needs ``crop_seconds=None``).
        bucket_window: how many batches' worth of utterances are sorted by length together.
        manifest_dir: where the file lists with their lengths are cached; ``None``: not cached.
        pad_to_multiple: zero-pad training batches to a multiple of this many samples.
        val_split: ``"val"`` (``valset_*``) or ``"test"`` (``testset_*``) for validation.
        gain_db_range: ``[low, high]`` dB: each training example (noisy and clean alike) at a random
            gain drawn uniformly from it, lowered where it would take a peak over 0.99; ``None``: as read.
        random_polarity: invert half of the training examples (noisy and clean alike), drawn per
            ``(seed, epoch, index)``: a model trained on one polarity is worse on the other.
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 1,
        crop_seconds: float | None = None,
        num_workers: int = 0,
        sample_rate: int = 16_000,
        seed: int = 0,
        pin_memory: bool = False,
        bucket: bool = False,
        bucket_window: int = 50,
        manifest_dir: str | Path | None = None,
        pad_to_multiple: int = 1,
        val_split: str = "val",
        gain_db_range: tuple[float, float] | None = None,
        random_polarity: bool = False,
    ) -> None:
        super().__init__()
        if val_split not in ("val", "test"):
            raise ValueError(f"data.val_split must be 'val' (valset_*) or 'test' (testset_*), got {val_split!r}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if pad_to_multiple < 1:
            raise ValueError(f"data.pad_to_multiple must be >= 1, got {pad_to_multiple}")
        if bucket and crop_seconds:
            raise ValueError("data.bucket=true batches whole utterances by length; unset data.crop_seconds to use it")
        if batch_size > 1 and not crop_seconds and not bucket:
            log.info("data.batch_size=%d without crop_seconds: utterances are zero-padded to the longest", batch_size)
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.crop_samples = int(round(crop_seconds * sample_rate)) if crop_seconds else None
        self.num_workers = num_workers
        self.sample_rate = sample_rate
        self.seed = seed
        self.pin_memory = pin_memory
        self.bucket = bucket
        self.bucket_window = bucket_window
        self.manifest_dir = manifest_dir
        self.pad_to_multiple = pad_to_multiple
        self.val_split = val_split
        self.gain_db_range = _gain_range(gain_db_range)
        self.random_polarity = _polarity_flag(random_polarity)
        self.datasets: dict[str, PairedAudioDataset] = {}

    def split_dirs(self, split: str) -> tuple[Path, Path]:
        if split == "val":
            split = self.val_split
        prefix = SPLITS[split]
        return self.root / f"{prefix}_noisy", self.root / f"{prefix}_clean"

    def dataset(self, split: str) -> PairedAudioDataset:
        if split not in self.datasets:
            if not self.root.is_dir():
                raise DataError(f"data.root={self.root}: directory not found")
            crop = self.crop_samples if split == "train" else None
            noisy_dir = self.split_dirs(split)[0]
            if split == "val" and self.val_split == "val" and not any(noisy_dir.glob("*.*")):
                raise DataError(f"{noisy_dir}: no validation pairs (prepared with --val-speakers none?); "
                                "set data.val_split=test to validate on the test set")  # fmt: skip
            self.datasets[split] = PairedAudioDataset(
                *self.split_dirs(split),
                sample_rate=self.sample_rate,
                crop_samples=crop,
                seed=self.seed,
                manifest_dir=self.manifest_dir,
                gain_db_range=self.gain_db_range if split == "train" else None,
                random_polarity=self.random_polarity and split == "train",
            )
        return self.datasets[split]

