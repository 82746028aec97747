"""VoiceBank-DEMAND (Valentini et al., 28 speakers) for the paired-folder datamodule.

Downloads the four 48 kHz archives from Edinburgh DataShare
(https://doi.org/10.7488/ds/2117), resamples every file to 16 kHz float32 wav
and lays them out as::

    <root>/trainset_noisy/p230_001.wav   <root>/trainset_clean/p230_001.wav   (26 speakers)
    <root>/valset_noisy/p226_001.wav     <root>/valset_clean/p226_001.wav     (held-out speakers)
    <root>/testset_noisy/p232_001.wav    <root>/testset_clean/p232_001.wav    (824 utterances)

Noisy and clean files of a pair share their name; the speaker is the name's
prefix before ``_``. The validation speakers (default p226, p287) are moved
out of the training set, so changing them on a re-run just re-splits.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from dfl.audio import read_audio, resample, write_audio
from dfl.preparation.steps import ArchiveSpec, Preparation, Unpacked

SAMPLE_RATE = 16_000
BASE_URL = "https://datashare.ed.ac.uk/bitstream/handle/10283/2791/"
DEFAULT_VAL_SPEAKERS = ("p226", "p287")

# MD5s as DataShare lists them for item 10283/2791; the test archives' sizes are not recorded here,
# so for those the size the server announces is checked (plus the zip CRCs).
ARCHIVES = [
    ArchiveSpec("clean_trainset_28spk_wav.zip", BASE_URL, "d2d5a45ec32f8fcbf201bde0447e20ba", 2_486_057_279),
    ArchiveSpec("noisy_trainset_28spk_wav.zip", BASE_URL, "1fca9e8bafb8cd069f6653c6d92f9e9c", 2_830_205_201),
    ArchiveSpec("clean_testset_wav.zip", BASE_URL, "34eb1c0ba7ef667e9b966866c542fc16"),
    ArchiveSpec("noisy_testset_wav.zip", BASE_URL, "fb1b86caa31e8ba5b506c0c64da9aab5"),
]
SPLITS = ("trainset", "valset", "testset")
KINDS = ("noisy", "clean")


def speaker_of(path: Path) -> str:
    return path.name.split("_", 1)[0]


def _archive_role(name: str) -> tuple[str, str]:
    """(split, kind) an archive fills: 'noisy_trainset_28spk_wav.zip' -> ('trainset', 'noisy')."""
    kind, split = name.split("_")[:2]
    return split, kind


def prepare_voicebank(
    root: str | Path,
    *,
    base_url: str | None = None,
    val_speakers: tuple[str, ...] | list[str] = DEFAULT_VAL_SPEAKERS,
    archives: list[ArchiveSpec] = ARCHIVES,
    progress: bool = True,
    keep_archives: bool = True,
) -> str:
    """Download, verify, resample and lay out VoiceBank-DEMAND under ``root``; return the summary."""
    root = Path(root)
    val_speakers = tuple(dict.fromkeys(s.strip() for s in val_speakers if s.strip()))
    prep = Preparation("voicebank", root, progress=progress, keep_archives=keep_archives)
    prep.claim([root / f"{split}_{kind}" for split in SPLITS for kind in KINDS])
    for spec in archives:
        unpacked = prep.unpack(spec, base_url)
        if unpacked is not None:
            files = _convert(unpacked, root, progress)
            prep.finish(unpacked, files=files)
    _split_by_speaker(root, val_speakers)
    counts = _check_pairs(root)
    if not val_speakers:
        prep.notes.append("valset: none (--val-speakers none); validate on the test set with data.val_split=test")
    for split in SPLITS:
        speakers = sorted({speaker_of(p) for p in (root / f"{split}_clean").glob("*.wav")})
        prep.notes.append(f"{split}: {counts[split]} pairs, {len(speakers)} speakers, 16 kHz float32 "
                          f"-> {root / (split + '_{noisy,clean}')}")
    if any(spec.md5 is None for spec in archives):
        prep.notes.append("Archives without a published checksum were checked by size and zip CRCs only.")
    return prep.summary(f"VoiceBank-DEMAND in {root}")


def _convert(unpacked: Unpacked, root: Path, progress: bool) -> int:
    """Resample every wav of an unpacked archive to 16 kHz float32 into its split's folder."""
    split, kind = _archive_role(unpacked.spec.name)
    out_dir = root / f"{'trainset' if split == 'trainset' else 'testset'}_{kind}"
    wavs = sorted(p for p in unpacked.staging.rglob("*.wav")
                  if "__MACOSX" not in p.parts and not p.name.startswith("._"))
    if not wavs:
        raise ValueError(f"{unpacked.spec.name}: archive holds no .wav files")
    seen: dict[str, Path] = {}
    for wav_path in tqdm(wavs, desc=f"resample {unpacked.spec.name}", unit="file", disable=not progress):
        if wav_path.name in seen:
            raise ValueError(f"{unpacked.spec.name}: two members named {wav_path.name} "
                             f"({seen[wav_path.name].relative_to(unpacked.staging)}, "
                             f"{wav_path.relative_to(unpacked.staging)})")
        seen[wav_path.name] = wav_path
        wav, sr = read_audio(wav_path)
        write_audio(out_dir / wav_path.name, resample(wav, sr, SAMPLE_RATE), SAMPLE_RATE, subtype="FLOAT")
    return len(wavs)


def _split_by_speaker(root: Path, val_speakers: tuple[str, ...]) -> None:
    """Move the validation speakers' pairs to valset_*, every other training pair to trainset_*."""
    train_speakers = {speaker_of(p) for split in ("trainset", "valset")
                      for p in (root / f"{split}_clean").glob("*.wav")}
    unknown = [s for s in val_speakers if s not in train_speakers]
    if unknown:
        raise ValueError(f"validation speakers {', '.join(unknown)} are not in the training set "
                         f"(speakers: {', '.join(sorted(train_speakers))})")
    if train_speakers and train_speakers <= set(val_speakers):
        raise ValueError(f"validation speakers {', '.join(val_speakers)} would leave no training speaker")
    for kind in KINDS:
        for split in ("trainset", "valset"):
            for path in sorted((root / f"{split}_{kind}").glob("*.wav")):
                wanted = root / f"{'valset' if speaker_of(path) in val_speakers else 'trainset'}_{kind}"
                if wanted != path.parent:
                    wanted.mkdir(parents=True, exist_ok=True)
                    path.replace(wanted / path.name)


def _check_pairs(root: Path) -> dict[str, int]:
    """Every noisy file needs its clean partner and vice versa; return pairs per split."""
    counts = {}
    for split in SPLITS:
        noisy = {p.name for p in (root / f"{split}_noisy").glob("*.wav")}
        clean = {p.name for p in (root / f"{split}_clean").glob("*.wav")}
        for have, lack, other in ((noisy, clean, "clean"), (clean, noisy, "noisy")):
            missing = sorted(have - lack)
            if missing:
                raise ValueError(f"{root / f'{split}_{other}'}: missing {len(missing)} partner file(s), "
                                 f"e.g. {', '.join(missing[:3])}")
        counts[split] = len(noisy)
    return counts
