"""`dfl-export CKPT --format onnx|torchscript -o FILE`: ship a trained denoiser to other runtimes.

The exported graph is what :func:`dfl.kernels.accelerate` gives for inference:
:class:`dfl.kernels.folded_inference.FoldedInferenceNet` (BN folded into the convs for
running-statistics models) where the kernels apply, else the model itself; input ``waveform``
``[batch, time]`` float32 at 16 kHz, output ``denoised`` of the same shape;
both axes are dynamic. The receptive field and whether the model uses batch
statistics travel with the file (ONNX metadata / TorchScript extra file), so
``dfl-denoise --backend onnxruntime`` can chunk correctly.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from dfl import SAMPLE_RATE
from dfl.audio import atomic_write
from dfl.kernels import accelerate

FORMATS = ("onnx", "torchscript")
META_FILE = "dfl_meta.json"  # TorchScript extra file holding the metadata


def export_metadata(model: torch.nn.Module) -> dict:
    return {
        "dfl_kind": "denoiser",
        "sample_rate": SAMPLE_RATE,
        "receptive_field": int(model.receptive_field),
        "batch_stats": bool(model.config.get("batch_stats_at_eval", False)),
    }


def inference_graph(model: torch.nn.Module) -> torch.nn.Module:
    """The eval-mode module ``dfl-export`` writes for ``model``: ``[batch, time]`` → ``[batch, time]``."""
    return accelerate(model.eval(), "inference").eval()


def export_onnx(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (a ContextAggregationNet) as ONNX with dynamic batch and time axes, atomically."""
    import onnx

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision notes
    net = inference_graph(model)
    example = torch.zeros(1, 4 * max(model.dilations) + 1)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("time", min=2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            dynamic_shapes={"wav": dims},
            input_names=["waveform"],
            output_names=["denoised"],
            verbose=False,
        )
    proto = program.model_proto
    for key, value in export_metadata(model).items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    return atomic_write(path, lambda tmp: onnx.save_model(proto, str(tmp)))


def export_torchscript(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a TorchScript module (``torch.jit.load`` it), atomically.

    The kernels' inference module is scripted; a model they do not compute is traced, and the trace is
    checked on another input length (a length-dependent graph is refused with ValueError).
    """
    from dfl.kernels.folded_inference import FoldedInferenceNet

    net = inference_graph(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(net, FoldedInferenceNet):
            scripted = torch.jit.script(net)
        else:
            scripted = _traced(net)
    extra = {META_FILE: json.dumps(export_metadata(model))}
    return atomic_write(path, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=extra))


@torch.no_grad()
def _traced(net: torch.nn.Module) -> torch.jit.ScriptModule:
    generator = torch.Generator().manual_seed(0)
    traced = torch.jit.trace(net, torch.randn(1, 4096, generator=generator), check_trace=False)
    other = torch.randn(2, 3001, generator=generator)
    expected, got = net(other), traced(other)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
        raise ValueError(
            f"{type(net).__name__}: its traced TorchScript graph depends on the input length; export it with "
            "--format onnx"
        )
    return traced


def export_onnx_for_session(model: torch.nn.Module) -> Path:
    """Export to a temporary ONNX file removed at exit (for ``--backend onnxruntime`` with a checkpoint)."""
    folder = tempfile.mkdtemp(prefix="dfl-onnx-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return export_onnx(model, Path(folder) / "denoiser.onnx")


def load_onnx_session(path: str | os.PathLike, device="cpu"):
    """An ONNX Runtime session for a dfl-exported file and its metadata; errors name the file."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # optional extra
        raise RuntimeError("the onnxruntime backend needs `pip install dfl[onnx]`") from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise ValueError(f"{path}: not a loadable ONNX model ({exc})") from exc
    props = session.get_modelmeta().custom_metadata_map
    if props.get("dfl_kind") != '"denoiser"' or "receptive_field" not in props:
        raise ValueError(f"{path}: not a denoiser exported by dfl-export (no dfl metadata)")
    return session, {"receptive_field": int(props["receptive_field"]), "batch_stats": json.loads(props["batch_stats"])}
