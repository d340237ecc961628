"""benchmarks/online_speed.py: banks of each setting built on the same lots, new images scored against them in
turns, with and without the encoder."""

import json

from benchmarks import online_speed
from conftest import make_mvtec_tree


def test_settings_side_by_side(repository, tmp_path, capsys):
    data = make_mvtec_tree(tmp_path / "data", n_good=5, n_bad=2, size=112) / "widget"
    assert online_speed.main(["--data", str(data), "--repository", str(repository), "--sizes", "5", "12", "--new",
                              "8", "--repeats", "2", "--variant", "whole=", "--variant",
                              "small=full_bank_images:4,full_coreset_ratio:0.25", "--json",
                              str(tmp_path / "o.json")]) == 0
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert [(r["lot_size"], r["variant"]) for r in rows] == [(5, "whole"), (5, "small"), (12, "whole"), (12, "small")]
    by = {(r["lot_size"], r["variant"]): r for r in rows}
    assert by[(12, "small")]["bank_mb"] < by[(12, "whole")]["bank_mb"] / 4  # a sample of 4 of 12, a quarter each
    assert all(r["score_images_per_s"] > 0 and r["end_to_end_images_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| 12 | small |" in out and "| 12 | whole |" in out
    assert online_speed.VARIANTS["before issue 26"]["full_coreset_ratio"] == 1.0
