"""benchmarks/bank_frontier.py: banks of several kinds built on the same lots and scored on the same new parts, their
size and work counted from what they hold, and the choice on one set reported on the other."""

import json

import numpy as np
import pytest

from benchmarks import bank_frontier as frontier
from conftest import make_mvtec_tree

VARIANTS = ["today=", "quarter=full_coreset_ratio:0.25,bank_dim:C/4", "int8=full_bank_storage:int8",
            "tap=layers:[-1]"]


@pytest.fixture(scope="module")
def collected(repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    data = make_mvtec_tree(root / "data", n_good=14, n_bad=6, size=112) / "widget"
    args = ["collect", "--data", str(data), "--out", str(root / "out"), "--repository", str(repository),
            "--lot-size", "8", "--defect-rate", "0.1", "--splits", "2", "--batch", "4"]
    for v in VARIANTS:
        args += ["--variant", v]
    assert frontier.main(args) == 0
    return root, json.loads((root / "out" / "frontier.json").read_text())


def test_each_variant_is_built_on_the_same_lots_and_measured(collected):
    _, data = collected
    assert list(data["variants"]) == ["today", "quarter", "int8", "tap"]
    channels, taps = data["channels"], data["taps"]
    quarter = data["variants"]["quarter"]
    assert quarter["settings"] == {"full_coreset_ratio": 0.25, "bank_dim": channels // 4}
    assert data["variants"]["tap"]["settings"] == {"layers": [taps - 1]}
    lots = {name: [s["lot"] for s in v["splits"]] for name, v in data["variants"].items()}
    assert all(lot == lots["today"] for lot in lots.values()) and lots["today"][0] != lots["today"][1]
    for v in data["variants"].values():
        for s in v["splits"]:
            assert s["seconds_per_new_image"] > 0 and 0 <= s["image_auroc"] <= 1 and 0 <= s["pro"] <= 1


def test_work_and_size_follow_what_the_bank_holds(collected):
    """A quarter of the channels and a quarter of the entries: about a sixteenth of the full bank's work and
    bytes; int8 halves the full bank's bytes and leaves its work; one of the taps, that share of both."""
    _, data = collected
    v = data["variants"]
    for i in range(2):
        today, quarter, int8, tap = (v[n]["splits"][i] for n in ("today", "quarter", "int8", "tap"))
        assert quarter["full_bank_bytes"] < today["full_bank_bytes"] / 12
        assert quarter["flop_per_new_image"] < today["flop_per_new_image"] / 8
        assert int8["full_bank_bytes"] == pytest.approx(today["full_bank_bytes"] / 2, rel=0.15)
        assert int8["flop_per_new_image"] == today["flop_per_new_image"]
        assert tap["flop_per_new_image"] == pytest.approx(today["flop_per_new_image"] / data["taps"], rel=1e-9)


def test_the_report_chooses_among_the_small_and_cheap_ones(collected, capsys):
    root, _ = collected
    out = root / "out"
    assert frontier.main(["report", "--tune", f"A={out}", "--report", f"B={out}", "--smaller", "6",
                          "--cheaper", "6", "--max-loss", "1", "--json", str(root / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "chosen on A: quarter" in text and "| quarter **(chosen)** |" in text
    saved = json.loads((root / "r.json").read_text())
    assert saved["chosen"] == {"A -> B": "quarter", "B -> A": "quarter"}
    assert saved["sets"]["A"]["today"]["smaller"] == 1.0
    # (a lot of 8 tiny images: the bases a projection keeps weigh as much as the entries it saves, hence 6 not 16)
    # nothing 100x smaller: said so, no choice
    assert frontier.main(["report", "--tune", f"A={out}", "--report", f"B={out}", "--smaller", "100"]) == 0
    assert "nothing is small and cheap enough" in capsys.readouterr().out


def test_the_rule_keeps_accuracy_first():
    base = {"smaller": 1, "cheaper": 1, "image_auroc": 0.9, "pro": 0.8, "delta_image_auroc": 0, "delta_pro": 0}
    summary = {"today": base,
               "tiny": {**base, "smaller": 30, "cheaper": 30, "image_auroc": 0.85, "delta_image_auroc": -0.05},
               "small": {**base, "smaller": 12, "cheaper": 11, "image_auroc": 0.895, "delta_image_auroc": -0.005},
               "slow": {**base, "smaller": 12, "cheaper": 5, "image_auroc": 0.95, "delta_image_auroc": 0.05}}
    assert frontier.choose(summary, 10, 10, 0.01) == "small"  # tiny loses too much, slow is not cheap enough
    assert frontier.choose({k: summary[k] for k in ("today", "tiny")}, 10, 10, 0.01) == "tiny"  # the least bad
    assert frontier.choose(summary, 50, 10, 0.01) is None
    assert frontier.resolve({"bank_dim": "C/8", "layers": [-1, 0]}, 1024, 4) == {"bank_dim": 128, "layers": [0, 3]}
    with pytest.raises(ValueError):
        frontier.parse_variant("no-equals")
    assert np.isclose(frontier.parse_variant("a=full_coreset_ratio:0.5")[1]["full_coreset_ratio"], 0.5)
