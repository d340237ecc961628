"""The honest protocol: choose settings on one data set, report them on another, in both directions.

    python -m benchmarks.protocol --sets magnetic_tile='RUNS_A/*/results.json' ball_screw='RUNS_B/*/results.json'

Each ``results.json`` is one ``python -m benchmarks.evaluate`` run (one input size and aspect, several rows from
--modes/--variant); a candidate is one row of one run, named ``<aspect>@<size>/<row>``, and must be present for both
sets. For each direction the candidate with the best selection score (default: the mean of image AUROC and PRO) on
the tuning set is chosen, and its figures on the other set are what we report, per defect type too. The reported
set's own best candidate is printed beside it, marked as an oracle: it shows what tuning on the reported set would
have bought, and is never a default.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

from benchmarks.evaluate import SHORT, TABLE_KEYS, format_table
from postprocess.atomic import write_atomic
from postprocess.contract import grid_for


def candidate_name(run: dict, row: str) -> str:
    size = run.get("image_size")
    size = "default" if not size else "x".join(str(v) for v in size)
    return f"{run.get('aspect', 'square')}@{size}/{row}"


def load_set(spec: str) -> tuple[str, dict]:
    """``NAME=GLOB`` -> (NAME, {candidate: {"mean": metrics, "defect_types": {...}, "details": {...}}})."""
    name, sep, pattern = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"a set is NAME=GLOB of results.json files, got {spec!r}")
    files = sorted(glob.glob(pattern))
    if not files:
        raise ValueError(f"set {name}: no results.json matches {pattern!r}; run python -m benchmarks.evaluate first")
    candidates = {}
    for path in files:
        run = json.loads(Path(path).read_text())
        primary = next(iter(run["details"][run["mode"]].values()), {}) if "mode" in run else {}
        for row, block in run["ablation"].items():
            per_type = {}
            for types in block.get("defect_types", {}).values():
                per_type.update(types)
            details = next(iter(run["details"][row].values()), {})
            # a row that reused the first row's stages (re-scoring variants) costs what that row cost
            seconds = [v for v in (details.get("score_seconds_per_image"), primary.get("score_seconds_per_image"))
                       if v is not None]
            size = details.get("input_size")
            patch = int(run.get("backbone", {}).get("patch_size", 14))
            candidates[candidate_name(run, row)] = {
                "mean": block["mean"], "defect_types": per_type, "source": path,
                "patches": None if not size else math.prod(grid_for(size, patch)),
                "seconds_per_image": max(seconds) if seconds else None,
                "bank_mb": details.get("bank_mb", primary.get("bank_mb")), "input_size": details.get("input_size"),
            }
    return name, candidates


def selection_score(metrics: dict, keys: list[str]) -> float:
    values = [metrics.get(k) for k in keys]
    if any(v is None for v in values):
        return float("-inf")
    return sum(values) / len(values)


def choose(candidates: dict, keys: list[str]) -> str:
    """The best candidate by the selection score; ties go to the name that sorts first (deterministic)."""
    return max(sorted(candidates), key=lambda c: selection_score(candidates[c]["mean"], keys))


def _at_most(value, limit) -> bool:
    return value is not None and value <= limit


def direction(tune: tuple[str, dict], report: tuple[str, dict], keys: list[str], baseline: str | None,
              max_seconds: float | None = None, max_patches: int | None = None) -> dict:
    (tune_name, tune_c), (report_name, report_c) = tune, report
    shared = sorted(set(tune_c) & set(report_c))
    if not shared:
        raise ValueError(f"no candidate was run on both {tune_name} and {report_name}")
    # a candidate whose cost was not recorded cannot be shown to fit a budget: out (it passed as if free)
    affordable = [c for c in shared
                  if (max_seconds is None or _at_most(tune_c[c]["seconds_per_image"], max_seconds))
                  and (max_patches is None or _at_most(tune_c[c]["patches"], max_patches))]
    if not affordable:
        raise ValueError(f"no candidate scores {tune_name} within the budget ({max_seconds} s per image, "
                         f"{max_patches} patches per image)")
    chosen = choose({c: tune_c[c] for c in affordable}, keys)
    oracle = choose({c: report_c[c] for c in shared}, keys)
    out = {"tuned_on": tune_name, "reported_on": report_name, "chosen": chosen, "selection": keys,
           "reported": report_c[chosen], "oracle": oracle, "oracle_metrics": report_c[oracle]["mean"],
           "candidates": len(affordable), "max_seconds_per_image": max_seconds, "max_patches": max_patches,
           "tuning_metrics": tune_c[chosen]["mean"]}
    if baseline and baseline in report_c:
        out["baseline"] = baseline
        out["baseline_metrics"] = report_c[baseline]["mean"]
    return out


def print_direction(d: dict) -> None:
    budget = "" if d["max_seconds_per_image"] is None else f" scoring within {d['max_seconds_per_image']} s/image"
    budget += "" if d.get("max_patches") is None else f" of at most {d['max_patches']} patches per image"
    print(f"\ntuned on {d['tuned_on']} ({d['candidates']} candidates{budget}, selection: mean of "
          f"{', '.join(SHORT[k] for k in d['selection'])}) -> {d['chosen']}")
    rows = {f"{d['reported_on']} (reported)": d["reported"]["mean"]}
    rows.update({f"  {t}": m for t, m in sorted(d["reported"]["defect_types"].items())})
    if "baseline" in d:
        rows[f"old default {d['baseline']}"] = d["baseline_metrics"]
    rows[f"oracle {d['oracle']}"] = d["oracle_metrics"]
    print(format_table(f"on {d['reported_on']}", rows, TABLE_KEYS))


def candidate_table(sets: list[tuple[str, dict]], only: str | None = None) -> str:
    """Every candidate run on every set, as a Markdown table: accuracy, scoring time and bank size (the resolution
    table of the README; ``only``: candidates whose row is this one, e.g. pad_mpam)."""
    def order(name: str):  # by row, then aspect, then size: "native@336/rs20" -> ("rs20", "native", 336)
        setting, row = name.split("/", 1)
        aspect, size = setting.split("@")
        return row, aspect, int(size.split("x")[0]) if size[0].isdigit() else 0

    names = sorted({c for _, cands in sets for c in cands if only is None or c.endswith("/" + only)}, key=order)
    lines = ["| candidate | set | input HxW | patches | I-AUROC | P-AUROC | P-AP | PRO | scoring s/image | bank MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        for set_name, cands in sets:
            if name not in cands:
                continue
            c = cands[name]
            m = c["mean"]

            def pct(key):
                return "-" if m.get(key) is None else f"{100 * m[key]:.1f}"

            size = "x".join(str(v) for v in c["input_size"]) if c.get("input_size") else "-"
            secs = "-" if c.get("seconds_per_image") is None else f"{c['seconds_per_image']:.3f}"
            bank = "-" if c.get("bank_mb") is None else f"{c['bank_mb']:.0f}"
            lines.append(f"| {name} | {set_name} | {size} | {c.get('patches') or '-'} | {pct('image_auroc')} | "
                         f"{pct('pixel_auroc')} | "
                         f"{pct('pixel_ap')} | {pct('pro')} | {secs} | {bank} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs=2, required=True, metavar="NAME=GLOB",
                   help="the two data sets' evaluate results; each direction tunes on one and reports the other")
    p.add_argument("--select", nargs="+", default=["image_auroc", "pro"], choices=list(SHORT),
                   help="metrics whose mean picks the candidate on the tuning set")
    p.add_argument("--baseline", default="square@224/pad_mpam",
                   help="candidate shown as the old default beside the reported figures")
    p.add_argument("--max-seconds-per-image", type=float, default=None,
                   help="only candidates whose scoring time per image on the tuning set is within this (as measured "
                   "by evaluate on the machine that ran it; a row that reused another's stages counts that row's)")
    p.add_argument("--max-patches", type=int, default=None,
                   help="only candidates whose lots (on the tuning set) have at most this many patches per image: "
                   "the scoring cost grows with its square, and unlike a time it does not depend on the machine")
    p.add_argument("--json", default=None, help="also write both directions here")
    p.add_argument("--table", nargs="?", const="", default=None, metavar="ROW",
                   help="also print every candidate on both sets as a Markdown table (only those of ROW if given)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        a, b = (load_set(spec) for spec in args.sets)
        budget = (args.max_seconds_per_image, args.max_patches)
        directions = [direction(a, b, args.select, args.baseline, *budget),
                      direction(b, a, args.select, args.baseline, *budget)]
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for d in directions:
        print_direction(d)
    if args.table is not None:
        print()
        print(candidate_table([a, b], args.table or None))
    if args.json:
        write_atomic(Path(args.json), json.dumps(directions, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
