"""`Denoiser`: the Python API of dfl-denoise — a trained denoiser applied to waveforms of any length.

Audio is processed at 16 kHz (resampled there and back), channel by channel.
Long signals are cut into chunks whose context on each side covers the
network's receptive field, so every output sample sees exactly the inputs it
would see in whole-file processing; neighbouring chunks are cross-faded over
a short overlap. Models that normalise with the batch's own statistics (the
authors' release) depend on the whole signal and are always processed whole.
The same chunk plan also runs on signals fed in blocks (:class:`ChunkStream`,
:meth:`Denoiser.stream_channel`, resampling with :class:`dfl.audio.StreamResampler`),
which is how dfl-denoise keeps memory independent of a file's length.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from dfl import SAMPLE_RATE
from dfl.audio import StreamResampler, resample

CROSSFADE = 1024  # samples at 16 kHz; both chunks are exact there, the fade only hides float noise


# integer PCM → float, as soundfile reads it: (offset, full scale)
PCM_SCALES = {np.dtype(np.int16): (0, 32768.0), np.dtype(np.int32): (0, 2.0**31), np.dtype(np.uint8): (128, 128.0)}


def as_float_audio(data: np.ndarray) -> np.ndarray:
    """Samples as floats at full scale 1.0: floats kept, int16/int32/uint8 PCM scaled like soundfile.

    Raises:
        ValueError: a dtype that is not audio (bool, complex, object, ...) or an integer type without a
            PCM convention; the message says how to convert.
    """
    if data.dtype.kind == "f":
        return data
    if data.dtype in PCM_SCALES:
        offset, scale = PCM_SCALES[data.dtype]
        return ((data.astype(np.float64) - offset) / scale).astype(np.float32)
    if data.dtype.kind in "iu":
        raise ValueError(
            f"waveform has dtype {data.dtype}, which has no PCM convention here; give float samples "
            "in [-1, 1] (or int16, int32 or uint8 PCM, which are scaled like soundfile reads them)"
        )
    raise ValueError(
        f"waveform has dtype {data.dtype}, which is not audio; give float samples in [-1, 1] "
        "(or int16, int32 or uint8 PCM)"
    )


class Denoiser:
    """Apply a denoiser to ``[time]`` or ``[channels, time]`` audio (numpy or torch).

    Args:
        run_batch: ``[batch, time]`` float32 tensor at 16 kHz → denoised tensor of the same shape.
        receptive_field: input samples that influence one output sample.
        batch_stats: the model normalises with batch statistics (process whole signals, one channel at a time).
        chunk_seconds: length of the part of each chunk that is kept (``None`` or ≤ 0: whole signal).
        batch_size: chunks of equal length run together.
    """

    def __init__(
        self,
        run_batch: Callable[[torch.Tensor], torch.Tensor],
        receptive_field: int,
        *,
        batch_stats: bool = False,
        chunk_seconds: float | None = 20.0,
        batch_size: int = 1,
        device: str | torch.device = "cpu",
        description: str = "",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if chunk_seconds is not None and not np.isfinite(chunk_seconds):
            raise ValueError(f"chunk_seconds must be a finite number, got {chunk_seconds}")
        self.run_batch = run_batch
        self.receptive_field = int(receptive_field)
        self.batch_stats = batch_stats
        self.chunk_seconds = None if batch_stats or not chunk_seconds or chunk_seconds <= 0 else chunk_seconds
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.description = description

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls, model: torch.nn.Module, device: str | torch.device = "cpu", *, fast: bool = True, **kwargs
    ) -> Denoiser:
        """Wrap a denoiser (eval semantics), by default through :func:`dfl.kernels.accelerate` (``fast=False``: as is).

        Args:
            model: a ``ContextAggregationNet`` (or a subclass: any module with its ``config`` and
                ``receptive_field``); the kernels run it where they compute its architecture.
            device: where it runs.
            fast: go through the kernels' inference module where it applies.
            **kwargs: :class:`Denoiser` settings (``chunk_seconds``, ``batch_size``, ``description``).

        Returns:
            The :class:`Denoiser`.
        """
        from dfl.kernels import accelerate

        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but CUDA is not available on this machine")
        model = model.eval()
        batch_stats = bool(model.config.get("batch_stats_at_eval", False))
        net = (accelerate(model, "inference") if fast else model).to(device)
        run = getattr(net, "run", None)
        if run is None:

            def run(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return net(x)

        return cls(run, model.receptive_field, batch_stats=batch_stats, device=device, **kwargs)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", *, backend: str = "torch", **kwargs
    ) -> Denoiser:
        """Load a dfl model file or a dfl Lightning checkpoint (``backend='onnxruntime'`` also takes ``.onnx``)."""
        from dfl.checkpoints import load_model

        if backend == "onnxruntime":
            if Path(path).suffix.lower() == ".onnx":
                return cls.from_onnx(path, device=device, **kwargs)
            from dfl.export import export_onnx_for_session

            return cls.from_onnx(export_onnx_for_session(load_model(path, "denoiser")), device=device, **kwargs)
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
        if Path(path).suffix.lower() == ".onnx":
            raise ValueError(
                f"{path}: an ONNX model runs with ONNX Runtime, not torch: add --backend onnxruntime "
                "(Python: Denoiser.from_checkpoint(path, backend='onnxruntime'))"
            )
        return cls.from_model(load_model(path, "denoiser"), device, **kwargs)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs) -> Denoiser:
        """Run a model exported by ``dfl-export --format onnx`` with ONNX Runtime."""
        from dfl.export import load_onnx_session

        session, meta = load_onnx_session(path, device)

        def run(x: torch.Tensor) -> torch.Tensor:
            out = session.run(None, {"waveform": x.detach().cpu().numpy().astype(np.float32)})[0]
            return torch.from_numpy(out)

        return cls(
            run,
            meta["receptive_field"],
            batch_stats=meta["batch_stats"],
            device="cpu",
            description=f"onnxruntime ({path})",
            **kwargs,
        )

    # ------------------------------------------------------------------ processing
    def __call__(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray | torch.Tensor:
        """Denoise ``[time]`` or ``[channels, time]`` audio at ``sample_rate``.

        Float samples are taken as they are (full scale = 1.0); integer PCM is
        scaled the way soundfile reads it (int16 / 32768, int32 / 2**31, uint8
        as (x - 128) / 128). Other dtypes (bool, complex, object, other
        integers) and a 2-D array that looks like ``[time, channels]`` are
        refused with ValueError.

        Returns:
            float32 audio of the same shape, as a numpy array or a tensor on the input's device.
        """
        is_tensor = isinstance(waveform, torch.Tensor)
        data = waveform.detach().cpu().numpy() if is_tensor else np.asarray(waveform)
        if data.ndim not in (1, 2):
            raise ValueError(f"expected a [time] or [channels, time] waveform, got shape {data.shape}")
        data = as_float_audio(data)
        if data.ndim == 2 and data.shape[0] > 16 * data.shape[1] and data.shape[0] > 64:
            raise ValueError(
                f"expected [channels, time], got [time, channels]? shape {data.shape} would be "
                f"{data.shape[0]} channels of {data.shape[1]} samples; pass waveform.T "
                "(soundfile.read returns [time, channels])"
            )
        if data.shape[-1] == 0:
            raise ValueError("cannot denoise an empty waveform (0 samples)")
        if not np.isfinite(data).all():
            raise ValueError("waveform contains NaN or Inf samples")
        if int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        channels = np.ascontiguousarray(data.reshape(-1, data.shape[-1]), dtype=np.float32)
        out = np.stack([self.denoise_channel(c, int(sample_rate)) for c in channels])
        out = out.reshape(data.shape)
        if is_tensor:
            return torch.from_numpy(out).to(waveform.device)
        return out

    def denoise_channel(self, wav: np.ndarray, sample_rate: int, progress: Callable[[int], None] | None = None):
        """One channel ``[time]`` at any rate → denoised ``[time]`` at the same rate (float32)."""
        x = np.ascontiguousarray(resample(wav, sample_rate, SAMPLE_RATE), dtype=np.float32)
        y = self.denoise_16k(x, progress)
        if sample_rate != SAMPLE_RATE:
            y = resample(y, SAMPLE_RATE, sample_rate)
            y = y[: len(wav)] if len(y) >= len(wav) else np.pad(y, (0, len(wav) - len(y)))
        return np.ascontiguousarray(y, dtype=np.float32)

    def chunks(self, length: int) -> list[tuple[int, int, int, int]]:
        """``(in_start, in_end, out_start, out_end)`` per chunk: outputs overlap by the cross-fade."""
        if self.chunk_seconds is None:
            return [(0, length, 0, length)]
        hop = max(int(self.chunk_seconds * SAMPLE_RATE), 2 * CROSSFADE)
        if length <= hop + CROSSFADE:
            return [(0, length, 0, length)]
        context = self.receptive_field // 2
        spans = []
        for start in range(0, length, hop):
            out_start = max(start - CROSSFADE // 2, 0)
            out_end = min(start + hop + CROSSFADE // 2, length)
            spans.append((max(out_start - context, 0), min(out_end + context, length), out_start, out_end))
            if out_end == length:
                break
        return spans

    def denoise_16k(self, x: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """One 16 kHz channel → denoised, chunked (batching equal-length chunks) and cross-faded."""
        stream = ChunkStream(self, len(x), progress)
        out = stream.push(x)  # all chunks' inputs are there: everything comes back at once
        stream.finish()
        return out

    def stream_channel(
        self, length: int, sample_rate: int, progress: Callable[[int], None] | None = None
    ) -> ChannelStream:
        """Denoise one channel of ``length`` samples at ``sample_rate`` fed in blocks (bounded memory)."""
        return ChannelStream(self, length, sample_rate, progress)

    def _batches(self, spans) -> Iterator[list[tuple[int, int, int, int]]]:
        by_length: dict[int, list] = {}
        for span in spans:
            by_length.setdefault(span[1] - span[0], []).append(span)
        for group in by_length.values():
            for i in range(0, len(group), self.batch_size):
                yield group[i : i + self.batch_size]

    @staticmethod
    def _fade(start: int, end: int, length: int) -> np.ndarray:
        """Linear ramps over the cross-fade at inner boundaries; neighbouring ramps sum to one."""
        w = np.ones(end - start, dtype=np.float32)
        ramp = (np.arange(CROSSFADE, dtype=np.float32) + 0.5) / CROSSFADE
        if start > 0:
            w[:CROSSFADE] = ramp
        if end < length:
            w[-CROSSFADE:] = ramp[::-1]
        return w


class ChunkStream:
    """One 16 kHz channel of known length, fed in blocks, denoised with the plan of :meth:`Denoiser.chunks`.

    A chunk runs once its input (with context) has arrived and ``batch_size`` chunks are waiting (or
    all remaining ones are); output is returned once no later chunk can add to it (cross-fade).
    """

    def __init__(self, denoiser: Denoiser, length: int, progress: Callable[[int], None] | None = None) -> None:
        self.denoiser, self.length, self.progress = denoiser, length, progress
        self.spans = denoiser.chunks(length)
        self._next = 0  # first span not yet run
        self._inp, self._inp_start, self._received = np.zeros(0, np.float32), 0, 0
        self._acc, self._acc_start = np.zeros(0, np.float32), 0  # summed cross-faded outputs, not yet final

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed the next input samples; returns the denoised samples that are now final."""
        x = np.asarray(x, dtype=np.float32)
        if self._received + len(x) > self.length:
            raise ValueError(f"more than the announced {self.length} samples were fed")
        self._inp = np.concatenate([self._inp, x]) if len(self._inp) else x
        self._received += len(x)
        return self._run()

    def finish(self) -> np.ndarray:
        """Check that all the input came; returns what is left (nothing when ``push`` was fed everything)."""
        if self._received != self.length:
            raise ValueError(f"expected {self.length} samples, got {self._received}")
        return self._run()

    def _run(self) -> np.ndarray:
        ready = self._next
        while ready < len(self.spans) and self.spans[ready][1] <= self._received:
            ready += 1
        if ready == self._next or (ready < len(self.spans) and ready - self._next < self.denoiser.batch_size):
            return np.zeros(0, np.float32)
        spans = self.spans[self._next : ready]
        grow = spans[-1][3] - self._acc_start - len(self._acc)
        if grow > 0:
            self._acc = np.concatenate([self._acc, np.zeros(grow, np.float32)])
        den = self.denoiser
        for batch in den._batches(spans):
            chunks = [self._inp[a - self._inp_start : b - self._inp_start] for a, b, _, _ in batch]
            result = den.run_batch(torch.from_numpy(np.stack(chunks)).to(den.device)).float().cpu().numpy()
            if not np.isfinite(result).all():
                raise FloatingPointError("the denoiser produced NaN or Inf samples")
            for (a, _, s, e), y in zip(batch, result):
                self._acc[s - self._acc_start : e - self._acc_start] += y[s - a : e - a] * den._fade(s, e, self.length)
                if self.progress is not None:
                    self.progress(e - s)
        self._next = ready
        if ready == len(self.spans):
            final, keep_input_from = self.length, self._received
        else:
            final, keep_input_from = self.spans[ready][2], self.spans[ready][0]
        out = self._acc[: final - self._acc_start]
        self._acc, self._acc_start = self._acc[final - self._acc_start :].copy(), final
        self._inp, self._inp_start = self._inp[keep_input_from - self._inp_start :].copy(), keep_input_from
        return out


