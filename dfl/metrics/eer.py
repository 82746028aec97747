"""Equal error rate (EER) of detection scores: the DCASE 2016 task 4 (domestic audio tagging) metric.

The EER is the error rate at the operating point where the false-positive rate
equals the false-negative rate (1 − true-positive rate). As in the challenge's
evaluation code it is read off the ROC curve (``torchmetrics``' ``binary_roc``):
walk the ROC points from (0, 0) to the first one with ``fpr >= 1 − tpr`` and
intersect the segment that ends there with the line ``fpr = 1 − tpr``.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_roc
from torchmetrics.utilities import dim_zero_cat

_EPS = 1e-6


def equal_error_rate(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """EER of one detector: ``scores`` (any monotone score, e.g. logits) vs 0/1 ``targets``.

    Returns NaN when the EER is undefined (no positive or no negative example).
    """
    scores = torch.as_tensor(scores).detach().flatten().float().cpu()
    targets = torch.as_tensor(targets).detach().flatten().cpu()
    if scores.numel() != targets.numel():
        raise ValueError(f"scores ({scores.numel()}) and targets ({targets.numel()}) differ in length")
    if not torch.isfinite(scores).all():
        raise ValueError("equal_error_rate: scores contain NaN or Inf")
    targets = targets.long()
    if ((targets != 0) & (targets != 1)).any():
        raise ValueError("equal_error_rate: targets must be 0 or 1")
    n_pos = int(targets.sum())
    if n_pos == 0 or n_pos == targets.numel():
        return math.nan
    fpr, tpr, _ = binary_roc(scores, targets)  # starts at (0, 0), thresholds descending
    for i in range(1, fpr.numel()):
        if fpr[i] + _EPS >= 1 - tpr[i]:
            break
    x1, y1, x2, y2 = float(fpr[i - 1]), float(tpr[i - 1]), float(fpr[i]), float(tpr[i])
    if abs(x2 - x1) < _EPS:  # vertical segment: the crossing is at fpr = x1
        return x1
    slope = (y2 - y1) / (x2 - x1)
    offset = y1 - slope * x1
    return (1 - offset) / (1 + slope)


class EqualErrorRate(Metric):
    """Per-label EER of multi-label scores ``[batch, n_labels]``, accumulated over an epoch.

    ``compute()`` returns a ``[n_labels]`` tensor; labels without both positive and
    negative examples get NaN (the caller decides how to report them).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_labels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_labels = num_labels
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        if scores.shape != targets.shape or scores.dim() != 2 or scores.shape[1] != self.num_labels:
            raise ValueError(
                f"EqualErrorRate expects scores and targets [batch, {self.num_labels}], "
                f"got {tuple(scores.shape)} and {tuple(targets.shape)}"
            )
        self.scores.append(scores.detach().float())
        self.targets.append(targets.detach().long())

    def compute(self) -> torch.Tensor:
        if not self.scores:
            return torch.full((self.num_labels,), math.nan)
        scores, targets = dim_zero_cat(self.scores), dim_zero_cat(self.targets)
        return torch.tensor([equal_error_rate(scores[:, k], targets[:, k]) for k in range(self.num_labels)])
