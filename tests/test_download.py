"""dfl.data.download against a local HTTP server: resume, verification, safe extraction."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile

import numpy as np
import pytest

from dfl.data.download import (
    ArchiveError,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    download,
    extract,
)
from tests.helpers.local_http_server import serve


@pytest.fixture
def payload(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (served / "blob.bin").write_bytes(data)
    return served, data, hashlib.md5(data).hexdigest()


@pytest.fixture
def server(payload):
    with serve(payload[0]) as srv:
        yield srv


def test_download_verifies_and_reuses(tmp_path, payload, server):
    _, data, md5 = payload
    dest = tmp_path / "dl" / "blob.bin"
    got = download(f"{server.url}/blob.bin", dest, md5=md5, size=len(data), progress=False)
    assert dest.read_bytes() == data and got.md5 == md5 and not got.reused
    assert not dest.with_name("blob.bin.part").exists()
    again = download(f"{server.url}/blob.bin", dest, md5=md5, size=len(data), progress=False)
    assert again.reused and len(server.ranges_for("blob.bin")) == 1  # no second request


def test_resume_from_partial_file_uses_range(tmp_path, payload, server):
    _, data, md5 = payload
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(data[:123_456])
    got = download(f"{server.url}/blob.bin", dest, md5=md5, size=len(data), progress=False)
    assert server.ranges_for("blob.bin") == ["bytes=123456-"]
    assert got.resumed_from == 123_456 and dest.read_bytes() == data


def test_dropped_connection_is_resumed(tmp_path, payload, server):
    _, data, md5 = payload
    server.drop_after["blob.bin"] = 100_000
    got = download(f"{server.url}/blob.bin", tmp_path / "blob.bin", md5=md5, progress=False)
    ranges = server.ranges_for("blob.bin")
    assert ranges[0] is None and ranges[1] is not None and int(ranges[1].split("=")[1][:-1]) > 0
    assert got.path.read_bytes() == data


def test_server_ignoring_range_restarts_cleanly(tmp_path, payload, server):
    _, data, md5 = payload
    server.ignore_range = True
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"x" * 5000)  # garbage that must not survive
    got = download(f"{server.url}/blob.bin", dest, md5=md5, progress=False)
    assert dest.read_bytes() == data and got.resumed_from == 0


def test_md5_mismatch_keeps_file_aside_and_never_uses_it(tmp_path, payload, server):
    _, data, _ = payload
    dest = tmp_path / "blob.bin"
    with pytest.raises(ChecksumError) as err:
        download(f"{server.url}/blob.bin", dest, md5="0" * 32, progress=False)
    message = str(err.value)
    assert "/blob.bin" in message and "0" * 32 in message and "blob.bin.bad" in message
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()
    assert dest.with_name("blob.bin.bad").read_bytes() == data


def test_size_mismatch_reported_before_saving(tmp_path, payload, server):
    _, data, md5 = payload
    with pytest.raises(ChecksumError, match=f"server reports {len(data)} bytes, expected 10"):
        download(f"{server.url}/blob.bin", tmp_path / "blob.bin", md5=md5, size=10, progress=False)
    assert not (tmp_path / "blob.bin").exists()


def test_incomplete_download_keeps_part_for_next_run(tmp_path, payload, server):
    _, data, md5 = payload
    server.drop_after["blob.bin"] = 50_000
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="run again to resume"):
        download(f"{server.url}/blob.bin", dest, md5=md5, size=len(data), progress=False, retries=0)
    part = dest.with_name("blob.bin.part")
    kept = part.stat().st_size
    assert 0 < kept < len(data) and not dest.exists()
    download(f"{server.url}/blob.bin", dest, md5=md5, size=len(data), progress=False)
    assert dest.read_bytes() == data and server.ranges_for("blob.bin")[-1] == f"bytes={kept}-"


def test_existing_foreign_file_is_not_overwritten(tmp_path, payload, server):
    _, _, md5 = payload
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"my own file")
    with pytest.raises(ChecksumError, match="existing file"):
        download(f"{server.url}/blob.bin", dest, md5=md5, progress=False)
    assert dest.read_bytes() == b"my own file"


def test_http_error_names_url(tmp_path, server):
    with pytest.raises(DownloadError, match=r"/missing\.zip: HTTP 404"):
        download(f"{server.url}/missing.zip", tmp_path / "missing.zip", progress=False)


# ---------------------------------------------------------------- extraction


def make_zip(path, members: dict[str, bytes], symlinks: dict[str, str] | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return path


def make_tar(path, members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return path


def test_extract_zip_and_tar(tmp_path):
    members = {"top/a.txt": b"alpha", "top/sub/b.txt": b"beta", "./top/c.txt": b"gamma"}
    for archive in (make_zip(tmp_path / "x.zip", members), make_tar(tmp_path / "x.tar.gz", members)):
        out = tmp_path / f"out_{archive.name}"
        written = extract(archive, out, progress=False)
        assert (out / "top/a.txt").read_bytes() == b"alpha"
        assert (out / "top/sub/b.txt").read_bytes() == b"beta"
        assert (out / "top/c.txt").read_bytes() == b"gamma"
        assert sorted(p.name for p in written) == ["a.txt", "b.txt", "c.txt"]


def test_extract_include_filter(tmp_path):
    archive = make_tar(tmp_path / "x.tar.gz", {"d/k.16kHz.wav": b"1", "d/k.48kHz.wav": b"2"})
    extract(archive, tmp_path / "out", include=lambda n: not n.endswith(".48kHz.wav"), progress=False)
    assert (tmp_path / "out/d/k.16kHz.wav").exists() and not (tmp_path / "out/d/k.48kHz.wav").exists()


@pytest.mark.parametrize(
    "archive_kind,members,links,what",
    [
        ("zip", {"ok.txt": b"1", "../evil.txt": b"x"}, None, "'..'"),
        ("zip", {"/abs/evil.txt": b"x"}, None, "absolute"),
        ("zip", {"ok.txt": b"1"}, {"link": "../../etc"}, "points outside"),
        ("tar", {"ok.txt": b"1", "a/../../evil.txt": b"x"}, None, "'..'"),
        ("tar", {"ok.txt": b"1", "/tmp/evil.txt": b"x"}, None, "absolute"),
        ("tar", {"ok.txt": b"1"}, {"link": (tarfile.SYMTYPE, "../outside")}, "points outside"),
        ("tar", {"ok.txt": b"1"}, {"abslink": (tarfile.SYMTYPE, "/etc/passwd")}, "points outside"),
        ("tar", {"ok.txt": b"1"}, {"hard": (tarfile.LNKTYPE, "../../etc/passwd")}, "points outside"),
        ("tar", {"ok.txt": b"1"}, {"fifo": (tarfile.FIFOTYPE, "")}, "special file"),
    ],
)
def test_extract_refuses_escaping_members(tmp_path, archive_kind, members, links, what):
    if archive_kind == "zip":
        archive = make_zip(tmp_path / "bad.zip", members, links)
    else:
        archive = make_tar(tmp_path / "bad.tar.gz", members, links)
    target = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchiveError, match=what) as err:
        extract(archive, target, progress=False)
    assert archive.name in str(err.value)
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (target / "ok.txt").exists()  # nothing half-extracted is left behind
    assert not os.path.lexists(target / "link")


def test_symlink_inside_target_is_allowed(tmp_path):
    archive = make_tar(tmp_path / "x.tar.gz", {"d/real.txt": b"r"}, {"d/alias.txt": (tarfile.SYMTYPE, "real.txt")})
    extract(archive, tmp_path / "out", progress=False)
    assert (tmp_path / "out/d/alias.txt").read_bytes() == b"r"


def test_extract_never_overwrites(tmp_path):
    archive = make_zip(tmp_path / "x.zip", {"a.txt": b"archive"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out/a.txt").write_bytes(b"mine")
    with pytest.raises(ArchiveError, match="refusing to overwrite"):
        extract(archive, tmp_path / "out", progress=False)
    assert (tmp_path / "out/a.txt").read_bytes() == b"mine"


def test_corrupt_archives_raise_archive_error(tmp_path):
    zpath = make_zip(tmp_path / "c.zip", {"a.bin": bytes(range(256)) * 400})
    raw = bytearray(zpath.read_bytes())
    raw[100] ^= 0xFF  # inside the stored member's data: CRC mismatch
    zpath.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match=r"c\.zip.*a\.bin"):
        extract(zpath, tmp_path / "o1", progress=False)
    assert not (tmp_path / "o1/a.bin").exists()

    tpath = make_tar(tmp_path / "t.tar.gz", {"a.bin": np.random.default_rng(1).bytes(200_000)})
    tpath.write_bytes(tpath.read_bytes()[: tpath.stat().st_size // 2])  # truncated download
    with pytest.raises(ArchiveError, match=r"t\.tar\.gz"):
        extract(tpath, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2/a.bin").exists()

    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"<html>not an archive</html>")
    with pytest.raises(ArchiveError, match="not a zip or tar archive"):
        extract(junk, tmp_path / "o3", progress=False)
