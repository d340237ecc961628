"""Growing a bank with the line (``python -m client.banks update``) against building it anew, on real parts.

    python -m benchmarks.growth --data ../shared/data/ball_screw [--splits 5] [--batch 20] [--batch-defects 1]

Per split, in this process: a bank is built on a start-of-shift lot (as ``benchmarks.line`` draws it), then a batch of
new parts (``--batch-defects`` of them defective) is folded in with ``postprocess.growth.grow_bank``, and, side by
side, a bank is built anew on the lot and the batch. Every other image of the set is then scored as a new part
against the three banks. Per split: seconds of the update and of the rebuild, which batch parts were folded in (and
whether a defective one was), image AUROC on the held-out parts before and after the update and with the rebuild,
recall and false alarms at each bank's automatic threshold, the recall on held-out parts of the defect types the batch
carried (a defect seen again later must still be flagged), how closely the grown bank's scores follow the
rebuilt bank's (Spearman correlation; largest difference in units of the rebuilt scores' spread), and what the
batch's defective parts did to the grown bank: its AUROC against that of the bank grown with the batch's good parts
only (0 when they were left out; the calibration, read with every new score, may still move; for a bank that keeps
a sample, the two batches fold in different numbers of parts and so draw different reservoir slots: the difference
holds that draw too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from benchmarks.line import draw_lot, line_set
from postprocess.atomic import write_atomic


def decisions(bank, scores, budget: float | None = None) -> np.ndarray:
    """Called anomalous at the bank's automatic threshold (at ``budget``, or the budget it was built with)."""
    from postprocess.decision import Calibration

    return np.asarray(scores) > Calibration.from_dict(bank.manifest.decision).with_rate(budget).threshold


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="one category in the MVTec layout")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--lot-size", type=int, default=36)
    p.add_argument("--defect-rate", type=float, default=0.05, help="of the start-of-shift lot")
    p.add_argument("--batch", type=int, default=20, help="new parts folded in")
    p.add_argument("--batch-defects", type=int, default=1, help="defective parts among them")
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=None,
                   help="the false-alarm budget of the decisions (default: the bank's, 1%%)")
    p.add_argument("--full-bank-images", type=int, default=None,
                   help="the full bank's sample size (PA-CLIP's full_bank_images; default: the product's, 160): below "
                        "the lot size, a sampled bank grown by reservoir sampling")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from postprocess import kernels as K
    from postprocess.bank import build_bank, image_key, score_with_bank
    from postprocess.config import PAClipConfig
    from postprocess.decision import Calibration
    from postprocess.growth import accept_level, grow_bank
    from postprocess.pipeline import LotScorer, encode_images

    backbone, category, _, data = line_set(args.data, args.repository)
    labels = data.labels
    types = np.asarray([s.defect_type for s in data.samples])
    features = encode_images(backbone, data.images, 8, desc="encode the set")
    keys = [image_key(img) for img in data.images]
    cfg = PAClipConfig() if args.full_bank_images is None else PAClipConfig(full_bank_images=args.full_bank_images)
    n_defective = max(1, round(args.defect_rate * args.lot_size))
    rows = []
    for split in range(args.splits):
        lot = draw_lot(labels, args.lot_size, n_defective, args.seed, split)
        rest = np.setdiff1d(np.arange(len(labels)), lot)
        rng = np.random.default_rng([args.seed, split, 99])
        good, bad = rest[labels[rest] == 0], rest[labels[rest] == 1]
        batch = np.concatenate([rng.choice(good, args.batch - args.batch_defects, replace=False),
                                rng.choice(bad, args.batch_defects, replace=False)])
        held = np.setdiff1d(rest, batch)

        def built(indices):
            scorer = LotScorer(backbone, data.images[indices], category.name, progress=False,
                               features=features.take(indices))
            return build_bank(scorer, cfg, "growth", backbone.fingerprint)[0]

        def scores(bank, images=held):
            out = []
            for start in range(0, len(images), 8):
                part = images[start:start + 8]
                ids = bank.query_ids([keys[i] for i in part])
                out.append(K.to_numpy(score_with_bank(bank, features.take(part), ids).scores))
            return np.concatenate(out).astype(np.float64)

        before = built(lot)
        t0 = time.perf_counter()
        grown, report = grow_bank(before, features.take(batch), data.images[batch])
        update_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rebuilt = built(np.concatenate([lot, batch]))
        rebuild_s = time.perf_counter() - t0
        y = labels[held]
        s_before, s_grown, s_rebuilt = scores(before), scores(grown), scores(rebuilt)
        clean = batch[labels[batch] == 0]  # the same batch without its defective parts: what they did to the bank
        s_clean = scores(grow_bank(before, features.take(clean), data.images[clean])[0])
        batch_types = sorted({types[i] for i in batch if labels[i] == 1})
        same_type = np.isin(types[held], batch_types) & (y == 1)
        folded = set(batch.tolist()) - {int(batch[item["index"]]) for item in report["left_out"]}
        row = {"split": split, "held_good": int((y == 0).sum()), "held_defective": int((y == 1).sum()),
               "update_s": update_s, "rebuild_s": rebuild_s, "folded_in": report["folded_in"],
               "defective_folded_in": int(sum(labels[i] for i in folded)),
               "spearman_grown_rebuilt": float(spearmanr(s_grown, s_rebuilt)[0]),
               "max_diff_over_spread": float(np.abs(s_grown - s_rebuilt).max() / (np.ptp(s_rebuilt) or 1.0)),
               "auroc_grown_without_defects": float(roc_auc_score(y, s_clean))}
        # each defective batch part against the bank before: its score, how many of the batch's good parts score
        # higher, whether it was folded in (at most the acceptance level)
        batch_scores = np.asarray(report["scores"], dtype=np.float64)  # grow_bank scored them against the bank before
        row["accept_level"] = accept_level(Calibration.from_dict(before.manifest.decision))
        good_scores = batch_scores[labels[batch] == 0]
        row["defective_batch_parts"] = [
            {"type": str(types[i]), "score": float(v), "good_parts_above": int((good_scores > v).sum()),
             "folded_in": bool(int(i) in folded)} for i, v in zip(batch, batch_scores) if labels[i] == 1]
        for name, bank, s in (("before", before, s_before), ("grown", grown, s_grown), ("rebuilt", rebuilt, s_rebuilt)):
            called = decisions(bank, s, args.budget)
            row[f"auroc_{name}"] = float(roc_auc_score(y, s))
            row[f"recall_{name}"] = float(called[y == 1].mean())
            row[f"false_alarms_{name}"] = float(called[y == 0].mean())
            row[f"same_type_recall_{name}"] = float(called[same_type].mean()) if same_type.any() else None
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    mean = {k: float(np.mean([r[k] for r in rows if r[k] is not None])) for k in rows[0]
            if k not in ("split", "defective_batch_parts") and any(r[k] is not None for r in rows)}
    print(f"\n{category.name}: lot of {args.lot_size} ({n_defective} defective), a batch of {args.batch} new parts "
          f"({args.batch_defects} defective) folded in, {args.splits} splits; mean over splits; decisions at "
          + ("each bank's own budget" if args.budget is None else f"a {args.budget:.0%} budget"))
    sample = cfg.full_bank_images
    if sample and args.lot_size > sample + 1:
        print(f"the full bank keeps a sample of {sample} lot images; the update carries it by reservoir sampling, the "
              "rebuild draws its own")
    print(f"held out per split: {mean['held_good']:.0f} good, {mean['held_defective']:.0f} defective (AUROC and false "
          "alarms are no surer than the good ones' count)\n")
    print("| bank | AUROC on held-out parts | recall | false alarms | recall on the batch's defect types |\n"
          "|---|---:|---:|---:|---:|")
    for name in ("before", "grown", "rebuilt"):
        same = mean.get(f"same_type_recall_{name}")
        print(f"| {name} | {mean[f'auroc_{name}']:.3f} | {mean[f'recall_{name}']:.1%} | "
              f"{mean[f'false_alarms_{name}']:.1%} | {'-' if same is None else format(same, '.1%')} |")
    print(f"\nfolded in: {mean['folded_in']:.1f} of {args.batch} per batch; defective parts folded in: "
          f"{sum(r['defective_folded_in'] for r in rows)} of {args.batch_defects * args.splits}")
    moved = np.array([r["auroc_grown"] - r["auroc_before"] for r in rows])
    print(f"AUROC moved by growing: {moved.mean():+.3f} (grown - before, mean over splits; standard error "
          f"{moved.std(ddof=1) / np.sqrt(len(moved)) if len(moved) > 1 else float('nan'):.3f}; from {moved.min():+.3f} "
          f"to {moved.max():+.3f})")
    largest = max(abs(r["auroc_grown"] - r["auroc_grown_without_defects"]) for r in rows)
    print(f"the batch's defective parts' effect on the grown bank: AUROC "
          f"{mean['auroc_grown'] - mean['auroc_grown_without_defects']:+.3f} (grown with the whole batch - grown with "
          f"its good parts only; largest {largest:.3f})")
    for r in rows:
        for part in r["defective_batch_parts"]:
            if part["folded_in"]:
                print(f"  split {r['split']}: a defective part ({part['type']}) folded in: score {part['score']:.4g} "
                      f"(acceptance level {r['accept_level']:.4g}), {part['good_parts_above']} of the batch's good "
                      "parts above it")
    print(f"grown against rebuilt: Spearman {mean['spearman_grown_rebuilt']:.3f}, largest difference "
          f"{mean['max_diff_over_spread']:.1%} of the rebuilt scores' spread")
    print(f"time: update {mean['update_s']:.1f} s, rebuild {mean['rebuild_s']:.1f} s "
          f"(x{mean['rebuild_s'] / mean['update_s']:.1f} faster)")
    if args.json:
        write_atomic(Path(args.json), json.dumps({"set": category.name, "rows": rows, "mean": mean}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
