"""benchmarks/scoring_speed.py on small features: both implementations run and agree."""

import json

from benchmarks import scoring_speed


def test_scoring_speed_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert scoring_speed.main(["--images", "6", "--tokens", "100", "--channels", "32", "--dim", "16",
                               "--map-size", "70", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["numpy", "torch"]
    for r in rows:
        assert abs(r["total_s"] - (r["lot_stage_s"] + r["finish_stage_s"])) < 1e-9
    # the two implementations compute the same maps (70x70 of 6 images: a sum of 29400 values)
    assert abs(rows[0]["map_checksum"] - rows[1]["map_checksum"]) < 1e-3 * abs(rows[0]["map_checksum"])
    numpy_row, torch_row = rows
    assert (f"torch / numpy: time x{torch_row['total_s'] / numpy_row['total_s']:.2f}, peak memory "
            f"x{torch_row['peak_mb'] / max(numpy_row['peak_mb'], 1e-9):.2f}") in capsys.readouterr().out
