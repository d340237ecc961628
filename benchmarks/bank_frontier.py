"""What a bank costs and what it finds: the full bank's size, the work and the time to score a new image against it,
and the accuracy on new parts, for ways of making it smaller, side by side.

    python -m benchmarks.bank_frontier collect --data ../shared/data/magnetic_tile --out out/frontier/magnetic_tile
    python -m benchmarks.bank_frontier collect --data ../shared/data/ball_screw --out out/frontier/ball_screw
    python -m benchmarks.bank_frontier report --tune "magnetic tile=out/frontier/magnetic_tile" \\
        --report "ball screw=out/frontier/ball_screw"

``collect`` encodes the set once (the exported encoder in ``--repository``, in this process), then for each variant
(``--variant NAME=KEY:VALUE,...``; by default ``VARIANTS``) and split: builds a bank on a start-of-shift lot
(``--lot-size`` images, ``--defect-rate`` of them defective, drawn as ``benchmarks.line`` draws them), scores every
other image of the set as a new part, ``--batch`` at a time, and keeps: the bank's bytes, the kNN work per new image
(multiply-adds of the full and normal banks and of the projection, counted from the bank's shapes: pooling and maps
are left out, they do not depend on the bank), the measured seconds per new image on this machine, and image AUROC,
pixel AUROC and PRO on the new parts. Widths may be given relative to the encoder's: ``bank_dim:C/4``. A variant's
settings apply on top of the defaults: ``--variant full=bank_dim_divisor:1,full_bank_storage:float16,\
full_bank_neighbours:0`` is the full bank (``FULL_BANK``).

``report`` prints one table per set and chooses on the tuning set: among the variants at least ``--smaller`` times
smaller and ``--cheaper`` times less work per new image than the first variant (the full bank), those that lose
at most ``--max-loss`` of image AUROC and of PRO (mean over the splits, paired: the same lots and new parts), the one
with the best mean of the two; then it reports that choice on the other set, and the other direction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks.line import draw_lot, line_set
from benchmarks.metrics import lot_metrics
from postprocess.atomic import write_atomic
from postprocess.config import FULL_BANK

# The variants below are measured against the full bank the issue started from (``FULL_BANK``), and each one is
# spelled on top of it with what it changes, so that a variant does not move when the defaults do

# name -> settings; widths as "C/n" are fractions of the encoder's feature width, layers as negative indices count
# from the last tap
VARIANTS = {
    "full bank": FULL_BANK,
    "default (pca C/8 + int8 + 8 neighbours)": {},
    **{name: {**FULL_BANK, **settings} for name, settings in {
        "coreset 50%": {"full_coreset_ratio": 0.5},
        "coreset 25%": {"full_coreset_ratio": 0.25},
        "coreset 10%": {"full_coreset_ratio": 0.1},
        "pca C/4": {"bank_dim": "C/4"},
        "pca C/8": {"bank_dim": "C/8"},
        "random C/4": {"bank_dim": "C/4", "bank_projection": "random"},
        "last two taps": {"layers": [-2, -1]},
        "scales 1, 3": {"scales": [1, 3]},
        "int8": {"full_bank_storage": "int8"},
        "8 neighbours": {"full_bank_neighbours": 8},
        "4 neighbours": {"full_bank_neighbours": 4},
        "coreset 25% + pca C/4 + int8": {"full_coreset_ratio": 0.25, "bank_dim": "C/4", "full_bank_storage": "int8"},
        "coreset 50% + pca C/4 + int8 + 8 neighbours": {"full_coreset_ratio": 0.5, "bank_dim": "C/4",
                                                        "full_bank_storage": "int8", "full_bank_neighbours": 8},
        "faiss HNSW": {"search": "faiss-hnsw"},
        "bfloat16 products": {"cpu_matmul": "bfloat16"},
    }.items()},
}
# Settings of the approximate search (not bank settings: how new images are matched against the full bank)
SEARCH_KEYS = ("search", "hnsw_m", "ef_search", "candidates")
# Host settings (postprocess/host.py: how the maths runs here, e.g. cpu_matmul:bfloat16), for the build and scoring
HOST_KEYS = ("cpu_matmul",)
METRICS = ("image_auroc", "pixel_auroc", "pro")


def parse_variant(text: str) -> tuple[str, dict]:
    """NAME=KEY:VALUE,KEY:VALUE (values as JSON where they parse, else text)."""
    from client.infer import parse_overrides

    name, sep, body = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant wants NAME=KEY:VALUE,..., got {text!r}")
    return name, parse_overrides(filter(None, body.split(",")), ":", f"--variant {name}:")


def split_host(settings: dict) -> tuple:
    """(the ``HostSettings`` a variant's host keys ask for, the rest of its settings)."""
    from postprocess.host import HostSettings

    return (HostSettings(**{k: v for k, v in settings.items() if k in HOST_KEYS}),
            {k: v for k, v in settings.items() if k not in HOST_KEYS})


def resolve(settings: dict, channels: int, n_taps: int) -> dict:
    """Relative widths ("C/4") and layers counted from the end, against this encoder."""
    out = dict(settings)
    if isinstance(out.get("bank_dim"), str):
        text = out["bank_dim"]
        if not text.startswith("C/"):
            raise ValueError(f"bank_dim {text!r}: a number or C/n")
        out["bank_dim"] = max(1, channels // int(text[2:]))
    if "layers" in out:
        out["layers"] = sorted(int(i) % n_taps for i in out["layers"])
    return out


class FaissFullBank:
    """The full bank's kNN through a faiss HNSW index (inner product on the stored entries), as an approximate
    stand-in for ``kernels.full_bank_scores`` while new images are scored.

    The interval average needs, per query patch, the nearest entry of every bank image; a global search for the
    ``candidates`` nearest entries gives exactly those of the images it reaches (an image's nearest entry is among
    them when it is nearer than the last), and every image it does not reach is farther than the last candidate,
    whose distance stands in for it (a lower bound: never an overestimate). One index per bank array, built once.
    """

    def __init__(self, hnsw_m: int = 32, ef_search: int = 128, candidates: int = 256):
        self.hnsw_m, self.ef_search, self.candidates = hnsw_m, ef_search, candidates
        self.indexes: dict = {}
        self.flop = 0.0  # 2 x the distance computations x the width, as faiss counts them

    def _index(self, bank, bank_scale):
        import faiss

        from postprocess import kernels as K

        key = (bank.__array_interface__["data"][0], bank.shape)
        if key not in self.indexes:
            entries = bank.reshape(-1, bank.shape[-1])
            if bank_scale is not None:
                entries = K.dequantize_rows(entries, bank_scale.reshape(-1))
            index = faiss.IndexHNSWFlat(int(bank.shape[-1]), self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.add(np.ascontiguousarray(entries, dtype=np.float32))
            self.indexes[key] = (index, bank)  # the bank kept alive: its address is the key
        index = self.indexes[key][0]
        index.hnsw.efSearch = max(self.ef_search, self.candidates)
        return index

    def __call__(self, queries, bank, query_ids, bank_ids, k, budget_bytes, bank_scale=None, matmul="float32",
                 neighbours=0, bank_descriptors=None):
        # matmul: faiss multiplies in float32 whatever the host asks of the NumPy kernel; bank_descriptors choose
        # neighbours, which a search of the whole bank does not have
        if neighbours:
            raise SystemExit("error: a faiss search reads the whole bank: leave full_bank_neighbours at 0 with it")
        n_query, length, width = queries.shape
        n_bank, per_image, _ = bank.shape
        index = self._index(bank, bank_scale)
        found = min(self.candidates, n_bank * per_image)
        import faiss

        faiss.cvar.hnsw_stats.reset()
        sims, where = index.search(np.ascontiguousarray(queries.reshape(-1, width), dtype=np.float32), found)
        self.flop += 2.0 * faiss.cvar.hnsw_stats.ndis * width
        rows = np.arange(n_query * length)[:, None]
        minima = np.repeat((1.0 - sims[:, -1:]).astype(np.float32), n_bank, axis=1)  # not reached: the last one
        image = np.where(where >= 0, where // per_image, 0)
        np.minimum.at(minima, (np.broadcast_to(rows, image.shape), image),
                      np.where(where >= 0, 1.0 - sims, np.inf).astype(np.float32))
        own = np.repeat(np.asarray(query_ids), length)[:, None] == np.asarray(bank_ids)[None, :]
        minima[own] = np.inf
        return np.partition(minima, k - 1, axis=1)[:, :k].mean(axis=1).reshape(n_query, length).astype(np.float32)


def knn_work(bank, length: int, channels: int, normal: bool = True, projection: bool = True) -> float:
    """Multiply-adds x 2 (FLOP) to score one new image against ``bank``: per scale and scoring layer, its L patches
    against every full-bank entry (with ``full_bank_neighbours``, those of the images it reads, and its mean against
    every image's mean entry; the means themselves, read once per request, are not counted) and (``normal``) every
    normal-bank entry, and (``projection``) the projection of its features."""
    total = 0.0
    neighbours = bank.config.full_bank_neighbours
    count = max(neighbours, bank.manifest.interval_k)
    for r, full in bank.full.items():  # (layers, N, m, d)
        layers, n, m, width = (int(v) for v in full.shape)
        read = count if neighbours > 0 and count < n - 1 else n
        total += 2.0 * layers * length * read * m * width + (2.0 * layers * n * width if read < n else 0.0)
        if projection and r in bank.bases:
            total += 2.0 * layers * length * channels * width
    for r, entries in bank.normal.items() if normal else ():  # (layers, M, d)
        layers, count, width = (int(v) for v in entries.shape)
        total += 2.0 * layers * length * count * width
    return total


def collect(args) -> int:
    from postprocess import kernels as K
    from postprocess.bank import build_bank, image_key, score_with_bank
    from postprocess.pipeline import LotScorer, encode_images
    from postprocess.serving import build_config

    backbone, category, size, data = line_set(args.data, args.repository)
    labels = data.labels
    features = encode_images(backbone, data.images, 8, desc="encode the set")
    _, n_taps, length, channels = features.layer_tokens.shape
    variants = dict(parse_variant(v) for v in args.variant) if args.variant else dict(VARIANTS)
    n_defective = max(1, round(args.defect_rate * args.lot_size))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    plan = [(name, split) for name in variants for split in range(args.splits)]
    for name, split in tqdm(plan, desc=f"frontier {category.name}", unit="bank"):
        settings = resolve(variants[name], channels, n_taps)
        search = {k: v for k, v in settings.items() if k in SEARCH_KEYS}
        host, rest = split_host(settings)
        cfg = build_config({k: v for k, v in rest.items() if k not in SEARCH_KEYS})
        lot = draw_lot(labels, args.lot_size, n_defective, args.seed, split)
        new = np.setdiff1d(np.arange(len(labels)), lot)
        scorer = LotScorer(backbone, data.images[lot], category.name, progress=False, features=features.take(lot),
                           host=host)
        t0 = time.perf_counter()
        bank, _ = build_bank(scorer, cfg, "frontier", backbone.fingerprint)
        build_s = time.perf_counter() - t0
        maps, scores = [], []
        exact, approximate = K.full_bank_scores, None
        if search:  # new images matched through faiss (its indexes built here, on the first batch: timed)
            if search.get("search") != "faiss-hnsw":
                raise SystemExit(f"error: variant {name!r}: the only search is faiss-hnsw")
            approximate = FaissFullBank(**{k: v for k, v in search.items() if k != "search"})
            K.full_bank_scores = approximate
        t0 = time.perf_counter()
        try:
            for start in range(0, len(new), args.batch):
                batch = new[start:start + args.batch]
                ids = bank.query_ids([image_key(img) for img in data.images[batch]])
                result = score_with_bank(bank, features.take(batch), ids, host=host)
                maps.append(K.to_numpy(result.maps).astype(np.float32))
                scores.append(K.to_numpy(result.scores).astype(np.float32))
        finally:
            K.full_bank_scores = exact
        score_s = (time.perf_counter() - t0) / len(new)
        work = knn_work(bank, length, channels)
        if approximate is not None:  # the full bank's part is what the index computed, not a brute-force count
            work += approximate.flop / len(new) - knn_work(bank, length, channels, normal=False, projection=False)
        maps, scores = np.concatenate(maps), np.concatenate(scores)
        masks = None if data.masks is None else data.masks[new]
        metrics = lot_metrics(labels[new], masks, scores, maps)
        row = rows.setdefault(name, {"settings": settings, "splits": []})
        row["splits"].append({
            "split": split, "lot": lot.tolist(), "bank_bytes": int(bank.nbytes),
            "full_bank_bytes": int(sum(v.nbytes for v in [*bank.full.values(), *bank.full_scale.values()])),
            "flop_per_new_image": work, "build_s": build_s,
            "seconds_per_new_image": score_s, **{k: metrics.get(k) for k in METRICS}})
        write_atomic(out / "frontier.json", json.dumps({
            "set": category.name, "data": str(args.data), "encoder": backbone.fingerprint, "image_size": list(size),
            "patches": length, "channels": channels, "taps": n_taps, "lot_size": args.lot_size,
            "defect_rate": args.defect_rate, "seed": args.seed, "variants": rows}, indent=1))
    print(f"wrote {out / 'frontier.json'}", file=sys.stderr)
    return 0


def summarise(data: dict) -> dict:
    """Per variant: the means over splits, and the ratios and differences to the first variant (paired)."""
    variants = data["variants"]
    base_name = next(iter(variants))
    base = variants[base_name]["splits"]
    out = {}
    for name, row in variants.items():
        splits = row["splits"]
        pairs = [(s, b) for s in splits for b in base if b["split"] == s["split"]]
        mean = {k: float(np.mean([s[k] for s in splits])) for k in
                ("bank_bytes", "flop_per_new_image", "seconds_per_new_image", "build_s", *METRICS)}
        mean["smaller"] = float(np.mean([b["bank_bytes"] / s["bank_bytes"] for s, b in pairs]))
        mean["cheaper"] = float(np.mean([b["flop_per_new_image"] / s["flop_per_new_image"] for s, b in pairs]))
        mean["faster"] = float(np.mean([b["seconds_per_new_image"] / s["seconds_per_new_image"] for s, b in pairs]))
        for k in METRICS:
            mean[f"delta_{k}"] = float(np.mean([s[k] - b[k] for s, b in pairs]))
        out[name] = {"settings": row["settings"], **mean}
    return out


def within_loss(row: dict, max_loss: float) -> bool:
    return row["delta_image_auroc"] >= -max_loss and row["delta_pro"] >= -max_loss


def choose(summary: dict, smaller: float, cheaper: float, max_loss: float) -> str | None:
    """Among the variants small and cheap enough, those within ``max_loss`` of the first on image AUROC and PRO;
    the best mean of the two. When none is within the loss, the least bad of the small and cheap ones, which the
    report says loses more than the limit (``within_loss``). None when no variant is small and cheap enough."""
    fast = [n for n, s in summary.items() if s["smaller"] >= smaller and s["cheaper"] >= cheaper]
    if not fast:
        return None
    kept = [n for n in fast if within_loss(summary[n], max_loss)]
    pool = kept or fast
    return max(pool, key=lambda n: summary[n]["image_auroc"] + summary[n]["pro"])


def table(name: str, data: dict, summary: dict, mark: str | None, max_loss: float | None = None) -> str:
    lines = [f"{name}: lots of {data['lot_size']} ({data['defect_rate']:.0%} defective), {data['patches']} patches x "
             f"{data['channels']} channels x {data['taps']} taps, image {data['image_size'][0]}x{data['image_size'][1]}",
             "", "| variant | bank MB | x smaller | GFLOP / new image | x less work | ms / new image (this CPU) | "
             "x faster | I-AUROC | P-AUROC | PRO |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, s in summary.items():
        star = "" if variant != mark else " **(chosen)**" if max_loss is None or within_loss(s, max_loss) else \
            f" **(chosen: loses more than {100 * max_loss:.0f} point(s) here, as every small and cheap one does)**"
        deltas = {k: "" if variant == next(iter(summary)) else f" ({100 * s[f'delta_{k}']:+.1f})" for k in METRICS}
        lines.append(
            f"| {variant}{star} | {s['bank_bytes'] / 1e6:.1f} | {s['smaller']:.1f} | {s['flop_per_new_image'] / 1e9:.2f} | "
            f"{s['cheaper']:.1f} | {1000 * s['seconds_per_new_image']:.0f} | {s['faster']:.1f} | "
            + " | ".join(f"{100 * s[k]:.1f}{deltas[k]}" for k in METRICS) + " |")
    return "\n".join(lines)


def report(args) -> int:
    sets = {}
    for spec in (args.tune, args.report):
        name, sep, folder = spec.partition("=")
        path = Path(folder) / "frontier.json"
        if not sep or not path.is_file():
            raise SystemExit(f"error: {spec!r}: want NAME=FOLDER with FOLDER/frontier.json (run collect first)")
        data = json.loads(path.read_text())
        sets[name] = (data, summarise(data))
    names = list(sets)
    if list(sets[names[0]][1]) != list(sets[names[1]][1]):
        raise SystemExit("error: both sets need the same variants in the same order")
    chosen = {}
    for a, b in ((names[0], names[1]), (names[1], names[0])):
        pick = choose(sets[a][1], args.smaller, args.cheaper, args.max_loss)
        chosen[f"{a} -> {b}"] = pick
        print(f"\nchosen on {a}: {pick or 'nothing is small and cheap enough'}"
              + (f" {json.dumps(sets[a][1][pick]['settings'])}; reported on {b}" if pick else "")
              + (f" (none small and cheap enough is within {100 * args.max_loss:.0f} point(s): the least bad)"
                 if pick and not within_loss(sets[a][1][pick], args.max_loss) else ""))
    for name, (data, summary) in sets.items():
        print()
        print(table(name, data, summary, chosen[f"{names[0]} -> {names[1]}"], args.max_loss))
    if args.json:
        write_atomic(Path(args.json), json.dumps({"chosen": chosen, "sets": {n: s for n, (_, s) in sets.items()}},
                                                 indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bank_frontier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="build and score banks of every variant on one set (writes OUT/frontier.json)")
    c.add_argument("--data", required=True, help="one category in the MVTec layout (test/<type>, train/good)")
    c.add_argument("--out", required=True)
    c.add_argument("--repository", default="model_repository", help="the exported model repository")
    c.add_argument("--variant", action="append", default=[], metavar="NAME=KEY:VALUE,...",
                   help="a bank to measure (repeat; the first is the one the others are compared with); default: "
                   + "; ".join(VARIANTS).replace("%", "%%"))  # argparse formats help with %
    c.add_argument("--lot-size", type=int, default=36, help="images in the start-of-shift lot the bank is built on")
    c.add_argument("--defect-rate", type=float, default=0.05, help="share of defective images in that lot")
    c.add_argument("--splits", type=int, default=3, help="lots drawn per variant (the same for every variant)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch", type=int, default=8, help="new images scored at a time")
    r = sub.add_parser("report", help="tables, and the choice on one set reported on the other")
    r.add_argument("--tune", required=True, metavar="NAME=FOLDER")
    r.add_argument("--report", required=True, metavar="NAME=FOLDER")
    r.add_argument("--smaller", type=float, default=10.0, help="how many times smaller a bank must be")
    r.add_argument("--cheaper", type=float, default=10.0, help="how many times less kNN work per new image")
    r.add_argument("--max-loss", type=float, default=0.01, help="image AUROC and PRO a choice may lose (fraction)")
    r.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.command == "collect":
        if args.lot_size < 3 or args.splits < 1 or args.batch < 1 or not 0 <= args.defect_rate < 1:
            p.error("--lot-size at least 3, --splits and --batch at least 1, --defect-rate in [0, 1)")
        try:
            for v in args.variant:
                parse_variant(v)
        except ValueError as err:
            p.error(str(err))
        return collect(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
