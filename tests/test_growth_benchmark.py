"""benchmarks/growth.py: an update against a rebuild on the same lots and batches (tiny model, synthetic parts)."""

import json

import pytest

from benchmarks import growth
from conftest import make_mvtec_tree


@pytest.mark.parametrize("sample", [[], ["--full-bank-images", "5", "--budget", "0.2"]], ids=["whole lot", "sampled"])
def test_update_and_rebuild_side_by_side(repository, tmp_path, capsys, sample):
    data = make_mvtec_tree(tmp_path / "data", n_good=20, n_bad=5, size=112) / "widget"
    assert growth.main(["--data", str(data), "--repository", str(repository), "--lot-size", "8", "--batch", "6",
                        "--batch-defects", "1", "--splits", "2", "--json", str(tmp_path / "g.json"), *sample]) == 0
    saved = json.loads((tmp_path / "g.json").read_text())
    assert len(saved["rows"]) == 2
    for row in saved["rows"]:
        assert row["update_s"] > 0 and row["rebuild_s"] > 0 and 0 <= row["folded_in"] <= 6
        assert 0 <= row["auroc_grown"] <= 1 and -1 <= row["spearman_grown_rebuilt"] <= 1
        assert 0 <= row["auroc_grown_without_defects"] <= 1
        (part,) = row["defective_batch_parts"]  # --batch-defects 1
        assert part["folded_in"] == (part["score"] <= row["accept_level"])
        assert sum(p["folded_in"] for p in row["defective_batch_parts"]) == row["defective_folded_in"]
        if row["defective_folded_in"] == 0:  # the same parts folded in: the same bank ranks alike
            assert row["auroc_grown_without_defects"] == row["auroc_grown"]
    out = capsys.readouterr().out
    moved = [r["auroc_grown"] - r["auroc_before"] for r in saved["rows"]]
    assert f"AUROC moved by growing: {sum(moved) / 2:+.3f}" in out
    assert "| grown |" in out and "| rebuilt |" in out and "faster)" in out and "grown with its good parts only" in out
    assert ("reservoir sampling" in out) == bool(sample) == ("a 20% budget" in out)
