"""`dfl-export CKPT --format onnx|torchscript -o FILE`: ship a trained denoiser to other runtimes.

The exported graph is :class:`dfl.kernels.fast_inference.FastContextAggregationNet`
(BN folded into the convs for running-statistics models), input ``waveform``
``[batch, time]`` float32 at 16 kHz, output ``denoised`` of the same shape;
both axes are dynamic. The receptive field and whether the model uses batch
statistics travel with the file (ONNX metadata / TorchScript extra file), so
``dfl-denoise --backend onnxruntime`` can chunk correctly.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from dfl import SAMPLE_RATE
from dfl.audio import atomic_write
from dfl.cli import refuse_existing_output
from dfl.kernels.fast_inference import FastContextAggregationNet

FORMATS = ("onnx", "torchscript")
META_FILE = "dfl_meta.json"  # TorchScript extra file holding the metadata


def export_metadata(net: FastContextAggregationNet) -> dict:
    return {
        "dfl_kind": "denoiser",
        "sample_rate": SAMPLE_RATE,
        "receptive_field": net.receptive_field,
        "batch_stats": net.batch_stats,
    }


def export_onnx(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (a ContextAggregationNet) as ONNX with dynamic batch and time axes, atomically."""
    import onnx

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision notes
    net = FastContextAggregationNet(model.eval()).eval()
    example = torch.zeros(1, 4 * max(layer.dilation for layer in net.layers) + 1)
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
    for key, value in export_metadata(net).items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    return atomic_write(path, lambda tmp: onnx.save_model(proto, str(tmp)))


def export_torchscript(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a scripted TorchScript module (``torch.jit.load`` it), atomically."""
    net = FastContextAggregationNet(model.eval()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(net)
    extra = {META_FILE: json.dumps(export_metadata(net))}
    return atomic_write(path, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=extra))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfl-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="dfl model file or dfl-train checkpoint")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx (for ONNX Runtime and dfl-denoise --backend onnxruntime) or torchscript "
                        "(torch.jit.load, no dfl needed)")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, type=Path, help="file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it already exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from dfl.checkpoints import CheckpointError, load_model

    if args.output.resolve() == args.checkpoint.resolve():
        parser.error(f"--output {args.output} would overwrite the checkpoint")
    refuse_existing_output(parser, "--output", args.output, args.overwrite)
    try:
        model = load_model(args.checkpoint, "denoiser")
    except CheckpointError as exc:
        print(f"dfl-export: {exc}", file=sys.stderr)
        return 2
    exporter = export_onnx if args.format == "onnx" else export_torchscript
    try:
        path = exporter(model, args.output)
    except OSError as exc:
        print(f"dfl-export: cannot write --output {args.output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.format} model to {path} (input 'waveform' [batch, time] at {SAMPLE_RATE} Hz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
