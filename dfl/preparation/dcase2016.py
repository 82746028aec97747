"""DCASE 2016 loss-network pretraining data: TUT Acoustic Scenes 2016 and CHiME-Home.

Sources (archive sizes and MD5s as recorded by the ``dcase_util`` 0.2.20
source distribution, ``dcase_util/datasets/tut.py`` and ``dcase2016.py``):

- TUT Acoustic Scenes 2016, development set: https://zenodo.org/records/45739
  (``TUT-acoustic-scenes-2016-development.{doc,meta,error,audio.1..8}.zip``)
- TUT Acoustic Scenes 2016, evaluation set: https://zenodo.org/records/165995
  (``TUT-acoustic-scenes-2016-evaluation.{doc,meta,audio.1..3}.zip``)
- CHiME-Home (DCASE 2016 task 4): https://archive.org/details/chime-home
  (``chime_home.tar.gz``)

Resulting layout under ``<root>``::

    TUT-acoustic-scenes-2016-development/
        meta.txt            one line per clip: audio/<file>.wav<TAB><scene>   (exactly two fields)
        meta.original.txt   the shipped meta.txt, only when it had other columns
        audio/<file>.wav    30 s clips, 16 kHz, float32, STEREO (2 channels; the datamodule splits them)
        evaluation_setup/, error.txt, README...   as shipped
    TUT-acoustic-scenes-2016-evaluation/
        meta.txt, audio/<file>.wav                same format (meta.txt is built from
                                                  evaluation_setup/evaluate.txt when not shipped)
    chime_home/
        development_chunks_refined.csv   rows <index>,<chunk>
        evaluation_chunks_refined.csv    rows <index>,<chunk>
        chunks/<chunk>.csv               annotation; its row "majorityvote,<letters>" holds the tags
                                         (letters from c m f v p b o; S = silence and U are not tags)
        chunks/<chunk>.16kHz.wav         4 s mono, 16 kHz (as shipped; the 48 kHz copies are not kept)
        (every other file of the archive, as shipped)

Every meta line's audio file and every refined chunk's ``.csv`` (with a
``majorityvote`` row) and ``.16kHz.wav`` are checked to exist at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

import soundfile as sf
from tqdm import tqdm

from dfl.audio import AudioError, atomic_write, read_audio, resample, write_audio
from dfl.preparation.steps import ArchiveSpec, Preparation, Unpacked

SAMPLE_RATE = 16_000
TUT_DEV = "TUT-acoustic-scenes-2016-development"
TUT_EVAL = "TUT-acoustic-scenes-2016-evaluation"
CHIME = "chime_home"
TUT_DEV_URL = "https://zenodo.org/records/45739/files/"
TUT_EVAL_URL = "https://zenodo.org/records/165995/files/"
CHIME_URL = "https://archive.org/download/chime-home/"
SOURCE = "published, via dcase_util"

_TUT_DEV_ARCHIVES = [
    ("doc", 69671, "f94ad46eb36325d9fbce5d60f7fc9926"),
    ("meta", 28815, "779b33da2ebbf8bde494b3c981827251"),
    ("error", 1283, "a0d3e0d81b0a36ece87d0f3a9124a386"),
    ("audio.1", 1070981236, "e39546e65f2e72517b6335aaf0c8323d"),
    ("audio.2", 1067186166, "d36cf3253e2c041f68e937a3fe804807"),
    ("audio.3", 1073644405, "0393a9620ab882b1c26d884eccdcffdd"),
    ("audio.4", 1072111347, "fb3e4e0cd7ea82120ec07031dee558ce"),
    ("audio.5", 1069681513, "a19cf600b33c8f88f6ad607bafd74057"),
    ("audio.6", 1072890150, "591aad3219d1155342572cc1f6af5680"),
    ("audio.7", 1069265197, "9e6c1897789e6bce13ac69c6caedb7ab"),
    ("audio.8", 528461098, "c4718354f48fcc9dfc7305f6cd8325c8"),
]
_TUT_EVAL_ARCHIVES = [
    ("doc", 69217, "ef315bf912d1124050646888cc3ceba2"),
    ("meta", 5962, "0d5c131fc3f50c682de62e0e648aceba"),
    ("audio.1", 1067685684, "7c6c2e54b8a9c4c37a803b81446d16fe"),
    ("audio.2", 1068308900, "7930f1dc26707ab3ba9526073af87333"),
    ("audio.3", 538894804, "17187d633d6402aee4b481122a1b28f0"),
]
# (folder the archive fills, its spec)
ARCHIVES: list[tuple[str, ArchiveSpec]] = (
    [(TUT_DEV, ArchiveSpec(f"{TUT_DEV}.{part}.zip", TUT_DEV_URL, md5, size, SOURCE))
     for part, size, md5 in _TUT_DEV_ARCHIVES]
    + [(TUT_EVAL, ArchiveSpec(f"{TUT_EVAL}.{part}.zip", TUT_EVAL_URL, md5, size, SOURCE))
       for part, size, md5 in _TUT_EVAL_ARCHIVES]
    + [(CHIME, ArchiveSpec("chime_home.tar.gz", CHIME_URL, "9ce9d584e229b465b3aa08db2d7fee67", 4162513717, SOURCE))]
)


def prepare_dcase2016(
    root: str | Path,
    *,
    base_urls: dict[str, str] | None = None,
    archives: list[tuple[str, ArchiveSpec]] = ARCHIVES,
    progress: bool = True,
    keep_archives: bool = True,
) -> str:
    """Download, verify, resample and lay out TUT 2016 + CHiME-Home under ``root``; return the summary.

    ``base_urls`` maps a folder (``TUT_DEV``, ``TUT_EVAL``, ``CHIME``) or ``"*"``
    (all of them) to a mirror URL that serves the archives by name.
    """
    root = Path(root)
    base_urls = base_urls or {}
    prep = Preparation("dcase2016", root, progress=progress, keep_archives=keep_archives)
    folders = list(dict.fromkeys(folder for folder, _ in archives))
    prep.claim([root / folder for folder in folders])
    for folder, spec in archives:
        base_url = base_urls.get(folder, base_urls.get("*"))
        if folder == CHIME:
            unpacked = prep.unpack(spec, base_url, include=lambda name: not name.endswith(".48kHz.wav"))
        else:
            unpacked = prep.unpack(spec, base_url)
        if unpacked is not None:
            files = _install(unpacked, root, folder, progress)
            prep.finish(unpacked, files=files)
    for folder in folders:
        prep.notes.append(_check_chime(root) if folder == CHIME else _finalise_tut_meta(root / folder))
    return prep.summary(f"DCASE 2016 (TUT Acoustic Scenes 2016 + CHiME-Home) in {root}")


def _install(unpacked: Unpacked, root: Path, folder: str, progress: bool) -> int:
    """Move an unpacked archive's files into ``root/folder``, resampling audio to 16 kHz."""
    files = sorted(p for p in unpacked.staging.rglob("*") if p.is_file() and not p.is_symlink())
    for path in tqdm(files, desc=f"install {unpacked.spec.name}", unit="file", disable=not progress):
        rel = PurePosixPath(path.relative_to(unpacked.staging).as_posix())
        if rel.parts[0] != folder:
            raise ValueError(f"{unpacked.spec.name}: member {rel} is not inside {folder}/ "
                             "(unexpected archive layout)")
        dest = root / rel
        if path.suffix.lower() == ".wav" and _sample_rate(path, f"{unpacked.spec.name}: {rel}") != SAMPLE_RATE:
            wav, sr = read_audio(path)  # keeps every channel: TUT clips stay stereo
            write_audio(dest, resample(wav, sr, SAMPLE_RATE), SAMPLE_RATE, subtype="FLOAT")
        else:  # text, docs and audio already at 16 kHz (CHiME-Home's .16kHz.wav): as shipped
            dest.parent.mkdir(parents=True, exist_ok=True)
            path.replace(dest)  # staging is under root: an atomic rename
    return len(files)


