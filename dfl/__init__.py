"""dfl: speech denoising with deep feature losses."""

__version__ = "0.1.0"

SAMPLE_RATE = 16_000


def __getattr__(name):
    # Lazy so `import dfl` stays cheap for CLIs that only need a submodule.
    if name == "Denoiser":
        from dfl.inference import Denoiser

        return Denoiser
    raise AttributeError(name)
