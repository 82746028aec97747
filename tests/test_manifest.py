"""Cached file manifests: header facts, reuse, invalidation on change, atomic cache files."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from datamodules import DataError, PairedAudioDataset, manifest
from datamodules.manifest import manifest_path, scan_audio_dir

OLD = 1_600_000_000  # an mtime safely in the past: not "racily clean"


def write(path, n, sr=16000, channels=1, age=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros((n, channels), np.float32), sr)
    if age:
        os.utime(path, (OLD, OLD))
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "audio"
    write(root / "a.wav", 100)
    write(root / "sub" / "b.flac", 250, sr=8000, channels=2)
    write(root / "sub" / "deeper" / "c.wav", 300)
    (root / "notes.txt").write_text("not audio")
    (root / "._a.wav").write_bytes(b"macOS debris")  # dot-files are skipped
    return root


@pytest.fixture
def header_reads(monkeypatch):
    """Count the header reads (the slow part the manifest avoids)."""
    calls = []
    real = manifest._read_header

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(manifest, "_read_header", counting)
    return calls


def test_scan_lists_audio_with_header_facts(tree):
    flat = scan_audio_dir(tree)
    assert [(e.relpath, e.frames, e.sample_rate, e.channels) for e in flat] == [("a.wav", 100, 16000, 1)]
    deep = scan_audio_dir(tree, recursive=True)
    assert [(e.relpath, e.frames, e.sample_rate, e.channels) for e in deep] == [
        ("a.wav", 100, 16000, 1), ("sub/b.flac", 250, 8000, 2), ("sub/deeper/c.wav", 300, 16000, 1),
    ]
    assert deep[1].path == tree / "sub" / "b.flac" and deep[1].frames_at(16000) == 500


def test_second_scan_reads_no_headers(tree, tmp_path, header_reads):
    cache = tmp_path / "cache"
    first = scan_audio_dir(tree, recursive=True, cache_dir=cache)
    assert len(header_reads) == 3
    written = manifest_path(cache, tree.absolute(), True)
    assert written.is_file() and not list(cache.glob("*.part"))
    assert len(json.loads(written.read_text())["files"]) == 3
    header_reads.clear()
    assert scan_audio_dir(tree, recursive=True, cache_dir=cache) == first
    assert header_reads == []
    # recursive and flat scans are different manifests
    scan_audio_dir(tree, cache_dir=cache)
    assert header_reads == ["a.wav"]


def test_changed_added_and_removed_files_invalidate_only_themselves(tree, tmp_path, header_reads):
    cache = tmp_path / "cache"
    scan_audio_dir(tree, recursive=True, cache_dir=cache)
    header_reads.clear()
    write(tree / "a.wav", 180)  # same mtime as before, other size
    write(tree / "sub" / "new.wav", 40)
    (tree / "sub" / "deeper" / "c.wav").unlink()
    entries = {e.relpath: e.frames for e in scan_audio_dir(tree, recursive=True, cache_dir=cache)}
    assert entries == {"a.wav": 180, "sub/b.flac": 250, "sub/new.wav": 40}
    assert sorted(header_reads) == ["a.wav", "new.wav"]
    header_reads.clear()
    sf.write(tree / "a.wav", np.zeros(180, np.float32), 16000)  # same size, new mtime
    os.utime(tree / "a.wav", (OLD + 10, OLD + 10))
    scan_audio_dir(tree, recursive=True, cache_dir=cache)
    assert header_reads == ["a.wav"]


def test_recently_modified_files_are_reread_until_safely_old(tree, tmp_path, header_reads):
    # A file rewritten within the same clock tick with the same size would look unchanged.
    write(tree / "fresh.wav", 10, age=False)
    cache = tmp_path / "cache"
    scan_audio_dir(tree, cache_dir=cache)
    header_reads.clear()
    scan_audio_dir(tree, cache_dir=cache)
    assert header_reads == ["fresh.wav"]


def test_corrupt_cache_is_rescanned(tree, tmp_path, header_reads):
    cache = tmp_path / "cache"
    scan_audio_dir(tree, cache_dir=cache)
    manifest_path(cache, tree.absolute(), False).write_text("{not json")
    header_reads.clear()
    assert [e.frames for e in scan_audio_dir(tree, cache_dir=cache)] == [100]
    assert header_reads == ["a.wav"]


def test_unreadable_files_are_recorded_then_rejected_by_name(tree, tmp_path):
    (tree / "bad.wav").write_bytes(b"not a wav")
    cache = tmp_path / "cache"
    bad = [e for e in scan_audio_dir(tree, cache_dir=cache) if e.relpath == "bad.wav"][0]
    assert bad.error
    with pytest.raises(DataError, match=r"bad\.wav: unreadable audio file"):
        manifest.require_usable(bad)
    with pytest.raises(DataError, match=r"nowhere: directory not found"):
        scan_audio_dir(tree / "nowhere")


def test_paired_dataset_uses_the_manifest(tmp_path, header_reads):
    for kind in ("noisy", "clean"):
        for i in range(3):
            write(tmp_path / f"trainset_{kind}" / f"u{i}.wav", 200 + i)
    cache = tmp_path / "cache"
    ds = PairedAudioDataset(tmp_path / "trainset_noisy", tmp_path / "trainset_clean", manifest_dir=cache)
    assert [n for _, _, n in ds.pairs] == ds.lengths == [200, 201, 202]
    header_reads.clear()
    PairedAudioDataset(tmp_path / "trainset_noisy", tmp_path / "trainset_clean", manifest_dir=cache)
    assert header_reads == []
    write(tmp_path / "trainset_clean" / "u1.wav", 150)  # the cache must not hide a broken pair
    with pytest.raises(DataError, match=r"u1\.wav: 201 samples .* 150 samples"):
        PairedAudioDataset(tmp_path / "trainset_noisy", tmp_path / "trainset_clean", manifest_dir=cache)
