"""benchmarks/parity.py end to end with the tiny random CLIP on a synthetic MVTec-layout set."""

import json

from benchmarks import parity


def test_parity_reports_and_meets_targets(mvtec_tree, tmp_path, capsys):
    out = tmp_path / "parity.json"
    code = parity.main(["--model", "tiny", "--pretrained", "none", "--data", str(mvtec_tree / "widget"),
                        "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    for precision in ("fp32", "fp16"):
        for name in ("layer_tokens", "patch_embeds", "image_embeds"):
            entry = result[precision]["outputs"][name]
            assert entry["min_cosine"] >= parity.TARGETS[precision]["min_cosine"]
            # float16 outputs of magnitude ~1-10 agree within a few units in their last place
            assert entry["max_abs_diff"] < 1e-2
        # the float32 CLS embedding of an fp32 export is float32 arithmetic throughout
        assert precision == "fp16" or result[precision]["outputs"]["image_embeds"]["max_abs_diff"] < 1e-4
        assert {"image_auroc", "pixel_auroc", "pro", "max_map_diff"} <= set(result[precision]["metric_deltas"]["widget"])
    assert result["missed_targets"] == [] and "all parity targets met" in printed


def test_missed_target_is_reported():
    fake = {"fp32": {"outputs": {"layer_tokens": {"min_cosine": 0.99, "max_abs_diff": 1.0}},
                     "metric_deltas": {"x": {"image_auroc": 0.0}}},
            "fp16": {"outputs": {}, "metric_deltas": {"x": {"image_auroc": -0.01}}}}
    missed = parity.check_targets(fake)
    assert len(missed) == 2 and "fp32 layer_tokens" in missed[0] and "fp16 x" in missed[1]
