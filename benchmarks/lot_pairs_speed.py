"""The lot stage's mutual scoring, side by side on the same features: every lot image against every other through
the general full-bank kernel (``kernels.full_bank_scores``, each pair of images multiplied twice) and through
``kernels.lot_mutual_scores`` (each pair once, both images' minima from one similarity block).

    python -m benchmarks.lot_pairs_speed                        # 40 and 110 images, 576 patches, 384 channels
    python -m benchmarks.lot_pairs_speed --images 83 --patches 1369 --channels 1024   # ViT-L at 518, one layer

Random unit features (seeded); one layer at one scale, as ``pa_clip.mutual_scores`` calls the kernel per layer and
scale. Prints seconds for each, their ratio, and the largest difference of the scores (float rounding only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from postprocess import kernels as K
from postprocess.config import PAClipConfig
from postprocess.host import DEFAULT_HOST


def unit_features(n: int, patches: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((patches, channels), dtype=np.float32)  # a shared pattern, so neighbours are close
    feats = base + 0.7 * rng.standard_normal((n, patches, channels), dtype=np.float32)
    return feats / np.linalg.norm(feats, axis=-1, keepdims=True)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[40, 110], help="lot sizes to time")
    p.add_argument("--patches", type=int, default=576, help="patches per image (576: 24x24, the proxy at 336)")
    p.add_argument("--channels", type=int, default=384, help="feature width (384: DINOv2 ViT-S/14)")
    p.add_argument("--budget-mb", type=int, default=DEFAULT_HOST.memory_budget_mb, help="kNN memory budget")
    args = p.parse_args(argv)
    budget = args.budget_mb << 20
    rows = []
    print("| images | patches | channels | k | general (s) | pairs once (s) | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.images:
        feats = unit_features(n, args.patches, args.channels, seed=n)
        ids = np.arange(n)
        cfg = PAClipConfig()
        k = K.interval_k(n, cfg.interval_fraction, cfg.k_min, cfg.k_max)
        t0 = time.perf_counter()
        general = K.full_bank_scores(feats, feats, ids, ids, k, budget)
        t1 = time.perf_counter()
        pairs = K.lot_mutual_scores(feats, k, budget)
        t2 = time.perf_counter()
        print(f"| {n} | {args.patches} | {args.channels} | {k} | {t1 - t0:.1f} | {t2 - t1:.1f} | "
              f"{(t1 - t0) / (t2 - t1):.2f} | {np.abs(general - pairs).max():.1e} |")
        rows.append({"images": n, "general_s": t1 - t0, "pairs_s": t2 - t1,
                     "max_diff": float(np.abs(general - pairs).max())})
    return rows


if __name__ == "__main__":
    main()
