"""DCASE 2016 pretraining data: TUT Acoustic Scenes 2016 (scenes) and CHiME-Home (tagging).

Layouts read (as the archives extract; ``dfl-prepare dcase2016`` writes them):

* TUT Acoustic Scenes 2016, one directory per set, ``<set>/meta.txt`` with lines
  ``audio/<file>.wav<TAB><scene>[<TAB>...]`` (extra columns are ignored). Stereo
  clips: each channel is one example, resampled to 16 kHz when stored at another rate.
* CHiME-Home, ``<chime>/development_chunks_refined.csv`` and
  ``<chime>/evaluation_chunks_refined.csv`` with rows ``<index>,<chunk>``; each chunk has
  ``<chime>/chunks/<chunk>.csv`` whose ``majorityvote`` row holds its tags as letters
  from ``c m f v p b o`` (``S`` silence and ``U`` unidentifiable are not tags) and audio
  ``<chime>/chunks/<chunk>.16kHz.wav``.

Training examples are random crops (see :class:`CropCollate`); validation uses whole
clips (a batch is centre-cropped to its shortest clip, which is the whole clip when
a split's clips share one length, as in both real datasets).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import numpy as np
import soundfile as sf
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from datamodules.paired_folder import DataError
from dfl.audio import read_audio, resample

# The 15 TUT Acoustic Scenes 2016 labels, in the order of the scene head's outputs.
SCENES: tuple[str, ...] = (
    "beach", "bus", "cafe/restaurant", "car", "city_center", "forest_path", "grocery_store", "home",
    "library", "metro_station", "office", "park", "residential_area", "train", "tram",
)  # fmt: skip
# The 7 CHiME-Home tags, in the order of the tagging head's outputs: child speech, adult male
# speech, adult female speech, video game/TV, percussive sounds, broadband noise, other sounds.
TAGS: tuple[str, ...] = ("c", "m", "f", "v", "p", "b", "o")
# Majority-vote letters that are no tag: S = silence, U = unidentifiable (CHiME-Home annotation).
NOT_TAGS = ("S", "U")

SCENE_TASK, TAGS_TASK = 0, 1


# ---------------------------------------------------------------------------------------- parsing
def parse_tut_meta(meta_file: str | Path, scenes: tuple[str, ...] = SCENES) -> list[tuple[Path, int]]:
    """``(audio path, scene index)`` per line of a TUT ``meta.txt`` (paths relative to its directory)."""
    meta_file = Path(meta_file)
    if not meta_file.is_file():
        raise DataError(f"{meta_file}: TUT meta file not found")
    index = {s: i for i, s in enumerate(scenes)}
    items = []
    for n, line in enumerate(meta_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise DataError(f"{meta_file}:{n}: expected 'audio/<file>.wav<TAB><scene>', got {line!r}")
        rel, scene = fields[0], fields[1]
        if scene not in index:
            raise DataError(f"{meta_file}:{n}: unknown scene label {scene!r} (known: {', '.join(scenes)})")
        path = meta_file.parent / rel
        if not path.is_file():
            raise DataError(f"{meta_file}:{n}: audio file {path} not found")
        items.append((path, index[scene]))
    if not items:
        raise DataError(f"{meta_file}: empty split (no labelled clips)")
    return items


def parse_majority_vote(chunk_csv: str | Path, tags: tuple[str, ...] = TAGS) -> np.ndarray:
    """The 0/1 tag vector of a CHiME-Home chunk from the ``majorityvote`` row of its csv."""
    chunk_csv = Path(chunk_csv)
    if not chunk_csv.is_file():
        raise DataError(f"{chunk_csv}: chunk annotation file not found")
    with open(chunk_csv, newline="", encoding="utf-8") as f:
        rows = {row[0].strip(): row[1:] for row in csv.reader(f) if row}
    vote = "".join(rows.get("majorityvote", [])).strip()
    if not vote:
        raise DataError(f"{chunk_csv}: chunk without a majority vote (no non-empty 'majorityvote' row)")
    vector = np.zeros(len(tags), dtype=np.float32)
    for letter in vote:
        if letter in NOT_TAGS:
            continue
        if letter not in tags:
            raise DataError(
                f"{chunk_csv}: unknown tag {letter!r} in majority vote {vote!r} "
                f"(known: {' '.join(tags)}; {' '.join(NOT_TAGS)} are read as no tag)"
            )
        vector[tags.index(letter)] = 1.0
    return vector


def parse_chime_split(
    split_csv: str | Path, chunks_dir: str | Path | None = None, audio_suffix: str = ".16kHz.wav"
) -> list[tuple[Path, np.ndarray]]:
    """``(audio path, tag vector)`` per ``<index>,<chunk>`` row of a CHiME-Home split file."""
    split_csv = Path(split_csv)
    if not split_csv.is_file():
        raise DataError(f"{split_csv}: CHiME-Home split file not found")
    chunks_dir = Path(chunks_dir) if chunks_dir is not None else split_csv.parent / "chunks"
    items = []
    with open(split_csv, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2 or not row[1].strip():
                raise DataError(f"{split_csv}:{n}: expected '<index>,<chunk>', got {','.join(row)!r}")
            chunk = row[1].strip()
            annotation = chunks_dir / f"{chunk}.csv"
            if not annotation.is_file():
                raise DataError(f"{split_csv}:{n}: chunk {chunk!r} has no annotation file {annotation}")
            audio = chunks_dir / f"{chunk}{audio_suffix}"
            if not audio.is_file():
                raise DataError(f"{split_csv}:{n}: chunk {chunk!r} has no audio file {audio}")
            items.append((audio, parse_majority_vote(annotation)))
    if not items:
        raise DataError(f"{split_csv}: empty split (no chunks listed)")
    return items


def _channels(path: Path) -> int:
    try:
        info = sf.info(str(path))
    except Exception as exc:
        raise DataError(f"{path}: unreadable audio file ({exc})") from exc
    if info.frames == 0:
        raise DataError(f"{path}: audio file is empty (0 samples)")
    return info.channels


# --------------------------------------------------------------------------------------- datasets
class TUTScenesDataset(Dataset):
    """TUT Acoustic Scenes 2016 set: every channel of every clip is one scene example."""

    def __init__(self, directory: str | Path, meta: str = "meta.txt", sample_rate: int = 16_000) -> None:
        self.directory = Path(directory)
        self.sample_rate = sample_rate
        self.clips = parse_tut_meta(self.directory / meta)
        self.index = [(i, ch) for i, (path, _) in enumerate(self.clips) for ch in range(_channels(path))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        clip, channel = self.index[k]
        path, scene = self.clips[clip]
        data, sr = read_audio(path)
        wav = np.ascontiguousarray(resample(data[channel], sr, self.sample_rate), dtype=np.float32)
        return {"wav": wav, "scene": scene, "tags": np.zeros(len(TAGS), np.float32), "task": SCENE_TASK}


class CHiMEHomeDataset(Dataset):
    """A CHiME-Home split: every chunk is one tagging example (channels averaged)."""

    def __init__(
        self, directory: str | Path, split: str, audio_suffix: str = ".16kHz.wav", sample_rate: int = 16_000
    ) -> None:
        self.directory = Path(directory)
        self.sample_rate = sample_rate
        self.chunks = parse_chime_split(self.directory / split, self.directory / "chunks", audio_suffix)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict:
        path, tags = self.chunks[k]
        data, sr = read_audio(path)
        wav = np.ascontiguousarray(resample(data.mean(axis=0), sr, self.sample_rate), dtype=np.float32)
        return {"wav": wav, "scene": -1, "tags": tags, "task": TAGS_TASK}


# -------------------------------------------------------------------------------------- batching
def log_uniform_length(min_length: int, max_length: int, generator: torch.Generator | None = None) -> int:
    """A length drawn log-uniformly in ``[min_length, max_length]`` (inclusive)."""
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length} and {max_length}")
    u = float(torch.rand((), generator=generator))
    length = math.exp(math.log(min_length) + u * (math.log(max_length + 1) - math.log(min_length)))
    return min(max_length, int(length))


class CropCollate:
    """Batch examples of any lengths into ``[batch, length]`` crops.

    ``random=True`` (training, the authors' scheme): one length per batch, drawn
    log-uniformly between ``min_length`` (the loss network's minimum input length)
    and the shortest clip of the batch (capped at ``max_length`` if set); each clip
    is cropped at a random offset. When the clips are shorter than ``min_length`` (the
    15-layer network's 65 535 samples against CHiME-Home's 64 000-sample chunks), the
    lower bound becomes ``short_clip_fraction`` of the shortest clip, so those clips are
    still cropped at random lengths and offsets instead of always used whole.
    ``random=False`` (validation): centre crops to the shortest clip of the batch.
    """

    def __init__(
        self, min_length: int = 1, max_length: int | None = None, random: bool = True, short_clip_fraction: float = 0.5
    ) -> None:
        if min_length < 1:
            raise ValueError(f"min_length must be >= 1, got {min_length}")
        if max_length is not None and max_length < min_length:
            raise ValueError(f"max_length ({max_length}) must be >= min_length ({min_length})")
        if not 0 < short_clip_fraction <= 1:
            raise ValueError(f"short_clip_fraction must be in (0, 1], got {short_clip_fraction}")
        self.min_length, self.max_length, self.random = min_length, max_length, random
        self.short_clip_fraction = short_clip_fraction

    def length_bounds(self, shortest: int) -> tuple[int, int]:
        """The range training crop lengths are drawn from for a batch whose shortest clip has ``shortest`` samples."""
        longest = shortest if self.max_length is None else min(shortest, self.max_length)
        if longest >= self.min_length:
            return self.min_length, longest
        return max(1, int(self.short_clip_fraction * longest)), longest

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        shortest = min(len(e["wav"]) for e in examples)
        if self.random:
            length = log_uniform_length(*self.length_bounds(shortest))
        else:
            length = shortest
        crops = []
        for e in examples:
            spare = len(e["wav"]) - length
            start = int(torch.randint(spare + 1, ())) if self.random else spare // 2
            crops.append(torch.from_numpy(np.asarray(e["wav"][start : start + length])))
        task = torch.tensor([e["task"] for e in examples])
        return {
            "wav": torch.stack(crops),
            "scene": torch.tensor([e["scene"] for e in examples], dtype=torch.long),
            "tags": torch.from_numpy(np.stack([e["tags"] for e in examples])),
            "is_scene": task == SCENE_TASK,
            "is_tags": task == TAGS_TASK,
        }


# ------------------------------------------------------------------------------------ datamodule
class DCASE2016DataModule(L.LightningDataModule):
    """Both pretraining tasks: TUT development + CHiME development for training, the
    evaluation sets for validation.

    ``mode="alternate"``: the training loader yields ``{"scene": batch, "tags": batch}``
    (one batch per task per step); ``mode="mixed"``: one loader whose batches mix both
    tasks' examples (flags ``is_scene``/``is_tags``). Validation is always two loaders,
    ``[scenes, tags]``. ``min_crop_length`` is the loss network's minimum input length
    (``dfl-pretrain`` sets it from the network).

    Args:
        root: the folder holding the TUT and CHiME-Home folders (as ``dfl-prepare dcase2016`` writes them).
        tut_train: TUT folder for training (under ``root``).
        tut_val: TUT folder for validation.
        tut_meta: each TUT folder's list of ``(clip, scene)``.
        chime: the CHiME-Home folder (under ``root``).
        chime_train: CHiME-Home split file for training.
        chime_val: CHiME-Home split file for validation.
        chime_audio_suffix: which of each chunk's audio files to read.
        mode: ``"alternate"`` or ``"mixed"`` (see above).
        batch_size: training examples per batch (per task in ``alternate`` mode).
        val_batch_size: validation examples per batch; ``None``: ``batch_size``.
        min_crop_length: shortest training crop, in samples.
        max_crop_length: longest training crop, in samples; ``None``: the clip's length.
        num_workers: DataLoader worker processes.
        sample_rate: the rate the audio is read at.
        short_clip_fraction: for clips shorter than ``min_crop_length``, the shortest crop as a fraction
            of the clip (:class:`CropCollate`).
    (``dfl-pretrain`` sets it from the network).
    """

    MODES = ("alternate", "mixed")
    scene_names, tag_names = SCENES, TAGS

    def __init__(
        self,
        root: str | Path,
        tut_train: str = "TUT-acoustic-scenes-2016-development",
        tut_val: str = "TUT-acoustic-scenes-2016-evaluation",
        tut_meta: str = "meta.txt",
        chime: str = "chime_home",
        chime_train: str = "development_chunks_refined.csv",
        chime_val: str = "evaluation_chunks_refined.csv",
        chime_audio_suffix: str = ".16kHz.wav",
        mode: str = "alternate",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        min_crop_length: int = 1,
        max_crop_length: int | None = None,
        num_workers: int = 0,
        sample_rate: int = 16_000,
        short_clip_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"data.mode must be one of {self.MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.root = Path(root)
        self.tut_train, self.tut_val, self.tut_meta = tut_train, tut_val, tut_meta
        self.chime, self.chime_train, self.chime_val = chime, chime_train, chime_val
        self.chime_audio_suffix = chime_audio_suffix
        self.mode = mode
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.sample_rate = sample_rate
        self.train_collate = CropCollate(min_crop_length, max_crop_length, random=True,
                                         short_clip_fraction=short_clip_fraction)  # fmt: skip
        self.val_collate = CropCollate(random=False)
        self.train_sets: dict[str, Dataset] | None = None
        self.val_sets: dict[str, Dataset] | None = None

    def _sets(self, tut: str, chime_split: str) -> dict[str, Dataset]:
        return {
            "scene": TUTScenesDataset(self.root / tut, self.tut_meta, self.sample_rate),
            "tags": CHiMEHomeDataset(
                self.root / self.chime, chime_split, self.chime_audio_suffix, self.sample_rate
            ),
        }

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_sets is None:
            self.train_sets = self._sets(self.tut_train, self.chime_train)
        if stage in (None, "fit", "validate") and self.val_sets is None:
            self.val_sets = self._sets(self.tut_val, self.chime_val)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            collate_fn=self.train_collate if train else self.val_collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        if self.train_sets is None:
            self.setup("fit")
        if self.mode == "mixed":
            return self._loader(ConcatDataset(list(self.train_sets.values())), train=True)
        return {task: self._loader(ds, train=True) for task, ds in self.train_sets.items()}

    def val_dataloader(self):
        if self.val_sets is None:
            self.setup("validate")
        return [self._loader(self.val_sets["scene"], False), self._loader(self.val_sets["tags"], False)]
