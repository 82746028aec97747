"""dfl-prepare voicebank / dcase2016 end to end, on tiny archives served from 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dfl.audio import read_audio, resample
from dfl.cli.prepare import main
from dfl.preparation import dcase2016, voicebank
from dfl.preparation.steps import ArchiveSpec, read_checksums, with_checksums
from tests.helpers.local_http_server import serve

RNG = np.random.default_rng(7)


def wav_bytes(wav: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav.T if wav.ndim == 2 else wav, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def write_checksums(served: Path) -> Path:
    sums = served.parent / "checksums.md5"
    sums.write_text("".join(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}\n"
                            for p in sorted(served.iterdir())))
    return sums


# ---------------------------------------------------------------- VoiceBank-DEMAND

VB_TRAIN = ["p226_001", "p226_002", "p230_001", "p230_002", "p231_001", "p287_001"]
VB_TEST = ["p232_001", "p257_001"]


@pytest.fixture(scope="module")
def voicebank_archives(tmp_path_factory):
    served = tmp_path_factory.mktemp("vb") / "served"
    served.mkdir()
    originals = {}
    for split, folder_fmt, names in (("train", "{}_trainset_28spk_wav", VB_TRAIN), ("test", "{}_testset_wav", VB_TEST)):
        clean = {n: (0.3 * np.sin(np.arange(4800) * (0.01 + 0.002 * i))).astype(np.float32)
                 for i, n in enumerate(names)}
        noisy = {n: (c + 0.05 * RNG.standard_normal(c.size)).astype(np.float32) for n, c in clean.items()}
        for kind, wavs in (("clean", clean), ("noisy", noisy)):
            folder = folder_fmt.format(kind)
            write_zip(served / f"{folder}.zip", {f"{folder}/{n}.wav": wav_bytes(w, 48_000) for n, w in wavs.items()})
            originals.update({(split, kind, n): w for n, w in wavs.items()})
    return served, write_checksums(served), originals


def run_voicebank(url, root, sums=None, *extra):
    args = ["voicebank", "--root", str(root), "--base-url", url, "--no-progress", *extra]
    return main(args + (["--checksums", str(sums)] if sums else []))


def test_voicebank_layout_resampling_and_speaker_split(tmp_path, voicebank_archives, capsys):
    served, sums, originals = voicebank_archives
    root = tmp_path / "vb"
    with serve(served) as server:
        assert run_voicebank(server.url, root, sums) == 0
        out = capsys.readouterr().out
        expected = {
            "trainset": {n for n in VB_TRAIN if n[:4] not in ("p226", "p287")},
            "valset": {n for n in VB_TRAIN if n[:4] in ("p226", "p287")},
            "testset": set(VB_TEST),
        }
        for split, names in expected.items():
            for kind in ("noisy", "clean"):
                files = sorted((root / f"{split}_{kind}").glob("*.wav"))
                assert {f.stem for f in files} == names
                for f in files:
                    info = sf.info(str(f))
                    assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "FLOAT")
                    wav, _ = read_audio(f)
                    source = originals[("test" if split == "testset" else "train", kind, f.stem)]
                    source = np.round(source * 32767) / 32767  # what the PCM_16 archive holds
                    np.testing.assert_allclose(wav[0], resample(source, 48_000, 16_000), atol=2e-4)
        assert "MD5 ✓ (from" in out and "zip CRCs ✓" in out
        assert "valset: 3 pairs, 2 speakers" in out
        assert not (root / ".dfl-prepare" / "staging").exists() or not any((root / ".dfl-prepare" / "staging").iterdir())

        # The paired-folder datamodule (data=voicebank) reads the layout as is.
        from datamodules.paired_folder import PairedFolderDataModule

        dm = PairedFolderDataModule(root)
        dm.setup()
        assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [3, 3, 2]
        item = dm.dataset("val")[0]
        assert item["noisy"].shape == item["clean"].shape == (1600,)

        # Re-run: every archive is skipped, nothing is requested again.
        before = len(server.requests)
        assert run_voicebank(server.url, root, sums) == 0
        assert len(server.requests) == before
        assert capsys.readouterr().out.count("done earlier (skipped)") == 4

        # Changing the validation speakers re-splits without downloading.
        assert run_voicebank(server.url, root, sums, "--val-speakers", "p230") == 0
        assert {f.stem for f in (root / "valset_noisy").glob("*.wav")} == {"p230_001", "p230_002"}
        assert {f.stem for f in (root / "trainset_clean").glob("*.wav")} == {"p226_001", "p226_002", "p231_001", "p287_001"}
        assert len(server.requests) == before


def test_voicebank_all_speakers_train_and_the_test_set_validates(tmp_path, voicebank_archives, capsys):
    """The authors' protocol: every training speaker trains (--val-speakers none), the test set validates."""
    from datamodules.manifest import DataError
    from datamodules.paired_folder import PairedFolderDataModule

    served, sums, _ = voicebank_archives
    root = tmp_path / "vb"
    with serve(served) as server:
        assert run_voicebank(server.url, root, sums) == 0  # first with the default held-out speakers
        assert run_voicebank(server.url, root, sums, "--val-speakers", "none") == 0  # re-split: all train
    out = capsys.readouterr().out
    assert "valset: 0 pairs, 0 speakers" in out and "data.val_split=test" in out
    for kind in ("noisy", "clean"):
        assert {f.stem for f in (root / f"trainset_{kind}").glob("*.wav")} == set(VB_TRAIN)
        assert not list((root / f"valset_{kind}").glob("*.wav"))
    dm = PairedFolderDataModule(root, val_split="test")
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(p[0].name for p in dm.dataset("val").pairs) == [f"{n}.wav" for n in VB_TEST]
    with pytest.raises(DataError, match="data.val_split=test"):
        PairedFolderDataModule(root).setup()
    with pytest.raises(ValueError, match="data.val_split"):
        PairedFolderDataModule(root, val_split="dev")


