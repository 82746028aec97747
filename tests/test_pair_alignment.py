"""Noisy/clean alignment through every datamodule path: the pairs a model trains and is scored on match.

Two independent checks on every loader (whole utterances, random crops, length buckets, padding to the
longest or to a multiple, worker processes; validation and test):

- identical noisy and clean files give identical ``noisy`` and ``clean`` batches, sample for sample;
- with different noisy and clean files, each batch row is the named pair's files at one common offset
  (found from the clean row), zero beyond its length.

A crop taking clean one sample later than noisy, or noisy ``i`` paired with clean ``i + 1``, fails both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules import PairedFolderDataModule
from datamodules.mixing import MixingDataModule

SR = 16000
LENGTHS = [2500, 4000, 5200, 3100, 6000, 1900]  # some shorter than the 0.2 s crop (3200), some longer
CROP_SECONDS = 0.2

PATHS = {
    "whole-utterances": dict(batch_size=1),
    "random-crops": dict(batch_size=2, crop_seconds=CROP_SECONDS),
    "random-crops-in-workers": dict(batch_size=2, crop_seconds=CROP_SECONDS, num_workers=1),
    "length-buckets": dict(batch_size=3, bucket=True, bucket_window=2),
    "padded-to-longest": dict(batch_size=3),
    "padded-to-multiple": dict(batch_size=2, pad_to_multiple=1024),
}


def write_tree(root: Path, identical: bool, shift: int = 0, seed: int = 0) -> Path:
    """Every split with noise-like utterances (no two samples alike); noisy = clean if ``identical``,
    else clean + independent noise. ``shift`` delays noisy by that many samples (a broken pair)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        for kind in ("noisy", "clean"):
            (root / f"{split}set_{kind}").mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(LENGTHS):
            clean = (0.1 * rng.standard_normal(n)).astype(np.float32)
            noisy = clean.copy() if identical else clean + (0.05 * rng.standard_normal(n)).astype(np.float32)
            if shift:
                noisy = np.concatenate([np.zeros(shift, np.float32), noisy[:-shift]])
            sf.write(root / f"{split}set_clean/u{i}.wav", clean, SR, subtype="FLOAT")
            sf.write(root / f"{split}set_noisy/u{i}.wav", noisy, SR, subtype="FLOAT")
    return root


def loaders(root: Path, kwargs: dict, seed: int = 3):
    dm = PairedFolderDataModule(root, seed=seed, **kwargs)
    dm.setup()
    return {"train": dm.train_dataloader(), "val": dm.val_dataloader(), "test": dm.test_dataloader()}


def batches(root: Path, kwargs: dict):
    for split, loader in loaders(root, kwargs).items():
        for batch in loader:
            yield split, batch


def assert_rows_are_the_named_pairs(root: Path, split: str, batch: dict) -> None:
    """Each row: the named noisy and clean files at one common offset, zeros after its length."""
    prefix = {"train": "trainset", "val": "valset", "test": "testset"}[split]
    for b, name in enumerate(batch["names"]):
        n = int(batch["lengths"][b])
        clean_file = sf.read(root / f"{prefix}_clean" / name, dtype="float32")[0]
        noisy_file = sf.read(root / f"{prefix}_noisy" / name, dtype="float32")[0]
        clean_row, noisy_row = batch["clean"][b].numpy(), batch["noisy"][b].numpy()
        starts = [s for s in np.flatnonzero(clean_file == clean_row[0]) if s + n <= len(clean_file)
                  and np.array_equal(clean_file[s : s + n], clean_row[:n])]
        assert len(starts) == 1, f"{split}/{name}: the clean row is not one segment of its clean file"
        start = starts[0]
        np.testing.assert_array_equal(noisy_row[:n], noisy_file[start : start + n], err_msg=f"{split}/{name}")
        assert not noisy_row[n:].any() and not clean_row[n:].any(), f"{split}/{name}: padding is not zero"


@pytest.fixture(scope="module")
def twin_tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("twins"), identical=True)


@pytest.fixture(scope="module")
def pair_tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("pairs"), identical=False)


@pytest.mark.parametrize("path", list(PATHS))
def test_identical_files_give_identical_batches(twin_tree, path):
    seen = set()
    for split, batch in batches(twin_tree, PATHS[path]):
        assert torch.equal(batch["noisy"], batch["clean"]), f"{path}, {split}: noisy and clean batches differ"
        assert batch["noisy"].abs().sum() > 0
        assert_rows_are_the_named_pairs(twin_tree, split, batch)
        seen.update((split, name) for name in batch["names"])
    assert len(seen) == 3 * len(LENGTHS)  # every utterance of every split went through


