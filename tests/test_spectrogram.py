"""Spectrograms of dfl-eval, report.html and W&B: one colour scale fixed relative to the clean reference."""

from __future__ import annotations

import numpy as np
import pytest

from callbacks.wandb_media import spectrogram_image
from dfl.spectrogram import HEADROOM_DB, RANGE_DB, shared_scale, spectrogram_figure, stft_db
from tests.helpers.metric_signals import speech_like

SR = 16_000


@pytest.fixture(scope="module")
def clean():
    return speech_like(1.0, seed=3)


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_images() and ax.get_ylabel().endswith("frequency (kHz)")]


def test_scale_follows_the_clean_peak_not_the_loudest_panel(clean):
    specs = {"noisy": stft_db(clean * 4.0), "enhanced": stft_db(clean * 0.01), "clean": stft_db(clean)}
    vmin, vmax = shared_scale(specs)
    assert vmax == pytest.approx(specs["clean"].max() + HEADROOM_DB)
    assert vmax - vmin == pytest.approx(RANGE_DB)
    quieter = {**specs, "enhanced": stft_db(clean * 1e-6)}
    assert shared_scale(quieter) == (vmin, vmax)  # the enhanced level does not move the scale
    # no clean reference (or a silent one): the loudest panel sets it
    assert shared_scale({"a": specs["noisy"], "clean": stft_db(np.zeros(4000))})[1] == pytest.approx(
        specs["noisy"].max() + HEADROOM_DB)


def test_figure_shares_one_colour_scale_with_a_colour_bar_and_axes_labels(clean):
    import matplotlib.pyplot as plt

    fig = spectrogram_figure({"noisy": clean + 0.05, "enhanced": clean * 0.1, "clean": clean}, SR, "u0")
    panels = _panels(fig)
    assert len(panels) == 3
    assert {p.get_images()[0].get_clim() for p in panels} == {(-RANGE_DB + HEADROOM_DB, HEADROOM_DB)}
    assert panels[-1].get_xlabel() == "time (s)"
    assert panels[0].get_images()[0].get_extent()[1:] == pytest.approx((1.0, 0.0, 8.0))  # seconds, kHz
    colour_bars = [ax for ax in fig.axes if ax.get_ylabel() == "dB re clean peak"]
    assert len(colour_bars) == 1
    # same signal, 20 dB quieter: 20 dB lower in the plotted data, on the same scale
    data = [p.get_images()[0].get_array() for p in panels]
    assert float(data[2].max() - data[1].max()) == pytest.approx(20.0, abs=0.01)
    assert not any(t.get_text().startswith("silent") for p in panels for t in p.texts)
    plt.close(fig)


def test_silent_output_is_labelled_not_just_black(clean):
    import matplotlib.pyplot as plt

    fig = spectrogram_figure({"noisy": clean, "enhanced": np.zeros_like(clean), "clean": clean}, SR, "u0")
    texts = [[t.get_text() for t in p.texts] for p in _panels(fig)]
    assert texts[0] == [] and texts[2] == []
    assert texts[1] == [f"silent: every bin below {-RANGE_DB + HEADROOM_DB:.0f} dB re clean peak"]
    plt.close(fig)


def test_wandb_panel_of_an_untrained_silent_output_is_labelled(clean):
    image = spectrogram_image({"noisy": clean, "enhanced": np.zeros_like(clean), "clean": clean}, SR, "epoch 0")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    h, w, _ = image.shape
    # the middle panel's centre: the floor colour (near black) *and* the white "silent" label on it
    centre = image[int(h * 0.45): int(h * 0.55), int(w * 0.3): int(w * 0.6)].astype(int)
    assert (centre.sum(axis=2) < 60).mean() > 0.3
    assert (centre.min(axis=2) > 200).mean() > 0.01
    # with an audible output the same spot shows its spectrogram, no label
    loud = spectrogram_image({"noisy": clean, "enhanced": clean, "clean": clean}, SR, "epoch 0")
    assert (loud[int(h * 0.45): int(h * 0.55), int(w * 0.3): int(w * 0.6)].min(axis=2) > 200).mean() < 0.01