def test_voicebank_builtin_checksums_reject_other_files(tmp_path, voicebank_archives, capsys):
    served, _, _ = voicebank_archives
    root = tmp_path / "vb"
    with serve(served) as server:
        assert run_voicebank(server.url, root) == 1  # the served archives are not the published ones
    err = capsys.readouterr().err
    assert "clean_trainset_28spk_wav.zip" in err and "server reports" in err and "expected 2486057279" in err
    assert not (root / "downloads" / "clean_trainset_28spk_wav.zip").exists()


def test_voicebank_md5_mismatch_keeps_download_aside(tmp_path, voicebank_archives, capsys):
    served, sums, _ = voicebank_archives
    bad_sums = tmp_path / "bad.md5"
    bad_sums.write_text(sums.read_text().replace(
        hashlib.md5((served / "clean_testset_wav.zip").read_bytes()).hexdigest(), "f" * 32))
    root = tmp_path / "vb"
    with serve(served) as server:
        assert run_voicebank(server.url, root, bad_sums) == 1
    err = capsys.readouterr().err
    assert "clean_testset_wav.zip" in err and "f" * 32 in err and "kept aside" in err
    assert (root / "downloads" / "clean_testset_wav.zip.bad").exists()
    assert not (root / "downloads" / "clean_testset_wav.zip").exists()
    assert not (root / "testset_clean").exists()


def test_voicebank_refuses_foreign_output_dirs_and_bad_speakers(tmp_path, voicebank_archives, capsys):
    served, sums, _ = voicebank_archives
    root = tmp_path / "vb"
    (root / "trainset_clean").mkdir(parents=True)
    (root / "trainset_clean" / "mine.wav").write_bytes(b"user data")
    with serve(served) as server:
        assert run_voicebank(server.url, root, sums) == 1
        assert "trainset_clean already exists and was not made by dfl-prepare" in capsys.readouterr().err
        assert (root / "trainset_clean" / "mine.wav").read_bytes() == b"user data"
        assert not (root / "downloads").exists()

        assert run_voicebank(server.url, tmp_path / "vb2", sums, "--val-speakers", "p999") == 1
        assert "validation speakers p999 are not in the training set" in capsys.readouterr().err


