"""The fast inference path and the `Denoiser` Python API (chunking, resampling, types)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from dfl import Denoiser
from dfl.audio import StreamResampler, resample
from dfl.checkpoints import model_record
from dfl.inference import ChunkStream
from dfl.kernels.folded_inference import FoldedInferenceNet
from dfl.models import ContextAggregationNet
from tests.helpers.small_denoisers import BATCH_STATS, saved_denoiser, small_denoiser

VARIANTS = {
    "adaptive": {},
    "plain_batchnorm": dict(normalization="batch"),
    "no_norm": dict(normalization="none"),
    "tf_padding_running_stats": dict(padding="tf_authors", dilations=[1, 2, 4, 8, 1]),
    "batch_stats": BATCH_STATS,
}


def plain(model: ContextAggregationNet, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("winograd", [True, False], ids=["winograd", "direct"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("length", [997, 40])
def test_fast_paths_match_plain_model(variant, length, winograd):
    model = small_denoiser(**VARIANTS[variant])
    fast = FoldedInferenceNet(model, tile=128, winograd=winograd)  # several direct-GEMM tiles per layer
    batch = 1 if model.config["batch_stats_at_eval"] else 3
    x = 0.3 * torch.randn(batch, length)
    expected = plain(model, x)
    assert fast.batch_stats == model.config["batch_stats_at_eval"]
    torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.forward_cpu(x), expected, atol=1e-5, rtol=0)


def test_batch_statistics_span_the_whole_batch_like_the_plain_model():
    model = small_denoiser(**BATCH_STATS)
    x = torch.cat([0.1 * torch.randn(1, 800), 0.5 * torch.randn(1, 800)])
    torch.testing.assert_close(FoldedInferenceNet(model).forward_cpu(x), plain(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_stats", [False, True], ids=["can_paper", "can_authors"])
def test_fast_path_matches_the_real_configs(batch_stats):
    from dfl.cli.bench import MODELS

    config = {"channels": 64, "dilations": ContextAggregationNet().dilations}  # can_paper: the defaults
    model = small_denoiser(**{**config, **MODELS["can_authors" if batch_stats else "can_paper"]})
    assert len(model.convs) == (14 if batch_stats else 15)
    x = 0.2 * torch.randn(1, 6000)
    expected = plain(model, x)
    for winograd in (True, False):
        fast = FoldedInferenceNet(model, winograd=winograd)
        torch.testing.assert_close(fast.forward_cpu(x), expected, atol=1e-4, rtol=0)


def test_fast_path_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match="kernel_size"):
        FoldedInferenceNet(ContextAggregationNet(dilations=[1, 2], channels=4, kernel_size=5))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_chunked_matches_whole_file(fast, batch_size):
    # receptive field (1025) far wider than the chunks: the context, not luck, makes them agree
    model = small_denoiser(dilations=[1, 2, 4, 8, 16, 32, 64, 128, 256, 1])
    x = (0.3 * np.random.default_rng(0).standard_normal(16_000 + 123)).astype(np.float32)
    chunked = Denoiser.from_model(model, fast=fast, chunk_seconds=0.08, batch_size=batch_size)
    assert len(chunked.chunks(len(x))) >= 8
    whole = plain(model, torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(chunked(x, 16_000), whole, atol=1e-4, rtol=0)


def test_chunks_cover_the_signal_with_enough_context():
    model = small_denoiser()
    den = Denoiser.from_model(model, chunk_seconds=0.2)
    spans = den.chunks(20_000)
    assert spans[0][2] == 0 and spans[-1][3] == 20_000
    context = model.receptive_field // 2
    for (a, b, s, e), nxt in zip(spans, spans[1:] + [None]):
        assert a == max(s - context, 0) and b == min(e + context, 20_000)
        if nxt is not None:
            assert nxt[2] < e  # outputs overlap (cross-fade), no gap


def test_batch_statistics_models_are_processed_whole():
    model = small_denoiser(**BATCH_STATS)
    den = Denoiser.from_model(model, chunk_seconds=0.1)
    assert den.batch_stats and den.chunk_seconds is None
    x = (0.3 * np.random.default_rng(1).standard_normal(8000)).astype(np.float32)
    assert den.chunks(len(x)) == [(0, 8000, 0, 8000)]
    np.testing.assert_allclose(den(x, 16_000), plain(model, torch.from_numpy(x)[None])[0].numpy(), atol=1e-4)


def test_api_types_shapes_and_channels(tmp_path):
    den = Denoiser.from_checkpoint(saved_denoiser(tmp_path / "model.pt"))
    rng = np.random.default_rng(2)
    stereo = (0.3 * rng.standard_normal((2, 4000))).astype(np.float32)
    out = den(stereo, 16_000)
    assert isinstance(out, np.ndarray) and out.shape == (2, 4000) and out.dtype == np.float32
    # channel by channel: each channel as if it were alone
    np.testing.assert_allclose(out[1], den(stereo[1], 16_000), atol=1e-6)
    assert not np.allclose(out, stereo, atol=1e-3)  # it actually changed the signal
    tensor_out = den(torch.from_numpy(stereo[0]), 16_000)
    assert isinstance(tensor_out, torch.Tensor) and tensor_out.shape == (4000,)
    np.testing.assert_allclose(tensor_out.numpy(), out[0], atol=1e-6)


@pytest.mark.parametrize("rate", [8_000, 44_100])
def test_other_sample_rates_are_processed_at_16k_and_resampled_back(tmp_path, rate):
    model = small_denoiser()
    den = Denoiser.from_model(model)
    x = (0.3 * np.random.default_rng(3).standard_normal(rate // 2 + 7)).astype(np.float32)
    out = den(x, rate)
    assert out.shape == x.shape
    expected = resample(plain(model, torch.from_numpy(resample(x, rate, 16_000))[None])[0].numpy(), 16_000, rate)
    n = min(len(expected), len(x))
    np.testing.assert_allclose(out[:n], expected[:n], atol=1e-4)


def test_loads_lightning_style_checkpoints(tmp_path):
    model = small_denoiser(seed=4)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "dfl_models": {"denoiser": model_record("denoiser", model)}}, path)
    x = (0.3 * np.random.default_rng(5).standard_normal(3000)).astype(np.float32)
    out = Denoiser.from_checkpoint(path)(x, 16_000)
    np.testing.assert_allclose(out, plain(model, torch.from_numpy(x)[None])[0].numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "bad, message",
    [(np.zeros(0, np.float32), "empty"), (np.array([0.1, np.nan], np.float32), "NaN"), (np.zeros((1, 2, 3)), "shape")],
)
def test_bad_waveforms_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Denoiser.from_model(small_denoiser())(bad, 16_000)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        Denoiser.from_model(small_denoiser(), batch_size=0)
    with pytest.raises(ValueError, match="backend"):
        Denoiser.from_checkpoint(saved_denoiser(tmp_path / "m.pt"), backend="tensorflow")
    with pytest.raises(ValueError, match="sample_rate"):
        Denoiser.from_model(small_denoiser())(np.zeros(10, np.float32), 0)


@pytest.mark.parametrize("rates", [(44_100, 16_000), (16_000, 44_100), (8_000, 16_000), (22_050, 16_000)])
@pytest.mark.parametrize("block", [1, 37, 5000])
def test_stream_resampler_equals_resampling_whole(rates, block):
    x = (0.3 * np.random.default_rng(6).standard_normal(3001)).astype(np.float32)
    if block == 1:
        x = x[:150]  # sample by sample: short
    stream = StreamResampler(*rates)
    pieces = [stream.push(x[i : i + block]) for i in range(0, len(x), block)] + [stream.finish()]
    whole = resample(x, *rates)
    assert sum(map(len, pieces)) == len(whole) == stream.output_length(len(x))
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate", [16_000, 44_100])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_channel_equals_denoise_channel(rate, batch_size):
    model = small_denoiser(dilations=[1, 2, 4, 8, 16, 32, 64, 128, 256, 1])
    den = Denoiser.from_model(model, chunk_seconds=0.05, batch_size=batch_size)
    x = (0.3 * np.random.default_rng(7).standard_normal(rate + 321)).astype(np.float32)
    stream = den.stream_channel(len(x), rate)
    pieces = [stream.push(x[i : i + 2500]) for i in range(0, len(x), 2500)]
    assert sum(len(p) > 0 for p in pieces) >= 2  # output comes out while input is still arriving
    out = np.concatenate([*pieces, stream.finish()])
    assert out.shape == x.shape
    np.testing.assert_allclose(out, den.denoise_channel(x, rate), atol=1e-5, rtol=0)
    whole = Denoiser.from_model(model, chunk_seconds=0)(x, rate)
    np.testing.assert_allclose(out, whole, atol=1e-4, rtol=0)


def test_chunk_stream_refuses_a_wrong_length():
    den = Denoiser.from_model(small_denoiser(), chunk_seconds=0.2)
    stream = ChunkStream(den, 5000)
    stream.push(np.zeros(3000, np.float32))
    with pytest.raises(ValueError, match="expected 5000 samples, got 3000"):
        stream.finish()
    with pytest.raises(ValueError, match="announced 5000"):
        stream.push(np.zeros(2001, np.float32))


@pytest.mark.parametrize(
    "dtype, to_int",
    [
        (np.int16, lambda x: np.round(x * 32768).astype(np.int16)),
        (np.int32, lambda x: np.round(x * 2.0**31).astype(np.int32)),
        (np.uint8, lambda x: np.round(x * 128 + 128).astype(np.uint8)),
    ],
)
def test_integer_pcm_is_scaled_like_soundfile(tmp_path, dtype, to_int):
    den = Denoiser.from_model(small_denoiser())
    x = np.clip(0.3 * np.random.default_rng(7).standard_normal((2, 3000)), -0.99, 0.99)
    pcm = to_int(x)
    # what soundfile would give for the same samples: written as PCM and read back as float32
    subtype = {np.int16: "PCM_16", np.int32: "PCM_32", np.uint8: "PCM_U8"}[dtype]
    # (soundfile writes no uint8 arrays: 8-bit files are written from the exact float values of the codes)
    sf.write(tmp_path / "x.wav", pcm.T if dtype != np.uint8 else (pcm.T - 128.0) / 128, 16_000, subtype=subtype)
    if dtype == np.uint8:
        assert (tmp_path / "x.wav").read_bytes()[-pcm.size:] == pcm.T.tobytes()  # the file holds these codes
    as_read, _ = sf.read(tmp_path / "x.wav", dtype="float32", always_2d=True)
    got = den(pcm, 16_000)
    assert got.dtype == np.float32 and got.shape == pcm.shape
    np.testing.assert_allclose(got, den(as_read.T.copy(), 16_000), atol=1e-6)
    assert np.abs(got).max() < 2  # on the float scale, not 32768x off
    np.testing.assert_allclose(den(torch.from_numpy(pcm[0].copy()), 16_000).numpy(), got[0], atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(100, np.complex64), "complex64, which is not audio"),
        (np.ones(100, bool), "bool, which is not audio"),
        (np.array([0.1] * 100, dtype=object), "object, which is not audio"),
        (np.zeros(100, np.int64), "int64, which has no PCM convention"),
        (torch.ones(100, dtype=torch.bool), "bool"),
        (np.zeros((48_000, 2), np.float32), r"expected \[channels, time\], got \[time, channels\]\?"),
        (torch.zeros(16_000, 1), r"got \[time, channels\]\?"),
    ],
)
def test_non_audio_dtypes_and_time_major_arrays_are_refused(bad, message):
    den = Denoiser.from_model(small_denoiser())
    den.run_batch = lambda x: pytest.fail("the model ran")
    with pytest.raises(ValueError, match=message):
        den(bad, 16_000)


def test_few_long_channels_are_still_channels():
    den = Denoiser.from_model(small_denoiser())
    x = (0.3 * np.random.default_rng(8).standard_normal((8, 2000))).astype(np.float32)
    assert den(x, 16_000).shape == (8, 2000)
