"""benchmarks/line.py: a shift built and scored through a real server, the same shift in one process, and the
report that chooses on one set and reports on the other. The rules it chooses by, which need no server, are in
test_line_rules.py."""

import json

import numpy as np
import pytest

from benchmarks import line
from conftest import make_mvtec_tree
from postprocess.decision import DEFAULT_METHOD

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def shifts(repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("line")
    data = make_mvtec_tree(root / "data", n_good=12, n_bad=6, size=112) / "widget"
    out = {}
    for mode in ("server", "in-process", "server-k2", "in-process-k2"):
        args = ["collect", "--data", str(data), "--out", str(root / mode), "--repository", str(repository),
                "--lot-size", "9", "--defect-rates", "0.1", "--splits", "2", "--batch", "4"]
        args += ["--in-process"] if mode.startswith("in-process") else []
        args += ["--set", "interval_fraction=0.3", "--set", "rescore_k=3"] if mode.endswith("k2") else []
        assert line.main(args) == 0
        out[mode] = json.loads((root / mode / "line.json").read_text())
    return root, out


def test_a_shift_scores_the_lot_and_the_new_parts_through_the_server(shifts):
    _, out = shifts
    served = out["server"]
    assert served["mode"] == "server" and len(served["splits"]) == 2
    labels = np.asarray(served["labels"])
    for record in served["splits"]:
        lot, new = record["lot"]["indices"], record["new"]["indices"]
        assert len(lot) == 9 and labels[lot].sum() == 1  # round(0.1 * 9) = 1 defective in the lot
        assert sorted(lot + new) == list(range(len(labels)))  # every other image comes as a new part
        assert record["decision"]["method"] == DEFAULT_METHOD and len(record["decision"]["reference"]) >= 2
        for part in ("lot", "new"):
            stats = record[part]
            assert len(stats["score"]) == len(stats["max"]) == len(stats["indices"])
            # the server's image score is the map's maximum moved toward its look-alikes: never far from it
            assert np.all(np.asarray(stats["max"]) >= np.asarray(stats["mean"]))
            peaks = np.asarray(stats["peaks"], dtype=np.float64)  # the map's highest peak is its maximum
            assert peaks.shape == (len(stats["indices"]), line.PEAKS_KEPT)
            assert np.allclose(peaks[:, 0], stats["max"], atol=1e-6)


@pytest.mark.parametrize("settings", ["", "-k2"])
def test_the_server_and_the_process_give_the_same_shift(shifts, settings):
    """The same lots (fixed seed), the same maths and settings: scores within the bank's float16 storage."""
    _, out = shifts
    for a, b in zip(out["server" + settings]["splits"], out["in-process" + settings]["splits"]):
        assert a["lot"]["indices"] == b["lot"]["indices"]
        for part in ("lot", "new"):
            assert np.allclose(a[part]["score"], b[part]["score"], atol=2e-3), part
            assert np.allclose(a[part]["max"], b[part]["max"], atol=2e-3), part


def test_settings_reach_the_bank_and_change_the_scores(shifts):
    """--set builds every bank with that setting (MuSc's interval, k 2 of 8, and re-scoring), on the server as in
    process; the defaults (k 1, no re-scoring) without it."""
    _, out = shifts
    for mode in ("server-k2", "in-process-k2"):
        assert out[mode]["options"] == {"interval_fraction": 0.3, "rescore_k": 3}
        for record in out[mode]["splits"]:
            assert record["interval_k"] == 2 and record["config"]["rescore_k"] == 3
    for mode in ("server", "in-process"):
        assert out[mode]["options"] == {}
        for record in out[mode]["splits"]:
            assert record["interval_k"] == 1 and record["config"]["rescore_k"] == 0
            # without re-scoring the score is the map's maximum itself (the map as sent: float16)
            assert np.allclose(record["new"]["score"], record["new"]["max"], rtol=2e-3, atol=1e-6)
    assert not np.allclose(out["server"]["splits"][0]["new"]["max"], out["server-k2"]["splits"][0]["new"]["max"])


def test_the_report_chooses_on_one_set_and_reports_on_the_other(shifts, capsys):
    root, _ = shifts
    assert line.main(["report", "--tune", f"A={root / 'server'}", "--report", f"B={root / 'in-process'}",
                      "--json", str(root / "report.json")]) == 0
    text = capsys.readouterr().out
    assert "chosen on A:" in text and "chosen on B:" in text and "| B (reported) |" in text
    saved = json.loads((root / "report.json").read_text())
    assert set(saved["directions"]) == {"A -> B", "B -> A"}
    row = saved["sets"]["A"]["score/lot_quantile"]["0.05"]["0.1"]
    assert row["new_good"] == 2 * (12 - 8) and row["new_bad"] == 2 * (6 - 1)


def test_the_report_compares_settings_side_by_side(shifts, capsys):
    """Several collects per set: each one's image scores are candidates, named by their settings; the first
    folder's are the shipped ones."""
    root, _ = shifts
    assert line.main(["report", "--tune", f"A={root / 'server'},{root / 'server-k2'}",
                      "--report", f"B={root / 'in-process'},{root / 'in-process-k2'}",
                      "--json", str(root / "report2.json")]) == 0
    text = capsys.readouterr().out
    assert "interval_fraction=0.3,rescore_k=3/max " in text and "gain over score," in text
    saved = json.loads((root / "report2.json").read_text())
    assert "interval_fraction=0.3,rescore_k=3/score/trimmed_tail" in saved["sets"]["B"]
    assert "score/trimmed_tail" in saved["sets"]["B"]
    with pytest.raises(SystemExit, match="same settings"):  # the two sets must hold the same settings
        line.main(["report", "--tune", f"A={root / 'server'},{root / 'server-k2'}", "--report",
                   f"B={root / 'in-process'}"])
    with pytest.raises(SystemExit, match="same settings"):  # and no settings twice
        line.main(["report", "--tune", f"A={root / 'server'},{root / 'in-process'}", "--report", f"B={root / 'server'}"])


def test_the_grown_subcommand_prints_each_budget_and_lot_rate(shifts, capsys):
    root, _ = shifts
    assert line.main(["grown", f"A={root / 'server'}", "--line-rate", "0.1", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "the stream 10.0% defective, 2 parts a batch" in text
    assert text.count("| 1% | 10% |") == text.count("| 5% | 10% |") == 1, text  # the collect's one rate


def test_the_tails_subcommand_measures_each_estimator(shifts, capsys):
    root, _ = shifts
    assert line.main(["tails", f"A={root / 'server'}", f"B={root / 'in-process'}"]) == 0
    text = capsys.readouterr().out
    for label in line.TAIL_ESTIMATORS:
        assert text.count(f"| {label} |") == 2, label
