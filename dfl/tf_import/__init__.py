"""Import the authors' TensorFlow 1.x checkpoints (``dfl-import-tf``) without TensorFlow.

- :class:`TFCheckpoint` reads a tensor-bundle checkpoint (``PREFIX.index`` + ``PREFIX.data-*``).
- :func:`import_denoiser` / :func:`import_lossnet` map it onto ``ContextAggregationNet`` /
  ``LossNetwork`` built with :data:`AUTHORS_DENOISER_CONFIG` / :data:`AUTHORS_LOSSNET_CONFIG`.
- :func:`convert` writes a dfl model file (``dfl.checkpoints.save_model``).
"""

from dfl.tf_import.bundle import CheckpointFormatError, TFCheckpoint
from dfl.tf_import.convert import convert
from dfl.tf_import.mapping import (
    AUTHORS_DENOISER_CONFIG,
    AUTHORS_HEADS,
    AUTHORS_LOSSNET_CONFIG,
    TFImportError,
    authors_config,
    import_denoiser,
    import_lossnet,
)

__all__ = [
    "AUTHORS_DENOISER_CONFIG",
    "AUTHORS_HEADS",
    "AUTHORS_LOSSNET_CONFIG",
    "CheckpointFormatError",
    "TFCheckpoint",
    "TFImportError",
    "authors_config",
    "convert",
    "import_denoiser",
    "import_lossnet",
]
