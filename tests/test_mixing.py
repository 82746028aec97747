"""On-the-fly mixing (data=mix): determinism, SNR, reverberation, DDP shards, fixed eval sets, dfl-train."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader

from datamodules import DataError, MixingDataModule
from datamodules.bucketing import BucketBatchSampler
from tests.conftest import write_pair_tree
from tests.test_train import TINY, dfl_train

SR = 16000
RIR_TAIL = 0.5  # the test room: direct path, then one echo of half its amplitude 200 samples later


def speechlike(n, f0, sr=SR):
    t = np.arange(n) / sr
    return (0.05 * np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * 4 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    for i, seconds in enumerate([0.5, 0.7, 0.6, 0.9, 0.55, 0.8]):
        sub = root / "clean" / f"spk{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        sf.write(sub / f"u{i}.{'flac' if i == 3 else 'wav'}", speechlike(int(seconds * SR), 120 + 30 * i), SR)
    sf.write(root / "clean" / "u8k.wav", speechlike(4000, 200, 8000), 8000)  # resampled on load
    (root / "noise").mkdir()
    sf.write(root / "noise" / "long.wav", (0.1 * rng.standard_normal(SR)).astype(np.float32), SR)
    sf.write(root / "noise" / "short.wav", (0.1 * rng.standard_normal(1000)).astype(np.float32), SR)  # looped
    (root / "rirs").mkdir()
    rir = np.zeros(400, np.float32)
    rir[5], rir[205] = 0.8, 0.8 * RIR_TAIL  # pre-delay of 5 samples, removed by the direct-path alignment
    sf.write(root / "rirs" / "room.wav", rir, SR, subtype="FLOAT")
    return root


def mixing(dirs, tmp_path=None, **kw):
    kw = {"crop_seconds": 0.3, "manifest_dir": tmp_path, **kw}
    return MixingDataModule(dirs / "clean", dirs / "noise", **kw)


def train_set(dm):
    dm.setup("fit")
    return dm.dataset("train")


def test_same_seed_epoch_index_same_mixture_in_any_process(dirs, tmp_path):
    ds = train_set(mixing(dirs, tmp_path, seed=3))
    n = len(ds)
    assert n == 7  # one mixture per clean file, found recursively (wav + flac)
    a, b = ds[2], train_set(mixing(dirs, tmp_path, seed=3))[2]
    assert torch.equal(a["noisy"], b["noisy"]) and torch.equal(a["clean"], b["clean"])
    assert not torch.equal(a["noisy"], ds[2 + n]["noisy"])  # epoch 1: another mixture
    assert not torch.equal(a["noisy"], train_set(mixing(dirs, tmp_path, seed=4))[2]["noisy"])
    # worker processes produce exactly what the main process does
    in_main = next(iter(mixing(dirs, tmp_path, seed=3, batch_size=3).train_dataloader()))
    dm = mixing(dirs, tmp_path, seed=3, batch_size=3, num_workers=2)
    in_workers = next(iter(dm.train_dataloader()))
    assert torch.equal(in_main["noisy"], in_workers["noisy"]) and in_main["names"] == in_workers["names"]


def test_mixture_snr_is_the_drawn_snr(dirs):
    ds = train_set(mixing(dirs, snr_range=(-5.0, 20.0), gain_db_range=(-20.0, 20.0)))
    drawn = []
    for i in range(3 * len(ds)):
        item = ds[i]
        speech, noise = item["clean"].double(), (item["noisy"] - item["clean"]).double()
        measured = 10 * torch.log10(speech.pow(2).sum() / noise.pow(2).sum())
        assert abs(measured.item() - item["snr_db"]) < 1e-3, (i, measured, item["snr_db"])
        assert item["noisy"].abs().max() <= 0.99 + 1e-6  # loud gains are scaled back, not clipped
        assert len(item["noisy"]) == item["length"] <= int(0.3 * SR)
        drawn.append(item["snr_db"])
    assert -5 <= min(drawn) and max(drawn) <= 20 and np.ptp(drawn) > 5


def test_random_polarity_inverts_some_mixtures_and_changes_no_other_draw(dirs):
    plain = train_set(mixing(dirs, seed=5))
    flipped = train_set(mixing(dirs, seed=5, random_polarity=True))
    signs = []
    for i in range(2 * len(plain)):
        x, y = plain[i], flipped[i]
        sign = 1 if torch.equal(y["noisy"], x["noisy"]) else -1
        assert torch.equal(y["noisy"], sign * x["noisy"]) and torch.equal(y["clean"], sign * x["clean"])
        assert y["snr_db"] == x["snr_db"]
        signs.append(sign)
    assert set(signs) == {1, -1}
    with pytest.raises(ValueError, match="data.random_polarity"):
        mixing(dirs, random_polarity="no")


def test_reverberation_convolves_the_speech_with_an_impulse_response(dirs):
    kw = dict(rir_dir=dirs / "rirs", gain_db_range=(0.0, 0.0), seed=1)
    dry = train_set(mixing(dirs, **kw))
    wet = train_set(mixing(dirs, rir_prob=1.0, **kw))
    for i in range(3):
        d, w = dry[i], wet[i]
        assert not d["reverberant"] and w["reverberant"]
        expected = d["clean"].clone()
        expected[200:] += RIR_TAIL * d["clean"][:-200]  # direct path aligned to 0 at unit gain
        torch.testing.assert_close(w["clean"], expected, atol=1e-6, rtol=1e-5)
    # dereverberation: the target is the dry speech, the input still reverberant
    derev = train_set(mixing(dirs, rir_prob=1.0, dereverberate=True, **kw))[0]
    torch.testing.assert_close(derev["clean"], dry[0]["clean"], atol=1e-7, rtol=0)
    # a probability in between reverberates some mixtures only
    some = train_set(mixing(dirs, rir_prob=0.5, **kw))
    flags = {some[i]["reverberant"] for i in range(4 * len(some))}
    assert flags == {True, False}


def rank_indices(dm, rank, epoch):
    """What Lightning's DDP gives one rank: its sampler wrapped in a DistributedSamplerWrapper."""
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # created as Lightning does, so it can be re-instantiated
    sampler = _get_distributed_sampler(
        loader, shuffle=True, overfit_batches=0, mode=RunningStage.TRAINING, num_replicas=2, rank=rank
    )
    loader = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    _set_sampler_epoch(loader, epoch)
    return loader, [i for batch in loader.batch_sampler for i in batch]


