"""Length-bucketed batches, and the padding of variable-length batches masked out of the losses."""

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules import PairedFolderDataModule
from datamodules.bucketing import BucketBatchSampler
from datamodules.paired_folder import EpochSampler
from dfl.losses import FeatureLoss, WaveformL1Loss, WaveformL2Loss
from dfl.models import LossNetwork
from dfl.systems import DenoisingSystem

LENGTHS = [int(v) for v in np.random.default_rng(0).integers(100, 5000, size=37)]


def epoch_batches(sampler, epoch):
    sampler.sampler.set_epoch(epoch)
    return list(sampler)


def test_every_utterance_once_per_epoch_in_similar_length_batches():
    sampler = BucketBatchSampler(EpochSampler(len(LENGTHS), shuffle=True, seed=5), LENGTHS, batch_size=4, window=3)
    batches = epoch_batches(sampler, 2)
    flat = [i for b in batches for i in b]
    assert sorted(i % len(LENGTHS) for i in flat) == list(range(len(LENGTHS)))
    assert all(i // len(LENGTHS) == 2 for i in flat)  # the epoch stays encoded for the dataset
    assert len(batches) == len(sampler) == 10 and sorted(len(b) for b in batches)[0] == 1
    # Within a batch the lengths are neighbours in a sorted window of 12: far less spread than random.
    spread = np.mean([np.ptp([LENGTHS[i % 37] for i in b]) for b in batches if len(b) > 1])
    rng = np.random.default_rng(1)
    random_spread = np.mean([np.ptp(rng.choice(LENGTHS, 4, replace=False)) for _ in range(200)])
    assert spread < 0.5 * random_spread


def test_deterministic_per_seed_and_epoch():
    def make(seed):
        return BucketBatchSampler(EpochSampler(len(LENGTHS), True, seed), LENGTHS, batch_size=4, seed=seed, window=3)

    a, b = make(1), make(1)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 1) == epoch_batches(b, 1)
    assert [[i % 37 for i in x] for x in epoch_batches(a, 0)] != [[i % 37 for i in x] for x in epoch_batches(a, 1)]
    assert epoch_batches(make(2), 0) != epoch_batches(make(1), 0)


