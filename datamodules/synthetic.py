"""The embedded default dataset: synthetic speech in synthetic noise, read as paired folders."""

from __future__ import annotations

from pathlib import Path

from datamodules.paired_folder import PairedFolderDataModule


class SyntheticSpeechDataModule(PairedFolderDataModule):
    """Generates (once per settings, deterministically from ``generator_seed``) a paired corpus under
    ``root`` with :func:`datamodules.synthetic_speech.generate_paired_corpus`, then behaves exactly like
    :class:`PairedFolderDataModule` on it — so the demo exercises the real file path.

    Args:
        root: where the corpus is written (and read from).
        generator_seed: the corpus (same seed and settings: same files, not regenerated).
        n_train: training pairs.
        n_val: validation pairs.
        n_test: test pairs.
        min_seconds: shortest utterance.
        max_seconds: longest utterance.
        snr_range: ``(low, high)`` mixing SNR in dB, drawn uniformly.
        noise_kinds: the noise kinds drawn from (None: the generator's default set).
        tts_fraction: share of eSpeak NG sentences among the clean utterances (the rest source-filter speech).
        max_noise_layers: each pair's noise sums 1 to this many kinds.
        recording_eq: colour each clean utterance like a microphone and room (low and high shelves).
        clean_floor_db: ``(low, high)`` dB under the speech at which a recording's noise floor is added to
            each clean utterance (None: digitally silent pauses).
        **paired_kwargs: the loading settings of :class:`PairedFolderDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        generator_seed: int = 0,
        n_train: int = 200,
        n_val: int = 16,
        n_test: int = 24,
        min_seconds: float = 1.0,
        max_seconds: float = 3.0,
        snr_range: tuple[float, float] = (-5.0, 20.0),
        noise_kinds=None,
        tts_fraction: float = 0.0,
        max_noise_layers: int = 1,
        recording_eq: bool = False,
        clean_floor_db: tuple[float, float] | None = None,
        **paired_kwargs,
    ) -> None:
        super().__init__(root=root, **paired_kwargs)
        self.generator_settings = dict(
            seed=generator_seed,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            min_seconds=min_seconds,
            max_seconds=max_seconds,
            snr_range=tuple(snr_range),
            sample_rate=self.sample_rate,
            tts_fraction=tts_fraction,
            max_noise_layers=max_noise_layers,
            recording_eq=recording_eq,
            clean_floor_db=None if clean_floor_db is None else tuple(clean_floor_db),
        )
        if noise_kinds is not None:  # None: the generator's default set
            self.generator_settings["noise_kinds"] = tuple(noise_kinds)

    def prepare_data(self) -> None:
        # Runs on one process per node before setup(); generation is skipped when up to date.
        from datamodules.synthetic_speech import generate_paired_corpus

        generate_paired_corpus(self.root, **self.generator_settings)
