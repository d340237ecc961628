"""Declared extension points: the ``Backbone`` protocol every encoder implements, the table of encoder targets, and
Triton configs read and written through Triton's own protobuf schema."""

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export import targets
from export.backbones import ClipBackbone, OnnxBackbone
from export.repository import install_serving_models, point_ensemble_at
from export.triton_config import config_text, instance_kind, parse_config, read_config
from postprocess import contract as C
from postprocess import serving
from postprocess.backbone import MEMBERS, Backbone
from postprocess.config import PAClipConfig
from postprocess.contract import Features
from postprocess.pipeline import LotScorer, encode_images
from postprocess.serving import BankService, RemoteEncoder

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = (ClipBackbone, OnnxBackbone, RemoteEncoder)


# -- the Backbone protocol ---------------------------------------------------------------------------------------
def _annotation_parts(annotation) -> set[str]:
    """``"np.ndarray | None"``, ``numpy.ndarray | None`` -> {"ndarray", "None"} (spelled or evaluated alike)."""
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", None) or str(annotation)
    return {part.strip().rsplit(".", 1)[-1].replace("NoneType", "None") for part in annotation.split("|")}


def protocol_problems(cls) -> list[str]:
    """What keeps ``cls`` from implementing ``Backbone``: a member missing, of the wrong sort, inherited from the
    protocol's empty body, or with a signature the pipeline cannot call it with."""
    problems = []
    for name in MEMBERS:
        want = inspect.getattr_static(Backbone, name)
        try:
            have = inspect.getattr_static(cls, name)
        except AttributeError:
            problems.append(f"{name}: missing")
            continue
        if have is want:
            problems.append(f"{name}: the protocol's empty body (subclassing Backbone hides a missing member)")
        elif isinstance(want, property):
            if not (isinstance(have, property) or isinstance(have, bool)):
                problems.append(f"{name}: should be a bool property or attribute, is {type(have).__name__}")
        elif not inspect.isfunction(have):
            problems.append(f"{name}: should be a method, is {type(have).__name__}")
        else:
            want_sig, have_sig = inspect.signature(want), inspect.signature(have)
            wanted = list(want_sig.parameters.values())[1:]  # without self
            given = list(have_sig.parameters.values())[1:]
            positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            if len(given) < len(wanted):
                problems.append(f"{name}{have_sig}: takes fewer arguments than {name}{want_sig}")
            for w, g in zip(wanted, given):
                if g.kind not in positional or g.name != w.name:
                    problems.append(f"{name}{have_sig}: argument {g.name!r} where {name}{want_sig} has {w.name!r}")
            for extra in given[len(wanted):]:
                if extra.default is inspect.Parameter.empty and extra.kind in positional:
                    problems.append(f"{name}{have_sig}: {extra.name!r} needs a default (the pipeline never passes it)")
            if have_sig.return_annotation is not inspect.Signature.empty and \
                    not _annotation_parts(have_sig.return_annotation) <= _annotation_parts(want_sig.return_annotation):
                problems.append(f"{name}: returns {have_sig.return_annotation}, not {want_sig.return_annotation}")
    return problems


def test_members_are_the_protocols_own():
    declared = {n for n, v in vars(Backbone).items()
                if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))}
    assert declared == set(MEMBERS)


@pytest.mark.parametrize("encoder", ENCODERS, ids=lambda c: c.__name__)
def test_each_encoder_implements_the_backbone_protocol(encoder):
    assert protocol_problems(encoder) == []
    assert "Backbone" in encoder.__doc__  # declared where a reader looks


def test_instances_pass_the_runtime_check(tiny_clip):
    assert isinstance(tiny_clip, Backbone)
    assert isinstance(RemoteEncoder(lambda images: None), Backbone)


