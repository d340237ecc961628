"""Online scoring speed on this machine: new images per second against banks of 24, 100 and 200 lot images, the full
bank (as before issue 26) beside the default one, each with float32 and bfloat16 products, in one run (a variant
named as ``AS_BEFORE`` builds and scores the default bank as before: entries made twice, descriptors read per
request).

    python -m benchmarks.online_speed --data ../shared/data/magnetic_tile [--sizes 24 100 200] [--new 32]

Each bank is built in this process on a lot of the set's real images (repeated with a little noise past the set's
size, as ``benchmarks.lot_scaling`` makes them), once per setting; then ``--new`` images of the set are scored
against it as new parts, 8 at a time: the scoring alone (features in, maps and scores out: what the ``pa_clip_score``
model does) and end to end with the encoder (the exported ONNX model, in this process). The settings take turns,
``--repeats`` times, and the median is kept, so that both meet the same machine load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bank_frontier import parse_variant, resolve, split_host
from benchmarks.lot_scaling import _backbone, _lot, repeated
from postprocess.atomic import write_atomic
from postprocess.config import FULL_BANK

# The full bank (every patch, every channel, every lot image read, float16: the default before issue 26) and the
# default since (the frontier's choice: pca C/8 + int8 + 8 neighbours, README "Bank size and the cost of a new
# image"), each with the kNN's products in bfloat16 (the host setting cpu_matmul: torch/oneDNN on this CPU instead
# of NumPy's float32 BLAS).
VARIANTS = {
    "full bank": FULL_BANK,
    "full bank, bfloat16 products": {**FULL_BANK, "cpu_matmul": "bfloat16"},
    "default": {},  # pca C/8 + int8 + 8 neighbours since issue 26
    "default, bfloat16 products": {"cpu_matmul": "bfloat16"},
}
# a variant of this name is the default bank as it was built and scored before the lot stage's entries were stored
# as made (``LotState.full_entries``: the build made them a second time) and before the bank kept its images'
# descriptors (``Bank.full_descriptors``: every request read them from all of its entries again)
AS_BEFORE = "default, as before (entries made twice, descriptors read per request)"
VARIANTS[AS_BEFORE] = {}
BATCH = 8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.online_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="one category in the MVTec layout")
    p.add_argument("--repository", default="model_repository", help="the exported model repository")
    p.add_argument("--sizes", type=int, nargs="+", default=[24, 100, 200], help="lot images each bank is built on")
    p.add_argument("--new", type=int, default=32, help="new images scored per measurement (a multiple of 8)")
    p.add_argument("--repeats", type=int, default=3, help="turns each setting takes (the median is kept)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY:VALUE,...",
                   help="bank settings to compare (the first is the baseline); default: "
                   + "; ".join(VARIANTS).replace("%", "%%"))  # argparse formats help with %
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if min(args.sizes) < 3 or args.new < BATCH or args.new % BATCH or args.repeats < 1:
        p.error(f"--sizes at least 3, --new a positive multiple of {BATCH}, --repeats at least 1")
    try:
        variants = dict(parse_variant(v) for v in args.variant) if args.variant else dict(VARIANTS)
    except ValueError as err:
        p.error(str(err))

    from postprocess.bank import build_bank, score_with_bank
    from postprocess.pipeline import LotScorer, encode_images
    from postprocess.serving import build_config

    backbone = _backbone(args.repository)
    category, data = _lot(args.data, backbone)
    features = encode_images(backbone, data.images, BATCH, desc="encode the set")
    _, n_taps, _, channels = features.layer_tokens.shape
    try:
        variants = {name: resolve(settings, channels, n_taps) for name, settings in variants.items()}
    except ValueError as err:
        p.error(str(err))
    new_index = np.arange(args.new) % len(data.images)
    new_images, new_features = data.images[new_index], features.take(new_index)
    ids = np.full(BATCH, -1)
    rows = []
    for n in args.sizes:
        lot_features, lot_images = repeated(features, data.images, n)
        banks, hosts, build_s = {}, {}, {}
        for name, settings in variants.items():
            hosts[name], rest = split_host(settings)
            cfg = build_config(rest)
            scorer = LotScorer(backbone, lot_images, category.name, progress=False, features=lot_features,
                               host=hosts[name])
            t0 = time.perf_counter()
            if name == AS_BEFORE:  # the build makes the full bank's entries again, as it did
                scorer.state(cfg).full_entries.clear()
            banks[name] = build_bank(scorer, cfg, "online", backbone.fingerprint)[0]
            build_s[name] = time.perf_counter() - t0
        times = {name: {"score": [], "end_to_end": []} for name in variants}
        for _ in range(args.repeats):
            for name, bank in banks.items():
                def score(feats):
                    if name == AS_BEFORE:
                        bank._descriptors.clear()  # read again from every entry, as each request did before
                    score_with_bank(bank, feats, ids, host=hosts[name])

                t0 = time.perf_counter()
                for start in range(0, args.new, BATCH):
                    score(new_features.take(slice(start, start + BATCH)))
                times[name]["score"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for start in range(0, args.new, BATCH):
                    score(backbone.encode(new_images[start:start + BATCH]))
                times[name]["end_to_end"].append(time.perf_counter() - t0)
        for name, bank in banks.items():
            rows.append({"lot_size": n, "variant": name, "bank_mb": bank.nbytes / 1e6, "build_s": build_s[name],
                         "score_images_per_s": args.new / float(np.median(times[name]["score"])),
                         "end_to_end_images_per_s": args.new / float(np.median(times[name]["end_to_end"]))})
            print(json.dumps(rows[-1]), file=sys.stderr)
    base_name = next(iter(variants))
    print(f"\n{category.name}: {data.images.shape[1]}x{data.images.shape[2]}, {args.new} new images per turn, "
          f"median of {args.repeats}; this machine\n")
    print("| lot images | bank | bank MB | build s | scoring images/s | x | with the encoder images/s | x |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        base = next(r for r in rows if r["lot_size"] == row["lot_size"] and r["variant"] == base_name)
        print(f"| {row['lot_size']} | {row['variant']} | {row['bank_mb']:.1f} | {row['build_s']:.1f} | "
              f"{row['score_images_per_s']:.2f} | "
              f"{row['score_images_per_s'] / base['score_images_per_s']:.1f} | {row['end_to_end_images_per_s']:.2f} | "
              f"{row['end_to_end_images_per_s'] / base['end_to_end_images_per_s']:.1f} |")
    if args.json:
        write_atomic(Path(args.json), json.dumps({"set": category.name, "variants": variants, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
