"""dfl-bench's training measurement: both layer implementations, and their agreement."""

import argparse

import pytest
import torch

from dfl.cli.bench import bench_training


def test_training_bench_compares_the_kernels_and_plain_layers():
    result = bench_training(torch.device("cpu"), argparse.Namespace(train_repeats=1))
    plain, fused = result["plain"], result["cpu_kernels"]
    assert result["utterance_seconds"] == 3.0
    for entry in (plain, fused):
        assert entry["step_seconds"] > 0
        assert entry["audio_seconds_per_second"] == 3.0 / entry["step_seconds"]
        assert entry["step_seconds_mean"] >= entry["step_seconds"]
    assert result["audio_seconds_per_second"] == max(plain["audio_seconds_per_second"], fused["audio_seconds_per_second"])
    # the full-size can_paper + 14-layer loss network: same loss and gradients from both implementations
    assert fused["loss_rel_diff_to_plain"] < 1e-5
    assert fused["max_grad_rel_diff_to_plain"] < 2e-3  # float32 rounding of two summation orders; a bug is O(1)
    # and as close to a float64 run as the plain layers are (float32 rounding, not a different computation).
    # Changing the weights by one ulp moves either figure within 1.3e-3 … 3.1e-3 (leaky ReLU masks flip),
    # so the two are compared within 3×; a wrong computation is off by O(1).
    assert fused["max_grad_rel_diff_to_float64"] < 3 * plain["max_grad_rel_diff_to_float64"] < 1.5e-2


def test_inference_bench_reports_every_cpu_path():
    from dfl.cli.bench import MODELS, bench_inference

    args = argparse.Namespace(seconds=0.5, repeats=1, skip_onnxruntime=True, skip_cuda=True)
    result = bench_inference("can_paper", MODELS["can_paper"], args, gemm=100.0)
    assert result["native_kernels"] is True
    assert result["gflop_per_audio_second"] > 4  # 14 64×64 3-tap layers at 16 kHz: ~5.1 GFLOP
    rows = result["cpu"]
    assert list(rows) == ["plain_fp32", "training_kernels_fp32", "fast_direct_fp32", "fast_fp32"]
    for label, row in rows.items():
        assert row["rtf"] > 0 and row["gflops"] == pytest.approx(result["gflop_per_audio_second"] / row["rtf"])
        assert row["fraction_of_gemm"] == pytest.approx(row["gflops"] / 100.0)
        assert row["max_abs_diff_to_plain"] < (1e-12 if label == "plain_fp32" else 1e-4), label


def test_voicebank_like_lengths_match_the_training_set():
    import numpy as np

    from dfl.cli.bench import voicebank_like_seconds

    seconds = voicebank_like_seconds(20_000, np.random.default_rng(0))
    assert seconds.min() >= 1.1 and seconds.max() <= 15.0
    # 11 572 utterances, 9.4 h: a mean of 2.92 s
    assert seconds.mean() == pytest.approx(9.4 * 3600 / 11572, rel=0.02)


def test_epoch_bench_times_real_dfl_train_epochs(tmp_path):
    from dfl.cli.bench import EPOCH_RUNS, VOICEBANK_TRAIN_SECONDS, bench_training_epoch
    from tests.test_train import TINY

    tiny = [o for o in TINY if o.startswith(("model.", "lossnet."))] + ["callbacks.loss_weight_balancer.epochs=1"]
    args = argparse.Namespace(epoch_utterances=6, epoch_runs=None, return_freed_memory=False)
    result = bench_training_epoch(torch.device("cpu"), args, extra_overrides=tuple(tiny))
    assert 6 * 1.1 <= result["audio_seconds"] <= 6 * 15.0
    assert set(result) >= set(EPOCH_RUNS)
    for label in EPOCH_RUNS:
        entry = result[label]
        assert len(entry["audio_seconds_per_second_per_epoch"]) == 2  # two epochs, the second counts
        speed = entry["audio_seconds_per_second"]
        assert speed == entry["audio_seconds_per_second_per_epoch"][-1] > 0
        assert entry["voicebank_epoch_minutes"] == pytest.approx(VOICEBANK_TRAIN_SECONDS / speed / 60)