def test_voicebank_unpaired_files_are_reported(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    tone = np.zeros(480, np.float32)
    for kind, names in (("clean", ["p230_001", "p230_002"]), ("noisy", ["p230_001"])):
        write_zip(served / f"{kind}_trainset_28spk_wav.zip",
                  {f"{kind}_trainset_28spk_wav/{n}.wav": wav_bytes(tone, 48_000) for n in names})
    sums = write_checksums(served)
    archives = voicebank.ARCHIVES[:2]
    with serve(served) as server, pytest.raises(ValueError, match=r"trainset_noisy: missing 1 partner file.*p230_002"):
        voicebank.prepare_voicebank(tmp_path / "vb", base_url=server.url, val_speakers=[], progress=False,
                                    archives=with_checksums(archives, read_checksums(sums), "sums"))


# ---------------------------------------------------------------- DCASE 2016

TUT_SCENES = ["beach", "bus", "home", "office", "park", "tram", "library", "train"]


def tut_clip() -> bytes:
    return wav_bytes((0.2 * RNG.standard_normal((2, 2205))).astype(np.float32), 44_100)


@pytest.fixture(scope="module")
def dcase_archives(tmp_path_factory):
    served = tmp_path_factory.mktemp("dcase") / "served"
    served.mkdir()
    dev, ev = dcase2016.TUT_DEV, dcase2016.TUT_EVAL
    dev_meta = []
    for part in range(1, 9):
        name = f"a{part:03d}_0_30.wav"
        write_zip(served / f"{dev}.audio.{part}.zip", {f"{dev}/audio/{name}": tut_clip()})
        dev_meta.append(f"audio/{name}\t{TUT_SCENES[part - 1]}\ta{part:03d}\n")  # shipped with an id column
    write_zip(served / f"{dev}.meta.zip", {f"{dev}/meta.txt": "".join(dev_meta).encode(),
                                           f"{dev}/evaluation_setup/fold1_train.txt": b"audio/a001_0_30.wav\tbeach\n"})
    write_zip(served / f"{dev}.doc.zip", {f"{dev}/README.txt": b"TUT 2016 dev"})
    write_zip(served / f"{dev}.error.zip", {f"{dev}/error.txt": b""})
    eval_meta = []
    for part in range(1, 4):
        write_zip(served / f"{ev}.audio.{part}.zip", {f"{ev}/audio/{part}.wav": tut_clip()})
        eval_meta.append(f"audio/{part}.wav\t{TUT_SCENES[part]}\n")
    write_zip(served / f"{ev}.meta.zip", {f"{ev}/evaluation_setup/evaluate.txt": "".join(eval_meta).encode()})
    write_zip(served / f"{ev}.doc.zip", {f"{ev}/README.txt": b"TUT 2016 eval"})

    chime = {
        "chime_home/development_chunks_refined.csv": b"0,CR_lounge_chunk0\n1,CR_lounge_chunk1\n",
        "chime_home/evaluation_chunks_refined.csv": b"0,CR_kitchen_chunk7\n",
    }
    for chunk, vote in (("CR_lounge_chunk0", "cm"), ("CR_lounge_chunk1", "S"), ("CR_kitchen_chunk7", "vp")):
        chime[f"chime_home/chunks/{chunk}.csv"] = f"segmentname,x\nannotation_a1,{vote}\nmajorityvote,{vote}\n".encode()
        chime[f"chime_home/chunks/{chunk}.16kHz.wav"] = wav_bytes(np.zeros(1600, np.float32), 16_000)
        chime[f"chime_home/chunks/{chunk}.48kHz.wav"] = wav_bytes(np.zeros(4800, np.float32), 48_000)
    with tarfile.open(served / "chime_home.tar.gz", "w:gz") as tf:
        for name, data in chime.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return served, write_checksums(served)


def test_dcase2016_console_script_layout_and_rerun(tmp_path, dcase_archives):
    served, sums = dcase_archives
    root = tmp_path / "dcase"
    script = Path(sys.executable).with_name("dfl-prepare")
    with serve(served) as server:
        cmd = [str(script), "dcase2016", "--root", str(root), "--base-url", server.url,
               "--checksums", str(sums), "--no-progress"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "gzip CRC ✓" in done.stdout and "chime_home: 2 development + 1 evaluation refined chunks" in done.stdout

        dev = root / dcase2016.TUT_DEV
        lines = (dev / "meta.txt").read_text().splitlines()
        assert lines[0] == "audio/a001_0_30.wav\tbeach" and len(lines) == 8
        assert all(len(line.split("\t")) == 2 for line in lines)
        assert (dev / "meta.original.txt").read_text().startswith("audio/a001_0_30.wav\tbeach\ta001")
        assert (dev / "README.txt").exists() and (dev / "evaluation_setup" / "fold1_train.txt").exists()
        for line in lines + (root / dcase2016.TUT_EVAL / "meta.txt").read_text().splitlines():
            folder = dev if "a0" in line else root / dcase2016.TUT_EVAL
            info = sf.info(str(folder / line.split("\t")[0]))
            assert (info.samplerate, info.channels, info.subtype, info.frames) == (16_000, 2, "FLOAT", 800)
        assert (root / dcase2016.TUT_EVAL / "meta.txt").read_text() == "audio/1.wav\tbus\naudio/2.wav\thome\naudio/3.wav\toffice\n"

        chunks = root / "chime_home" / "chunks"
        assert sorted(p.name for p in chunks.glob("*.wav")) == [
            "CR_kitchen_chunk7.16kHz.wav", "CR_lounge_chunk0.16kHz.wav", "CR_lounge_chunk1.16kHz.wav"]
        assert "majorityvote,cm" in (chunks / "CR_lounge_chunk0.csv").read_text()
        assert (root / "chime_home" / "evaluation_chunks_refined.csv").exists()

        # The pretraining datamodule reads the layout as is (each TUT channel is one example).
        from datamodules.dcase2016 import DCASE2016DataModule

        dm = DCASE2016DataModule(root)
        dm.setup()
        assert {k: len(v) for k, v in dm.train_sets.items()} == {"scene": 16, "tags": 2}
        assert {k: len(v) for k, v in dm.val_sets.items()} == {"scene": 6, "tags": 1}
        assert dm.train_sets["scene"][1]["wav"].shape == (800,)

        before = len(server.requests)
        assert main(["dcase2016", "--root", str(root), "--base-url", server.url,
                     "--checksums", str(sums), "--no-progress"]) == 0
        assert len(server.requests) == before  # every step was skipped

        # Damage the prepared data: the next run names what is wrong.
        (chunks / "CR_kitchen_chunk7.csv").write_text("segmentname,x\n")
        assert main(["dcase2016", "--root", str(root), "--base-url", server.url,
                     "--checksums", str(sums), "--no-progress"]) == 1
        (chunks / "CR_kitchen_chunk7.csv").write_text("majorityvote,vp\n")
        (dev / "audio" / "a003_0_30.wav").unlink()
        with pytest.raises(ValueError, match=r"meta.txt:3: audio/a003_0_30.wav"):
            dcase2016.prepare_dcase2016(root, progress=False)
        (dev / "meta.txt").write_text("audio/../../secret.wav\tbeach\n")
        with pytest.raises(ValueError, match=r"meta.txt:1: audio path .* points outside"):
            dcase2016.prepare_dcase2016(root, progress=False)


def test_checksums_file_errors_name_the_line(tmp_path):
    sums = tmp_path / "sums.md5"
    sums.write_text("d41d8cd98f00b204e9800998ecf8427e  clean_testset_wav.zip\nnot-a-sum\n")
    with pytest.raises(ValueError, match=r"sums.md5:2: expected '<md5>  <file name>'"):
        read_checksums(sums)
    sums.write_text("d41d8cd98f00b204e9800998ecf8427e  other.zip\n")
    with pytest.raises(ValueError, match="names no archive of this dataset: other.zip"):
        with_checksums(voicebank.ARCHIVES, read_checksums(sums), str(sums))


def test_dcase2016_chunk_without_majority_vote(tmp_path, dcase_archives, capsys):
    served, sums = dcase_archives
    root = tmp_path / "dcase"
    md5 = read_checksums(sums)["chime_home.tar.gz"]
    archives = [(dcase2016.CHIME, ArchiveSpec("chime_home.tar.gz", "http://127.0.0.1:9/unused", md5))]
    with serve(served) as server:
        dcase2016.prepare_dcase2016(root, base_urls={"*": server.url}, archives=archives, progress=False)
        (root / "chime_home" / "chunks" / "CR_lounge_chunk1.csv").write_text("annotation_a1,S\n")
        with pytest.raises(ValueError, match=r"CR_lounge_chunk1.csv: no 'majorityvote' row"):
            dcase2016.prepare_dcase2016(root, base_urls={"*": server.url}, archives=archives, progress=False)
    assert not (root / dcase2016.TUT_DEV).exists()


def test_voicebank_delete_archives(tmp_path, voicebank_archives):
    served, sums, _ = voicebank_archives
    root = tmp_path / "vb"
    with serve(served) as server:
        assert run_voicebank(server.url, root, sums, "--delete-archives") == 0
    assert list((root / "downloads").iterdir()) == []
    assert len(list((root / "testset_noisy").glob("*.wav"))) == len(VB_TEST)
