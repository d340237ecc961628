"""benchmarks/bank_frontier.py: banks of several kinds built on the same lots and scored on the same new parts, their
size and work counted from what they hold, and the choice on one set reported on the other."""

import json

import numpy as np
import pytest

from benchmarks import bank_frontier as frontier
from conftest import FULL_BANK_VARIANT, make_mvtec_tree
from postprocess.config import FULL_BANK

VARIANTS = [f"today={FULL_BANK_VARIANT}", f"quarter={FULL_BANK_VARIANT},full_coreset_ratio:0.25,bank_dim:C/4",
            "int8=bank_dim_divisor:1,full_bank_storage:int8,full_bank_neighbours:0",
            f"tap={FULL_BANK_VARIANT},layers:[-1]",
            f"hnsw={FULL_BANK_VARIANT},search:faiss-hnsw,candidates:600,ef_search:600",
            "neighbours=bank_dim_divisor:1,full_bank_storage:float16,full_bank_neighbours:2"]


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
    assert list(data["variants"]) == ["today", "quarter", "int8", "tap", "hnsw", "neighbours"]
    channels, taps = data["channels"], data["taps"]
    quarter = data["variants"]["quarter"]
    assert quarter["settings"] == {**FULL_BANK, "full_coreset_ratio": 0.25, "bank_dim": channels // 4}
    assert data["variants"]["tap"]["settings"] == {**FULL_BANK, "layers": [taps - 1]}
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
        # 2 of the lot's 8 images read per new image (and its mean against all 8): the full bank's work falls to
        # about a quarter, the bank stays whole
        neighbours = v["neighbours"]["splits"][i]
        assert neighbours["full_bank_bytes"] == today["full_bank_bytes"]
        assert today["flop_per_new_image"] / 4 < neighbours["flop_per_new_image"] < today["flop_per_new_image"] / 2


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


def test_faiss_with_every_entry_a_candidate_is_the_exact_search(collected):
    """HNSW asked for as many candidates as a tiny bank holds finds every nearest entry: the same scores as the
    brute-force kernel, and its own count of distance computations as the work."""
    _, data = collected
    for exact, approximate in zip(data["variants"]["today"]["splits"], data["variants"]["hnsw"]["splits"]):
        for key in ("image_auroc", "pixel_auroc", "pro"):
            assert approximate[key] == pytest.approx(exact[key], abs=1e-6)
        assert approximate["flop_per_new_image"] != exact["flop_per_new_image"]


def test_a_faiss_search_stands_in_for_the_full_bank_kernel():
    from postprocess import kernels as K

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((3, 20, 16)).astype(np.float32)
    bank = rng.standard_normal((7, 30, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
    bank /= np.linalg.norm(bank, axis=-1, keepdims=True)
    ids, bank_ids = np.array([0, -1, 5]), np.arange(7)
    exact = K.full_bank_scores(queries, bank, ids, bank_ids, 3, 1 << 20)
    search = frontier.FaissFullBank(hnsw_m=16, ef_search=400, candidates=7 * 30)
    np.testing.assert_allclose(search(queries, bank, ids, bank_ids, 3, 0), exact, atol=1e-6)
    assert search.flop > 0
    # few candidates: the images not reached stand in at the last candidate's distance, never above the truth
    few = frontier.FaissFullBank(hnsw_m=16, ef_search=400, candidates=2)(queries, bank, ids, bank_ids, 3, 0)
    assert np.all(few <= exact + 1e-6) and not np.allclose(few, exact)
    # int8 entries are searched as what they stand for
    q8, scale = K.quantize_rows(bank)
    got = frontier.FaissFullBank(candidates=210, ef_search=400)(queries, q8, ids, bank_ids, 3, 0, bank_scale=scale)
    np.testing.assert_allclose(got, K.full_bank_scores(queries, q8, ids, bank_ids, 3, 1 << 20, bank_scale=scale),
                               atol=1e-5)


def test_the_rule_keeps_accuracy_first():
    base = {"smaller": 1, "cheaper": 1, "image_auroc": 0.9, "pro": 0.8, "delta_image_auroc": 0, "delta_pro": 0}
    summary = {"today": base,
               "tiny": {**base, "smaller": 30, "cheaper": 30, "image_auroc": 0.85, "delta_image_auroc": -0.05},
               "small": {**base, "smaller": 12, "cheaper": 11, "image_auroc": 0.895, "delta_image_auroc": -0.005},
               "slow": {**base, "smaller": 12, "cheaper": 5, "image_auroc": 0.95, "delta_image_auroc": 0.05}}
    assert frontier.choose(summary, 10, 10, 0.01) == "small"  # tiny loses too much, slow is not cheap enough
    assert frontier.choose({k: summary[k] for k in ("today", "tiny")}, 10, 10, 0.01) == "tiny"  # the least bad,
    # which the report says loses more than the limit (it was marked "(chosen)" like a pick within it)
    assert not frontier.within_loss(summary["tiny"], 0.01) and frontier.within_loss(summary["small"], 0.01)
    assert frontier.choose(summary, 50, 10, 0.01) is None
    assert frontier.resolve({"bank_dim": "C/8", "layers": [-1, 0]}, 1024, 4) == {"bank_dim": 128, "layers": [0, 3]}
    with pytest.raises(ValueError):
        frontier.parse_variant("no-equals")
    assert np.isclose(frontier.parse_variant("a=full_coreset_ratio:0.5")[1]["full_coreset_ratio"], 0.5)
