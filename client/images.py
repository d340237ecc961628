"""Reading images the one way the encoder expects them: RGB, resized to the lot's (height, width) with bicubic
filtering, uint8.

The evaluation (``benchmarks.datasets``) and the server client (``client/infer.py``) both read through here, so
that an image scored through Triton gets the very pixels the in-process pipeline saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from postprocess.contract import size_pair

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def read_rgb(path: str | Path) -> Image.Image:
    """The image as RGB; ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def image_size_of(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file's header (nothing decoded), or None when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def model_input(rgb: Image.Image, size) -> np.ndarray:
    """(height, width, 3) uint8: what clip_vision takes (``size``: (height, width), or one number for a square)."""
    height, width = size_pair(size)
    return np.asarray(rgb.resize((width, height), Image.BICUBIC), dtype=np.uint8)
