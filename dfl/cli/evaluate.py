"""``dfl-eval``: every metric for noisy and enhanced speech of a paired test set, with reports.

    dfl-eval checkpoint=models/denoiser.pt data_dir=data/voicebank
    dfl-eval enhanced_dir=out/enhanced data_dir=data/voicebank split=val
    dfl-eval checkpoint=outputs/train/runs/<time> data_dir=data/voicebank   # a run's tested checkpoint
    dfl-eval experiment=eval_voicebank checkpoint=models/denoiser.pt logger=wandb

Writes into the Hydra run directory: ``per_file.csv``, ``summary.json``, ``summary.md``,
``plots/``, ``report.html`` with ``report/`` (players and spectrograms), and ``paper_table.md``,
``enhanced/`` when a model was run.

With ``checkpoint=``, ``enhanced/`` holds exactly what ``dfl-denoise --model`` writes (same chunking,
the noisy files' own format: 16-bit in, 16-bit out), and those files are scored: both routes give one
answer per model.

The model is ``checkpoint=`` (not ``model=``: that name is the model config group of dfl-train).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import numpy as np
import soundfile as sf
from omegaconf import DictConfig, OmegaConf

from dfl import hydra_resolvers
from dfl.audio import AudioError, read_audio
from dfl.metrics import compute_many, expand_metric_names

log = logging.getLogger(__name__)

CONF_DIR = hydra_resolvers.CONF_DIR
hydra_resolvers.register()  # the shared hydra/logger configs use dfl's resolvers (before @hydra.main runs)
EVAL_KEYS = ("task_name", "checkpoint", "enhanced_dir", "data_dir", "split", "sample_rate", "max_files", "metrics", "chunk_seconds")


def _load_checked(path: Path, sample_rate: int) -> np.ndarray:
    """A mono file at ``sample_rate``; another rate is an error (metrics never resample silently)."""
    data, sr = read_audio(path)
    if sr != sample_rate:
        raise ValueError(f"{path}: sample rate {sr} Hz, expected {sample_rate} Hz (set sample_rate= or resample)")
    if data.shape[0] != 1:
        raise ValueError(f"{path}: {data.shape[0]} channels, metrics need mono files")
    return data[0]


def score_file(job: tuple) -> dict:
    """Metrics of one file for noisy and enhanced (run in a worker process)."""
    name, noisy_path, clean_path, enhanced_path, metrics, sample_rate = job
    clean = _load_checked(clean_path, sample_rate)
    row = {"file": name}
    for kind, path in (("noisy", noisy_path), ("enhanced", enhanced_path)):
        x = _load_checked(path, sample_rate)
        if x.shape != clean.shape:
            raise ValueError(
                f"{path}: {x.size} samples but its clean reference {clean_path} has {clean.size}; "
                "enhanced and clean files must have the same length"
            )
        try:
            row[kind] = compute_many(metrics, clean, x, sample_rate)
        except ValueError as exc:  # bad input (e.g. an empty file): name it
            raise ValueError(f"{path} (clean {clean_path}): {exc}") from exc
    return row


def score_all(jobs: list[tuple], num_workers: int, progress: bool = True) -> list[dict]:
    """Score every file, in input order; ``num_workers <= 1`` runs serially (the same numbers to float64 rounding).

    The workers are a :class:`~dfl.metric_pool.MetricPool`, the pool validation scores through too.
    """
    from tqdm import tqdm

    from dfl.metric_pool import MetricPool, result

    bar = dict(total=len(jobs), desc="metrics", unit="file", disable=not progress)
    if num_workers <= 1 or len(jobs) <= 1:
        return [score_file(j) for j in tqdm(jobs, **bar)]
    with MetricPool(num_workers) as pool:
        futures = [pool.submit(score_file, job) for job in jobs]
        return [result(f) for f in tqdm(futures, **bar)]


def list_pairs(data_dir: Path, split: str) -> list[tuple[str, Path, Path]]:
    """``(name, noisy, clean)`` of a split of a paired folder (``ROOT/<split>set_{noisy,clean}``)."""
    from datamodules.paired_folder import SPLITS, scan_pairs

    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    prefix = SPLITS[split]
    pairs = scan_pairs(data_dir / f"{prefix}_noisy", data_dir / f"{prefix}_clean")
    return [(noisy.name, noisy, clean) for noisy, clean, _ in pairs]


def enhance_with_model(
    model_path: Path, pairs, out_dir: Path, sample_rate: int, progress: bool = True, chunk_seconds: float = 20.0
) -> Path:
    """Write into ``out_dir`` exactly what ``dfl-denoise --model MODEL`` writes for each noisy file.

    Same :class:`~dfl.inference.Denoiser` (chunks of ``chunk_seconds``, the ``--chunk-seconds`` of
    dfl-denoise), same output format as the input (a 16-bit noisy file gives a 16-bit enhanced file):
    ``dfl-eval checkpoint=MODEL`` and ``dfl-denoise`` + ``dfl-eval enhanced_dir=`` score the same files.
    """
    from tqdm import tqdm

    from dfl.denoise_files import Job, denoise_file
    from dfl.inference import Denoiser

    for _, noisy, _ in pairs:  # metrics never resample: refuse before running the model
        rate = sf.info(str(noisy)).samplerate
        if rate != sample_rate:
            raise ValueError(f"{noisy}: sample rate {rate} Hz, expected {sample_rate} Hz (set sample_rate= or resample)")
    denoiser = Denoiser.from_checkpoint(model_path, chunk_seconds=chunk_seconds)
    for name, noisy, _ in tqdm(pairs, desc="enhance", unit="file", disable=not progress):
        try:
            denoise_file(denoiser, Job(noisy, Path(name)), out_dir, lambda n: None)
        except AudioError as exc:
            raise ValueError(f"{model_path}: {exc}") from exc
    return out_dir


def resolve_checkpoint(path: Path) -> Path:
    """A model file as given, or for a ``dfl-train`` run folder the checkpoint its test used (``metrics.json``),
    else its ``checkpoints/last.ckpt``."""
    import json

    if not path.is_dir():
        return path
    metrics = path / "metrics.json"
    if metrics.is_file():
        best = json.loads(metrics.read_text()).get("checkpoint")
        for candidate in (Path(best), path / "checkpoints" / Path(best).name) if best else ():
            if candidate.is_file():
                return candidate
    if (path / "checkpoints" / "last.ckpt").is_file():
        return path / "checkpoints" / "last.ckpt"
    raise ValueError(f"checkpoint={path}: a folder without metrics.json's checkpoint or checkpoints/last.ckpt "
                     "(give a model file or a dfl-train run folder)")


def _enhanced_paths(enhanced_dir: Path, pairs) -> list[Path]:
    if not enhanced_dir.is_dir():
        raise ValueError(f"enhanced_dir={enhanced_dir}: directory not found")
    paths = [enhanced_dir / name for name, _, _ in pairs]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(
            f"{missing[0]}: enhanced file missing (enhanced_dir needs one file per noisy test file, same name)"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return paths


def _wandb_logger(cfg: DictConfig):
    """The W&B logger of ``logger=wandb``, or None (other loggers have nothing to do here)."""
    from hydra.utils import instantiate

    for entry in (cfg.get("logger") or {}).values():
        if entry is not None and "WandbLogger" in str(entry.get("_target_", "")):
            return instantiate(entry, _convert_="all")
    return None


def _log_wandb(logger, rows, metrics, summary, plots: list[Path], cfg: DictConfig) -> None:
    import wandb

    from dfl.eval_report import KINDS

    def cell(v):
        return None if not isinstance(v, (int, float)) else float(v)

    columns = ["file"] + [f"{k}_{m}" for k in KINDS for m in metrics]
    data = [[r["file"]] + [cell(r[k][m]) for k in KINDS for m in metrics] for r in rows]
    stats = ["noisy", "enhanced", "difference"]
    summary_rows = [[m] + [summary[m][s]["mean"] for s in stats] + [summary[m][s]["ci95"] for s in stats]
                    + [summary[m]["noisy"]["missing"], summary[m]["enhanced"]["missing"]] for m in metrics]
    run = logger.experiment
    # only dfl-eval's own settings: the shared logger group may drag in training-only entries
    own = {k: cfg.get(k) for k in EVAL_KEYS}
    run.config.update(OmegaConf.to_container(OmegaConf.create(own), resolve=True), allow_val_change=True)
    run.log({
        "eval/per_file": wandb.Table(columns=columns, data=data),
        "eval/summary": wandb.Table(
            columns=["metric"] + [f"{s}_mean" for s in stats] + [f"{s}_ci95" for s in stats]
            + ["noisy_missing", "enhanced_missing"], data=summary_rows),
        **{f"eval/plots/{p.stem}": wandb.Image(str(p)) for p in plots},
        **{f"eval/{s}/{m}": summary[m][s]["mean"] for m in metrics for s in stats
           if summary[m][s]["mean"] is not None},
    })
    run.finish()


def evaluate(cfg: DictConfig) -> dict:
    """Run the whole evaluation; returns the summary (also written to the run directory)."""
    from dfl import eval_report

    out_dir = Path(cfg.paths.output_dir)
    metrics = expand_metric_names(cfg.metrics, "metrics")
    if (cfg.get("checkpoint") is None) == (cfg.get("enhanced_dir") is None):
        raise ValueError("give exactly one of checkpoint=PATH (a dfl model/checkpoint) or enhanced_dir=DIR")
    if cfg.get("data_dir") is None:
        raise ValueError("data_dir=ROOT is required (ROOT/<split>set_noisy and ROOT/<split>set_clean)")
    if cfg.report.enabled and int(cfg.report.per_group) < 1:
        raise ValueError(f"report.per_group must be >= 1, got {cfg.report.per_group}")
    sr = int(cfg.sample_rate)
    pairs = list_pairs(Path(cfg.data_dir), cfg.split)
    if cfg.get("max_files"):
        pairs = pairs[: int(cfg.max_files)]
    checkpoint = resolve_checkpoint(Path(cfg.checkpoint)) if cfg.get("checkpoint") is not None else None
    if checkpoint is not None:
        source = checkpoint.name
        enhanced_dir = enhance_with_model(checkpoint, pairs, out_dir / "enhanced", sr, cfg.progress,
                                          float(cfg.get("chunk_seconds", 20.0)))
    else:
        enhanced_dir = Path(cfg.enhanced_dir)
        source = enhanced_dir.name
    enhanced = _enhanced_paths(enhanced_dir, pairs)
    jobs = [(name, noisy, clean, enh, metrics, sr) for (name, noisy, clean), enh in zip(pairs, enhanced, strict=True)]
    workers = int(cfg.num_workers) if cfg.get("num_workers") is not None else (os.cpu_count() or 1)
    rows = score_all(jobs, workers, cfg.progress)

    eval_report.write_per_file_csv(out_dir / "per_file.csv", rows, metrics)
    summary = eval_report.summarize(rows, metrics)
    inputs = {"data_dir": str(Path(cfg.data_dir).resolve()), "split": cfg.split,
              "enhanced_dir": str(enhanced_dir.resolve()),
              "checkpoint": str(checkpoint.resolve()) if checkpoint is not None else None}
    eval_report.write_summaries(out_dir, summary, len(rows), source, bool(cfg.paper_table), inputs)

    plots, notes = [], []
    for name, noisy, clean in pairs[: int(cfg.plots.num_spectrograms)]:
        signals = {"noisy": _load_checked(noisy, sr), "enhanced": _load_checked(enhanced_dir / name, sr),
                   "clean": _load_checked(clean, sr)}
        frames = min(x.size for x in signals.values())
        if frames < eval_report.SPECTROGRAM_FRAME:
            notes.append(f"spectrogram of {name} skipped: {frames} samples, shorter than one "
                         f"{eval_report.SPECTROGRAM_FRAME}-sample analysis frame")  # fmt: skip
            continue
        plots.append(eval_report.spectrogram_png(out_dir / "plots" / f"spectrogram_{Path(name).stem}.png",
                                                 signals, sr, name))
    if "pesq" in metrics:
        gains = [r["enhanced"]["pesq"] - r["noisy"]["pesq"] for r in rows
                 if all(isinstance(r[k]["pesq"], float) for k in ("noisy", "enhanced"))]
        if gains:
            plots.append(eval_report.improvement_histogram_png(out_dir / "plots" / "pesq_improvement.png", gains))
        else:
            notes.append("pesq_improvement.png skipped: PESQ is missing for every file (see summary.md)")
    if notes:
        eval_report.write_plot_notes(out_dir / "plots" / "NOTES.txt", notes)
        for note in notes:
            log.warning("dfl-eval: %s", note)

    report = None
    if cfg.report.enabled:
        from dfl.html_report import write_eval_report

        def signals_of(i: int) -> dict[str, np.ndarray]:
            name, noisy, clean = pairs[i]
            return {"noisy": _load_checked(noisy, sr), "enhanced": _load_checked(enhanced[i], sr),
                    "clean": _load_checked(clean, sr)}

        report = write_eval_report(out_dir, rows, metrics, summary, signals_of, sr, str(checkpoint or enhanced_dir),
                                   int(cfg.report.per_group), int(cfg.report.seed),
                                   [p for p in plots if p.name == "pesq_improvement.png" and len(rows) >= 5])

    logger = _wandb_logger(cfg)
    if logger is not None:
        _log_wandb(logger, rows, metrics, summary, plots, cfg)
    print((out_dir / "summary.md").read_text())
    log.info("dfl-eval wrote %s", out_dir)
    if report is not None:
        print(f"Report (open in a browser): {report.resolve()}")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
