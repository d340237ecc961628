"""Does a bank notice what it has never seen? Candidate out-of-distribution statistics measured on real parts, other
products and synthetic camera faults.

    python -m benchmarks.ood collect --data ../shared/data/magnetic_tile --others ../shared/data/ball_screw \\
        ../shared/data/mvtec_bottle --out out/ood/magnetic_tile
    python -m benchmarks.ood report --tune "magnetic tile=out/ood/magnetic_tile" --report "ball screw=out/ood/ball_screw"

``collect``: for each split, a bank is built in this process on a start-of-shift lot (as ``benchmarks.line`` draws
it), and scored against it are the lot itself (each image against the others), the set's other images (new good and
defective parts), every image of the ``--others`` sets resized to the bank's size, and each new good part made into
each synthetic fault of ``FAULTS``. Per image it keeps each statistic of ``postprocess.ood.STATISTICS`` and, as
candidates the server does not compute, the image-embedding statistics of ``EMBEDDING_STATISTICS`` (each image's
distance to its nearest lot image, the lot's own images left out of their own comparison).

``capture``: how a set's defective images were photographed against its good ones, model-free: brightness and contrast
(as ``postprocess.ood`` reads them) of each group, how many defective images lie outside the good images' whole
range, the Kolmogorov-Smirnov p-value, and whether the difference follows the defect's area (from the masks): a
difference that does not is the camera's or the lamp's, which an out-of-distribution test exists to see.

``report``: per statistic, the share flagged out of distribution in each group when the threshold is calibrated on
the lot as the bank would calibrate it; the rule (on the tuning set): the statistic whose worst flagged share over
the OOD groups is highest among those flagging at most 5% of the product's own parts (good or defective), reported on
the other set.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from benchmarks.datasets import discover, load_category
from benchmarks.line import draw_lot, line_set
from postprocess.atomic import write_atomic


def _shift(img: np.ndarray) -> np.ndarray:
    """The camera moved by a quarter of the frame: the picture slides right, the edge column fills the gap."""
    w = img.shape[1]
    q = w // 4
    out = np.empty_like(img)
    out[:, q:] = img[:, :w - q]
    out[:, :q] = img[:, :1]
    return out


def _blur(img: np.ndarray) -> np.ndarray:
    """Heavy defocus: a Gaussian of a fortieth of the long side."""
    radius = max(img.shape[:2]) / 40.0
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def _gain(factor: float):
    return lambda img: np.clip(img.astype(np.float32) * factor, 0, 255).astype(np.uint8)


FAULTS = {
    "black frame": lambda img: np.zeros_like(img),
    "white frame": lambda img: np.full_like(img, 255),
    "heavy blur": _blur,
    "shifted a quarter": _shift,
    "brightness x0.5": _gain(0.5),
    "brightness x1.5": _gain(1.5),
}


EMBEDDING_STATISTICS = {
    "embedding_nn": "1 - the largest cosine of the encoder's image embedding to a lot image's",
    "grid_nn": "1 - the largest mean cosine, cell by cell, of the last tap's patches pooled on a 4 x 4 grid (where "
               "things are in the frame counts: a moved camera moves them)",
}
GRID_CELLS = 4


def image_descriptors(features) -> dict:
    """name -> (N, cells, C) unit vectors per cell, one cell for the whole-image embedding."""
    from postprocess.kernels import l2_normalize

    tokens = np.asarray(features.layer_tokens[:, -1], dtype=np.float64)  # (N, L, C), the last tap
    n, _, channels = tokens.shape
    grid = tokens.reshape(n, *features.grid, channels)
    cells = [grid[:, rows][:, :, cols].mean(axis=(1, 2))
             for rows in np.array_split(np.arange(features.grid[0]), GRID_CELLS)
             for cols in np.array_split(np.arange(features.grid[1]), GRID_CELLS)]
    return {"embedding_nn": l2_normalize(np.asarray(features.image_embeds, dtype=np.float64))[:, None],
            "grid_nn": l2_normalize(np.stack(cells, axis=1))}


def embedding_statistics(query: dict, lot: dict, own: bool = False) -> dict:
    """name -> (N,) distance of each query image to its nearest lot image (``own``: the queries are the lot, and
    an image is not compared with itself)."""
    out = {}
    for name in EMBEDDING_STATISTICS:
        similarity = np.einsum("ikc,jkc->ij", query[name], lot[name]) / query[name].shape[1]
        if own:
            np.fill_diagonal(similarity, -np.inf)
        out[name] = (1.0 - similarity.max(axis=1)).round(6).tolist()
    return out


def collect(args) -> int:
    from postprocess.bank import build_bank, image_key, score_with_bank
    from postprocess.ood import STATISTICS, image_statistics
    from postprocess.pipeline import LotScorer, encode_images
    from postprocess.serving import build_config

    backbone, category, size, data = line_set(args.data, args.repository)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        others = {}
        for root in args.others:
            (other,) = discover(root, "mvtec")
            others[other.name] = load_category(other, size).images
    labels = data.labels
    features = encode_images(backbone, data.images, 8, desc="encode the set")
    encoded_others = {name: encode_images(backbone, imgs, 8) for name, imgs in others.items()}
    n_defective = max(1, round(args.defect_rate * args.lot_size))
    splits = []
    for split in range(args.splits):
        lot = draw_lot(labels, args.lot_size, n_defective, args.seed, split)
        new = np.setdiff1d(np.arange(len(labels)), lot)
        scorer = LotScorer(backbone, data.images[lot], category.name, progress=False, features=features.take(lot))
        bank, _ = build_bank(scorer, build_config(dict(args.options)), "ood", backbone.fingerprint)
        lot_descriptors = image_descriptors(features.take(lot))

        def stats(feats, images, own=False):
            out = []
            for start in range(0, len(images), 8):
                f = feats.take(slice(start, start + 8))
                ids = bank.query_ids([image_key(img) for img in images[start:start + 8]])
                result = score_with_bank(bank, f, ids)
                out.append(image_statistics(result.maps, images[start:start + 8], STATISTICS))
            return ({k: np.concatenate([o[k] for o in out]).round(6).tolist() for k in out[0]}
                    | embedding_statistics(image_descriptors(feats), lot_descriptors, own))

        record = {"split": split, "lot": lot.tolist(), "new": new.tolist(),
                  "groups": {"lot": stats(features.take(lot), data.images[lot], own=True),
                             "new good": stats(features.take(new[labels[new] == 0]), data.images[new[labels[new] == 0]]),
                             "new defective": stats(features.take(new[labels[new] == 1]),
                                                    data.images[new[labels[new] == 1]])}}
        for name, feats in encoded_others.items():
            record["groups"][f"other: {name}"] = stats(feats, others[name])
        good = data.images[new[labels[new] == 0]]
        for fault, make in FAULTS.items():
            faulty = np.stack([make(img) for img in good])
            record["groups"][f"fault: {fault}"] = stats(encode_images(backbone, faulty, 8), faulty)
        splits.append(record)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "ood.json", json.dumps({"set": category.name, "options": args.options, "splits": splits}))
        print(f"split {split} done", file=sys.stderr)
    return 0


UNIONS = ("map_q25|brightness|contrast", "map_median|brightness|contrast", "map_q75|brightness|contrast",
          "map_q90|brightness|contrast",
          "map_mean|brightness|contrast", "map_median|grid_nn", "map_q75|grid_nn|brightness|contrast")


def flagged(data: dict, spec: str, budget: float) -> dict:
    """Per group, the share outside the thresholds the bank would calibrate on the lot's own values of the statistic
    (or of each statistic of the union ``a|b|c``, the budget shared: ``postprocess.ood.calibrate_ood``)."""
    from postprocess.ood import calibrate_ood

    counts: dict = {}
    names = spec.split("|")
    for record in data["splits"]:
        calibration = calibrate_ood(record["groups"]["lot"], names, budget)
        for group, values in record["groups"].items():
            if group == "lot":
                continue
            hit, _ = calibration.outside(values)
            c = counts.setdefault(group, [0, 0])
            c[0], c[1] = c[0] + int(hit.sum()), c[1] + len(hit)
    return {g: hit / max(1, n) for g, (hit, n) in counts.items()}


def candidates(data: dict) -> list[str]:
    have = set(data["splits"][0]["groups"]["lot"])
    return sorted(have) + [u for u in UNIONS if set(u.split("|")) <= have]


def own_groups(rates: dict) -> list:
    return [g for g in rates if g in ("new good", "new defective")]


def choose(data: dict, budget: float, max_own: float) -> str:
    """The statistic whose worst OOD group is flagged most often, among those flagging at most ``max_own`` of the
    product's own parts (all of them when none does). A tie on the worst group goes to the next worst, and so on
    (each group is a target of its own)."""
    return choose_from({s: flagged(data, s, budget) for s in candidates(data)}, max_own)


def choose_from(rates: dict, max_own: float) -> str:
    """``choose`` on rates already read: statistic -> group -> share flagged."""
    fair = [s for s, r in rates.items() if max(r[g] for g in own_groups(r)) <= max_own] or list(rates)
    return max(fair, key=lambda s: sorted(v for g, v in rates[s].items() if g not in own_groups(rates[s])))


def drift_alarms(data: dict, statistics: tuple, window: int, draws: int, seed: int = 0) -> dict:
    """Per group, the share of windows of ``window`` of its images (``draws`` per bank, drawn without replacement)
    whose drift test against the lot's values of ``statistics`` alarms (``postprocess.drift.drift_test``, as the
    scoring service reads its window), and a line at 5% defective: new good parts with 5% of the window defective."""
    from postprocess.drift import drift_test

    rng = np.random.default_rng(seed)
    counts: dict = {}
    for record in data["splits"]:
        groups = record["groups"]
        reference = {name: np.asarray(groups["lot"][name], dtype=np.float64) for name in statistics}
        n_bad = round(0.05 * window)
        mixes = {g: [(g, window)] for g in groups if g != "lot"}
        mixes["line at 5% defective"] = [("new good", window - n_bad), ("new defective", n_bad)]
        for name, parts in mixes.items():
            if any(len(groups[group][statistics[0]]) < take for group, take in parts):
                continue  # fewer images than a window holds: not measured (drawing one twice would fake a window)
            for _ in range(draws):
                values = {k: [] for k in statistics}
                for group, take in parts:
                    for i in rng.choice(len(groups[group][statistics[0]]), take, replace=False):
                        for k in statistics:
                            values[k].append(groups[group][k][i])
                c = counts.setdefault(name, [0, 0])
                c[0], c[1] = c[0] + int(drift_test(reference, values).get("alarm", False)), c[1] + 1
    return {g: hit / n for g, (hit, n) in counts.items()}


def report(args) -> int:
    sets = {}
    for spec in (args.tune, args.report):
        name, _, folder = spec.partition("=")
        sets[name] = json.loads((Path(folder) / "ood.json").read_text())
    names = list(sets)
    for a, b in ((names[0], names[1]), (names[1], names[0])):
        pick = choose(sets[a], args.budget, args.max_own)
        print(f"\nchosen on {a}: {pick}; reported on {b}")
    for name, data in sets.items():
        statistics = candidates(data)
        table = {s: flagged(data, s, args.budget) for s in statistics}
        groups = list(table[statistics[0]])
        print(f"\n{name} ({len(data['splits'])} banks; thresholds at {args.budget:.1%} of the lot, shared in a union):\n")
        # a union's name is written with "+" in the table: a "|" would split its markdown cell
        print("| group | " + " | ".join(s.replace("|", " + ") for s in statistics) + " |\n|---|"
              + "---:|" * len(statistics))
        for g in groups:
            print(f"| {g} | " + " | ".join(f"{100 * table[s][g]:.1f}%" for s in statistics) + " |")
    from postprocess.drift import ALARM_P
    from postprocess.ood import DEFAULT_STATISTICS

    for name, data in sets.items():
        served = tuple(DEFAULT_STATISTICS)
        columns = {" + ".join(served): served, f"{served[0]} alone": served[:1]}
        alarms = {c: drift_alarms(data, stats, args.window, args.draws) for c, stats in columns.items()}
        per_image = flagged(data, "|".join(served), args.budget)
        print(f"\n{name}: the drift alarm (windows of {args.window} new images, {args.draws} per bank, alarm at p < "
              f"{ALARM_P:g} over the statistics read) against out of distribution image by image\n")
        print("| window of | per image: out of distribution | " + " | ".join(f"drift alarm: {c}" for c in columns)
              + " |\n|---|---:|" + "---:|" * len(columns))
        for g in [*per_image, "line at 5% defective"]:
            print(f"| {g} | " + (f"{100 * per_image[g]:.1f}%" if g in per_image else "-") + " | "
                  + " | ".join(f"{100 * alarms[c][g]:.0f}%" if g in alarms[c] else "-" for c in columns) + " |")
        print(f"(-: fewer than {args.window} such images per bank)")
    return 0


def capture(args) -> int:
    """``capture``: brightness and contrast of a set's good and defective images, model-free (module docstring)."""
    from scipy.stats import ks_2samp, spearmanr

    from postprocess.ood import image_statistics

    (category,) = discover(args.data, "mvtec")
    data = load_category(category, args.size)
    names = ("brightness", "contrast")
    values = image_statistics(np.zeros((len(data.images), 1, 1), np.float32), data.images, names)
    good, bad = data.labels == 0, data.labels == 1
    print(f"\n{category.name}: {good.sum()} good, {bad.sum()} defective images at {args.size} px\n")
    print("| statistic | good: median (range) | defective: median (range) | defective outside the good range | "
          "Kolmogorov-Smirnov p |\n|---|---|---|---:|---:|")
    for name in names:
        g, b = values[name][good], values[name][bad]
        outside = int(((b < g.min()) | (b > g.max())).sum())
        print(f"| {name} | {np.median(g):.1f} ({g.min():.1f}-{g.max():.1f}) | {np.median(b):.1f} ({b.min():.1f}-"
              f"{b.max():.1f}) | {outside} of {b.size} | {ks_2samp(g, b).pvalue:.2g} |")
    if data.masks is not None:
        area = data.masks[bad].reshape(int(bad.sum()), -1).mean(axis=1)
        brightness = values["brightness"][bad]
        if np.ptp(area) > 0 and np.ptp(brightness) > 0:
            rho, p_value = spearmanr(area, brightness)
            follows = f"{rho:+.2f} (p = {p_value:.2g})"
        else:  # one side constant: no rank correlation to state
            follows = "not defined (every defect " + ("covers as much" if np.ptp(area) == 0 else "as bright") + ")"
        small = area <= np.median(area)
        low, high = values["brightness"][good].min(), values["brightness"][good].max()
        print(f"\ndefect area (share of the image, from the masks): median {np.median(area):.2%}, largest "
              f"{area.max():.2%}; Spearman of area against brightness {follows}; defective "
              f"images with at most the median area outside the good brightness range: "
              f"{int(((brightness[small] < low) | (brightness[small] > high)).sum())} of {int(small.sum())}")
    return 0


