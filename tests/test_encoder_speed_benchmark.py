"""benchmarks/encoder_speed.py runs every variant side by side (tiny model, so it is quick)."""

import json

from benchmarks import encoder_speed


def test_encoder_speed_table(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert encoder_speed.main(["--model", "tiny", "--image-size", "56", "--iterations", "1", "--batches", "1", "2",
                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["variant"], r["batch"]) for r in rows} == {(v, b) for v in encoder_speed.VARIANTS for b in (1, 2)}
    assert all(r["images_per_s"] > 0 and r["peak_mb"] > 0 for r in rows)
    assert "/ torch eager = x" in capsys.readouterr().out
