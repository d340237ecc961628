"""benchmarks/scoring_speed.py on small features: both implementations run and agree."""

import json

from benchmarks import scoring_speed


def test_scoring_speed_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert scoring_speed.main(["--images", "6", "--tokens", "100", "--channels", "32", "--dim", "16",
                               "--map-size", "70", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["numpy", "torch"]
    assert all(r["total_s"] > 0 and r["peak_mb"] >= 0 for r in rows)
    assert abs(rows[0]["map_checksum"] - rows[1]["map_checksum"]) < 1e-3 * abs(rows[0]["map_checksum"])
    assert "torch / numpy: time x" in capsys.readouterr().out
