"""How unlike a bank's lot an image is as a whole (issue 27): candidate statistics, measured by benchmarks/ood.py.

A defect is local: a few patches far from the lot. Another product, a camera fault or a lighting change moves the
whole image: most patches far, or the image embedding far from every lot image's. The statistics below read that
from what scoring against a bank already computes.
"""

from __future__ import annotations

import numpy as np

from . import kernels as K

EMBEDDING_NEIGHBOURS = 3


def ood_statistics(bank, result, features, query_ids, images=None) -> dict:
    """Per image (host arrays): ``patch_median`` (the median patch score: a defect's few patches do not move it),
    ``patch_q75`` (its upper quartile), ``patch_mean``, ``far_fraction`` (the share of patches above the lot's 99.9th
    pixel percentile, the top of the heat maps' colour scale), when the bank keeps the lot's image embeddings
    ``embedding_distance`` (mean cosine distance to the nearest lot images, itself left out), and from the pixels
    (``images``, uint8 [B, H, W, 3]) ``brightness`` and ``contrast`` (mean and deviation of the pixel values)."""
    xp = K.get_xp(result.patch_scores)
    patches = result.patch_scores
    out = {"patch_median": K.to_numpy(xp.median(patches, axis=1)).astype(np.float64),
           "patch_q75": K.to_numpy(xp.quantile(patches, 0.75, axis=1)).astype(np.float64),
           "patch_mean": K.to_numpy(patches.mean(axis=1)).astype(np.float64),
           "far_fraction": K.to_numpy((patches > bank.manifest.map_range[1]).mean(axis=1)).astype(np.float64)}
    if images is not None:
        pixels = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
        out["brightness"] = pixels.mean(axis=1).astype(np.float64)
        out["contrast"] = pixels.std(axis=1).astype(np.float64)
    if bank.lot_embeds is not None:
        q = features.image_embeds.astype(xp.float32)
        r = xp.asarray(bank.lot_embeds).astype(xp.float32)
        q = q / xp.maximum(xp.sqrt((q * q).sum(axis=1, keepdims=True)), 1e-12)
        r = r / xp.maximum(xp.sqrt((r * r).sum(axis=1, keepdims=True)), 1e-12)
        distance = 1.0 - q @ r.T
        own = xp.asarray(query_ids)[:, None] == xp.arange(r.shape[0])[None, :]
        distance = xp.where(own, xp.float32(xp.inf), distance)
        k = min(EMBEDDING_NEIGHBOURS, int(r.shape[0]) - 1)
        nearest = xp.partition(distance, k - 1, axis=1)[:, :k]
        out["embedding_distance"] = K.to_numpy(nearest.mean(axis=1)).astype(np.float64)
    return out
