"""Map the authors' TF-slim variables onto dfl's ``ContextAggregationNet`` and ``LossNetwork``.

TF stores conv kernels ``[1, k, cin, cout]`` (height 1, width = time); torch ``Conv1d`` wants
``[cout, cin, k]``. Both compute cross-correlations, so the taps keep their order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dfl.models import ContextAggregationNet, LossNetwork
from dfl.presets import architecture_preset

# The authors' denoiser, defined in conf/model/can_authors.yaml (model.py `senet` with SE_LAYERS=13,
# SE_CHANNELS=64, SE_NORM="NM"):
# se_conv_0 is a plain 3-tap conv, se_conv_i (i = 1..12) is dilated by 2^i, se_conv_last is
# plain again, then the 1×1 se_fc_last. Adaptive BN w0·x + w1·BN(x), TF-slim BN (β only,
# ε = 1e-3) on the batch's own statistics at inference too, leaky ReLU max(0.2x, x).
AUTHORS_DENOISER_CONFIG: dict = {**architecture_preset("model", "can_authors"), "in_channels": 1}

# The authors' loss network, defined in conf/lossnet/authors.yaml (model.py `lossnet`, LOSS_LAYERS=14,
# base 32, doubling every 5 layers, TF-slim BN, SAME padding with stride 2 except the last layer) with the two heads of
# lossnet_train.py: pred_conv_0 = acoustic scene classification (15 scenes), pred_conv_1 =
# domestic audio tagging (7 tags). Batch statistics always, as in the authors' feature loss.
AUTHORS_HEADS = {"scene": 15, "tags": 7}
TF_HEAD_SCOPES = {"scene": "pred_conv_0", "tags": "pred_conv_1"}
AUTHORS_LOSSNET_CONFIG: dict = {**architecture_preset("lossnet", "authors"), "heads": dict(AUTHORS_HEADS)}

KIND_PREFIXES = {"denoiser": "se_", "lossnet": "loss_conv_"}


def authors_config(kind: str) -> dict:
    """A fresh copy of the authors' constructor arguments for ``denoiser`` or ``lossnet``."""
    if kind == "denoiser":
        return copy.deepcopy(AUTHORS_DENOISER_CONFIG)
    if kind == "lossnet":
        return copy.deepcopy(AUTHORS_LOSSNET_CONFIG)
    raise ValueError(f"kind must be 'denoiser' or 'lossnet', got {kind!r}")


class TFImportError(ValueError):
    """A TF checkpoint that does not fit the requested dfl network; the message says why."""


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    """TF ``[1, k, cin, cout]`` → torch ``[cout, cin, k]``."""
    return np.ascontiguousarray(w[0].transpose(2, 1, 0))


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _scalar(w: np.ndarray) -> np.ndarray:
    return w.reshape(())


