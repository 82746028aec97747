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
#
# Rules (Python's tarfile "data" filter, applied to zip too): a member's name is
# relative without "..", and its destination -- resolved the way the OS resolves
# it, following every link already on disk, directories included -- lies inside
# the target; a link (symbolic or hard) must resolve inside the target as well,
# checked when it is made and again over the finished tree (a later link can
# change where an earlier one leads); no device files, FIFOs or sockets.
# Everything is written through the resolved, link-free path, so what the check
# saw is what the OS does.

MAX_LINK_FOLLOWS = 40  # the Linux kernel's limit (ELOOP)


def extract(
    archive: str | os.PathLike,
    target_dir: str | os.PathLike,
    *,
    include: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Unpack a zip or tar(.gz/.bz2/.xz) archive into ``target_dir``; return the files written.

    Refuses (:class:`UnsafeArchiveError`) absolute member names, ``..``
    components, members whose destination resolves outside ``target_dir``
    through links (symbolic links are followed as the OS would), symbolic or
    hard links that resolve outside it, and special files; never overwrites an
    existing file. ``include(name)`` picks members by their archive name. Zip
    CRCs and gzip checksums are verified while reading; a corrupt archive raises
    :class:`ArchiveError`. On any error, what this call already wrote is
    removed again.

    Args:
        archive: the zip or tar file.
        target_dir: where to unpack (created if missing).
        include: optional filter on member names.
        progress: show a progress bar.

    Returns:
        The files and links written, as ``target_dir / member name``.
    """
    archive, target = Path(archive), Path(target_dir)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    target.mkdir(parents=True, exist_ok=True)
    job = _Extraction(archive, target)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(job, include, progress)
        elif _is_tar(archive):
            _extract_tar(job, include, progress)
        else:
            raise ArchiveError(f"{archive}: not a zip or tar archive (corrupt or truncated download?)")
        job.check_links_again()
    except BaseException:
        job.undo()
        raise
    return job.written


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


class _Unresolvable(OSError):
    """A path the OS itself could not resolve (link loop, name too long, ...)."""


def resolve_path(path: str | os.PathLike) -> str:
    """Resolve an absolute ``path`` the way the OS does: every symbolic link followed.

    Components that do not exist are kept as written (the OS would refuse to
    go through them, so nothing is reached that way). Unlike
    ``os.path.realpath`` any other failure -- a link loop, more than
    ``MAX_LINK_FOLLOWS`` links, a name too long -- raises instead of silently
    stopping the resolution where the OS would carry on differently.

    Args:
        path: an absolute path.

    Returns:
        The absolute resolved path.

    Raises:
        OSError: the path cannot be resolved.
    """
    pending = [p for p in reversed(os.fspath(path).split("/"))]
    resolved, follows = "/", 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        try:
            mode = os.lstat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            resolved = candidate
            continue
        except OSError as exc:
            raise _Unresolvable(f"{candidate}: {exc.strerror or exc}") from exc
        if not stat.S_ISLNK(mode):
            resolved = candidate
            continue
        follows += 1
        if follows > MAX_LINK_FOLLOWS:
            raise _Unresolvable(f"{path}: more than {MAX_LINK_FOLLOWS} links (a link loop?)")
        link = os.readlink(candidate)
        if link.startswith("/"):
            resolved = "/"
        pending.extend(reversed(link.split("/")))
    return resolved


class _Extraction:
    """One extraction: where things went (for undo) and the safety checks."""

    def __init__(self, archive: Path, target: Path):
        self.archive, self.target = archive, target
        self.root = resolve_path(os.path.abspath(target))
        self.made: list[str] = []  # resolved paths this call created, in order (for undo)
        self.links: list[tuple[str, str]] = []  # (member name, resolved path of the link)
        self.written: list[Path] = []  # files and links, as target / member name

    def inside(self, resolved: str) -> bool:
        return resolved == self.root or resolved.startswith(self.root.rstrip("/") + "/")

    def resolve(self, path: str, name: str, what: str) -> str:
        try:
            return resolve_path(path)
        except OSError as exc:
            raise UnsafeArchiveError(
                f"{self.archive}: {what} {name!r} cannot be resolved ({exc}); refusing to extract"
            ) from exc

    def destination(self, rel: PurePosixPath, name: str) -> str:
        """The resolved, link-free path ``rel`` is written to; refuses anything outside the target."""
        dest = self.resolve(os.path.join(self.root, str(rel)), name, "member")
        if not self.inside(dest):
            raise UnsafeArchiveError(
                f"{self.archive}: member {name!r} would be written outside {self.target} "
                f"(to {dest}, through a link); refusing to extract"
            )
        return dest

    def make_dirs(self, resolved: str) -> None:
        """Create ``resolved`` (inside the target, link-free) and its missing parents."""
        missing = []
        path = resolved
        while not os.path.lexists(path):
            missing.append(path)
            path = os.path.dirname(path)
        if not os.path.isdir(path) or os.path.islink(path):
            raise ArchiveError(f"{self.archive}: {path} is not a directory; cannot extract into it")
        for p in reversed(missing):
            os.mkdir(p)
            self.made.append(p)

    def directory(self, rel: PurePosixPath, name: str) -> None:
        self.make_dirs(self.destination(rel, name))

    def new_file(self, rel: PurePosixPath, name: str) -> str:
        """Resolve the destination of a file or link member and create its parent folders."""
        parent = self.destination(rel.parent, name)
        self.make_dirs(parent)
        dest = os.path.join(parent, rel.name)
        if os.path.lexists(dest):
            raise ArchiveError(f"{self.archive}: member {name!r}: {dest} already exists; refusing to overwrite it")
        return dest

    def write(self, rel: PurePosixPath, name: str, source) -> None:
        dest = self.new_file(rel, name)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        self.made.append(dest)
        self.written.append(self.target / rel)
        with os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(source, dst, CHUNK)

    def symlink(self, rel: PurePosixPath, name: str, link_target: str) -> None:
        target_text = link_target.replace("\\", "/")
        if target_text.startswith("/") or re.match(r"^[A-Za-z]:", target_text) or not target_text:
            raise self.link_outside(name, link_target)
        dest = self.new_file(rel, name)
        self.check_link(name, dest, target_text, link_target)
        os.symlink(link_target, dest)
        self.made.append(dest)
        self.links.append((name, dest))
        self.written.append(self.target / rel)

    def check_link(self, name: str, dest: str, target_text: str, link_target: str) -> None:
        leads_to = self.resolve(os.path.join(os.path.dirname(dest), target_text), name, "link")
        if not self.inside(leads_to):
            raise self.link_outside(name, link_target, leads_to)

    def hardlink(self, rel: PurePosixPath, name: str, link_target: str) -> None:
        target_text = link_target.replace("\\", "/")  # relative to the archive's root, not the link's folder
        if target_text.startswith("/") or re.match(r"^[A-Za-z]:", target_text) or not target_text:
            raise self.link_outside(name, link_target)
        source = self.resolve(os.path.join(self.root, target_text), name, "hard link")
        if not self.inside(source):
            raise self.link_outside(name, link_target, source)
        if not os.path.isfile(source) or os.path.islink(source):
            raise ArchiveError(f"{self.archive}: hard link {name!r} -> {link_target!r} has no extracted target")
        with open(source, "rb") as src:  # a copy: no inode shared with anything
            self.write(rel, name, src)

    def link_outside(self, name: str, link_target: str, leads_to: str | None = None) -> UnsafeArchiveError:
        where = f" (it resolves to {leads_to})" if leads_to else ""
        return UnsafeArchiveError(
            f"{self.archive}: link {name!r} -> {link_target!r} points outside the target directory{where}; "
            "refusing to extract"
        )

    def check_links_again(self) -> None:
        """Every link of the finished tree still resolves inside (a later link can redirect an earlier one)."""
        for name, dest in self.links:
            leads_to = self.resolve(dest, name, "link")
            if not self.inside(leads_to):
                raise self.link_outside(name, os.readlink(dest), leads_to)

    def undo(self) -> None:
        for path in reversed(self.made):
            try:
                if os.path.islink(path) or not os.path.isdir(path):
                    os.unlink(path)
                elif not os.listdir(path):
                    os.rmdir(path)
            except FileNotFoundError:
                pass


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_IFMT(mode):  # unix mode bits present
        if stat.S_ISLNK(mode):
            return "link"
        if stat.S_ISDIR(mode):
            return "dir"
        if not stat.S_ISREG(mode):
            return "special"
    if stat.S_ISLNK(mode):
        return "link"
    return "dir" if info.is_dir() else "file"


def _extract_zip(job: _Extraction, include, progress) -> None:
    archive = job.archive
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{archive}: cannot open zip archive ({exc})") from exc
    with zf:
        members = zf.infolist()
        for info in members:  # check every name before writing anything
            _member_path(archive, info.filename)
            if _zip_kind(info) == "special":
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a special file; refusing to extract")
        for info in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress, leave=False):
            if include is not None and not include(info.filename):
                continue
            rel, kind = _member_path(archive, info.filename), _zip_kind(info)
            try:
                if kind == "dir":
                    job.directory(rel, info.filename)
                elif kind == "link":
                    job.symlink(rel, info.filename, zf.read(info).decode("utf-8", "replace"))
                else:
                    with zf.open(info) as src:
                        job.write(rel, info.filename, src)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                raise ArchiveError(f"{archive}: member {info.filename!r} is corrupt ({exc})") from exc
            except OSError as exc:
                if isinstance(exc, ArchiveError):
                    raise
                raise ArchiveError(f"{archive}: member {info.filename!r}: {exc}") from exc


def _extract_tar(job: _Extraction, include, progress) -> None:
    archive = job.archive
    try:
        tf = tarfile.open(archive, mode="r|*")  # streaming: one pass over a multi-GB .tar.gz
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"{archive}: cannot open tar archive ({exc})") from exc
    try:
        with tf, tqdm(desc=f"extract {archive.name}", unit="file", disable=not progress, leave=False) as bar:
            for member in tf:
                bar.update()
                rel = _member_path(archive, member.name)
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a special file; refusing to extract")
                if include is not None and not include(member.name):
                    continue
                if member.isdir():
                    job.directory(rel, member.name)
                elif member.issym():
                    job.symlink(rel, member.name, member.linkname)
                elif member.islnk():
                    job.hardlink(rel, member.name, member.linkname)
                else:
                    with tf.extractfile(member) as src:
                        job.write(rel, member.name, src)
    except ArchiveError:
        raise
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise ArchiveError(f"{archive}: corrupt or truncated tar archive ({exc})") from exc
