"""dfl model checkpoints: weights + the config that rebuilds the network, loaded safely.

A dfl model file is a ``torch.save`` of plain containers::

    {"dfl_format": 1, "kind": "denoiser" | "lossnet", "config": {...}, "state_dict": {...}, "meta": {...}}

Loading always uses ``weights_only=True``: a file from the internet cannot run code.
Lightning checkpoints written by ``dfl-train``/``dfl-pretrain`` carry the same
``dfl_models`` entry and are accepted wherever a model file is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfl.audio import atomic_write

FORMAT_VERSION = 1
KINDS = ("denoiser", "lossnet")
# In a Lightning checkpoint whose weights are an average (callbacks.DenoiserWeightAverage): the training weights
WEIGHT_AVERAGE_KEY = "dfl_weight_average"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def _plain(obj: Any) -> Any:
    """Convert OmegaConf containers / tuples to plain Python so weights_only loading accepts them."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def model_record(kind: str, model: nn.Module, meta: dict | None = None, state_dict: dict | None = None) -> dict:
    """The serialisable record of one network (used inside Lightning checkpoints too).

    ``state_dict``: weights to record instead of the model's own (e.g. an average of them).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {
        "dfl_format": FORMAT_VERSION,
        "kind": kind,
        "config": _plain(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in (model.state_dict() if state_dict is None else state_dict).items()},
        "meta": _plain(meta or {}),
    }


def save_model(path: str | os.PathLike, kind: str, model: nn.Module, meta: dict | None = None) -> Path:
    """Write a dfl model file atomically."""
    record = model_record(kind, model, meta)
    return atomic_write(path, lambda tmp: torch.save(record, tmp))


def safe_load(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot load checkpoint safely (weights_only=True); it is corrupt or holds "
            f"objects other than tensors and plain containers ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a dfl checkpoint (top level is {type(obj).__name__})")
    return obj


def load_record(path: str | os.PathLike, kind: str) -> dict:
    """The record of network ``kind`` from a dfl model file or a dfl Lightning checkpoint."""
    obj = safe_load(path)
    if "dfl_models" in obj:  # Lightning checkpoint from dfl-train / dfl-pretrain
        records = obj["dfl_models"]
        if kind not in records:
            raise CheckpointError(
                f"{path}: this training checkpoint holds {sorted(records)} but not a {kind!r} network"
            )
        return records[kind]
    if obj.get("dfl_format") is None:
        raise CheckpointError(f"{path}: not a dfl checkpoint (no 'dfl_format' or 'dfl_models' entry)")
    if obj["dfl_format"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer dfl (format {obj['dfl_format']})")
    if obj.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {obj.get('kind')!r} network, expected a {kind!r} network")
    return obj


# Bounds on what a model file may ask for: far above every real model, far below what would exhaust
# memory or time while the network is built (a file from the internet is checked before it is trusted).
LIMITS = {"channels": 4096, "base_channels": 4096, "kernel_size": 63, "layers": 512, "dilation": 1 << 20,
          "stride": 16, "in_channels": 64}


def _int_setting(path, key: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{path}: config {key}={value!r} is not an integer")
    if not low <= value <= high:
        raise CheckpointError(f"{path}: config {key}={value} is out of range [{low}, {high}]; corrupt or hostile file?")
    return value


def _expected_conv_shapes(kind: str, config: dict, path) -> list[tuple[int, ...]]:
    """The ``convs.<i>.weight`` shapes the config implies, from bounded settings (nothing is built)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config is a {type(config).__name__}, not a mapping")
    k = _int_setting(path, "kernel_size", config.get("kernel_size", 3), 1, LIMITS["kernel_size"])
    if kind == "denoiser":
        dilations = config.get("dilations", ())
        if not isinstance(dilations, (list, tuple)) or not 1 <= len(dilations) <= LIMITS["layers"]:
            size = len(dilations) if isinstance(dilations, (list, tuple)) else type(dilations).__name__
            raise CheckpointError(f"{path}: config dilations has {size} entries, expected 1 to {LIMITS['layers']}")
        for d in dilations:
            _int_setting(path, "dilations[...]", d, 1, LIMITS["dilation"])
        ch = _int_setting(path, "channels", config.get("channels", 64), 1, LIMITS["channels"])
        cin = _int_setting(path, "in_channels", config.get("in_channels", 1), 1, LIMITS["in_channels"])
        return [(ch, cin if i == 0 else ch, k) for i in range(len(dilations))]
    n = _int_setting(path, "n_layers", config.get("n_layers", 15), 1, LIMITS["layers"])
    base = _int_setting(path, "base_channels", config.get("base_channels", 32), 1, LIMITS["base_channels"])
    block = _int_setting(path, "channel_block", config.get("channel_block", 5), 1, LIMITS["layers"])
    _int_setting(path, "stride", config.get("stride", 2), 1, LIMITS["stride"])
    widths = [base * 2 ** (i // block) for i in range(n)]
    if max(widths) > LIMITS["channels"]:
        raise CheckpointError(f"{path}: config asks for {max(widths)} channels in its last layers, "
                              f"more than {LIMITS['channels']}; corrupt or hostile file?")  # fmt: skip
    return [(c, 1 if i == 0 else widths[i - 1], k) for i, c in enumerate(widths)]


def check_record(record: dict, path: str | os.PathLike = "<record>") -> None:
    """Check a record's config against bounds and against its weights' shapes, before anything is built.

    Raises:
        CheckpointError: naming the file, the setting and what the weights hold.
    """
    kind, state = record.get("kind"), record.get("state_dict")
    if kind not in KINDS:
        raise CheckpointError(f"{path}: unknown network kind {kind!r}; expected one of {KINDS}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict is not a mapping of tensors")
    expected = _expected_conv_shapes(kind, record.get("config"), path)
    found = sum(1 for key in state if key.startswith("convs.") and key.endswith(".weight") and key.count(".") == 2)
    if found != len(expected):
        what = "dilations" if kind == "denoiser" else "n_layers"
        raise CheckpointError(
            f"{path}: config {what} describes {len(expected)} layers but the weights hold {found}; "
            "the file is corrupt or was edited"
        )
    for i, shape in enumerate(expected):
        weight = state.get(f"convs.{i}.weight")
        if weight is None or tuple(weight.shape) != shape:
            got = None if weight is None else tuple(weight.shape)
            raise CheckpointError(
                f"{path}: config implies convs.{i}.weight of shape {shape} but the weights hold {got} "
                "(channels / kernel_size disagree with the weights); the file is corrupt or was edited"
            )


def build_model(record: dict, path: str | os.PathLike = "<record>") -> nn.Module:
    """Rebuild the network of a record and load its weights (strict).

    The config is checked against bounds and the weights' shapes first (:func:`check_record`), so a
    corrupt or hostile file fails with a clear message before any layer is allocated.
    """
    from dfl.models import ContextAggregationNet, LossNetwork

    check_record(record, path)
    cls = {"denoiser": ContextAggregationNet, "lossnet": LossNetwork}[record["kind"]]
    try:
        model = cls(**record["config"])
        model.load_state_dict(record["state_dict"], strict=True)
    except (TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights do not fit a {cls.__name__}: {exc}") from exc
    return model


def load_model(path: str | os.PathLike, kind: str) -> nn.Module:
    """Load a denoiser or a loss network from any dfl checkpoint."""
    return build_model(load_record(path, kind), path)
