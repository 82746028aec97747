"""Masking the zero-padding of batched variable-length utterances out of losses.

A padded batch must give the loss of its utterances taken one at a time: each utterance's mean
over its own valid samples (or frames), then the mean over the batch.
"""

from __future__ import annotations

import torch


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``[batch, size]`` boolean mask, true on the first ``lengths[i]`` positions of row ``i``."""
    lengths = torch.as_tensor(lengths).to(torch.long)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be a [batch] vector, got shape {tuple(lengths.shape)}")
    if lengths.device.type == "cpu" and (lengths < 1).any():  # not on a GPU: the check would wait for it
        raise ValueError(f"lengths must be >= 1, got {lengths.tolist()}")
    return torch.arange(size, device=lengths.device)[None] < lengths[:, None]


def masked_mean(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the valid part (first ``lengths[i]`` steps of the last axis) of each row, then over rows.

    ``values`` is ``[batch, time]`` or ``[batch, channels, time]``; lengths beyond ``time`` are clipped.
    """
    lengths = torch.as_tensor(lengths, device=values.device).to(torch.long).clamp(max=values.shape[-1])
    if lengths.shape != values.shape[:1]:
        raise ValueError(f"lengths has {lengths.numel()} entries for a batch of {values.shape[0]}")
    mask = length_mask(lengths, values.shape[-1]).to(values.dtype)
    if values.dim() == 3:
        mask = mask[:, None]
    # summed over the non-batch dims without flatten(), which would copy a tensor in another memory layout
    per_item = values.mul(mask).sum(tuple(range(1, values.dim()))) / (lengths * (values[0].numel() // values.shape[-1]))
    return per_item.mean()


def zero_padding(wav: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``wav`` ``[batch, time]`` with every sample beyond its row's length set to 0."""
    if lengths is None:
        return wav
    lengths = torch.as_tensor(lengths, device=wav.device)
    return wav * length_mask(lengths, wav.shape[-1]).to(wav.dtype)
