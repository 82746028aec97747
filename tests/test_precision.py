"""`trainer.precision=bf16-mixed` trains on CPU; `system.compile=true` wraps the denoiser only."""

import json
import math

import torch

from tests.test_train import TINY, dfl_train


def test_bf16_mixed_tiny_training_on_cpu(tmp_path):
    run = tmp_path / "bf16"
    proc = dfl_train(f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", *TINY,
                     "trainer.precision=bf16-mixed", "trainer.max_epochs=1", "data.n_val=1")
    assert "bf16" in proc.stdout + proc.stderr  # Lightning announces the precision plugin
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(math.isfinite(v) for kind in ("noisy", "enhanced") for v in metrics[kind].values())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    # mixed precision: the weights themselves stay float32, and training changed them
    params = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("denoiser.") and v.is_floating_point()}
    assert params and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in params.values())


def test_compile_flag_wraps_the_denoiser_and_checkpoints_stay_plain():
    from dfl.checkpoints import model_record
    from dfl.losses import WaveformL1Loss
    from dfl.models import ContextAggregationNet
    from dfl.systems import DenoisingSystem

    net = ContextAggregationNet(dilations=[1, 2, 1], channels=4)
    system = DenoisingSystem(net, WaveformL1Loss(), compile=True, metrics=[])
    assert type(system.denoiser).__name__ == "OptimizedModule" and system.plain_denoiser is net
    record = model_record("denoiser", system.plain_denoiser)
    assert not any("_orig_mod" in k for k in record["state_dict"])