@pytest.mark.parametrize("path", list(PATHS))
def test_every_row_is_its_named_pair_at_one_offset(pair_tree, path):
    crop_lengths = set()
    for split, batch in batches(pair_tree, PATHS[path]):
        assert_rows_are_the_named_pairs(pair_tree, split, batch)
        # the loss masks what the batch says is padding: every row shorter than the batch
        assert batch["padded"] == bool((batch["lengths"] < batch["noisy"].shape[-1]).any())
        if split == "train" and "crop_seconds" in PATHS[path]:
            crop_lengths.update(map(int, batch["lengths"]))
    if "crop_seconds" in PATHS[path]:  # crops of the long files, the short ones whole (padded)
        assert crop_lengths == {int(CROP_SECONDS * SR), *(n for n in LENGTHS if n < CROP_SECONDS * SR)}


def test_crops_move_between_epochs_and_stay_aligned(pair_tree):
    """Later epochs draw other crops (the alignment is checked on each, not only on the first)."""
    dm = PairedFolderDataModule(pair_tree, batch_size=2, crop_seconds=CROP_SECONDS, seed=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        rows = {}
        for batch in loader:
            assert_rows_are_the_named_pairs(pair_tree, "train", batch)
            rows.update({name: batch["clean"][b].clone() for b, name in enumerate(batch["names"])})
        epochs.append(rows)
    long = [f"u{i}.wav" for i, n in enumerate(LENGTHS) if n > CROP_SECONDS * SR]
    assert any(not torch.equal(epochs[0][k], epochs[1][k]) for k in long)


def test_the_checks_see_a_one_sample_shift_and_a_mispairing(tmp_path, pair_tree):
    """The checks above can fail: on files one sample apart, on a crop one sample late, on swapped rows."""
    shifted = write_tree(tmp_path / "shifted", identical=True, shift=1)
    batch = next(iter(loaders(shifted, PATHS["random-crops"])["train"]))
    assert not torch.equal(batch["noisy"], batch["clean"])
    batch = next(iter(loaders(pair_tree, PATHS["random-crops"])["train"]))
    assert_rows_are_the_named_pairs(pair_tree, "train", batch)
    n = int(batch["lengths"][0])
    late = dict(batch, clean=batch["clean"].clone())
    late["clean"][0, : n - 1] = batch["clean"][0, 1:n].clone()  # clean taken one sample later than noisy
    with pytest.raises(AssertionError):
        assert_rows_are_the_named_pairs(pair_tree, "train", late)
    swapped = dict(batch, noisy=batch["noisy"].flip(0))  # noisy of one utterance with the clean of another
    with pytest.raises(AssertionError):
        assert_rows_are_the_named_pairs(pair_tree, "train", swapped)


@pytest.mark.parametrize("kwargs", [dict(batch_size=2, crop_seconds=CROP_SECONDS), dict(batch_size=3, bucket=True,
                                                                                        crop_seconds=None)])
def test_mixtures_with_silent_noise_are_their_clean_crops(tmp_path, kwargs):
    """On-the-fly mixing: with silent noise the mixture is its target, sample for sample, and the target is one
    segment of its clean file times the mixture's gain."""
    clean_dir, noise_dir = tmp_path / "clean", tmp_path / "noise"
    clean_dir.mkdir(), noise_dir.mkdir()
    rng = np.random.default_rng(1)
    files = {}
    for i, n in enumerate(LENGTHS):
        files[f"s{i}"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        sf.write(clean_dir / f"s{i}.wav", files[f"s{i}"], SR, subtype="FLOAT")
    sf.write(noise_dir / "silence.wav", np.zeros(8000, np.float32), SR, subtype="FLOAT")
    dm = MixingDataModule(clean_dir, noise_dir, gain_db_range=(0.0, 0.0), seed=2, **kwargs)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert torch.equal(batch["noisy"], batch["clean"])
        for b, name in enumerate(batch["names"]):
            n, source = int(batch["lengths"][b]), files[name.split("_", 1)[1]]
            row = batch["clean"][b, :n].numpy()
            assert any(np.array_equal(source[s : s + n], row) for s in np.flatnonzero(source == row[0]))
