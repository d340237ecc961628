"""Heat-map pictures: an anomaly map coloured and laid over its image, PNG out. NumPy + Pillow only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered blue -> green -> yellow -> red ramp.
_ANCHORS = np.array([[0, 0, 130], [0, 90, 255], [0, 220, 170], [170, 240, 0], [255, 170, 0], [215, 0, 0]],
                    dtype=np.float32)


def colorize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8, ``low`` blue to ``high`` red."""
    span = max(high - low, 1e-12)
    t = np.clip((np.asarray(values, dtype=np.float32) - low) / span, 0.0, 1.0) * (len(_ANCHORS) - 1)
    i0 = np.floor(t).astype(np.int64)
    i1 = np.minimum(i0 + 1, len(_ANCHORS) - 1)
    frac = (t - i0)[..., None]
    return (_ANCHORS[i0] * (1 - frac) + _ANCHORS[i1] * frac).astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, opacity: float = 0.5) -> np.ndarray:
    """The map coloured and blended over the (H, W, 3) uint8 image (map resized to the image if needed)."""
    h, w = image.shape[:2]
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.shape != (h, w):
        amap = np.asarray(Image.fromarray(amap, mode="F").resize((w, h), Image.BILINEAR))
    colour = colorize(amap, low, high).astype(np.float32)
    return (image.astype(np.float32) * (1 - opacity) + colour * opacity).astype(np.uint8)


def save_panel(path: str | Path, image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float,
               mask: np.ndarray | None = None) -> Path:
    """Write [image | overlay | ground truth (if given)] side by side as a PNG."""
    panels = [image, overlay(image, anomaly_map, low, high)]
    if mask is not None:
        panels.append(np.repeat((np.asarray(mask, dtype=np.uint8) * 255)[..., None], 3, axis=-1))
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    row = panels[0]
    for panel in panels[1:]:
        row = np.concatenate([row, gap, panel], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).save(path)
    return path
