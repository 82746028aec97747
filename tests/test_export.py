"""`dfl-export` (ONNX, TorchScript) parity with PyTorch and the onnxruntime backend of dfl-denoise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from dfl.cli.denoise import main as denoise_main
from dfl.cli.export import main as export_main
from dfl.export import META_FILE, load_onnx_session
from tests.helpers.small_denoisers import BATCH_STATS, saved_denoiser, small_denoiser

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CONFIGS = {"running_stats": {}, "batch_stats": BATCH_STATS}


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    """(model, checkpoint, onnx file, torchscript file) for one config; exported once per module."""
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = saved_denoiser(tmp / "model.pt", seed=7, **CONFIGS[request.param])
    assert export_main([str(ckpt), "--format", "onnx", "-o", str(tmp / "model.onnx")]) == 0
    assert export_main([str(ckpt), "--format", "torchscript", "-o", str(tmp / "model.ts")]) == 0
    return small_denoiser(seed=7, **CONFIGS[request.param]), ckpt, tmp / "model.onnx", tmp / "model.ts"


def reference(model, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).numpy()


@pytest.mark.parametrize("shape", [(1, 160_000), (1, 1001), (2, 3000)], ids=["10s", "odd", "batch2"])
def test_onnx_parity_with_dynamic_axes(exported, shape):
    model, _, onnx_path, _ = exported
    if model.config["batch_stats_at_eval"] and shape[0] > 1:
        shape = (1, shape[1] + 1)
    x = 0.3 * torch.randn(*shape)
    session, meta = load_onnx_session(onnx_path)
    assert meta == {"receptive_field": model.receptive_field, "batch_stats": model.config["batch_stats_at_eval"]}
    out = session.run(None, {"waveform": x.numpy()})[0]
    assert out.shape == shape
    np.testing.assert_allclose(out, reference(model, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("length", [160_000, 999])
def test_torchscript_parity(exported, length):
    model, _, _, ts_path = exported
    extra = {META_FILE: ""}
    scripted = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra[META_FILE])["receptive_field"] == model.receptive_field
    x = 0.3 * torch.randn(1, length)
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(x).numpy(), reference(model, x), atol=1e-4, rtol=0)


def test_onnxruntime_backend_of_dfl_denoise(exported, tmp_path, capsys):
    model, ckpt, onnx_path, _ = exported
    (tmp_path / "in").mkdir()
    stereo = (0.3 * np.random.default_rng(0).standard_normal((9000, 2))).astype(np.float32)
    sf.write(tmp_path / "in" / "x.wav", stereo, 22_050, subtype="FLOAT")
    common = [str(tmp_path / "in"), "--quiet", "--chunk-seconds", "0.15"]
    assert denoise_main([*common, "-o", str(tmp_path / "torch"), "--model", str(ckpt)]) == 0
    assert denoise_main([*common, "-o", str(tmp_path / "ort"), "--model", str(onnx_path), "--backend", "onnxruntime"]) == 0
    # an .onnx model without --backend onnxruntime: told what to add, nothing written
    assert denoise_main([*common, "-o", str(tmp_path / "forgot"), "--model", str(onnx_path)]) == 2
    assert f"{onnx_path}: an ONNX model runs with ONNX Runtime, not torch: add --backend onnxruntime" in capsys.readouterr().err
    assert not (tmp_path / "forgot").exists()
    torch_out, _ = sf.read(tmp_path / "torch" / "x.wav")
    ort_out, sr = sf.read(tmp_path / "ort" / "x.wav")
    assert sr == 22_050 and ort_out.shape == (9000, 2)
    np.testing.assert_allclose(ort_out, torch_out, atol=1e-4)


def test_onnxruntime_backend_from_a_checkpoint(tmp_path):
    from dfl import Denoiser

    model = small_denoiser(seed=3)
    ckpt = saved_denoiser(tmp_path / "m.pt", seed=3)
    x = (0.3 * np.random.default_rng(1).standard_normal(5000)).astype(np.float32)
    out = Denoiser.from_checkpoint(ckpt, backend="onnxruntime", chunk_seconds=0.15)(x, 16_000)
    np.testing.assert_allclose(out, reference(model, torch.from_numpy(x)[None])[0], atol=1e-4)


def test_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert export_main([str(bad), "--format", "onnx", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    other = tmp_path / "other.onnx"
    other.write_bytes(b"\x08\x07")
    with pytest.raises(ValueError, match="other.onnx"):
        load_onnx_session(other)