class FakeEncoder:
    """Features computed from the pixels (8-pixel patches), fast and deterministic, with a text tower."""

    patch = 8

    def __init__(self):
        rng = np.random.default_rng(0)
        self.w_tokens = rng.normal(size=(3, 2, 16)).astype(np.float32)
        self.w_embed = rng.normal(size=(16, 8)).astype(np.float32)

    @property
    def has_text(self) -> bool:
        return True

    def encode(self, images: np.ndarray) -> Features:
        n, h, w, _ = images.shape
        gh, gw = h // self.patch, w // self.patch
        pixels = images.reshape(n, gh, self.patch, gw, self.patch, 3).mean((2, 4)).reshape(n, gh * gw, 3) / 255
        layer_tokens = np.einsum("nlc,ctd->ntld", pixels, self.w_tokens)
        patch_embeds = np.tanh(layer_tokens[:, -1] @ self.w_embed)
        image_embeds = patch_embeds.mean(1)
        image_embeds /= np.linalg.norm(image_embeds, axis=-1, keepdims=True)
        return Features(layer_tokens.astype(np.float16), patch_embeds.astype(np.float16),
                        image_embeds.astype(np.float32), (gh, gw))

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        embeds = np.random.default_rng(len(prompts)).normal(size=(len(prompts), 8)).astype(np.float32)
        return embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)


class Recording:
    """Passes every attribute through to ``inner`` and notes its name."""

    def __init__(self, inner):
        self.__dict__["inner"], self.__dict__["used"] = inner, set()

    def __getattr__(self, name):
        self.used.add(name)
        return getattr(self.inner, name)


def _lot(n=6, size=32):
    images = np.random.default_rng(1).integers(60, 90, (n, size, size, 3), dtype=np.uint8)
    images[0, 8:16, 8:16] = 250  # one with a defect
    return images


def test_fake_encoder_is_a_backbone():
    assert protocol_problems(FakeEncoder) == [] and isinstance(FakeEncoder(), Backbone)


def test_the_protocol_is_exactly_what_the_pipeline_and_the_bank_service_use(tmp_path, monkeypatch):
    used = set()
    recorded = Recording(FakeEncoder())
    encode_images(recorded, _lot(), batch_size=4)
    LotScorer(recorded, _lot(), "washer", progress=False).score(PAClipConfig())  # text, CADA augmentations
    used |= recorded.used

    def recording_remote(*args):
        remote = Recording(RemoteEncoder(*args))
        services.append(remote)
        return remote

    services = []
    monkeypatch.setattr(serving, "RemoteEncoder", recording_remote)
    fake = FakeEncoder()
    encoder = {"backbone": "fake", "weights": "none", "image_size": 32, "patch_size": 8, "taps": [1, 2],
               "dynamic_size": True}
    service = BankService(serving.BankStore(tmp_path), encoder, fake.encode, fake.encode_text, log=lambda _: None)
    assert service.handle("encoder")["has_text"] is True
    service.handle("add", "washer", "washer", _lot())
    service.handle("build", "washer")
    (remote,) = services
    used |= remote.used
    assert used == set(MEMBERS)


@pytest.mark.parametrize("missing", MEMBERS)
def test_an_encoder_without_a_member_is_refused(missing):
    lacking = type("Lacking", (), {n: v for n, v in vars(FakeEncoder).items() if n != missing})
    assert protocol_problems(lacking) == [f"{missing}: missing"]
    assert not isinstance(lacking(), Backbone)
    with pytest.raises(AttributeError, match=missing):  # and the pipeline does need it
        LotScorer(lacking(), _lot(), "washer", progress=False).score(PAClipConfig())


def test_an_incompatible_signature_is_refused():
    class Wrong(FakeEncoder):
        def encode(self, images, grid):  # a second argument the pipeline never passes
            return super().encode(images)

        def encode_text(self, texts):  # another name
            return super().encode_text(texts)

    problems = protocol_problems(Wrong)
    assert len(problems) == 2 and "'grid' needs a default" in problems[0] and "'texts'" in problems[1]

    class Inherits(Backbone):  # subclassing the protocol would hide a missing member
        def encode(self, images: np.ndarray) -> Features:
            return FakeEncoder().encode(images)

    assert [p.split(":")[0] for p in protocol_problems(Inherits)] == ["has_text", "encode_text"]