def lookalikes(args) -> int:
    """``lookalikes``: can a lamp's change be told from one image when its brightness is read against the lot images
    it looks most like (by the encoder's image embedding, or the 4 x 4 grid of ``grid_nn``), rather than against the
    whole lot? Per split (lots drawn as ``collect`` draws them), the log brightness less the mean of its ``k`` nearest
    lot images', two-sided, beside the brightness itself, the budget shared as the bank shares it."""
    from postprocess.ood import calibrate_ood, image_statistics
    from postprocess.pipeline import encode_images

    backbone, category, _, data = line_set(args.data, args.repository)
    labels = data.labels
    good = np.flatnonzero(labels == 0)
    log_brightness = lambda images: np.log1p(image_statistics(  # noqa: E731
        np.zeros((len(images), 1, 1), np.float32), images, ("brightness",))["brightness"])
    groups = {"set": (image_descriptors(encode_images(backbone, data.images, 8, desc="encode the set")),
                      log_brightness(data.images))}
    for fault in ("brightness x0.5", "brightness x1.5", "shifted a quarter"):
        faulty = np.stack([FAULTS[fault](data.images[i]) for i in good])
        groups[fault] = (image_descriptors(encode_images(backbone, faulty, 8, desc=fault)), log_brightness(faulty))
    n_defective = max(1, round(args.defect_rate * args.lot_size))
    at_good = {int(i): row for row, i in enumerate(good)}
    print(f"\n{category.name}: {args.splits} lots of {args.lot_size} ({n_defective} defective), k = {args.k}; share "
          "called out of distribution by brightness and brightness against the look-alikes together\n")
    faults = [f for f in groups if f != "set"]
    print("| look-alikes by | new good | new defective | " + " | ".join(f"fault: {f}" for f in faults) + " |\n|---|"
          + "---:|" * (2 + len(faults)))
    for descriptor in EMBEDDING_STATISTICS:
        hits: dict = {}
        for split in range(args.splits):
            lot = draw_lot(labels, args.lot_size, n_defective, args.seed, split)
            new = np.setdiff1d(np.arange(len(labels)), lot)
            lot_desc, lot_bright = groups["set"][0][descriptor][lot], groups["set"][1][lot]

            def against_lookalikes(desc, bright, leave_own=False):
                similarity = np.einsum("ikc,jkc->ij", desc, lot_desc) / desc.shape[1]
                if leave_own:
                    np.fill_diagonal(similarity, -np.inf)
                nearest = np.argsort(-similarity, axis=1)[:, :args.k]
                return bright - lot_bright[nearest].mean(axis=1)

            calibration = calibrate_ood({"brightness": lot_bright, "contrast": against_lookalikes(
                lot_desc, lot_bright, leave_own=True)}, ("brightness", "contrast"), args.budget)
            rows = {"new good": new[labels[new] == 0], "new defective": new[labels[new] == 1]}
            for group, index in rows.items():
                desc, bright = groups["set"][0][descriptor][index], groups["set"][1][index]
                hit, _ = calibration.outside({"brightness": bright, "contrast": against_lookalikes(desc, bright)})
                hits.setdefault(group, []).extend(hit)
            for fault in faults:
                index = [at_good[i] for i in rows["new good"]]
                desc, bright = groups[fault][0][descriptor][index], groups[fault][1][index]
                hit, _ = calibration.outside({"brightness": bright, "contrast": against_lookalikes(desc, bright)})
                hits.setdefault(f"fault: {fault}", []).extend(hit)
        print(f"| {descriptor} | " + " | ".join(f"{100 * np.mean(v):.1f}%" for v in hits.values()) + " |")
        # why: a darkened image's nearest images in the whole set, and the spread of brightness among look-alikes
        darkened = groups["brightness x0.5"][0][descriptor]
        everything = groups["set"][0][descriptor]
        nearest = np.argmax(np.einsum("ikc,jkc->ij", darkened, everything), axis=1)
        similarity = np.einsum("ikc,jkc->ij", everything[good], everything)
        similarity[np.arange(len(good)), good] = -np.inf
        spread = np.std(groups["set"][1][good] - groups["set"][1][np.argmax(similarity, axis=1)])
        own = np.mean(nearest == good)
        print(f"  ({descriptor}: a darkened good image's nearest image of the set is its own original for "
              f"{own:.1%} of them; log brightness against the nearest other good image spreads by {spread:.2f})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def lots(parser, splits: int):
        """The set and the lots drawn from it, as collect draws them."""
        parser.add_argument("--data", required=True)
        parser.add_argument("--repository", default="model_repository")
        parser.add_argument("--lot-size", type=int, default=36)
        parser.add_argument("--defect-rate", type=float, default=0.05)
        parser.add_argument("--splits", type=int, default=splits)
        parser.add_argument("--seed", type=int, default=0)
        return parser

    c = lots(sub.add_parser("collect"), splits=3)
    c.add_argument("--others", nargs="*", default=[], help="other products' sets (MVTec layout)")
    c.add_argument("--out", required=True)
    c.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    r = sub.add_parser("report")
    r.add_argument("--tune", required=True)
    r.add_argument("--report", required=True)
    r.add_argument("--budget", type=float, default=0.005, help="the lot's share the thresholds leave outside")
    r.add_argument("--max-own", type=float, default=0.05)
    r.add_argument("--window", type=int, default=32, help="new images per drift window (the alarm's minimum: 32)")
    r.add_argument("--draws", type=int, default=50, help="drift windows drawn per bank and group")
    k = sub.add_parser("capture", help="brightness and contrast of a set's good and defective images, model-free")
    k.add_argument("--data", required=True, help="one category in the MVTec layout")
    k.add_argument("--size", type=int, default=224, help="the images' size as read (square, pixels)")
    look = lots(sub.add_parser("lookalikes", help="brightness against the lot images an image looks most like, "
                               "measured as an out-of-distribution statistic (not served)"), splits=10)
    look.add_argument("--k", type=int, default=3, help="look-alikes per image")
    look.add_argument("--budget", type=float, default=0.005, help="the lot's share the thresholds leave outside")
    args = p.parse_args(argv)
    if args.command == "capture":
        return capture(args)
    if args.command == "lookalikes":
        return lookalikes(args)
    if args.command == "collect":
        from client.infer import parse_overrides

        args.options = parse_overrides(args.overrides)
        return collect(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
