"""TensorRT: the profile and config are checked everywhere; the build itself needs TensorRT and a CUDA GPU."""

import importlib.util
from pathlib import Path

import pytest

from export import __main__ as export_cli
from export.tensorrt_build import BatchProfile, engine_config

ROOT = Path(__file__).resolve().parents[1]


def _gpu_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


def test_profile_shapes_and_validation():
    assert BatchProfile(518).shapes() == ((1, 518, 518, 3), (4, 518, 518, 3), (8, 518, 518, 3))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(518, 2, 1, 8)


def test_engine_config_serves_the_contract_on_gpu():
    fp = {"backbone": "ViT-L-14-336", "weights": "tag:openai", "image_size": 518, "taps": [6, 12, 18, 24]}
    text = engine_config(fp, BatchProfile(518, max_batch=16), 4, 1369, 1024, 768)
    assert 'platform: "tensorrt_plan"' in text and "KIND_GPU" in text and "max_batch_size: 16" in text
    assert "[ 518, 518, 3 ]" in text and "[ 4, 1369, 1024 ]" in text and "TYPE_FP16" in text
    assert "weights=tag:openai" in text


@pytest.fixture(scope="module")
def tiny_repo(tiny_repository):
    return tiny_repository


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error(tiny_repo, tmp_path, capsys):
    assert export_cli.main(["tensorrt", "--repository", str(tiny_repo),
                            "--timing-cache", str(tmp_path / "cache")]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not (tiny_repo / "clip_vision_trt").exists()


def test_missing_onnx_model_says_what_to_run(tmp_path, capsys):
    assert export_cli.main(["tensorrt", "--repository", str(tmp_path)]) == 2
    assert "python -m export onnx" in capsys.readouterr().err


@pytest.mark.skipif(not _gpu_tensorrt(), reason="TensorRT and a CUDA GPU are not available here")
def test_build_plan(tiny_repo, tmp_path):
    assert export_cli.main(["tensorrt", "--repository", str(tiny_repo), "--max-batch", "4", "--opt-batch", "2",
                            "--timing-cache", str(tmp_path / "cache")]) == 0
    assert (tiny_repo / "clip_vision_trt/1/model.plan").stat().st_size > 0
    assert (tmp_path / "cache").stat().st_size > 0


def test_ensemble_can_be_pointed_at_the_plan_and_back(tmp_path):
    from export.repository import install_serving_models, point_ensemble_at

    install_serving_models(tmp_path)
    changed = point_ensemble_at(tmp_path, "clip_vision_trt")
    assert sorted(p.parent.name for p in changed) == ["pa_clip", "pa_clip_bank", "pa_clip_score"]
    ensemble = (tmp_path / "pa_clip" / "config.pbtxt").read_text()
    assert 'model_name: "clip_vision_trt"' in ensemble and 'model_name: "clip_vision"' not in ensemble
    assert 'string_value: "clip_vision_trt"' in (tmp_path / "pa_clip_score" / "config.pbtxt").read_text()
    for name in ("pa_clip_score", "pa_clip_bank"):  # GPU instances beside the plan
        assert "instance_group [ { kind: KIND_GPU" in (tmp_path / name / "config.pbtxt").read_text()
    point_ensemble_at(tmp_path, "clip_vision")
    assert (tmp_path / "pa_clip" / "config.pbtxt").read_text() == \
        (ROOT / "model_repository" / "pa_clip" / "config.pbtxt").read_text()