# One rule: torch state_dict key ← (TF variable name, expected TF shape, transform).
Rule = tuple[str, str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _conv_rules(key: str, scope: str, conv: nn.Conv1d) -> list[Rule]:
    cout, cin, k = conv.weight.shape
    return [(f"{key}.weight", f"{scope}/weights", (1, k, cin, cout), _conv_kernel)]


def _bn_rules(key: str, scope: str, channels: int, moving_stats: bool) -> list[Rule]:
    rules = [(f"{key}.bias", f"{scope}/BatchNorm/beta", (channels,), _identity)]
    if moving_stats:
        rules += [
            (f"{key}.running_mean", f"{scope}/BatchNorm/moving_mean", (channels,), _identity),
            (f"{key}.running_var", f"{scope}/BatchNorm/moving_variance", (channels,), _identity),
        ]
    return rules


def _dense_rules(key: str, scope: str, conv: nn.Conv1d) -> list[Rule]:
    cout, cin, _ = conv.weight.shape
    return [
        (f"{key}.weight", f"{scope}/weights", (1, 1, cin, cout), _conv_kernel),
        (f"{key}.bias", f"{scope}/biases", (cout,), _identity),
    ]


def denoiser_rules(model: ContextAggregationNet) -> list[Rule]:
    """Rules for the authors' ``senet`` (adaptive BN, no moving statistics in their checkpoint)."""
    n = len(model.convs)
    scopes = [f"se_conv_{i}" for i in range(n - 1)] + ["se_conv_last"]
    rules: list[Rule] = []
    for i, scope in enumerate(scopes):
        rules += _conv_rules(f"convs.{i}", scope, model.convs[i])
        rules += [
            (f"norms.{i}.alpha", f"{scope}/w0", (), _scalar),
            (f"norms.{i}.beta", f"{scope}/w1", (), _scalar),
        ]
        rules += _bn_rules(f"norms.{i}.bn", scope, model.convs[i].out_channels, moving_stats=False)
    rules += _dense_rules("output", "se_fc_last", model.output)
    return rules


def lossnet_rules(model: LossNetwork, moving_stats: bool) -> list[Rule]:
    """Rules for the authors' ``lossnet`` plus the ``pred_conv_*`` heads of ``lossnet_train.py``."""
    rules: list[Rule] = []
    for i, conv in enumerate(model.convs):
        rules += _conv_rules(f"convs.{i}", f"loss_conv_{i}", conv)
        rules += _bn_rules(f"norms.{i}", f"loss_conv_{i}", conv.out_channels, moving_stats)
    for name, head in model.heads.items():
        rules += _dense_rules(f"heads.{name}", TF_HEAD_SCOPES[name], head)
    return rules


def _check_kind(ckpt, kind: str) -> None:
    names = ckpt.names()
    if any(n.startswith(KIND_PREFIXES[kind]) for n in names):
        return
    other = "lossnet" if kind == "denoiser" else "denoiser"
    if any(n.startswith(KIND_PREFIXES[other]) for n in names):
        what = {
            "denoiser": "a denoiser (se_* variables)",
            "lossnet": "a loss network (loss_conv_* variables)",
        }
        raise TFImportError(
            f"{ckpt.prefix}: this checkpoint holds {what[other]}, not a {kind}; "
            f"use `dfl-import-tf {other} {ckpt.prefix} -o ...`"
        )
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    raise TFImportError(
        f"{ckpt.prefix}: no {KIND_PREFIXES[kind]}* variables; not one of the authors' {kind} checkpoints "
        f"(it holds: {shown or 'nothing'})"
    )


def apply_rules(ckpt, model: nn.Module, rules: list[Rule]) -> nn.Module:
    """Copy the TF variables into ``model`` (strict: every rule must find its variable and shape)."""
    missing = [tf_name for _, tf_name, _, _ in rules if tf_name not in ckpt]
    if missing:
        raise TFImportError(
            f"{ckpt.prefix}: missing variable(s) {', '.join(missing)} "
            f"(the checkpoint has {len(ckpt.names())} variables; is it the authors' architecture?)"
        )
    state = model.state_dict()
    new_state = {}
    for key, tf_name, shape, transform in rules:
        got = ckpt.entry(tf_name).shape
        if tuple(got) != tuple(shape):
            raise TFImportError(
                f"{ckpt.prefix}: variable {tf_name!r} has shape {list(got)}, expected {list(shape)} "
                f"for {type(model).__name__} parameter {key!r}"
            )
        value = np.asarray(transform(ckpt.read(tf_name)), dtype=np.float32)
        if not np.isfinite(value).all():
            raise TFImportError(f"{ckpt.prefix}: variable {tf_name!r} holds NaN or Inf values")
        new_state[key] = torch.from_numpy(value.copy()).reshape(state[key].shape)
    uncovered = sorted({name for name, _ in model.named_parameters()} - set(new_state))
    if uncovered:  # a dfl-side change the rules do not know about: refuse rather than keep random weights
        raise TFImportError(f"no TF variable maps onto {type(model).__name__} parameters {uncovered}")
    # Buffers without a TF counterpart (the denoiser's BN running statistics: its checkpoint
    # has none, it always normalises with batch statistics) keep their initial values.
    model.load_state_dict({**state, **new_state}, strict=True)
    return model


def import_denoiser(ckpt) -> ContextAggregationNet:
    """The authors' denoiser as a ``ContextAggregationNet`` with their weights."""
    _check_kind(ckpt, "denoiser")
    model = ContextAggregationNet(**authors_config("denoiser"))
    return apply_rules(ckpt, model, denoiser_rules(model))


def import_lossnet(ckpt) -> LossNetwork:
    """The authors' loss network with both heads; BN moving statistics go to the running buffers."""
    _check_kind(ckpt, "lossnet")
    model = LossNetwork(**authors_config("lossnet"))
    has_buffers = all(getattr(norm, "running_mean", None) is not None for norm in model.norms)
    return apply_rules(ckpt, model, lossnet_rules(model, moving_stats=has_buffers))
