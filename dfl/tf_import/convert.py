"""Convert one of the authors' TF checkpoints into a dfl model file (the library half of ``dfl-import-tf``)."""

from __future__ import annotations

import os
from pathlib import Path

from dfl.checkpoints import save_model
from dfl.tf_import.bundle import TFCheckpoint
from dfl.tf_import.mapping import import_denoiser, import_lossnet

IMPORTERS = {"denoiser": import_denoiser, "lossnet": import_lossnet}


def convert(kind: str, prefix: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Read the TF checkpoint ``prefix``, map it onto the ``kind`` network, write a dfl model file."""
    if kind not in IMPORTERS:
        raise ValueError(f"kind must be one of {sorted(IMPORTERS)}, got {kind!r}")
    ckpt = TFCheckpoint(prefix)
    model = IMPORTERS[kind](ckpt)
    meta = {
        "source": "tensorflow",
        "tf_checkpoint": str(ckpt.prefix),
        "tf_variables": len(ckpt.names()),
        "note": "imported with dfl-import-tf from the authors' TensorFlow 1.x release",
    }
    return save_model(out, kind, model, meta)
