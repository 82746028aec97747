from dfl.losses.feature_loss import FeatureLoss, build_loss_network
from dfl.losses.waveform import WaveformL1Loss, WaveformL2Loss

__all__ = ["FeatureLoss", "WaveformL1Loss", "WaveformL2Loss", "build_loss_network"]
