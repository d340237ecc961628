"""benchmarks/lot_pairs_speed.py on a small lot: both kernels run, print a row each, and agree."""

from benchmarks import lot_pairs_speed


def test_lot_pairs_speed_table(capsys):
    rows = lot_pairs_speed.main(["--images", "5", "41", "--patches", "16", "--channels", "8"])
    assert [r["images"] for r in rows] == [5, 41]
    assert all(r["max_diff"] < 1e-5 for r in rows)
    out = capsys.readouterr().out
    assert "| images | patches | channels | k |" in out and "| 41 | 16 | 8 | 2 |" in out  # k = 5% of 40 others: an interval of 2
