"""dfl-bench's training measurement: both layer implementations, and their agreement."""

import argparse

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
