"""Do the exported encoders compute what PyTorch computes? Outputs, then maps, scores and metrics.

    python -m benchmarks.parity [--model ViT-L-14-336] [--pretrained openai|PATH|none] [--image-size 518]
                                [--data ../shared/data] [--json parity.json]

Exports clip_vision in fp32 and fp16 (and clip_text), runs the same images through PyTorch and ONNX Runtime,
and prints per output the largest absolute difference and the smallest cosine similarity (over tokens); then
scores each data set with the features of each and prints the metric deltas against PyTorch. Exits 1 when a target
is missed: cosine >= 0.9999 (fp32) / 0.999 (fp16), |image AUROC delta| <= 0.001 (fp32) / 0.005 (fp16).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from benchmarks.datasets import discover, load_category
from export.clip_encoder import WeightsNotFound
from postprocess.contract import VISION_OUTPUTS
from benchmarks.metrics import lot_metrics as metrics_of
from postprocess.config import PAClipConfig
from postprocess.pipeline import LotScorer, encode_images

TARGETS = {"fp32": {"min_cosine": 0.9999, "image_auroc_delta": 0.001},
           "fp16": {"min_cosine": 0.999, "image_auroc_delta": 0.005}}
METRICS = ("image_auroc", "pixel_auroc", "pro")


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float((num / np.maximum(den, 1e-30)).min())


def compare_outputs(reference, other) -> dict:
    out = {}
    for name in VISION_OUTPUTS:
        ref, got = getattr(reference, name), getattr(other, name)
        out[name] = {"min_cosine": min_cosine(ref, got),
                     "max_abs_diff": float(np.abs(ref.astype(np.float32) - got.astype(np.float32)).max())}
    return out


def lot_metrics(backbone, lot, features, category: str) -> tuple[dict, np.ndarray]:
    report = LotScorer(backbone, lot.images, category, features=features, progress=False).score(PAClipConfig())
    return metrics_of(lot.labels, lot.masks, report.scores, report.maps), report.maps


def run(args) -> dict:
    from export.backbones import ClipBackbone, OnnxBackbone
    from export.repository import export_clip

    torch_backbone = ClipBackbone(args.model, args.pretrained, args.image_size)
    categories = []
    for root in args.data:
        categories += discover(root, "mvtec")
    result = {"model": torch_backbone.fingerprint, "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="pa-clip-parity-") as tmp:
        backbones = {}
        for precision in ("fp32", "fp16"):
            repo = Path(tmp) / precision
            export_clip(torch_backbone, repo, precision, max_batch_size=8)
            backbones[precision] = OnnxBackbone.from_repository(repo)
        per_precision = {p: {"outputs": {}, "metric_deltas": {}} for p in backbones}
        for category in categories:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lot = load_category(category, torch_backbone.image_size)
            if args.limit:
                keep = np.linspace(0, len(lot.images) - 1, min(args.limit, len(lot.images))).astype(int)
                lot.images = lot.images[keep]
                lot.labels = None if lot.labels is None else lot.labels[keep]
                lot.masks = None if lot.masks is None else lot.masks[keep]
            print(f"{category.name}: {len(lot.images)} images", file=sys.stderr)
            ref_features = encode_images(torch_backbone, lot.images, args.batch_size)
            ref_metrics, ref_maps = lot_metrics(torch_backbone, lot, ref_features, category.name)
            for precision, backbone in backbones.items():
                features = encode_images(backbone, lot.images, args.batch_size)
                entry = per_precision[precision]
                for name, diff in compare_outputs(ref_features, features).items():
                    seen = entry["outputs"].setdefault(name, {"min_cosine": 1.0, "max_abs_diff": 0.0})
                    seen["min_cosine"] = min(seen["min_cosine"], diff["min_cosine"])
                    seen["max_abs_diff"] = max(seen["max_abs_diff"], diff["max_abs_diff"])
                metrics, maps = lot_metrics(backbone, lot, features, category.name)
                deltas = {k: metrics[k] - ref_metrics[k] for k in METRICS
                          if metrics.get(k) is not None and ref_metrics.get(k) is not None}
                deltas["max_map_diff"] = float(np.abs(maps - ref_maps).max())
                deltas["torch_image_auroc"] = ref_metrics.get("image_auroc")
                entry["metric_deltas"][category.name] = deltas
    result.update(per_precision)
    return result


def check_targets(result: dict) -> list[str]:
    missed = []
    for precision, target in TARGETS.items():
        for name, diff in result[precision]["outputs"].items():
            if diff["min_cosine"] < target["min_cosine"]:
                missed.append(f"{precision} {name}: min cosine {diff['min_cosine']:.6f} < {target['min_cosine']}")
        for category, deltas in result[precision]["metric_deltas"].items():
            delta = deltas.get("image_auroc")
            if delta is not None and abs(delta) > target["image_auroc_delta"]:
                missed.append(f"{precision} {category}: image AUROC delta {delta:+.4f} beyond "
                              f"{target['image_auroc_delta']}")
    return missed


def print_tables(result: dict) -> None:
    print(f"\nencoder outputs, ONNX Runtime against PyTorch ({result['model']['backbone']}, "
          f"{result['model']['image_size']}px, weights {result['model']['weights']})")
    print(f"{'precision':<10}{'output':<14}{'min cosine':>12}{'max |diff|':>12}")
    for precision in TARGETS:
        for name, diff in result[precision]["outputs"].items():
            print(f"{precision:<10}{name:<14}{diff['min_cosine']:>12.6f}{diff['max_abs_diff']:>12.4g}")
    print("\nmetric deltas against PyTorch (default PAClipConfig)")
    print(f"{'precision':<10}{'category':<16}" + "".join(f"{k:>13}" for k in METRICS) + f"{'max map diff':>14}")
    for precision in TARGETS:
        for category, deltas in result[precision]["metric_deltas"].items():
            cells = "".join(f"{deltas[k]:>+13.4f}" if k in deltas else f"{'-':>13}" for k in METRICS)
            print(f"{precision:<10}{category:<16}{cells}{deltas['max_map_diff']:>14.3g}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-L-14-336")
    p.add_argument("--pretrained", default="openai")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--data", nargs="+", default=["../shared/data/mvtec_bottle", "../shared/data/magnetic_tile"],
                   help="MVTec-layout roots to score")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per category (spread evenly)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, WeightsNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_tables(result)
    missed = check_targets(result)
    result["missed_targets"] = missed
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if missed:
        print("\nMISSED: " + "; ".join(missed))
        return 1
    print("\nall parity targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
