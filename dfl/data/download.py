"""Verified, resumable downloads and safe archive extraction.

``download`` streams into ``<dest>.part`` and resumes it with an HTTP Range
request; only a file whose size and MD5 match (when known) is renamed onto
``dest``. ``extract`` unpacks zip and tar(.gz) archives and refuses any member
that would land outside the target directory.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

CHUNK = 1 << 20
USER_AGENT = "dfl-prepare/0.1 (+https://github.com/)"


class DownloadError(RuntimeError):
    """A download that failed or is incomplete; the message names the URL and file."""


class ChecksumError(DownloadError):
    """A file whose size or MD5 differs from the expected one."""


class ArchiveError(ValueError):
    """An archive that cannot be read (corrupt, truncated, unknown format)."""


class UnsafeArchiveError(ArchiveError):
    """An archive member that would be written outside the target directory."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    md5: str
    reused: bool  # the verified file was already there: nothing fetched
    resumed_from: int  # bytes of an earlier partial download that were kept


def file_md5(path: Path, *, progress: bool = False) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"md5 {path.name}",
        disable=not progress, leave=False,
    ) as bar:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    size: int | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Downloaded:
    """Fetch ``url`` into ``dest`` (resuming ``dest.part``) and verify it.

    An existing ``dest`` is verified and reused, never overwritten. A dropped
    connection is retried from where it stopped. A short file stays as
    ``.part`` for the next run to resume; a file of the wrong size or MD5 is
    moved aside to ``<dest>.bad`` (kept, never used) and :class:`ChecksumError`
    is raised.
    """
    dest = Path(dest)
    md5 = md5.lower() if md5 else None
    if dest.exists():
        return _reuse_existing(url, dest, md5, size, progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    expected, resumed_from = size, None
    for attempt in range(retries + 1):
        try:
            expected, kept = _fetch_into(url, part, size, progress, timeout)
            resumed_from = kept if resumed_from is None else resumed_from
            break
        except _Transient as exc:
            if resumed_from is None and exc.kept is not None:
                resumed_from = exc.kept
            if attempt == retries:
                got = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"{url}: download failed after {retries + 1} attempts ({exc.__cause__ or exc}); "
                    f"{got} bytes kept in {part}, run again to resume"
                ) from exc
            time.sleep(min(0.5 * 2**attempt, 10.0))
    got = part.stat().st_size
    if expected is not None and got < expected:
        raise DownloadError(
            f"{url}: incomplete download ({got} of {expected} bytes) kept in {part}; run again to resume"
        )
    if expected is not None and got > expected:
        _set_aside(url, part, dest, f"size {got} bytes, expected {expected}")
    actual_md5 = file_md5(part, progress=progress)
    if md5 is not None and actual_md5 != md5:
        _set_aside(url, part, dest, f"MD5 {actual_md5}, expected {md5}")
    os.replace(part, dest)
    return Downloaded(dest, got, actual_md5, reused=False, resumed_from=resumed_from or 0)


class _Transient(Exception):
    """Network trouble worth retrying (resuming from the bytes we have)."""

    def __init__(self, message: str, kept: int | None = None):
        super().__init__(message)
        self.kept = kept  # bytes of the earlier partial file this attempt started from


def _fetch_into(url: str, part: Path, size: int | None, progress: bool, timeout: float) -> tuple[int | None, int]:
    """Append the missing bytes of ``url`` to ``part``.

    Returns the expected total size (``size``, else what the server reports)
    and how many bytes of an earlier partial file were kept.
    """
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:
        return size, offset  # nothing left to fetch; verification decides
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and offset:
            return (offset if size is None else size), offset  # we already hold the whole file
        if exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (URLError, OSError) as exc:
        raise _Transient(str(exc)) from exc
    with response:
        total = None
        if offset and response.status == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise DownloadError(f"{url}: server answered the resume request with a wrong Content-Range")
            total = None if match.group(2) == "*" else int(match.group(2))
        else:  # the server ignored Range (or there was none): start over
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{url}: server reports {total} bytes, expected {size}; nothing was saved")
        mode = "ab" if offset else "wb"
        with open(part, mode) as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[: -len(".part")],
            disable=not progress,
        ) as bar:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    fh.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(str(exc), kept=offset) from exc
        if total is not None and part.stat().st_size < total:
            raise _Transient(f"connection closed after {part.stat().st_size} of {total} bytes", kept=offset)
    return (size if size is not None else total), offset


def _set_aside(url: str, part: Path, dest: Path, what: str) -> None:
    bad = dest.with_name(dest.name + ".bad")
    os.replace(part, bad)
    raise ChecksumError(f"{url}: downloaded file has {what}; it is kept aside in {bad} and not used")


def _reuse_existing(url: str, dest: Path, md5: str | None, size: int | None, progress: bool) -> Downloaded:
    got = dest.stat().st_size
    if size is not None and got != size:
        raise ChecksumError(
            f"{dest}: existing file is {got} bytes, expected {size} for {url}; "
            "move it away to download it again"
        )
    actual_md5 = file_md5(dest, progress=progress)
    if md5 is not None and actual_md5 != md5:
        raise ChecksumError(
            f"{dest}: existing file has MD5 {actual_md5}, expected {md5} for {url}; "
            "move it away to download it again"
        )
    return Downloaded(dest, got, actual_md5, reused=True, resumed_from=0)


