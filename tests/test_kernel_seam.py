"""One seam for the CPU kernels: the method modules are plain PyTorch, and ``dfl.kernels.accelerate`` is the
only way in (issue #27).

- The method modules import nothing from ``dfl.kernels`` (checked on their syntax tree).
- One parity table (in the style of asteroid's ``tests/jit/jit_models_test.py``): every ``conf/model/*.yaml``
  and the off-spec models the kernels do not compute (kernel_size=5, no normalisation, a subclass with a
  residual connection) through every path — training, inference (``dfl.Denoiser``), export (TorchScript,
  ONNX) and ``dfl-denoise`` — against the plain module's own forward.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dfl import Denoiser
from dfl.checkpoints import save_model
from dfl.kernels import accelerate, unsupported_reason
from dfl.kernels.folded_inference import FoldedInferenceNet
from dfl.kernels.fused_training import FusedTrainingNet
from dfl.models import ContextAggregationNet

ROOT = Path(__file__).resolve().parents[1]
METHOD_MODULES = ["dfl/models/context_aggregation.py", "dfl/models/loss_network.py", "dfl/losses/feature_loss.py"]


@pytest.mark.parametrize("path", METHOD_MODULES)
def test_method_modules_import_nothing_from_the_kernels(path):
    tree = ast.parse((ROOT / path).read_text())
    imported = []
    for node in ast.walk(tree):  # every import, at the top or inside a function
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            imported += [module] + [f"{module}.{alias.name}" for alias in node.names]
    assert imported, path  # the walk sees the file's imports
    assert not [name for name in imported if name == "dfl.kernels" or name.startswith("dfl.kernels.")], path


class ResidualNet(ContextAggregationNet):
    """A subclass whose forward adds its input: the kernels must not compute it as the base class."""

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return super().forward(wav) + wav


# narrow enough for a quick test, the rest of each YAML as written
SMALL = {"channels": 16, "dilations": [1, 2, 4, 8, 1]}
MODEL_FILES = sorted((ROOT / "conf" / "model").glob("*.yaml"))


def _from_yaml(path: Path, **overrides) -> ContextAggregationNet:
    config = OmegaConf.merge(OmegaConf.load(path), {**SMALL, **overrides})
    return instantiate(config)


def _paper(**overrides) -> ContextAggregationNet:
    return _from_yaml(ROOT / "conf" / "model" / "can_paper.yaml", **overrides)


# name: (build, the kernels compute it for training, ... for inference)
MODELS = {
    **{f"conf/model/{p.name}": (lambda p=p: _from_yaml(p), True, True) for p in MODEL_FILES},
    "kernel_size_5": (lambda: _paper(kernel_size=5), False, False),
    "normalization_none": (lambda: _paper(normalization="none"), False, True),
    "residual_subclass": (lambda: _residual(), False, False),
}


def _residual() -> ResidualNet:
    config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(ROOT / "conf/model/can_paper.yaml"), SMALL))
    config.pop("_target_")
    return ResidualNet(**config)


def _trained_like(name: str, seed: int = 0) -> torch.nn.Module:
    """The model ``name`` with weights and running statistics away from their initial values."""
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        model.train()
        for _ in range(2):
            model(0.2 * torch.randn(2, 3000, generator=gen))
    return model.eval()


def _close(got, want, rel: float = 1e-4) -> None:
    got, want = torch.as_tensor(np.asarray(got)), torch.as_tensor(np.asarray(want))
    assert got.shape == want.shape
    scale = float(want.abs().max())
    assert scale > 0
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=rel * scale)


def _signal(batch: int = 1, length: int = 4001, seed: int = 3) -> torch.Tensor:
    return 0.3 * torch.randn(batch, length, generator=torch.Generator().manual_seed(seed))


def _plain_eval(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


@pytest.fixture(params=list(MODELS))
def name(request):
    return request.param


def test_the_table_covers_every_model_config():
    assert MODEL_FILES and all(f"conf/model/{p.name}" in MODELS for p in MODEL_FILES)


def test_training_path(name):
    """accelerate(model, "training"): the fast module where the kernels compute the model, else the model
    itself; output and every parameter's gradient as the plain module's."""
    model = _trained_like(name).train()
    reference = copy.deepcopy(model)
    fast = accelerate(model, "training")
    if MODELS[name][1]:
        assert isinstance(fast, FusedTrainingNet) and fast.model is model
    else:
        assert fast is model and unsupported_reason(model, "training") is not None
    x = _signal(batch=2, length=3001)
    y_fast, y_plain = fast(x), reference(x)
    _close(y_fast.detach(), y_plain.detach(), rel=1e-5)
    target = _signal(batch=2, length=3001, seed=4)
    (y_fast - target).pow(2).mean().backward()
    (y_plain - target).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # all gradients at once, relative to the largest: a scalar whose gradient nearly cancels (a bias before a
    # norm) differs in its float32 rounding alone
    _close(torch.cat([q.grad.flatten() for q in model.parameters()]),
           torch.cat([p.grad.flatten() for p in reference.parameters()]), rel=1e-4)  # fmt: skip


def test_inference_path(name):
    """accelerate(model, "inference") and dfl.Denoiser against the plain eval forward."""
    model = _trained_like(name)
    x = _signal()
    want = _plain_eval(model, x)
    fast = accelerate(model, "inference")
    if MODELS[name][2]:
        assert isinstance(fast, FoldedInferenceNet)
        _close(fast.run(x), want)
    else:
        assert fast is model
    denoised = Denoiser.from_model(model).denoise_16k(x[0].numpy())
    _close(denoised, want[0])


def test_residual_subclass_is_not_the_base_class():
    """Else the residual rows above could pass with the base class's forward."""
    model = _trained_like("residual_subclass")
    base = ContextAggregationNet(**model.config)
    base.load_state_dict(model.state_dict())
    x = _signal()
    assert float((_plain_eval(model, x) - _plain_eval(base, x)).abs().max()) > 0.1


