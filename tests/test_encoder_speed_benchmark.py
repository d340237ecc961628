"""benchmarks/encoder_speed.py runs every variant side by side (tiny model, so it is quick)."""

import json

from benchmarks import encoder_speed


def test_encoder_speed_table(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert encoder_speed.main(["--model", "tiny", "--image-size", "56", "--iterations", "1", "--batches", "1", "2",
                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["variant"], r["batch"]) for r in rows} == {(v, b) for v in encoder_speed.VARIANTS for b in (1, 2)}
    printed = capsys.readouterr().out
    for r in rows:  # the table shows what was measured
        assert f"{r['variant']:<16}{r['batch']:>6}{r['images_per_s']:>10.3f}{r['peak_mb']:>10.0f}" in printed
    for batch in (1, 2):  # and the ratio is the best ONNX Runtime row over torch eager
        torch_row = next(r for r in rows if r["variant"] == "torch" and r["batch"] == batch)
        best = max((r for r in rows if r["variant"] != "torch" and r["batch"] == batch),
                   key=lambda r: r["images_per_s"])
        assert (f"batch {batch}: best ONNX Runtime ({best['variant']}) / torch eager = "
                f"x{best['images_per_s'] / torch_row['images_per_s']:.2f}") in printed
