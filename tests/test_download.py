"""dfl.preparation.download against a local HTTP server: resume, verification, safe extraction."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dfl.preparation.download import (
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


# hostile archives: links that lead out only once followed (issue 26)


def make_archive(path, entries):
    """A tar.gz or zip from ordered ``(name, kind, value)`` entries: kind file/dir/sym/hard."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, kind, value in entries:
                if kind == "dir":
                    zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
                elif kind == "sym":
                    info = zipfile.ZipInfo(name)
                    info.create_system, info.external_attr = 3, 0o120777 << 16
                    zf.writestr(info, value)
                else:
                    zf.writestr(name, value)
        return path
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, value in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[kind]
            info.linkname = value or ""
            tf.addfile(info)
    return path


def climb_to_root(depth):
    """Links each lexically inside the target whose chain really climbs ``depth`` levels above it."""
    entries = [("a/lnk", "sym", ".."), ("up1", "sym", "a/lnk/..")]  # a/lnk -> target, up1 -> its parent
    entries += [(f"up{k}", "sym", f"up{k - 1}/..") for k in range(2, depth + 1)]
    return entries


def tree_listing(root, skip):
    return sorted(str(p) for p in Path(root).rglob("*") if not str(p).startswith(str(skip)))


HOSTILE = {
    # directory members created through a chain of links (each lexically inside)
    "dirs through a chain": [("a/lnk", "sym", ".."), ("up", "sym", "a/lnk/.."), ("up/escaped", "dir", None),
                             ("up/escaped/deeper", "dir", None)],
    "file through a chain": [("a/lnk", "sym", ".."), ("up", "sym", "a/lnk/.."), ("up/escaped.txt", "file", b"x")],
    "link to the target's parent": [("a/lnk", "sym", ".."), ("up", "sym", "a/lnk/..")],
    "link redirected by a later link": [("x", "sym", "b/.."), ("b", "sym", ".")],
    "link loop": [("loop", "sym", "loop")],
    "link loop then a file under it": [("l1", "sym", "l2"), ("l2", "sym", "l1"), ("l1/f.txt", "file", b"x")],
}


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_extract_refuses_links_that_lead_out_when_followed(tmp_path, suffix, case):
    target = tmp_path / "deep" / "out"
    target.mkdir(parents=True)
    archive = make_archive(tmp_path / f"bad{suffix}", [("ok.txt", "file", b"1")] + HOSTILE[case])
    before = tree_listing(tmp_path, target)
    with pytest.raises(UnsafeArchiveError, match="refusing to extract") as err:
        extract(archive, target, progress=False)
    assert archive.name in str(err.value)
    assert tree_listing(tmp_path, target) == before  # nothing created outside the target
    assert list(target.iterdir()) == []  # and what was written inside is undone


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_extract_refuses_chain_of_links_up_to_root(tmp_path, suffix):
    target = tmp_path / "out"
    depth = len(target.resolve().parts)  # enough links to climb from the target to /
    escaped = tmp_path.resolve() / "escaped"  # reached from / through the links
    archive = make_archive(tmp_path / f"bad{suffix}", climb_to_root(depth) + [(f"up{depth}{escaped}", "dir", None)])
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        extract(archive, target, progress=False)
    assert not os.path.lexists(escaped)
    assert list(target.iterdir()) == []  # no link resolving to / (or above the target) is left behind


def test_extract_hard_link_through_chain_reads_nothing_outside(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not yours")
    target = tmp_path / "out"
    entries = [("ok.txt", "file", b"1"), ("a/lnk", "sym", ".."), ("up", "sym", "a/lnk/.."),
               ("stolen.txt", "hard", "up/secret.txt")]
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract(make_archive(tmp_path / "bad.tar.gz", entries), target, progress=False)
    assert not any(p.is_file() and p.read_bytes() == b"not yours" for p in target.rglob("*"))

    depth = len(target.resolve().parts)
    if not Path("/etc/hostname").is_file():
        return
    entries = climb_to_root(depth) + [("hostname", "hard", f"up{depth}/etc/hostname")]
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract(make_archive(tmp_path / "bad2.tar.gz", entries), target, progress=False)
    assert not (target / "hostname").exists() and list(target.iterdir()) == []


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_extract_keeps_links_that_stay_inside(tmp_path, suffix):
    entries = [("d/real.txt", "file", b"r"), ("d/sub/up", "sym", ".."), ("alias", "sym", "d/sub/up/real.txt"),
               ("d/sub/up/more.txt", "file", b"m"), ("self", "sym", ".")]
    target = tmp_path / "out"
    written = extract(make_archive(tmp_path / f"ok{suffix}", entries), target, progress=False)
    assert (target / "alias").read_bytes() == b"r"
    assert (target / "d/more.txt").read_bytes() == b"m"  # written through the link, still inside
    assert (target / "self").resolve() == target.resolve()
    assert target / "d/sub/up/more.txt" in written
    if suffix == ".tar.gz":
        hard = make_archive(tmp_path / "hard.tar.gz", [("d/real.txt", "file", b"r"), ("d/sub", "sym", "."),
                                                       ("copy.txt", "hard", "d/sub/real.txt")])
        extract(hard, tmp_path / "out2", progress=False)
        assert (tmp_path / "out2/copy.txt").read_bytes() == b"r"


def test_extract_refuses_device_files(tmp_path):
    for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
        path = tmp_path / f"dev{kind!r}.tar"
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo("null")
            info.type = kind
            tf.addfile(info)
        with pytest.raises(UnsafeArchiveError, match="special file"):
            extract(path, tmp_path / "out", progress=False)
        assert not os.path.lexists(tmp_path / "out/null")
    zpath = tmp_path / "dev.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        info = zipfile.ZipInfo("null")
        info.create_system, info.external_attr = 3, (stat.S_IFCHR | 0o666) << 16
        zf.writestr(info, b"")
    with pytest.raises(UnsafeArchiveError, match="special file"):
        extract(zpath, tmp_path / "zout", progress=False)
