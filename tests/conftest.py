import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# compiled kernels (dfl.kernels.native) go to a per-run cache, not the user's ~/.cache
if "DFL_CACHE_DIR" not in os.environ:
    os.environ["DFL_CACHE_DIR"] = tempfile.mkdtemp(prefix="dfl-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DFL_CACHE_DIR"], True)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference data not present at {SHARED} (only beside the development checkout)")
    return SHARED


def write_pair_tree(root: Path, splits=("train", "val", "test"), n=3, seconds=0.5, sr=16000, seed=0) -> Path:
    """A tiny paired-folder dataset: clean = tones, noisy = clean + noise."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for kind in ("noisy", "clean"):
            (root / f"{split}set_{kind}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            t = np.arange(int(seconds * sr)) / sr
            clean = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
            noisy = clean + 0.05 * rng.standard_normal(len(t))
            sf.write(root / f"{split}set_clean/u{i}.wav", clean.astype(np.float32), sr, subtype="FLOAT")
            sf.write(root / f"{split}set_noisy/u{i}.wav", noisy.astype(np.float32), sr, subtype="FLOAT")
    return root


@pytest.fixture
def pair_tree(tmp_path) -> Path:
    return write_pair_tree(tmp_path / "pairs")
