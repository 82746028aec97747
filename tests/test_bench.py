"""dfl-bench's training measurement: both layer implementations, and their agreement."""

import argparse

import pytest
import torch

from dfl.bench import bench_training


def test_training_bench_compares_fused_and_plain_layers():
    result = bench_training(torch.device("cpu"), argparse.Namespace(train_repeats=1))
    plain, fused = result["plain"], result["fused"]
    assert result["utterance_seconds"] == 3.0
    for entry in (plain, fused):
        assert entry["step_seconds"] > 0
        assert entry["audio_seconds_per_second"] == 3.0 / entry["step_seconds"]
    assert result["audio_seconds_per_second"] == max(plain["audio_seconds_per_second"], fused["audio_seconds_per_second"])
    # the full-size can_paper + 14-layer loss network: same loss and gradients from both implementations
    assert fused["loss_rel_diff_to_plain"] < 1e-5
    assert fused["max_grad_rel_diff_to_plain"] < 1e-3
    # and as close to a float64 run as the plain layers are (float32 rounding, not a different computation)
    assert fused["max_grad_rel_diff_to_float64"] < 2 * plain["max_grad_rel_diff_to_float64"] < 1e-2


def test_inference_bench_reports_every_cpu_path():
    from dfl.bench import MODELS, bench_inference

    args = argparse.Namespace(seconds=0.5, repeats=1, skip_onnxruntime=True, skip_cuda=True)
    result = bench_inference("can_paper", MODELS["can_paper"], args, gemm=100.0)
    assert result["native_kernels"] is True
    assert result["gflop_per_audio_second"] > 4  # 14 64×64 3-tap layers at 16 kHz: ~5.1 GFLOP
    rows = result["cpu"]
    assert list(rows) == ["plain_fp32", "fused_layers_fp32", "fast_direct_fp32", "fast_fp32"]
    for label, row in rows.items():
        assert row["rtf"] > 0 and row["gflops"] == pytest.approx(result["gflop_per_audio_second"] / row["rtf"])
        assert row["fraction_of_gemm"] == pytest.approx(row["gflops"] / 100.0)
        assert row["max_abs_diff_to_plain"] < (1e-12 if label == "plain_fp32" else 1e-4), label
