"""`dfl-bench`: inference speed (plain vs fast path vs ONNX Runtime) and training throughput.

Reports, for the ``can_paper`` and ``can_authors`` denoisers, fp32, batch 1, a
10 s 16 kHz input: real-time factor (compute seconds per audio second; the
minimum over repeats, since shared machines are noisy), FLOPs per second of
audio, achieved GFLOP/s next to a 2048³ fp32 GEMM measured in the same run
(the practical ceiling; GFLOP/s count the direct convolution's FLOPs, so the
Winograd fast path, which does about half of them, can pass it), peak memory,
and the max abs difference of each fast path to the plain model; on CUDA also bf16. Training throughput is audio
seconds per second for one feature-loss step (``can_paper`` + a 14-layer loss
network, first 6 layers in the loss, batch 1, 3 s). ``--epoch-utterances N`` also times whole
training epochs through ``dfl-train`` on N generated utterances with VoiceBank-DEMAND's length
distribution (batch 1 as in the paper, and length-bucketed batches), and projects the time of one
VoiceBank-DEMAND epoch from the measured throughput. Results go to JSON too.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dfl import SAMPLE_RATE
from dfl.audio import atomic_write
from dfl.kernels import accelerate
from dfl.kernels.folded_inference import FoldedInferenceNet
from dfl.kernels.native import cpu_kernels
from dfl.memory import keep_freed_memory
from dfl.models import ContextAggregationNet, LossNetwork
from dfl.models.conv import set_cuda_conv
from dfl.presets import architecture_preset
from dfl.systems.denoising import adam

MODELS = {name: architecture_preset("model", name) for name in ("can_paper", "can_authors")}


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRSS:
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_times(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall times of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def min_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    return min(run_times(fn, repeats, sync))


def gemm_gflops(device: torch.device, dtype=torch.float32, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return 2 * n**3 / min_time(lambda: a @ b, repeats, sync) / 1e9


def trained_like(config: dict, seed: int = 0) -> ContextAggregationNet:
    """A model with random weights, non-trivial adaptive-BN scalars and running statistics."""
    torch.manual_seed(seed)
    model = ContextAggregationNet(**config)
    with torch.no_grad():
        for norm in model.norms:
            if hasattr(norm, "alpha"):
                norm.alpha.uniform_(0.5, 1.0)
                norm.beta.uniform_(0.2, 0.6)
        model.train()
        model(0.1 * torch.randn(1, SAMPLE_RATE))
    return model.eval()


def bench_inference(name: str, config: dict, args, gemm: float, cuda_gemm: dict | None = None) -> dict:
    """Every inference path of one model; ``gemm`` (and ``cuda_gemm`` per dtype) is each device's GEMM GFLOP/s."""
    model = trained_like(config)  # the plain PyTorch layers: the reference
    fast = FoldedInferenceNet(model)
    seconds = args.seconds
    x = 0.1 * torch.randn(1, int(seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(1))
    flops_per_audio_second = fast.flops_per_sample() * SAMPLE_RATE
    flops = flops_per_audio_second * seconds
    with torch.inference_mode():
        reference = model(x)
    result = {
        "model": name,
        "batch_stats_at_eval": fast.batch_stats,
        "receptive_field": fast.receptive_field,
        "input_seconds": seconds,
        "gflop_per_audio_second": flops_per_audio_second / 1e9,
        "native_kernels": cpu_kernels() is not None,
        "cpu": {},
    }

    def record(label: str, fn: Callable[[], torch.Tensor], target: dict, sync=lambda: None, peak=None,
               ceiling: float = gemm) -> None:
        with PeakRSS() as mem:
            t = min_time(fn, args.repeats, sync)
        out = fn()
        entry = {
            "rtf": t / seconds,
            "gflops": flops / t / 1e9,
            "fraction_of_gemm": flops / t / 1e9 / ceiling,
            "max_abs_diff_to_plain": float((out.float().cpu() - reference).abs().max()),
            "peak_rss_mb": mem.peak / 2**20,
            "rss_increase_mb": (mem.peak - mem.start) / 2**20,
        }
        if peak is not None:
            entry["peak_gpu_mb"] = peak() / 2**20
        target[label] = entry
        print(
            f"  {name:12s} {label:22s} RTF {entry['rtf']:.4g}  {entry['gflops']:6.1f} GFLOP/s "
            f"({100 * entry['fraction_of_gemm']:.0f}% of GEMM)  max|Δ| {entry['max_abs_diff_to_plain']:.1e}  "
            f"peak RSS {entry['peak_rss_mb']:.0f} MB",
            flush=True,
        )

    def plain_call(net: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return net(x)

    def plain() -> torch.Tensor:
        return plain_call(model)

    skip_cpu = getattr(args, "skip_cpu", False)
    if not skip_cpu:
        record("plain_fp32", plain, result["cpu"])
        training = accelerate(model, "training")  # what training and validation run on a CPU
        record("training_kernels_fp32", lambda: plain_call(training), result["cpu"])
        direct = FoldedInferenceNet(model, winograd=False)
        record("fast_direct_fp32", lambda: direct.forward_cpu(x), result["cpu"])
        record("fast_fp32", lambda: fast.forward_cpu(x), result["cpu"])  # Winograd where the kernels compiled
    if not args.skip_onnxruntime and not skip_cpu:
        from dfl.export import export_onnx, load_onnx_session

        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx")
            session, _ = load_onnx_session(path)
        feed = {"waveform": x.numpy()}
        record("onnxruntime_fp32", lambda: torch.from_numpy(session.run(None, feed)[0]), result["cpu"])
    if torch.cuda.is_available() and not args.skip_cuda:
        result["cuda"] = {}
        dev = torch.device("cuda")
        xg, model_g, fast_g = x.to(dev), trained_like(config).to(dev), FoldedInferenceNet(model).to(dev)
        sync, peak = torch.cuda.synchronize, torch.cuda.max_memory_allocated

        def plain_cuda(dtype):
            def run():
                with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    return model_g(xg)

            return run

        def fast_cuda(dtype):
            def run():
                with torch.inference_mode():
                    return fast_g(xg.to(dtype))

            return run

        cuda_gemm = cuda_gemm or {"fp32": float("nan"), "bf16": float("nan")}
        for label, fn, dtype in [
            ("plain_fp32", plain_cuda(torch.float32), "fp32"),
            ("fast_fp32", fast_cuda(torch.float32), "fp32"),
            ("plain_bf16_autocast", plain_cuda(torch.bfloat16), "bf16"),
            ("fast_bf16", fast_cuda(torch.bfloat16), "bf16"),
        ]:
            torch.cuda.reset_peak_memory_stats()
            record(label, fn, result["cuda"], sync, peak, ceiling=cuda_gemm[dtype])  # vs the GPU's GEMM
    return result


def cpu_description(cpuinfo: str | None = None) -> dict:
    """The CPU the figures came from: model name, family and model numbers, widest vector ISA.

    Figures from different sessions are comparable only on the same CPU (``/proc/cpuinfo``'s first
    processor; on other systems, what :mod:`platform` knows)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("asimd", "NEON"),
                                        ("sse2", "SSE2")) if flag in flags), None)  # fmt: skip
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "family": fields.get("cpu family"),
        "model_number": fields.get("model"),
        "vector_isa": isa,
    }


def _cpu_line(cpu: dict) -> str:
    ids = ", ".join(f"{k} {cpu[v]}" for k, v in (("family", "family"), ("model", "model_number")) if cpu[v])
    return cpu["model"] + (f" ({ids})" if ids else "") + (f", {cpu['vector_isa']}" if cpu["vector_isa"] else "")


def _train_step(model, optimizer, loss_fn, noisy, clean) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss, _ = loss_fn(model(noisy), clean)
    loss.backward()
    optimizer.step()


def _training_step_fn(device: str, seconds: float = 3.0):
    """One feature-loss training step of ``can_paper`` as dfl-train runs it (``dfl.kernels`` on the CPU)."""
    from dfl.losses import FeatureLoss

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    noisy, clean = ((0.1 * torch.randn(1, int(seconds * SAMPLE_RATE), generator=gen)).to(dev) for _ in range(2))
    torch.manual_seed(1)
    model = ContextAggregationNet().to(dev).train()
    loss_fn = accelerate(FeatureLoss(LossNetwork(n_layers=14), layers=6).to(dev))
    runner = accelerate(model, "training") if dev.type == "cpu" else model
    optimizer = adam(list(model.parameters()), lr=1e-4)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        _train_step(runner, optimizer, loss_fn, noisy, clean)
        sync()

    return step


def _loss_and_grads(model, loss_fn, noisy, clean, params: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """The loss and every parameter's gradient (float64 copies, named as ``params``'s: by default ``model``'s) of one step."""
    model.zero_grad(set_to_none=True)
    loss, _ = loss_fn(model(noisy), clean)
    loss.backward()
    named = (params or model).named_parameters()
    return loss.detach().double().cpu(), {n: p.grad.detach().double().cpu() for n, p in named}


def _max_rel_diff(grads: dict, reference: dict) -> float:
    """Largest |Δ| of any parameter's gradient relative to that gradient's largest reference value."""
    return max(
        float((g - reference[n]).abs().max() / reference[n].abs().max().clamp_min(1e-30)) for n, g in grads.items()
    )


def bench_training(device: torch.device, args) -> dict:
    """Audio seconds per second of one feature-loss step (forward, loss, backward, Adam step).

    On the CPU both implementations run — the plain PyTorch layers (``plain``) and what
    :func:`dfl.kernels.accelerate` gives for training (``cpu_kernels``, what ``dfl-train`` runs by default) —
    from the same weights on the same batch, with the same feature loss (through the kernels too).
    Next to the speeds: how far their losses and gradients are apart, and how far each is from a
    float64 run of the plain layers (the float32 rounding floor).
    """
    import copy

    from dfl.losses import FeatureLoss

    seconds = 3.0
    gen = torch.Generator().manual_seed(0)
    noisy = (0.1 * torch.randn(1, int(seconds * SAMPLE_RATE), generator=gen)).to(device)
    clean = (0.1 * torch.randn(1, int(seconds * SAMPLE_RATE), generator=gen)).to(device)
    torch.manual_seed(0)
    weights = ContextAggregationNet().state_dict()
    plain_loss = FeatureLoss(LossNetwork(n_layers=14), layers=6).to(device)
    loss_fn = accelerate(plain_loss)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def build(kernels: bool, dtype=torch.float32) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the plain model, what runs it: itself or dfl.kernels' training module sharing its parameters)"""
        model = ContextAggregationNet()
        model.load_state_dict(weights)
        model = model.to(device, dtype).train()
        return model, (accelerate(model, "training") if kernels else model)

    cpu = torch.device("cpu")
    exact = _loss_and_grads(build(False, torch.float64)[0].to(cpu), copy.deepcopy(plain_loss).to(cpu).double(),
                            noisy.to(cpu).double(), clean.to(cpu).double())  # fmt: skip
    repeats = args.train_repeats if device.type == "cpu" else max(args.train_repeats, 20)
    result: dict = {"utterance_seconds": seconds}
    plain = None
    # CPU: plain layers vs dfl.kernels; CUDA: convolutions through cuDNN vs one matmul each (cuda_conv=gemm)
    variants = {"plain": (False, "cudnn"), "cpu_kernels": (True, "cudnn")} if device.type == "cpu" else \
        {"plain": (False, "cudnn"), "gemm": (False, "gemm")}  # fmt: skip
    for label, (kernels, cuda_conv) in variants.items():
        set_cuda_conv(cuda_conv)
        try:
            params, model = build(kernels)
            loss, grads = _loss_and_grads(model, loss_fn, noisy, clean, params)
            optimizer = adam(list(model.parameters()), lr=1e-4)  # as dfl-train's
            times = run_times(functools.partial(_train_step, model, optimizer, loss_fn, noisy, clean), repeats, sync)
        finally:
            set_cuda_conv("cudnn")
        t, mean = min(times), sum(times) / len(times)
        entry = {"step_seconds": t, "step_seconds_mean": mean, "audio_seconds_per_second": seconds / t}
        line = f"  training {device.type} {label:11s}: {seconds / t:.2f} audio-s/s ({t:.3f} s/step, mean {mean:.3f})"
        entry["max_grad_rel_diff_to_float64"] = _max_rel_diff(grads, exact[1])
        line += f"; max grad Δ to float64 {entry['max_grad_rel_diff_to_float64']:.1e}"
        if plain is None:
            plain = (loss, grads)
        else:
            entry["loss_rel_diff_to_plain"] = float((loss - plain[0]).abs() / plain[0].abs())
            entry["max_grad_rel_diff_to_plain"] = _max_rel_diff(grads, plain[1])
            line += (f", to plain: loss {entry['loss_rel_diff_to_plain']:.1e}, "
                     f"grad {entry['max_grad_rel_diff_to_plain']:.1e} (relative)")  # fmt: skip
        result[label] = entry
        print(line, flush=True)
    result["audio_seconds_per_second"] = max(v["audio_seconds_per_second"] for v in result.values() if isinstance(v, dict))
    return result


VOICEBANK_TRAIN_SECONDS = 9.4 * 3600  # the 28-speaker training set: 11 572 utterances
# Training runs of the epoch benchmark: dfl-train overrides on top of the common ones.
EPOCH_RUNS = {
    "batch1": [],  # the paper: whole utterances, one per step
    # whole utterances of similar length, padded (masked) to multiples of 4096 samples: few shapes for cuDNN
    "bucket16_pad4096": ["data.batch_size=16", "data.bucket=true", "data.pad_to_multiple=4096"],
}
EPOCH_RUNS_CUDA = {
    "batch1_gemm": ["cuda_conv=gemm"],  # no cuDNN plan per new length
    "batch1_pad4096": ["data.pad_to_multiple=4096"],  # few lengths, so cuDNN's plans are reused
    "bucket16_pad4096_bf16": [*EPOCH_RUNS["bucket16_pad4096"], "trainer.precision=bf16-mixed"],
}


def voicebank_like_seconds(utterances: int, rng: np.random.Generator) -> np.ndarray:
    """Utterance lengths like VoiceBank-DEMAND's training set: log-normal, mean ≈ 2.9 s, within 1.1–15 s."""
    return np.clip(rng.lognormal(np.log(2.92) - 0.35**2 / 2, 0.35, utterances), 1.1, 15.0)


def write_voicebank_like(root: Path, utterances: int, seed: int = 0) -> float:
    """A paired-folder set with :func:`voicebank_like_seconds` training lengths; returns their audio seconds.

    The signals are random (speed does not depend on them). Validation gets 2 short utterances,
    which the epoch benchmark never uses (dfl-train needs the split to exist).
    """
    import soundfile as sf

    rng = np.random.default_rng(seed)
    lengths = voicebank_like_seconds(utterances, rng)
    total = 0
    for split, split_lengths in (("trainset", lengths), ("valset", [1.0, 1.0])):
        for kind in ("noisy", "clean"):
            (root / f"{split}_{kind}").mkdir(parents=True)
        for i, seconds in enumerate(split_lengths):
            n = int(seconds * SAMPLE_RATE)
            total += n if split == "trainset" else 0
            clean = (0.1 * rng.standard_normal(n)).astype(np.float32)
            noisy = clean + (0.05 * rng.standard_normal(n)).astype(np.float32)
            for kind, x in (("noisy", noisy), ("clean", clean)):
                sf.write(root / f"{split}_{kind}" / f"u{i:05d}.wav", x, SAMPLE_RATE, subtype="FLOAT")
    return total / SAMPLE_RATE


def epoch_throughput(metrics_csv: Path) -> list[float]:
    """``perf/audio_seconds_per_second`` of each epoch of a run (from the CSV logger)."""
    with open(metrics_csv, newline="") as f:
        return [float(r["perf/audio_seconds_per_second"]) for r in csv.DictReader(f) if r.get("perf/audio_seconds_per_second")]


def bench_training_epoch(device: torch.device, args, extra_overrides: tuple[str, ...] = ()) -> dict:
    """Whole training epochs through `dfl-train` (data loading, Lightning, the balancer, logging).

    ``can_paper`` + the default loss network and feature loss, ``args.epoch_utterances`` generated
    utterances, 2 epochs, no validation; the second epoch counts (the first pays for warm-up).
    """
    runs = {**EPOCH_RUNS, **(EPOCH_RUNS_CUDA if device.type == "cuda" else {})}
    if args.epoch_runs:
        for label in sorted(set(args.epoch_runs) - set(runs)):
            print(f"  epoch {device.type} {label}: skipped (a CUDA run)", flush=True)
        runs = {label: overrides for label, overrides in runs.items() if label in args.epoch_runs}
    result: dict = {"utterances": args.epoch_utterances, "voicebank_train_seconds": VOICEBANK_TRAIN_SECONDS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result["audio_seconds"] = write_voicebank_like(tmp / "data", args.epoch_utterances)
        for label, overrides in runs.items():
            run_dir = tmp / label
            cmd = [sys.executable, "-m", "dfl.cli.train", f"hydra.run.dir={run_dir}", "data=paired_folder",
                   f"data.root={tmp / 'data'}", f"paths.cache_dir={tmp / 'cache'}",
                   f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "trainer.max_epochs=2",
                   "+trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "test=false", "logger=csv",
                   "callbacks=[loss_weight_balancer,training_throughput]",
                   f"keep_freed_memory={str(not args.return_freed_memory).lower()}", *overrides, *extra_overrides]  # fmt: skip
            env = {**os.environ, "WANDB_MODE": "offline"}
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"dfl-train ({label}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            per_epoch = epoch_throughput(run_dir / "csv" / "metrics.csv")
            if not per_epoch:
                raise RuntimeError(f"dfl-train ({label}) logged no perf/audio_seconds_per_second in "
                                   f"{run_dir / 'csv' / 'metrics.csv'}")  # fmt: skip
            speed = per_epoch[-1]
            entry = {
                "overrides": overrides,
                "audio_seconds_per_second_per_epoch": per_epoch,
                "audio_seconds_per_second": speed,
                "voicebank_epoch_minutes": VOICEBANK_TRAIN_SECONDS / speed / 60,
                "wall_seconds_whole_run": time.perf_counter() - start,
            }
            result[label] = entry
            print(f"  epoch {device.type} {label:21s}: {speed:8.1f} audio-s/s → one VoiceBank-DEMAND epoch "
                  f"(9.4 h) in {entry['voicebank_epoch_minutes']:.1f} min", flush=True)  # fmt: skip
    return result


def validation_set(utterances: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(noisy, clean)`` speech-like pairs with VoiceBank-like lengths (mean ≈ 2.9 s), SNR 0-15 dB."""
    from datamodules.synthetic_speech import synthesize_noise, synthesize_utterance

    rng = np.random.default_rng(seed)
    pairs = []
    for seconds in voicebank_like_seconds(utterances, rng):
        clean = synthesize_utterance(rng, SAMPLE_RATE, float(seconds))
        noise = synthesize_noise("babble", rng, len(clean), SAMPLE_RATE)
        gain = np.sqrt(np.mean(clean**2) / np.mean(noise**2)) * 10 ** (-rng.uniform(0, 15) / 20)
        pairs.append(((clean + gain * noise).astype(np.float32), clean))
    return pairs


def bench_validation(utterances: int, workers: list[int], seed: int = 0, device: str = "cpu", repeats: int = 3,
                     train_steps: int = 0) -> dict:
    """One validation epoch as ``DenoisingSystem`` runs it: ``can_paper`` on each whole utterance, then
    PESQ/STOI/SI-SDR of the enhanced output (a later epoch's work; the first also scores the noisy input).

    The model runs on ``device``. ``model_only`` runs the network alone; ``serial`` scores in this
    process after each utterance; ``pooled_<k>`` hands each utterance to a
    :class:`~dfl.metric_pool.MetricPool` of ``k`` processes (started and warmed before the clock
    starts: validation keeps its pool for the whole fit) while the model runs on (on a GPU; on the CPU
    once the model has run on every utterance, as ``DenoisingSystem`` does). ``metrics_alone``
    is the metrics computed serially without the model: what validation would add if nothing
    overlapped. Each figure is the minimum of ``repeats`` runs, the runs of all settings interleaved
    (a busy machine slows them alike). ``added_seconds``: the time above ``model_only``;
    ``added_vs_metrics_alone``: that as a fraction of ``metrics_alone``.

    ``train_steps`` > 0 adds what a run does next: that many training steps (``can_paper``, feature loss,
    3 s, batch 1) after the validation epoch. ``run_no_metrics``: validation without metrics, then the
    steps; ``run_serial``: the metrics scored in this process first (``system.metric_workers=0``);
    ``run_overlap_<k>``: the metrics left to ``k`` workers while the steps run (``system.val_metrics_overlap``;
    on the CPU the steps use ``k`` threads fewer until the scores are in), then the wait for the scores.
    ``added_vs_serial``: the time a setting adds above ``run_no_metrics``, over ``run_serial``'s.
    """
    from dfl.metric_pool import CoreShare, MetricPool, result, score_utterance

    pairs = validation_set(utterances, seed)
    audio_seconds = sum(len(c) for _, c in pairs) / SAMPLE_RATE
    model = trained_like(MODELS["can_paper"]).to(device)
    metrics = ["pesq", "stoi", "si_sdr"]

    def job(i: int, clean: np.ndarray, enhanced: np.ndarray) -> tuple:
        return f"u{i}", clean.astype(np.float64), {"enhanced": enhanced.astype(np.float64)}, metrics, SAMPLE_RATE

    def enhance(noisy: np.ndarray) -> np.ndarray:
        out = model(torch.from_numpy(noisy)[None].to(device))[0]
        return out.cpu().numpy()

    def validate(pool: MetricPool | None) -> list:
        """As DenoisingSystem: on a CPU the workers get the jobs once the model has run on every utterance."""
        futures, held = [], []
        hold = device == "cpu" and pool is not None and pool.num_workers > 0
        with torch.inference_mode():
            for i, (noisy, clean) in enumerate(pairs):
                enhanced = enhance(noisy)
                if hold:
                    held.append(job(i, clean, enhanced))
                elif pool is not None:
                    futures.append(pool.submit(score_utterance, job(i, clean, enhanced)))
        return futures + [pool.submit(score_utterance, work) for work in held]

    def epoch(pool: MetricPool | None) -> float:
        start = time.perf_counter()
        for f in validate(pool):
            result(f)
        return time.perf_counter() - start

    step = _training_step_fn(device) if train_steps > 0 else None

    def validate_then_train(pool: MetricPool | None, overlap: bool) -> float:
        """Validation, then ``train_steps`` training steps; with ``overlap`` the scores are waited for after them."""
        start = time.perf_counter()
        cores = CoreShare(pool.num_workers if pool is not None else 0)
        try:
            futures = validate(pool)
            if not overlap:
                for f in futures:
                    result(f)
            for _ in range(train_steps):
                if device == "cpu":
                    cores.update(futures)
                step()
        finally:
            cores.reclaim()
        for f in futures:
            result(f)
        return time.perf_counter() - start

    with torch.inference_mode():
        outputs = [enhance(noisy) for noisy, _ in pairs]  # also the warm-up (native kernels, allocator)

    def metrics_alone() -> float:
        start = time.perf_counter()
        for i, ((_, clean), enhanced) in enumerate(zip(pairs, outputs)):
            score_utterance(job(i, clean, enhanced))
        return time.perf_counter() - start

    pools = {f"pooled_{k}": MetricPool(k) for k in workers}
    starts = {}
    for label, pool in pools.items():
        start = time.perf_counter()
        result(pool.submit(score_utterance, job(0, pairs[0][1], outputs[0])))
        starts[label] = time.perf_counter() - start
    settings = {"metrics_alone": metrics_alone, "model_only": lambda: epoch(None),
                "serial": lambda: epoch(MetricPool(0)), **{k: functools.partial(epoch, p) for k, p in pools.items()}}
    if train_steps > 0:
        step()  # warm-up
        settings.update({"run_no_metrics": lambda: validate_then_train(None, False),
                         "run_serial": lambda: validate_then_train(MetricPool(0), False),
                         **{f"run_overlap_{p.num_workers}": functools.partial(validate_then_train, p, True)
                            for p in pools.values()}})
    times: dict[str, list[float]] = {label: [] for label in settings}
    try:
        for _ in range(repeats):
            for label, run in settings.items():
                times[label].append(run())
    finally:
        for pool in pools.values():
            pool.close()
    runs = {label: {"seconds": min(t), "seconds_all": t} for label, t in times.items()}
    alone, model_only = runs["metrics_alone"]["seconds"], runs["model_only"]["seconds"]
    for label, entry in runs.items():
        if label.startswith("run_"):
            if label != "run_no_metrics":
                entry["added_seconds"] = entry["seconds"] - runs["run_no_metrics"]["seconds"]
            continue
        if label != "metrics_alone":
            entry["utterances_per_second"] = utterances / entry["seconds"]
        if label not in ("metrics_alone", "model_only"):
            entry["added_seconds"] = entry["seconds"] - model_only
            entry["added_vs_metrics_alone"] = entry["added_seconds"] / alone
        if label in starts:
            entry["pool_start_seconds"] = starts[label]
    if train_steps > 0:
        for label, entry in runs.items():
            if label.startswith("run_") and label not in ("run_no_metrics", "run_serial"):
                entry["added_vs_serial"] = entry["added_seconds"] / runs["run_serial"]["added_seconds"]
    return {"utterances": utterances, "audio_seconds": audio_seconds, "metrics": metrics, "device": device,
            "repeats": repeats, "train_steps": train_steps, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "runs": runs}


def bench_long_file(minutes: float, args) -> dict:
    """Peak resident memory of `dfl-denoise` on a generated ``minutes``-long 16 kHz mono file.

    ``can_paper`` uses running BN statistics, so dfl-denoise streams the file (20 s chunks, blocks read
    and written as they go); the file is generated block by block too.
    """
    import soundfile as sf

    from dfl.checkpoints import save_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(tmp / "model.pt", "denoiser", trained_like(MODELS["can_paper"]))
        n = int(minutes * 60 * SAMPLE_RATE)
        rng = np.random.default_rng(0)
        (tmp / "in").mkdir()
        with sf.SoundFile(str(tmp / "in" / "long.wav"), "w", SAMPLE_RATE, 1, subtype="PCM_16") as f:
            for start in range(0, n, 60 * SAMPLE_RATE):
                f.write((0.1 * rng.standard_normal(min(60 * SAMPLE_RATE, n - start))).astype(np.float32))
        cmd = [sys.executable, "-m", "dfl.cli.denoise", str(tmp / "in"), "-o", str(tmp / "out"),
               "--model", str(tmp / "model.pt"), "--chunk-seconds", "20", "--quiet"]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"dfl-denoise failed on the long file:\n{done.stderr}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "minutes": minutes,
        "path": "streaming (can_paper, 20 s chunks)",
        "peak_rss_mb": peak_mb,
        "under_1_5_gb": peak_mb < 1536,
        "rtf": elapsed / (n / SAMPLE_RATE),
    }
    print(f"  {minutes:g}-minute file: peak RSS {peak_mb:.0f} MB, RTF {result['rtf']:.3f} (whole CLI run, streaming)")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfl-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_results/bench.json"),
                        help="JSON file for the results (default bench_results/bench.json)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="denoisers to time (default: all)")
    parser.add_argument("--seconds", type=float, default=10.0, help="input length (default 10 s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the minimum counts")
    parser.add_argument("--train-repeats", type=int, default=10,
                        help="timed training steps per variant; the fastest counts, the mean is printed too (on a "
                        "shared machine single steps swing by 20 %% and more)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="leave glibc's defaults (dfl-train's keep_freed_memory=false) instead of keeping "
                        "freed buffers for reuse")  # fmt: skip
    parser.add_argument("--skip-onnxruntime", action="store_true", help="no ONNX Runtime inference rows")
    parser.add_argument("--skip-cuda", action="store_true", help="no CUDA rows even when a GPU is present")
    parser.add_argument("--skip-training", action="store_true", help="no training-throughput rows")
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA rows (the CPU reference still runs)")
    parser.add_argument("--epoch-utterances", type=int, default=0,
                        help="also time whole dfl-train epochs on this many generated utterances (0: skip)")
    parser.add_argument("--epoch-runs", nargs="+", default=None, metavar="RUN",
                        choices=[*EPOCH_RUNS, *EPOCH_RUNS_CUDA],
                        help="only these epoch runs (default: all for the device; the CUDA-only ones: "
                        + ", ".join(EPOCH_RUNS_CUDA) + ")")  # fmt: skip
    parser.add_argument(
        "--long-file-minutes", type=float, default=0.0, help="also check memory on a file this long (e.g. 60)"
    )
    parser.add_argument("--validation-utterances", type=int, default=0,
                        help="also time a validation epoch (can_paper + PESQ/STOI/SI-SDR) on this many VoiceBank-like "
                        "utterances, metrics scored serially and in worker pools (0: skip)")  # fmt: skip
    parser.add_argument("--validation-workers", type=int, nargs="+", default=None, metavar="K",
                        help="pool sizes for --validation-utterances (default: 1 and dfl-train's default); each "
                        "setting runs --repeats times, interleaved, the minimum counts")
    parser.add_argument("--validation-train-steps", type=int, default=20, metavar="S",
                        help="with --validation-utterances: also time validation followed by S training steps (3 s, "
                        "batch 1) with the metrics serial vs overlapping the steps (0: skip)")
    parser.add_argument("--skip-inference", action="store_true", help="no inference rows")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cpu = torch.device("cpu")
    gemm = max(gemm_gflops(cpu) for _ in range(3))  # a fresh process's first GEMMs can run well below peak
    cpu_info = cpu_description()
    print(f"CPU: {_cpu_line(cpu_info)}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores; "
          f"2048³ fp32 GEMM {gemm:.1f} GFLOP/s")  # fmt: skip
    native = cpu_kernels() is not None
    print("compiled CPU kernels (dfl.kernels.native): " + ("yes" if native else "NO, the fast paths run on PyTorch alone"))
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_info,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": os.getloadavg(),
            "native_kernels": native,
            "keep_freed_memory": False,  # set for the training rows only: process-wide, it would skew peak RSS
        },
        "gemm_gflops": {"cpu_fp32": gemm},
        "inference": {},
        "timing": f"minimum over {args.repeats} runs after a warm-up",
    }
    use_cuda = torch.cuda.is_available() and not args.skip_cuda
    if use_cuda:
        cuda = torch.device("cuda")
        results["gemm_gflops"]["cuda_fp32"] = gemm_gflops(cuda)
        results["gemm_gflops"]["cuda_bf16"] = gemm_gflops(cuda, torch.bfloat16)
        print(f"CUDA: {results['machine']['cuda']}; GEMM fp32 {results['gemm_gflops']['cuda_fp32']:.0f}, "
              f"bf16 {results['gemm_gflops']['cuda_bf16']:.0f} GFLOP/s")  # fmt: skip
    if not args.skip_inference:
        print("inference (10 s input, batch 1):" if args.seconds == 10 else f"inference ({args.seconds:g} s input):")
    cuda_gemm = {k.removeprefix("cuda_"): v for k, v in results["gemm_gflops"].items() if k.startswith("cuda_")}
    for name in [] if args.skip_inference else args.models:
        results["inference"][name] = bench_inference(name, MODELS[name], args, gemm, cuda_gemm or None)
    devices = ([] if args.skip_cpu else [cpu]) + ([torch.device("cuda")] if use_cuda else [])
    if not args.skip_training:
        # as dfl-train does by default; only now, as the inference rows' peak RSS would keep earlier rows' memory
        kept = results["machine"]["keep_freed_memory"] = not args.return_freed_memory and keep_freed_memory()
        print("training (can_paper + 14-layer loss network, 6 layers in the loss, batch 1, 3 s; freed memory "
              f"kept for reuse: {'yes' if kept else 'no'}):")  # fmt: skip
        results["training"] = {d.type: bench_training(d, args) for d in devices}
    if args.epoch_utterances > 0:
        print(f"training epochs through dfl-train ({args.epoch_utterances} VoiceBank-like utterances, 2nd epoch):")
        results["training_epoch"] = {d.type: bench_training_epoch(d, args) for d in devices}
    if args.validation_utterances > 0:
        from dfl.metric_pool import default_workers

        workers = args.validation_workers or sorted({1, max(default_workers(), 1)})
        print(f"validation epoch ({args.validation_utterances} VoiceBank-like utterances, can_paper on "
              f"{'cuda' if use_cuda else 'cpu'} + PESQ/STOI/SI-SDR of the enhanced output):")  # fmt: skip
        v = results["validation"] = bench_validation(args.validation_utterances, workers,
                                                     device="cuda" if use_cuda else "cpu", repeats=args.repeats,
                                                     train_steps=args.validation_train_steps)
        for label, entry in v["runs"].items():
            extra = ""
            if "added_vs_metrics_alone" in entry:
                extra = f"; metrics add {entry['added_seconds']:6.1f} s ({entry['added_vs_metrics_alone']:.2f}× metrics_alone)"
            elif "added_seconds" in entry:
                extra = f"; metrics add {entry['added_seconds']:6.1f} s" + (
                    f" ({entry['added_vs_serial']:.2f}× run_serial's)" if "added_vs_serial" in entry else "")
            rate = f", {entry['utterances_per_second']:5.2f} utterances/s" if "utterances_per_second" in entry else ""
            print(f"  {label:13s}: {entry['seconds']:6.1f} s{rate}{extra}", flush=True)
    if args.long_file_minutes > 0:
        results["long_file"] = bench_long_file(args.long_file_minutes, args)
    atomic_write(args.output, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
