from dfl.systems.denoising import DenoisingSystem

__all__ = ["DenoisingSystem"]
