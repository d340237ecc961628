"""Which automatic threshold to trust: every method of ``postprocess.decision`` on the lots that
``python -m benchmarks.evaluate --defect-rate R`` scored (their scores are kept in results.json), chosen on one set
and reported on the other, both directions.

    python -m benchmarks.decisions --tune tile=out/rates/tile --report screw=out/rates/screw [--budget 0.01]

Each set is a folder of evaluate runs (``*/results.json``, one per defect rate). Per method and defect rate: the
false-alarm rate on good parts (against the budget), the recall on defective parts, F1 at the automatic threshold
and F1max (the best any threshold gives on that lot: the oracle), averaged over the lots. The rule that chooses:
among the methods whose false-alarm rate stays within 2x the budget at every defect rate of the tuning set, the one
that tolerates the most defective parts in a lot (``decision.BREAKDOWN``: a line's lot can be worse than usual),
then the highest mean F1-auto / F1max; if none stays within, the lowest worst false-alarm rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.metrics import decision_metrics, f1_max
from postprocess.decision import BREAKDOWN, METHODS, calibrate


def load_runs(folder: str) -> dict:
    """{defect rate label: [(labels, scores, normal_indices), ...]} from the evaluate runs under ``folder``."""
    runs = []
    for path in sorted(Path(folder).glob("*/results.json")):
        result = json.loads(path.read_text())
        rate = result.get("defect_rate")
        lots = []
        for category in result["details"][result["mode"]].values():
            labels = np.asarray(category["labels"])
            for lot in category["lots"]:
                lots.append((labels[lot["indices"]], np.asarray(lot["scores"]), lot["normal_indices"]))
        runs.append((rate, lots))
    if not runs:
        raise SystemExit(f"error: no */results.json under {folder} (run benchmarks.evaluate --defect-rate first)")
    runs.sort(key=lambda run: (run[0] is None, run[0] or 0.0))  # by defect rate, the whole set last
    return {("whole set" if rate is None else f"{rate:.0%}"): lots for rate, lots in runs}


def measure(runs: dict, method: str, budget: float) -> dict:
    rows = {}
    for rate, lots in runs.items():
        per_lot = []
        for labels, scores, normal in lots:
            cal = calibrate(scores, normal, budget, method)
            m = decision_metrics(labels, scores > cal.threshold)
            m["f1_max"] = f1_max(labels, scores)
            per_lot.append(m)
        rows[rate] = {k: float(np.mean([m[k] for m in per_lot if m[k] is not None])) for k in per_lot[0]}
        rows[rate]["lots"] = len(lots)
    return rows


def choose(results: dict, budget: float) -> str:
    within = [m for m, rows in results.items() if all(r["false_alarm_rate"] <= 2 * budget for r in rows.values())]
    if within:
        return max(within, key=lambda m: (BREAKDOWN[m], np.mean([r["f1_auto"] / r["f1_max"]
                                                                 for r in results[m].values() if r["f1_max"] > 0])))
    return min(results, key=lambda m: max(r["false_alarm_rate"] for r in results[m].values()))


def table(name: str, results: dict, budget: float) -> str:
    lines = [f"\n{name} (false-alarm budget {budget:.1%})",
             "| method | defect rate | lots | false alarms on good | recall | F1 auto | F1max | F1 auto / F1max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, rows in results.items():
        for rate, r in rows.items():
            ratio = r["f1_auto"] / r["f1_max"] if r["f1_max"] > 0 else float("nan")
            lines.append(f"| {method} | {rate} | {r['lots']} | {r['false_alarm_rate']:.1%} | {r['recall']:.1%} | "
                         f"{r['f1_auto']:.3f} | {r['f1_max']:.3f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decisions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tune", required=True, metavar="NAME=FOLDER")
    p.add_argument("--report", required=True, metavar="NAME=FOLDER")
    p.add_argument("--budget", type=float, default=0.01, help="the false-alarm rate asked for")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sets = {}
    for spec in (args.tune, args.report):
        name, _, folder = spec.partition("=")
        sets[name] = {m: measure(load_runs(folder), m, args.budget) for m in METHODS}
    (tune, tune_results), (report, report_results) = sets.items()
    out = {}
    for a, b in ((tune, report), (report, tune)):
        chosen = choose(sets[a], args.budget)
        out[f"{a} -> {b}"] = {"chosen": chosen, "reported": sets[b][chosen]}
    for name, results in sets.items():
        print(table(name, results, args.budget))
    print()
    for direction, d in out.items():
        worst = max(r["false_alarm_rate"] for r in d["reported"].values())
        print(f"chosen on {direction.split(' -> ')[0]}: {d['chosen']}; on {direction.split(' -> ')[1]}: worst false-alarm "
              f"rate {worst:.1%} (budget {args.budget:.1%}), F1 auto / F1max "
              + ", ".join(f"{rate} {r['f1_auto'] / r['f1_max']:.2f}" for rate, r in d["reported"].items()
                          if r["f1_max"] > 0))
    if args.json:
        Path(args.json).write_text(json.dumps({"sets": sets, "directions": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