def test_torchscript_export(name, tmp_path):
    from dfl.export import export_torchscript

    model = _trained_like(name)
    path = export_torchscript(model, tmp_path / "model.ts")
    loaded = torch.jit.load(str(path))
    for length in (4001, 2500):  # the time axis stays dynamic
        x = _signal(length=length)
        with torch.inference_mode():
            _close(loaded(x), _plain_eval(model, x))


@pytest.mark.skipif(
    not (importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript")), reason="needs onnx"
)
def test_onnx_export(name, tmp_path):
    from dfl.export import export_onnx, load_onnx_session

    model = _trained_like(name)
    session, meta = load_onnx_session(export_onnx(model, tmp_path / "model.onnx"))
    assert meta["receptive_field"] == model.receptive_field
    for length in (4001, 2500):
        x = _signal(length=length)
        _close(session.run(None, {"waveform": x.numpy()})[0], _plain_eval(model, x))


def test_dfl_denoise(name, tmp_path, monkeypatch):
    """dfl-denoise on a short float wav: the written audio is the plain model's forward."""
    import dfl.checkpoints
    from dfl.cli.denoise import main

    model = _trained_like(name)
    ckpt = save_model(tmp_path / "model.pt", "denoiser", model)
    if type(model) is not ContextAggregationNet:  # a model file records the base class: hand over the subclass
        monkeypatch.setattr(dfl.checkpoints, "load_model", lambda *a, **k: copy.deepcopy(model))
    x = _signal(length=8000)
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "a.wav", x[0].numpy(), 16000, subtype="FLOAT")
    assert main([str(tmp_path / "in" / "a.wav"), "-o", str(tmp_path / "out"), "--model", str(ckpt), "--quiet"]) == 0
    (written,) = sorted((tmp_path / "out").rglob("*.wav"))
    audio, sr = sf.read(written, dtype="float32")
    assert sr == 16000
    _close(audio, _plain_eval(model, x)[0])


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_the_training_system_goes_through_the_seam(cpu_kernels):
    """DenoisingSystem trains through accelerate by default (system.cpu_kernels=true), else plain; the same step."""
    from dfl.kernels.frozen_feature_loss import FrozenFeatureLoss
    from dfl.losses import FeatureLoss
    from dfl.models import LossNetwork
    from dfl.systems import DenoisingSystem

    denoiser = _trained_like("conf/model/can_paper.yaml").train()
    reference = copy.deepcopy(denoiser)
    loss = FeatureLoss(LossNetwork(n_layers=4, base_channels=8), layers=3)
    system = DenoisingSystem(denoiser, loss, metrics=[], cpu_kernels=cpu_kernels)
    assert isinstance(system._run_denoiser, FusedTrainingNet) is cpu_kernels
    assert isinstance(system._run_loss, FrozenFeatureLoss) is cpu_kernels
    assert system.state_dict().keys() == DenoisingSystem(reference, loss, metrics=[], cpu_kernels=False).state_dict().keys()
    noisy, clean = _signal(batch=2, length=3001), _signal(batch=2, length=3001, seed=5)
    got, _ = system._loss(system(noisy), clean, None)
    want, _ = loss(reference(noisy), clean)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_a_combined_loss_with_an_stft_term_goes_through_the_seam():
    """``loss=fl_mrstft``: the feature term runs fast, the STFT term (2048-sample frames) as it is; the same step."""
    from dfl.kernels.frozen_feature_loss import FrozenFeatureLoss
    from dfl.losses import CombinedLoss, FeatureLoss, MultiResolutionSTFTLoss
    from dfl.models import LossNetwork
    from dfl.systems import DenoisingSystem

    denoiser = _trained_like("conf/model/can_paper.yaml").train()
    reference = copy.deepcopy(denoiser)
    loss = CombinedLoss(FeatureLoss(LossNetwork(n_layers=4, base_channels=8), layers=3),
                        {"mrstft": {"loss": MultiResolutionSTFTLoss(), "weight": 5.0}})
    system = DenoisingSystem(denoiser, loss, metrics=[], cpu_kernels=True)
    assert isinstance(system._run_loss.feature, FrozenFeatureLoss)
    noisy, clean = _signal(batch=2, length=8000), _signal(batch=2, length=8000, seed=5)
    got, _ = system._loss(system(noisy), clean, None)
    want, _ = loss(reference(noisy), clean)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
