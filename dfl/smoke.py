"""Install smoke check: load every compiled extension dfl uses and run each once.

``make install`` ends with ``python -m dfl.smoke`` so that a broken binary (a torchaudio built for
another torch, a pesq that did not compile, a missing libsndfile) fails the install with a message
that says what to do, instead of failing deep inside a training run or a test.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable

import numpy as np

FIX = {
    "torch": "reinstall from the lock: rm -rf .venv && make install",
    "torchaudio": (
        "torchaudio must be built for the installed torch (the lock pins torch 2.11.0 + torchaudio 2.11.0; "
        "torchaudio 2.11.1 does not load with torch 2.11.0): rm -rf .venv && make install"
    ),
    "soundfile": "soundfile needs libsndfile (bundled in its wheel; on other platforms install libsndfile)",
    "pesq": "pesq is compiled from source at install: install a C compiler (gcc) and rerun make install",
    "onnxruntime": "reinstall onnxruntime from the lock (rm -rf .venv && make install)",
    "dfl kernels": (
        "the CPU kernels need a working C compiler (gcc or clang, or set CC); "
        "DFL_NATIVE=0 runs the slower PyTorch path instead"
    ),
}


def check_torch() -> str:
    import torch

    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    if float((x @ x.T).sum()) != 83.0:
        raise RuntimeError("a 2x3 matrix product gave a wrong result")
    return f"torch {torch.__version__}"


def check_torchaudio() -> str:
    import torchaudio

    from dfl.audio import resample

    t = np.arange(48_000) / 48_000
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)  # 1 s of 1 kHz at 48 kHz
    out = resample(tone, 48_000, 16_000)
    if out.shape != (16_000,):
        raise RuntimeError(f"resampling 48000 samples from 48 to 16 kHz gave shape {out.shape}")
    rms = float(np.sqrt(np.mean(out[1000:-1000] ** 2)))
    if abs(rms - 2**-0.5) > 0.01:
        raise RuntimeError(f"a resampled 1 kHz tone has RMS {rms:.4f}, expected 0.7071")
    return f"torchaudio {torchaudio.__version__} (resampler 48 -> 16 kHz)"


def check_soundfile() -> str:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.array([0.0, 0.5, -0.5], dtype=np.float32), 16_000, format="WAV", subtype="PCM_16")
    buf.seek(0)
    data, rate = sf.read(buf, dtype="float32")
    if rate != 16_000 or not np.allclose(data, [0.0, 0.5, -0.5], atol=1e-4):
        raise RuntimeError(f"a WAV round trip gave {data} at {rate} Hz")
    return f"soundfile {sf.__version__} (libsndfile {sf.__libsndfile_version__})"


def check_pesq() -> str:
    from dfl.metrics.pesq_stoi import pesq_score

    rng = np.random.default_rng(0)
    t = np.arange(32_000) / 16_000
    clean = (np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32) * 0.3
    score = pesq_score(clean, clean + 0.01 * rng.standard_normal(clean.size).astype(np.float32), 16_000)
    if not 1.0 <= score <= 4.7:
        raise RuntimeError(f"PESQ-wb gave {score}, outside its scale")
    return f"pesq (PESQ-wb {score:.2f} on a test tone)"


def check_onnxruntime() -> str:
    import onnxruntime

    from dfl.metrics.dnsmos import dnsmos

    rng = np.random.default_rng(0)
    scores = dnsmos((0.1 * rng.standard_normal(16_000 * 2)).astype(np.float32), 16_000)
    if not all(np.isfinite(v) for v in scores.values()):
        raise RuntimeError(f"DNSMOS gave {scores}")
    return f"onnxruntime {onnxruntime.__version__} (DNSMOS models)"


def check_kernels() -> str:
    import torch

    from dfl.kernels.native import CpuKernels, build, channel_mean_var

    kernels = CpuKernels(build())
    z = torch.randn(2, 100, 8, generator=torch.Generator().manual_seed(0))
    mean, var = channel_mean_var(kernels, z)
    flat = z.reshape(-1, 8).double()
    # float32 partial sums inside the kernel: agreement to ~1e-6, not float64's 1e-15
    close = torch.allclose(mean, flat.mean(0), atol=1e-5) and torch.allclose(var, flat.var(0, unbiased=False), rtol=1e-4)
    if not close:
        raise RuntimeError("the compiled channel moments differ from PyTorch's")
    return "dfl CPU kernels (compiled, channel moments checked)"


CHECKS: dict[str, Callable[[], str]] = {
    "torch": check_torch,
    "torchaudio": check_torchaudio,
    "soundfile": check_soundfile,
    "pesq": check_pesq,
    "onnxruntime": check_onnxruntime,
    "dfl kernels": check_kernels,
}


def run(checks: dict[str, Callable[[], str]] = CHECKS) -> list[str]:
    """Run every check; returns one failure message per broken component (empty when all pass)."""
    failures = []
    for name, check in checks.items():
        try:
            print(f"  ok  {check()}")
        except Exception as exc:  # noqa: BLE001 - any failure of a binary is reported the same way
            reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
            failures.append(f"{name}: {reason}\n      fix: {FIX[name]}")
            print(f"  FAIL {name}: {reason}")
    return failures


def main() -> int:
    print(f"dfl smoke check (Python {sys.version.split()[0]})")
    failures = run()
    if failures:
        print("\ndfl smoke check FAILED: these compiled components do not work:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print("dfl smoke check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