def test_drop_last_drops_only_the_short_batch():
    sampler = BucketBatchSampler(EpochSampler(37, False), LENGTHS, batch_size=4, window=2, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9 and all(len(b) == 4 for b in batches)


def padded_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    est, ref = torch.randn(len(lengths), max(lengths), generator=g), torch.randn(len(lengths), max(lengths), generator=g)
    for i, n in enumerate(lengths):
        est[i, n:] = 0
        ref[i, n:] = 0
    return est, ref


@pytest.mark.parametrize("loss_cls", [WaveformL1Loss, WaveformL2Loss])
def test_waveform_losses_of_a_padded_batch_equal_the_utterances_one_by_one(loss_cls):
    lengths = [1000, 700, 333]
    est, ref = padded_batch(lengths)
    loss = loss_cls()
    batched, _ = loss(est, ref, lengths=torch.tensor(lengths))
    one_by_one = torch.stack([loss(est[i : i + 1, :n], ref[i : i + 1, :n])[0] for i, n in enumerate(lengths)]).mean()
    torch.testing.assert_close(batched, one_by_one, rtol=1e-6, atol=0)
    unmasked, _ = loss(est, ref)
    assert not torch.allclose(unmasked, one_by_one, rtol=1e-2)  # the padding would have biased it
    # backward compatible: no lengths = the plain mean
    torch.testing.assert_close(loss(est, ref)[0], loss(est, ref, lengths=torch.tensor([1000] * 3))[0])


def test_feature_loss_of_a_padded_batch_matches_the_utterances_one_by_one():
    torch.manual_seed(0)
    loss = FeatureLoss(LossNetwork(n_layers=6, base_channels=8))
    lengths = [16000, 12000, 9000]  # all even: layer 0 sees the same samples and zeros
    est, ref = padded_batch(lengths)
    est, ref = 0.1 * est, 0.1 * ref
    _, batched = loss(est, ref, lengths=torch.tensor(lengths))
    one = torch.stack([loss(est[i : i + 1, :n], ref[i : i + 1, :n])[1] for i, n in enumerate(lengths)]).mean(0)
    torch.testing.assert_close(batched[0], one[0], rtol=1e-5, atol=0)  # before any edge effect: exact
    rel = ((batched - one).abs() / one).max()
    unmasked_rel = ((loss(est, ref)[1] - one).abs() / one).min()
    assert rel < 0.05, rel  # deeper layers: only convolution edges differ
    assert unmasked_rel > 5 * rel


def test_feature_loss_valid_frames_follow_the_strides():
    # Per-layer frame counts ceil(len / 2^(l+1)); an estimate wrong only in the padding costs nothing.
    torch.manual_seed(0)
    loss = FeatureLoss(LossNetwork(n_layers=3, base_channels=4, normalization="none"))
    ref = torch.zeros(2, 64)
    est = ref.clone()
    est[1, 40:] = 1.0  # utterance 1 has 40 samples; this is all padding
    _, per_layer = loss(est, ref, lengths=torch.tensor([64, 40]))
    # layer 0: frames 0..19 of utterance 1 cover samples <= 39 (+1 right neighbour at 40 for frame 19)
    assert per_layer[0] > 0  # the frame straddling the end sees the padding: the documented edge
    est[1, 42:] = 1.0
    est[1, 40:42] = 0.0
    _, per_layer = loss(est, ref, lengths=torch.tensor([64, 40]))
    assert per_layer[0] == 0  # beyond the straddling frame: masked out


class Shift(torch.nn.Module):
    """A denoiser that writes non-zero values into the padding (as convolutions do)."""

    def forward(self, x):
        return x + 0.5


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_system_zeroes_the_output_beyond_each_length_before_the_loss():
    lengths = [800, 500]
    noisy, clean = padded_batch(lengths)
    system = DenoisingSystem(Shift(), WaveformL1Loss())
    batched = system.training_step({"noisy": noisy, "clean": clean, "lengths": torch.tensor(lengths)}, 0)["loss"]
    one = torch.stack([
        system.training_step({"noisy": noisy[i : i + 1, :n], "clean": clean[i : i + 1, :n],
                              "lengths": torch.tensor([n])}, 0)["loss"]
        for i, n in enumerate(lengths)
    ]).mean()
    torch.testing.assert_close(batched, one, rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_system_refuses_a_loss_that_cannot_mask():
    class PlainLoss(torch.nn.Module):
        term_names: list = []

        def forward(self, estimate, target):
            return (estimate - target).abs().mean(), estimate.new_zeros(0)

    system = DenoisingSystem(Shift(), PlainLoss())
    noisy, clean = padded_batch([100, 60])
    with pytest.raises(ValueError, match="PlainLoss cannot mask the padding"):
        system.training_step({"noisy": noisy, "clean": clean, "lengths": torch.tensor([100, 60])}, 0)
    # without padding it still works
    system.training_step({"noisy": noisy, "clean": clean, "lengths": torch.tensor([100, 100])}, 0)


def constant_pairs(root, sizes):
    """train and val splits of constant, non-zero utterances of the given lengths (padding shows as 0)."""
    for split in ("train", "val"):
        for kind in ("noisy", "clean"):
            (root / f"{split}set_{kind}").mkdir(parents=True)
            for i, n in enumerate(sizes):
                sf.write(root / f"{split}set_{kind}/u{i}.wav", np.full(n, 0.1 * (i + 1), np.float32), 16000)
    return root


def test_paired_folder_bucketed_batches_of_whole_utterances(tmp_path):
    root = constant_pairs(tmp_path / "pairs", [1600, 9000, 1700, 8800, 1650, 9100])
    with pytest.raises(ValueError, match="data.bucket=true"):
        PairedFolderDataModule(root, batch_size=3, crop_seconds=0.5, bucket=True)
    dm = PairedFolderDataModule(root, batch_size=3, bucket=True, seed=4, manifest_dir=tmp_path / "manifests")
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    for b in batches:
        assert sorted(b["lengths"].tolist()) in ([1600, 1650, 1700], [8800, 9000, 9100])
        assert b["noisy"].shape[-1] == max(b["lengths"])
        for row, n in zip(b["clean"], b["lengths"]):
            assert torch.all(row[n:] == 0) and torch.all(row[:n] != 0)
    # validation stays whole utterances, one per batch
    assert all(b["noisy"].shape[0] == 1 for b in dm.val_dataloader())


def test_pad_to_multiple_rounds_training_batches_up_and_flags_padding(tmp_path):
    root = constant_pairs(tmp_path / "pairs", [1600, 9000, 1700, 8800, 1650, 4096])
    with pytest.raises(ValueError, match="data.pad_to_multiple must be >= 1"):
        PairedFolderDataModule(root, pad_to_multiple=0)
    dm = PairedFolderDataModule(root, batch_size=1, seed=4, pad_to_multiple=1024)
    dm.setup("fit")
    for b in dm.train_dataloader():
        n = int(b["lengths"][0])
        assert b["noisy"].shape[-1] == -(-n // 1024) * 1024  # rounded up to the next multiple
        assert b["padded"] is (n % 1024 != 0)  # 4096 is a multiple already: no padding
        assert torch.all(b["clean"][0, n:] == 0) and torch.all(b["noisy"][0, :n] != 0)
    # validation and test keep whole utterances, unpadded
    assert [b["noisy"].shape[-1] for b in dm.val_dataloader()] == [int(b["lengths"][0]) for b in dm.val_dataloader()]
    assert all(b["padded"] is False for b in dm.val_dataloader())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_padded_flag_decides_masking_without_looking_at_the_lengths():
    lengths = [800, 500]
    noisy, clean = padded_batch(lengths)
    system = DenoisingSystem(Shift(), WaveformL1Loss())
    batch = {"noisy": noisy, "clean": clean, "lengths": torch.tensor(lengths)}
    looked = system.training_step(batch, 0)["loss"]
    flagged = system.training_step({**batch, "padded": True}, 0)["loss"]
    unmasked = system.training_step({**batch, "padded": False}, 0)["loss"]  # taken at its word
    assert torch.equal(looked, flagged)
    torch.testing.assert_close(unmasked, (Shift()(noisy) - clean).abs().mean())
    assert not torch.isclose(unmasked, looked)