def test_epoch_bench_runs_only_the_selected_runs(tmp_path):
    from dfl.cli.bench import EPOCH_RUNS_CUDA, bench_training_epoch, main
    from tests.test_train import TINY

    tiny = [o for o in TINY if o.startswith(("model.", "lossnet."))] + ["callbacks.loss_weight_balancer.epochs=1"]
    args = argparse.Namespace(epoch_utterances=3, epoch_runs=["bucket16_pad4096"], return_freed_memory=True)
    result = bench_training_epoch(torch.device("cpu"), args, extra_overrides=tuple(tiny))
    assert "bucket16_pad4096" in result and "batch1" not in result
    assert len(result["bucket16_pad4096"]["audio_seconds_per_second_per_epoch"]) == 2
    assert set(EPOCH_RUNS_CUDA) >= {"batch1_gemm", "batch1_pad4096"}
    with pytest.raises(SystemExit):  # argparse names the bad choice
        main(["--epoch-runs", "no_such_run", "-o", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()


def test_cpu_description_names_the_machine():
    from dfl.cli.bench import _cpu_line, cpu_description

    amd = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512vl\n\n"
        "processor\t: 1\ncpu family\t: 99\nmodel name\t: other\nflags\t\t: sse2\n"
    )
    cpu = cpu_description(amd)  # the first processor's fields
    assert cpu == {"model": "AMD EPYC", "family": "25", "model_number": "17", "vector_isa": "AVX-512"}
    assert _cpu_line(cpu) == "AMD EPYC (family 25, model 17), AVX-512"
    intel = "cpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: sse2 avx avx2 fma\n"
    assert cpu_description(intel)["vector_isa"] == "AVX2"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU implementer\t: 0x41\n"
    assert cpu_description(arm)["vector_isa"] == "NEON"
    bare = cpu_description("")  # no /proc/cpuinfo: what platform knows, and no made-up numbers
    assert bare["model"] and bare["family"] is None and bare["vector_isa"] is None
    assert "family" not in _cpu_line(bare)


def test_validation_bench_times_serial_and_pooled_scoring():
    from dfl.cli.bench import bench_validation

    result = bench_validation(2, workers=[1], repeats=2)
    runs = result["runs"]
    assert list(runs) == ["metrics_alone", "model_only", "serial", "pooled_1"]
    assert result["metrics"] == ["pesq", "stoi", "si_sdr"] and 2 * 1.1 <= result["audio_seconds"] <= 2 * 15.0
    for label, entry in runs.items():
        assert len(entry["seconds_all"]) == 2 and entry["seconds"] == min(entry["seconds_all"]) > 0
        if label != "metrics_alone":
            assert entry["utterances_per_second"] == pytest.approx(2 / entry["seconds"])
    pooled = runs["pooled_1"]
    assert pooled["added_seconds"] == pytest.approx(pooled["seconds"] - runs["model_only"]["seconds"])
    assert pooled["added_vs_metrics_alone"] == pytest.approx(pooled["added_seconds"] / runs["metrics_alone"]["seconds"])
    assert pooled["pool_start_seconds"] > 0 and "pool_start_seconds" not in runs["serial"]


def test_validation_bench_times_a_run_with_the_metrics_serial_and_overlapping_training():
    from dfl.cli.bench import bench_validation

    result = bench_validation(2, workers=[1], repeats=1, train_steps=2)
    runs = result["runs"]
    assert list(runs)[4:] == ["run_no_metrics", "run_serial", "run_overlap_1"] and result["train_steps"] == 2
    base = runs["run_no_metrics"]["seconds"]
    assert "added_seconds" not in runs["run_no_metrics"]
    for label in ("run_serial", "run_overlap_1"):
        assert runs[label]["added_seconds"] == pytest.approx(runs[label]["seconds"] - base)
    overlap = runs["run_overlap_1"]
    assert overlap["added_vs_serial"] == pytest.approx(overlap["added_seconds"] / runs["run_serial"]["added_seconds"])
    assert torch.get_num_threads() == result["torch_threads"]  # the cores yielded to the worker are taken back