# ---------------------------------------------------------------- extraction


def extract(
    archive: str | os.PathLike,
    target_dir: str | os.PathLike,
    *,
    include: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Unpack a zip or tar(.gz/.bz2/.xz) archive into ``target_dir``; return the files written.

    Refuses (:class:`UnsafeArchiveError`) absolute member names, ``..``
    components, links pointing outside ``target_dir`` and special files; never
    overwrites an existing file. ``include(name)`` picks members by their
    archive name. Zip CRCs and gzip checksums are verified while reading; a
    corrupt archive raises :class:`ArchiveError`. On any error, what this call
    already wrote is removed again.
    """
    archive, target = Path(archive), Path(target_dir)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    target.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, target, include, progress, created)
        elif _is_tar(archive):
            _extract_tar(archive, target, include, progress, created)
        else:
            raise ArchiveError(f"{archive}: not a zip or tar archive (corrupt or truncated download?)")
    except BaseException:
        for path in reversed(created):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
    return [p for p in created if not p.is_dir() or p.is_symlink()]


def _is_tar(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except (OSError, EOFError, zlib.error):
        return False


def _member_path(archive: Path, name: str) -> PurePosixPath:
    """The member's path relative to the target, or UnsafeArchiveError."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in PurePosixPath(posix).parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'; refusing to extract")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_link(archive: Path, name: str, link_from: PurePosixPath, link_target: str) -> None:
    """Refuse a link whose target resolves outside the extraction root."""
    target = link_target.replace("\\", "/")
    resolved = os.path.normpath(str(link_from / target)) if not target.startswith("/") else "/"
    if target.startswith("/") or re.match(r"^[A-Za-z]:", target) or resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(
            f"{archive}: link {name!r} -> {link_target!r} points outside the target directory; refusing to extract"
        )


def _destination(archive: Path, target: Path, rel: PurePosixPath, name: str) -> Path:
    dest = target / rel
    real_root, real_parent = os.path.realpath(target), os.path.realpath(dest.parent)
    if real_parent != real_root and not real_parent.startswith(real_root + os.sep):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside {target} (through a link)")
    if dest.exists() or dest.is_symlink():
        raise ArchiveError(f"{archive}: member {name!r}: {dest} already exists; refusing to overwrite it")
    return dest


def _make_dirs(path: Path, created: list[Path]) -> None:
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        p.mkdir()
        created.append(p)


def _extract_zip(archive, target, include, progress, created) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{archive}: cannot open zip archive ({exc})") from exc
    with zf:
        members = zf.infolist()
        links = {}
        for info in members:  # check every name before writing anything
            rel = _member_path(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                links[info.filename] = zf.read(info).decode("utf-8", "replace")
                _check_link(archive, info.filename, rel.parent, links[info.filename])
        for info in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress, leave=False):
            if include is not None and not include(info.filename):
                continue
            rel = _member_path(archive, info.filename)
            if info.is_dir():
                _make_dirs(target / rel, created)
                continue
            _make_dirs((target / rel).parent, created)
            dest = _destination(archive, target, rel, info.filename)
            if info.filename in links:
                os.symlink(links[info.filename], dest)
                created.append(dest)
                continue
            created.append(dest)
            try:
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
                raise ArchiveError(f"{archive}: member {info.filename!r} is corrupt ({exc})") from exc


def _extract_tar(archive, target, include, progress, created) -> None:
    try:
        tf = tarfile.open(archive, mode="r|*")  # streaming: one pass over a multi-GB .tar.gz
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"{archive}: cannot open tar archive ({exc})") from exc
    try:
        with tf, tqdm(desc=f"extract {archive.name}", unit="file", disable=not progress, leave=False) as bar:
            for member in tf:
                bar.update()
                rel = _member_path(archive, member.name)
                if member.issym():
                    _check_link(archive, member.name, rel.parent, member.linkname)
                elif member.islnk():
                    _check_link(archive, member.name, PurePosixPath("."), member.linkname)
                elif not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a special file; refusing to extract")
                if include is not None and not include(member.name):
                    continue
                if member.isdir():
                    _make_dirs(target / rel, created)
                    continue
                _make_dirs((target / rel).parent, created)
                dest = _destination(archive, target, rel, member.name)
                if member.issym():
                    os.symlink(member.linkname, dest)
                elif member.islnk():
                    source = target / _member_path(archive, member.linkname)
                    if not source.is_file() or source.is_symlink():
                        raise ArchiveError(f"{archive}: hard link {member.name!r} -> {member.linkname!r} has no extracted target")
                    shutil.copyfile(source, dest)  # a copy: no inode shared with anything
                else:
                    created.append(dest)
                    src = tf.extractfile(member)
                    with src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    continue
                created.append(dest)
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise ArchiveError(f"{archive}: corrupt or truncated tar archive ({exc})") from exc
