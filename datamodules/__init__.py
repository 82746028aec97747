from datamodules.paired_folder import DataError, PairedAudioDataset, PairedFolderDataModule

__all__ = ["DataError", "PairedAudioDataset", "PairedFolderDataModule"]
from datamodules.synthetic import SyntheticSpeechDataModule  # noqa: E402

__all__ += ["SyntheticSpeechDataModule"]
from datamodules.mixing import MixingDataModule  # noqa: E402

__all__ += ["MixingDataModule"]