class ChannelStream:
    """One channel at any rate, fed in blocks: to 16 kHz, :class:`ChunkStream`, back, trimmed to the input length.

    The outputs, concatenated, equal :meth:`Denoiser.denoise_channel` on the whole channel.
    """

    def __init__(
        self, denoiser: Denoiser, length: int, sample_rate: int, progress: Callable[[int], None] | None = None
    ) -> None:
        self.length, self._returned = length, 0
        self._to_16k = StreamResampler(sample_rate, SAMPLE_RATE)
        self._chunks = ChunkStream(denoiser, self._to_16k.output_length(length), progress)
        self._back = StreamResampler(SAMPLE_RATE, sample_rate)

    def push(self, x: np.ndarray) -> np.ndarray:
        return self._trim(self._back.push(self._chunks.push(self._to_16k.push(x))))

    def finish(self) -> np.ndarray:
        tail = [
            self._back.push(self._chunks.push(self._to_16k.finish())),
            self._back.push(self._chunks.finish()),
            self._back.finish(),
        ]
        out = self._trim(np.concatenate(tail))
        missing = self.length - self._returned  # resampling back can come out a sample short
        if missing > 0:
            out = np.concatenate([out, np.zeros(missing, np.float32)])
            self._returned += missing
        return out

    def _trim(self, y: np.ndarray) -> np.ndarray:
        y = y[: max(self.length - self._returned, 0)]
        self._returned += len(y)
        return y
