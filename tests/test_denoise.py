"""`dfl-denoise` on folder trees: formats, rates, channels, refusal, atomicity, bad files."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dfl import Denoiser, denoise_files
from dfl.cli.denoise import main
from tests.helpers.small_denoisers import BATCH_STATS, saved_denoiser

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def noise(frames: int, channels: int, seed: int) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal((frames, channels))).astype(np.float32)


# relative path → (sample rate, channels, format, subtype)
TREE = {
    "a.wav": (16_000, 1, "WAV", "PCM_16"),
    "sub/b.flac": (44_100, 2, "FLAC", "PCM_24"),
    "sub/deep/c.ogg": (8_000, 1, "OGG", "VORBIS"),
    "d.wav": (22_050, 3, "WAV", "FLOAT"),
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return saved_denoiser(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "in"
    for i, (rel, (sr, ch, fmt, subtype)) in enumerate(TREE.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, noise(int(0.4 * sr), ch, i), sr, format=fmt, subtype=subtype)
    (root / "notes.txt").write_text("not audio")
    return root


def test_tree_keeps_paths_rates_channels_and_formats(tree, tmp_path, model_path, capsys):
    out = tmp_path / "out"
    assert main([str(tree), "-o", str(out), "--model", str(model_path), "--chunk-seconds", "0.15"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(TREE)
    for rel, (sr, ch, fmt, subtype) in TREE.items():
        src, dst = sf.info(tree / rel), sf.info(out / rel)
        assert (dst.samplerate, dst.channels, dst.format, dst.subtype) == (sr, ch, fmt, subtype)
        assert dst.frames == src.frames
    # values: what the Python API gives (float output, so no quantisation)
    data, sr = sf.read(tree / "d.wav", dtype="float32", always_2d=True)
    expected = Denoiser.from_checkpoint(model_path, chunk_seconds=0)(data.T, sr)
    got, _ = sf.read(out / "d.wav", dtype="float32", always_2d=True)
    np.testing.assert_allclose(got.T, expected, atol=1e-4)
    assert not np.allclose(got, data, atol=1e-3)
    summary = capsys.readouterr().out
    assert "denoised 4 file(s)" in summary and "real-time factor" in summary and "0 failed" in summary


def test_globs_and_single_files(tree, tmp_path, model_path):
    out = tmp_path / "out"
    pattern = str(tree / "**" / "*.flac")
    assert main([pattern, str(tree / "a.wav"), "-o", str(out), "--model", str(model_path), "--quiet"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["a.wav", "sub/b.flac"]


def test_chunked_cli_matches_whole_file(tree, tmp_path, model_path):
    args = [str(tree / "d.wav"), "--model", str(model_path), "--quiet"]
    assert main([*args, "-o", str(tmp_path / "whole"), "--chunk-seconds", "0"]) == 0
    assert main([*args, "-o", str(tmp_path / "chunked"), "--chunk-seconds", "0.13", "--batch-size", "2"]) == 0
    whole, _ = sf.read(tmp_path / "whole" / "d.wav")
    chunked, _ = sf.read(tmp_path / "chunked" / "d.wav")
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("outdir", [".", "sub/.."])
def test_refuses_to_overwrite_inputs(tree, model_path, capsys, outdir):
    before = snapshot(tree)
    assert main([str(tree), "-o", str(tree / outdir), "--model", str(model_path)]) == 2
    assert "overwrite an input" in capsys.readouterr().err
    assert snapshot(tree) == before


def test_existing_outputs_are_kept_unless_the_user_says_otherwise(tree, tmp_path, model_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "b.flac").write_bytes(b"the user's own file")
    mine = snapshot(out)
    args = [str(tree), "-o", str(out), "--model", str(model_path), "--quiet"]

    assert main(args) == 2  # refused: nothing written, the user's file untouched
    err = capsys.readouterr().err
    assert "1 output(s) already exist" in err and str(out / "sub" / "b.flac") in err and "--overwrite" in err
    assert snapshot(out) == mine

    # --skip-existing keeps it and denoises the rest (resuming an interrupted run)
    assert main([*args, "--skip-existing"]) == 0
    assert "denoised 3 file(s)" in capsys.readouterr().out
    assert (out / "sub" / "b.flac").read_bytes() == b"the user's own file"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(TREE)
    first = snapshot(out)

    # all there: nothing to do, nothing rewritten
    assert main([*args, "--skip-existing"]) == 0
    assert "nothing to denoise: all 4 output(s) already exist" in capsys.readouterr().out
    assert snapshot(out) == first

    # --overwrite replaces them all, the user's file with a real denoised FLAC
    assert main([*args, "--overwrite"]) == 0
    assert "denoised 4 file(s)" in capsys.readouterr().out
    assert sf.info(out / "sub" / "b.flac").format == "FLAC"
    for rel in TREE:  # the others written again with the same audio (to float rounding: threads may sum
        assert (out / rel).read_bytes() != b"the user's own file"  # in another order; Ogg gets new serials)
        if rel != "sub/b.flac" and not rel.endswith(".ogg"):
            again, before = sf.read(out / rel)[0], sf.read(io.BytesIO(first[rel]))[0]
            assert again.shape == before.shape and np.allclose(again, before, rtol=0, atol=1e-6)

    with pytest.raises(SystemExit) as exc:
        main([*args, "--overwrite", "--skip-existing"])
    assert exc.value.code == 2


def test_bad_files_are_reported_and_skipped(tree, tmp_path, model_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    sf.write(bad / "empty.wav", np.zeros((0, 1), np.float32), 16_000)
    (bad / "garbage.wav").write_bytes(b"RIFF not really a wave file" * 10)
    with_nan = noise(1000, 1, 9)
    with_nan[10] = np.nan
    sf.write(bad / "nan.wav", with_nan, 16_000, subtype="FLOAT")
    sf.write(bad / "good.wav", noise(4000, 1, 10), 16_000)
    out = tmp_path / "out"
    assert main([str(bad), str(tmp_path / "missing.wav"), "-o", str(out), "--model", str(model_path)]) == 1
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["good.wav"]
    captured = capsys.readouterr()
    report = captured.out + captured.err
    for name in ("empty.wav", "garbage.wav", "nan.wav", "missing.wav"):
        assert str(bad / name) in report or str(tmp_path / name) in report
    assert "4 failed" in captured.out


@pytest.mark.parametrize("chunk_seconds", ["0", "0.15"], ids=["whole", "streaming"])
def test_a_failed_write_leaves_no_partial_file(tree, tmp_path, model_path, monkeypatch, chunk_seconds):
    real_write, real_block_write = sf.write, sf.SoundFile.write

    def write_half_then_fail(file, data, *args, **kwargs):
        real_write(file, data[: len(data) // 2], *args, **kwargs)
        raise OSError("disk full (simulated)")

    def write_one_block_then_fail(self, data):
        if self.tell() > 0:  # some audio is already in the file
            raise OSError("disk full (simulated)")
        real_block_write(self, data)

    monkeypatch.setattr(sf, "write", write_half_then_fail)
    monkeypatch.setattr(sf.SoundFile, "write", write_one_block_then_fail)
    monkeypatch.setattr(denoise_files, "BLOCK_FRAMES", 1000)
    out = tmp_path / "out"
    args = [str(tree / "a.wav"), "-o", str(out), "--model", str(model_path), "--quiet", "--chunk-seconds", chunk_seconds]
    assert main(args) == 1
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_nan_found_mid_stream_leaves_no_partial_file(tmp_path, model_path, monkeypatch, capsys):
    data = noise(30_000, 1, 11)
    data[25_000] = np.nan  # found after several blocks were denoised and written
    sf.write(tmp_path / "late_nan.wav", data, 16_000, subtype="FLOAT")
    monkeypatch.setattr(denoise_files, "BLOCK_FRAMES", 2000)
    out = tmp_path / "out"
    args = [str(tmp_path / "late_nan.wav"), "-o", str(out), "--model", str(model_path), "--chunk-seconds", "0.1"]
    assert main(args) == 1
    assert [p for p in out.rglob("*") if p.is_file()] == []
    summary = capsys.readouterr().out
    assert f"{tmp_path / 'late_nan.wav'}: audio contains NaN" in summary
    assert "denoised 0 file(s)" in summary and "(no audio denoised)" in summary and "nan)" not in summary


@pytest.fixture(scope="module")
def wide_model_path(tmp_path_factory) -> Path:
    # receptive field 1025 samples: chunks need real context from their neighbours
    return saved_denoiser(tmp_path_factory.mktemp("wide") / "model.pt", dilations=[1, 2, 4, 8, 16, 32, 64, 128, 256, 1])


@pytest.mark.parametrize(
    "rate, channels, frames",
    [(16_000, 1, 24_000), (44_100, 2, 61_237), (16_000, 1, 23_456)],
    ids=["16k_mono", "44k1_stereo", "length_not_a_block_multiple"],
)
def test_streamed_files_match_whole_file_processing(tmp_path, wide_model_path, monkeypatch, rate, channels, frames):
    source = tmp_path / "in" / "x.wav"
    source.parent.mkdir()
    sf.write(source, noise(frames, channels, 12), rate, subtype="FLOAT")
    writes = []
    real_block_write = sf.SoundFile.write
    monkeypatch.setattr(sf.SoundFile, "write", lambda self, data: writes.append(len(data)) or real_block_write(self, data))
    monkeypatch.setattr(denoise_files, "BLOCK_FRAMES", 4000 if frames % 4000 == 0 else 3000)
    out = tmp_path / "out"
    args = [str(source), "-o", str(out), "--model", str(wide_model_path), "--quiet", "--chunk-seconds", "0.05"]
    assert main(args) == 0
    assert len(writes) >= 4 and sum(writes) == frames  # written block by block, not at once
    got, sr = sf.read(out / "x.wav", dtype="float32", always_2d=True)
    assert sr == rate and got.shape == (frames, channels)
    data, _ = sf.read(source, dtype="float32", always_2d=True)
    expected = Denoiser.from_checkpoint(wide_model_path, chunk_seconds=0)(data.T, rate)
    np.testing.assert_allclose(got.T, expected, atol=1e-4, rtol=0)
    assert not np.allclose(got, data, atol=1e-3)


def test_batch_statistics_model_says_it_processes_whole_files(tree, tmp_path, capsys):
    model = saved_denoiser(tmp_path / "authors.pt", **BATCH_STATS)
    assert main([str(tree / "a.wav"), "-o", str(tmp_path / "out"), "--model", str(model), "--quiet"]) == 0
    assert "batch statistics" in capsys.readouterr().err


def test_bad_arguments(tree, tmp_path, capsys):
    assert main([str(tree), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert main([str(tmp_path / "empty_dir_missing"), "-o", str(tmp_path / "out"), "--model", "x"]) == 2


# careless input (issue 26): link loops, outputs inside inputs, output targets, interruptions


@pytest.mark.timeout(60)
def test_recursive_glob_visits_each_real_folder_once(tmp_path, model_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "x.wav", noise(800, 1, 1), 16_000)
    sf.write(root / "sub" / "y.wav", noise(800, 1, 2), 16_000)
    (root / "self").symlink_to(".")  # one loop
    jobs, errors = denoise_files.collect_jobs([str(root / "**" / "*.wav")])
    assert errors == [] and [job.relative.as_posix() for job in jobs] == ["sub/y.wav", "x.wav"]

    out = tmp_path / "out"
    assert main([str(root / "**" / "*.wav"), "-o", str(out), "--model", str(model_path), "--quiet"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["sub/y.wav", "x.wav"]

    (root / "sub" / "back").symlink_to("..")  # a second loop: glob.glob never ends here
    (root / "also").symlink_to("sub")  # a second way into sub: listed once
    jobs, errors = denoise_files.collect_jobs([str(root / "**" / "*.wav"), str(root)])
    assert errors == []
    assert [job.relative.as_posix() for job in jobs] == ["also/y.wav", "x.wav", "sub/y.wav", "x.wav"]
    assert len({job.source.resolve() for job in jobs[:2]}) == 2


@pytest.mark.timeout(60)
def test_glob_follows_links_to_other_folders_and_keeps_glob_rules(tmp_path):
    data, root = tmp_path / "data", tmp_path / "in"
    (data / "deep").mkdir(parents=True)
    root.mkdir()
    for rel in ("deep/a.wav", "deep/.hidden.wav", "b.flac"):
        sf.write(data / rel, noise(400, 1, 3), 16_000)
    (root / "linked").symlink_to(data)
    (data / "deep" / "loop").symlink_to(root)
    got = [p.relative_to(root).as_posix() for p in denoise_files.expand_glob(str(root / "**" / "*.wav"))]
    assert got == ["linked/deep/a.wav"]  # hidden names skipped, as glob does
    got = [p.relative_to(root).as_posix() for p in denoise_files.expand_glob(str(root / "linked" / "**"))]
    assert got == ["linked/b.flac", "linked/deep/a.wav"]
    assert denoise_files.expand_glob(str(root / "*" / "*.flac")) == [root / "linked" / "b.flac"]


def test_output_folder_inside_the_input_folder_is_never_read_as_input(tree, model_path, capsys):
    out = tree / "denoised"
    args = [str(tree), "-o", str(out), "--model", str(model_path), "--quiet"]
    assert main(args) == 0
    first = snapshot(out)
    assert sorted(first) == sorted(TREE)
    assert main([*args, "--skip-existing"]) == 0  # resumes: the outputs are not inputs
    assert "nothing to denoise: all 4 output(s) already exist" in capsys.readouterr().out
    assert snapshot(out) == first
    glob_args = [str(tree / "**" / "*.wav"), "-o", str(out), "--model", str(model_path), "--quiet", "--skip-existing"]
    assert main(glob_args) == 0 and snapshot(out) == first


@pytest.mark.parametrize("where", ["file", "under a file", "output folder is a file"])
def test_unusable_output_targets_are_refused_before_the_model_loads(tree, tmp_path, model_path, monkeypatch, capsys, where):
    monkeypatch.setattr(Denoiser, "from_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file")
    out = {"file": blocker, "under a file": blocker / "out", "output folder is a file": tmp_path / "out"}[where]
    if where == "output folder is a file":
        out.mkdir()
        (out / "sub").write_text("not a folder")  # sub/b.flac cannot go here
    assert main([str(tree), "-o", str(out), "--model", str(model_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refusing to run" in err and str(out) in err
    assert (tree / "sub" / "b.flac").as_posix() in err if where == "output folder is a file" else str(blocker) in err
    assert blocker.read_text() == "the user's file"


def test_failures_name_the_input_and_the_output(tree, tmp_path, model_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise OSError(20, "Not a directory")

    monkeypatch.setattr(denoise_files, "atomic_write", fail)
    monkeypatch.setattr(denoise_files, "write_audio", fail)
    out = tmp_path / "out"
    assert main([str(tree / "a.wav"), str(tree / "d.wav"), "-o", str(out), "--model", str(model_path), "--quiet"]) == 1
    report = capsys.readouterr().out
    for name in ("a.wav", "d.wav"):
        assert f"{tree / name}: [Errno 20] Not a directory (output {out / name})" in report


def test_stale_part_files_of_a_killed_run_are_removed(tree, tmp_path, model_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    stale = [out / ".a.wav.k3j_9xq0.part", out / "sub" / ".b.flac.abcdefgh.part"]
    foreign = [out / ".notes.txt.abcdefgh.part", out / "a.wav.abcdefgh.part", out / ".a.wav.part"]
    for path in stale + foreign:
        path.write_bytes(b"half a file")
    assert main([str(tree), "-o", str(out), "--model", str(model_path), "--quiet"]) == 0
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"half a file" for p in foreign)  # not ours: kept


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum, code, what", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_stop_cleanly(tmp_path, model_path, signum, code, what):
    source = tmp_path / "long.wav"
    sf.write(source, noise(16_000 * 60, 1, 4), 16_000)  # about 4 s of work with 20 ms chunks
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dfl.cli.denoise", str(source), "-o", str(out), "--model", str(model_path),
           "--quiet", "--chunk-seconds", "0.02"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while not list(out.glob(".long.wav.*.part")):  # wait until it is writing
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no .part file appeared"
        time.sleep(0.02)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and "--skip-existing" in lines[0]
    assert list(out.iterdir()) == []  # neither the .part nor a partial output
