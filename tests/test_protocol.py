"""The tune-on-one-set, report-on-the-other protocol: which candidate it picks and what it reports."""

import json

from benchmarks import protocol


def write_run(path, aspect, size, rows, seconds=0.1):
    """A results.json as benchmarks.evaluate writes it, with only what the protocol reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ablation = {row: {"mean": {"image_auroc": a, "pro": p, "pixel_auroc": 0.9},
                      "defect_types": {"cat": {"crack": {"image_auroc": a - 0.1, "pro": p}}}}
                for row, (a, p) in rows.items()}
    details = {row: {"cat": {"score_seconds_per_image": seconds, "bank_mb": 1.0, "input_size": [size, size]}}
               for row in rows}
    path.write_text(json.dumps({"aspect": aspect, "image_size": [size], "mode": "pad_mpam", "ablation": ablation,
                                "details": details}))
    return path


def test_each_direction_picks_on_its_tuning_set_and_reports_the_other(tmp_path, capsys):
    # set A prefers native/rs, set B prefers square/pad_mpam: each direction must report the OTHER set's figures
    write_run(tmp_path / "a/n/results.json", "native", 224, {"pad_mpam": (0.70, 0.60), "rs": (0.80, 0.65)})
    write_run(tmp_path / "a/s/results.json", "square", 224, {"pad_mpam": (0.72, 0.60), "rs": (0.71, 0.60)})
    write_run(tmp_path / "b/n/results.json", "native", 224, {"pad_mpam": (0.60, 0.50), "rs": (0.62, 0.52)})
    write_run(tmp_path / "b/s/results.json", "square", 224, {"pad_mpam": (0.90, 0.70), "rs": (0.50, 0.50)})
    out = tmp_path / "protocol.json"
    code = protocol.main(["--sets", f"A={tmp_path}/a/*/results.json", f"B={tmp_path}/b/*/results.json",
                          "--json", str(out), "--table"])
    assert code == 0
    a_to_b, b_to_a = json.loads(out.read_text())
    assert a_to_b["chosen"] == "native@224/rs" and a_to_b["reported_on"] == "B"
    assert a_to_b["reported"]["mean"]["image_auroc"] == 0.62  # B's figure for A's choice, not B's best
    assert a_to_b["oracle"] == "square@224/pad_mpam" and a_to_b["baseline_metrics"]["image_auroc"] == 0.90
    assert b_to_a["chosen"] == "square@224/pad_mpam" and b_to_a["reported"]["mean"]["image_auroc"] == 0.72
    printed = capsys.readouterr().out
    assert "tuned on A" in printed and "oracle square@224/pad_mpam" in printed and "crack" in printed
    assert "| native@224/rs | B | 224x224 | 256 | 62.0 | 90.0 | - | 52.0 | 0.100 | 1 |" in printed


def test_a_time_budget_keeps_slow_candidates_out_of_the_choice(tmp_path):
    write_run(tmp_path / "a/n/results.json", "native", 448, {"pad_mpam": (0.90, 0.90)}, seconds=5.0)
    write_run(tmp_path / "a/s/results.json", "square", 224, {"pad_mpam": (0.70, 0.60), "rs": (0.75, 0.60)})
    write_run(tmp_path / "b/n/results.json", "native", 448, {"pad_mpam": (0.80, 0.80)}, seconds=1.0)
    write_run(tmp_path / "b/s/results.json", "square", 224, {"pad_mpam": (0.60, 0.50), "rs": (0.65, 0.50)})
    sets = ["--sets", f"A={tmp_path}/a/*/results.json", f"B={tmp_path}/b/*/results.json"]
    out = tmp_path / "p.json"
    assert protocol.main(sets + ["--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["chosen"] == "native@448/pad_mpam"
    assert protocol.main(sets + ["--json", str(out), "--max-seconds-per-image", "2"]) == 0
    a_to_b, b_to_a = json.loads(out.read_text())
    assert a_to_b["chosen"] == "square@224/rs"  # 448 costs 5 s per image on A: out
    assert b_to_a["chosen"] == "native@448/pad_mpam"  # 1 s on B: in, and its cost on A is reported, not judged
    # the same by patches per image (448 x 448 is 1024 patches), whatever the machine's speed
    assert protocol.main(sets + ["--json", str(out), "--max-patches", "500"]) == 0
    assert [d["chosen"] for d in json.loads(out.read_text())] == ["square@224/rs", "square@224/rs"]
    # a run that recorded no time cannot be shown to fit a time budget: it is out, not free
    write_run(tmp_path / "a/n/results.json", "native", 448, {"pad_mpam": (0.90, 0.90)}, seconds=None)
    assert protocol.main(sets + ["--json", str(out), "--max-seconds-per-image", "2"]) == 0
    assert json.loads(out.read_text())[0]["chosen"] == "square@224/rs"


def test_missing_runs_are_a_clear_error(tmp_path, capsys):
    assert protocol.main(["--sets", f"A={tmp_path}/none/*.json", f"B={tmp_path}/none/*.json"]) == 2
    assert "run python -m benchmarks.evaluate first" in capsys.readouterr().err