# -- the table of encoder targets --------------------------------------------------------------------------------
def test_the_table_has_the_onnx_and_tensorrt_targets():
    assert {"onnx", "tensorrt"} <= set(targets.TARGETS)  # a new row is picked up by the tests below as it is
    onnx, trt = targets.ONNX, targets.TENSORRT
    assert (onnx.model, onnx.platform, onnx.kind, onnx.serving_kind, onnx.model_file) == \
        (C.VISION_MODEL, "onnxruntime_onnx", "KIND_CPU", "KIND_CPU", "model.onnx")
    assert (trt.model, trt.platform, trt.kind, trt.serving_kind, trt.model_file) == \
        ("clip_vision_trt", "tensorrt_plan", "KIND_GPU", "KIND_GPU", "model.plan")
    assert targets.target("tensorrt") is trt and targets.target("clip_vision_trt") is trt
    with pytest.raises(ValueError, match="unknown encoder target 'clip_vision_ov'"):
        targets.target("clip_vision_ov")
    with pytest.raises(ValueError, match="platform or a backend"):
        targets.EncoderTarget("x", "x", "KIND_CPU", "KIND_CPU", "model.x", "nobody")
    with pytest.raises(ValueError):  # a kind the schema does not have
        targets.EncoderTarget("x", "x", "KIND_TPU", "KIND_CPU", "model.x", "nobody", backend="x")


@pytest.mark.parametrize("target", targets.TARGETS.values(), ids=lambda t: t.name)
def test_each_target_writes_a_config_the_schema_reads_back(target):
    config = target.config((56, 84), 4, 24, 64, 32, 8, parameters={"encoder": "backbone=tiny"})
    again = parse_config(config_text(config))
    assert again == config
    assert (again.name, again.platform, again.backend) == (target.model, target.platform, target.backend)
    assert [g.kind for g in again.instance_group] == [instance_kind(target.kind)]
    assert [list(t.dims) for t in (*again.input, *again.output)] == [[56, 84, 3], [4, 24, 64], [24, 32], [32]]
    assert [t.name for t in again.output] == list(C.VISION_OUTPUTS)


def test_a_new_target_is_one_row():
    """What an OpenVINO CPU encoder would add: its row, and the serving models follow it through the table."""
    openvino = targets.EncoderTarget("openvino", "clip_vision_ov", backend="openvino", kind="KIND_CPU",
                                     serving_kind="KIND_CPU", model_file="model.xml", written_by="(a new module)")
    config = openvino.config(None, 4, -1, 384, 384, 8)
    assert config.backend == "openvino" and not config.platform and list(config.input[0].dims) == [-1, -1, 3]


