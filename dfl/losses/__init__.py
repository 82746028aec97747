from dfl.losses.combined import CombinedLoss
from dfl.losses.feature_loss import FeatureLoss, build_loss_network
from dfl.losses.stft import MultiResolutionSTFTLoss
from dfl.losses.waveform import WaveformL1Loss, WaveformL2Loss

__all__ = [
    "CombinedLoss",
    "FeatureLoss",
    "MultiResolutionSTFTLoss",
    "WaveformL1Loss",
    "WaveformL2Loss",
    "build_loss_network",
]
