"""client/infer.py pieces that need no server: the CSV and its decisions."""

import csv

import numpy as np

from client.infer import decision, write_results


def test_decisions_follow_the_threshold(tmp_path):
    rows = [{"path": "a.png", "score": 0.05}, {"path": "b.png", "score": 0.2}, {"path": "c.png", "score": 0.1},
            {"path": "d.png", "score": float("nan")}]
    path = write_results(tmp_path, rows, threshold=0.1)
    got = {r["path"]: r["decision"] for r in csv.DictReader(open(path))}
    # above the threshold is anomalous; at it, normal; a score that is not a number is never called normal
    assert got == {"a.png": "normal", "b.png": "anomalous", "c.png": "normal", "d.png": "invalid"}
    assert decision(np.float32(0.3), 0.25) == "anomalous"
    without = write_results(tmp_path / "plain", rows[:1], threshold=None)
    assert open(without).read().splitlines()[0] == "path,score,overlay"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
