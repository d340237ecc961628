"""benchmarks/lot_scaling.py: lots grown from repeated real images, exact and sampled, timed and traced; the test set
as one lot under each setting."""

import argparse
import json

import numpy as np
import pytest

from benchmarks import lot_scaling
from conftest import make_mvtec_tree


def test_time_and_accuracy_tables(repository, tmp_path, capsys):
    data = make_mvtec_tree(tmp_path / "data", n_good=6, n_bad=3, size=112) / "widget"
    assert lot_scaling.main(["time", "--data", str(data), "--repository", str(repository), "--sizes", "6", "14",
                             "--references", "0", "4", "--neighbours", "3", "--pairs", "5:2",
                             "--json", str(tmp_path / "t.json")]) == 0
    saved = json.loads((tmp_path / "t.json").read_text())
    rows = {(r["lot_size"], r["references"] or -r["neighbours"]): r for r in saved["rows"] if r["references"] != 5}
    pairs = {r["lot_size"]: r for r in saved["rows"] if r["references"] == 5}
    assert pairs[14]["neighbours"] == 2 and pairs[14]["full_bank_images"] == 5 and pairs[6]["full_bank_images"] == 6
    assert rows[(14, 0)]["full_bank_images"] == 14 and rows[(14, 4)]["full_bank_images"] == 4
    assert rows[(6, 4)]["full_bank_images"] == 4  # 6 > 4 + 1: sampled
    assert rows[(14, 4)]["bank_mb"] < rows[(14, 0)]["bank_mb"]
    assert rows[(14, -3)]["full_bank_images"] == 14  # neighbours keep the whole lot, and read 3 of it per image
    assert all(r["build_peak_mb"] > 0 and r["score_s_per_image"] > 0 for r in rows.values())
    out = capsys.readouterr().out
    assert "| 14 | 4 | a sample of 4 |" in out and "| 14 | 14 | nearest 3 |" in out
    assert "| 14 | 5 | nearest 2 of a sample of 5 |" in out and "(nearest 2 of a sample of 5: too few sizes)" in out
    # the whole lot fitted over every size (the smallest was left out: "50-400" in the README read 100-400)
    assert "over 6-14 images (every image (exact))" in out
    assert lot_scaling.main(["accuracy", "--data", str(data), "--repository", str(repository), "--references", "0",
                             "3", "--neighbours", "2"]) == 0
    out = capsys.readouterr().out
    assert "| every image (exact) |" in out and "| a sample of 3 |" in out and "| nearest 2 |" in out


def test_repeats_are_never_identical_and_growth_is_a_log_log_slope():
    from postprocess.contract import Features

    rng = np.random.default_rng(0)
    feats = Features(rng.standard_normal((3, 2, 4, 5)).astype(np.float16), rng.standard_normal((3, 4, 6)),
                     rng.standard_normal((3, 6)), (2, 2))
    lot, images = lot_scaling.repeated(feats, np.zeros((3, 28, 28, 3), np.uint8), 7)
    assert len(images) == 7 and lot.layer_tokens.shape[0] == 7
    np.testing.assert_array_equal(lot.layer_tokens[:3], feats.layer_tokens)  # the first pass is the set itself
    assert not np.array_equal(lot.layer_tokens[3], lot.layer_tokens[0])
    rows = [{"lot_size": n, "references": 0, "build_s": 0.01 * n ** 2} for n in (50, 100, 200, 400)]
    rows += [{"lot_size": n, "references": 100, "build_s": 0.5 * n} for n in (50, 100, 200, 400)]
    assert abs(lot_scaling.growth(rows, 0, 50) - 2.0) < 1e-9  # 50 itself left out: above it
    assert abs(lot_scaling.growth(rows, 100, 101) - 1.0) < 1e-9
    assert lot_scaling.growth(rows, 100, 300) is None
    assert lot_scaling.pair("160:8") == (160, 8)
    for bad in ("160", "160:0", "-1:8", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError):
            lot_scaling.pair(bad)
