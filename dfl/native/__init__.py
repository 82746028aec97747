"""Small C kernels for the CPU fast path, compiled on first use and cached.

Why compiled at run time: the kernels are a few vector loops tuned with
``-march=native`` for the machine that runs them; they need only a C compiler
(no PyTorch headers) and build in well under a second. The library is cached
under ``$DFL_CACHE_DIR`` (default ``~/.cache/dfl/native``), keyed by the source,
the compiler and the CPU, so a home directory shared by different cluster nodes
never loads a library built for another CPU. Without a compiler, or with
``DFL_NATIVE=0``, :func:`cpu_kernels` returns ``None`` and callers use their
pure-PyTorch code, which gives the same results more slowly. Every call is
bounds-checked here first: a wrong shape raises, it never touches memory
outside the tensors.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
# tried in order: OpenMP shares the libgomp PyTorch already loaded (same thread count)
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)


def cache_dir() -> Path:
    if os.environ.get("DFL_CACHE_DIR"):
        return Path(os.environ["DFL_CACHE_DIR"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dfl" / "native"


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(source: Path = SOURCE) -> Path:
    """Compile ``source`` into the cache (atomically) unless already there; returns the library path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc/clang)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"C compiler {cc!r} does not run: {exc}") from exc
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (source.read_text(), cc, version, _cpu_identity(), platform.machine()))
    ).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", str(source), "-o", tmp]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            result = subprocess.CompletedProcess(cmd, 1, "", str(exc))
        if result.returncode == 0:
            os.replace(tmp, target)  # other processes see the whole library or none
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {result.stderr.strip()[-500:]}")
    raise RuntimeError("could not compile " + str(source) + ":\n" + "\n".join(errors))


def _row_pointer(t: torch.Tensor, row: int) -> int:
    return t.data_ptr() + row * t.stride(0) * t.element_size()


def _check_rows(name: str, t: torch.Tensor, first: int, last: int) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 2-D float32 CPU tensor, got {t.dtype} {tuple(t.shape)}")
    if first < 0 or last > t.shape[0]:
        raise ValueError(f"{name}: rows [{first}, {last}) fall outside its {t.shape[0]} rows")


def _check_channels(name: str, t: torch.Tensor, channels: int) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != channels:
        raise ValueError(f"{name} must be {channels} contiguous float32 CPU values")


