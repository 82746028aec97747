"""Paired noisy/clean wav folders: ``root/{train,val,test}set_{noisy,clean}/*.wav``.

The layout of the authors' release and of VoiceBank-DEMAND (after ``dfl-prepare voicebank``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dfl.audio import AudioError, load_mono

log = logging.getLogger(__name__)

SPLITS = {"train": "trainset", "val": "valset", "test": "testset"}
AUDIO_SUFFIXES = (".wav", ".flac")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file or directory at fault."""


def _audio_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(directory.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES}


def scan_pairs(noisy_dir: Path, clean_dir: Path) -> list[tuple[Path, Path, int]]:
    """Validate a split's pairs from the file headers; returns ``(noisy, clean, frames)`` per pair."""
    for d in (noisy_dir, clean_dir):
        if not d.is_dir():
            raise DataError(f"{d}: directory not found")
    noisy, clean = _audio_files(noisy_dir), _audio_files(clean_dir)
    if not noisy:
        raise DataError(f"{noisy_dir}: empty split (no .wav/.flac files)")
    missing = sorted(set(noisy) - set(clean))
    if missing:
        raise DataError(
            f"{noisy_dir / missing[0]}: noisy file without its clean pair in {clean_dir}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    pairs = []
    for name, npath in noisy.items():
        cpath = clean[name]
        frames = []
        for path in (npath, cpath):
            try:
                info = sf.info(str(path))
            except Exception as exc:
                raise DataError(f"{path}: unreadable audio file ({exc})") from exc
            if info.frames == 0:
                raise DataError(f"{path}: audio file is empty (0 samples)")
            frames.append((info.frames, info.samplerate))
        if frames[0] != frames[1]:
            raise DataError(
                f"{npath}: {frames[0][0]} samples at {frames[0][1]} Hz but its clean pair {cpath} has "
                f"{frames[1][0]} samples at {frames[1][1]} Hz; pairs must have the same length"
            )
        pairs.append((npath, cpath, frames[0][0]))
    return pairs


class PairedAudioDataset(Dataset):
    """Noisy/clean pairs as 16 kHz mono float32 tensors; optional random fixed-length crops."""

    def __init__(
        self,
        noisy_dir: str | Path,
        clean_dir: str | Path,
        *,
        sample_rate: int = 16_000,
        crop_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        self.pairs = scan_pairs(Path(noisy_dir), Path(clean_dir))
        self.sample_rate = sample_rate
        self.crop_samples = crop_samples
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        # EpochSampler encodes the epoch into the index so crops stay deterministic per
        # (seed, epoch, index) even inside persistent worker processes.
        epoch, index = divmod(int(index), len(self.pairs))
        npath, cpath, _ = self.pairs[index]
        noisy, clean = load_mono(npath, self.sample_rate), load_mono(cpath, self.sample_rate)
        if noisy.shape != clean.shape:  # both resampled from equal lengths; guard anyway
            raise AudioError(f"{npath}: length differs from {cpath} after resampling")
        if self.crop_samples:
            noisy, clean = self._crop(noisy, clean, index, epoch)
        return {
            "noisy": torch.from_numpy(noisy),
            "clean": torch.from_numpy(clean),
            "length": min(len(noisy), self.crop_samples or len(noisy)),
            "name": npath.name,
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


def collate_pairs(items: list[dict]) -> dict:
    """Stack (zero-padding to the longest) and keep the true lengths."""
    longest = max(it["noisy"].shape[-1] for it in items)

    def stack(key):
        return torch.stack([torch.nn.functional.pad(it[key], (0, longest - it[key].shape[-1])) for it in items])

    return {
        "noisy": stack("noisy"),
        "clean": stack("clean"),
        "lengths": torch.tensor([it["length"] for it in items]),
        "names": [it["name"] for it in items],
    }


class PairedFolderDataModule(L.LightningDataModule):
    """Train/val/test splits from ``root/{trainset,valset,testset}_{noisy,clean}/``.

    Training uses whole utterances with ``batch_size=1`` (the paper) or random crops of
    ``crop_seconds`` for batching; validation and test always use whole utterances, one per batch.
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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if batch_size > 1 and not crop_seconds:
            log.info("data.batch_size=%d without crop_seconds: utterances are zero-padded to the longest", batch_size)
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.crop_samples = int(round(crop_seconds * sample_rate)) if crop_seconds else None
        self.num_workers = num_workers
        self.sample_rate = sample_rate
        self.seed = seed
        self.pin_memory = pin_memory
        self.datasets: dict[str, PairedAudioDataset] = {}

    def split_dirs(self, split: str) -> tuple[Path, Path]:
        prefix = SPLITS[split]
        return self.root / f"{prefix}_noisy", self.root / f"{prefix}_clean"

    def dataset(self, split: str) -> PairedAudioDataset:
        if split not in self.datasets:
            if not self.root.is_dir():
                raise DataError(f"data.root={self.root}: directory not found")
            crop = self.crop_samples if split == "train" else None
            self.datasets[split] = PairedAudioDataset(
                *self.split_dirs(split), sample_rate=self.sample_rate, crop_samples=crop, seed=self.seed
            )
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        for split in wanted:
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        return DataLoader(
            ds,
            batch_size=self.batch_size if split == "train" else 1,
            sampler=EpochSampler(len(ds), shuffle, self.seed),
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
