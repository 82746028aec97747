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


def model_record(kind: str, model: nn.Module, meta: dict | None = None) -> dict:
    """The serialisable record of one network (used inside Lightning checkpoints too)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {
        "dfl_format": FORMAT_VERSION,
        "kind": kind,
        "config": _plain(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
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


def build_model(record: dict, path: str | os.PathLike = "<record>") -> nn.Module:
    """Rebuild the network of a record and load its weights (strict)."""
    from dfl.models import ContextAggregationNet, LossNetwork

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
