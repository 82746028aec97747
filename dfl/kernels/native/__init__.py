"""Small C kernels for the CPU fast path, compiled on first use and cached.

Why compiled at run time: the kernels are a few vector loops tuned with
``-march=native`` for the machine that runs them; they need only a C compiler
(no PyTorch headers) and build in well under a second. The library is cached
under ``$DFL_CACHE_DIR`` (default ``~/.cache/dfl/native``), keyed by the source,
the compiler and the CPU, so a home directory shared by different cluster nodes
never loads a library built for another CPU, and a changed or renamed kernel
always compiles a new library (one without a kernel the wrappers need is not used). Without a compiler, or with
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
# read once, with the wrappers below: the library built is always the one they were written for
SOURCE_TEXT = SOURCE.read_text()
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


def build(source_text: str = SOURCE_TEXT, name: str = SOURCE.stem) -> Path:
    """Compile the C source into the cache (atomically) unless already there; returns the library path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc/clang)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"C compiler {cc!r} does not run: {exc}") from exc
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (source_text, cc, version, _cpu_identity(), platform.machine()))
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        _check_ownership(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp_dir:
        source = Path(tmp_dir) / f"{name}.c"
        source.write_text(source_text)
        for flags in FLAG_SETS:
            if _compile(cc, flags, source, target, errors):
                return target
    raise RuntimeError(f"could not compile {SOURCE.parent / (name + '.c')}:\n" + "\n".join(errors))


def _check_ownership(library: Path) -> None:
    """Load only a library this user built: loading one runs its code (as unpickling a checkpoint would)."""
    st = library.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise RuntimeError(
            f"refusing to load {library}: it belongs to another user or others can write to it "
            "(point DFL_CACHE_DIR at a directory of your own)"
        )


def _compile(cc: str, flags: list[str], source: Path, target: Path, errors: list[str]) -> bool:
    """One compiler run into a temporary file, renamed onto ``target`` on success."""
    tmp = source.with_suffix(".so")
    cmd = [cc, *flags, "-shared", "-fPIC", str(source), "-o", str(tmp)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        result = subprocess.CompletedProcess(cmd, 1, "", str(exc))
    if result.returncode == 0:
        os.replace(tmp, target)  # other processes see the whole library or none
        return True
    errors.append(f"{' '.join(cmd)}: {result.stderr.strip()[-500:]}")
    return False


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


def _check_sums(name: str, t: torch.Tensor, channels: int) -> None:
    """Per-channel float64 sums or moments, ``(2, C)``."""
    if t.dtype != torch.float64 or not t.is_contiguous() or tuple(t.shape) != (2, channels):
        raise ValueError(f"{name} must be a contiguous float64 tensor of shape (2, {channels})")


class CpuKernels:
    """The kernels of ``kernels.c``: Winograd F(4,3) convs along time and their backward, the direct conv of few
    input channels, the 1×1 output conv of an activation read through its deferred norm, BN moments, affine +
    leaky ReLU.

    Results do not depend on the number of threads: work is split into fixed chunks and sums are added
    chunk by chunk in order."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._conv = lib.dfl_wino43_conv
        source = [ptr, i64, i64, ptr, ptr, ctypes.c_float]  # see _conv_source
        self._conv.argtypes = [*source, i64, i64, i64, i64, ptr, ptr, ctypes.c_float, ctypes.c_int, ptr, ptr]
        self._conv.restype = ctypes.c_int
        self._conv_backward = lib.dfl_wino43_conv_backward
        self._conv_backward.argtypes = [ptr, ptr, i64, i64, ptr, ptr, *source, ptr, i64, i64, i64, ptr, ptr, ptr, ptr]
        self._conv_backward.restype = ctypes.c_int
        self._moments = lib.dfl_channel_moments
        self._moments.argtypes = [ptr, ptr, i64, i64, ptr]
        self._moments.restype = ctypes.c_int
        self._affine = lib.dfl_affine_leaky_relu
        self._affine.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ctypes.c_float]
        self._affine.restype = None
        self._weights = lib.dfl_winograd_weights
        self._weights.argtypes = [ptr, i64, i64, ctypes.c_int, ptr]
        self._weights.restype = None
        self._taps_grad = lib.dfl_winograd_taps_grad
        self._taps_grad.argtypes = [ptr, i64, i64, ptr]
        self._taps_grad.restype = None
        self._project = lib.dfl_output_conv_deferred_norm
        self._project.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_float, ptr, ptr, ptr]
        self._project.restype = None
        self._project_backward = lib.dfl_output_conv_deferred_norm_backward
        self._project_backward.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ctypes.c_float, ptr, ptr, ptr, ptr, ptr]
        self._project_backward.restype = ctypes.c_int
        self._direct = lib.dfl_direct_conv
        self._direct.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr]
        self._direct.restype = ctypes.c_int
        self._direct_grad = lib.dfl_direct_conv_weight_grad
        self._direct_grad.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ptr]
        self._direct_grad.restype = ctypes.c_int
        self._norm = lib.dfl_norm_forward
        self._norm.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_double, ctypes.c_double, ptr, ptr, ptr, ptr]
        self._norm.restype = None
        self._merge_moments = lib.dfl_merge_moments
        self._merge_moments.argtypes = [ptr, ptr, i64, i64, ptr]
        self._merge_moments.restype = None
        self._norm_backward = lib.dfl_norm_backward
        self._norm_backward.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_double, ctypes.c_int, ptr, ptr, ptr, ptr]
        self._norm_backward.restype = None
        self._norm_grads = lib.dfl_norm_grads
        self._norm_grads.argtypes = [ptr, ptr, i64, ptr]
        self._norm_grads.restype = None
        self._abs_diff_sum = lib.dfl_abs_diff_sum
        self._abs_diff_sum.argtypes = [ptr, ptr, i64]
        self._abs_diff_sum.restype = ctypes.c_double
        self._feature_grad = lib.dfl_feature_grad
        self._feature_grad.argtypes = [ptr, ptr, ptr, ctypes.c_float, ctypes.c_float, i64, ptr]
        self._feature_grad.restype = None
        self._strided_conv = lib.dfl_strided_conv
        self._strided_conv.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_float, ptr]
        self._strided_conv.restype = ctypes.c_int

    def winograd_weights(self, weight: torch.Tensor, flipped: bool = False) -> torch.Tensor:
        """``[Cout, Cin, 3]`` conv weight → the 6 GEMM operands ``[6, Cin, Cout]``, ``Σ_k G[i,k]·W_kᵀ``.

        ``flipped``: those of the input gradient's conv (the taps flipped and transposed), ``[6, Cout, Cin]``.
        """
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 3 or weight.shape[2] != 3:
            raise ValueError(f"weight must be a float32 CPU tensor [Cout, Cin, 3], got {weight.dtype} {tuple(weight.shape)}")
        c_out, c_in, _ = weight.shape
        w = weight.detach().contiguous()
        out = w.new_empty((6, c_out, c_in) if flipped else (6, c_in, c_out))
        self._weights(w.data_ptr(), c_out, c_in, int(flipped), out.data_ptr())
        return out

    def winograd_taps_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """``∂L/∂(winograd weights) [6, Cin, Cout]`` → ``∂L/∂(conv weight) [Cout, Cin, 3]`` (the chain rule
        through G, in float64)."""
        if grad.dim() != 3 or grad.shape[0] != 6:
            raise ValueError(f"grad must have shape (6, Cin, Cout), got {tuple(grad.shape)}")
        _, c_in, c_out = grad.shape
        self._check_winograd("grad", grad, c_in, c_out)
        out = grad.new_empty(c_out, c_in, 3)
        self._taps_grad(grad.data_ptr(), c_in, c_out, out.data_ptr())
        return out

    @staticmethod
    def _check_winograd(name: str, w: torch.Tensor, c_in: int, c_out: int) -> None:
        if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor")
        if tuple(w.shape) != (6, c_in, c_out):
            raise ValueError(f"{name} must have shape (6, {c_in}, {c_out}), got {tuple(w.shape)}")

    @staticmethod
    def _conv_source(x, x_row, rows: int, dilation: int, x_norm, y_name, y, y_row, y_rows=None) -> tuple:
        """Checks a conv's buffers (``rows`` outputs; ``y`` rows ``y_row … y_row + y_rows``, default
        ``rows``) and returns the C ``source_t`` of its
        input: ``x`` from ``x_row`` with its zero padding in the buffer (rows ``x_row − d … x_row + rows + d``
        read), or, with ``x_norm = (scale, offset, slope, valid)``, the previous layer's conv output: rows
        ``x_row … x_row + valid`` read through ``leaky_relu(scale·x + offset)``, zero outside them (no
        padding in the buffer)."""
        if rows < 0 or dilation < 1:
            raise ValueError(f"need rows >= 0 and dilation >= 1, got {rows} and {dilation}")
        if x_norm is None:
            _check_rows("x", x, x_row - dilation, x_row + rows + dilation)
        else:
            _check_rows("x", x, x_row, x_row + x_norm[3])
        _check_rows(y_name, y, y_row, y_row + (rows if y_rows is None else y_rows))
        for name, t in (("x", x), (y_name, y)):
            if t.shape[1] % 8:
                raise ValueError(f"{name}: channels must be a multiple of 8, got {t.shape[1]}")
        if x_norm is None:
            return (_row_pointer(x, x_row), -dilation, rows + dilation, None, None, 0.0)
        scale, offset, slope, valid = x_norm
        _check_channels("x_norm scale", scale, x.shape[1])
        _check_channels("x_norm offset", offset, x.shape[1])
        return (_row_pointer(x, x_row), 0, int(valid), scale.data_ptr(), offset.data_ptr(), float(slope))

    def winograd_conv(
        self,
        x: torch.Tensor,
        x_row: int,
        weights: torch.Tensor,
        y: torch.Tensor,
        y_row: int,
        rows: int,
        dilation: int,
        bias: torch.Tensor | None,
        negative_slope: float | None,
        moments: torch.Tensor | None = None,
        x_norm: tuple[torch.Tensor, torch.Tensor, float, int] | None = None,
    ) -> None:
        """``y[y_row + t] = act(Σ_k x[x_row + t + (k−1)·d] @ W_k + bias)`` for ``t < rows``.

        ``x`` holds the conv's zero padding (``d`` rows each side), or is read through ``x_norm`` (see
        :meth:`_conv_source`); ``weights``: :meth:`winograd_weights` ``[6, Cin, Cout]``; ``act`` is a leaky ReLU
        unless ``negative_slope`` is None; no ``bias``: zero. ``moments`` (float64 ``(2, Cout)``) receives
        the written rows' per-channel mean and sum of squared deviations (see :meth:`merge_moments`).
        """
        source = self._conv_source(x, x_row, rows, dilation, x_norm, "y", y, y_row)
        self._check_winograd("weights", weights, x.shape[1], y.shape[1])
        if bias is not None:
            _check_channels("bias", bias, y.shape[1])
        if moments is not None:
            _check_sums("moments", moments, y.shape[1])
        if moments is not None and rows == 0:
            raise ValueError("moments of 0 rows are undefined")
        slope = 0.0 if negative_slope is None else float(negative_slope)
        status = self._conv(*source, rows, x.shape[1], y.shape[1], dilation,
                            weights.data_ptr(), None if bias is None else bias.data_ptr(), slope, int(negative_slope is not None),
                            _row_pointer(y, y_row), None if moments is None else moments.data_ptr())  # fmt: skip
        if status != 0:
            raise MemoryError("dfl_wino43_conv: out of memory")

    def winograd_conv_backward(
        self,
        grad: torch.Tensor,
        z: torch.Tensor,
        rows: int,
        coefficients: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        flipped_weights: torch.Tensor,
        dx: torch.Tensor,
        weights_grad: torch.Tensor,
        dilation: int,
        x_norm: tuple[torch.Tensor, torch.Tensor, float, int] | None = None,
        below: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Backward of :meth:`winograd_conv` (no bias, no activation) in one pass.

        ``z [rows, Cout]``: the conv's output; ``grad [n, Cout]``: its gradient from above (rows ≥ n: none);
        ``coefficients = (b, e)`` add batch norm's statistics gradients, ``dz = grad + b·z + e`` per channel.
        Writes ``dx`` rows ``d … d + n`` (the conv of ``dz`` with ``flipped_weights``, the Winograd weights of
        the flipped, transposed taps ``[6, Cout, Cin]``) and adds the Winograd weights' gradient to
        ``weights_grad [6, Cin, Cout]``. ``x``: the conv's input buffer, ``rows + 2d`` rows from row 0.

        With ``x_norm = (scale, offset, slope, n)``, ``x`` is the layer below's conv output, read through
        its norm + leaky ReLU as in :meth:`winograd_conv`, and ``dx [n, Cin]`` gets rows ``0 … n``. With
        ``below = (shift, sums)`` as well, ``dx`` receives that layer's z-gradient ``scale·dy`` instead
        (``dy``: its leaky ReLU's input gradient) and ``sums`` (float64 ``(2, Cin)``) gets ``Σdy`` and
        ``Σdy·(x − shift)`` added, per channel.
        """
        for name, t in (("grad", grad), ("z", z)):
            _check_rows(name, t, 0, t.shape[0] if t.dim() == 2 else 0)
        n, c_out, d = grad.shape[0], z.shape[1], dilation
        if grad.shape[1] != c_out or c_out % 8:
            raise ValueError(f"grad {tuple(grad.shape)} and z {tuple(z.shape)} need the same channels, a multiple of 8")
        if rows < n:
            raise ValueError(f"the conv's {rows} rows cannot be fewer than the gradient's {n}")
        _check_rows("z", z, 0, rows)
        if below is not None and x_norm is None:
            raise ValueError("below needs x_norm: the layer below's z is x")
        # the input rows the conv read: from row d of a padded buffer, or from row 0 through x_norm
        x_row = d if x_norm is None else 0
        source = self._conv_source(x, x_row, rows, d, x_norm, "dx", dx, x_row, y_rows=n)
        c_in = x.shape[1]
        if dx.shape[1] != c_in:
            raise ValueError(f"dx has {dx.shape[1]} channels, x {c_in}")
        self._check_winograd("flipped_weights", flipped_weights, c_out, c_in)
        self._check_winograd("weights_grad", weights_grad, c_in, c_out)
        for name, t in zip("be", coefficients):
            _check_channels(name, t, c_out)
        shift = sums = None
        if below is not None:
            _check_channels("shift", below[0], c_in)
            _check_sums("sums", below[1], c_in)
            shift, sums = below[0].data_ptr(), below[1].data_ptr()
        b, e = (t.data_ptr() for t in coefficients)
        status = self._conv_backward(grad.data_ptr(), z.data_ptr(), n, rows, b, e, *source, flipped_weights.data_ptr(),
                                     c_in, c_out, d, _row_pointer(dx, x_row), weights_grad.data_ptr(), shift, sums)  # fmt: skip
        if status != 0:
            raise MemoryError("dfl_wino43_conv_backward: out of memory")

    @staticmethod
    def _check_like(z: torch.Tensor, **others: torch.Tensor | None) -> int:
        """``z`` and each other ``[rows, C]`` tensor: contiguous float32 CPU, same shape; returns C."""
        _check_rows("z", z, 0, z.shape[0] if z.dim() == 2 else 0)
        for name, t in others.items():
            if t is not None:
                _check_rows(name, t, 0, t.shape[0] if t.dim() == 2 else 0)
                if t.shape != z.shape:
                    raise ValueError(f"{name} has shape {tuple(t.shape)}, z has {tuple(z.shape)}")
        if z.shape[1] % 8:
            raise ValueError(f"channels must be a multiple of 8, got {z.shape[1]}")
        return z.shape[1]

    def channel_moments(self, z: torch.Tensor, sums: torch.Tensor, shift: torch.Tensor) -> None:
        """Adds ``Σ(z−k)`` and ``Σ(z−k)²`` per channel of ``z [rows, C]`` about ``shift`` to ``sums (2, C)``
        (float64). A shift ``k`` near the channel means avoids cancellation in the variance."""
        channels = self._check_like(z)
        _check_channels("shift", shift, channels)
        _check_sums("sums", sums, channels)
        status = self._moments(z.data_ptr(), shift.data_ptr(), z.shape[0], channels, sums.data_ptr())
        if status != 0:
            raise MemoryError("dfl_channel_moments: out of memory")

    def affine_leaky_relu(
        self,
        z: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        negative_slope: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out = leaky_relu(scale·z + offset)`` with per-channel ``scale``, ``offset`` (``out=z``: in place)."""
        out = z if out is None else out
        channels = self._check_like(z, out=out)
        _check_channels("scale", scale, channels)
        _check_channels("offset", offset, channels)
        self._affine(z.data_ptr(), out.data_ptr(), z.shape[0], channels, scale.data_ptr(), offset.data_ptr(),
                     float(negative_slope))  # fmt: skip
        return out

    def _check_projection(self, z: torch.Tensor, n: int, scale, offset, weight) -> int:
        channels = self._check_like(z)
        if not 0 <= n <= z.shape[0]:
            raise ValueError(f"n = {n} rows outside z's {z.shape[0]}")
        for name, t in (("scale", scale), ("offset", offset), ("weight", weight)):
            _check_channels(name, t, channels)
        return channels

    def output_conv_deferred_norm(self, z, n: int, scale, offset, negative_slope: float, weight, bias, y) -> None:
        """``y[t] = weight · leaky_relu(scale·z[t] + offset) + bias`` for ``t < n``: a 1×1 conv to one channel of
        the activation a layer's conv output ``z [rows, C]`` gives through its deferred norm, applied as ``z`` is
        read (``weight [C]``, ``bias [1]``, ``y [n]``)."""
        channels = self._check_projection(z, n, scale, offset, weight)
        _check_channels("bias", bias, 1)
        _check_channels("y", y, n)
        self._project(z.data_ptr(), n, channels, scale.data_ptr(), offset.data_ptr(), float(negative_slope),
                      weight.data_ptr(), bias.data_ptr(), y.data_ptr())  # fmt: skip

    def output_conv_deferred_norm_backward(self, grad, z, scale, offset, negative_slope: float, weight, shift, dz,
                                           sums, weight_grad) -> None:  # fmt: skip
        """Backward of :meth:`output_conv_deferred_norm` for ``grad [n]``: writes rows ``0 … n`` of ``dz`` (the
        z-gradient, as :meth:`winograd_conv_backward`'s ``below`` does) and adds ``Σdy``, ``Σdy·(z − shift)`` to
        ``sums`` and the weight's gradient to ``weight_grad`` (float64 ``(2, C)`` and ``(C,)``)."""
        n = grad.numel()
        channels = self._check_projection(z, n, scale, offset, weight)
        _check_channels("grad", grad, n)
        _check_channels("shift", shift, channels)
        _check_rows("dz", dz, 0, n)
        if dz.shape[1] != channels:
            raise ValueError(f"dz has {dz.shape[1]} channels, z {channels}")
        _check_sums("sums", sums, channels)
        if weight_grad.dtype != torch.float64 or not weight_grad.is_contiguous() or weight_grad.numel() != channels:
            raise ValueError(f"weight_grad must be {channels} contiguous float64 values")
        status = self._project_backward(grad.data_ptr(), z.data_ptr(), n, channels, scale.data_ptr(), offset.data_ptr(),
                                        float(negative_slope), weight.data_ptr(), shift.data_ptr(), dz.data_ptr(),
                                        sums.data_ptr(), weight_grad.data_ptr())  # fmt: skip
        if status != 0:
            raise MemoryError("dfl_output_conv_deferred_norm_backward: out of memory")

    @staticmethod
    def _check_direct(x: torch.Tensor, rows: int, dilation: int, c_out: int, y_name: str, y: torch.Tensor) -> None:
        if rows < 0 or dilation < 1:
            raise ValueError(f"need rows >= 0 and dilation >= 1, got {rows} and {dilation}")
        _check_rows("x", x, 0, rows + 2 * dilation)
        _check_rows(y_name, y, 0, rows)
        if y.shape[1] != c_out or c_out % 8:
            raise ValueError(f"{y_name} has {y.shape[1]} channels; the conv has {c_out}, which must be a multiple of 8")

    def direct_conv(self, x, weight, y, rows: int, dilation: int, moments: torch.Tensor | None = None) -> None:
        """``y[t] = Σ_k x[t + k·d] @ weight[:, :, k]ᵀ`` for ``t < rows``, computed directly (for few input channels):
        ``x [rows + 2d, Cin]`` holds the conv's zero padding; ``moments`` as for :meth:`winograd_conv`."""
        if weight.dtype != torch.float32 or weight.dim() != 3 or weight.shape[1:] != (x.shape[1], 3):
            raise ValueError(f"weight must be float32 [Cout, {x.shape[1]}, 3], got {weight.dtype} {tuple(weight.shape)}")
        self._check_direct(x, rows, dilation, weight.shape[0], "y", y)
        if moments is not None:
            _check_sums("moments", moments, y.shape[1])
            if rows == 0:
                raise ValueError("moments of 0 rows are undefined")
        taps = weight.detach().permute(2, 1, 0).contiguous()  # [3, Cin, Cout]
        status = self._direct(x.data_ptr(), rows, x.shape[1], y.shape[1], dilation, taps.data_ptr(), y.data_ptr(),
                              None if moments is None else moments.data_ptr())  # fmt: skip
        if status != 0:
            raise MemoryError("dfl_direct_conv: out of memory")

    def direct_conv_weight_grad(self, grad, z, rows: int, coefficients, x, dilation: int, weight_grad) -> None:
        """Adds the weight gradient of :meth:`direct_conv` for the output gradient ``dz = grad + b·z + e``
        (``grad [n, Cout]`` for rows < n, ``z [rows, Cout]``, ``coefficients = (b, e)``) to ``weight_grad``,
        float64 ``[3, Cin, Cout]``."""
        c_out = z.shape[1] if z.dim() == 2 else 0
        self._check_direct(x, rows, dilation, c_out, "z", z)
        _check_rows("grad", grad, 0, grad.shape[0] if grad.dim() == 2 else 0)
        if grad.shape[1] != c_out or grad.shape[0] > rows:
            raise ValueError(f"grad {tuple(grad.shape)} does not fit z {tuple(z.shape)} and {rows} rows")
        for name, t in zip("be", coefficients):
            _check_channels(name, t, c_out)
        shape = (3, x.shape[1], c_out)
        if weight_grad.dtype != torch.float64 or not weight_grad.is_contiguous() or tuple(weight_grad.shape) != shape:
            raise ValueError(f"weight_grad must be a contiguous float64 tensor of shape {shape}")
        status = self._direct_grad(grad.data_ptr(), z.data_ptr(), grad.shape[0], rows, coefficients[0].data_ptr(),
                                   coefficients[1].data_ptr(), x.data_ptr(), x.shape[1], c_out, dilation,
                                   weight_grad.data_ptr())  # fmt: skip
        if status != 0:
            raise MemoryError("dfl_direct_conv_weight_grad: out of memory")

    @staticmethod
    def _check_norm(channels: int, alpha, beta, gamma, bias) -> None:
        """α (None: not needed), β and γ (None: 1) of a norm and its bias."""
        if alpha is not None:
            _check_channels("alpha", alpha, 1)
        _check_channels("beta", beta, 1)
        if gamma is not None:
            _check_channels("gamma", gamma, channels)
        _check_channels("bias", bias, channels)

    def norm_forward(self, moments, rows: int, alpha, beta, gamma, bias, eps: float, running_mean, running_var,
                     momentum: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A layer's norm ``α·z + β·(γ·(z − mean)/√(var + eps) + bias)`` as per-channel ``scale·z + offset``.

        This is :func:`dfl.kernels.norm_affine.affine` (with :func:`~dfl.kernels.norm_affine.norm_coefficients`'
        gain = β·γ and shift = β·bias) computed in C, in float64, with the moments' merge and the running update
        around it; ``tests/test_native.py`` checks the two against each other.

        ``mean``, ``var``: those of the batch items' ``moments`` (float64 ``[B, 2, C]`` as :meth:`winograd_conv`
        writes them, ``rows`` rows each, merged as :meth:`merge_moments` does), or with ``moments`` None the
        running statistics. With ``momentum``, the running statistics are updated as ``BatchNorm`` does in
        training. ``gamma`` None: γ = 1.
        Returns float32 ``[3, C]`` (scale, offset, mean) and float64 ``[2, C]`` (mean, var) for
        :meth:`norm_backward`."""
        channels = bias.numel()
        self._check_norm(channels, alpha, beta, gamma, bias)
        _check_channels("running_mean", running_mean, channels)
        _check_channels("running_var", running_var, channels)
        batch = 0
        if moments is not None:
            if moments.dtype != torch.float64 or not moments.is_contiguous() or moments.dim() != 3 or (
                moments.shape[1:] != (2, channels)
            ):
                raise ValueError(f"moments must be a contiguous float64 tensor [B, 2, {channels}]")
            batch = moments.shape[0]
            if momentum is not None and batch * rows <= 1:
                raise ValueError(f"updating running statistics needs more than 1 value per channel, got {batch * rows}")
        elif momentum is not None:
            raise ValueError("running statistics are updated from batch moments only")
        out = bias.new_empty(3, channels)
        stats = torch.empty(2, channels, dtype=torch.float64)
        self._norm(None if moments is None else moments.data_ptr(), batch, rows, channels, alpha.data_ptr(),
                   beta.data_ptr(), None if gamma is None else gamma.data_ptr(), bias.data_ptr(), float(eps),
                   -1.0 if momentum is None else float(momentum), running_mean.data_ptr(), running_var.data_ptr(),
                   out.data_ptr(), stats.data_ptr())  # fmt: skip
        return out, stats

    def merge_moments(self, parts: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel float64 mean and (biased) variance of the union of parts ``(rows, moments)``, ``moments``
        the ``(2, C)`` mean and sum of squared deviations of :meth:`winograd_conv` or :meth:`direct_conv`.

        Merged pairwise (Chan et al.) as :meth:`norm_forward` merges batch items: no cancellation however far
        the mean is from zero."""
        if not parts:
            raise ValueError("merge_moments needs at least one part")
        moments = torch.stack([m for _, m in parts])
        channels = moments.shape[-1]
        if moments.dtype != torch.float64 or moments.dim() != 3 or moments.shape[1] != 2:
            raise ValueError(f"moments must be float64 tensors of shape (2, C), got {tuple(moments.shape[1:])}")
        rows = torch.tensor([r for r, _ in parts], dtype=torch.int64)
        if (rows <= 0).any():
            raise ValueError(f"every part needs rows, got {rows.tolist()}")
        stats = torch.empty(2, channels, dtype=torch.float64)
        self._merge_moments(moments.data_ptr(), rows.data_ptr(), len(parts), channels, stats.data_ptr())
        return stats[0], stats[1]

    def norm_backward(self, stats, count: int, beta, gamma, bias, eps: float, batch_stats: bool, grad_scale,
                      grad_offset) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The backward of :meth:`norm_forward` for ``∂L/∂scale``, ``∂L/∂offset`` (None: zero) over ``count``
        rows: float64 ``[2 + 2C]`` (∂L/∂α, ∂L/∂β, ∂L/∂γ, ∂L/∂bias) and float32 ``[2, C]`` coefficients ``(b, e)``:
        the gradient reaching the conv output ``z`` through batch statistics is ``b·z + e`` (zero without)."""
        channels = bias.numel()
        self._check_norm(channels, None, beta, gamma, bias)
        if stats.dtype != torch.float64 or not stats.is_contiguous() or tuple(stats.shape) != (2, channels):
            raise ValueError(f"stats must be a contiguous float64 tensor of shape (2, {channels})")
        for name, t in (("grad_scale", grad_scale), ("grad_offset", grad_offset)):
            if t is not None:
                _check_channels(name, t, channels)
        grads = torch.empty(2 + 2 * channels, dtype=torch.float64)
        coefficients = bias.new_empty(2, channels)
        self._norm_backward(stats.data_ptr(), count, channels, beta.data_ptr(),
                            None if gamma is None else gamma.data_ptr(), bias.data_ptr(), float(eps), int(batch_stats),
                            None if grad_scale is None else grad_scale.data_ptr(),
                            None if grad_offset is None else grad_offset.data_ptr(), grads.data_ptr(),
                            coefficients.data_ptr())  # fmt: skip
        return grads, coefficients

    def norm_grads(self, sums, shift) -> tuple[torch.Tensor, torch.Tensor]:
        """``(∂L/∂scale, ∂L/∂offset)`` of a layer read through ``scale·z + offset``, from the float64 sums ``Σdy``
        and ``Σdy·(z − shift)`` its reader's backward adds (``below`` of :meth:`winograd_conv_backward`,
        ``sums`` of :meth:`output_conv_deferred_norm_backward`): ``Σdy·z = Σdy·(z − shift) + shift·Σdy``."""
        channels = shift.numel()
        _check_sums("sums", sums, channels)
        _check_channels("shift", shift, channels)
        out = shift.new_empty(2, channels)
        self._norm_grads(sums.data_ptr(), shift.data_ptr(), channels, out.data_ptr())
        return out[0], out[1]

    @staticmethod
    def _check_alike(*named: tuple[str, torch.Tensor]) -> int:
        shape = named[0][1].shape
        for name, t in named:
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != shape:
                raise ValueError(f"{name} must be a contiguous float32 CPU tensor of shape {tuple(shape)}, got "
                                 f"{t.dtype} {tuple(t.shape)}")  # fmt: skip
        return named[0][1].numel()

    def abs_diff_sum(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """``Σ|a − b|`` over two same-shaped tensors, summed in float64 blocks, without writing ``a − b``."""
        return self._abs_diff_sum(a.data_ptr(), b.data_ptr(), self._check_alike(("a", a), ("b", b)))

    def feature_grad(self, grad, a, b, weight: float, negative_slope: float, out=None) -> torch.Tensor:
        """``(grad + weight·sign(a − b))`` through a leaky ReLU whose output is ``a`` (``grad`` None: zero): the
        gradient at a frozen loss-network layer whose activations for the estimate (``a``) and the reference
        (``b``) are in the feature loss; written to ``out`` when given."""
        named = [("a", a), ("b", b)] + ([] if grad is None else [("grad", grad)]) + ([] if out is None else [("out", out)])
        n = self._check_alike(*named)
        out = torch.empty_like(a) if out is None else out
        self._feature_grad(None if grad is None else grad.data_ptr(), a.data_ptr(), b.data_ptr(), float(weight),
                           float(negative_slope), n, out.data_ptr())  # fmt: skip
        return out

    def strided_conv(self, x, taps, bias, stride: int, negative_slope: float, out) -> None:
        """``out[t] = leaky_relu(bias + Σ_k x[stride·t + k] @ taps[k])`` for ``t < len(out)``: a strided conv of a
        padded ``[rows, Cin]`` buffer (the padding in it), ``taps [K, Cin, Cout]`` with ``Cout`` a multiple of 16."""
        _check_rows("out", out, 0, out.shape[0] if out.dim() == 2 else 0)
        if taps.dtype != torch.float32 or taps.dim() != 3 or not taps.is_contiguous() or taps.shape[2] % 16:
            raise ValueError(f"taps must be a contiguous float32 [K, Cin, Cout] tensor, Cout a multiple of 16, "
                             f"got {taps.dtype} {tuple(taps.shape)}")  # fmt: skip
        k, c_in, c_out = taps.shape
        n_out = out.shape[0]
        _check_rows("x", x, 0, stride * (n_out - 1) + k if n_out else 0)
        if x.shape[1] != c_in or out.shape[1] != c_out or stride < 1:
            raise ValueError(f"x {tuple(x.shape)}, taps {tuple(taps.shape)}, out {tuple(out.shape)} and stride {stride} "
                             "do not fit")  # fmt: skip
        _check_channels("bias", bias, c_out)
        if n_out and self._strided_conv(x.data_ptr(), n_out, c_in, c_out, stride, k, taps.data_ptr(), bias.data_ptr(),
                                        float(negative_slope), out.data_ptr()):  # fmt: skip
            raise MemoryError("dfl_strided_conv: out of memory")


def channel_mean_var(kernels: CpuKernels, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of ``z [batch, rows, C]`` in float64."""
    shift = z[0, 0].contiguous()  # any value near the mean will do: one of the samples
    sums = torch.zeros(2, z.shape[-1], dtype=torch.float64)
    for zb in z:
        kernels.channel_moments(zb, sums, shift)
    count = z.shape[0] * z.shape[1]
    mean_shifted = sums[0] / count
    return shift.double() + mean_shifted, (sums[1] / count - mean_shifted.square()).clamp_min(0)


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or ``None`` (logged once) when they are disabled or cannot be built."""
    if os.environ.get("DFL_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        return CpuKernels(build())
    except (RuntimeError, OSError, AttributeError) as exc:  # AttributeError: a kernel missing from the library
        log.warning("dfl: fast CPU kernels unavailable, using the PyTorch path (slower): %s", exc)
        return None
