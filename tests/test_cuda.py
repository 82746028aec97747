"""CUDA paths: inference, a training step, `dfl-train trainer=gpu` and `dfl-denoise --device cuda`.

Skipped without a GPU (CI has none); run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from dfl.kernels.folded_inference import FoldedInferenceNet
from dfl.losses import FeatureLoss
from dfl.models import ContextAggregationNet, LossNetwork
from tests.helpers.small_denoisers import BATCH_STATS, saved_denoiser, small_denoiser
from tests.test_train import TINY, dfl_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda:0")


@pytest.fixture
def no_tf32():
    """Full float32 matrix products, so CUDA results can be held to float32 tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("config", [{}, BATCH_STATS], ids=["running_stats", "batch_stats"])
def test_plain_and_fast_inference_on_cuda_match_the_cpu(config, no_tf32):
    model = small_denoiser(seed=3, **config)
    x = 0.2 * torch.randn(2, 8000, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        reference = model.double()(x.double())
        model.float()
        gpu = model.to(CUDA)(x.to(CUDA))
        fast = FoldedInferenceNet(model.cpu()).to(CUDA)
        fast32 = fast(x.to(CUDA))
        fast16 = fast(x.to(CUDA, torch.bfloat16))
    assert gpu.device == fast32.device == CUDA and fast16.dtype == torch.bfloat16
    assert rel_err(gpu, reference) < 1e-5
    assert rel_err(fast32, reference) < 1e-5
    assert 1e-4 < rel_err(fast16, reference) < 3e-2  # bf16 really ran, and stays close


@pytest.fixture(params=["cudnn", "gemm"])
def cuda_conv(request):
    from dfl.models.conv import set_cuda_conv

    set_cuda_conv(request.param)
    yield request.param
    set_cuda_conv("cudnn")


def test_gemm_conv_on_cuda_matches_cudnn(no_tf32):
    from dfl.models.conv import Conv1d, set_cuda_conv

    conv = Conv1d(8, 16, 3, stride=2, dilation=1, padding=1).to(CUDA)
    x = torch.randn(2, 8, 1001, device=CUDA)
    reference = conv(x)
    try:
        set_cuda_conv("gemm")
        out = conv(x)
    finally:
        set_cuda_conv("cudnn")
    assert out.shape == reference.shape
    assert rel_err(out, reference) < 1e-6


def test_training_step_on_cuda_matches_float64_on_cpu(no_tf32, cuda_conv):
    torch.manual_seed(0)
    model = ContextAggregationNet(dilations=[1, 2, 4, 8, 1], channels=16).train()
    loss_fn = FeatureLoss(LossNetwork(n_layers=6, base_channels=8), layers=4)
    gen = torch.Generator().manual_seed(1)
    noisy, clean = 0.1 * torch.randn(2, 12000, generator=gen), 0.1 * torch.randn(2, 12000, generator=gen)

    def step(model, loss_fn, device, dtype):
        model, loss_fn = model.to(device, dtype), loss_fn.to(device, dtype)
        model.zero_grad(set_to_none=True)
        loss, terms = loss_fn(model(noisy.to(device, dtype)), clean.to(device, dtype))
        loss.backward()
        return loss.detach(), terms.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    import copy

    loss64, terms64, grads64 = step(copy.deepcopy(model), copy.deepcopy(loss_fn), torch.device("cpu"), torch.float64)
    loss, terms, grads = step(model, loss_fn, CUDA, torch.float32)
    assert loss.device == CUDA and terms.shape == terms64.shape == (4,)
    assert rel_err(loss, loss64) < 1e-5 and rel_err(terms, terms64) < 1e-5
    for name, g in grads.items():
        assert g.device == CUDA
        if grads64[name].abs().max() == 0:  # the BN affine weights under β = 0
            assert g.abs().max() == 0, name
        else:
            assert rel_err(g, grads64[name]) < 1e-3, name


@pytest.mark.parametrize(
    "batching",
    [[], ["cuda_conv=gemm"], ["data.batch_size=2", "+data.bucket=true", "+data.pad_to_multiple=1024"]],
    ids=["batch1", "batch1_gemm", "bucketed"],
)
def test_dfl_train_on_gpu(tmp_path, batching):
    """A real short GPU training: checkpoints, balanced weights, throughput and metrics written."""
    run = tmp_path / "run"
    dfl_train(f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", *TINY, "trainer=gpu",
              "system.metrics=[si_sdr]", "callbacks.model_checkpoint.monitor=val/enhanced/si_sdr", "data.n_train=4",
              *batching)  # fmt: skip
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == (4 if "data.batch_size=2" in batching else 8)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "loss_weights/layer_3" in header and "perf/audio_seconds_per_second" in header
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["enhanced"]["si_sdr"]) and np.isfinite(metrics["noisy"]["si_sdr"])


def test_dfl_denoise_on_cuda_matches_the_cpu(tmp_path, no_tf32):
    from dfl.cli.denoise import main

    model = saved_denoiser(tmp_path / "model.pt", seed=2)
    (tmp_path / "in").mkdir()
    audio = (0.3 * np.random.default_rng(0).standard_normal(24_000)).astype(np.float32)
    sf.write(tmp_path / "in" / "a.wav", audio, 16_000, subtype="FLOAT")
    for device in ("cpu", "cuda"):
        assert main([str(tmp_path / "in"), "-o", str(tmp_path / device), "--model", str(model),
                     "--device", device, "--chunk-seconds", "0.5", "--quiet"]) == 0  # fmt: skip
    cpu, _ = sf.read(tmp_path / "cpu" / "a.wav", dtype="float32")
    gpu, _ = sf.read(tmp_path / "cuda" / "a.wav", dtype="float32")
    assert gpu.shape == cpu.shape == audio.shape
    assert rel_err(torch.from_numpy(gpu), torch.from_numpy(cpu)) < 1e-5


def test_nan_loss_on_cuda_is_read_every_few_steps_and_names_its_batch(tmp_path):
    from tests.conftest import write_pair_tree
    from tests.helpers.tiny_training import datamodule, make_system, make_trainer
    from tests.test_denoising_system import PoisonBatch

    data = write_pair_tree(tmp_path / "pairs", splits=("train", "val"), n=6)
    poison = PoisonBatch(epoch=1, batch=2)
    trainer = make_trainer(tmp_path, 3, [poison], enable_checkpointing=False, log_every_n_steps=2, accelerator="gpu")
    with pytest.raises(FloatingPointError, match=r"training loss became nan at epoch 1, batch 2"):
        trainer.fit(make_system(), datamodule=datamodule(data))
    assert poison.ran[-1] == (1, 3)  # read with batch 3's loss, not at batch 2's step
