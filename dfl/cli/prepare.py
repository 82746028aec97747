"""``dfl-prepare``: download and lay out a real dataset.

    dfl-prepare voicebank --root data/voicebank [--val-speakers p226,p287]
    dfl-prepare dcase2016 --root data/dcase2016

Re-running skips finished steps; an interrupted download resumes.
"""

from __future__ import annotations

import argparse
import sys

from dfl.audio import AudioError
from dfl.preparation.download import ArchiveError, DownloadError
from dfl.preparation.steps import read_checksums, with_checksums


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfl-prepare", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="{voicebank,dcase2016}")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--root", required=True, help="directory to prepare the dataset in")
        sub.add_argument("--base-url", help="mirror serving every archive by its file name")
        sub.add_argument("--checksums", metavar="FILE",
                         help="md5sum-style file ('<md5>  <archive>') replacing the built-in MD5s "
                              "(the archive size is then taken from the server)")
        sub.add_argument("--delete-archives", action="store_true",
                         help="delete each downloaded archive once it is processed")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")

    voicebank = commands.add_parser("voicebank", help="VoiceBank-DEMAND 28 speakers (Edinburgh DataShare)")
    common(voicebank)
    voicebank.add_argument("--val-speakers", default="p226,p287",
                           help="comma-separated training speakers held out for validation (default: p226,p287), "
                                "or 'none': all 28 speakers train (validate with data.val_split=test, as the authors)")

    dcase = commands.add_parser("dcase2016", help="TUT Acoustic Scenes 2016 + CHiME-Home (loss-network pretraining)")
    common(dcase)
    dcase.add_argument("--tut-dev-url", help="mirror for the TUT 2016 development archives")
    dcase.add_argument("--tut-eval-url", help="mirror for the TUT 2016 evaluation archives")
    dcase.add_argument("--chime-url", help="mirror for chime_home.tar.gz")
    return parser


def parse_val_speakers(text: str) -> list[str]:
    """``--val-speakers``: comma-separated speakers, or ``none`` (every speaker trains)."""
    return [] if text.strip().lower() == "none" else text.split(",")


def run(args: argparse.Namespace) -> str:
    options = dict(progress=not args.no_progress, keep_archives=not args.delete_archives)
    sums = read_checksums(args.checksums) if args.checksums else {}
    if args.dataset == "voicebank":
        from dfl.preparation import voicebank

        archives = with_checksums(voicebank.ARCHIVES, sums, args.checksums) if sums else voicebank.ARCHIVES
        return voicebank.prepare_voicebank(
            args.root, base_url=args.base_url, val_speakers=parse_val_speakers(args.val_speakers),
            archives=archives, **options,
        )
    from dfl.preparation import dcase2016

    archives = dcase2016.ARCHIVES
    if sums:
        folders = [folder for folder, _ in archives]
        archives = list(zip(folders, with_checksums([s for _, s in archives], sums, args.checksums), strict=True))
    urls = {"*": args.base_url, dcase2016.TUT_DEV: args.tut_dev_url,
            dcase2016.TUT_EVAL: args.tut_eval_url, dcase2016.CHIME: args.chime_url}
    return dcase2016.prepare_dcase2016(
        args.root, base_urls={k: v for k, v in urls.items() if v}, archives=archives, **options,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except (DownloadError, ArchiveError, AudioError, ValueError, OSError) as exc:
        print(f"dfl-prepare {args.dataset}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dfl-prepare {args.dataset}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
