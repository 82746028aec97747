"""Resumable dataset preparation: archive specs, step markers, staging, summary.

State lives in ``<root>/.dfl-prepare/<dataset>/``: one JSON marker per
finished step, so a re-run skips it. Archives go to ``<root>/downloads/``
(an archive already placed there is verified and used); each is unpacked into
``<root>/.dfl-prepare/staging/<archive>/``, which is wiped before and after use.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dfl.audio import atomic_write
from dfl.preparation.download import Downloaded, download, extract


@dataclass(frozen=True)
class ArchiveSpec:
    """One archive of a dataset, its public home and what is published about it."""

    name: str
    base_url: str
    md5: str | None = None
    size: int | None = None
    source: str = "published"  # where md5/size come from, shown in the summary

    def url(self, base_url: str | None = None) -> str:
        return (base_url or self.base_url).rstrip("/") + "/" + self.name


def read_checksums(path: str | Path) -> dict[str, str]:
    """Read ``md5sum`` output (``<md5>  <file name>`` lines) into {file name: md5}."""
    path = Path(path)
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or len(fields[0]) != 32 or any(c not in "0123456789abcdefABCDEF" for c in fields[0]):
            raise ValueError(f"{path}:{number}: expected '<md5>  <file name>', got {line!r}")
        sums[Path(fields[1].lstrip("*")).name] = fields[0].lower()
    return sums


def with_checksums(specs: list[ArchiveSpec], sums: dict[str, str], origin: str) -> list[ArchiveSpec]:
    """Replace the MD5 of the archives named in ``sums`` (their size then comes from the server)."""
    unknown = set(sums) - {s.name for s in specs}
    if unknown:
        raise ValueError(f"{origin}: names no archive of this dataset: {', '.join(sorted(unknown))}")
    return [
        ArchiveSpec(s.name, s.base_url, sums[s.name], None, f"from {Path(origin).name}") if s.name in sums else s
        for s in specs
    ]


@dataclass(frozen=True)
class Unpacked:
    """An archive verified and extracted into ``staging``, waiting to be processed."""

    spec: ArchiveSpec
    staging: Path
    status: str
    integrity: str


class Preparation:
    """Markers, downloads and staging of one dataset under ``root``."""

    def __init__(self, dataset: str, root: str | Path, *, progress: bool = True, keep_archives: bool = True):
        self.dataset = dataset
        self.root = Path(root)
        self.progress = progress
        self.keep_archives = keep_archives
        self.state_dir = self.root / ".dfl-prepare" / dataset
        self.downloads = self.root / "downloads"
        self.rows: list[tuple[str, str, str]] = []  # (archive, what happened, integrity)
        self.notes: list[str] = []

    # -- markers
    def _marker(self, step: str) -> Path:
        return self.state_dir / (step.replace("/", "_") + ".done")

    def done(self, step: str) -> dict | None:
        marker = self._marker(step)
        return json.loads(marker.read_text()) if marker.exists() else None

    def mark_done(self, step: str, info: dict) -> None:
        atomic_write(self._marker(step), lambda tmp: tmp.write_text(json.dumps(info, indent=1)))

    def claim(self, outputs: list[Path]) -> None:
        """Refuse to write into non-empty output dirs that an earlier run of ours did not create."""
        if self.state_dir.exists():
            return
        for out in outputs:
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise ValueError(
                    f"{out} already exists and was not made by dfl-prepare {self.dataset}; "
                    "choose another --root or move it away (nothing was changed)"
                )
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # -- archives
    def unpack(self, spec: ArchiveSpec, base_url: str | None, include=None) -> Unpacked | None:
        """Download + verify + extract ``spec`` into a fresh staging dir; None if already processed."""
        earlier = self.done(spec.name)
        if earlier is not None:
            self.rows.append((spec.name, "done earlier (skipped)", earlier["integrity"]))
            return None
        url = spec.url(base_url)
        got = download(url, self.downloads / spec.name, md5=spec.md5, size=spec.size, progress=self.progress)
        what = "already downloaded" if got.reused else (
            f"resumed at {got.resumed_from} bytes" if got.resumed_from else "downloaded")
        staging = self.root / ".dfl-prepare" / "staging" / spec.name
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
        extract(got.path, staging, include=include, progress=self.progress)
        return Unpacked(spec, staging, what, self._integrity(spec, got))

    def finish(self, unpacked: Unpacked, **info) -> None:
        """Mark the archive processed, drop its staging dir (and the archive unless kept)."""
        self.mark_done(unpacked.spec.name, {"integrity": unpacked.integrity, **info})
        self.rows.append((unpacked.spec.name, unpacked.status, unpacked.integrity))
        shutil.rmtree(unpacked.staging, ignore_errors=True)
        if not self.keep_archives:
            (self.downloads / unpacked.spec.name).unlink(missing_ok=True)

    @staticmethod
    def _integrity(spec: ArchiveSpec, got: Downloaded) -> str:
        path, checks = got.path, []
        if spec.size is not None:
            checks.append(f"size ✓ ({spec.source})")
        else:
            checks.append("size unchecked (no published size)" if got.reused else "size ✓ (as served)")
        checks.append(f"MD5 ✓ ({spec.source})" if spec.md5 else "no published checksum")
        if path.suffix == ".zip":
            checks.append("zip CRCs ✓")
        elif path.name.endswith((".tar.gz", ".tgz")):
            checks.append("gzip CRC ✓")
        return ", ".join(checks)

    # -- report
    def summary(self, title: str) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        table.add_column("archive")
        table.add_column("status")
        table.add_column("integrity")
        for row in self.rows:
            table.add_row(*row)
        out = io.StringIO()
        console = Console(file=out, width=160, no_color=True)
        console.print(table)
        for note in self.notes:
            console.print(note, highlight=False, soft_wrap=True)
        return out.getvalue()
