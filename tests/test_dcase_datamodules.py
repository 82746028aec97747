"""DCASE 2016 pretraining data: TUT / CHiME-Home parsing, crops, datamodule, synthetic set."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.dcase2016 import (
    SCENES,
    CHiMEHomeDataset,
    CropCollate,
    DCASE2016DataModule,
    TUTScenesDataset,
    log_uniform_length,
    parse_chime_split,
    parse_majority_vote,
    parse_tut_meta,
)
from datamodules.paired_folder import DataError
from datamodules.synthetic_scenes import MARKER, SCENE_RECIPES, generate_synthetic_dcase

SR_TUT = 44_100


# ------------------------------------------------------------------------------------ layouts
def make_tut(directory, clips: dict[str, str], seconds: float = 0.1, sr: int = SR_TUT):
    """A TUT set: stereo clips (left = 440 Hz sine, right = silence) and their meta.txt."""
    n = int(seconds * sr)
    left = 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)
    for name in clips:
        (directory / "audio").mkdir(parents=True, exist_ok=True)
        sf.write(directory / "audio" / name, np.stack([left, np.zeros(n)], axis=1), sr)
    (directory / "meta.txt").write_text(
        "".join(f"audio/{name}\t{scene}\ta1\n" for name, scene in clips.items())
    )
    return directory


def make_chime(directory, chunks: dict[str, str], split="development_chunks_refined.csv", seconds=0.25):
    """A CHiME-Home split: ``{chunk: majority vote}``, 16 kHz mono audio."""
    (directory / "chunks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (chunk, vote) in enumerate(chunks.items()):
        sf.write(directory / "chunks" / f"{chunk}.16kHz.wav", np.full(int(seconds * 16000), 0.1), 16000)
        (directory / "chunks" / f"{chunk}.csv").write_text(
            f"segmentname,{chunk}\nannotator_a,{vote}\nannotator_b,{vote}\nmajorityvote,{vote}\n"
        )
        rows.append(f"{i},{chunk}\n")
    (directory / split).write_text("".join(rows))
    return directory


# --------------------------------------------------------------------------------------- TUT
def test_tut_meta_parsed_and_stereo_split_into_resampled_channels(tmp_path):
    d = make_tut(tmp_path / "tut", {"a.wav": "beach", "b.wav": "tram"})
    assert parse_tut_meta(d / "meta.txt") == [
        (d / "audio/a.wav", 0),
        (d / "audio/b.wav", SCENES.index("tram")),
    ]
    ds = TUTScenesDataset(d)
    assert len(ds) == 4  # two stereo clips, every channel an example
    left, right = ds[0], ds[1]
    assert left["wav"].dtype == np.float32 and len(left["wav"]) == 1600  # 0.1 s at 16 kHz
    assert left["scene"] == right["scene"] == 0 and left["task"] == 0
    assert np.abs(left["wav"]).max() > 0.3 and np.abs(right["wav"]).max() == 0  # distinct channels
    assert ds[2]["scene"] == SCENES.index("tram")


@pytest.mark.parametrize(
    "meta, message",
    [
        (
            "audio/a.wav\tbeach\naudio/missing.wav\tbeach\n",
            r"meta\.txt:2: audio file .*missing\.wav not found",
        ),
        ("audio/a.wav\tjungle\n", r"meta\.txt:1: unknown scene label 'jungle'"),
        ("audio/a.wav beach\n", r"meta\.txt:1: expected 'audio/<file>\.wav<TAB><scene>'"),
        ("\n\n", r"meta\.txt: empty split"),
    ],
)
def test_tut_meta_errors_name_file_and_line(tmp_path, meta, message):
    d = make_tut(tmp_path / "tut", {"a.wav": "beach"})
    (d / "meta.txt").write_text(meta)
    with pytest.raises(DataError, match=message):
        TUTScenesDataset(d)


def test_tut_missing_meta_file(tmp_path):
    with pytest.raises(DataError, match=r"meta\.txt: TUT meta file not found"):
        parse_tut_meta(tmp_path / "meta.txt")


# ------------------------------------------------------------------------------------- CHiME
def test_chime_split_parsed_with_silence_and_tags(tmp_path):
    d = make_chime(tmp_path / "chime", {"ch0": "cp", "ch1": "S", "ch2": "mfvboU"})
    items = parse_chime_split(d / "development_chunks_refined.csv")
    assert [p.name for p, _ in items] == ["ch0.16kHz.wav", "ch1.16kHz.wav", "ch2.16kHz.wav"]
    np.testing.assert_array_equal(items[0][1], [1, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(items[1][1], np.zeros(7))
    np.testing.assert_array_equal(items[2][1], [0, 1, 1, 1, 0, 1, 1])
    ds = CHiMEHomeDataset(d, "development_chunks_refined.csv")
    ex = ds[0]
    assert len(ds) == 3 and ex["scene"] == -1 and ex["task"] == 1 and len(ex["wav"]) == 4000
    np.testing.assert_array_equal(ex["tags"], items[0][1])


@pytest.mark.parametrize(
    "chunk_csv, message",
    [
        ("segmentname,ch0\nannotator_a,c\n", r"ch0\.csv: chunk without a majority vote"),
        ("segmentname,ch0\nmajorityvote,\n", r"ch0\.csv: chunk without a majority vote"),
        ("majorityvote,cx\n", r"ch0\.csv: unknown tag 'x' in majority vote 'cx'"),
    ],
)
def test_chime_annotation_errors_name_the_chunk_file(tmp_path, chunk_csv, message):
    d = make_chime(tmp_path / "chime", {"ch0": "c"})
    (d / "chunks" / "ch0.csv").write_text(chunk_csv)
    with pytest.raises(DataError, match=message):
        parse_chime_split(d / "development_chunks_refined.csv")


def test_chime_split_errors_name_file_and_line(tmp_path):
    d = make_chime(tmp_path / "chime", {"ch0": "c", "ch1": "m"})
    split = d / "development_chunks_refined.csv"
    (d / "chunks" / "ch1.16kHz.wav").unlink()
    with pytest.raises(DataError, match=r"refined\.csv:2: chunk 'ch1' has no audio file .*ch1\.16kHz\.wav"):
        parse_chime_split(split)
    (d / "chunks" / "ch1.csv").unlink()
    with pytest.raises(DataError, match=r"refined\.csv:2: chunk 'ch1' has no annotation file .*ch1\.csv"):
        parse_chime_split(split)
    split.write_text("0,ch0\n1;ch1\n")
    with pytest.raises(DataError, match=r"refined\.csv:2: expected '<index>,<chunk>'"):
        parse_chime_split(split)
    split.write_text("\n")
    with pytest.raises(DataError, match=r"refined\.csv: empty split"):
        parse_chime_split(split)
    with pytest.raises(DataError, match=r"nope\.csv: CHiME-Home split file not found"):
        parse_chime_split(d / "nope.csv")
    with pytest.raises(DataError, match=r"ch9\.csv: chunk annotation file not found"):
        parse_majority_vote(d / "chunks" / "ch9.csv")


# ------------------------------------------------------------------------------------- crops
def _examples(lengths):
    return [
        {"wav": np.arange(n, dtype=np.float32), "scene": i % 15, "tags": np.zeros(7, np.float32), "task": 0}
        for i, n in enumerate(lengths)
    ]


def test_random_crop_lengths_are_log_uniform_within_bounds():
    torch.manual_seed(0)
    collate = CropCollate(min_length=100, random=True)
    lengths = []
    for _ in range(2000):
        batch = collate(_examples([10_000, 12_000]))
        length = batch["wav"].shape[1]
        assert 100 <= length <= 10_000  # between the minimum and the shortest clip of the batch
        start = int(batch["wav"][0, 0])  # the crop is a contiguous piece of the clip
        torch.testing.assert_close(batch["wav"][0], torch.arange(start, start + length, dtype=torch.float32))
        lengths.append(length)
    lengths = np.array(lengths)
    # log-uniform on [100, 10000]: half the mass below the geometric mean 1000, a quarter below ~316
    assert abs((lengths < 1000).mean() - 0.5) < 0.05
    assert abs((lengths < 316).mean() - 0.25) < 0.05
    assert lengths.min() < 110 and lengths.max() > 9000


def test_crop_bounds_short_clips_cap_and_validation_centre():
    torch.manual_seed(0)
    # clips shorter than the minimum (the 15-layer network's 65 535 samples vs CHiME-Home's 64 000) are still
    # cropped: lengths log-uniform in [fraction·shortest, shortest], at random offsets
    collate = CropCollate(min_length=65_535)
    assert collate.length_bounds(64_000) == (32_000, 64_000)
    assert CropCollate(min_length=65_535, short_clip_fraction=0.25).length_bounds(64_000) == (16_000, 64_000)
    assert collate.length_bounds(100_000) == (65_535, 100_000)
    lengths, starts = set(), set()
    for _ in range(200):
        batch = CropCollate(min_length=500)(_examples([300, 400]))
        length = batch["wav"].shape[1]
        assert 150 <= length <= 300
        start = int(batch["wav"][1, 0])
        torch.testing.assert_close(batch["wav"][1], torch.arange(start, start + length, dtype=torch.float32))
        lengths.add(length)
        starts.add(start)
    assert len(lengths) > 50 and len(starts) > 50 and min(lengths) < 170 and max(lengths) > 280
    with pytest.raises(ValueError, match="short_clip_fraction"):
        CropCollate(10, short_clip_fraction=0)
    for _ in range(50):
        assert 100 <= CropCollate(100, max_length=200)(_examples([1000]))["wav"].shape[1] <= 200
    val = CropCollate(random=False)(_examples([10, 14]))
    torch.testing.assert_close(val["wav"][1], torch.arange(2, 12, dtype=torch.float32))  # centred
    assert val["is_scene"].all() and not val["is_tags"].any()
    with pytest.raises(ValueError, match="max_length"):
        CropCollate(100, max_length=50)
    for lo, hi in ((5, 5), (1, 2)):
        assert lo <= log_uniform_length(lo, hi) <= hi
    with pytest.raises(ValueError):
        log_uniform_length(10, 5)


# -------------------------------------------------------------------------------- datamodule
@pytest.fixture()
def dcase_root(tmp_path):
    make_tut(tmp_path / "TUT-acoustic-scenes-2016-development", {f"d{i}.wav": SCENES[i] for i in range(5)})
    make_tut(tmp_path / "TUT-acoustic-scenes-2016-evaluation", {f"e{i}.wav": SCENES[i] for i in range(3)})
    chime = tmp_path / "chime_home"
    make_chime(chime, {f"dev{i}": "cm"[i % 2] for i in range(6)})
    make_chime(chime, {f"eva{i}": "S" for i in range(4)}, split="evaluation_chunks_refined.csv")
    return tmp_path


def test_datamodule_alternate_gives_one_batch_per_task(dcase_root):
    dm = DCASE2016DataModule(dcase_root, batch_size=4, min_crop_length=255)
    dm.setup("fit")
    loaders = dm.train_dataloader()
    assert set(loaders) == {"scene", "tags"}
    scene, tags = next(iter(loaders["scene"])), next(iter(loaders["tags"]))
    assert scene["is_scene"].all() and (scene["scene"] >= 0).all() and scene["wav"].shape[0] == 4
    assert tags["is_tags"].all() and (tags["scene"] == -1).all() and tags["tags"].shape == (4, 7)
    assert 255 <= scene["wav"].shape[1] <= 1600 and 255 <= tags["wav"].shape[1] <= 4000
    val_scene, val_tags = dm.val_dataloader()
    assert len(val_scene.dataset) == 6 and len(val_tags.dataset) == 4  # eval sets: 3 stereo clips, 4 chunks
    assert next(iter(val_scene))["wav"].shape[1] == 1600  # whole clips


def test_datamodule_mixed_batches_hold_both_tasks(dcase_root):
    torch.manual_seed(0)
    dm = DCASE2016DataModule(dcase_root, mode="mixed", batch_size=16, min_crop_length=255)
    batch = next(iter(dm.train_dataloader()))
    assert batch["is_scene"].sum() == 10 and batch["is_tags"].sum() == 6
    assert (batch["scene"][batch["is_tags"]] == -1).all()
    with pytest.raises(ValueError, match="data.mode"):
        DCASE2016DataModule(dcase_root, mode="interleaved")


# ---------------------------------------------------------------------------------- synthetic
SMALL = dict(
    seed=3, scenes_train_per_class=1, scenes_val_per_class=1, scene_seconds=0.3, chunks_train=12,
    chunks_val=4, chunk_seconds=0.5, tag_probability=0.4, sample_rate=16000,
)  # fmt: skip


def test_synthetic_set_is_deterministic_cached_and_readable(tmp_path):
    a = generate_synthetic_dcase(tmp_path / "a", **SMALL)
    b = generate_synthetic_dcase(tmp_path / "b", **SMALL)
    c = generate_synthetic_dcase(tmp_path / "c", **{**SMALL, "seed": 4})
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != MARKER)
    assert len(files) == 15 * 2 + 2 + (12 + 4) * 2 + 2  # scene wavs, 2 metas, chunk wav+csv, 2 splits
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / files[0]).read_bytes() != (c / files[0]).read_bytes()
    mtime = (a / MARKER).stat().st_mtime_ns
    assert generate_synthetic_dcase(a, **SMALL) == a and (a / MARKER).stat().st_mtime_ns == mtime  # reused

    dm = DCASE2016DataModule(a, batch_size=4)
    dm.setup("fit")
    train = dm.train_sets["scene"]
    assert sorted({scene for _, scene in train.clips}) == list(range(15)) and len(train) == 30
    assert len(dm.val_sets["tags"]) == 4
    votes = np.stack([tags for _, tags in dm.train_sets["tags"].chunks])
    assert 0 < votes.mean() < 1 and votes.shape == (12, 7)
    assert len(SCENE_RECIPES) == 15 and len(set(SCENE_RECIPES.values())) == 15  # 15 distinct recipes


def test_synthetic_set_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a synthetic scene set"):
        generate_synthetic_dcase(tmp_path, **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
