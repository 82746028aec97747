"""Noisy / enhanced / clean spectrograms on one colour scale fixed relative to the clean reference.

Every panel shares the scale [peak of the reference + ``headroom_db`` − ``range_db``, peak + ``headroom_db``]
(dB relative to the reference's loudest STFT bin) and one colour bar, so panels compare by colour and a
silent or near-silent output (an untrained model) is drawn at the floor colour *and labelled as such*
instead of as an unexplained black panel. Used by ``dfl-eval`` (plots/, report.html) and the W&B
media callback.
"""

from __future__ import annotations

import numpy as np

N_FFT = 512
HOP = 128
RANGE_DB = 80.0
HEADROOM_DB = 10.0
_EPS = 1e-10


def stft_db(wave: np.ndarray, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """Log-magnitude STFT (Hann window) in dB, ``[freq, frames]``; zero input gives -200 dB (only differences matter: plots are relative to a reference)."""
    from scipy.signal import stft

    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    _, _, z = stft(x, nperseg=n_fft, noverlap=n_fft - hop, boundary=None, padded=True)
    return 20 * np.log10(np.abs(z) + _EPS)


def shared_scale(specs: dict[str, np.ndarray], reference: str = "clean", range_db: float = RANGE_DB,
                 headroom_db: float = HEADROOM_DB) -> tuple[float, float]:
    """``(vmin, vmax)`` in absolute dB: the reference's peak + headroom, down ``range_db``.

    Without the reference (or when it is silent too) the loudest panel sets the peak.
    """
    ref = specs.get(reference)
    peak = float(ref.max()) if ref is not None else -np.inf
    if peak <= 20 * np.log10(_EPS) + 1:  # reference missing or all zeros
        peak = max(float(s.max()) for s in specs.values())
    vmax = peak + headroom_db
    return vmax - range_db, vmax


def spectrogram_figure(signals: dict[str, np.ndarray], sample_rate: int, title: str, reference: str = "clean",
                       range_db: float = RANGE_DB, headroom_db: float = HEADROOM_DB, width: float = 9.0,
                       panel_height: float = 2.0):
    """A matplotlib figure: one panel per signal (time in s, frequency in kHz), one colour bar in dB
    relative to the reference's peak; a panel whose every bin is below the floor says "silent".

    Args:
        signals: name -> mono waveform, drawn top to bottom in this order.
        sample_rate: Hz, for the axes.
        title: figure title.
        reference: the signal whose peak fixes the scale (falls back to the loudest one when absent).
        range_db: dynamic range shown; quieter bins get the floor colour.
        headroom_db: how far above the reference's peak the scale goes (noisy input is often louder).
        width: figure width in inches.
        panel_height: height per panel in inches.

    Returns:
        The figure (the caller saves and closes it).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    specs = {name: stft_db(x) for name, x in signals.items()}
    vmin, vmax = shared_scale(specs, reference, range_db, headroom_db)
    ref_peak = vmax - headroom_db
    height = panel_height * len(specs) + 0.8
    # a fixed layout (not constrained_layout: several times slower, and dfl-eval draws one figure per file)
    fig, axes = plt.subplots(len(specs), 1, figsize=(width, height), sharex=True, squeeze=False,
                             gridspec_kw=dict(left=0.9 / width, right=1 - 1.1 / width, top=1 - 0.35 / height,
                                              bottom=0.45 / height, hspace=0.12))
    mesh = None
    for ax, (name, db) in zip(axes[:, 0], specs.items(), strict=True):
        seconds = len(np.asarray(signals[name]).reshape(-1)) / sample_rate
        mesh = ax.imshow(db - ref_peak, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                         vmin=vmin - ref_peak, vmax=vmax - ref_peak,
                         extent=(0.0, seconds, 0.0, sample_rate / 2000))
        ax.set_ylabel(f"{name}\nfrequency (kHz)")
        if float(db.max()) < vmin:
            ax.text(0.5, 0.5, f"silent: every bin below {vmin - ref_peak:.0f} dB re {reference} peak",
                    transform=ax.transAxes, ha="center", va="center", color="white", fontsize=10,
                    bbox=dict(facecolor="black", edgecolor="white", alpha=0.8))
    axes[-1, 0].set_xlabel("time (s)")
    axes[0, 0].set_title(title)
    label = f"dB re {reference} peak" if reference in specs else "dB re loudest peak"
    right = 1 - 1.1 / width
    bar = fig.add_axes((right + 0.12 / width, 0.45 / height, 0.18 / width, 1 - 0.8 / height))
    fig.colorbar(mesh, cax=bar, label=label)
    return fig
