import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules import DataError, PairedAudioDataset, PairedFolderDataModule
from dfl.audio import AudioError
from tests.conftest import write_pair_tree


def test_loads_pairs_as_16k_mono(pair_tree):
    dm = PairedFolderDataModule(pair_tree)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["noisy"].shape == batch["clean"].shape == (1, 8000)
    assert batch["lengths"].tolist() == [8000] and batch["noisy"].dtype == torch.float32


def test_resamples_other_rates(tmp_path):
    root = write_pair_tree(tmp_path / "p", splits=("train",), n=1, seconds=0.5, sr=48000)
    ds = PairedAudioDataset(root / "trainset_noisy", root / "trainset_clean")
    item = ds[0]
    assert item["noisy"].shape == (8000,) and item["clean"].shape == (8000,)


def test_random_crops_batch_and_are_deterministic(pair_tree):
    dm = PairedFolderDataModule(pair_tree, batch_size=2, crop_seconds=0.1, seed=3)
    dm.setup("fit")
    ds = dm.dataset("train")
    a, b = ds[1], ds[1]
    assert a["noisy"].shape == (1600,) and torch.equal(a["noisy"], b["noisy"])
    other_epoch = ds[1 + len(ds)]  # the sampler encodes epoch 1 this way
    assert not torch.equal(a["noisy"], other_epoch["noisy"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["noisy"].shape == (2, 1600)


def test_noisy_without_clean_pair(pair_tree):
    (pair_tree / "trainset_clean" / "u1.wav").unlink()
    with pytest.raises(DataError, match=r"u1\.wav: noisy file without its clean pair"):
        PairedFolderDataModule(pair_tree).setup("fit")


def test_pairs_of_different_length(pair_tree):
    sf.write(pair_tree / "valset_clean" / "u0.wav", np.zeros(100, dtype=np.float32), 16000)
    with pytest.raises(DataError, match=r"valset_noisy/u0\.wav: 8000 samples .* 100 samples"):
        PairedFolderDataModule(pair_tree).setup("fit")


def test_empty_file(pair_tree):
    sf.write(pair_tree / "trainset_noisy" / "u2.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(DataError, match=r"u2\.wav: audio file is empty"):
        PairedFolderDataModule(pair_tree).setup("fit")


def test_unreadable_file(pair_tree):
    (pair_tree / "trainset_noisy" / "u2.wav").write_bytes(b"this is not a wav file")
    with pytest.raises(DataError, match=r"u2\.wav: unreadable audio file"):
        PairedFolderDataModule(pair_tree).setup("fit")


def test_nan_samples(pair_tree):
    bad = np.zeros(8000, dtype=np.float32)
    bad[10] = np.nan
    sf.write(pair_tree / "testset_clean" / "u0.wav", bad, 16000, subtype="FLOAT")
    dm = PairedFolderDataModule(pair_tree)
    dm.setup("test")
    with pytest.raises(AudioError, match=r"testset_clean/u0\.wav: audio contains NaN or Inf"):
        next(iter(dm.test_dataloader()))


def test_empty_split(pair_tree):
    for p in (pair_tree / "testset_noisy").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"testset_noisy: empty split"):
        PairedFolderDataModule(pair_tree).setup("test")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*nowhere: directory not found"):
        PairedFolderDataModule(tmp_path / "nowhere").setup("fit")


def test_train_loader_starts_at_the_fit_loops_next_epoch(pair_tree):
    # Resuming from an end-of-epoch last.ckpt, Lightning builds the train loader (and, with workers,
    # prefetches from its first iterator) while trainer.current_epoch still names the finished epoch.
    from types import SimpleNamespace

    dm = PairedFolderDataModule(pair_tree)
    dm.trainer = SimpleNamespace(
        current_epoch=1, fit_loop=SimpleNamespace(epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=2)))
    )
    dm.setup("fit")
    n = len(dm.dataset("train"))
    assert dm.train_dataloader().sampler.epoch == 2
    assert all(i // n == 2 for i in dm.train_dataloader().sampler)  # indices encode epoch 2
    assert dm.val_dataloader().sampler.epoch == 0