def test_targets_are_spelled_in_the_table_only():
    """No special cases: the target names, platforms and instance kinds appear as literals in export/targets.py only
    (the code reads them off the table)."""
    spelled = {"clip_vision_trt", "tensorrt_plan", "onnxruntime_onnx", "KIND_GPU", "KIND_CPU"}
    offenders = []
    for package in ("postprocess", "export", "client", "serve", "benchmarks", "model_repository"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "export" / "targets.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in spelled:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert offenders == []


# -- config.pbtxt through the schema -----------------------------------------------------------------------------
def test_every_checked_in_config_parses_with_the_schema():
    paths = sorted((ROOT / "model_repository").glob("*/config.pbtxt"))
    assert {p.parent.name for p in paths} >= set(C.SERVING_MODELS)
    for path in paths:
        config = read_config(path)
        assert config.name == path.parent.name and (config.platform or config.backend)
    ensemble = read_config(ROOT / "model_repository" / C.ENSEMBLE)
    assert ensemble.ensemble_scheduling.step[0].model_name == targets.DEFAULT.model
    for name in (C.SCORE_MODEL, C.BANK_MODEL):
        config = read_config(ROOT / "model_repository" / name)
        assert config.parameters["encoder_model"].string_value == targets.DEFAULT.model
        assert [g.kind for g in config.instance_group] == [instance_kind(targets.DEFAULT.serving_kind)]


def test_pointing_at_each_target_and_back_gives_the_checked_in_configs(tmp_path):
    checked_in = {p: p.read_bytes() for p in (ROOT / "model_repository").glob("*/config.pbtxt")}
    install_serving_models(tmp_path)
    originals = {name: read_config(tmp_path / name) for name in C.SERVING_MODELS}
    for target in targets.TARGETS.values():
        point_ensemble_at(tmp_path, target)
        ensemble = read_config(tmp_path / C.ENSEMBLE)
        assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [target.model, C.SCORE_MODEL]
        for name in (C.SCORE_MODEL, C.BANK_MODEL):
            config = read_config(tmp_path / name)
            assert config.parameters["encoder_model"].string_value == target.model
            assert [g.kind for g in config.instance_group] == [instance_kind(target.serving_kind)]
            assert config.backend == "python"
        assert point_ensemble_at(tmp_path, target.model) == []  # nothing changes: nothing written
    written = point_ensemble_at(tmp_path, targets.DEFAULT.name)
    assert sorted(p.parent.name for p in written) == sorted(C.SERVING_MODELS)
    assert {name: read_config(tmp_path / name) for name in C.SERVING_MODELS} == originals
    assert originals[C.SCORE_MODEL].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"  # kept
    assert {p: p.read_bytes() for p in checked_in} == checked_in  # the project's own files untouched
    with pytest.raises(ValueError, match="unknown encoder target"):
        point_ensemble_at(tmp_path, "clip_vision_ov")


def test_the_canary_reads_configs_with_the_same_helper(tmp_path):
    from export.triton_config import write_config
    from serve import canary

    assert canary.read_config is read_config
    # the checked-in serving models beside an ONNX encoder's config (a fresh clone has no exported encoder)
    install_serving_models(tmp_path)
    write_config(tmp_path / C.VISION_MODEL, targets.ONNX.config((112, 112), 4, 64, 64, 32, 8))
    models = canary.python_run_models(tmp_path, {targets.ONNX.platform})
    assert {m.name for m in models} == {C.VISION_MODEL, C.SCORE_MODEL, C.BANK_MODEL}
    assert all(isinstance(m, mc.ModelConfig) for m in models)


def test_a_triton_model_config_names_exactly_one_of_a_platform_and_a_backend():
    """tritonserver refuses a config that names both (or neither): the export must refuse it before writing."""
    from export.triton_config import check_runner, vision_config

    check_runner("clip_vision", "onnxruntime_onnx", "")
    check_runner("clip_vision", "", "openvino")
    for platform, backend in (("onnxruntime_onnx", "openvino"), ("", "")):
        with pytest.raises(ValueError, match="platform or a backend"):
            check_runner("clip_vision", platform, backend)
    with pytest.raises(ValueError, match="platform or a backend"):
        vision_config("clip_vision", 224, 4, 16, 64, 32, 8, kind="KIND_CPU", platform="onnxruntime_onnx",
                      backend="openvino")


def test_the_exported_vision_encoder_batches_requests_dynamically():
    """The encoder's config turns on Triton's dynamic batcher (README: in-flight requests merged into one batch
    raise throughput): without it each request of the ensemble ran the encoder on its own."""
    from export.triton_config import vision_config

    config = parse_config(config_text(vision_config("clip_vision", 224, 4, 16, 64, 32, 8, kind="KIND_CPU",
                                                    platform="onnxruntime_onnx")))
    assert config.HasField("dynamic_batching") and config.max_batch_size == 8