def _sample_rate(path: Path, label: str) -> int:
    try:
        return sf.info(str(path)).samplerate
    except Exception as exc:  # soundfile raises several types
        raise AudioError(f"{label}: cannot read audio ({exc})") from exc


def _finalise_tut_meta(folder: Path) -> str:
    """Write ``meta.txt`` as ``audio/<file>.wav<TAB><scene>`` lines and check every clip exists."""
    meta = folder / "meta.txt"
    source = meta if meta.exists() else folder / "evaluation_setup" / "evaluate.txt"
    if not source.exists():
        raise ValueError(f"{folder}: neither meta.txt nor evaluation_setup/evaluate.txt was in the archives")
    entries, missing = [], []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(f"{source}:{number}: expected '<audio file><TAB><scene>', got {line!r}")
        name = fields[0].strip().replace("\\", "/")
        name = "audio/" + name.split("audio/", 1)[1] if "audio/" in name else name
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise ValueError(f"{source}:{number}: audio path {name!r} points outside {folder}")
        if not (folder / name).is_file():
            missing.append(f"{source}:{number}: {name}")
        entries.append((name, fields[1].strip()))
    if missing:
        raise ValueError(f"{len(missing)} clip(s) named in the meta file are missing, e.g. "
                         + "; ".join(missing[:3]))
    if not entries:
        raise ValueError(f"{source}: no clips listed")
    canonical = "".join(f"{name}\t{scene}\n" for name, scene in entries)
    if source != meta or meta.read_text() != canonical:
        if source == meta and not (folder / "meta.original.txt").exists():
            atomic_write(folder / "meta.original.txt", lambda tmp: shutil.copyfile(meta, tmp))
        atomic_write(meta, lambda tmp: tmp.write_text(canonical))
    scenes = {scene for _, scene in entries}
    return f"{folder.name}: {len(entries)} clips, {len(scenes)} scenes, 16 kHz stereo -> {meta}"


def _check_chime(root: Path) -> str:
    """Check every refined chunk has its annotation (with a majority vote) and 16 kHz audio."""
    chime = root / CHIME
    counts = []
    for split in ("development", "evaluation"):
        listing = chime / f"{split}_chunks_refined.csv"
        if not listing.exists():
            raise ValueError(f"{listing}: missing from chime_home.tar.gz")
        chunks = []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split(",")
            if len(fields) < 2 or not fields[1].strip():
                raise ValueError(f"{listing}:{number}: expected '<index>,<chunk>', got {line!r}")
            chunks.append(fields[1].strip())
        if not chunks:
            raise ValueError(f"{listing}: no chunks listed")
        for chunk in chunks:
            annotation = chime / "chunks" / f"{chunk}.csv"
            audio = chime / "chunks" / f"{chunk}.16kHz.wav"
            for needed in (annotation, audio):
                if not needed.is_file():
                    raise ValueError(f"{needed}: missing (chunk {chunk} of {listing.name})")
            if not any(row.split(",", 1)[0] == "majorityvote" for row in annotation.read_text().splitlines()):
                raise ValueError(f"{annotation}: no 'majorityvote' row")
        counts.append(f"{len(chunks)} {split}")
    return f"chime_home: {' + '.join(counts)} refined chunks, 16 kHz mono -> {chime}"
