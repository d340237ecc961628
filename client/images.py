"""Reading images the one way the encoder expects them: RGB, resized square with bicubic filtering, uint8.

The evaluation (``benchmarks.datasets``) and the server client (``client/infer.py``) both read through here, so
that an image scored through Triton gets the very pixels the in-process pipeline saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def read_rgb(path: str | Path) -> Image.Image:
    """The image as RGB; ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def model_input(rgb: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: what clip_vision takes."""
    return np.asarray(rgb.resize((size, size), Image.BICUBIC), dtype=np.uint8)
