"""benchmarks/online_speed.py: banks of each setting built on the same lots, new images scored against them in
turns, with and without the encoder."""

import json

from benchmarks import online_speed
from conftest import FULL_BANK_VARIANT, make_mvtec_tree


def test_settings_side_by_side(repository, tmp_path, capsys):
    data = make_mvtec_tree(tmp_path / "data", n_good=5, n_bad=2, size=112) / "widget"
    assert online_speed.main(["--data", str(data), "--repository", str(repository), "--sizes", "5", "12", "--new",
                              "8", "--repeats", "2", "--variant", f"whole={FULL_BANK_VARIANT}", "--variant",
                              f"small={FULL_BANK_VARIANT},full_bank_images:4,full_coreset_ratio:0.25", "--json",
                              str(tmp_path / "o.json")]) == 0
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert [(r["lot_size"], r["variant"]) for r in rows] == [(5, "whole"), (5, "small"), (12, "whole"), (12, "small")]
    by = {(r["lot_size"], r["variant"]): r for r in rows}
    assert by[(12, "small")]["bank_mb"] < by[(12, "whole")]["bank_mb"] / 4  # a sample of 4 of 12, a quarter each
    assert all(r["score_images_per_s"] > 0 and r["end_to_end_images_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| 12 | small |" in out and "| 12 | whole |" in out
    assert online_speed.VARIANTS["default"] == {}  # today's bank, whatever the defaults are


def test_relative_widths_and_host_settings_reach_the_bank_and_the_scoring(repository, tmp_path, monkeypatch):
    """A variant may name a width relative to the encoder's (bank_dim:C/4) and a host setting (cpu_matmul): the
    first is resolved into the bank's config, the second goes to the host the build and scoring run on."""
    from postprocess import kernels as K

    import torch

    seen = []
    # the products in bfloat16 are counted (and taken in float32, so that this runs on any CPU)
    monkeypatch.setattr(K, "bfloat16_available", lambda: True)
    monkeypatch.setattr(K, "_bfloat16_product", lambda a, b: seen.append(a.shape) or torch.from_numpy(a @ b.T))
    data = make_mvtec_tree(tmp_path / "data", n_good=5, n_bad=2, size=112) / "widget"
    assert online_speed.main(["--data", str(data), "--repository", str(repository), "--sizes", "5", "--new", "8",
                              "--repeats", "1", "--variant", "quarter=bank_dim:C/4,cpu_matmul:bfloat16", "--json",
                              str(tmp_path / "o.json")]) == 0
    result = json.loads((tmp_path / "o.json").read_text())
    assert isinstance(result["variants"]["quarter"]["bank_dim"], int)
    assert seen  # the build's and the scoring's kNN took the host's products


def test_the_before_row_makes_entries_twice_and_reads_descriptors_per_request(repository, tmp_path, monkeypatch):
    from postprocess import kernels as K

    read, made = [], []
    real, quantize = K.image_descriptors, K.quantize_rows
    monkeypatch.setattr(K, "image_descriptors", lambda e, *a, **kw: read.append(e.shape[0]) or real(e, *a, **kw))
    monkeypatch.setattr(K, "quantize_rows", lambda v: made.append(v.shape) or quantize(v))
    data = make_mvtec_tree(tmp_path / "data", n_good=5, n_bad=2, size=112) / "widget"
    counts = {}
    for name in ("default", online_speed.AS_BEFORE):
        for new in (8, 16):
            read.clear()
            made.clear()
            assert online_speed.main(["--data", str(data), "--repository", str(repository), "--sizes", "12",
                                      "--new", str(new), "--repeats", "1", "--variant", f"{name}="]) == 0
            counts[name, new] = read.count(12)  # the bank's 12 images (the build's lot stage reads them too)
            counts[name, "made"] = len(made)
    assert counts["default", 8] == counts["default", 16]  # once per bank, however many requests
    assert counts[online_speed.AS_BEFORE, 16] > counts[online_speed.AS_BEFORE, 8] > counts["default", 8]
    # the lot stage quantises each layer's entries per scale; the build did it again, per scale
    assert counts[online_speed.AS_BEFORE, "made"] == counts["default", "made"] + 3
