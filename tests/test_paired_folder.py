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


def _gain_db(gained: torch.Tensor, plain: torch.Tensor) -> float:
    """The scale between two versions of one crop (least squares), in dB."""
    return 20 * np.log10(float(gained @ plain) / float(plain @ plain))


def test_training_gains_scale_the_pair_alike_within_the_range(pair_tree):
    plain = PairedFolderDataModule(pair_tree, batch_size=2, crop_seconds=0.1, seed=3)
    gained = PairedFolderDataModule(pair_tree, batch_size=2, crop_seconds=0.1, seed=3, gain_db_range=[-20, -5])
    plain.setup("fit"), gained.setup("fit")
    a, b = plain.dataset("train"), gained.dataset("train")
    gains = []
    for i in range(3 * len(a)):  # three epochs of three files
        x, y = a[i], b[i]
        g = _gain_db(y["noisy"], x["noisy"])
        # the same crop (its position is drawn from its own stream), noisy and clean scaled by one factor
        np.testing.assert_allclose(y["noisy"].numpy(), x["noisy"].numpy() * 10 ** (g / 20), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(y["clean"].numpy(), x["clean"].numpy() * 10 ** (g / 20), rtol=1e-5, atol=1e-7)
        gains.append(g)
    assert -20 - 1e-4 <= min(gains) and max(gains) <= -5 + 1e-4
    assert max(gains) - min(gains) > 5  # drawn anew per file and epoch
    assert torch.equal(b[4]["noisy"], b[4]["noisy"])  # deterministic per (seed, epoch, index)
    # validation and test read the files as they are
    assert torch.equal(gained.dataset("val")[0]["noisy"], plain.dataset("val")[0]["noisy"])


def test_training_gains_never_push_a_peak_over_full_scale(pair_tree):
    dm = PairedFolderDataModule(pair_tree, crop_seconds=0.1, gain_db_range=[20, 30])  # files peak at ~0.35
    dm.setup("fit")
    ds = dm.dataset("train")
    peaks = [float(max(ds[i]["noisy"].abs().max(), ds[i]["clean"].abs().max())) for i in range(len(ds))]
    np.testing.assert_allclose(peaks, 0.99, rtol=1e-5)


def test_random_polarity_flips_the_pair_alike(pair_tree):
    plain = PairedFolderDataModule(pair_tree, crop_seconds=0.1, seed=3, gain_db_range=[-20, -5])
    flipped = PairedFolderDataModule(pair_tree, crop_seconds=0.1, seed=3, gain_db_range=[-20, -5], random_polarity=True)
    plain.setup("fit"), flipped.setup("fit")
    a, b = plain.dataset("train"), flipped.dataset("train")
    signs = []
    for i in range(4 * len(a)):  # four epochs of three files: the same crops and gains, some inverted
        x, y = a[i], b[i]
        sign = 1 if torch.equal(y["noisy"], x["noisy"]) else -1
        assert torch.equal(y["noisy"], sign * x["noisy"]) and torch.equal(y["clean"], sign * x["clean"])
        signs.append(sign)
    assert set(signs) == {1, -1}
    assert torch.equal(b[5]["noisy"], b[5]["noisy"])  # deterministic per (seed, epoch, index)
    assert torch.equal(flipped.dataset("val")[0]["noisy"], plain.dataset("val")[0]["noisy"])
    with pytest.raises(ValueError, match="data.random_polarity"):
        PairedFolderDataModule(pair_tree, random_polarity="false")


@pytest.mark.parametrize("value", [[3], [6, -6], "loud", [0, float("nan")]])
def test_bad_gain_range_is_refused_by_name(pair_tree, value):
    with pytest.raises(ValueError, match="data.gain_db_range"):
        PairedFolderDataModule(pair_tree, gain_db_range=value)


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