class CpuKernels:
    """The kernels of ``kernels.c``: Winograd F(4,3) transforms along time, BN moments, affine + leaky ReLU."""

    # filter transform: the 6 GEMM weights are G @ (the 3 taps)
    G = torch.tensor(
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        dtype=torch.float64,
    )

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._input = lib.dfl_wino43_input
        self._input.argtypes = [ptr, i64, i64, i64, i64, ptr, i64]
        self._input.restype = None
        self._output = lib.dfl_wino43_output
        self._output.argtypes = [ptr, i64, i64, i64, i64, ptr, ctypes.c_float, ctypes.c_int, ptr, i64]
        self._output.restype = None
        self._output_grad = lib.dfl_wino43_output_grad
        self._output_grad.argtypes = [ptr, i64, i64, i64, i64, ptr, i64]
        self._output_grad.restype = None
        self._moments = lib.dfl_channel_moments
        self._moments.argtypes = [ptr, i64, i64, ptr]
        self._moments.restype = ctypes.c_int
        self._affine = lib.dfl_affine_leaky_relu
        self._affine.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_float]
        self._affine.restype = None

    @classmethod
    def winograd_weights(cls, weight: torch.Tensor) -> torch.Tensor:
        """``[Cout, Cin, 3]`` conv weight → the 6 GEMM operands ``[6, Cin, Cout]`` (float32)."""
        return torch.einsum("ik,ock->ico", cls.G, weight.double()).float().contiguous()

    @staticmethod
    def _check_tile(operands: torch.Tensor, items: int, channels: int) -> None:
        if channels % 8:
            raise ValueError(f"channels must be a multiple of 8, got {channels}")
        if not (operands.is_contiguous() and operands.dtype == torch.float32 and operands.device.type == "cpu"):
            raise ValueError("the Winograd operands must be a contiguous float32 CPU tensor")
        if tuple(operands.shape) != (6, items, channels):
            raise ValueError(f"operands must have shape (6, {items}, {channels}), got {tuple(operands.shape)}")

    def winograd_input(self, x: torch.Tensor, row: int, blocks: int, phases: int, dilation: int, out: torch.Tensor):
        """Operands of outputs ``row + 4d·b + p + j·d`` (b < blocks, p < phases, j < 4) into ``out [6, b·p, C]``."""
        channels = x.shape[1]
        self._check_tile(out, blocks * phases, channels)
        _check_rows("x", x, row - dilation, row + 4 * dilation * (blocks - 1) + 5 * dilation + phases - dilation)
        self._input(_row_pointer(x, row - dilation), blocks, phases, channels, dilation, out.data_ptr(), out.stride(0))

    def winograd_output(
        self,
        products: torch.Tensor,
        y: torch.Tensor,
        row: int,
        blocks: int,
        phases: int,
        dilation: int,
        bias: torch.Tensor,
        negative_slope: float | None,
    ) -> None:
        """The 4 outputs per item from ``products [6, b·p, C]`` (+ bias, leaky ReLU unless None) into ``y``."""
        channels = y.shape[1]
        self._check_tile(products, blocks * phases, channels)
        _check_rows("y", y, row, row + 4 * dilation * (blocks - 1) + 3 * dilation + phases)
        _check_channels("bias", bias, channels)
        slope = 0.0 if negative_slope is None else float(negative_slope)
        self._output(
            products.data_ptr(),
            blocks,
            phases,
            channels,
            dilation,
            bias.data_ptr(),
            slope,
            int(negative_slope is not None),
            _row_pointer(y, row),
            products.stride(0),
        )


    def winograd_output_grad(self, dy: torch.Tensor, row: int, blocks: int, phases: int, dilation: int, out):
        """Weight-gradient operands ``A·dy`` of output rows as in :meth:`winograd_output` into ``out [6, b·p, C]``."""
        channels = dy.shape[1]
        self._check_tile(out, blocks * phases, channels)
        _check_rows("dy", dy, row, row + 4 * dilation * (blocks - 1) + 3 * dilation + phases)
        self._output_grad(_row_pointer(dy, row), blocks, phases, channels, dilation, out.data_ptr(), out.stride(0))

    def channel_moments(self, z: torch.Tensor, sums: torch.Tensor) -> None:
        """Adds the per-channel sums of ``z [rows, C]`` to ``sums[0]`` and of its squares to ``sums[1]`` (float64)."""
        channels = z.shape[1] if z.dim() == 2 else -1
        _check_rows("z", z, 0, z.shape[0] if z.dim() == 2 else 0)
        if sums.dtype != torch.float64 or not sums.is_contiguous() or tuple(sums.shape) != (2, channels):
            raise ValueError(f"sums must be a contiguous float64 tensor of shape (2, {channels})")
        if self._moments(z.data_ptr(), z.shape[0], channels, sums.data_ptr()) != 0:
            raise MemoryError("dfl_channel_moments: out of memory")

    def affine_leaky_relu_(self, z: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, negative_slope: float):
        """In place ``z = leaky_relu(scale·z + offset)`` with per-channel ``scale``, ``offset``."""
        _check_rows("z", z, 0, z.shape[0] if z.dim() == 2 else 0)
        channels = z.shape[1]
        if channels % 8:
            raise ValueError(f"channels must be a multiple of 8, got {channels}")
        _check_channels("scale", scale, channels)
        _check_channels("offset", offset, channels)
        self._affine(z.data_ptr(), z.shape[0], channels, scale.data_ptr(), offset.data_ptr(), float(negative_slope))
        return z


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or ``None`` (logged once) when they are disabled or cannot be built."""
    if os.environ.get("DFL_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        return CpuKernels(build())
    except (RuntimeError, OSError) as exc:
        log.warning("dfl: fast CPU kernels unavailable, using the PyTorch path (slower): %s", exc)
        return None
