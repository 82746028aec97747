"""The CPU speed code, behind one entry point: :func:`accelerate`.

The method modules (``ContextAggregationNet``, ``LossNetwork``, ``FeatureLoss``) are plain PyTorch.
``accelerate(module)`` recognises an architecture the kernels compute (the exact class and its declared
config, so a subclass that changes ``forward`` runs as written), checks the fast module against the
plain forward on a small input, and returns it; otherwise it returns ``module`` unchanged with one info
line saying why. Training systems, validation, ``dfl.Denoiser`` (``dfl-denoise``, ``dfl-eval``) and
``dfl-export`` all build their models through it. ``DFL_NATIVE=0`` keeps the fast modules but skips
the compiled C kernels (:mod:`dfl.kernels.native`).

Fast modules:

* :class:`~dfl.kernels.fused_training.FusedTrainingNet` (``purpose="training"``): a denoiser's
  conv → norm → leaky ReLU layers as fused channels-last CPU ops, forward and backward.
* :class:`~dfl.kernels.folded_inference.FoldedInferenceNet` (``purpose="inference"``): an eval-mode
  denoiser with its norms folded into the convs; Winograd convs on the CPU; what ``dfl-export`` writes.
* :class:`~dfl.kernels.frozen_feature_loss.FrozenFeatureLoss`: a feature loss whose frozen loss
  network runs through channels-last buffers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PURPOSES = ("training", "inference")


def unsupported_reason(module: nn.Module, purpose: str = "training") -> str | None:
    """Why the kernels do not compute ``module`` for ``purpose``, or None where they do (the one rule)."""
    from dfl.losses.combined import CombinedLoss
    from dfl.losses.feature_loss import FeatureLoss
    from dfl.models import ContextAggregationNet, LossNetwork

    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if isinstance(module, ContextAggregationNet):
        if type(module) is not ContextAggregationNet:
            return f"{type(module).__name__} subclasses ContextAggregationNet (its forward may differ)"
        if module.kernel_size != 3:
            return f"kernel_size={module.kernel_size} (the kernels compute 3-tap convs)"
        if purpose == "inference" and module.config["in_channels"] != 1:
            return f"in_channels={module.config['in_channels']} (the inference kernels take [batch, time] audio)"
        if purpose == "training" and module.config["normalization"] == "none":
            return "normalization=none (the fused layers fuse a batch norm)"
        return None
    if type(module) is CombinedLoss:
        return unsupported_reason(module.feature, purpose)
    if type(module) is FeatureLoss:
        if type(module.loss_network) is not LossNetwork:
            return f"its loss network is a {type(module.loss_network).__name__}, not a LossNetwork"
        return None
    if type(module) is LossNetwork:
        return None
    return f"{type(module).__name__} is not an architecture the kernels compute"


def accelerate(module: nn.Module, purpose: str = "training", verify: bool = True) -> nn.Module:
    """The fast module for ``module`` where the kernels compute it, else ``module`` itself (one info line why).

    Args:
        module: a ``ContextAggregationNet``, ``LossNetwork``, ``FeatureLoss`` or ``CombinedLoss`` (anything
            else is returned as is).
        purpose: ``training`` (the fused training layers; also fine for validation) or ``inference``
            (eval semantics, norms folded into the convs: for ``dfl.Denoiser`` and ``dfl-export``).
        verify: compare the fast module with ``module``'s own forward on a short random input first.

    Returns:
        A module with ``module``'s call signature and results (to float rounding), sharing its parameters
        (the inference module copies them, folded), or ``module``.
    """
    name = type(module).__name__
    reason = unsupported_reason(module, purpose)
    if reason is None:
        fast = _fast_module(module, purpose)
        if verify:
            reason = _differs_from_plain(fast, module, purpose)
        if reason is None:
            return fast
    log.info("dfl.kernels: the %s runs as plain PyTorch (%s)", name, reason)
    return module


def _fast_module(module: nn.Module, purpose: str) -> nn.Module:
    from dfl.losses.combined import CombinedLoss
    from dfl.losses.feature_loss import FeatureLoss
    from dfl.models import LossNetwork

    if isinstance(module, CombinedLoss):  # the same terms, the feature term fast
        extra = {name: {"loss": term, "weight": module.extra_weights[name]} for name, term in module.extra.items()}
        return CombinedLoss(_fast_module(module.feature, purpose), extra)
    if isinstance(module, FeatureLoss):
        from dfl.kernels.frozen_feature_loss import FrozenFeatureLoss

        return FrozenFeatureLoss(module)
    if isinstance(module, LossNetwork):
        from dfl.kernels.frozen_feature_loss import FrozenFeaturesNet

        return FrozenFeaturesNet(module)
    if purpose == "inference":
        from dfl.kernels.folded_inference import FoldedInferenceNet

        return FoldedInferenceNet(module.eval()).eval()
    from dfl.kernels.fused_training import FusedTrainingNet

    return FusedTrainingNet(module)


@torch.no_grad()
def _differs_from_plain(fast: nn.Module, plain: nn.Module, purpose: str) -> str | None:
    """None if ``fast`` matches ``plain`` on a short random input (eval mode, CPU float32), else what differs."""
    from dfl.losses.combined import CombinedLoss
    from dfl.losses.feature_loss import FeatureLoss
    from dfl.models import LossNetwork

    if isinstance(plain, CombinedLoss):  # only the feature term is replaced; the others (e.g. an STFT
        fast, plain = fast.feature, plain.feature  # loss with 2048-sample frames) may not take a short input
    device = next(iter(plain.parameters()), torch.empty(0)).device
    if device.type != "cpu":
        return None  # the fast modules run their plain layers off the CPU: nothing to compare
    generator = torch.Generator().manual_seed(0)
    in_channels = plain.config.get("in_channels", 1) if isinstance(getattr(plain, "config", None), dict) else 1
    x = torch.randn(2, 1000, generator=generator)
    if in_channels != 1:  # a multi-channel denoiser takes [batch, channels, time]
        x = torch.randn(2, in_channels, 1000, generator=generator)
    training = plain.training
    plain.eval()
    try:
        if isinstance(plain, FeatureLoss):
            y = torch.randn(2, 1000, generator=generator)
            got, want = (torch.cat([t.reshape(-1) for t in loss(x, y)]) for loss in (fast, plain))
        elif isinstance(plain, LossNetwork):
            got, want = torch.cat([f.flatten() for f in fast(x)]), torch.cat([f.flatten() for f in plain(x)])
        else:
            got = fast.run(x) if purpose == "inference" else fast(x)
            want = plain(x)
    finally:
        plain.train(training)
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if got.shape != want.shape or not error < 1e-3:
        return f"the fast path differs from its forward on a test input (relative error {error:.1e})"
    return None