@pytest.mark.parametrize("bucket", [False, True])
def test_ddp_ranks_see_disjoint_mixtures(dirs, tmp_path, bucket):
    kw = dict(crop_seconds=None, bucket=True) if bucket else {}
    dm = mixing(dirs, tmp_path, epoch_size=12, batch_size=2, **kw)
    dm.setup("fit")
    for epoch in (0, 1):
        (loader0, rank0), (loader1, rank1) = rank_indices(dm, 0, epoch), rank_indices(dm, 1, epoch)
        assert isinstance(loader0.batch_sampler, BucketBatchSampler) == bucket
        assert len(rank0) == len(rank1) == 6 and not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == [epoch * 12 + i for i in range(12)]  # the epoch reaches the dataset
        batch0, batch1 = next(iter(loader0)), next(iter(loader1))
        assert not torch.equal(batch0["noisy"][:, :100], batch1["noisy"][:, :100])


def test_validation_and_test_are_fixed_whole_utterance_sets(dirs, tmp_path):
    dm = mixing(dirs, tmp_path, n_val=4, n_test=3)
    dm.setup()
    val = dm.val_dataloader()
    first = [b["noisy"] for b in val]
    _set_sampler_epoch(val, 5)
    assert all(torch.equal(a, b["noisy"]) for a, b in zip(first, val))
    assert len(first) == 4 and len(list(dm.test_dataloader())) == 3
    lengths = sorted(int(b["lengths"]) for b in val)
    assert max(lengths) > int(0.3 * SR)  # not cropped
    test_names = [b["names"][0] for b in dm.test_dataloader()]
    assert [b["names"][0] for b in val][:3] != test_names  # another seed, another set


def test_validation_from_a_paired_folder(dirs, tmp_path):
    root = write_pair_tree(tmp_path / "pairs", splits=("val", "test"), n=2)
    dm = mixing(dirs, val_root=root)
    dm.setup("validate")
    names = [b["names"][0] for b in dm.val_dataloader()]
    assert names == ["u0.wav", "u1.wav"]


def test_bad_settings_are_clear_errors(dirs, tmp_path):
    with pytest.raises(DataError, match=r"data.clean_dir=.*nowhere: directory not found"):
        train_set(MixingDataModule(tmp_path / "nowhere", dirs / "noise"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data.noise_dir=.*empty: no .wav/.flac files"):
        train_set(MixingDataModule(dirs / "clean", tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"data.rir_prob=0.5 needs data.rir_dir"):
        MixingDataModule(dirs / "clean", dirs / "noise", rir_prob=0.5)
    with pytest.raises(ValueError, match=r"data.snr_range must be \[low, high\]"):
        MixingDataModule(dirs / "clean", dirs / "noise", snr_range=(10, 0))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.wav").write_bytes(b"not audio")
    with pytest.raises(DataError, match=r"broken/x\.wav: unreadable audio file"):
        train_set(MixingDataModule(tmp_path / "broken", dirs / "noise"))


def test_dfl_train_on_mixtures_with_bucketed_batches(tmp_path):
    root = tmp_path / "data"
    (root / "clean").mkdir(parents=True)
    (root / "noise").mkdir()
    for i, seconds in enumerate([1.0, 1.2, 1.1, 1.3]):
        sf.write(root / "clean" / f"u{i}.wav", 4 * speechlike(int(seconds * SR), 130 + 40 * i), SR)
    sf.write(root / "noise" / "n.wav", (0.05 * np.random.default_rng(1).standard_normal(SR)).astype(np.float32), SR)
    run_dir = tmp_path / "run"
    model_and_trainer = [o for o in TINY if not o.startswith("data.")]
    dfl_train(
        "data=mix", f"data.clean_dir={root / 'clean'}", f"data.noise_dir={root / 'noise'}", "data.crop_seconds=null",
        "data.bucket=true", "data.batch_size=2", "data.n_val=2", "data.n_test=2", "data.num_workers=0",
        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}", *model_and_trainer,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["enhanced"]["si_sdr"]) and np.isfinite(metrics["noisy"]["si_sdr"])
    assert "train/loss" in (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert list((tmp_path / "cache" / "manifests").glob("clean-*.json"))
