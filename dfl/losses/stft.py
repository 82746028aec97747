"""Multi-resolution STFT loss (auraloss) with the same ``(total, terms)`` interface as ``FeatureLoss``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude distance averaged over several STFT resolutions.

    A thin wrapper of :class:`auraloss.freq.MultiResolutionSTFTLoss` (Yamamoto et al., Parallel
    WaveGAN) that takes ``[batch, time]`` waveforms and returns ``(total, empty terms)``, so it can
    stand alone (``loss=mrstft``) or be added to the feature loss (``loss=fl_mrstft``). The
    defaults are auraloss's (FFT 1024/2048/512, hops 120/240/50, windows 600/1200/240).
    """

    term_names: list[str] = []

    def __init__(
        self,
        fft_sizes: Sequence[int] = (1024, 2048, 512),
        hop_sizes: Sequence[int] = (120, 240, 50),
        win_lengths: Sequence[int] = (600, 1200, 240),
        w_sc: float = 1.0,
        w_log_mag: float = 1.0,
        w_lin_mag: float = 0.0,
    ) -> None:
        super().__init__()
        from auraloss.freq import MultiResolutionSTFTLoss as _Aura

        if not (len(fft_sizes) == len(hop_sizes) == len(win_lengths)) or not fft_sizes:
            raise ValueError(
                "loss.fft_sizes, loss.hop_sizes and loss.win_lengths must be non-empty and of equal length, got "
                f"{list(fft_sizes)}, {list(hop_sizes)}, {list(win_lengths)}"
            )
        for n, w in zip(fft_sizes, win_lengths):
            if w > n:
                raise ValueError(f"loss.win_lengths: window {w} is longer than its FFT size {n}")
        self.inner = _Aura(
            fft_sizes=list(fft_sizes), hop_sizes=list(hop_sizes), win_lengths=list(win_lengths),
            w_sc=w_sc, w_log_mag=w_log_mag, w_lin_mag=w_lin_mag,
        )

    def forward(
        self, estimate: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if estimate.dim() == 1:
            estimate, target = estimate[None], target[None]
        if lengths is not None and bool((torch.as_tensor(lengths) < estimate.shape[-1]).any()):
            # padded batch: each utterance on its own samples, then the batch mean (as unbatched)
            totals = [self._one(estimate[i : i + 1, : int(n)], target[i : i + 1, : int(n)]) for i, n in enumerate(lengths)]
            return torch.stack(totals).mean(), estimate.new_zeros(0)
        return self._one(estimate, target), estimate.new_zeros(0)

    def _one(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(estimate.unsqueeze(1).float(), target.unsqueeze(1).float())
