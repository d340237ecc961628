"""client/infer.py pieces that need no server: the CSV, the decisions, the threshold's checks."""

import csv

import numpy as np
import pytest

from client.infer import add_decisions, calibration_of, parse_threshold, write_results
from postprocess.decision import DecisionError, calibrate


def test_decisions_come_from_the_bank_calibration(tmp_path):
    lot = np.r_[np.linspace(0.04, 0.06, 40), 0.2]
    info = {"decision": calibrate(lot).to_dict()}
    cal = calibration_of(info, None)
    rows = [{"path": "a.png", "score": 0.05}, {"path": "b.png", "score": 0.2},
            {"path": "c.png", "score": cal.threshold}, {"path": "d.png", "score": float("nan")}]
    add_decisions(rows, cal, None)
    path = write_results(tmp_path, rows)
    got = {r["path"]: (r["decision"], r["calibrated"]) for r in csv.DictReader(open(path))}
    # above the threshold is anomalous; at it (calibrated 0.5), normal; a score that is not a number is never normal
    assert got["a.png"][0] == "normal" and float(got["a.png"][1]) < 0.5
    assert got["b.png"][0] == "anomalous" and float(got["b.png"][1]) > 0.5
    assert got["c.png"] == ("normal", "0.5000")
    assert got["d.png"] == ("invalid", "")
    assert open(path).read().splitlines()[0] == "path,score,calibrated,decision,overlay"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # a stricter budget moves the threshold up: b stays anomalous, the calibrated score of a falls
    strict = calibration_of(info, 0.001)
    assert strict.threshold > cal.threshold and strict.calibrated(0.05) < cal.calibrated(0.05)
    # a user threshold on the calibrated scale
    add_decisions(rows, cal, 0.999)
    assert [r["decision"] for r in rows] == ["normal", "anomalous", "normal", "invalid"]
    add_decisions(rows, calibration_of({}, None), None)  # a bank from before calibrations
    assert {r["decision"] for r in rows} == {"unknown"}


@pytest.mark.parametrize("text", ["5", "-1", "nan", "inf", "0", "1", "0.1x"])
def test_thresholds_out_of_range_are_refused_with_the_range(text):
    with pytest.raises(DecisionError, match="between 0 and 1"):
        parse_threshold(text)


def test_auto_and_in_range_thresholds():
    assert parse_threshold("auto") is None and parse_threshold("AUTO") is None
    assert parse_threshold("0.7") == 0.7
