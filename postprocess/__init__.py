"""PA-CLIP scoring after the encoder: array kernels (NumPy or CuPy), the in-process pipeline, a torch reference."""

from .config import DEFAULT_CONFIG, MODES, PAClipConfig
from .pa_clip import Features

__all__ = ["DEFAULT_CONFIG", "MODES", "PAClipConfig", "Features"]
