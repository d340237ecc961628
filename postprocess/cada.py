"""Content-Adaptive Data Augmentation (Eq. 4): how much does the object move across the lot, and which
augmentations does that allow?

The decision and the augmentations run on the host on uint8 images (they prepare images for the encoder: NumPy and
Pillow); moving a patch-level map along with its image runs where the map lives (NumPy or CuPy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .contract import size_pair

_SALIENCY_SIZE = 64


def object_centroid(image: np.ndarray) -> tuple[float, float]:
    """Centroid (x, y), as fractions of the width and height, of what differs from the image's border.

    The border's median colour stands for the background; pixels far from it (above the mean difference) are the
    object. Crude, but it needs no model and works on both object and texture images.
    """
    small = np.asarray(Image.fromarray(image).convert("RGB").resize((_SALIENCY_SIZE, _SALIENCY_SIZE), Image.BILINEAR),
                       dtype=np.float32)
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]], axis=0)
    background = np.median(border, axis=0)
    diff = np.abs(small - background).sum(axis=-1)
    weight = np.where(diff > diff.mean(), diff, 0.0)
    if weight.sum() <= 0:
        return 0.5, 0.5
    ys, xs = np.mgrid[0:_SALIENCY_SIZE, 0:_SALIENCY_SIZE]
    total = weight.sum()
    return float((weight * (xs + 0.5)).sum() / total / _SALIENCY_SIZE), float(
        (weight * (ys + 0.5)).sum() / total / _SALIENCY_SIZE
    )


@dataclass
class CadaDecision:
    sigma: float
    sigma_spatial: float
    sigma_temporal: float
    threshold: float
    strategy: str  # "photometric" or "photometric+geometric"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def cada_decision(images, threshold: float) -> CadaDecision:
    """sigma = sqrt(sigma_spatial^2 + sigma_temporal^2) of the object centroid over the lot (in lot order).

    sigma_spatial: spread of the centroid over the lot; sigma_temporal: spread of its frame-to-frame displacement
    (a line camera sees the lot in order). Above the threshold the object moves: photometric augmentation only;
    below it the object sits still and geometric augmentation adds useful variety.
    """
    centroids = np.array([object_centroid(im) for im in images], dtype=np.float64)
    spatial = math.sqrt(float(centroids.var(axis=0).sum()))
    temporal = math.sqrt(float(np.diff(centroids, axis=0).var(axis=0).sum()) / 2.0) if len(centroids) > 2 else 0.0
    sigma = math.hypot(spatial, temporal)
    strategy = "photometric" if sigma > threshold else "photometric+geometric"
    return CadaDecision(sigma, spatial, temporal, threshold, strategy)


@dataclass
class Augmentation:
    """One augmentation; ``matrix`` maps output pixel coordinates to input ones (PIL's affine convention)."""

    brightness: float
    contrast: float
    matrix: tuple[float, ...] | None


def _affine(size, rng: np.random.Generator) -> tuple[float, ...]:
    """Flips, a small rotation and a small shift about the image centre, as PIL's inverse affine coefficients
    (``size``: the image's (height, width), or one number for a square)."""
    height, width = size_pair(size)
    angle = math.radians(rng.uniform(-15.0, 15.0))
    flip_x = -1.0 if rng.random() < 0.5 else 1.0
    flip_y = -1.0 if rng.random() < 0.5 else 1.0
    shift = rng.uniform(-0.04, 0.04, size=2) * np.array([width, height])
    c, s = math.cos(angle), math.sin(angle)
    # input = centre + R(angle) * F * (output - centre - shift)
    a, b = c * flip_x, -s * flip_y
    d, e = s * flip_x, c * flip_y
    cx, cy = width / 2.0, height / 2.0
    ox, oy = cx + shift[0], cy + shift[1]
    return (a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy)


def draw_augmentations(count: int, strategy: str, size, seed: int) -> list[Augmentation]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        brightness = float(rng.uniform(0.85, 1.15))
        contrast = float(rng.uniform(0.85, 1.15))
        matrix = _affine(size, rng) if strategy == "photometric+geometric" else None
        out.append(Augmentation(brightness, contrast, matrix))
    return out


def _border_colour(image: np.ndarray) -> tuple[int, ...]:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
    return tuple(int(v) for v in np.median(border, axis=0))


def apply_augmentation(image: np.ndarray, aug: Augmentation) -> np.ndarray:
    """Augment one (H, W, 3) uint8 image."""
    out = image.astype(np.float32)
    mean = out.mean()
    out = (out - mean) * aug.contrast + mean * aug.brightness
    out = np.clip(out, 0, 255).astype(np.uint8)
    if aug.matrix is not None:
        h, w = image.shape[:2]
        out = np.asarray(
            # the fill is the adjusted image's border: the original's left a seam where the corners rotated in
            # met the brightened or darkened background, and the copies carried it into the normal bank
            Image.fromarray(out).transform((w, h), Image.AFFINE, aug.matrix, resample=Image.BILINEAR,
                                           fillcolor=_border_colour(out))
        )
    return out


def patch_warp(matrix: tuple[float, ...], grid: tuple[int, int], image_size):
    """The affine warp of a (h, w) patch map as a gather: (L, 4) source indices, (L, 4) bilinear weights and (L,)
    1.0 where the source falls outside the map (those take the fill value). Host constants from the augmentation
    alone, so the warp itself runs where the map is (NumPy or CuPy). Same sampling as PIL's ``transform(AFFINE,
    BILINEAR)``: pixel centres, edge samples clamped, outside the map -> fill (tested against PIL)."""
    h, w = grid
    scale = h / float(size_pair(image_size)[0])  # patches per pixel, the same along both axes
    a, b, c, d, e, f = matrix
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    # the image's affine in patch-grid coordinates
    x_in = a * xs + b * ys + c * scale
    y_in = d * xs + e * ys + f * scale
    inside = ((x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)).reshape(-1)
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x0, y0 = np.floor(x_in), np.floor(y_in)
    dx, dy = (x_in - x0).reshape(-1), (y_in - y0).reshape(-1)
    cols = [np.clip(x0 + k, 0, w - 1).astype(np.int64).reshape(-1) for k in (0, 1)]
    rows = [np.clip(y0 + k, 0, h - 1).astype(np.int64).reshape(-1) for k in (0, 1)]
    index = np.stack([rows[0] * w + cols[0], rows[0] * w + cols[1], rows[1] * w + cols[0], rows[1] * w + cols[1]], 1)
    weight = np.stack([(1 - dx) * (1 - dy), dx * (1 - dy), (1 - dx) * dy, dx * dy], 1) * inside[:, None]
    return index, weight.astype(np.float32), (~inside).astype(np.float32)


def warp_patch_map(patch_map, aug: Augmentation, image_size):
    """Move a (h, w) patch-level map (NumPy or CuPy) the way ``aug`` moves the image, so masks follow their
    patches; where the image came from outside the frame, the map's median."""
    if aug.matrix is None:
        return patch_map
    from .kernels import get_xp

    xp = get_xp(patch_map)
    h, w = patch_map.shape
    index, weight, outside = (xp.asarray(v) for v in patch_warp(aug.matrix, (h, w), image_size))
    flat = patch_map.reshape(-1).astype(xp.float32)
    return ((flat[index] * weight).sum(axis=-1) + xp.median(flat) * outside).reshape(h, w)
